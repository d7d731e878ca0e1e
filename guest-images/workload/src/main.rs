//! The workload guest: a freestanding ELF that the VMM boots on every vCPU.
//!
//! A small ring-0 stub ([`boot`]) sets up paging, GDT/TSS/IDT and drops to ring 3, where
//! [`workload`] writes and verifies an address-dependent pattern over guest RAM and times
//! page accesses. Output goes through [`console`]: the MMIO debug device ([`mmio`]) under our
//! VMM, the ring-0 stub's serial call under QEMU.

#![no_std]
#![no_main]

mod boot;
mod bootparams;
mod cmdline;
mod console;
mod hist;
mod layout;
mod mem;
mod mmio;
mod order;
mod pattern;
mod tsc;
mod workload;

/// Ring-3 entry point of every vCPU (the ring-0 stub `iretq`s here).
#[no_mangle]
pub extern "C" fn workload_entry(vcpu: u64, boot_params: u64, vcpus: u64) -> ! {
    workload::run(vcpu, boot_params, vcpus)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::with(|w| {
        use core::fmt::Write;
        let _ = writeln!(w, "WORKLOAD PANIC {}", info);
    });
    console::exit(2)
}

/// Never called (panic=abort), but the precompiled `core` refers to it in unoptimized
/// builds without LTO.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
