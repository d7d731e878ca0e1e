//! Live statistics of a migration, readable at any moment from another thread, with QEMU's
//! `query-migrate` names; the events a migration emits; and the token bucket that caps the
//! sender's bandwidth.
//!
//! The source publishes through [`crate::source::MigrationControl::info`], the destination
//! through [`ReceiveMonitor::info`]; the destination's postcopy engine adds its own figures
//! ([`EngineLive`]: per-vCPU blocktime, fault latency distribution, collapses, staging).
//! Everything the hot paths touch is an atomic; the rest sits behind short mutexes taken at
//! phase changes and round ends only.

use crate::sync::MutexExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::types::{Mode, PAGE_SIZE};
use crate::vocab::vocabulary;

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

vocabulary! {
    /// Where a migration is, with QEMU's `MigrationStatus` names ("postcopy-active"), which it
    /// also serializes as. The code is how [`MigrationStatus`] sits in an atomic.
    #[derive(Default)]
    pub enum MigrationStatus: u8, "migration status" {
        /// No migration ran yet.
        #[default]
        None = "none" => 0,
        /// Connecting, authenticating, exchanging Config and Ready (destination: waiting for and
        /// accepting the source).
        Setup = "setup" => 1,
        /// Precopy rounds (hybrid's too); destination: receiving them.
        Active = "active" => 2,
        /// The switchover: the VM is paused on the source and its state on its way.
        Device = "device" => 3,
        /// The VM runs on the destination while missing pages are fetched.
        PostcopyActive = "postcopy-active" => 4,
        /// The link failed after the switchover; both sides wait for it to come back.
        PostcopyPaused = "postcopy-paused" => 5,
        Completed = "completed" => 6,
        Failed = "failed" => 7,
        Cancelled = "cancelled" => 8,
    }
}

impl MigrationStatus {
    /// Whether the migration is over (completed, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// RAM figures of [`MigrationInfo`] (QEMU's `MigrationStats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamInfo {
    /// Bytes on the wire (both channels, frame headers included). Destination: bytes read on
    /// the main channel plus the page payload of the urgent replies.
    pub transferred: u64,
    /// Bytes still to send (source: the current round's pages not yet sent, or in postcopy the
    /// pages the destination does not hold yet) or to receive (destination: an estimate,
    /// guest RAM minus the pages received so far).
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Pages sent (received) as zero runs.
    pub duplicate: u64,
    /// Pages sent (received) with their data; every send counts (a re-sent dirty page twice).
    pub normal: u64,
    /// `normal` × 4096.
    pub normal_bytes: u64,
    /// Recent throughput (about the last second), megabits per second; after the end, the
    /// average over the whole migration.
    pub mbps: f64,
    /// Recent pages (data and zero) per second, like `mbps`.
    pub pages_per_second: f64,
    /// Precopy rounds finished (the full first pass counts as one).
    pub dirty_sync_count: u64,
    /// Pages dirtied per second during the last precopy round.
    pub dirty_pages_rate: u64,
    /// Pages requested on the urgent channel (source: requests answered; destination: replies
    /// received).
    pub postcopy_requests: u64,
}

/// A migration's live statistics (QEMU's `MigrationInfo`, serialized with its names).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Milliseconds since the migration started (source: `migrate` called; destination: the
    /// source accepted); frozen at the end.
    pub total_time: u64,
    /// Milliseconds of setup (source: until the destination's Ready; destination: accepting
    /// the source until Ready sent).
    pub setup_time: u64,
    /// Milliseconds the VM ran nowhere, once known. Source: vCPUs paused → the destination's
    /// Started. Destination: the source's State received → vCPUs started here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Source, precopy: the pages dirty after the last round at the measured bandwidth, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    pub ram: RamInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Times the link failed after the switchover and came back.
    pub recoveries: u64,
    /// Milliseconds spent postcopy-paused in all (the current pause included).
    pub paused_time: u64,
    /// Destination: ms during which every vCPU was blocked in a userfault at once (QEMU's
    /// `postcopy-blocktime`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u64>,
    /// Destination: ms each vCPU (by index) was blocked in userfaults, resolved faults only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub postcopy_vcpu_blocktime: Vec<u64>,
    /// Destination: mean µs of a served fault (userfault read → page mapped and woken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_latency: Option<u64>,
    /// Destination: bucket `i` counts served faults of `[2^i, 2^(i+1))` µs (bucket 0 also
    /// those under 1 µs); trailing empty buckets are left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub postcopy_latency_dist: Vec<u64>,
    /// Destination: huge-page units collapsed (successfully) so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapses_done: Option<u64>,
    /// Destination: units that still need a collapse (arrived or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapses_pending: Option<u64>,
    /// Destination: staging memory in use, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging_bytes: Option<u64>,
}

