//! An Intel MultiProcessor Specification 1.4 table, so that a Linux guest finds every vCPU and
//! the I/O APIC without ACPI.
//!
//! Layout at [`MPTABLE_START`]: the floating pointer structure, then the configuration table
//! header followed by one processor entry per vCPU, the ISA bus, the I/O APIC, one I/O interrupt
//! entry per ISA IRQ and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;

/// Where the MP table starts (the top 1 KiB of base memory, the EBDA).
pub const MPTABLE_START: u64 = 0x9fc00;
/// Room the table may use (up to 0xa0000).
const MPTABLE_MAX: usize = 0x400;
const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IRQ_COUNT: u8 = 16;
const MP_SPEC_REV: u8 = 4;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpFloating {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpConfigHeader {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    product: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpProcessor {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpBus {
    entry_type: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIoApic {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpInterrupt {
    entry_type: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// Compile-time checks that the structs have the sizes the specification gives.
const _: () = assert!(std::mem::size_of::<MpFloating>() == 16);
const _: () = assert!(std::mem::size_of::<MpConfigHeader>() == 44);
const _: () = assert!(std::mem::size_of::<MpProcessor>() == 20);
const _: () = assert!(std::mem::size_of::<MpBus>() == 8);
const _: () = assert!(std::mem::size_of::<MpIoApic>() == 8);
const _: () = assert!(std::mem::size_of::<MpInterrupt>() == 8);

// SAFETY: all of these are plain packed structs of integers and byte arrays: every bit pattern
// is a valid value and there is no padding.
unsafe impl ByteValued for MpFloating {}
// SAFETY: as above.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above.
unsafe impl ByteValued for MpInterrupt {}

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
const MPC_APIC_USABLE: u8 = 1;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Builds the MP table for `vcpus` processors as bytes (floating pointer first).
fn build(vcpus: u8) -> Result<Vec<u8>, BootError> {
    let ioapic_id = vcpus.checked_add(1).ok_or(BootError::TooManyVcpus(vcpus))?;
    let mut body = Vec::new();
    for cpu in 0..vcpus {
        let p = MpProcessor {
            entry_type: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: 0x600,  // family 6
            featureflag: 0x201, // FPU | APIC
            reserved: [0; 2],
        };
        body.extend_from_slice(p.as_slice());
    }
    let bus = MpBus {
        entry_type: MP_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    body.extend_from_slice(bus.as_slice());
    let ioapic = MpIoApic {
        entry_type: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: APIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_DEFAULT_BASE,
    };
    body.extend_from_slice(ioapic.as_slice());
    for irq in 0..IRQ_COUNT {
        let i = MpInterrupt {
            entry_type: MP_INTSRC,
            irqtype: MP_IRQ_TYPE_INT,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        body.extend_from_slice(i.as_slice());
    }
    for (irqtype, lint) in [(MP_IRQ_TYPE_EXTINT, 0u8), (MP_IRQ_TYPE_NMI, 1u8)] {
        let l = MpInterrupt {
            entry_type: MP_LINTSRC,
            irqtype,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: 0,
            dstapic: 0xff, // all local APICs
            dstirq: lint,
        };
        body.extend_from_slice(l.as_slice());
    }
    let entry_count = vcpus as usize + 2 + IRQ_COUNT as usize + 2;
    let table_len = std::mem::size_of::<MpConfigHeader>() + body.len();
    let float_len = std::mem::size_of::<MpFloating>();
    if float_len + table_len > MPTABLE_MAX {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        length: table_len as u16,
        spec: MP_SPEC_REV,
        checksum: 0,
        oem: *b"RUSTVMM ",
        product: *b"HUGEPOSTCOPY",
        oemptr: 0,
        oemsize: 0,
        oemcount: entry_count as u16,
        lapic: APIC_DEFAULT_BASE,
        reserved: 0,
    };
    let sum = checksum(header.as_slice()).wrapping_add(checksum(&body));
    header.checksum = 0u8.wrapping_sub(sum);
    let mut floating = MpFloating {
        signature: *b"_MP_",
        physptr: (MPTABLE_START + float_len as u64) as u32,
        length: 1, // in 16-byte units
        specification: MP_SPEC_REV,
        checksum: 0,
        feature: [0; 5],
    };
    floating.checksum = 0u8.wrapping_sub(checksum(floating.as_slice()));

    let mut out = Vec::with_capacity(float_len + table_len);
    out.extend_from_slice(floating.as_slice());
    out.extend_from_slice(header.as_slice());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes the MP table for `vcpus` processors at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_pointers_consistent() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(checksum(&t[0..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(checksum(&t[16..16 + len]), 0);
        assert_eq!(16 + len, t.len());
    }

    #[test]
    fn refuses_more_vcpus_than_fit() {
        assert!(matches!(build(255), Err(BootError::TooManyVcpus(255))));
    }
}
