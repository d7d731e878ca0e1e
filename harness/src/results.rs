//! The results data model (what `DIR/results.json` holds), its reading and writing, and the raw
//! histogram files (`DIR/hist/<scenario>.<kind>.hdr.b64`: HdrHistogram V2, base64) that let
//! runs be merged and compared later.

use crate::guest_output::{DestinationStats, GuestOutput, PhaseStats, SlowFault};
use crate::histogram::{self, HistogramError, LatencyHistogram, Percentiles, ShortSummary};
use crate::probe::HostCheck;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the results.json layout.
pub const RESULTS_VERSION: u32 = 1;

/// Histogram kinds stored per scenario.
pub mod kind {
    /// Guest-seen fault latency (access_slow of the destination passes that overlapped
    /// postcopy).
    pub const GUEST_FAULT: &str = "guest_fault";
    /// Slow guest accesses of the destination passes after postcopy ended (noise, collapses).
    pub const GUEST_AFTER: &str = "guest_after";
    /// VMM-side fault latency (fault read to CONTINUE done).
    pub const VMM_FAULT: &str = "vmm_fault";
    /// The limit: the vCPU userfault round trip as the guest sees it ([`VCPU_UFFD`]) convolved
    /// with the 4 KiB TCP round trip (or [`THREAD_LIMIT`] if the vCPU measurement failed).
    pub const LIMIT: &str = "limit";
    /// Raw uffd round trip, page local, served to another thread (not a vCPU).
    pub const UFFD: &str = "uffd_rtt";
    /// The thread limit: [`UFFD`] convolved with the 4 KiB TCP round trip.
    pub const THREAD_LIMIT: &str = "thread_limit";
    /// Raw vCPU userfault round trip, page local, as the guest saw it (`vmm fault-limit`).
    pub const VCPU_UFFD: &str = "vcpu_uffd_rtt";
    /// The same vCPU faults, VMM side (fault read to ioctl done).
    pub const VCPU_UFFD_VMM: &str = "vcpu_uffd_vmm";
    /// Raw 4 KiB request/reply round trip on the link.
    pub const TCP_RTT: &str = "tcp_rtt";
    /// [`TCP_RTT`] beside a raw bulk stream and spinning threads.
    pub const TCP_RTT_LOADED: &str = "tcp_rtt_loaded";
    /// [`LIMIT`]'s userfault round trip convolved with [`TCP_RTT_LOADED`].
    pub const LOADED_LIMIT: &str = "loaded_limit";
    /// Collapse vCPU stalls.
    pub const COLLAPSE_STALL: &str = "collapse_stall";
    /// Guest first-touch latency before migration (source side).
    pub const FIRST_TOUCH: &str = "first_touch";
    /// VMM-side latency of the faults that waited through a postcopy-paused outage (stats
    /// `outage_fault_ns`); never part of [`VMM_FAULT`].
    pub const OUTAGE_FAULT: &str = "outage_fault";
    /// The guest-seen counterpart of [`OUTAGE_FAULT`]: the slowest of the guest's fault
    /// samples, as many as the destination counted outage faults; never part of
    /// [`GUEST_FAULT`].
    pub const GUEST_OUTAGE_FAULT: &str = "guest_outage_fault";
    /// The guest's stalls (inner-loop iterations over its stall threshold) in the destination
    /// passes that overlapped postcopy: every hold-up, on any page (code, stack, page tables).
    pub const GUEST_STALL: &str = "guest_stall";
}

/// Errors reading or writing results.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid results file: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("histogram file {path}: {source}")]
    Histogram {
        path: PathBuf,
        source: HistogramError,
    },
}

/// Outcome of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    /// Not run: the host lacks what it needs (`error` says what).
    Skipped,
}

