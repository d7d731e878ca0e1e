//! A hook the process can set to run first thing in every thread this crate starts (the VMM
//! uses it to narrow the thread's seccomp filter to what the thread does). This crate only says
//! what kind of thread starts; what the hook does with that is the process's business.

use std::sync::OnceLock;

/// What a thread this crate starts does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The destination's postcopy fault service: the userfaultfd reader, the fault workers and
    /// the threads they start to fetch the pages of a huge page.
    FaultService,
    /// The destination's collapse thread (huge pages back into place once complete).
    Collapse,
    /// A migration channel thread: the source's urgent page server, the destination's
    /// urgent-reply reader, heartbeats.
    Channel,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets the hook (once per process; later calls are ignored).
pub fn set(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// Called by this crate first thing in each thread it starts.
pub(crate) fn started(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
