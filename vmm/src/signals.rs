//! SIGINT/SIGTERM handling. signal-hook's handler only records which signal came and wakes one
//! watcher thread ("signal-watch") through a pipe; that thread sleeps in read(2) until a signal
//! arrives and then runs the action the VMM set for its current phase ([`on_signal`]): exit at
//! once while a migration is being received, stop the VM (the main thread then shuts it down
//! cleanly, giving back its huge pages) while one runs.
//!
//! The handler runs on whichever thread the kernel picks, vCPU threads included, whose seccomp
//! filter allows only the base system calls. So the wake-up is a write(2) to a pipe, which every
//! role allows (signal-hook's iterator would `send(2)` to a socket pair instead).

use migration::sync::MutexExt;
use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::OFlag;

/// What a signal does now.
type Action = Box<dyn Fn(i32) + Send>;

/// The current action (None: only record the signal).
static ACTION: Mutex<Option<Action>> = Mutex::new(None);
/// The first termination signal received, 0 before.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Whether the handlers and the watcher are in place.
static INSTALLED: Mutex<bool> = Mutex::new(false);

fn action() -> MutexGuard<'static, Option<Action>> {
    // A panicking action leaves the slot as it was; the next signal may still run it.
    ACTION.lock_unpoisoned()
}

/// Installs the handlers for SIGINT and SIGTERM and starts the watcher thread (once per process;
/// later calls return at once). Until [`on_signal`] sets an action, a signal is only recorded.
pub fn install() -> io::Result<()> {
    let mut installed = INSTALLED.lock_unpoisoned();
    if *installed {
        return Ok(());
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let last = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // In this order: the signal number is stored before the watcher is woken.
        signal_hook::flag::register_usize(sig, last.clone(), sig as usize)?;
        signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
    }
    drop(write);
    std::thread::Builder::new()
        .name("signal-watch".into())
        .spawn(move || watch(File::from(read), &last))?;
    *installed = true;
    Ok(())
}

/// The watcher: one wake-up per signal (several signals may share one).
fn watch(mut pipe: File, last: &AtomicUsize) {
    let mut buf = [0u8; 16];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                let sig = i32::try_from(last.load(Ordering::SeqCst)).unwrap_or(libc::SIGTERM);
                deliver(sig);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("signal watcher stopped: {e}");
                return;
            }
        }
    }
}

fn deliver(sig: i32) {
    let action = action();
    let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    if let Some(f) = action.as_ref() {
        f(sig);
    }
}

/// Makes `f` what a termination signal does from now on (replacing the previous action). If a
/// signal arrived already, `f` runs for it at once.
pub fn on_signal(f: impl Fn(i32) + Send + 'static) {
    let mut action = action();
    if let Some(sig) = received() {
        f(sig);
    }
    *action = Some(Box::new(f));
}

/// From now on a signal is only recorded (see [`received`]).
pub fn record_only() {
    *action() = None;
}

/// The termination signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