/// One scenario's results. Absent measurements are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub backing: String,
    pub strategy: String,
    pub link: String,
    pub pattern: String,
    /// The `vmm receive --granularity` value used.
    #[serde(default)]
    pub granularity: String,
    pub status: Status,
    pub error: Option<String>,
    /// Guest-seen fault latency, us: of the slow accesses (> 2 us) of the destination passes
    /// that overlapped postcopy (see `guest_fault_passes`), the `uffd_faults` slowest (the
    /// guest cannot tell a userfault from an ordinary 3-10 us mapping fault, which also counts
    /// as slow; a userfault round trip is slower than those). All of them when the destination
    /// reported no fault count.
    pub fault_us: Percentiles,
    /// Every slow access of those passes, us (userfaults and ordinary mapping faults).
    #[serde(default)]
    pub guest_slow_us: Percentiles,
    /// The destination passes whose slow accesses make `fault_us`.
    #[serde(default)]
    pub guest_fault_passes: Vec<u64>,
    /// Where `fault_us` comes from: per-pass histograms, or the guest's whole-run histogram
    /// when it printed none per pass.
    #[serde(default)]
    pub guest_fault_source: String,
    /// Slow accesses of the destination passes after postcopy ended, us.
    #[serde(default)]
    pub guest_after_us: Percentiles,
    /// VMM-side fault latency, us.
    pub vmm_fault_us: Percentiles,
    /// The limit, us: the raw vCPU userfault round trip as the guest sees it
    /// (`vcpu_uffd_rtt_us`) convolved with the raw 4 KiB TCP round trip (`tcp_rtt_us`); see
    /// `limit_basis`.
    pub limit_us: Percentiles,
    /// Raw userfault round trip with the page local, served to a *thread* (not a vCPU), us.
    pub uffd_rtt_us: Percentiles,
    pub tcp_rtt_us: Percentiles,
    /// What `limit_us` is made of: "vcpu" (vCPU round trip + TCP round trip) or "thread"
    /// (thread round trip + TCP round trip, used only when the vCPU measurement failed; see
    /// `vcpu_limit_error`).
    #[serde(default)]
    pub limit_basis: String,
    /// The thread limit: `uffd_rtt_us` convolved with `tcp_rtt_us` (an optimistic floor: a
    /// vCPU fault costs more than a thread's), us.
    #[serde(default)]
    pub thread_limit_us: Percentiles,
    /// The 4 KiB TCP round trip of `tcp_rtt_us`, measured while a raw bulk stream runs on the
    /// same link and one thread per vCPU spins, us: what the CPUs and the kernel add to a
    /// round trip when a push is in flight.
    #[serde(default)]
    pub tcp_rtt_loaded_us: Percentiles,
    /// The loaded limit, us: the same userfault round trip as `limit_us` convolved with
    /// `tcp_rtt_loaded_us` instead of `tcp_rtt_us`. Information beside the limit (the targets
    /// stay against `limit_us`): how much of a fault tail the platform itself makes.
    #[serde(default)]
    pub loaded_limit_us: Percentiles,
    /// Raw vCPU userfault round trip with the page local, as the guest saw it (its first store
    /// to each page; `vmm fault-limit`), us.
    #[serde(default)]
    pub vcpu_uffd_rtt_us: Percentiles,
    /// The same vCPU faults on the VMM side (fault read to ioctl done), us.
    #[serde(default)]
    pub vcpu_uffd_vmm_us: Percentiles,
    /// The backing the vCPU round trip was measured on (shmem for every staged backing).
    #[serde(default)]
    pub vcpu_uffd_backing: Option<String>,
    /// How the vCPU faults were served (e.g. "shmem MINOR + UFFDIO_CONTINUE 4 KiB").
    #[serde(default)]
    pub vcpu_uffd_service: Option<String>,
    /// Why the vCPU round trip could not be measured, if it could not.
    #[serde(default)]
    pub vcpu_limit_error: Option<String>,
    pub blackout_ms: Option<f64>,
    pub total_s: Option<f64>,
    /// Background throughput: bytes sent while guest memory streamed (precopy rounds plus the
    /// postcopy bulk push, `transfer_bytes / transfer_ms` of `vmm migrate --json`); falls back
    /// to `overall_gbps` for a source that does not report the transfer window.
    pub throughput_gbps: Option<f64>,
    /// Bytes sent / total migration time (setup, state, blackout and the wait for the
    /// destination's collapses included).
    #[serde(default)]
    pub overall_gbps: Option<f64>,
    /// Raw TCP throughput on the same link.
    pub raw_throughput_gbps: Option<f64>,
    /// Peak link rate seen by the interface sampler during the migration.
    pub peak_link_gbps: Option<f64>,
    pub collapse_stall_us: ShortSummary,
    /// Whole duration of each collapse (the vCPU runs during most of it).
    #[serde(default)]
    pub collapse_total_us: ShortSummary,
    pub staging_peak_mib: Option<f64>,
    /// Pages the source sent on the urgent (fault) channel (`vmm migrate --json`).
    pub faults_served: Option<u64>,
    /// userfaultfd faults the destination handled (stats `faults_served`), including those
    /// resolved without the network.
    #[serde(default)]
    pub uffd_faults: Option<u64>,
    /// Faults that fetched from the source (stats `pages_fetched`).
    #[serde(default)]
    pub pages_fetched: Option<u64>,
    pub pages_pushed: Option<u64>,
    pub pages_sent: Option<u64>,
    pub bytes_sent: Option<u64>,
    pub pages_fetched_local: Option<u64>,
    pub guest_mismatches: Option<u64>,
    pub guest_ok: Option<bool>,
    /// Slow accesses (> 2 us) the guest reported in passes that ended before the migration
    /// began: noise included in `fault_us`, which the guest accumulates over the whole run.
    #[serde(default)]
    pub guest_slow_before_migration: Option<u64>,
    /// Slow accesses in destination passes that began after postcopy ended.
    #[serde(default)]
    pub guest_slow_after_migration: Option<u64>,
    /// Histogram kind -> file name relative to `DIR/hist/`.
    #[serde(default)]
    pub histograms: BTreeMap<String, String>,
    /// (seconds since migrate started, Gbit/s) from the link's transmit counter.
    #[serde(default)]
    pub throughput_series: Vec<(f64, f64)>,
    /// (x, VMM-side fault latency us); x per `fault_series_x`.
    #[serde(default)]
    pub fault_series: Vec<(f64, f64)>,
    /// "ms since vCPUs started" or "fault number".
    #[serde(default)]
    pub fault_series_x: String,
    /// How many runs were merged into this entry (1 for a plain run).
    #[serde(default = "one")]
    pub runs: u32,
    /// Strategy `native`: why the destination did not use the kernel-native path and fell
    /// back to 4k-staged (its probe's answer); absent when native served, or for other
    /// strategies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_fallback: Option<String>,
    /// How the destination served the guest RAM's regions (e.g. "staged-4k-hugetlb",
    /// "native-hugetlb-4k-continue").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serve_modes: Vec<String>,
    /// The fault the link injected, in words (e.g. "reset every connection once after N
    /// bytes source->destination"); absent on links without a fault.
    #[serde(default)]
    pub link_fault: Option<String>,
    /// Reset operations the fault-injecting relay performed (each resets every connection
    /// open then); absent on links without a fault. 0 means the fault never fired and the
    /// scenario measured an ordinary migration (it is then marked failed).
    #[serde(default)]
    pub link_resets: Option<u64>,
    /// Postcopy recoveries the source counted (`vmm migrate --json` `recoveries`): times the
    /// link failed after the switchover and it reconnected into the same session.
    #[serde(default)]
    pub recoveries: Option<u32>,
    /// Postcopy recoveries the destination counted (stats `recoveries`).
    #[serde(default)]
    pub dst_recoveries: Option<u32>,
    /// Time the source spent postcopy-paused, ms (`vmm migrate --json` `paused_ms`).
    #[serde(default)]
    pub paused_ms: Option<f64>,
    /// Time the destination spent postcopy-paused, ms (stats `paused_ms`).
    #[serde(default)]
    pub dst_paused_ms: Option<f64>,
    /// VMM-side latency of the faults whose page fetch failed at least once because the link
    /// was down (stats `outage_fault_ns`), us. They are not in `vmm_fault_us`.
    #[serde(default)]
    pub outage_fault_us: Percentiles,
    /// The guest-seen estimate of those faults: of the guest's fault samples, the
    /// `outage_fault_us.count` slowest (an outage fault waits for the link to come back, then
    /// for its page); they are taken out of `fault_us`.
    #[serde(default)]
    pub guest_outage_fault_us: Percentiles,
    /// The VMM that ran the scenario when it is not ours: `"qemu"` (the peer), else absent.
    #[serde(default)]
    pub peer: Option<String>,
    /// The peer's version (QMP `query-version`, e.g. `7.2.22`) and its `--version` line.
    #[serde(default)]
    pub peer_version: Option<String>,
    #[serde(default)]
    pub peer_version_line: Option<String>,
    /// Migration capabilities turned on at the peer (e.g. postcopy-ram, postcopy-preempt).
    #[serde(default)]
    pub peer_capabilities: Vec<String>,
    /// QEMU `query-migrate` `ram.postcopy-requests` on the source: pages the destination asked
    /// for (also in `faults_served`/`uffd_faults` for QEMU scenarios).
    #[serde(default)]
    pub postcopy_requests: Option<u64>,
    /// QEMU's `postcopy-blocktime` on the destination, ms: time during which *all* vCPUs
    /// waited for a page.
    #[serde(default)]
    pub peer_blocktime_ms: Option<f64>,
    /// QEMU's `postcopy-vcpu-blocktime`, ms per vCPU.
    #[serde(default)]
    pub peer_vcpu_blocktime_ms: Vec<f64>,
    /// Our VMM's own per-vCPU blocktime (from userfaultfd's faulting thread ids), ms; QEMU
    /// scenarios carry theirs in `peer_vcpu_blocktime_ms`.
    #[serde(default)]
    pub vmm_vcpu_blocktime_ms: Vec<f64>,
    /// vCPUs of the guest.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest-seen blocktime per vCPU, ms: the sum of the `fault_us` samples divided by the
    /// vCPU count (the same measure for every VMM).
    #[serde(default)]
    pub guest_blocktime_ms: Option<f64>,
    /// The guest's view of every stall, us: the iterations of its inner loop (one page: timed
    /// load, verification, maybe rewrite) that took longer than its stall threshold, in the
    /// destination passes that overlapped postcopy (`guest_fault_passes`), all vCPUs. Unlike
    /// `fault_us` it sees a fault on any page (code, stack, page tables, the generation
    /// array), and host preemption too. Empty from guests that do not report stalls.
    #[serde(default)]
    pub guest_stall_us: Percentiles,
    /// The stall threshold the guest states (`threshold=` of its stall lines), us.
    #[serde(default)]
    pub guest_stall_threshold_us: Option<f64>,
    /// VMM-side blocked time per vCPU, ms, from userfaultfd's faulting thread ids (QEMU's
    /// postcopy-vcpu-blocktime): ours from the stats file's `postcopy_vcpu_blocktime_ms`
    /// (also in `vmm_vcpu_blocktime_ms`), QEMU's from `postcopy-vcpu-blocktime` (also in
    /// `peer_vcpu_blocktime_ms`).
    #[serde(default)]
    pub blocktime_ms: Vec<f64>,
    /// Raw TCP throughput on the same link with one spinning thread per guest vCPU beside the
    /// sender (the honest limit while the guest runs), Gbit/s.
    #[serde(default)]
    pub raw_loaded_gbps: Option<f64>,
    /// Raw TCP from RAM to RAM on the same link, the vCPUs' spinning threads beside the
    /// sender: (c'') of docs/measuring.md. Between it and `raw_loaded_gbps` lies the memory
    /// traffic any migration of guest RAM pays; between it and the background, ours.
    #[serde(default)]
    pub raw_memory_gbps: Option<f64>,
    /// Per-fault phase timing from the destination (`fault_phase_us` of its stats file):
    /// phase -> summary, us. Empty when the destination does not time phases. After a merge
    /// of several runs: counts summed, mean count-weighted, max the largest, and p50..p99.9
    /// the median of the runs' figures (the destination gives no histogram to merge).
    #[serde(default)]
    pub fault_phase_us: BTreeMap<String, PhaseStats>,
    /// Which phase took the time in the faults above the p99 (the stats file's
    /// `slow_faults`); absent when the destination listed none.
    #[serde(default)]
    pub fault_tail: Option<FaultTail>,
    /// Guest RAM, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// For a sweep point (`harness run --sweep size`): the scenario it was expanded from
    /// (`memory_mib` and `vcpus` say which point); absent otherwise.
    #[serde(default)]
    pub sweep_of: Option<String>,
    /// The `--migration-cpus` both VMMs ran with (a `-pinned` scenario); absent otherwise.
    #[serde(default)]
    pub migration_cpus: Option<String>,
    /// The destination VMM's peak anonymous memory (`RssAnon` of `/proc/PID/status`, sampled
    /// every 50 ms from its start to its exit), MiB: what it allocates for itself; guest RAM
    /// is never anonymous.
    #[serde(default)]
    pub dst_rss_anon_peak_mib: Option<f64>,
    /// The destination VMM's peak page-table memory (`VmPTE`), MiB: grows with the guest RAM
    /// it maps (twice on shmem: the receive alias and the memslot mapping).
    #[serde(default)]
    pub dst_pte_peak_mib: Option<f64>,
    /// **Destination extra memory**, MiB: the peak of anonymous memory plus page tables (one
    /// sample) plus `staging_peak_mib` (4 KiB staging is shmem, so not in `RssAnon`). What the
    /// destination host needs beyond the guest RAM itself; KVM's own page tables are not in
    /// it.
    #[serde(default)]
    pub dst_extra_mib: Option<f64>,
}

