//! Line-atomic console output shared by all vCPUs, and the end of the VM.
//!
//! Ring 3 reaches its host one of two ways, chosen by the boot path ([`boot::on_qemu`]):
//! - our VMM: the MMIO debug device ([`mmio`]), one store per byte, a store to end the VM;
//! - QEMU: port I/O carried out by the ring-0 stub (`rep outsb` of a buffer to the UART,
//!   `out` of the exit code to QEMU's `isa-debug-exit` port 0xf4): ring-3 port I/O raises
//!   #GP under PVM, and the stub's #GP handler performs it and resumes (see `boot`). QEMU
//!   has no MMIO debug device. Output is buffered so that a line costs one trap.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::boot;
use crate::mmio;

static LOCK: AtomicBool = AtomicBool::new(false);
/// The UART's data port (QEMU's first ISA serial port).
const UART: u16 = 0x3f8;
/// QEMU's `isa-debug-exit` port (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
const EXIT_PORT: u16 = 0xf4;

/// Bytes buffered before one `rep outsb` under QEMU.
const BUF: usize = 256;

/// Writes to the host's console; only handed out while the lock is held.
pub struct Console {
    qemu: bool,
    buf: [u8; BUF],
    len: usize,
}

impl Console {
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: writes `len` bytes of our own buffer to the UART port. Only on the PVH
        // path (QEMU), where the stub's #GP handler carries the instruction out in ring 0 and
        // resumes after it with rsi advanced and rcx = 0, as the hardware would.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                in("dx") UART,
                inout("rsi") self.buf.as_ptr() => _,
                inout("rcx") self.len => _,
                options(nostack, preserves_flags, readonly),
            );
        }
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !self.qemu {
            for b in s.bytes() {
                mmio::putc(b);
            }
            return Ok(());
        }
        for &b in s.as_bytes() {
            if self.len == BUF {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Runs `f` with exclusive use of the console, so lines of different vCPUs never mix.
pub fn with<R>(f: impl FnOnce(&mut Console) -> R) -> R {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let mut c = Console {
        qemu: boot::on_qemu(),
        buf: [0; BUF],
        len: 0,
    };
    let r = f(&mut c);
    c.flush();
    LOCK.store(false, Ordering::Release);
    r
}

/// Ends the VM with `code` (QEMU: exit status `(code << 1) | 1`).
pub fn exit(code: u8) -> ! {
    if boot::on_qemu() {
        // SAFETY: on the PVH path the stub's #GP handler carries the `out` out in ring 0;
        // QEMU's isa-debug-exit then ends the VM. Spin if it does not.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") EXIT_PORT, in("al") code,
                             options(nostack, preserves_flags, nomem));
        }
        loop {
            core::hint::spin_loop();
        }
    }
    mmio::exit(code)
}
