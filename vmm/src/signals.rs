//! SIGINT/SIGTERM handling: the handler only records the signal; the main thread notices it
//! within one wait period and shuts the VM down cleanly (giving back its huge pages).

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::signal::register_signal_handler;

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(signum, Ordering::SeqCst);
}

/// Installs the handlers for SIGINT and SIGTERM.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(libc::SIGINT, record)?;
    register_signal_handler(libc::SIGTERM, record)
}

/// The termination signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