/// The faults above the p99 of the total, by phase: how much of their time each phase took,
/// and how often each was the longest. Sums, so merging runs is exact (the union of each
/// run's slow faults).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultTail {
    /// Slow faults analysed.
    pub faults: u64,
    /// Their total time, us.
    pub total_us: f64,
    /// Per phase, the sum of its time over those faults, us.
    pub phase_us: BTreeMap<String, f64>,
    /// Per phase, in how many of those faults it was the longest phase.
    pub dominant: BTreeMap<String, u64>,
}

impl FaultTail {
    /// The tail of `slow` (None if empty).
    pub fn of(slow: &[SlowFault]) -> Option<Self> {
        if slow.is_empty() {
            return None;
        }
        let mut t = FaultTail::default();
        for f in slow {
            t.faults += 1;
            t.total_us += f.total_us;
            for (phase, us) in &f.phases_us {
                *t.phase_us.entry(phase.clone()).or_default() += us;
            }
            let longest = f
                .phases_us
                .iter()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(p, _)| p.clone());
            if let Some(p) = longest {
                *t.dominant.entry(p).or_default() += 1;
            }
        }
        Some(t)
    }

    /// Adds another run's tail.
    pub fn add(&mut self, other: &FaultTail) {
        self.faults += other.faults;
        self.total_us += other.total_us;
        for (p, us) in &other.phase_us {
            *self.phase_us.entry(p.clone()).or_default() += us;
        }
        for (p, n) in &other.dominant {
            *self.dominant.entry(p.clone()).or_default() += n;
        }
    }

    /// The share of the slow faults' total time `phase` took (0..1).
    pub fn share(&self, phase: &str) -> f64 {
        match self.phase_us.get(phase) {
            Some(us) if self.total_us > 0.0 => us / self.total_us,
            _ => 0.0,
        }
    }

    /// The share of the total no phase accounts for (time between the phases' marks, or
    /// phases the destination does not name), clamped at 0.
    pub fn unaccounted(&self) -> f64 {
        if self.total_us <= 0.0 {
            return 0.0;
        }
        (1.0 - self.phase_us.values().sum::<f64>() / self.total_us).max(0.0)
    }

    /// The phase that was the longest most often, with its count.
    pub fn most_dominant(&self) -> Option<(&str, u64)> {
        self.dominant
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, n)| (p.as_str(), *n))
    }
}

