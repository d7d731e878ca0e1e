//! The supervisor of the engine's threads: how they are told to stop (a flag and an eventfd the
//! fault reader polls beside the userfaultfd, so a stop is seen at once, not at the next poll
//! timeout), the first fatal error (typed), and the progress condition `wait_complete` sleeps
//! on (notified by every change that can complete the engine, so nobody polls).

use crate::sync::{CondvarExt, MutexExt};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::PostcopyError;

/// Stop signal, fatal error and progress notifications shared by the engine's threads.
pub(crate) struct Supervisor {
    stopping: AtomicBool,
    stop_fd: EventFd,
    fatal: OnceLock<Arc<PostcopyError>>,
    progress: Mutex<()>,
    progress_cv: Condvar,
}

impl Supervisor {
    pub fn new() -> Result<Self, PostcopyError> {
        let stop_fd =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| PostcopyError::FaultService {
                    what: "eventfd for the stop signal",
                    source: e.into(),
                })?;
        Ok(Supervisor {
            stopping: AtomicBool::new(false),
            stop_fd,
            fatal: OnceLock::new(),
            progress: Mutex::new(()),
            progress_cv: Condvar::new(),
        })
    }

    /// Tell every thread to stop: the flag for the loops, the eventfd for a poll.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop_fd.write(1) {
            tracing::warn!("signalling the postcopy stop eventfd failed: {e}");
        }
        self.notify_progress();
    }

    /// Whether [`Supervisor::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The eventfd that becomes readable on stop.
    pub fn stop_fd(&self) -> BorrowedFd<'_> {
        self.stop_fd.as_fd()
    }

    /// Record the first fatal error (later ones are logged only) and wake `wait_complete`.
    pub fn fail(&self, err: PostcopyError) {
        tracing::error!("postcopy engine: {err}");
        let _ = self.fatal.set(Arc::new(err));
        self.notify_progress();
    }

    /// The first fatal error, if any.
    pub fn fatal(&self) -> Option<Arc<PostcopyError>> {
        self.fatal.get().cloned()
    }

    /// Wake everyone waiting for progress.
    pub fn notify_progress(&self) {
        let _g = self.lock();
        self.progress_cv.notify_all();
    }

    /// The progress lock: check the condition under it, then [`Supervisor::wait`].
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.progress.lock_unpoisoned()
    }

    /// Sleep until the next progress notification, or `timeout` if given.
    pub fn wait<'a>(
        &self,
        guard: MutexGuard<'a, ()>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, ()> {
        match timeout {
            Some(t) => self.progress_cv.wait_timeout_unpoisoned(guard, t).0,
            None => self.progress_cv.wait_unpoisoned(guard),
        }
    }

    /// Sleep until the next progress notification or `timeout` (a fetch backing off).
    pub fn wait_progress(&self, timeout: Duration) {
        let g = self.lock();
        if !self.stopping() {
            drop(self.wait(g, Some(timeout)));
        }
    }
}
