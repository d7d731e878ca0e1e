//! The 16550 UART at I/O port 0x3f8, interrupting on IRQ 4, emulated by vm-superio.

use std::io;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::Console;

/// First I/O port of COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_PORT_LEN: u16 = 8;
/// The legacy IRQ (GSI) of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as the guest sees it.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, Console>,
}

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose output goes to `console`.
    pub fn new(irq: EventFd, console: Console) -> Self {
        SerialDevice {
            inner: Serial::new(IrqTrigger(irq), console),
        }
    }

    /// A guest write to register `offset`.
    pub fn write(&mut self, offset: u16, value: u8) {
        // A failed write to the console sink must not stop the guest; the error is logged.
        if let Err(e) = self.inner.write(offset as u8, value) {
            tracing::warn!("serial write failed: {e:?}");
        }
    }

    /// A guest read of register `offset`.
    pub fn read(&mut self, offset: u16) -> u8 {
        self.inner.read(offset as u8)
    }

    /// Feeds host input bytes to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.inner.enqueue_raw_bytes(bytes) {
            tracing::warn!("serial input dropped: {e:?}");
        }
    }
}