/// Records the guest's stalls of the destination passes `passes` (its per-pass `stall`
/// histograms) in `r`: `guest_stall_us`, the threshold it states, and the histogram.
/// Nothing when the guest printed no stall lines (an older workload).
pub fn record_guest_stalls(
    dir: &Path,
    r: &mut ScenarioResult,
    dst_out: &GuestOutput,
    passes: &[u64],
) -> Result<(), ResultsError> {
    let hist_err = |source| ResultsError::Histogram {
        path: hist_dir(dir),
        source,
    };
    let stated = dst_out.hists_named("stall").find_map(|h| h.threshold);
    let mut parts = Vec::new();
    for h in dst_out
        .pass_hists("stall")
        .filter(|h| h.pass.is_some_and(|k| passes.contains(&k)))
    {
        parts.push(h.histogram().map_err(hist_err)?);
    }
    if stated.is_none() && parts.is_empty() {
        return Ok(());
    }
    let stalls = histogram::merge(parts.iter()).map_err(hist_err)?;
    r.guest_stall_threshold_us = stated.map(|ns| ns as f64 / 1e3);
    r.guest_stall_us = Percentiles::us(&stalls);
    save_histogram(dir, r, kind::GUEST_STALL, &stalls)
}

/// Records what the destination's stats file says about the vCPUs' blocked time and the
/// faults' phases (`fault_phase_us`, `slow_faults`), when it says it.
pub fn record_destination_timing(r: &mut ScenarioResult, st: &DestinationStats) {
    r.vmm_vcpu_blocktime_ms = st.postcopy_vcpu_blocktime_ms.clone();
    r.blocktime_ms = if st.postcopy_vcpu_blocktime_ms.is_empty() {
        // QEMU's counter, when the peer ran (filled before the stats).
        r.peer_vcpu_blocktime_ms.clone()
    } else {
        st.postcopy_vcpu_blocktime_ms.clone()
    };
    r.fault_phase_us = st.fault_phase_us.clone();
    r.fault_tail = FaultTail::of(&st.slow_faults);
}

/// Median of some figures (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Merges the phase summaries of several runs: counts summed, mean count-weighted, max the
/// largest, the percentiles the median of the runs' (see `ScenarioResult::fault_phase_us`).
pub fn merge_phases<'a>(
    runs: impl IntoIterator<Item = &'a BTreeMap<String, PhaseStats>>,
) -> BTreeMap<String, PhaseStats> {
    let mut by_phase: BTreeMap<String, Vec<PhaseStats>> = BTreeMap::new();
    for run in runs {
        for (p, st) in run {
            by_phase.entry(p.clone()).or_default().push(*st);
        }
    }
    by_phase
        .into_iter()
        .map(|(p, v)| {
            let count: u64 = v.iter().map(|s| s.count).sum();
            let mean = if count > 0 {
                v.iter().map(|s| s.mean * s.count as f64).sum::<f64>() / count as f64
            } else {
                median(v.iter().map(|s| s.mean).collect())
            };
            let med = |f: fn(&PhaseStats) -> f64| median(v.iter().map(f).collect());
            let st = PhaseStats {
                count,
                p50: med(|s| s.p50),
                p90: med(|s| s.p90),
                p99: med(|s| s.p99),
                p999: med(|s| s.p999),
                max: v.iter().map(|s| s.max).fold(0.0, f64::max),
                mean,
            };
            (p, st)
        })
        .collect()
}

fn one() -> u32 {
    1
}

