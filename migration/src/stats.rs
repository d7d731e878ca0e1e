//! Counters of a migration and the summaries both sides report at the end.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::types::Mode;
use crate::wire::DoneStats;

/// Counters the source updates while it migrates (several threads add to them).
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Bytes written on both channels.
    pub bytes_sent: AtomicU64,
    /// Pages sent as data (precopy rounds, bulk push and urgent replies).
    pub pages_sent: AtomicU64,
    /// Pages announced as zero runs instead of data.
    pub zero_pages: AtomicU64,
    /// Urgent page requests answered.
    pub faults_served: AtomicU64,
    /// Pages sent by the postcopy bulk push (data or zero).
    pub pages_pushed: AtomicU64,
    /// Time spent streaming guest memory (precopy rounds plus the postcopy bulk push), ns.
    pub transfer_ns: AtomicU64,
    /// Bytes written on both channels during that time.
    pub transfer_bytes: AtomicU64,
}

impl SourceCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every counter back to zero (a new migration on the same control).
    pub fn reset(&self) {
        for c in [
            &self.bytes_sent,
            &self.pages_sent,
            &self.zero_pages,
            &self.faults_served,
            &self.pages_pushed,
            &self.transfer_ns,
            &self.transfer_bytes,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// What a finished migration reports on the source.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationSummary {
    pub mode: Mode,
    pub session_id: u64,
    /// From pausing the source vCPUs to the destination's Started.
    pub blackout_ms: f64,
    /// From connecting to the destination's Done.
    pub total_ms: f64,
    pub bytes_sent: u64,
    /// Pages sent as data (every send counts, so re-sent dirty pages count again).
    pub pages_sent: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// Urgent page requests answered.
    pub faults_served: u64,
    /// Pages sent by the postcopy bulk push.
    pub pages_pushed: u64,
    /// Huge-page collapses the destination reported in Done.
    pub collapses: u64,
    /// Precopy rounds (the full first pass is round 0 and counts as one).
    pub rounds: u32,
    /// Pages left for the stop-and-copy (precopy) or dirtied since the last round (hybrid).
    pub final_dirty_pages: u64,
    /// Bandwidth measured over the precopy rounds, bytes per second (0 if none).
    pub bandwidth_bytes_per_s: f64,
    /// Time spent streaming guest memory: the precopy rounds plus the postcopy bulk push, from
    /// its start to its last page written to the socket. Not the wait for the destination's
    /// collapses, nor connecting and sending state.
    pub transfer_ms: f64,
    /// Bytes written on both channels during `transfer_ms` (urgent replies included).
    pub transfer_bytes: u64,
    /// Times the link failed after the switchover and the source reconnected.
    pub recoveries: u32,
    /// Time spent postcopy-paused (link down until reconnected), in all.
    pub paused_ms: f64,
    /// The destination's own account.
    pub destination: DoneStats,
}

/// What a finished migration reports on the destination.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReceiveSummary {
    pub mode: Mode,
    pub session_id: u64,
    /// From Ready to Done.
    pub total_ms: f64,
    /// From receiving Switchover/PostcopyStart to the vCPUs started.
    pub start_ms: f64,
    pub state_bytes: u64,
    pub bytes_received: u64,
    /// Times the link failed after the switchover and the source came back.
    pub recoveries: u32,
    /// Time spent postcopy-paused (link down until the source came back), in all.
    pub paused_ms: f64,
    pub stats: DoneStats,
}