impl MigrationInfo {
    /// Add a postcopy engine's live figures.
    pub fn merge_engine(&mut self, engine: &EngineLive) {
        let lat = engine.latency();
        self.postcopy_blocktime = Some(engine.all_blocked_ns() / 1_000_000);
        self.postcopy_vcpu_blocktime = engine
            .vcpu_blocked_ns()
            .into_iter()
            .map(|ns| ns / 1_000_000)
            .collect();
        self.postcopy_latency = Some(lat.mean_us);
        self.postcopy_latency_dist = lat.dist;
        self.collapses_done = Some(engine.collapses_done.load(Ordering::Relaxed));
        self.collapses_pending = Some(engine.collapses_pending());
        self.staging_bytes = Some(engine.staging_pages.load(Ordering::Relaxed) * PAGE_SIZE);
    }
}

/// An event of a migration (serialized `{"event": "postcopy-active", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MigrationEvent {
    /// `mode` as the CLI spells it: "precopy", "postcopy", "hybrid".
    Started {
        mode: Mode,
    },
    PostcopyActive,
    PostcopyPaused {
        reason: String,
    },
    Recovered {
        attempt: u64,
        paused_ms: u64,
    },
    /// Destination: one huge-page unit collapsed (from the collapse thread).
    UnitCollapsed {
        gpa: u64,
        bytes: u64,
        method: String,
        stall_ns: u64,
    },
    Completed {
        total_ms: u64,
        downtime_ms: Option<u64>,
    },
    Failed {
        error: String,
    },
    Cancelled,
}

/// Where events go. `emit` must be cheap and must not block (e.g. push to a channel that a
/// writer thread drains): it is called from the migration's threads, the collapse thread
/// included.
pub trait EventSink: Send + Sync {
    fn emit(&self, e: MigrationEvent);
}

impl std::fmt::Debug for dyn EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// Collects events in memory (tests, and anyone who polls).
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<MigrationEvent>>,
}

impl EventLog {
    /// The events so far, oldest first.
    pub fn events(&self) -> Vec<MigrationEvent> {
        self.events.lock_unpoisoned().clone()
    }
}

impl EventSink for EventLog {
    fn emit(&self, e: MigrationEvent) {
        self.events.lock_unpoisoned().push(e);
    }
}

pub(crate) fn emit(sink: &Option<Arc<dyn EventSink>>, e: MigrationEvent) {
    if let Some(s) = sink {
        s.emit(e);
    }
}

/// Throughput over roughly the last second, from samples taken when someone reads the figures.
#[derive(Debug, Default)]
struct RateWindow {
    /// (when, bytes, pages) at the start of the window and at the last rotation.
    prev: Option<(Instant, u64, u64)>,
    cur: Option<(Instant, u64, u64)>,
}

impl RateWindow {
    /// (mbps, pages/s) up to `now`.
    fn sample(&mut self, now: Instant, bytes: u64, pages: u64, since: Instant) -> (f64, f64) {
        let cur = *self.cur.get_or_insert((since, 0, 0));
        if now.saturating_duration_since(cur.0) >= Duration::from_millis(500) {
            self.prev = Some(cur);
            self.cur = Some((now, bytes, pages));
        }
        let (t, b, p) = self.prev.unwrap_or((since, 0, 0));
        rates(
            now.saturating_duration_since(t),
            bytes - b.min(bytes),
            pages - p.min(pages),
        )
    }
}

