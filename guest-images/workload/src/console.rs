//! Line-atomic console output shared by all vCPUs (a spinlock around the MMIO console).

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::mmio;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes straight to the MMIO console; only handed out while the lock is held.
pub struct Console(());

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            mmio::putc(b);
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
    let r = f(&mut Console(()));
    LOCK.store(false, Ordering::Release);
    r
}
