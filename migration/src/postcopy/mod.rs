//! The destination-side postcopy memory engine: userfaultfd fault service at 4 KiB, staging
//! over huge-page and guest_memfd regions, and the collapse back to huge mappings; where the
//! kernel has them (probed, never assumed), the native 4 KiB paths on hugetlb (HGM) and
//! guest_memfd (userfaultfd) instead of staging.
//!
//! Entry point: [`PostcopyEngine`]. Build it with the regions and the VMM's hooks, call
//! [`PostcopyEngine::prepare`] before the vCPUs run, feed background pages with
//! [`PostcopyEngine::bulk_page`], and wait with [`PostcopyEngine::wait_complete`].

//!
//! Module map (each module uses only the ones listed after it):
//! - `engine`: the public object; plans, prepares and wires the parts below;
//! - `fault_service`: the fault workers (each waits for, reads and serves its own faults);
//! - `collapse` (+ `native`): finishing complete units, on the collapse thread;
//! - `arrival`: storing arrived pages, unit completion messages;
//! - `installer`: every userfaultfd ioctl and what its errors mean, per serve mode;
//! - `region` (+ `region_tracker`, `staging`): the fixed regions and their state;
//! - `supervisor`: stop eventfd, typed fatal error, progress condition;
//! - `stats`, `strategy`, `sys`: statistics, planning, syscalls and kernel constants.

mod arrival;
pub mod collapse;
pub mod engine;
pub mod fault_phases;
pub mod fault_service;
mod installer;
pub mod native;
mod parked;
mod region;
pub mod region_tracker;
pub mod staging;
pub mod stats;
pub mod strategy;
mod supervisor;
pub mod sys;
#[cfg(test)]
mod tests;

pub use engine::{PostcopyEngine, PrepareReport, RegionReport};
pub use fault_phases::{FaultPhaseSummary, PhaseSummary, PhaseTimes, SlowFault, PHASES};
pub use stats::{CollapseRecord, PostcopyStats};
pub use strategy::{FinalBacking, ProbeError, RegionPlan, ServeMode};

/// Errors of the postcopy engine.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("region slot {slot} ({kind:?}, gpa {gpa:#x}, size {size:#x}) is unusable: {reason}")]
    BadRegion {
        slot: u32,
        kind: crate::types::Backing,
        gpa: u64,
        size: u64,
        reason: String,
    },
    #[error("creating the userfaultfd failed: {0}")]
    Uffd(userfaultfd::Error),
    #[error("userfaultfd {what} of slot {slot} range {addr:#x}+{len:#x} failed: {source}")]
    UffdRange {
        slot: u32,
        what: &'static str,
        addr: usize,
        len: usize,
        source: userfaultfd::Error,
    },
    #[error("staging for slot {slot}: {what} failed: {source}")]
    Staging {
        slot: u32,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("gpa {gpa:#x} is not a page-aligned address in any postcopy region")]
    BadGpa { gpa: u64 },
    #[error("the engine is not prepared (call prepare() first)")]
    NotPrepared,
    #[error("region slot {slot} has no alias mapping of its final backing")]
    NoAlias { slot: u32 },
    #[error("region slot {slot} has no fd of its final backing")]
    NoFinalFd { slot: u32 },
    #[error("the engine was already prepared")]
    AlreadyPrepared,
    #[error("spawning the {what} thread failed: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("dirty log of slot {slot}: {what} failed: {source}")]
    DirtyLog {
        slot: u32,
        what: &'static str,
        #[source]
        source: crate::types::HookError,
    },
    #[error("collapse of slot {slot} unit at offset {offset:#x}: {what} failed: {source}")]
    Collapse {
        slot: u32,
        offset: u64,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "populating the huge page of slot {slot} at alias {addr:#x}+{len:#x} failed: {source}"
    )]
    Populate {
        slot: u32,
        addr: usize,
        len: usize,
        source: std::io::Error,
    },
    #[error("native serve mode of slot {slot}: {what} failed: {source}")]
    Native {
        slot: u32,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("fetching gpa {gpa:#x} failed for good: {source}")]
    Fetch {
        gpa: u64,
        source: crate::types::FetchError,
    },
    #[error("postcopy engine failed earlier: {0}")]
    Failed(#[source] std::sync::Arc<PostcopyError>),
    #[error("the userfaultfd fault service: {what} failed: {source}")]
    FaultService {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the userfaultfd reported an error condition (POLLERR/POLLHUP)")]
    UffdHangup,
    #[error("the collapse thread is gone: unit {unit} of slot {slot} cannot collapse")]
    CollapseThreadGone { slot: u32, unit: u64 },
    #[error("a {what} thread panicked")]
    Panicked { what: &'static str },
    #[error("timed out after {ms} ms waiting for postcopy to complete ({arrived}/{total} pages arrived, {collapsed}/{units} units collapsed)")]
    Timeout {
        ms: u64,
        arrived: u64,
        total: u64,
        collapsed: u64,
        units: u64,
    },
    #[error("dirty tracker: {what} failed: {source}")]
    Tracker {
        what: &'static str,
        source: std::io::Error,
    },
}

impl PostcopyError {
    /// Wraps a dirty-log hook's failure of `what` ("enable", "fetch", "disable") on `slot`.
    pub(crate) fn dirty_log(
        slot: u32,
        what: &'static str,
    ) -> impl FnOnce(crate::types::HookError) -> PostcopyError {
        move |source| PostcopyError::DirtyLog { slot, what, source }
    }
}
