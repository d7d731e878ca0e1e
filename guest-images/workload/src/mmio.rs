//! The VMM's MMIO debug device at guest physical 0xD000_0000 (usable from ring 3).

/// Guest physical (= virtual) address of the debug device page.
const BASE: usize = 0xD000_0000;
/// One-byte writes go to the console.
const CONSOLE: usize = BASE;
/// A write ends the VM with that exit code.
const EXIT: usize = BASE + 0x08;

/// Sends one byte to the VMM's console.
pub fn putc(byte: u8) {
    // SAFETY: the stub identity-maps the device page with U/S=1; the write exits to the VMM.
    unsafe { core::ptr::write_volatile(CONSOLE as *mut u8, byte) }
}

/// Ends the VM with `code`; spins if the VMM does not stop this vCPU at once.
pub fn exit(code: u8) -> ! {
    // SAFETY: as in `putc`; a 4-byte write to the exit register.
    unsafe { core::ptr::write_volatile(EXIT as *mut u32, u32::from(code)) }
    loop {
        core::hint::spin_loop();
    }
}
