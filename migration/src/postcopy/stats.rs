//! Counters and samples the postcopy engine records, and the snapshot it hands out.

use crate::sync::MutexExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::fault_phases::{FaultPhaseSummary, FaultPhases, SlowFault};
use crate::live_stats::{EngineLive, MigrationEvent};

use serde::Serialize;

/// [`CollapseRecord::method`] of a shmem unit that was all page-cache holes and never touched:
/// nothing was collapsed (the guest's touches map zero pages later).
pub const METHOD_SKIPPED_EMPTY: &str = "none (all zero, never touched)";

/// One collapse (one unit of one region).
#[derive(Clone, Debug, Serialize)]
pub struct CollapseRecord {
    pub slot: u32,
    /// Byte offset of the unit in the region.
    pub unit_offset: u64,
    pub unit_size: u64,
    /// "hugetlb-mmap" or "guest-memfd-mmap" (a freeze of the unit, no vCPU pause),
    /// "madv-collapse", or "none (...)" when there was nothing to collapse.
    pub method: &'static str,
    /// Collapse started → collapsed (delta rounds, freeze, swap; not the off-path free). For a
    /// unit collapsed only after the last page, the wait for that page is not counted.
    /// shmem units collapsed in one MADV_COLLAPSE call with their neighbours get their share
    /// (the calls' time divided by the units they covered).
    pub total_ns: u64,
    /// The longest a vCPU can have waited for this collapse: the freeze (unit lock taken →
    /// woken), which only a vCPU touching the unit waits for; 0 when nothing was frozen.
    pub stall_ns: u64,
    /// Delta copy rounds including the final one in the freeze.
    pub delta_rounds: u32,
    /// Pages copied in each round (the last is the one inside the freeze).
    pub delta_pages: Vec<u64>,
    /// Staging pages of the unit (pages the guest touched before the collapse).
    pub staged_pages: u64,
    /// Inside the stall: dropping the unit's staging PTEs again.
    pub zap_ns: u64,
    /// Inside the stall: final dirty log fetch and delta copy.
    pub final_delta_ns: u64,
    /// Inside the stall: the swap (mmap(MAP_FIXED) of the final backing) and the wake.
    pub swap_ns: u64,
    /// Before the stall: dropping the staging PTEs (MADV_DONTNEED) of big units.
    pub dontneed_ns: u64,
    /// Off-path staging free (punch-hole) time.
    pub free_ns: u64,
    /// Whether the collapse succeeded (MADV_COLLAPSE may fail; it is then left 4 KiB-mapped).
    pub ok: bool,
}

impl CollapseRecord {
    /// A unit that needed no swap and no freeze (shmem MADV_COLLAPSE, native hugetlb, units
    /// skipped as empty): only its place, how, how long and whether it worked.
    pub fn without_swap(
        slot: u32,
        unit_offset: u64,
        unit_size: u64,
        method: &'static str,
        total_ns: u64,
        ok: bool,
    ) -> Self {
        CollapseRecord {
            slot,
            unit_offset,
            unit_size,
            method,
            total_ns,
            stall_ns: 0,
            delta_rounds: 0,
            delta_pages: Vec::new(),
            staged_pages: 0,
            zap_ns: 0,
            final_delta_ns: 0,
            swap_ns: 0,
            dontneed_ns: 0,
            free_ns: 0,
            ok,
        }
    }
}

