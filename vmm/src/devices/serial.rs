//! The 16550 UART at I/O port 0x3f8, interrupting on IRQ 4, emulated by vm-superio.

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

/// Why migrated UART state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("cloning the serial interrupt eventfd failed: {0}")]
    Irq(#[source] io::Error),
    #[error("the migrated serial state is refused: {0}")]
    State(#[source] vm_superio::serial::Error<io::Error>),
}

/// COM1 as the guest sees it.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, Console>,
    /// Kept to rebuild the UART from migrated state.
    irq: EventFd,
    console: Console,
}

/// The UART's registers and receive FIFO, as migration carries them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose output goes to `console`.
    pub fn new(irq: EventFd, console: Console) -> io::Result<Self> {
        Ok(SerialDevice {
            inner: Serial::new(IrqTrigger(irq.try_clone()?), console.clone()),
            irq,
            console,
        })
    }

    /// The UART's state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Loads migrated state into the UART.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), SerialRestoreError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self.irq.try_clone().map_err(SerialRestoreError::Irq)?;
        self.inner = Serial::from_state(&state, IrqTrigger(irq), NoEvents, self.console.clone())
            .map_err(SerialRestoreError::State)?;
        Ok(())
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
}