impl ScenarioResult {
    /// An entry with only the identity filled in.
    pub fn new(name: &str, backing: &str, strategy: &str, link: &str, pattern: &str) -> Self {
        Self {
            name: name.into(),
            backing: backing.into(),
            strategy: strategy.into(),
            link: link.into(),
            pattern: pattern.into(),
            granularity: String::new(),
            status: Status::Failed,
            error: None,
            fault_us: Percentiles::default(),
            guest_fault_passes: Vec::new(),
            guest_fault_source: String::new(),
            guest_slow_us: Percentiles::default(),
            guest_after_us: Percentiles::default(),
            vmm_fault_us: Percentiles::default(),
            limit_us: Percentiles::default(),
            uffd_rtt_us: Percentiles::default(),
            tcp_rtt_us: Percentiles::default(),
            limit_basis: String::new(),
            thread_limit_us: Percentiles::default(),
            tcp_rtt_loaded_us: Percentiles::default(),
            loaded_limit_us: Percentiles::default(),
            vcpu_uffd_rtt_us: Percentiles::default(),
            vcpu_uffd_vmm_us: Percentiles::default(),
            vcpu_uffd_backing: None,
            vcpu_uffd_service: None,
            vcpu_limit_error: None,
            blackout_ms: None,
            total_s: None,
            throughput_gbps: None,
            overall_gbps: None,
            raw_throughput_gbps: None,
            peak_link_gbps: None,
            collapse_stall_us: ShortSummary::default(),
            collapse_total_us: ShortSummary::default(),
            staging_peak_mib: None,
            faults_served: None,
            uffd_faults: None,
            pages_fetched: None,
            pages_pushed: None,
            pages_sent: None,
            bytes_sent: None,
            pages_fetched_local: None,
            guest_mismatches: None,
            guest_ok: None,
            guest_slow_before_migration: None,
            guest_slow_after_migration: None,
            histograms: BTreeMap::new(),
            throughput_series: Vec::new(),
            fault_series: Vec::new(),
            fault_series_x: String::new(),
            runs: 1,
            native_fallback: None,
            serve_modes: Vec::new(),
            link_fault: None,
            link_resets: None,
            recoveries: None,
            dst_recoveries: None,
            paused_ms: None,
            dst_paused_ms: None,
            outage_fault_us: Percentiles::default(),
            guest_outage_fault_us: Percentiles::default(),
            peer: None,
            peer_version: None,
            peer_version_line: None,
            peer_capabilities: Vec::new(),
            postcopy_requests: None,
            peer_blocktime_ms: None,
            peer_vcpu_blocktime_ms: Vec::new(),
            vmm_vcpu_blocktime_ms: Vec::new(),
            vcpus: None,
            guest_blocktime_ms: None,
            guest_stall_us: Percentiles::default(),
            guest_stall_threshold_us: None,
            blocktime_ms: Vec::new(),
            raw_loaded_gbps: None,
            raw_memory_gbps: None,
            fault_phase_us: BTreeMap::new(),
            fault_tail: None,
            memory_mib: None,
            sweep_of: None,
            migration_cpus: None,
            dst_rss_anon_peak_mib: None,
            dst_pte_peak_mib: None,
            dst_extra_mib: None,
        }
    }
}

/// The whole results.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub quick: bool,
    /// `vmm probe --json` checks of the host the run was on (e.g. `hugetlb_4k_continue`: the
    /// kernel-native alternative to 4 KiB staging).
    #[serde(default)]
    pub host_checks: BTreeMap<String, HostCheck>,
    pub scenarios: Vec<ScenarioResult>,
}

/// The histogram directory of a results directory.
pub fn hist_dir(dir: &Path) -> PathBuf {
    dir.join("hist")
}

