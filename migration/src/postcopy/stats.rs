//! Counters and samples the postcopy engine records, and the snapshot it hands out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// One collapse (one unit of one region).
#[derive(Clone, Debug, Serialize)]
pub struct CollapseRecord {
    pub slot: u32,
    /// Byte offset of the unit in the region.
    pub unit_offset: u64,
    pub unit_size: u64,
    /// "hugetlb-mmap", "memslot-swap" or "madv-collapse".
    pub method: &'static str,
    /// Unit complete → collapsed (delta rounds, pause, swap, resume; not the off-path free).
    pub total_ns: u64,
    /// vCPU stall, pause() → resume() (0 when no pause was needed).
    pub stall_ns: u64,
    /// Delta copy rounds including the final one in the pause.
    pub delta_rounds: u32,
    /// Pages copied in each round (the last is the one inside the pause).
    pub delta_pages: Vec<u64>,
    /// Staging pages of the unit (pages the guest touched before the collapse).
    pub staged_pages: u64,
    /// Off-path staging free (punch-hole) time.
    pub free_ns: u64,
    /// Whether the collapse succeeded (MADV_COLLAPSE may fail; it is then left 4 KiB-mapped).
    pub ok: bool,
}

/// A snapshot of the engine's statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PostcopyStats {
    /// Userfaults handled (every event read, including duplicates that were only woken).
    pub faults_served: u64,
    /// Pages fetched from the source by the fault service (urgent channel).
    pub pages_fetched: u64,
    /// Faults served without the network (the page was already in its final place).
    pub pages_served_locally: u64,
    /// Background pages written.
    pub bulk_pages_applied: u64,
    /// Background pages ignored because the page had already arrived.
    pub bulk_pages_ignored: u64,
    /// Fetch attempts that failed and were retried.
    pub fetch_retries: u64,
    /// Successful collapses (all methods).
    pub collapses: u64,
    /// Collapses that failed (left 4 KiB-mapped).
    pub collapse_failures: u64,
    /// vCPU stall per collapse: median and maximum, nanoseconds.
    pub collapse_stall_p50_ns: u64,
    pub collapse_stall_max_ns: u64,
    /// Every collapse.
    pub collapse_records: Vec<CollapseRecord>,
    /// Peak staging memory (MiB) and the current amount (bytes).
    pub staging_peak_mib: f64,
    pub staging_current_bytes: u64,
    /// Per-fault VMM-side latency: uffd event read → CONTINUE/COPY done, nanoseconds.
    pub fault_latency_ns: Vec<u64>,
    /// Fault latency median and maximum, nanoseconds.
    pub fault_latency_p50_ns: u64,
    pub fault_latency_max_ns: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub struct StatsCollector {
    pub faults_served: AtomicU64,
    pub pages_fetched: AtomicU64,
    pub pages_served_locally: AtomicU64,
    pub bulk_pages_applied: AtomicU64,
    pub bulk_pages_ignored: AtomicU64,
    pub fetch_retries: AtomicU64,
    staging_pages: AtomicU64,
    staging_peak_pages: AtomicU64,
    fault_latency_ns: Mutex<Vec<u64>>,
    collapses: Mutex<Vec<CollapseRecord>>,
}

fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * pct) / 100]
}

impl StatsCollector {
    /// Count `n` new staging pages and update the peak.
    pub fn staging_add(&self, n: u64) {
        let now = self.staging_pages.fetch_add(n, Ordering::AcqRel) + n;
        self.staging_peak_pages.fetch_max(now, Ordering::AcqRel);
    }

    /// Count `n` staging pages freed.
    pub fn staging_sub(&self, n: u64) {
        let _ = self
            .staging_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Record one fault's VMM-side latency.
    pub fn fault_latency(&self, ns: u64) {
        self.fault_latency_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ns);
    }

    /// Record one collapse.
    pub fn collapse(&self, record: CollapseRecord) {
        self.collapses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> PostcopyStats {
        let lat = self
            .fault_latency_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let records = self
            .collapses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut stalls: Vec<u64> = records
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.stall_ns)
            .collect();
        stalls.sort_unstable();
        let mut lat_sorted = lat.clone();
        lat_sorted.sort_unstable();
        PostcopyStats {
            faults_served: self.faults_served.load(Ordering::Relaxed),
            pages_fetched: self.pages_fetched.load(Ordering::Relaxed),
            pages_served_locally: self.pages_served_locally.load(Ordering::Relaxed),
            bulk_pages_applied: self.bulk_pages_applied.load(Ordering::Relaxed),
            bulk_pages_ignored: self.bulk_pages_ignored.load(Ordering::Relaxed),
            fetch_retries: self.fetch_retries.load(Ordering::Relaxed),
            collapses: records.iter().filter(|r| r.ok).count() as u64,
            collapse_failures: records.iter().filter(|r| !r.ok).count() as u64,
            collapse_stall_p50_ns: percentile(&stalls, 50),
            collapse_stall_max_ns: stalls.last().copied().unwrap_or(0),
            collapse_records: records,
            staging_peak_mib: (self.staging_peak_pages.load(Ordering::Relaxed) * 4096) as f64
                / (1024.0 * 1024.0),
            staging_current_bytes: self.staging_pages.load(Ordering::Relaxed) * 4096,
            fault_latency_p50_ns: percentile(&lat_sorted, 50),
            fault_latency_max_ns: lat_sorted.last().copied().unwrap_or(0),
            fault_latency_ns: lat,
        }
    }
}
