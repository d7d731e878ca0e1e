//! The i8042 keyboard controller, only as far as Linux needs it: a reset request (command 0xfe)
//! ends the VM, and status reads say "no data".

use super::DeviceAction;

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// "Pulse output line": the CPU reset Linux uses for `reboot`.
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only i8042.
#[derive(Default)]
pub struct I8042;

impl I8042 {
    /// A guest write to the controller.
    pub fn write(&self, port: u16, data: &[u8]) -> DeviceAction {
        if port == COMMAND_PORT && data.first() == Some(&CMD_RESET_CPU) {
            DeviceAction::Reset
        } else {
            DeviceAction::None
        }
    }

    /// A guest read: status 0 (no data, input buffer empty), data 0.
    pub fn read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
}
