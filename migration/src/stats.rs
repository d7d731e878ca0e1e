//! Counters of a migration and the summaries both sides report at the end (their JSON is what
//! `vmm migrate --json` prints and `vmm receive --stats-json` writes).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::postcopy::PrepareReport;
use crate::types::{Backing, Granularity, Mode};
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

/// What a finished migration reports on the source (`vmm migrate --json` prints it, the API's
/// vm.send-migration replies with it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// What the destination reports when the migration is over (`vmm receive --stats-json`; the
/// harness reads it back with this type).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationStats {
    pub mode: Mode,
    pub backing: Backing,
    /// The `--granularity` asked for (what served each region: `regions`).
    pub granularity: Granularity,
    pub total_ms: f64,
    pub start_ms: f64,
    pub bytes_received: u64,
    pub pages_received: u64,
    pub urgent_pages: u64,
    pub bulk_pages: u64,
    pub faults_served: u64,
    pub pages_fetched: u64,
    pub pages_fetched_local: u64,
    pub collapses: u64,
    /// shmem units with nothing to collapse (all zero, never touched).
    pub collapses_skipped: u64,
    pub collapse_failures: u64,
    pub collapse_stall_ns: Vec<u64>,
    pub collapse_total_ns: Vec<u64>,
    pub fault_ns: Vec<u64>,
    /// Latency of the faults that waited through a postcopy-paused outage (kept apart from
    /// `fault_ns`), nanoseconds.
    pub outage_fault_ns: Vec<u64>,
    pub staging_peak_bytes: u64,
    /// Staging memory still allocated when the stats were taken (0 once every region collapsed).
    pub staging_current_bytes: u64,
    /// Times the link failed after the switchover and the source came back.
    pub recoveries: u32,
    /// Time spent postcopy-paused, in all.
    pub paused_ms: f64,
    /// Per vCPU, the time it was blocked in userfaults (fault read to its page's wake), ms
    /// (QEMU's postcopy-vcpu-blocktime).
    pub postcopy_vcpu_blocktime_ms: Vec<f64>,
    /// The time every vCPU was blocked at once, ms (QEMU's postcopy-blocktime).
    pub postcopy_blocktime_ms: Option<f64>,
    /// Huge-mapped guest RAM at the end, from /proc/self/smaps (kB).
    pub smaps_hugetlb_kb: u64,
    pub smaps_shmem_pmd_kb: u64,
    /// How postcopy served each region (empty without postcopy).
    pub regions: Vec<RegionServe>,
    /// With `--granularity native`: why the native path was not used, if any region fell back
    /// to 4 KiB staging (the kernel probe's answer; regions that disagree are joined by "; ").
    /// `None` when native served every region it could, or native was not asked for.
    pub native_fallback: Option<String>,
    /// The collapse method of each collapse, in order (e.g. "hugetlb-mmap", "madv-collapse",
    /// "native-hugetlb-none (...)").
    pub collapse_methods: Vec<String>,
    /// Remote faults by phase ("uffd_to_read", "request_written", "source_reply",
    /// "reply_read", "stored", "installed"): count and percentiles, microseconds.
    #[serde(default)]
    pub fault_phase_us: crate::postcopy::FaultPhaseSummary,
    /// Up to 200 remote faults above the p99 of the total, slowest first, with their phases.
    #[serde(default)]
    pub slow_faults: Vec<crate::postcopy::SlowFault>,
}

/// How postcopy served one region (memslot).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionServe {
    pub slot: u32,
    /// The region's backing, e.g. "hugetlb-2m".
    pub kind: Backing,
    /// The serve mode, e.g. "staged-4k-hugetlb", "native-hugetlb-4k-continue".
    pub serve_mode: String,
    /// Arrival / collapse unit in bytes.
    pub unit_size: u64,
    /// What the plan says about itself (fallbacks and why).
    pub note: Option<String>,
    /// With `--granularity native`: why this region fell back to staging.
    pub native_fallback: Option<String>,
}

impl RegionServe {
    /// How the postcopy engine's plan serves each region.
    pub fn from_report(report: &PrepareReport) -> Vec<RegionServe> {
        report
            .regions
            .iter()
            .map(|r| RegionServe {
                slot: r.slot,
                kind: r.kind,
                serve_mode: r.mode.name().to_string(),
                unit_size: r.unit_size,
                note: r.note.clone(),
                native_fallback: r.native_fallback.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_stats_use_the_cli_spellings_and_read_back() {
        let stats = DestinationStats {
            mode: Mode::Postcopy,
            backing: Backing::Hugetlb2m,
            granularity: Granularity::FourK,
            total_ms: 1.0,
            start_ms: 0.5,
            bytes_received: 1,
            pages_received: 1,
            urgent_pages: 0,
            bulk_pages: 1,
            faults_served: 2,
            pages_fetched: 1,
            pages_fetched_local: 1,
            collapses: 1,
            collapses_skipped: 0,
            collapse_failures: 0,
            collapse_stall_ns: vec![5],
            collapse_total_ns: vec![6],
            fault_ns: vec![7, 8],
            outage_fault_ns: Vec::new(),
            staging_peak_bytes: 4096,
            staging_current_bytes: 0,
            recoveries: 0,
            paused_ms: 0.0,
            postcopy_vcpu_blocktime_ms: vec![0.1],
            postcopy_blocktime_ms: None,
            smaps_hugetlb_kb: 2048,
            smaps_shmem_pmd_kb: 0,
            regions: vec![RegionServe {
                slot: 0,
                kind: Backing::Hugetlb2m,
                serve_mode: "staged-4k-hugetlb".into(),
                unit_size: 2 << 20,
                note: None,
                native_fallback: None,
            }],
            native_fallback: None,
            collapse_methods: vec!["hugetlb-mmap".into()],
            fault_phase_us: Default::default(),
            slow_faults: Vec::new(),
        };
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["mode"], "postcopy");
        assert_eq!(json["backing"], "hugetlb-2m");
        assert_eq!(json["granularity"], "4k");
        assert_eq!(json["regions"][0]["kind"], "hugetlb-2m");
        let back: DestinationStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, stats);
    }
}