fn rates(d: Duration, bytes: u64, pages: u64) -> (f64, f64) {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return (0.0, 0.0);
    }
    (bytes as f64 * 8.0 / 1e6 / s, pages as f64 / s)
}

/// Everything about one migration's clock and phases that is not a hot counter.
#[derive(Debug, Default)]
pub(crate) struct Phases {
    pub status: MigrationStatus,
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
    pub setup_ms: u64,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub error: Option<String>,
    pub recoveries: u64,
    pub paused: Duration,
    pub paused_since: Option<Instant>,
    pub rounds: u64,
    pub dirty_rate: u64,
    pub total_pages: u64,
    /// Source: the switchover is past the point of no return (cancel is refused).
    pub committed: bool,
    rate: RateWindow,
}

impl Phases {
    pub fn begin(&mut self, status: MigrationStatus) {
        *self = Phases {
            status,
            started: Some(Instant::now()),
            ..Phases::default()
        };
    }

    pub fn elapsed(&self) -> Duration {
        match (self.started, self.ended) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            (Some(s), None) => s.elapsed(),
            _ => Duration::ZERO,
        }
    }

    pub fn pause_begins(&mut self) {
        self.status = MigrationStatus::PostcopyPaused;
        self.paused_since.get_or_insert_with(Instant::now);
    }

    /// The pause ended (recovered or not): returns how long it lasted.
    pub fn pause_ends(&mut self, recovered: bool) -> Duration {
        let d = self
            .paused_since
            .take()
            .map(|s| s.elapsed())
            .unwrap_or_default();
        self.paused += d;
        if recovered {
            self.recoveries += 1;
            self.status = MigrationStatus::PostcopyActive;
        }
        d
    }

    pub fn finish(&mut self, status: MigrationStatus, error: Option<String>) {
        if self.paused_since.is_some() {
            self.pause_ends(false);
        }
        self.status = status;
        self.error = error;
        self.ended.get_or_insert_with(Instant::now);
    }

    /// The common part of [`MigrationInfo`]; `bytes` and `pages` feed the throughput.
    pub fn info(&mut self, bytes: u64, pages: u64) -> MigrationInfo {
        let now = Instant::now();
        let (mbps, pps) = match (self.started, self.ended) {
            (Some(s), Some(e)) => rates(e.saturating_duration_since(s), bytes, pages),
            (Some(s), None) => self.rate.sample(now, bytes, pages, s),
            _ => (0.0, 0.0),
        };
        let paused = self.paused
            + self
                .paused_since
                .map(|s| now.saturating_duration_since(s))
                .unwrap_or_default();
        MigrationInfo {
            status: self.status,
            total_time: ms(self.elapsed()),
            setup_time: self.setup_ms,
            downtime: self.downtime_ms,
            expected_downtime: self.expected_downtime_ms,
            ram: RamInfo {
                transferred: bytes,
                total: self.total_pages * PAGE_SIZE,
                mbps,
                pages_per_second: pps,
                dirty_sync_count: self.rounds,
                dirty_pages_rate: self.dirty_rate,
                ..RamInfo::default()
            },
            error_desc: self.error.clone(),
            recoveries: self.recoveries,
            paused_time: ms(paused),
            ..MigrationInfo::default()
        }
    }
}

/// The receive side's live handle: create one (it is `Default`), give it to
/// [`crate::destination::Listener::accept_with`] (or set it on the
/// [`crate::destination::IncomingMigration`]), and read [`ReceiveMonitor::info`] from any
/// thread. The postcopy engine's figures join it on their own when the VMM's
/// [`crate::destination::PostcopySink::live`] returns them (or through
/// [`ReceiveMonitor::attach_engine`]).
#[derive(Default)]
pub struct ReceiveMonitor {
    phases: Mutex<Phases>,
    status: AtomicU8,
    pub(crate) bytes: AtomicU64,
    pub(crate) pages: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) requests: AtomicU64,
    state_at: Mutex<Option<Instant>>,
    engine: Mutex<Option<Arc<EngineLive>>>,
    urgent: Mutex<Option<Arc<crate::urgent_client::UrgentClient>>>,
    events: Mutex<Option<Arc<dyn EventSink>>>,
}