/// A snapshot of the engine's statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PostcopyStats {
    /// Userfaults handled (every event read, including duplicates that joined a fault already
    /// being served); each one that was resolved has a latency sample.
    pub faults_served: u64,
    /// Of `faults_served`, events on a page (whole-page mode: a huge page) whose fault was
    /// already being served; they are resolved by that fault's CONTINUE / COPY.
    pub faults_coalesced: u64,
    /// Pages fetched from the source by the fault service (urgent channel).
    pub pages_fetched: u64,
    /// Faults served without the network (the page was already in its final place).
    pub pages_served_locally: u64,
    /// Background pages written.
    pub bulk_pages_applied: u64,
    /// Background pages ignored because the page had already arrived.
    pub bulk_pages_ignored: u64,
    /// Pages of zero runs marked arrived without writing (the destination starts zero-filled).
    pub zero_pages_applied: u64,
    /// Pages of zero runs ignored because the page had already arrived.
    pub zero_pages_ignored: u64,
    /// Fetch attempts that failed and were retried.
    pub fetch_retries: u64,
    /// userfaultfd ioctls (COPY, CONTINUE, ZEROPAGE) that said EAGAIN (the address space was
    /// changing) and were tried again.
    pub uffd_eagain: u64,
    /// Successful collapses (all methods), not counting units skipped as empty.
    pub collapses: u64,
    /// shmem units that were all page-cache holes and never touched: nothing to collapse.
    pub collapses_skipped: u64,
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
    /// Per-fault VMM-side latency: uffd event read → CONTINUE/COPY done, nanoseconds, in the
    /// order recorded; at most [`MAX_FAULT_SAMPLES`] are kept (the first ones).
    pub fault_latency_ns: Vec<u64>,
    /// Latency samples recorded in all (the percentiles cover all of them).
    pub fault_latency_count: u64,
    /// Fault latency median, 99th percentile and maximum, nanoseconds (from an HdrHistogram of
    /// 3 significant digits: each within 0.1 % of the true value).
    pub fault_latency_p50_ns: u64,
    pub fault_latency_p99_ns: u64,
    pub fault_latency_max_ns: u64,
    /// Latency of the faults whose page fetch failed at least once because the link was down
    /// (they waited through a postcopy-paused outage), nanoseconds; kept apart from
    /// `fault_latency_*` so an outage does not blur the normal distribution. At most
    /// [`MAX_FAULT_SAMPLES`].
    pub outage_fault_latency_ns: Vec<u64>,
    /// Remote faults by phase (see `fault_phases`): per phase, count and percentiles in µs.
    pub fault_phase_us: FaultPhaseSummary,
    /// Up to 200 remote faults above the p99 of the total, slowest first, with their phases.
    pub slow_faults: Vec<SlowFault>,
}

/// Raw fault latency samples kept at most (8 bytes each); later ones only go to the histogram.
pub const MAX_FAULT_SAMPLES: usize = 1 << 20;

/// Longest latency the histogram tells apart (an hour, in ns); longer ones count as that.
const MAX_TRACKED_NS: u64 = 3_600_000_000_000;

/// Fault latencies: an HdrHistogram (3 significant digits, 0.1 %) plus a bounded list of raw
/// samples.
#[derive(Debug)]
struct LatencyLog {
    histogram: hdrhistogram::Histogram<u64>,
    samples: Vec<u64>,
}

impl Default for LatencyLog {
    fn default() -> Self {
        LatencyLog {
            // Fixed bounds (1 ns to an hour; longer samples are clamped) and 3 significant
            // digits: hdrhistogram refuses only sigfig > 5 or a high bound below twice the low.
            histogram: hdrhistogram::Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
                .unwrap_or_else(|_| unreachable!("the bounds and precision are valid")),
            samples: Vec::new(),
        }
    }
}

impl LatencyLog {
    fn record(&mut self, ns: u64) {
        self.histogram.saturating_record(ns);
        if self.samples.len() < MAX_FAULT_SAMPLES {
            self.samples.push(ns);
        }
    }

    fn count(&self) -> u64 {
        self.histogram.len()
    }

    fn max(&self) -> u64 {
        self.histogram.max()
    }

    /// The value at `pct` percent (0 when empty).
    fn percentile(&self, pct: u64) -> u64 {
        if self.count() == 0 {
            return 0;
        }
        self.histogram.value_at_quantile(pct as f64 / 100.0)
    }
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
    pub faults_coalesced: AtomicU64,
    pub zero_pages_applied: AtomicU64,
    pub zero_pages_ignored: AtomicU64,
    /// userfaultfd ioctls that said EAGAIN and were tried again.
    pub uffd_eagain: AtomicU64,
    staging_pages: AtomicU64,
    staging_peak_pages: AtomicU64,
    fault_latency: Mutex<LatencyLog>,
    outage_fault_latency: Mutex<LatencyLog>,
    collapses: Mutex<Vec<CollapseRecord>>,
    /// Remote faults by phase.
    pub phases: FaultPhases,
    /// The live figures the engine hands out ([`crate::postcopy::PostcopyEngine::live`]).
    pub(crate) live: Arc<EngineLive>,
}

fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * pct) / 100]
}

impl StatsCollector {
    /// Count `n` new staging pages and update the peak.
    /// A collector feeding `live` too.
    pub(crate) fn with_live(live: Arc<EngineLive>) -> Self {
        StatsCollector {
            live,
            ..StatsCollector::default()
        }
    }

    pub fn staging_add(&self, n: u64) {
        self.live.staging_pages.fetch_add(n, Ordering::Relaxed);
        let now = self.staging_pages.fetch_add(n, Ordering::AcqRel) + n;
        self.staging_peak_pages.fetch_max(now, Ordering::AcqRel);
    }

    /// Staging pages held now.
    pub fn staging_pages(&self) -> u64 {
        self.staging_pages.load(Ordering::Acquire)
    }

