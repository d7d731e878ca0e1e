//! The register state a vCPU starts with: 64-bit long mode as the Linux boot protocol expects.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::long_mode::{self, GDT_ADDR, GDT_LIMIT, IDT_ADDR, PML4_ADDR};
use crate::boot::{BootInfo, BOOT_STACK_POINTER, ZERO_PAGE_START};

use super::VcpuError;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// MSR numbers (arch/x86/include/asm/msr-index.h).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// Loads the boot state into vCPU `index` of `count`.
pub fn setup(fd: &VcpuFd, boot: &BootInfo, index: u8, count: u8) -> Result<(), VcpuError> {
    setup_msrs(fd)?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rdi: u64::from(index),
        rdx: u64::from(count),
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_REGS", e))?;

    let mut sregs: kvm_sregs = fd
        .get_sregs()
        .map_err(|e| VcpuError::Kvm("KVM_GET_SREGS", e))?;
    let code = long_mode::segment_from_gdt(2);
    let data = long_mode::segment_from_gdt(3);
    let tss = long_mode::segment_from_gdt(4);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_SREGS", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu)
        .map_err(|e| VcpuError::Kvm("KVM_SET_FPU", e))?;
    Ok(())
}

fn setup_msrs(fd: &VcpuFd) -> Result<(), VcpuError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrCount(entries.len()))?;
    let set = fd
        .set_msrs(&msrs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(VcpuError::MsrRejected {
            index: entries[set].index,
        });
    }
    Ok(())
}

/// Routes LINT0 to ExtINT and LINT1 to NMI, as a BIOS would, so the legacy PIC and NMIs reach
/// the BSP.
pub fn setup_lapic(fd: &VcpuFd) -> Result<(), VcpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = fd
        .get_lapic()
        .map_err(|e| VcpuError::Kvm("KVM_GET_LAPIC", e))?;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)
        .map_err(|e| VcpuError::Kvm("KVM_SET_LAPIC", e))
}