impl std::fmt::Debug for ReceiveMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveMonitor")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl ReceiveMonitor {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Send this receive's events (and, once attached, its engine's unit-collapsed events) to
    /// `sink`.
    pub fn set_event_sink(&self, sink: Arc<dyn EventSink>) {
        *self.events.lock_unpoisoned() = Some(sink);
    }

    /// Include a postcopy engine's live figures in [`ReceiveMonitor::info`]; the engine's
    /// events go to this monitor's sink if the engine has none.
    pub fn attach_engine(&self, engine: Arc<EngineLive>) {
        if let Some(sink) = self.events.lock_unpoisoned().clone() {
            engine.set_event_sink_if_none(sink);
        }
        *self.engine.lock_unpoisoned() = Some(engine);
    }

    /// The current status (one atomic load).
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_wire(self.status.load(Ordering::Acquire)).unwrap_or_default()
    }

    /// The live statistics.
    pub fn info(&self) -> MigrationInfo {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let pages = self.pages.load(Ordering::Relaxed);
        let zero = self.zero_pages.load(Ordering::Relaxed);
        let requests = match self.urgent.lock_unpoisoned().as_ref() {
            Some(u) => u.replies(),
            None => self.requests.load(Ordering::Relaxed),
        };
        let bytes = bytes + requests * PAGE_SIZE;
        let mut info = self
            .phases
            .lock_unpoisoned()
            .info(bytes, pages + zero + requests);
        info.ram.duplicate = zero;
        info.ram.normal = pages + requests;
        info.ram.normal_bytes = info.ram.normal * PAGE_SIZE;
        info.ram.postcopy_requests = requests;
        let got = pages + zero + requests;
        info.ram.remaining = (info.ram.total / PAGE_SIZE).saturating_sub(got) * PAGE_SIZE;
        if info.status == MigrationStatus::Completed {
            info.ram.remaining = 0;
        }
        if let Some(e) = self.engine.lock_unpoisoned().as_ref() {
            info.merge_engine(e);
        }
        info
    }

    pub(crate) fn emit(&self, e: MigrationEvent) {
        let sink = self.events.lock_unpoisoned().clone();
        emit(&sink, e);
    }

    fn set_status(&self, p: &mut Phases, s: MigrationStatus) {
        p.status = s;
        self.status.store(s.to_wire(), Ordering::Release);
    }

    /// Waiting for a source (status setup, the clock not running yet).
    pub(crate) fn waiting(&self) {
        self.accepting();
        self.phases.lock_unpoisoned().started = None;
    }

    /// A source was accepted (status setup, the clock runs from now).
    pub(crate) fn accepting(&self) {
        let mut p = self.phases.lock_unpoisoned();
        p.begin(MigrationStatus::Setup);
        self.set_status(&mut p, MigrationStatus::Setup);
        for c in [&self.bytes, &self.pages, &self.zero_pages, &self.requests] {
            c.store(0, Ordering::Relaxed);
        }
        *self.state_at.lock_unpoisoned() = None;
        *self.engine.lock_unpoisoned() = None;
        *self.urgent.lock_unpoisoned() = None;
    }

    /// The urgent client of this receive (its replies are the postcopy requests).
    pub(crate) fn attach_urgent(&self, client: Arc<crate::urgent_client::UrgentClient>) {
        *self.urgent.lock_unpoisoned() = Some(client);
    }

    /// The source's Config arrived: guest RAM is `total_pages` pages.
    pub(crate) fn config_known(&self, total_pages: u64) {
        self.phases.lock_unpoisoned().total_pages = total_pages;
    }

    /// Ready went out: precopy (or postcopy's wait for the switchover) begins.
    pub(crate) fn ready(&self, mode: Mode, total_pages: u64) {
        {
            let mut p = self.phases.lock_unpoisoned();
            if p.started.is_none() {
                p.begin(MigrationStatus::Setup);
            }
            p.setup_ms = ms(p.elapsed());
            p.total_pages = total_pages;
            self.set_status(&mut p, MigrationStatus::Active);
        }
        self.emit(MigrationEvent::Started { mode });
    }

    pub(crate) fn round_received(&self) {
        self.phases.lock_unpoisoned().rounds += 1;
    }

    pub(crate) fn state_received(&self) {
        self.state_at
            .lock_unpoisoned()
            .get_or_insert_with(Instant::now);
    }

    /// The vCPUs started here.
    pub(crate) fn vm_started(&self, postcopy: bool) {
        let since = *self.state_at.lock_unpoisoned();
        {
            let mut p = self.phases.lock_unpoisoned();
            p.downtime_ms = since.map(|s| ms(s.elapsed()));
            if postcopy {
                self.set_status(&mut p, MigrationStatus::PostcopyActive);
            }
        }
        if postcopy {
            self.emit(MigrationEvent::PostcopyActive);
        }
    }

    pub(crate) fn paused(&self, reason: String) {
        {
            let mut p = self.phases.lock_unpoisoned();
            p.pause_begins();
            self.set_status(&mut p, MigrationStatus::PostcopyPaused);
        }
        self.emit(MigrationEvent::PostcopyPaused { reason });
    }

    pub(crate) fn recovered(&self, postcopy: bool) {
        let (attempt, d) = {
            let mut p = self.phases.lock_unpoisoned();
            let d = p.pause_ends(true);
            let s = if postcopy {
                MigrationStatus::PostcopyActive
            } else {
                MigrationStatus::Active
            };
            self.set_status(&mut p, s);
            (p.recoveries, d)
        };
        self.emit(MigrationEvent::Recovered {
            attempt,
            paused_ms: ms(d),
        });
    }

    pub(crate) fn finished(&self, error: Option<String>) {
        let (total_ms, downtime_ms) = {
            let mut p = self.phases.lock_unpoisoned();
            let s = if error.is_some() {
                MigrationStatus::Failed
            } else {
                MigrationStatus::Completed
            };
            p.finish(s, error.clone());
            self.set_status(&mut p, s);
            if let Some(u) = self.urgent.lock_unpoisoned().take() {
                // Keep the final count, drop the client.
                self.requests.store(u.replies(), Ordering::Relaxed);
            }
            (ms(p.elapsed()), p.downtime_ms)
        };
        self.emit(match error {
            Some(error) => MigrationEvent::Failed { error },
            None => MigrationEvent::Completed {
                total_ms,
                downtime_ms,
            },
        });
    }
}