    /// Count `n` staging pages freed.
    pub fn staging_sub(&self, n: u64) {
        let _ = self
            .live
            .staging_pages
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        let _ = self
            .staging_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Record one fault's VMM-side latency; `outage`: its fetch waited for the link to come
    /// back (see [`PostcopyStats::outage_fault_latency_ns`]).
    pub fn fault_latency(&self, ns: u64, outage: bool) {
        self.live.fault_latency(ns);
        let log = if outage {
            &self.outage_fault_latency
        } else {
            &self.fault_latency
        };
        log.lock_unpoisoned().record(ns);
    }

    /// Record one collapse.
    pub fn collapse(&self, record: CollapseRecord) {
        let live = &self.live;
        live.units_settled.fetch_add(1, Ordering::Relaxed);
        if record.ok && record.method != METHOD_SKIPPED_EMPTY {
            live.collapses_done.fetch_add(1, Ordering::Relaxed);
            let base = live
                .slot_gpa
                .lock_unpoisoned()
                .iter()
                .find(|(s, _)| *s == record.slot)
                .map(|(_, g)| *g);
            if let Some(base) = base {
                live.emit(MigrationEvent::UnitCollapsed {
                    gpa: base + record.unit_offset,
                    bytes: record.unit_size,
                    method: record.method.to_owned(),
                    stall_ns: record.stall_ns,
                });
            }
        }
        self.collapses.lock_unpoisoned().push(record);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> PostcopyStats {
        let (lat, lat_count, lat_p50, lat_p99, lat_max) = {
            let log = self.fault_latency.lock_unpoisoned();
            (
                log.samples.clone(),
                log.count(),
                log.percentile(50),
                log.percentile(99),
                log.max(),
            )
        };
        let records = self.collapses.lock_unpoisoned().clone();
        let mut stalls: Vec<u64> = records
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.stall_ns)
            .collect();
        stalls.sort_unstable();
        let (fault_phase_us, slow_faults) = self.phases.summary();
        PostcopyStats {
            fault_phase_us,
            slow_faults,
            faults_served: self.faults_served.load(Ordering::Relaxed),
            pages_fetched: self.pages_fetched.load(Ordering::Relaxed),
            pages_served_locally: self.pages_served_locally.load(Ordering::Relaxed),
            bulk_pages_applied: self.bulk_pages_applied.load(Ordering::Relaxed),
            bulk_pages_ignored: self.bulk_pages_ignored.load(Ordering::Relaxed),
            fetch_retries: self.fetch_retries.load(Ordering::Relaxed),
            uffd_eagain: self.uffd_eagain.load(Ordering::Relaxed),
            faults_coalesced: self.faults_coalesced.load(Ordering::Relaxed),
            zero_pages_applied: self.zero_pages_applied.load(Ordering::Relaxed),
            zero_pages_ignored: self.zero_pages_ignored.load(Ordering::Relaxed),
            collapses: records
                .iter()
                .filter(|r| r.ok && r.method != METHOD_SKIPPED_EMPTY)
                .count() as u64,
            collapses_skipped: records
                .iter()
                .filter(|r| r.method == METHOD_SKIPPED_EMPTY)
                .count() as u64,
            collapse_failures: records.iter().filter(|r| !r.ok).count() as u64,
            collapse_stall_p50_ns: percentile(&stalls, 50),
            collapse_stall_max_ns: stalls.last().copied().unwrap_or(0),
            collapse_records: records,
            staging_peak_mib: (self.staging_peak_pages.load(Ordering::Relaxed) * 4096) as f64
                / (1024.0 * 1024.0),
            staging_current_bytes: self.staging_pages.load(Ordering::Relaxed) * 4096,
            fault_latency_count: lat_count,
            fault_latency_p50_ns: lat_p50,
            fault_latency_p99_ns: lat_p99,
            fault_latency_max_ns: lat_max,
            fault_latency_ns: lat,
            outage_fault_latency_ns: self.outage_fault_latency.lock_unpoisoned().samples.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_log_percentiles_and_cap() {
        let mut log = LatencyLog::default();
        for ns in 1..=1000u64 {
            log.record(ns * 1000);
        }
        let p50 = log.percentile(50);
        assert!((499_000..=501_000).contains(&p50), "{p50}");
        assert!((999_000..=1_001_000).contains(&log.max()), "{}", log.max());
        assert_eq!(log.samples.len(), 1000);
        for _ in 0..MAX_FAULT_SAMPLES {
            log.record(5);
        }
        assert_eq!(log.samples.len(), MAX_FAULT_SAMPLES);
        assert_eq!(log.count(), 1000 + MAX_FAULT_SAMPLES as u64);
        assert_eq!(log.percentile(50), 5);
    }
}