impl Results {
    /// Writes `dir/results.json` (pretty-printed).
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ResultsError> {
        let path = dir.join("results.json");
        let text = serde_json::to_string_pretty(self).map_err(|source| ResultsError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text + "\n").map_err(|source| ResultsError::Io {
            what: "writing",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Reads `dir/results.json`.
    pub fn load(dir: &Path) -> Result<Self, ResultsError> {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ResultsError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ResultsError::Json { path, source })
    }
}

/// Writes one histogram to `dir/hist/<scenario>.<kind>.hdr.b64` and records it in `r`.
pub fn save_histogram(
    dir: &Path,
    r: &mut ScenarioResult,
    kind: &str,
    h: &LatencyHistogram,
) -> Result<(), ResultsError> {
    let hd = hist_dir(dir);
    std::fs::create_dir_all(&hd).map_err(|source| ResultsError::Io {
        what: "creating",
        path: hd.clone(),
        source,
    })?;
    let file = format!("{}.{kind}.hdr.b64", r.name);
    let path = hd.join(&file);
    let text = histogram::to_base64(h).map_err(|source| ResultsError::Histogram {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, text + "\n").map_err(|source| ResultsError::Io {
        what: "writing",
        path: path.clone(),
        source,
    })?;
    r.histograms.insert(kind.to_string(), file);
    Ok(())
}

/// Reads the histogram of `kind` recorded for `r` under `dir`, if it has one.
pub fn load_histogram(
    dir: &Path,
    r: &ScenarioResult,
    kind: &str,
) -> Result<Option<LatencyHistogram>, ResultsError> {
    let Some(file) = r.histograms.get(kind) else {
        return Ok(None);
    };
    let path = hist_dir(dir).join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| ResultsError::Io {
        what: "reading",
        path: path.clone(),
        source,
    })?;
    histogram::from_base64(&text)
        .map(Some)
        .map_err(|source| ResultsError::Histogram { path, source })
}

/// Recomputes the percentile fields of `r` from its histograms in `dir` (after a merge).
pub fn summarize_from_histograms(dir: &Path, r: &mut ScenarioResult) -> Result<(), ResultsError> {
    if let Some(h) = load_histogram(dir, r, kind::GUEST_FAULT)? {
        r.fault_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::GUEST_AFTER)? {
        r.guest_after_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::VMM_FAULT)? {
        r.vmm_fault_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::LIMIT)? {
        r.limit_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::UFFD)? {
        r.uffd_rtt_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::TCP_RTT)? {
        r.tcp_rtt_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::THREAD_LIMIT)? {
        r.thread_limit_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::TCP_RTT_LOADED)? {
        r.tcp_rtt_loaded_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::LOADED_LIMIT)? {
        r.loaded_limit_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::VCPU_UFFD)? {
        r.vcpu_uffd_rtt_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::VCPU_UFFD_VMM)? {
        r.vcpu_uffd_vmm_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::COLLAPSE_STALL)? {
        r.collapse_stall_us = ShortSummary::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::OUTAGE_FAULT)? {
        r.outage_fault_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::GUEST_OUTAGE_FAULT)? {
        r.guest_outage_fault_us = Percentiles::us(&h);
    }
    if let Some(h) = load_histogram(dir, r, kind::GUEST_STALL)? {
        r.guest_stall_us = Percentiles::us(&h);
    }
    Ok(())
}

fn saturating_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Median over the runs that measured a figure (None if none did).
fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// Merges several result directories into `out`: scenarios with the same name have their
/// histograms added (percentiles recomputed from the merged histograms), scalar figures the
/// median of the runs that measured them (one noisy run does not move it), counters summed,
/// and `runs` counts the inputs.
/// The time series of the first run are kept.
pub fn merge_dirs(inputs: &[PathBuf], out: &Path) -> Result<Results, ResultsError> {
    let mut merged: Vec<ScenarioResult> = Vec::new();
    let mut groups: BTreeMap<String, Vec<(PathBuf, ScenarioResult)>> = BTreeMap::new();
    let mut quick = true;
    let mut host_checks = BTreeMap::new();
    for dir in inputs {
        let res = Results::load(dir)?;
        quick &= res.quick;
        if host_checks.is_empty() {
            host_checks = res.host_checks;
        }
        for s in res.scenarios {
            groups
                .entry(s.name.clone())
                .or_default()
                .push((dir.clone(), s));
        }
    }
    for (_, runs) in groups {
        let mut m = runs[0].1.clone();
        m.histograms.clear();
        m.runs = runs.iter().map(|(_, s)| s.runs).sum();
        let ok: Vec<&ScenarioResult> = runs
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.status == Status::Ok)
            .collect();
        m.status = if !ok.is_empty() {
            Status::Ok
        } else if runs.iter().all(|(_, s)| s.status == Status::Skipped) {
            Status::Skipped
        } else {
            Status::Failed
        };
        let pick = |f: fn(&ScenarioResult) -> Option<f64>| median_of(ok.iter().map(|s| f(s)));
        m.blackout_ms = pick(|s| s.blackout_ms);
        m.total_s = pick(|s| s.total_s);
        m.throughput_gbps = pick(|s| s.throughput_gbps);
        m.overall_gbps = pick(|s| s.overall_gbps);
        m.raw_throughput_gbps = pick(|s| s.raw_throughput_gbps);
        m.raw_loaded_gbps = pick(|s| s.raw_loaded_gbps);
        m.raw_memory_gbps = pick(|s| s.raw_memory_gbps);
        m.guest_blocktime_ms = pick(|s| s.guest_blocktime_ms);
        m.peer_blocktime_ms = pick(|s| s.peer_blocktime_ms);
        let per_vcpu = |f: fn(&ScenarioResult) -> &Vec<f64>| -> Vec<f64> {
            let n = ok.iter().map(|s| f(s).len()).max().unwrap_or(0);
            (0..n)
                .filter_map(|i| median_of(ok.iter().map(|s| f(s).get(i).copied())))
                .collect()
        };
        m.blocktime_ms = per_vcpu(|s| &s.blocktime_ms);
        m.vmm_vcpu_blocktime_ms = per_vcpu(|s| &s.vmm_vcpu_blocktime_ms);
        m.peer_vcpu_blocktime_ms = per_vcpu(|s| &s.peer_vcpu_blocktime_ms);
        m.fault_phase_us = merge_phases(ok.iter().map(|s| &s.fault_phase_us));
        m.fault_tail = ok.iter().filter_map(|s| s.fault_tail.as_ref()).fold(
            None,
            |acc: Option<FaultTail>, t| {
                let mut acc = acc.unwrap_or_default();
                acc.add(t);
                Some(acc)
            },
        );
        m.peak_link_gbps = pick(|s| s.peak_link_gbps);
        m.paused_ms = pick(|s| s.paused_ms);
        m.dst_paused_ms = pick(|s| s.dst_paused_ms);
        // Memory peaks: the largest of the runs (what a host must have), like the staging peak.
        let peak = |f: fn(&ScenarioResult) -> Option<f64>| {
            ok.iter()
                .filter_map(|s| f(s))
                .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
        };
        m.staging_peak_mib = peak(|s| s.staging_peak_mib);
        m.dst_rss_anon_peak_mib = peak(|s| s.dst_rss_anon_peak_mib);
        m.dst_pte_peak_mib = peak(|s| s.dst_pte_peak_mib);
        m.dst_extra_mib = peak(|s| s.dst_extra_mib);
        let sum = |f: fn(&ScenarioResult) -> Option<u64>| {
            let v: Vec<u64> = ok.iter().filter_map(|s| f(s)).collect();
            (!v.is_empty()).then(|| v.iter().sum())
        };
        m.faults_served = sum(|s| s.faults_served);
        m.pages_pushed = sum(|s| s.pages_pushed);
        m.pages_sent = sum(|s| s.pages_sent);
        m.bytes_sent = sum(|s| s.bytes_sent);
        m.pages_fetched_local = sum(|s| s.pages_fetched_local);
        m.uffd_faults = sum(|s| s.uffd_faults);
        m.pages_fetched = sum(|s| s.pages_fetched);
        m.guest_slow_before_migration = sum(|s| s.guest_slow_before_migration);
        m.guest_slow_after_migration = sum(|s| s.guest_slow_after_migration);
        m.guest_mismatches = sum(|s| s.guest_mismatches);
        m.link_resets = sum(|s| s.link_resets);
        m.recoveries = sum(|s| s.recoveries.map(u64::from)).map(saturating_u32);
        m.dst_recoveries = sum(|s| s.dst_recoveries.map(u64::from)).map(saturating_u32);
        let kinds: std::collections::BTreeSet<String> = runs
            .iter()
            .flat_map(|(_, s)| s.histograms.keys().cloned())
            .collect();
        for k in kinds {
            let mut parts = Vec::new();
            for (dir, s) in &runs {
                if let Some(h) = load_histogram(dir, s, &k)? {
                    parts.push(h);
                }
            }
            let h = histogram::merge(parts.iter()).map_err(|source| ResultsError::Histogram {
                path: out.to_path_buf(),
                source,
            })?;
            save_histogram(out, &mut m, &k, &h)?;
        }
        summarize_from_histograms(out, &mut m)?;
        merged.push(m);
    }
    let res = Results {
        version: RESULTS_VERSION,
        quick,
        host_checks,
        scenarios: merged,
    };
    res.save(out)?;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(samples: &[u64], blackout: f64) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let mut r = ScenarioResult::new("s", "shmem", "4k-staged", "loopback", "random");
        r.status = Status::Ok;
        r.blackout_ms = Some(blackout);
        r.faults_served = Some(samples.len() as u64);
        let h = histogram::from_samples(samples).unwrap();
        r.fault_us = Percentiles::us(&h);
        save_histogram(d.path(), &mut r, kind::GUEST_FAULT, &h).unwrap();
        Results {
            version: RESULTS_VERSION,
            quick: true,
            host_checks: BTreeMap::new(),
            scenarios: vec![r],
        }
        .save(d.path())
        .unwrap();
        d
    }