/// Number of power-of-two latency buckets (2^31 µs is over half an hour).
const LATENCY_BUCKETS: usize = 32;

/// The latency figures of [`EngineLive::latency`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyDist {
    pub count: u64,
    pub mean_us: u64,
    /// Bucket `i`: faults of `[2^i, 2^(i+1))` µs (bucket 0 also under 1 µs), trailing zeros cut.
    pub dist: Vec<u64>,
}

/// Bucket of a latency of `ns` nanoseconds.
fn latency_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    if us < 2 {
        return 0;
    }
    ((63 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

/// The vCPU threads and their blocked state.
#[derive(Debug, Default)]
struct VcpuTable {
    /// Thread id of each vCPU (index = vCPU index).
    tids: Vec<i32>,
    /// Per vCPU: 1 + ns since the epoch at which it blocked (0: not blocked).
    since: Vec<AtomicU64>,
    /// Per vCPU: blocked ns accumulated over resolved faults.
    blocked_ns: Vec<AtomicU64>,
}

/// A postcopy engine's live figures, cheap to read from any thread
/// ([`crate::postcopy::PostcopyEngine::live`]). The fault service updates them with a few
/// relaxed atomics per fault.
#[derive(Debug)]
pub struct EngineLive {
    epoch: Instant,
    vcpus: Mutex<Arc<VcpuTable>>,
    blocked_count: AtomicU64,
    all_since: AtomicU64,
    all_ns: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_ns: AtomicU64,
    latency_count: AtomicU64,
    pub(crate) collapses_done: AtomicU64,
    /// Units that need a collapse in all, and units settled (collapsed, skipped or failed).
    pub(crate) units_to_collapse: AtomicU64,
    pub(crate) units_settled: AtomicU64,
    pub(crate) staging_pages: AtomicU64,
    /// Slot → region gpa (for unit-collapsed events).
    pub(crate) slot_gpa: Mutex<Vec<(u32, u64)>>,
    events: Mutex<Option<Arc<dyn EventSink>>>,
    has_events: AtomicBool,
}

impl Default for EngineLive {
    fn default() -> Self {
        EngineLive {
            epoch: Instant::now(),
            vcpus: Mutex::default(),
            blocked_count: AtomicU64::new(0),
            all_since: AtomicU64::new(0),
            all_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            collapses_done: AtomicU64::new(0),
            units_to_collapse: AtomicU64::new(0),
            units_settled: AtomicU64::new(0),
            staging_pages: AtomicU64::new(0),
            slot_gpa: Mutex::default(),
            events: Mutex::default(),
            has_events: AtomicBool::new(false),
        }
    }
}

impl EngineLive {
    /// The vCPU threads' ids (from `gettid()`, index = vCPU index): faults from these threads
    /// count as vCPU blocktime; faults from any other thread (the VMM itself) do not. Set it
    /// before the vCPUs run; setting it again resets the blocktime figures.
    pub fn set_vcpu_tids(&self, tids: Vec<i32>) {
        let n = tids.len();
        *self.vcpus.lock_unpoisoned() = Arc::new(VcpuTable {
            tids,
            since: (0..n).map(|_| AtomicU64::new(0)).collect(),
            blocked_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
        });
        self.blocked_count.store(0, Ordering::Relaxed);
        self.all_since.store(0, Ordering::Relaxed);
        self.all_ns.store(0, Ordering::Relaxed);
    }

    /// Send unit-collapsed events to `sink`.
    pub fn set_event_sink(&self, sink: Arc<dyn EventSink>) {
        *self.events.lock_unpoisoned() = Some(sink);
        self.has_events.store(true, Ordering::Release);
    }

    fn set_event_sink_if_none(&self, sink: Arc<dyn EventSink>) {
        let mut e = self.events.lock_unpoisoned();
        if e.is_none() {
            *e = Some(sink);
            self.has_events.store(true, Ordering::Release);
        }
    }

    pub(crate) fn emit(&self, e: MigrationEvent) {
        if self.has_events.load(Ordering::Acquire) {
            let sink = self.events.lock_unpoisoned().clone();
            emit(&sink, e);
        }
    }

    /// vCPU index of thread `tid`, if it is a vCPU's.
    pub fn vcpu_of(&self, tid: i32) -> Option<usize> {
        if tid <= 0 {
            return None;
        }
        self.vcpus
            .lock_unpoisoned()
            .tids
            .iter()
            .position(|&t| t == tid)
    }

    /// A userfault of thread `tid` was read at `at`: if `tid` is a vCPU's, it is blocked from
    /// then on; returns its index.
    pub(crate) fn fault_read(&self, tid: i32, at: Instant) -> Option<usize> {
        if tid <= 0 {
            return None;
        }
        let table = self.vcpus.lock_unpoisoned().clone();
        let vcpu = table.tids.iter().position(|&t| t == tid)?;
        self.block(&table, vcpu, at);
        Some(vcpu)
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// vCPU `vcpu` blocked in a userfault read at `at`.
    #[cfg(test)]
    fn vcpu_blocked(&self, vcpu: usize, at: Instant) {
        let table = self.vcpus.lock_unpoisoned().clone();
        self.block(&table, vcpu, at);
    }

    fn block(&self, table: &VcpuTable, vcpu: usize, at: Instant) {
        let Some(slot) = table.since.get(vcpu) else {
            return;
        };
        let t = self.stamp(at);
        if slot.swap(t, Ordering::AcqRel) == 0 {
            let n = table.since.len() as u64;
            if self.blocked_count.fetch_add(1, Ordering::AcqRel) + 1 == n {
                self.all_since.store(t, Ordering::Release);
            }
        }
    }

    /// vCPU `vcpu`'s fault was resolved (woken) at `at`.
    pub(crate) fn vcpu_woken(&self, vcpu: usize, at: Instant) {
        let table = self.vcpus.lock_unpoisoned().clone();
        let Some(slot) = table.since.get(vcpu) else {
            return;
        };
        let s = slot.swap(0, Ordering::AcqRel);
        if s == 0 {
            return;
        }
        let t = self.stamp(at);
        if let Some(acc) = table.blocked_ns.get(vcpu) {
            acc.fetch_add(t.saturating_sub(s), Ordering::Relaxed);
        }
        let n = table.since.len() as u64;
        if self.blocked_count.fetch_sub(1, Ordering::AcqRel) == n {
            // Taken (0: none), so a stretch whose start another thread has not stored yet
            // counts nothing rather than reaching back to an older one.
            let all = self.all_since.swap(0, Ordering::AcqRel);
            if all != 0 {
                self.all_ns
                    .fetch_add(t.saturating_sub(all), Ordering::Relaxed);
            }
        }
    }

    /// One served fault took `ns`.
    pub(crate) fn fault_latency(&self, ns: u64) {
        self.buckets[latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Blocked ns of each vCPU (resolved faults).
    pub fn vcpu_blocked_ns(&self) -> Vec<u64> {
        self.vcpus
            .lock_unpoisoned()
            .blocked_ns
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// ns during which every vCPU was blocked at once (ended stretches only).
    pub fn all_blocked_ns(&self) -> u64 {
        self.all_ns.load(Ordering::Relaxed)
    }

    /// Fault latency: count, mean and power-of-two µs distribution.
    pub fn latency(&self) -> LatencyDist {
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_sum_ns.load(Ordering::Relaxed);
        let mut dist: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        while dist.last() == Some(&0) {
            dist.pop();
        }
        LatencyDist {
            count,
            mean_us: sum.checked_div(count).unwrap_or(0) / 1000,
            dist,
        }
    }

    /// Units still to collapse.
    pub fn collapses_pending(&self) -> u64 {
        self.units_to_collapse
            .load(Ordering::Relaxed)
            .saturating_sub(self.units_settled.load(Ordering::Relaxed))
    }

    /// Collapses that succeeded so far.
    pub fn collapses_done(&self) -> u64 {
        self.collapses_done.load(Ordering::Relaxed)
    }

    /// Staging memory in use, bytes.
    pub fn staging_bytes(&self) -> u64 {
        self.staging_pages.load(Ordering::Relaxed) * PAGE_SIZE
    }
}

/// A token bucket capping a sender's bytes per second: [`TokenBucket::consume`] sleeps the
/// calling thread (never spins) until the bytes sent so far fit the rate, in slices short
/// enough to notice an abort. Its burst is a few full Pages frames, so one frame never waits
/// for more than the bucket can hold.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// Longest single sleep of the bucket (an abort is seen within this).
const BUCKET_SLICE: Duration = Duration::from_millis(5);

impl TokenBucket {
    /// A bucket for `rate` bytes per second (0 is taken as 1).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        // A few frames (256 pages each), or 50 ms of the rate, whichever is more.
        let burst = (4.0 * 256.0 * 4096.0_f64).max(rate / 20.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// The burst: bytes that may go out at once after a pause.
    #[cfg(test)]
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// `bytes` were sent: sleep until the bucket is no longer in debt. `abort` is asked between
    /// sleeps; if it returns an error, that is returned at once.
    pub fn consume<E>(
        &mut self,
        bytes: u64,
        mut abort: impl FnMut() -> Result<(), E>,
    ) -> Result<(), E> {
        self.refill();
        self.tokens -= bytes as f64;
        while self.tokens < 0.0 {
            abort()?;
            let wait = Duration::from_secs_f64(-self.tokens / self.rate).min(BUCKET_SLICE);
            std::thread::sleep(wait);
            self.refill();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_qemus() {
        let mut info = MigrationInfo {
            status: MigrationStatus::PostcopyActive,
            postcopy_blocktime: Some(1),
            postcopy_vcpu_blocktime: vec![1, 2],
            postcopy_latency: Some(3),
            postcopy_latency_dist: vec![0, 1],
            expected_downtime: Some(4),
            ..MigrationInfo::default()
        };
        info.ram.pages_per_second = 1.0;
        let v = serde_json::to_value(&info).unwrap_or_default();
        for key in [
            "status",
            "total-time",
            "setup-time",
            "expected-downtime",
            "postcopy-blocktime",
            "postcopy-vcpu-blocktime",
            "postcopy-latency",
            "postcopy-latency-dist",
            "paused-time",
            "recoveries",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        for key in [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "mbps",
            "pages-per-second",
            "dirty-sync-count",
            "dirty-pages-rate",
            "postcopy-requests",
        ] {
            assert!(v["ram"].get(key).is_some(), "ram.{key} missing in {v}");
        }
        assert_eq!(v["status"], "postcopy-active");
        let back: MigrationInfo = serde_json::from_value(v).unwrap_or_default();
        assert_eq!(back, info);
        let e = serde_json::to_value(MigrationEvent::PostcopyPaused { reason: "x".into() })
            .unwrap_or_default();
        assert_eq!(e["event"], "postcopy-paused");
        assert_eq!(e["reason"], "x");
        let e = serde_json::to_value(MigrationEvent::Started {
            mode: Mode::Postcopy,
        })
        .unwrap_or_default();
        assert_eq!(
            e,
            serde_json::json!({"event": "started", "mode": "postcopy"})
        );
    }

    #[test]
    fn status_round_trips_through_u8() {
        for s in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::from_wire(s.to_wire()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
        }
        assert_eq!(MigrationStatus::PostcopyActive.name(), "postcopy-active");
    }

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1_999), 0);
        assert_eq!(latency_bucket(2_000), 1);
        assert_eq!(latency_bucket(3_999), 1);
        assert_eq!(latency_bucket(4_000), 2);
        assert_eq!(latency_bucket(1_000_000), 9); // 1000 µs in [512, 1024)
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let e = EngineLive::default();
        e.fault_latency(3_000);
        e.fault_latency(5_000);
        let l = e.latency();
        assert_eq!(l.count, 2);
        assert_eq!(l.mean_us, 4);
        assert_eq!(l.dist, vec![0, 1, 1]);
    }

    #[test]
    fn blocktime_counts_per_vcpu_and_all_at_once() {
        let e = EngineLive::default();
        e.set_vcpu_tids(vec![100, 101]);
        assert_eq!(e.vcpu_of(101), Some(1));
        assert_eq!(e.vcpu_of(7), None);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        e.vcpu_blocked(0, ms(0));
        e.vcpu_blocked(1, ms(10)); // both blocked from 10
        e.vcpu_woken(0, ms(30)); // ... to 30
        e.vcpu_woken(1, ms(40));
        e.vcpu_woken(1, ms(50)); // not blocked: ignored
        assert_eq!(e.vcpu_blocked_ns(), vec![30_000_000, 30_000_000]);
        assert_eq!(e.all_blocked_ns(), 20_000_000);
    }

    #[test]
    fn token_bucket_limits_the_rate() {
        let rate = 20 << 20; // 20 MiB/s
        let mut b = TokenBucket::new(rate);
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < 6 << 20 {
            b.consume(256 * 4096, || Ok::<(), ()>(())).unwrap_or(());
            sent += 256 * 4096;
        }
        let secs = t.elapsed().as_secs_f64();
        let allowed = rate as f64 * secs * 1.1 + b.burst() as f64 + (256 * 4096) as f64;
        assert!(sent as f64 <= allowed, "{sent} bytes in {secs} s");
        assert!(secs < 2.0, "too slow: {secs} s for 6 MiB at 20 MiB/s");
    }
}
