//! Emulated devices and the port/MMIO dispatch that routes vCPU exits to them.
//!
//! The VMM emulates only what its guests need: a 16550 UART (`serial`), the i8042 reset line
//! (`i8042`), and the exit port plus the MMIO debug device that ring-3 guest code can reach
//! (`debug_exit`). Everything else the guest touches reads as all-ones and ignores writes.

pub mod console;
pub mod debug_exit;
pub mod i8042;
pub mod serial;

use std::sync::Mutex;

pub use console::Console;
pub use debug_exit::{DebugDevice, ExitPort, DEBUG_MMIO_BASE, DEBUG_MMIO_SIZE, EXIT_PORT};
pub use i8042::I8042;
pub use serial::{SerialDevice, SERIAL_PORT_BASE, SERIAL_PORT_LEN};

/// What a device asks of the VM after handling an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    /// Nothing: keep running.
    None,
    /// The guest asked to stop with this exit code.
    Exit(i32),
    /// The guest asked for a reset (i8042 pulse); this VMM treats it as a stop.
    Reset,
}

/// All devices of one VM, shared by its vCPU threads.
pub struct Devices {
    pub serial: Mutex<SerialDevice>,
    pub i8042: I8042,
    pub exit_port: ExitPort,
    pub debug: DebugDevice,
}

impl Devices {
    /// Handles a port write from a vCPU.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> DeviceAction {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p) => {
                if let (Ok(mut s), Some(&b)) = (self.serial.lock(), data.first()) {
                    s.write(p - SERIAL_PORT_BASE, b);
                }
                DeviceAction::None
            }
            EXIT_PORT => self.exit_port.write(data),
            i8042::DATA_PORT | i8042::COMMAND_PORT => self.i8042.write(port, data),
            _ => DeviceAction::None,
        }
    }

    /// Handles a port read from a vCPU, filling `data`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p) => {
                let v = self
                    .serial
                    .lock()
                    .map(|mut s| s.read(p - SERIAL_PORT_BASE))
                    .unwrap_or(0xff);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => self.i8042.read(port, data),
            _ => data.fill(0xff),
        }
    }

    /// Handles an MMIO write that no memslot backs.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> DeviceAction {
        if (DEBUG_MMIO_BASE..DEBUG_MMIO_BASE + DEBUG_MMIO_SIZE).contains(&addr) {
            return self.debug.write(addr - DEBUG_MMIO_BASE, data);
        }
        DeviceAction::None
    }

    /// Handles an MMIO read that no memslot backs.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (DEBUG_MMIO_BASE..DEBUG_MMIO_BASE + DEBUG_MMIO_SIZE).contains(&addr) {
            self.debug.read(addr - DEBUG_MMIO_BASE, data);
        } else {
            data.fill(0xff);
        }
    }
}
