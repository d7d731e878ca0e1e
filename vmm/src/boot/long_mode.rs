//! The boot GDT, an empty IDT and identity page tables for the first 1 GiB, as the 64-bit boot
//! protocol expects them on entry, plus the segment values the vCPUs are loaded with.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Where the boot GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) boot IDT lives.
pub const IDT_ADDR: u64 = 0x520;
/// PML4, PDPT and PD of the identity map.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

/// Selector of the 64-bit code segment (Linux's `__BOOT_CS`).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment (Linux's `__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// The GDT: null, null, code64, data, tss (flags in the descriptor's 0xFFFF upper word).
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Builds a segment descriptor from (flags, base, limit), flags laid out as in the descriptor's
/// bytes 5-6 (access byte low, granularity nibble high).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// KVM's view of a GDT entry, for loading segment registers.
pub fn segment_from_gdt(index: usize) -> kvm_segment {
    let entry = GDT[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if ((entry >> 47) & 1) == 1 { 0 } else { 1 },
    }
}

/// Size in bytes of the GDT, minus one (the GDTR limit).
pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;

/// Writes the GDT, the empty IDT and the identity page tables (first 1 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    // Present | writable.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64bit_present_ring0() {
        let cs = segment_from_gdt(2);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.present, cs.dpl, cs.s, cs.type_),
            (1, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(3);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.db, ds.type_), (1, 3));
        assert_eq!(segment_from_gdt(4).selector, TSS_SELECTOR);
    }
}
