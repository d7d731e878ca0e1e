//! The exit port and the MMIO debug device: how guests end the VM with an exit code and, from
//! ring 3 (where port I/O faults under PVM), write to the console.
//!
//! MMIO debug device layout (guest physical `DEBUG_MMIO_BASE`, inside the PCI hole):
//! - `0x00`, 1-byte write: a console byte.
//! - `0x08`, 1..4-byte write: exit the VM; the low 8 bits are the exit code.
//! - `0x10`, 8-byte write: a mark, logged with a host timestamp (tracing).

use std::io::Write;
use std::time::Instant;

use super::{Console, DeviceAction};

/// I/O port whose 1-byte write ends the VM with that exit code.
pub const EXIT_PORT: u16 = 0xf4;
/// Guest physical base of the MMIO debug device.
pub const DEBUG_MMIO_BASE: u64 = 0xd000_0000;
/// Size of the MMIO debug device.
pub const DEBUG_MMIO_SIZE: u64 = 0x1000;

const REG_CONSOLE: u64 = 0x00;
const REG_EXIT: u64 = 0x08;
const REG_MARK: u64 = 0x10;

/// The exit port.
#[derive(Default)]
pub struct ExitPort;

impl ExitPort {
    /// A guest `out` to the exit port.
    pub fn write(&self, data: &[u8]) -> DeviceAction {
        match data.first() {
            Some(&code) => DeviceAction::Exit(i32::from(code)),
            None => DeviceAction::None,
        }
    }
}

/// The MMIO debug device.
pub struct DebugDevice {
    console: Console,
    start: Instant,
}

impl DebugDevice {
    /// A debug device writing console bytes to `console`.
    pub fn new(console: Console) -> Self {
        DebugDevice {
            console,
            start: Instant::now(),
        }
    }

    /// A guest write at `offset` into the device.
    pub fn write(&self, offset: u64, data: &[u8]) -> DeviceAction {
        match offset {
            REG_CONSOLE => {
                let mut c = self.console.clone();
                if let Err(e) = c.write_all(&data[..1.min(data.len())]) {
                    tracing::warn!("console write failed: {e}");
                }
                DeviceAction::None
            }
            REG_EXIT => match data.first() {
                Some(&code) => DeviceAction::Exit(i32::from(code)),
                None => DeviceAction::None,
            },
            REG_MARK => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                tracing::debug!(
                    mark = u64::from_le_bytes(v),
                    t_us = self.start.elapsed().as_micros() as u64,
                    "guest mark"
                );
                DeviceAction::None
            }
            _ => DeviceAction::None,
        }
    }

    /// A guest read: the device has no readable registers.
    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}