    #[test]
    fn save_load_round_trip_keeps_every_field() {
        let d = run_dir(&[10_000, 20_000], 3.0);
        let r = Results::load(d.path()).unwrap();
        assert_eq!(r.scenarios.len(), 1);
        let h = load_histogram(d.path(), &r.scenarios[0], kind::GUEST_FAULT)
            .unwrap()
            .unwrap();
        assert_eq!(h.len(), 2);
        assert!(load_histogram(d.path(), &r.scenarios[0], kind::LIMIT)
            .unwrap()
            .is_none());
    }

    #[test]
    fn results_without_the_recovery_fields_still_load() {
        let d = run_dir(&[10_000], 1.0);
        let path = d.path().join("results.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let s = v["scenarios"][0].as_object_mut().unwrap();
        for k in [
            "link_fault",
            "link_resets",
            "recoveries",
            "dst_recoveries",
            "paused_ms",
            "dst_paused_ms",
            "outage_fault_us",
            "guest_outage_fault_us",
            "guest_stall_us",
            "guest_stall_threshold_us",
            "blocktime_ms",
            "raw_loaded_gbps",
            "raw_memory_gbps",
            "fault_phase_us",
            "fault_tail",
        ] {
            assert!(s.remove(k).is_some(), "{k} not written");
        }
        std::fs::write(&path, v.to_string()).unwrap();
        let r = Results::load(d.path()).unwrap();
        let s = &r.scenarios[0];
        assert_eq!(
            (s.link_resets, s.recoveries, s.paused_ms),
            (None, None, None)
        );
        assert_eq!(s.outage_fault_us.count, 0);
        assert_eq!((s.guest_stall_us.count, s.raw_loaded_gbps), (0, None));
        assert_eq!(s.raw_memory_gbps, None);
        assert!(s.blocktime_ms.is_empty() && s.fault_phase_us.is_empty());
    }

    #[test]
    fn merge_sums_recoveries_and_merges_outage_faults_apart() {
        let dirs: Vec<tempfile::TempDir> = [(1u32, 5.0f64, 26_000_000u64), (2, 15.0, 40_000_000)]
            .iter()
            .map(|&(rec, paused, outage_ns)| {
                let d = run_dir(&[10_000, 20_000], 2.0);
                let mut res = Results::load(d.path()).unwrap();
                let r = &mut res.scenarios[0];
                r.link_resets = Some(u64::from(rec));
                r.recoveries = Some(rec);
                r.dst_recoveries = Some(rec);
                r.paused_ms = Some(paused);
                r.dst_paused_ms = Some(paused + 1.0);
                let h = histogram::from_samples(&[outage_ns]).unwrap();
                r.outage_fault_us = Percentiles::us(&h);
                save_histogram(d.path(), r, kind::OUTAGE_FAULT, &h).unwrap();
                res.save(d.path()).unwrap();
                d
            })
            .collect();
        let out = tempfile::tempdir().unwrap();
        let inputs: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
        let m = merge_dirs(&inputs, out.path()).unwrap();
        let s = &m.scenarios[0];
        assert_eq!(
            (s.link_resets, s.recoveries, s.dst_recoveries),
            (Some(3), Some(3), Some(3))
        );
        assert_eq!((s.paused_ms, s.dst_paused_ms), (Some(10.0), Some(11.0)));
        assert_eq!(s.outage_fault_us.count, 2);
        assert!(s.outage_fault_us.max > 39_000.0, "{:?}", s.outage_fault_us);
        // The normal fault distribution is untouched by the outage faults.
        assert_eq!(s.fault_us.count, 4);
        assert!(s.fault_us.max < 30.0, "{:?}", s.fault_us);
    }

    fn phases(p50: f64, max: f64, count: u64) -> BTreeMap<String, PhaseStats> {
        let st = PhaseStats {
            count,
            p50,
            p90: p50,
            p99: p50 * 2.0,
            p999: p50 * 3.0,
            max,
            mean: p50,
        };
        [("reply_read".to_string(), st)].into_iter().collect()
    }

    fn slow(total: f64, reply: f64, installed: f64) -> SlowFault {
        SlowFault {
            total_us: total,
            phases_us: [
                ("reply_read".to_string(), reply),
                ("installed".to_string(), installed),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn merge_combines_stalls_blocktimes_loaded_raw_and_phases() {
        let runs: Vec<tempfile::TempDir> = [
            (10.0, 100.0, 100u64, 8.0, 2.0, 30_000u64),
            (20.0, 900.0, 300, 9.0, 4.0, 800_000_000),
            (40.0, 200.0, 100, 10.0, 6.0, 50_000),
        ]
        .iter()
        .map(|&(p50, max, count, loaded, block, stall_ns)| {
            let d = run_dir(&[10_000], 1.0);
            let mut res = Results::load(d.path()).unwrap();
            let r = &mut res.scenarios[0];
            r.raw_loaded_gbps = Some(loaded);
            r.raw_memory_gbps = Some(loaded / 2.0);
            r.blocktime_ms = vec![block, block * 10.0];
            r.fault_phase_us = phases(p50, max, count);
            r.fault_tail = FaultTail::of(&[slow(500.0, 400.0, 50.0), slow(300.0, 20.0, 250.0)]);
            r.guest_stall_threshold_us = Some(20.0);
            let h = histogram::from_samples(&[25_000, stall_ns]).unwrap();
            r.guest_stall_us = Percentiles::us(&h);
            save_histogram(d.path(), r, kind::GUEST_STALL, &h).unwrap();
            res.save(d.path()).unwrap();
            d
        })
        .collect();
        let out = tempfile::tempdir().unwrap();
        let inputs: Vec<PathBuf> = runs.iter().map(|d| d.path().to_path_buf()).collect();
        let m = merge_dirs(&inputs, out.path()).unwrap();
        let s = &m.scenarios[0];
        assert_eq!(s.raw_loaded_gbps, Some(9.0));
        assert_eq!(s.raw_memory_gbps, Some(4.5));
        assert_eq!(s.blocktime_ms, vec![4.0, 40.0]);
        // Stalls: the histograms are added (6 stalls, the 800 ms one is the max).
        assert_eq!(s.guest_stall_us.count, 6);
        assert!(s.guest_stall_us.max > 790_000.0, "{:?}", s.guest_stall_us);
        assert_eq!(s.guest_stall_threshold_us, Some(20.0));
        // Phases: counts summed, max the largest, p50 the median of the runs', mean weighted.
        let p = s.fault_phase_us["reply_read"];
        assert_eq!((p.count, p.max, p.p50), (500, 900.0, 20.0));
        assert!(
            (p.mean - (1000.0 + 6000.0 + 4000.0) / 500.0).abs() < 1e-9,
            "{p:?}"
        );
        // The tail pools every run's slow faults.
        let t = s.fault_tail.as_ref().unwrap();
        assert_eq!(t.faults, 6);
        assert_eq!(t.total_us, 2400.0);
        assert_eq!(t.dominant["reply_read"], 3);
        assert_eq!(t.dominant["installed"], 3);
        assert!((t.share("reply_read") - 1260.0 / 2400.0).abs() < 1e-9);
        assert!((t.unaccounted() - 240.0 / 2400.0).abs() < 1e-9);
    }

    #[test]
    fn guest_stalls_come_from_the_postcopy_passes() {
        let d = tempfile::tempdir().unwrap();
        let out = GuestOutput::parse(
            "WORKLOAD pass n=2 pages=10 mismatches=0 elapsed_ms=900 slow_accesses=1\n\
             WORKLOAD HIST name=stall pass=2 unit=ns sub=32 threshold=20000 buckets=753000000:1,24576:4\n\
             WORKLOAD pass n=3 pages=10 mismatches=0 elapsed_ms=10 slow_accesses=0\n\
             WORKLOAD HIST name=stall pass=3 unit=ns sub=32 threshold=20000 buckets=30720:2\n\
             WORKLOAD HIST name=stall unit=ns sub=32 threshold=20000 buckets=24576:4,30720:2,753000000:1\n",
        );
        let mut r = ScenarioResult::new("s", "hugetlb-1g", "huge", "loopback", "random");
        record_guest_stalls(d.path(), &mut r, &out, &[2]).unwrap();
        assert_eq!(r.guest_stall_us.count, 5);
        assert!(r.guest_stall_us.max > 750_000.0, "{:?}", r.guest_stall_us);
        assert_eq!(r.guest_stall_threshold_us, Some(20.0));
        assert!(r.histograms.contains_key(kind::GUEST_STALL));
        // An older guest without stall lines leaves the fields empty.
        let mut old = ScenarioResult::new("o", "shmem", "4k-staged", "loopback", "random");
        record_guest_stalls(d.path(), &mut old, &GuestOutput::default(), &[2]).unwrap();
        assert_eq!(
            (old.guest_stall_us.count, old.guest_stall_threshold_us),
            (0, None)
        );
        assert!(!old.histograms.contains_key(kind::GUEST_STALL));
    }

    #[test]
    fn destination_timing_is_recorded_when_present() {
        let st = DestinationStats::parse(
            r#"{"postcopy_vcpu_blocktime_ms":[12.5],"fault_phase_us":{"stored":{"count":3,"p50":1.0,"p90":1.0,"p99":2.0,"p999":2.0,"max":2.0,"mean":1.2}},"slow_faults":[{"total_us":900.0,"phases_us":{"stored":2.0,"reply_read":800.0}}]}"#,
        )
        .unwrap();
        let mut r = ScenarioResult::new("s", "shmem", "4k-staged", "loopback", "random");
        record_destination_timing(&mut r, &st);
        assert_eq!(r.blocktime_ms, vec![12.5]);
        assert_eq!(r.vmm_vcpu_blocktime_ms, vec![12.5]);
        assert_eq!(r.fault_phase_us["stored"].count, 3);
        assert_eq!(
            r.fault_tail.as_ref().unwrap().most_dominant(),
            Some(("reply_read", 1))
        );
        // Older destinations (and QEMU, whose blocktime comes from query-migrate) give none.
        let mut q = ScenarioResult::new("q", "shmem", "qemu", "loopback", "random");
        q.peer_vcpu_blocktime_ms = vec![41.0];
        record_destination_timing(&mut q, &DestinationStats::default());
        assert_eq!(q.blocktime_ms, vec![41.0]);
        assert!(q.fault_phase_us.is_empty() && q.fault_tail.is_none());
    }

    #[test]
    fn merge_takes_the_median_of_scalars_so_one_outlier_does_not_move_them() {
        let runs: Vec<_> = [2.0, 4.0, 30.0]
            .iter()
            .map(|&b| run_dir(&[10_000], b))
            .collect();
        let out = tempfile::tempdir().unwrap();
        let inputs: Vec<PathBuf> = runs.iter().map(|d| d.path().to_path_buf()).collect();
        let m = merge_dirs(&inputs, out.path()).unwrap();
        // The mean would be 12 ms.
        assert_eq!(m.scenarios[0].blackout_ms, Some(4.0));
    }

    #[test]
    fn merge_adds_histograms_and_takes_medians_of_scalars() {
        let a = run_dir(&[10_000, 20_000], 2.0);
        let b = run_dir(&[30_000, 40_000, 50_000], 4.0);
        let out = tempfile::tempdir().unwrap();
        let m = merge_dirs(&[a.path().into(), b.path().into()], out.path()).unwrap();
        let s = &m.scenarios[0];
        assert_eq!(s.runs, 2);
        assert_eq!(s.fault_us.count, 5);
        assert!(
            (s.fault_us.p50 - 30.0).abs() < 0.1,
            "p50 {}",
            s.fault_us.p50
        );
        assert_eq!(s.blackout_ms, Some(3.0));
        assert_eq!(s.faults_served, Some(5));
        let again = Results::load(out.path()).unwrap();
        assert_eq!(again.scenarios[0].fault_us.count, 5);
    }
}
