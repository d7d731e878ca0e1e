//! Source-side protocol driver: precopy rounds, switchover, and the postcopy bulk push (which
//! moves on to the pages near the latest fault) beside the urgent page server.

use crate::sync::MutexExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

mod holes;
use holes::RegionHoles;

use crate::auth::Secret;
use crate::live_stats::{
    self, EventSink, MigrationEvent, MigrationInfo, MigrationStatus, Phases, TokenBucket,
};
use crate::liveness::{Heartbeat, SharedWriter};
use crate::stats::{MigrationSummary, SourceCounters};
use crate::thread_priority::{self, ThreadRole};
use crate::tls::ClientTls;
use crate::transport::{self, Channel, LiveChannel, Timeouts, TransportError};
use crate::types::{
    AtomicPageSet, Backing, DirtyLog, HookError, LayoutError, Mode, PageSet, RamLayout, RamRegion,
    PAGE_SIZE,
};
use crate::wire::{
    self, check_run, DoneStats, ErrorCode, FrameReader, FrameWriter, Kind, Message,
    MigrationConfig, WireError, MAX_PAGES_PER_FRAME, MAX_RUN_PAGES, MAX_STATE_BYTES,
};

/// The VM being migrated away, as the source driver needs it (the VMM implements this).
pub trait SourceVm {
    /// Guest RAM. Every `host_addr..host_addr+size` must stay mapped and readable until
    /// `migrate` returns.
    fn ram_regions(&self) -> Vec<RamRegion>;
    /// Dirty tracking of guest writes (per memslot).
    fn dirty_log(&self) -> &dyn DirtyLog;
    fn vcpu_count(&self) -> u32;
    /// Stop every vCPU (returns once none runs guest code) and keep devices from writing RAM.
    fn pause(&self) -> Result<(), HookError>;
    /// Let the vCPUs run again after a failed switchover.
    fn resume(&self) -> Result<(), HookError>;
    /// Device and vCPU state, taken while paused (at most 64 MiB).
    fn save_state(&self) -> Result<Vec<u8>, HookError>;
}

/// How to migrate.
#[derive(Debug)]
pub struct MigrateOptions {
    pub mode: Mode,
    /// Shared secret (the HMAC handshake; inside TLS when both are given).
    pub secret: Option<Secret>,
    /// TLS 1.3 with mutual certificates on both channels (recoveries included). Without it a
    /// non-loopback destination needs a secret and `allow_plaintext`.
    pub tls: Option<ClientTls>,
    /// Allow plaintext (with a secret) to a non-loopback destination.
    pub allow_plaintext: bool,
    pub timeouts: Timeouts,
    /// Precopy stops iterating once the remaining dirty pages would take this long to send at
    /// the measured bandwidth (QEMU's `downtime-limit`).
    pub downtime_target: Duration,
    /// Most precopy rounds (the full pass included) before stopping anyway.
    pub max_rounds: u32,
    /// Precopy rounds (the full pass included) hybrid runs before it switches to postcopy.
    pub hybrid_rounds: u32,
    /// Announce all-zero pages as zero runs instead of sending their bytes.
    pub zero_runs: bool,
    /// Cap of the precopy rounds (precopy, and hybrid's rounds), bytes per second (QEMU's
    /// `max-bandwidth`); None: unlimited. The stop-and-copy inside the blackout is not capped.
    pub precopy_bandwidth: Option<u64>,
    /// Cap of the postcopy background push, bytes per second (QEMU's
    /// `max-postcopy-bandwidth`); the urgent channel's page replies are never capped.
    pub postcopy_bandwidth: Option<u64>,
    /// Bound of connecting, precopy and the switchover up to the point of no return: past it
    /// the migration fails with [`SourceError::Timeout`] and the VM runs on here, as after a
    /// cancel. Once the destination may run the VM nothing is abandoned: postcopy and recovery
    /// keep their own bounds (`timeouts.setup`, `timeouts.recover`).
    pub timeout: Option<Duration>,
    /// Where migration events go.
    pub events: Option<Arc<dyn EventSink>>,
    /// Shared with whoever controls the migration (the VMM's API): live statistics, cancel,
    /// where to reconnect after a link failure, and what phase the migration is in.
    pub control: Arc<MigrationControl>,
}

/// Why [`MigrationControl::cancel`] refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CancelError {
    #[error("no migration is running")]
    NotRunning,
    #[error("the migration is past the switchover: the destination runs the VM (or may), so the source cannot take it back; it completes or fails there")]
    PastSwitchover,
}

/// A running migration's handle for its controller: live statistics, cancel, the phase, and
/// where recovery reconnects. One per migration (a new `migrate` resets it).
#[derive(Debug, Default)]
pub struct MigrationControl {
    target: Mutex<Option<SocketAddr>>,
    phase: Mutex<Option<Phase>>,
    counters: SourceCounters,
    phases: Mutex<Phases>,
    /// Pages of the current round not sent yet, or (postcopy) not held by the destination.
    remaining_pages: AtomicU64,
    /// Cancel asked (checked by the send loop; set only before the point of no return).
    cancel: AtomicBool,
    /// Why the VM stopped, when it stopped on its own before the switchover (set with
    /// `cancel`, see [`MigrationControl::vm_stopped`]).
    vm_stopped: Mutex<Option<String>>,
}

impl MigrationControl {
    /// Reconnect to `addr` (from the next recovery attempt on) instead of the address the
    /// migration started with, e.g. over a different network path.
    pub fn retarget(&self, addr: SocketAddr) {
        *self.target.lock_unpoisoned() = Some(addr);
    }

    /// Where recovery reconnects, if retargeted.
    pub fn target(&self) -> Option<SocketAddr> {
        *self.target.lock_unpoisoned()
    }

    /// The phase the migration is in (None: not started or over).
    pub fn phase(&self) -> Option<Phase> {
        *self.phase.lock_unpoisoned()
    }

    fn set_phase(&self, phase: Option<Phase>) {
        *self.phase.lock_unpoisoned() = phase;
        if let Some(p) = phase {
            let mut ph = self.phases.lock_unpoisoned();
            // Terminal states are set by `finish` only; a pause is ended by recover().
            if !ph.status.is_terminal() && ph.paused_since.is_none() {
                ph.status = p.status();
            }
        }
    }

    /// The live statistics (also after the end: the final figures and the outcome).
    pub fn info(&self) -> MigrationInfo {
        let c = &self.counters;
        let bytes = SourceCounters::get(&c.bytes_sent);
        let normal = SourceCounters::get(&c.pages_sent);
        let zero = SourceCounters::get(&c.zero_pages);
        let mut info = self.phases.lock_unpoisoned().info(bytes, normal + zero);
        info.ram.duplicate = zero;
        info.ram.normal = normal;
        info.ram.normal_bytes = normal * PAGE_SIZE;
        info.ram.postcopy_requests = SourceCounters::get(&c.faults_served);
        info.ram.remaining = if info.status == MigrationStatus::Completed {
            0
        } else {
            self.remaining_pages.load(Ordering::Relaxed) * PAGE_SIZE
        };
        info
    }

    /// Cancel the migration. Before the switchover's point of no return `migrate` then returns
    /// [`SourceError::Cancelled`] within a few milliseconds (one page batch of the send loop,
    /// a connect or Ready wait's poll tick), tells the destination with an Error frame if the
    /// channel is up, and leaves the VM running here. After it the destination runs the VM
    /// (or may), and cancel is refused.
    pub fn cancel(&self) -> Result<(), CancelError> {
        self.end_before_switchover(None)
    }

    /// The VM stopped on its own (`why`: the guest exited, crashed or reset): there is nothing
    /// left to hand over. Before the point of no return the migration then ends as a cancel
    /// would (within milliseconds, telling the destination), with [`SourceError::VmStopped`];
    /// after it, this is refused like a cancel (the VM was paused then and cannot stop).
    pub fn vm_stopped(&self, why: String) -> Result<(), CancelError> {
        self.end_before_switchover(Some(why))
    }

    /// Ends the migration at its next check, unless it is not running or past its point of no
    /// return; `vm_stopped` says why, if the VM stopped.
    fn end_before_switchover(&self, vm_stopped: Option<String>) -> Result<(), CancelError> {
        let p = self.phases.lock_unpoisoned();
        if p.status == MigrationStatus::None || p.status.is_terminal() {
            return Err(CancelError::NotRunning);
        }
        if p.committed {
            return Err(CancelError::PastSwitchover);
        }
        if vm_stopped.is_some() {
            *self.vm_stopped.lock_unpoisoned() = vm_stopped;
        }
        self.cancel.store(true, Ordering::Release);
        Ok(())
    }

    fn begin(&self, total_pages: u64) {
        let mut p = self.phases.lock_unpoisoned();
        p.begin(MigrationStatus::Setup);
        p.total_pages = total_pages;
        drop(p);
        self.counters.reset();
        self.cancel.store(false, Ordering::Release);
        *self.vm_stopped.lock_unpoisoned() = None;
        self.remaining_pages.store(total_pages, Ordering::Relaxed);
    }

    /// The switchover passes its point of no return: from now on cancel is refused. Fails if a
    /// cancel came first.
    fn commit(&self, deadline: Option<Instant>) -> Result<(), SourceError> {
        let mut p = self.phases.lock_unpoisoned();
        check_abort(self, deadline)?;
        p.committed = true;
        Ok(())
    }

    fn phases(&self) -> MutexGuard<'_, Phases> {
        self.phases.lock_unpoisoned()
    }
}

/// A cancel or the overall timeout: the error to abort with.
fn check_abort(control: &MigrationControl, deadline: Option<Instant>) -> Result<(), SourceError> {
    if control.cancel.load(Ordering::Acquire) {
        if let Some(why) = control.vm_stopped.lock_unpoisoned().clone() {
            return Err(SourceError::VmStopped(why));
        }
        return Err(SourceError::Cancelled);
    }
    if let Some(d) = deadline {
        if Instant::now() >= d {
            return Err(SourceError::Timeout);
        }
    }
    Ok(())
}

impl MigrateOptions {
    fn security(&self) -> transport::ClientSecurity<'_> {
        transport::ClientSecurity {
            secret: self.secret.as_ref(),
            tls: self.tls.as_ref(),
            allow_plaintext: self.allow_plaintext,
        }
    }

    fn emit(&self, e: MigrationEvent) {
        live_stats::emit(&self.events, e);
    }

    /// Defaults: no secret, default timeouts, 10 ms downtime target, 30 rounds, hybrid 3
    /// rounds, no bandwidth caps, no overall timeout, no events.
    pub fn new(mode: Mode) -> Self {
        MigrateOptions {
            mode,
            secret: None,
            tls: None,
            allow_plaintext: false,
            timeouts: Timeouts::default(),
            downtime_target: Duration::from_millis(10),
            max_rounds: 30,
            hybrid_rounds: 3,
            zero_runs: true,
            precopy_bandwidth: None,
            postcopy_bandwidth: None,
            timeout: None,
            events: None,
            control: Arc::default(),
        }
    }
}

/// Where the source is (serialized kebab-case: "postcopy-paused").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Connecting,
    Precopy,
    Switchover,
    Postcopy,
    /// The link failed after the switchover: the VM stays paused here and the source
    /// reconnects until the recover timeout.
    PostcopyPaused,
    Done,
}

impl Phase {
    /// The status this phase shows (QEMU's names; the one mapping of phases to statuses).
    pub fn status(self) -> MigrationStatus {
        match self {
            Phase::Connecting => MigrationStatus::Setup,
            Phase::Precopy => MigrationStatus::Active,
            Phase::Switchover => MigrationStatus::Device,
            Phase::Postcopy => MigrationStatus::PostcopyActive,
            Phase::PostcopyPaused => MigrationStatus::PostcopyPaused,
            Phase::Done => MigrationStatus::Completed,
        }
    }

    /// The phase's name as the API and the CLI show it (its [`Phase::status`]'s name).
    pub fn name(self) -> &'static str {
        self.status().name()
    }
}

/// A progress report (given at the end of each round and now and then during the push).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    pub total_pages: u64,
    /// Pages sent so far (data or zero, every send counts).
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Dirty pages found at the end of the last round.
    pub dirty_pages: u64,
    pub faults_served: u64,
}

/// Why a migration failed on the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("setting up the migration session with {addr} failed: {source}")]
    Session {
        addr: SocketAddr,
        #[source]
        source: TransportError,
    },
    #[error("the VM's RAM layout cannot be migrated: {0}")]
    Layout(#[from] LayoutError),
    #[error("RAM region slot {slot} has no host mapping of {size} bytes")]
    Region { slot: u32, size: u64 },
    #[error("{op} failed on the source VM: {source}")]
    Vm {
        op: &'static str,
        #[source]
        source: HookError,
    },
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A step of the driver found its own state broken (a bug, not a condition of the VM or
    /// the link).
    #[error("internal error of the source driver during {during}: {what}")]
    Internal {
        during: &'static str,
        what: &'static str,
    },
    #[error("device state is {len} bytes, more than the protocol allows ({MAX_STATE_BYTES})")]
    StateTooLarge { len: usize },
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    #[error("urgent page server: {0}")]
    UrgentServer(WireError),
    #[error("the destination had {missing} page(s) left after Complete")]
    Incomplete { missing: u64 },
    #[error("protocol violation by the destination: {0}")]
    Protocol(String),
    #[error("the link did not come back within {} s ({attempts} reconnect attempt(s){})", waited_ms / 1000, last.as_ref().map(|e| format!("; last: {e}")).unwrap_or_default())]
    RecoverTimeout {
        waited_ms: u64,
        attempts: u32,
        /// The last reconnect attempt's error (None if no attempt was made).
        #[source]
        last: Option<Box<SourceError>>,
    },
    /// The destination's Started did not echo the switchover frame's nonce: it was written
    /// before the switchover frame arrived (or forged). Refused; the source VM runs again.
    #[error("the destination sent Started with switchover nonce {got:#018x}, not the {sent:#018x} of the switchover frame: a Started not written in answer to it (refused; the source VM runs again)")]
    EarlyStarted { got: u64, sent: u64 },
    /// The switchover did not complete and the destination confirmed it never started the VM
    /// (or the switchover frame never left): the source runs the VM again.
    #[error("the switchover did not complete; the destination did not start the VM: {0}")]
    NotStarted(Box<SourceError>),
    /// The switchover frame may have reached the destination and it could not be asked
    /// whether it started the VM: the source VM stays paused.
    #[error("the switchover outcome is unknown: the destination may or may not run the VM, and could not be asked ({0}); the VM stays paused here: resume it with the API request {{\"cmd\":\"resume\",\"force\":true}} only if the destination surely does not run it")]
    OutcomeUnknown(Box<SourceError>),
    /// [`MigrationControl::cancel`] before the switchover: the VM runs on here.
    #[error("the migration was cancelled; the VM runs on here")]
    Cancelled,
    /// The VM stopped on its own before the switchover ([`MigrationControl::vm_stopped`]):
    /// nothing was handed over.
    #[error("the VM stopped during the migration ({0}); nothing was handed over")]
    VmStopped(String),
    /// [`MigrateOptions::timeout`] passed before the switchover: the VM runs on here.
    #[error("the migration did not reach the switchover within its overall timeout; the VM runs on here")]
    Timeout,
    /// The destination already runs the VM: the source stays paused and must not resume it.
    #[error("VM lost: the destination started the VM and the migration cannot be completed (the source's copy is stale and stays paused): {0}")]
    AfterStart(Box<SourceError>),
}

impl SourceError {
    /// Whether the destination confirmed it started the VM before the failure (then the source
    /// VM must stay paused).
    pub fn destination_started(&self) -> bool {
        matches!(self, SourceError::AfterStart(_))
    }

    /// Whether the source VM must stay paused: the destination runs it, or may.
    pub fn keeps_paused(&self) -> bool {
        matches!(
            self,
            SourceError::AfterStart(_) | SourceError::OutcomeUnknown(_)
        )
    }

    /// Whether the error is a failure of the link (reset, closed, silent), which the migration
    /// survives after the switchover by recovering.
    pub fn is_link_failure(&self) -> bool {
        match self {
            SourceError::Wire(e) | SourceError::UrgentServer(e) => e.is_link_failure(),
            SourceError::Session { source, .. } => source.is_link_failure(),
            _ => false,
        }
    }
}

fn vm_err(op: &'static str) -> impl FnOnce(HookError) -> SourceError {
    move |source| SourceError::Vm { op, source }
}

fn thread_err(what: &'static str) -> impl FnOnce(std::io::Error) -> SourceError {
    move |source| SourceError::Thread { what, source }
}

/// Guest RAM as the source reads it: the layout plus each region's host mapping.
struct GuestRam {
    layout: RamLayout,
    /// Host address of each layout region (same order as `layout.regions()`).
    hosts: Vec<usize>,
    /// The VM's description of each layout region (same order), for hole detection.
    regions: Vec<RamRegion>,
}

impl GuestRam {
    fn new(regions: &[RamRegion]) -> Result<Self, SourceError> {
        let layout = RamLayout::from_regions(regions)?;
        let mut hosts = Vec::with_capacity(regions.len());
        let mut ordered = Vec::with_capacity(regions.len());
        for r in layout.regions() {
            let region = regions
                .iter()
                .find(|x| x.slot == r.slot)
                .filter(|x| x.host_addr != 0)
                .ok_or(SourceError::Region {
                    slot: r.slot,
                    size: r.size,
                })?;
            hosts.push(region.host_addr);
            ordered.push(region.clone());
        }
        Ok(GuestRam {
            layout,
            hosts,
            regions: ordered,
        })
    }

    /// Fresh hole knowledge of every region (a new answer per pass: memory changes between
    /// precopy rounds).
    fn holes(&self) -> Vec<RegionHoles> {
        self.regions.iter().map(RegionHoles::new).collect()
    }

    /// Region (layout index) and gpa of global page `index`.
    fn locate(&self, index: u64) -> (usize, u64) {
        let gpa = self.layout.page_gpa(index).unwrap_or(0);
        (self.layout.region_of(gpa).unwrap_or(0), gpa)
    }

    /// The guest RAM of `count` pages from global page `index` (all in one region), read in
    /// place: a Pages frame or a page reply is written to the socket straight from it, with no
    /// copy in between.
    fn pages(&self, index: u64, count: u64) -> &[u8] {
        let (ri, gpa) = self.locate(index);
        let r = &self.layout.regions()[ri];
        let offset = gpa - r.gpa;
        let len = (count * PAGE_SIZE) as usize;
        assert!(
            offset + len as u64 <= r.size,
            "a page run crosses the end of its region"
        );
        let src = self.hosts[ri] + offset as usize;
        // SAFETY: SourceVm::ram_regions promises host_addr..host_addr+size is mapped and readable
        // for the whole migration, which outlives this borrow of `self`; the run lies inside the
        // region (asserted). The guest may write these bytes while they are read (precopy): the
        // reader takes them as a snapshot of raw bytes, and dirty tracking (precopy) or the
        // paused vCPUs (postcopy) account for later writes, as for any copy of guest RAM.
        unsafe { std::slice::from_raw_parts(src as *const u8, len) }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// Groups pages into Pages frames (contiguous runs inside one region) and zero runs.
struct PageSender<'a> {
    ram: &'a GuestRam,
    counters: &'a SourceCounters,
    zero_runs: bool,
    /// Pending data run: first page, page count, region. Its bytes are read from guest RAM
    /// when the frame is written.
    run: Option<(u64, u32, usize)>,
    /// Pending zero run: first page, count, region.
    zero: Option<(u64, u32, usize)>,
    /// Count pages as bulk push.
    push: bool,
    /// Never-written ranges of each region (sent as zero runs without reading them).
    holes: Vec<RegionHoles>,
    /// Bytes written since the last [`PageSender::take_bytes`] (for the bandwidth cap).
    bytes: u64,
}

impl<'a> PageSender<'a> {
    fn new(ram: &'a GuestRam, counters: &'a SourceCounters, zero_runs: bool, push: bool) -> Self {
        PageSender {
            ram,
            counters,
            zero_runs,
            run: None,
            zero: None,
            push,
            holes: if zero_runs { ram.holes() } else { Vec::new() },
            bytes: 0,
        }
    }

    /// Bytes written since the last call.
    fn take_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }

    /// Charge the bytes written since the last call to `bucket` (sleeping while over the cap).
    fn throttle(
        &mut self,
        bucket: &mut Option<TokenBucket>,
        abort: impl FnMut() -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if let Some(b) = bucket.as_mut() {
            let bytes = self.take_bytes();
            if bytes > 0 {
                b.consume(bytes, abort)?;
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        w: &mut FrameWriter<transport::WriteHalf>,
        index: u64,
    ) -> Result<(), WireError> {
        let (region, gpa) = self.ram.locate(index);
        let in_region = (gpa - self.ram.layout.regions()[region].gpa) / PAGE_SIZE;
        let hole = self
            .holes
            .get_mut(region)
            .is_some_and(|h| h.extent(in_region).hole);
        let zero = hole || (self.zero_runs && is_zero(self.ram.pages(index, 1)));
        if !zero {
            if let Some((first, count, r)) = self.run {
                if r != region || first + count as u64 != index || count == MAX_PAGES_PER_FRAME {
                    self.flush_data(w)?;
                }
            }
        }
        if zero {
            if let Some((first, count, r)) = self.zero {
                if r != region || first + count as u64 != index || count == MAX_RUN_PAGES {
                    self.flush_zero(w)?;
                }
            }
            match &mut self.zero {
                Some((_, count, _)) => *count += 1,
                None => self.zero = Some((index, 1, region)),
            }
        } else {
            match &mut self.run {
                Some((_, count, _)) => *count += 1,
                None => self.run = Some((index, 1, region)),
            }
        }
        Ok(())
    }

    fn count(&self, pages: u64, zero: bool) {
        SourceCounters::add(
            if zero {
                &self.counters.zero_pages
            } else {
                &self.counters.pages_sent
            },
            pages,
        );
        if self.push {
            SourceCounters::add(&self.counters.pages_pushed, pages);
        }
    }

    fn flush_data(&mut self, w: &mut FrameWriter<transport::WriteHalf>) -> Result<(), WireError> {
        if let Some((first, count, _)) = self.run.take() {
            let gpa = self.ram.locate(first).1;
            let before = w.bytes_written();
            w.send(
                &Message::Pages {
                    gpa,
                    data: self.ram.pages(first, u64::from(count)),
                },
                "sending pages",
            )?;
            self.bytes += w.bytes_written() - before;
            SourceCounters::add(&self.counters.bytes_sent, w.bytes_written() - before);
            self.count(count as u64, false);
        }
        Ok(())
    }

    fn flush_zero(&mut self, w: &mut FrameWriter<transport::WriteHalf>) -> Result<(), WireError> {
        if let Some((first, count, _)) = self.zero.take() {
            let gpa = self.ram.locate(first).1;
            let before = w.bytes_written();
            w.send(&Message::ZeroPages { gpa, count }, "sending zero pages")?;
            self.bytes += w.bytes_written() - before;
            SourceCounters::add(&self.counters.bytes_sent, w.bytes_written() - before);
            self.count(count as u64, true);
        }
        Ok(())
    }

    fn flush(&mut self, w: &mut FrameWriter<transport::WriteHalf>) -> Result<(), WireError> {
        self.flush_data(w)?;
        self.flush_zero(w)
    }
}

/// What must be undone if the migration fails.
#[derive(Default)]
struct Cleanup {
    dirty_slots: Vec<u32>,
    paused: bool,
    /// The destination said it started the VM.
    started: bool,
    /// The switchover frame may have reached the destination.
    switch_sent: bool,
    /// The main channel before the switchover (to report an error on).
    main: Option<Channel>,
}

fn send_counted(
    main: &mut Channel,
    counters: &SourceCounters,
    msg: &Message<'_>,
    during: &'static str,
) -> Result<(), WireError> {
    let before = main.writer.bytes_written();
    main.send(msg, during)?;
    SourceCounters::add(&counters.bytes_sent, main.writer.bytes_written() - before);
    Ok(())
}

fn fetch_dirty(vm: &dyn SourceVm, layout: &RamLayout) -> Result<PageSet, SourceError> {
    let mut set = PageSet::new(layout.total_pages());
    for (i, r) in layout.regions().iter().enumerate() {
        let bitmap = vm
            .dirty_log()
            .fetch(r.slot)
            .map_err(vm_err("fetching the dirty log"))?;
        set.or_bitmap(layout.region_first_page(i), r.size / PAGE_SIZE, &bitmap);
    }
    Ok(set)
}

/// Send runs of `set` as Discard frames (pages the destination got in precopy but which were
/// dirtied since).
fn send_discards(
    main: &mut Channel,
    counters: &SourceCounters,
    ram: &GuestRam,
    set: &PageSet,
) -> Result<(), WireError> {
    for (gpa, count) in ram.layout.runs(set, MAX_RUN_PAGES) {
        send_counted(
            main,
            counters,
            &Message::Discard { gpa, count },
            "sending discards",
        )?;
    }
    Ok(())
}

/// Migrate `vm` to the destination daemon at `to`. On failure before the destination confirmed
/// it started the VM, the source VM is resumed (if it was paused) and left running; see
/// [`SourceError::destination_started`].
pub fn migrate(
    vm: &dyn SourceVm,
    to: SocketAddr,
    opts: MigrateOptions,
    progress: &dyn Fn(Progress),
) -> Result<MigrationSummary, SourceError> {
    let control = opts.control.clone();
    control.begin(0);
    opts.emit(MigrationEvent::Started { mode: opts.mode });
    let tracked = |p: Progress| {
        control.set_phase(Some(p.phase));
        if matches!(
            p.phase,
            Phase::Precopy | Phase::Switchover | Phase::Postcopy | Phase::Done
        ) {
            control
                .remaining_pages
                .store(p.dirty_pages, Ordering::Relaxed);
        }
        progress(p)
    };
    let result = migrate_inner(vm, to, &opts, &tracked);
    control.set_phase(None);
    let (status, error, event) = match &result {
        Ok(s) => (
            MigrationStatus::Completed,
            None,
            MigrationEvent::Completed {
                total_ms: s.total_ms as u64,
                downtime_ms: Some(s.blackout_ms as u64),
            },
        ),
        Err(SourceError::Cancelled) => {
            (MigrationStatus::Cancelled, None, MigrationEvent::Cancelled)
        }
        Err(e) => (
            MigrationStatus::Failed,
            Some(e.to_string()),
            MigrationEvent::Failed {
                error: e.to_string(),
            },
        ),
    };
    control.phases().finish(status, error);
    opts.emit(event);
    result
}

/// [`migrate`] without the bookkeeping of the outcome: runs it and undoes what a failure
/// leaves.
fn migrate_inner(
    vm: &dyn SourceVm,
    to: SocketAddr,
    opts: &MigrateOptions,
    progress: &dyn Fn(Progress),
) -> Result<MigrationSummary, SourceError> {
    let mut cleanup = Cleanup::default();
    let result = run(vm, to, opts, progress, &mut cleanup);
    for slot in cleanup.dirty_slots.drain(..) {
        if let Err(e) = vm.dirty_log().disable(slot) {
            tracing::warn!("disabling dirty logging of slot {slot} failed: {e}");
        }
    }
    match result {
        Ok(s) => Ok(s),
        Err(e) => {
            if let Some(main) = cleanup.main.as_mut() {
                let code = match &e {
                    SourceError::Wire(WireError::Remote { .. }) => None,
                    SourceError::Wire(_) => Some(ErrorCode::Protocol),
                    _ => Some(ErrorCode::Internal),
                };
                if let Some(code) = code {
                    main.send_error(code, &e.to_string());
                }
                main.shutdown();
            }
            if cleanup.started {
                return Err(match e {
                    e @ SourceError::AfterStart(_) => e,
                    e => SourceError::AfterStart(Box::new(e)),
                });
            }
            if e.keeps_paused() {
                tracing::error!("{e}");
                return Err(e);
            }
            if cleanup.paused {
                if let Err(r) = vm.resume() {
                    tracing::error!(
                        "migration failed ({e}) and resuming the source VM failed too: {r}"
                    );
                } else {
                    tracing::debug!("migration failed ({e}); the source VM runs again");
                }
            }
            Err(e)
        }
    }
}

fn run(
    vm: &dyn SourceVm,
    to: SocketAddr,
    opts: &MigrateOptions,
    progress: &dyn Fn(Progress),
    cleanup: &mut Cleanup,
) -> Result<MigrationSummary, SourceError> {
    let t0 = Instant::now();
    let control = &*opts.control;
    let deadline = opts.timeout.map(|t| t0 + t);
    let abort = || check_abort(control, deadline);
    let counters = &control.counters;
    let regions = vm.ram_regions();
    let ram = GuestRam::new(&regions)?;
    let total = ram.layout.total_pages();
    control.phases().total_pages = total;
    control.remaining_pages.store(total, Ordering::Relaxed);
    let memory_kind = regions.first().map(|r| r.kind).unwrap_or(Backing::Anon);
    let report = |phase, round, dirty_pages| {
        progress(Progress {
            phase,
            round,
            total_pages: total,
            pages_sent: SourceCounters::get(&counters.pages_sent)
                + SourceCounters::get(&counters.zero_pages),
            bytes_sent: SourceCounters::get(&counters.bytes_sent),
            dirty_pages,
            faults_served: SourceCounters::get(&counters.faults_served),
        })
    };
    report(Phase::Connecting, 0, 0);

    let session = connect_abortable(to, opts, &abort)?;
    let session_id = session.id;
    let urgent = session.urgent;
    let main = cleanup.main.insert(session.main);
    let config = MigrationConfig {
        mode: opts.mode,
        memory_kind,
        vcpu_count: vm.vcpu_count(),
        layout: ram.layout.clone(),
    };
    send_counted(main, counters, &Message::Config(config), "sending Config")?;
    let ready_until = Instant::now() + opts.timeouts.setup;
    wait_readable(main, ready_until, &abort)?;
    match main.reader.read_within(
        ready_until.saturating_duration_since(Instant::now()),
        "waiting for Ready",
    )? {
        Message::Ready => {}
        other => return Err(wire::unexpected(other, "waiting for Ready", "Ready").into()),
    }
    control.phases().setup_ms = t0.elapsed().as_millis() as u64;
    let mut precopy_cap = opts.precopy_bandwidth.map(TokenBucket::new);

    // Precopy rounds (precopy and hybrid).
    let mut rounds = 0u32;
    let mut bandwidth = 0f64;
    let mut pending = PageSet::new(total);
    if opts.mode != Mode::Postcopy {
        for r in ram.layout.regions() {
            vm.dirty_log()
                .enable(r.slot)
                .map_err(vm_err("enabling dirty logging"))?;
            cleanup.dirty_slots.push(r.slot);
        }
        let round_limit = if opts.mode == Mode::Hybrid {
            opts.hybrid_rounds.max(1)
        } else {
            opts.max_rounds.max(1)
        };
        let mut to_send = PageSet::full(total);
        loop {
            report(Phase::Precopy, rounds, to_send.count());
            let round_start = Instant::now();
            let bytes_before = SourceCounters::get(&counters.bytes_sent);
            let mut sender = PageSender::new(&ram, counters, opts.zero_runs, false);
            let round_pages = to_send.count();
            for (n, index) in to_send.iter().enumerate() {
                sender.add(&mut main.writer, index)?;
                if n % 64 == 63 {
                    abort()?;
                    sender.throttle(&mut precopy_cap, abort)?;
                    control
                        .remaining_pages
                        .store(round_pages - n as u64 - 1, Ordering::Relaxed);
                }
                if n % 8192 == 8191 {
                    check_peer_silent(main)?;
                }
            }
            sender.flush(&mut main.writer)?;
            sender.throttle(&mut precopy_cap, abort)?;
            send_counted(
                main,
                counters,
                &Message::RoundEnd {
                    round: rounds,
                    pages: to_send.count(),
                },
                "sending RoundEnd",
            )?;
            rounds += 1;
            let bytes = SourceCounters::get(&counters.bytes_sent) - bytes_before;
            let secs = round_start.elapsed().as_secs_f64();
            SourceCounters::add(&counters.transfer_bytes, bytes);
            SourceCounters::add(&counters.transfer_ns, (secs * 1e9) as u64);
            if bytes >= 1 << 20 && secs > 0.0 {
                bandwidth = bytes as f64 / secs;
            }
            let dirty = fetch_dirty(vm, &ram.layout)?;
            let dirty_count = dirty.count();
            let estimate = if bandwidth > 0.0 {
                (dirty_count * PAGE_SIZE) as f64 / bandwidth
            } else {
                f64::INFINITY
            };
            {
                let mut p = control.phases();
                p.rounds = rounds as u64;
                p.dirty_rate = if secs > 0.0 {
                    (dirty_count as f64 / secs) as u64
                } else {
                    0
                };
                p.expected_downtime_ms = estimate
                    .is_finite()
                    .then(|| (estimate * 1000.0).round() as u64);
            }
            control
                .remaining_pages
                .store(dirty_count, Ordering::Relaxed);
            tracing::debug!(
                round = rounds,
                dirty_count,
                estimate_ms = estimate * 1000.0,
                "precopy round done"
            );
            let converged =
                opts.mode == Mode::Precopy && estimate <= opts.downtime_target.as_secs_f64();
            if converged || rounds >= round_limit {
                pending = dirty;
                break;
            }
            to_send = dirty;
        }
    }

    // Switchover.
    abort()?;
    report(Phase::Switchover, rounds, pending.count());
    vm.pause().map_err(vm_err("pausing the vCPUs"))?;
    cleanup.paused = true;
    let blackout_start = Instant::now();
    if opts.mode != Mode::Postcopy {
        let last = fetch_dirty(vm, &ram.layout)?;
        for i in last.iter() {
            pending.insert(i);
        }
    }
    let final_dirty_pages = pending.count();
    let state = vm
        .save_state()
        .map_err(vm_err("saving device and vCPU state"))?;
    if state.len() > MAX_STATE_BYTES as usize {
        return Err(SourceError::StateTooLarge { len: state.len() });
    }

    // Pages the destination holds once State is on its way: everything in precopy (the last
    // dirty pages go first), everything but what was dirtied since its last round in hybrid,
    // nothing in postcopy.
    let holds = match opts.mode {
        Mode::Precopy => {
            let mut sender = PageSender::new(&ram, counters, opts.zero_runs, false);
            for (n, index) in pending.iter().enumerate() {
                sender.add(&mut main.writer, index)?;
                if n % 64 == 63 {
                    abort()?;
                }
            }
            sender.flush(&mut main.writer)?;
            PageSet::full(total)
        }
        Mode::Hybrid => {
            send_discards(main, counters, &ram, &pending)?;
            let mut h = PageSet::full(total);
            for i in pending.iter() {
                h.remove(i);
            }
            h
        }
        Mode::Postcopy => PageSet::new(total),
    };
    // Nothing may have come from the destination since Ready: an Error means it gave up, and
    // anything else (a Started before any switchover frame) breaks the protocol.
    check_peer_silent(main)?;
    // The point of no return: once State is on its way, cancel is refused.
    control.commit(deadline)?;
    send_counted(main, counters, &Message::State(&state), "sending State")?;
    // From here on the destination may start the VM: a lost link is settled by recovery, never
    // by guessing (see `Handover`).
    let main = cleanup.main.take().ok_or(SourceError::Internal {
        during: "the switchover",
        what: "the main channel is gone",
    })?;
    let live = Link {
        main: main.into_live(opts.timeouts.liveness),
        urgent: urgent.into_live(opts.timeouts.liveness),
    };
    let mut handover = Handover {
        ram: &ram,
        counters,
        opts,
        session_id,
        to,
        report: &report,
        rounds,
        switch_sent: false,
        switch_nonce: switchover_nonce(),
        started: false,
        blackout: None,
        blackout_start,
        recoveries: 0,
        paused: Duration::ZERO,
        announced: false,
    };
    let result = handover.drive(live, holds);
    cleanup.started = handover.started;
    cleanup.switch_sent = handover.switch_sent;
    let dest = result?;
    let blackout = handover.blackout.unwrap_or_default();
    if dest.pages_received != total {
        return Err(SourceError::Incomplete {
            missing: total.saturating_sub(dest.pages_received),
        });
    }
    report(Phase::Done, rounds, 0);
    Ok(MigrationSummary {
        mode: opts.mode,
        session_id,
        blackout_ms: blackout.as_secs_f64() * 1000.0,
        total_ms: t0.elapsed().as_secs_f64() * 1000.0,
        bytes_sent: SourceCounters::get(&counters.bytes_sent),
        pages_sent: SourceCounters::get(&counters.pages_sent),
        zero_pages: SourceCounters::get(&counters.zero_pages),
        faults_served: SourceCounters::get(&counters.faults_served),
        pages_pushed: SourceCounters::get(&counters.pages_pushed),
        collapses: dest.collapses,
        rounds,
        final_dirty_pages,
        bandwidth_bytes_per_s: bandwidth,
        transfer_ms: SourceCounters::get(&counters.transfer_ns) as f64 / 1e6,
        transfer_bytes: SourceCounters::get(&counters.transfer_bytes),
        recoveries: handover.recoveries,
        paused_ms: handover.paused.as_secs_f64() * 1000.0,
        destination: dest,
    })
}

/// Connect and authenticate both channels on a helper thread, so that a cancel (or the overall
/// timeout) ends the wait at once; an abandoned attempt's session is dropped (closed) when its
/// thread finishes.
fn connect_abortable(
    to: SocketAddr,
    opts: &MigrateOptions,
    abort: &dyn Fn() -> Result<(), SourceError>,
) -> Result<transport::Session, SourceError> {
    let secret = opts.secret.clone();
    let tls = opts.tls.clone();
    let allow_plaintext = opts.allow_plaintext;
    let timeouts = opts.timeouts;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mig-connect".into())
        .spawn(move || {
            let security = transport::ClientSecurity {
                secret: secret.as_ref(),
                tls: tls.as_ref(),
                allow_plaintext,
            };
            let _ = tx.send(transport::connect_with(to, security, &timeouts));
        })
        .map_err(thread_err("connect"))?;
    loop {
        abort()?;
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(r) => return r.map_err(|source| SourceError::Session { addr: to, source }),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SourceError::Internal {
                    during: "connecting",
                    what: "the connect thread ended without an answer",
                })
            }
        }
    }
}

/// Wait until the main channel has something to read (or `until`), asking `abort` every few
/// milliseconds.
fn wait_readable(
    main: &Channel,
    until: Instant,
    abort: &dyn Fn() -> Result<(), SourceError>,
) -> Result<(), SourceError> {
    use std::os::fd::AsFd;
    loop {
        abort()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if main.reader.get_ref().buffered() {
            return Ok(()); // a poll on the socket would not see it (TLS)
        }
        let fd = main.reader.get_ref().as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let tick = left.min(Duration::from_millis(5)).as_millis() as u16;
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(tick.max(1))) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            // Readable, or an error the read that follows reports properly.
            _ => return Ok(()),
        }
    }
}

/// A fresh random non-zero nonce for the switchover frame.
fn switchover_nonce() -> u64 {
    use rand::RngCore;
    loop {
        let n = rand::rngs::OsRng.next_u64();
        if n != 0 {
            return n;
        }
    }
}

/// Between Ready and the switchover the destination says nothing on the main channel. If it
/// did (an Error: it gave up; anything else, e.g. a Started before any switchover frame: a
/// protocol violation), fail now, without waiting for the next read.
fn check_peer_silent(main: &mut Channel) -> Result<(), SourceError> {
    use std::os::fd::AsFd;
    let readable = main.reader.get_ref().buffered() || {
        let fd = main.reader.get_ref().as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
    };
    if !readable {
        return Ok(());
    }
    match main.reader.poll("checking the destination during precopy") {
        Ok(None) => Ok(()),
        Ok(Some(m)) => Err(wire::unexpected(
            m,
            "checking the destination during precopy",
            "nothing before the switchover",
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Both channels of one connected stretch of the session, from the switchover on.
struct Link {
    main: LiveChannel,
    urgent: LiveChannel,
}

impl Link {
    fn shutdown(&self) {
        self.main.shutdown();
        self.urgent.shutdown();
    }

    /// The destination said Done: end the session cleanly. Half-close main (the destination
    /// reads EOF: the source has all it needs) and read what the destination may still have
    /// sent until it closes too, so closing never resets the connection (a reset would look
    /// like a link failure, and the destination would wait for a recovery).
    fn close_after_done(&mut self) {
        let _ = self
            .main
            .stream_handle()
            .map(|s| s.shutdown(std::net::Shutdown::Write));
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match self.main.reader.poll("closing the session") {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.shutdown();
    }
}

/// What a recovery handshake told the source.
struct Recovered {
    link: Link,
    started: bool,
    held: PageSet,
}

/// The switchover and everything after it: starting the VM on the destination, the postcopy
/// push beside the urgent page server, Complete and Done, over as many connected stretches
/// ("epochs") as link failures make necessary. Between two of them the source is
/// postcopy-paused: the VM stays paused here with all its memory, and the source reconnects.
struct Handover<'a> {
    ram: &'a GuestRam,
    counters: &'a SourceCounters,
    opts: &'a MigrateOptions,
    session_id: u64,
    to: SocketAddr,
    report: &'a dyn Fn(Phase, u32, u64),
    rounds: u32,
    /// The switchover frame (Switchover or PostcopyStart) may have reached the destination.
    switch_sent: bool,
    /// The fresh random nonce of the switchover frame, which Started must echo.
    switch_nonce: u64,
    /// The destination said it started the VM (Started, or a recovery's RecoverState).
    started: bool,
    /// Pause to the destination's Started.
    blackout: Option<Duration>,
    blackout_start: Instant,
    recoveries: u32,
    paused: Duration,
    /// The postcopy-active event went out.
    announced: bool,
}

impl Handover<'_> {
    /// The blackout is known: show it as the downtime.
    fn publish_downtime(&self) {
        if let Some(b) = self.blackout {
            self.opts.control.phases().downtime_ms = Some(b.as_millis() as u64);
        }
    }

    fn drive(&mut self, mut link: Link, mut held: PageSet) -> Result<DoneStats, SourceError> {
        loop {
            let err = match self.epoch(&mut link, &held) {
                Ok(done) => {
                    link.close_after_done();
                    return Ok(done);
                }
                Err(e) => e,
            };
            // A destination that gave up sent its reason before closing: prefer it over the
            // broken pipe it left.
            let err = match (
                err.is_link_failure(),
                link.main.reader.poll("reading a last report"),
            ) {
                (true, Ok(Some(Message::Error { code, message }))) => {
                    SourceError::Wire(WireError::Remote { code, message })
                }
                _ => err,
            };
            if !err.is_link_failure() {
                if !matches!(err, SourceError::Wire(WireError::Remote { .. })) {
                    link.main.send_error(ErrorCode::Internal, &err.to_string());
                }
                link.shutdown();
                return Err(err);
            }
            link.shutdown();
            let recovered = self.recover(&err)?;
            link = recovered.link;
            if !recovered.started {
                if self.started {
                    link.main.send_error(
                        ErrorCode::Protocol,
                        "the destination said it started the VM, and now that it did not",
                    );
                    return Err(SourceError::Protocol(
                        "after Started the destination claims it never started the VM".into(),
                    ));
                }
                link.main.send_error(
                    ErrorCode::Rejected,
                    "the switchover did not complete: the source runs the VM again",
                );
                link.shutdown();
                return Err(SourceError::NotStarted(Box::new(err)));
            }
            if !self.started {
                self.started = true;
                self.blackout = Some(self.blackout_start.elapsed());
                self.publish_downtime();
            }
            held = recovered.held;
        }
    }

    /// One connected stretch: returns Done, or the error that ended the stretch.
    fn epoch(&mut self, link: &mut Link, held: &PageSet) -> Result<DoneStats, SourceError> {
        let opts = self.opts;
        let counters = self.counters;
        let precopy = opts.mode == Mode::Precopy;
        let Link { main, urgent } = link;
        let main_writer = main.writer.clone();
        let urgent_writer = urgent.writer.clone();
        let main_stream = main.stream_handle().ok();
        let urgent_stream = urgent.stream_handle().ok();
        let main_reader = &mut main.reader;
        let urgent_reader = &mut urgent.reader;
        let mut writers = vec![main_writer.clone()];
        if !precopy {
            writers.push(urgent_writer.clone());
        }
        let send = |msg: &Message<'_>, during| -> Result<(), WireError> {
            let mut w = main_writer.lock_unpoisoned();
            let before = w.bytes_written();
            let r = w.send(msg, during);
            SourceCounters::add(&counters.bytes_sent, w.bytes_written() - before);
            r
        };
        let mut complete_sent = false;
        if !self.switch_sent {
            // Set first: a failed write may still have delivered the frame.
            self.switch_sent = true;
            if precopy {
                send(
                    &Message::Complete {
                        pages: self.ram.layout.total_pages(),
                    },
                    "sending Complete",
                )?;
                complete_sent = true;
                send(
                    &Message::Switchover {
                        nonce: self.switch_nonce,
                    },
                    "sending Switchover",
                )?;
            } else {
                send(
                    &Message::PostcopyStart {
                        nonce: self.switch_nonce,
                    },
                    "sending PostcopyStart",
                )?;
            }
        }
        // Started after the switchover frame, so that the blackout does not wait for it.
        let _heartbeat =
            Heartbeat::start(writers, opts.timeouts.heartbeat).map_err(thread_err("heartbeat"))?;
        // The urgent server must run before the destination's vCPUs do.
        let push = PushState {
            sent: AtomicPageSet::from_set(held),
            hint: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        };
        std::thread::scope(|scope| {
            let server = if precopy {
                None
            } else {
                let (ram, push) = (self.ram, &push);
                let urgent_writer = &urgent_writer;
                Some(
                    std::thread::Builder::new()
                        .name("mig-urgent-srv".into())
                        .spawn_scoped(scope, move || {
                            crate::thread_hook::started(crate::thread_hook::ThreadKind::Channel);
                            let _priority = thread_priority::enter(ThreadRole::Urgent);
                            let r =
                                urgent_server(urgent_reader, urgent_writer, ram, push, counters);
                            if matches!(&r, Err(e) if !matches!(e, WireError::Closed { .. })) {
                                // Wake the push (or the wait for Started) at once: the link is
                                // gone, or the destination broke the protocol. (A clean close
                                // is the destination ending the session: its reason follows on
                                // the main channel.)
                                if let Some(s) = main_stream {
                                    let _ = s.shutdown(std::net::Shutdown::Both);
                                }
                            }
                            r
                        })
                        .map_err(thread_err("urgent page server"))?,
                )
            };
            let result = (|| -> Result<DoneStats, SourceError> {
                if !self.started {
                    let mut echoed = 0;
                    wait_for(
                        main_reader,
                        opts.timeouts.setup,
                        "waiting for Started",
                        |m| match m {
                            Message::Started { nonce } => {
                                echoed = *nonce;
                                true
                            }
                            _ => false,
                        },
                    )?;
                    // Only an answer to the switchover frame names its nonce: a Started the
                    // destination wrote before that frame reached it cannot.
                    if echoed != self.switch_nonce {
                        return Err(SourceError::EarlyStarted {
                            got: echoed,
                            sent: self.switch_nonce,
                        });
                    }
                    self.started = true;
                    self.blackout = Some(self.blackout_start.elapsed());
                    self.publish_downtime();
                }
                let total = self.ram.layout.total_pages();
                if !precopy {
                    (self.report)(Phase::Postcopy, self.rounds, total - held.count());
                    if !self.announced {
                        self.announced = true;
                        opts.emit(MigrationEvent::PostcopyActive);
                    }
                }
                self.push(&main_writer, &push)?;
                if !complete_sent {
                    send(&Message::Complete { pages: total }, "sending Complete")?;
                }
                let mut done = DoneStats::default();
                wait_for(main_reader, opts.timeouts.setup, "waiting for Done", |m| {
                    if let Message::Done(s) = m {
                        done = *s;
                        true
                    } else {
                        false
                    }
                })?;
                Ok(done)
            })();
            push.stop.store(true, Ordering::Release);
            if let Some(s) = &urgent_stream {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            let served = server.map(|s| s.join());
            match (result, served) {
                (Ok(done), _) => Ok(done),
                // The urgent server saw the link fail first: report that, not its echo.
                (Err(e), Some(Ok(Err(se))))
                    if e.is_link_failure() && !matches!(se, WireError::Closed { .. }) =>
                {
                    Err(SourceError::UrgentServer(se))
                }
                (Err(e), _) => Err(e),
            }
        })
    }

    /// The bulk push of every page the destination does not hold, from a cursor that jumps to
    /// the page after the latest fault.
    fn push(&self, main: &SharedWriter, push: &PushState) -> Result<(), SourceError> {
        // Bulk work: under a CPU placement, on the bulk CPUs for as long as the push runs.
        let _bulk = thread_priority::enter(ThreadRole::Bulk);
        let (ram, counters) = (self.ram, self.counters);
        let total = ram.layout.total_pages();
        let push_start = Instant::now();
        let bytes_before = SourceCounters::get(&counters.bytes_sent);
        let mut sender = PageSender::new(ram, counters, self.opts.zero_runs, true);
        let mut cap = self.opts.postcopy_bandwidth.map(TokenBucket::new);
        let mut cursor = 0u64;
        let mut frames = 0u64;
        let result = (|| -> Result<(), SourceError> {
            loop {
                let hint = push.hint.swap(u64::MAX, Ordering::AcqRel);
                if hint != u64::MAX {
                    // Move on to the pages after the latest fault: the guest is likely to want
                    // them next.
                    sender.flush(&mut main.lock_unpoisoned())?;
                    cursor = hint + 1;
                }
                let Some(index) = push.sent.next_absent(cursor) else {
                    break;
                };
                if index < cursor {
                    // Wrapped around: finish the pending frame before starting over.
                    sender.flush(&mut main.lock_unpoisoned())?;
                }
                cursor = index + 1;
                if push.sent.insert(index) {
                    sender.add(&mut main.lock_unpoisoned(), index)?;
                    // Only the push is capped: the urgent server answers at full speed.
                    sender.throttle(&mut cap, || Ok(()))?;
                    frames += 1;
                    if frames.is_multiple_of(16384) {
                        (self.report)(
                            Phase::Postcopy,
                            self.rounds,
                            total - push.sent.snapshot().count(),
                        );
                    }
                }
            }
            sender.flush(&mut main.lock_unpoisoned())?;
            Ok(())
        })();
        SourceCounters::add(
            &counters.transfer_bytes,
            SourceCounters::get(&counters.bytes_sent) - bytes_before,
        );
        SourceCounters::add(
            &counters.transfer_ns,
            push_start.elapsed().as_nanos() as u64,
        );
        result
    }

    /// postcopy-paused: reconnect into the session with backoff until the recover timeout, and
    /// learn what the destination holds and whether it runs the VM.
    fn recover(&mut self, why: &SourceError) -> Result<Recovered, SourceError> {
        let opts = self.opts;
        let since = Instant::now();
        let deadline = since + opts.timeouts.recover;
        let total = self.ram.layout.total_pages();
        (self.report)(Phase::PostcopyPaused, self.rounds, 0);
        opts.control.phases().pause_begins();
        opts.emit(MigrationEvent::PostcopyPaused {
            reason: why.to_string(),
        });
        tracing::warn!(
            "postcopy-paused: the link to the destination failed ({why}); reconnecting for up to {} s",
            opts.timeouts.recover.as_secs()
        );
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0u32;
        let mut last: Option<SourceError> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.paused += since.elapsed();
                opts.control.phases().pause_ends(false);
                let e = SourceError::RecoverTimeout {
                    waited_ms: since.elapsed().as_millis() as u64,
                    attempts,
                    last: last.map(Box::new),
                };
                return Err(if self.started {
                    e
                } else if self.switch_sent {
                    SourceError::OutcomeUnknown(Box::new(e))
                } else {
                    SourceError::NotStarted(Box::new(e))
                });
            }
            attempts += 1;
            let addr = opts.control.target().unwrap_or(self.to);
            match transport::reconnect_with(addr, self.session_id, opts.security(), &opts.timeouts)
                .map_err(|source| SourceError::Session { addr, source })
                .and_then(|s| read_recover_state(s, &self.ram.layout, &opts.timeouts))
            {
                Ok(r) => {
                    self.recoveries += 1;
                    self.paused += since.elapsed();
                    {
                        let mut p = opts.control.phases();
                        let d = p.pause_ends(true);
                        if opts.mode == Mode::Precopy {
                            p.status = MigrationStatus::Device;
                        }
                        drop(p);
                        opts.emit(MigrationEvent::Recovered {
                            attempt: self.recoveries as u64,
                            paused_ms: d.as_millis() as u64,
                        });
                    }
                    tracing::warn!(
                        "postcopy resumed after {} ms ({attempts} attempt(s), recovery #{}): the destination holds {} of {total} pages",
                        since.elapsed().as_millis(),
                        self.recoveries,
                        r.held.count()
                    );
                    return Ok(r);
                }
                Err(e) => {
                    tracing::debug!("recovery attempt {attempts} to {addr} failed: {e}");
                    last = Some(e);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Read the destination's ReceivedMap runs and RecoverState on a freshly recovered session.
fn read_recover_state(
    s: transport::Session,
    layout: &RamLayout,
    timeouts: &Timeouts,
) -> Result<Recovered, SourceError> {
    let transport::Session {
        mut main, urgent, ..
    } = s;
    let mut held = PageSet::new(layout.total_pages());
    let r = loop {
        match main.reader.read("reading the destination's received map") {
            Ok(Message::ReceivedMap { gpa, count }) => {
                match check_run(layout, Kind::ReceivedMap, gpa, count as u64) {
                    Ok(first) => held.insert_range(first, count as u64),
                    Err(e) => break Err(e.into()),
                }
            }
            Ok(Message::RecoverState {
                started,
                held_pages,
            }) => {
                if held_pages != held.count() {
                    break Err(SourceError::Protocol(format!(
                        "RecoverState says {held_pages} pages are held, the map named {}",
                        held.count()
                    )));
                }
                break Ok(started);
            }
            Ok(other) => {
                break Err(wire::unexpected(
                    other,
                    "reading the destination's received map",
                    "ReceivedMap or RecoverState",
                )
                .into())
            }
            Err(e) => break Err(e.into()),
        }
    };
    match r {
        Ok(started) => Ok(Recovered {
            link: Link {
                main: main.into_live(timeouts.liveness),
                urgent: urgent.into_live(timeouts.liveness),
            },
            started,
            held,
        }),
        Err(e) => {
            main.shutdown();
            urgent.shutdown();
            Err(e)
        }
    }
}

/// Read until a frame `want` accepts arrives; waits up to `wait` in all (the destination may
/// legitimately take long, e.g. collapsing before Done), but fails as soon as the link is
/// silent past its liveness bound.
fn wait_for(
    reader: &mut FrameReader<transport::ReadHalf>,
    wait: Duration,
    during: &'static str,
    mut want: impl FnMut(&Message<'_>) -> bool,
) -> Result<(), SourceError> {
    let msg = reader.read_within(wait, during)?;
    if want(&msg) {
        return Ok(());
    }
    Err(wire::unexpected(msg, during, "Started or Done").into())
}

/// Shared between the bulk push and the urgent page server.
struct PushState {
    /// Pages the destination has or that are on their way.
    sent: AtomicPageSet,
    /// Global page index of the latest fault (u64::MAX: none since the pusher last looked).
    hint: AtomicU64,
    stop: AtomicBool,
}

/// Answer page requests on the urgent channel until `stop` (or the destination closes it).
fn urgent_server(
    reader: &mut FrameReader<transport::ReadHalf>,
    writer: &SharedWriter,
    ram: &GuestRam,
    push: &PushState,
    counters: &SourceCounters,
) -> Result<(), WireError> {
    let report = |e: &WireError| {
        let _ = writer.lock_unpoisoned().send(
            &Message::Error {
                code: ErrorCode::Protocol,
                message: e.to_string(),
            },
            "reporting an error",
        );
    };
    while !push.stop.load(Ordering::Acquire) {
        let (id, gpa) = match reader.poll("waiting for page requests") {
            Ok(None) => continue,
            Ok(Some(Message::PageRequest { id, gpa })) => (id, gpa),
            Ok(Some(other)) => {
                let e = wire::unexpected(other, "waiting for page requests", "PageRequest");
                report(&e);
                return Err(e);
            }
            Err(_) if push.stop.load(Ordering::Acquire) => return Ok(()),
            Err(e) if e.is_link_failure() => return Err(e),
            Err(e) => {
                // A malformed request (e.g. an unaligned gpa): say so, then give up.
                report(&e);
                return Err(e);
            }
        };
        let got_request = std::time::Instant::now();
        let index = match check_run(&ram.layout, Kind::PageRequest, gpa, 1) {
            Ok(i) => i,
            Err(e) => {
                report(&e);
                return Err(e);
            }
        };
        {
            let mut w = writer.lock_unpoisoned();
            let before = w.bytes_written();
            w.send(
                &Message::PageReply {
                    id,
                    gpa,
                    source_ns: got_request.elapsed().as_nanos() as u64,
                    data: ram.pages(index, 1),
                },
                "sending a page reply",
            )?;
            SourceCounters::add(&counters.bytes_sent, w.bytes_written() - before);
        }
        SourceCounters::add(&counters.pages_sent, 1);
        SourceCounters::add(&counters.faults_served, 1);
        push.sent.insert(index);
        push.hint.store(index, Ordering::Release);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("vCPU 1 did not pause")]
    struct PauseRefused;

    #[test]
    fn a_hook_error_crosses_the_seam_with_its_type_and_message() {
        let e = vm_err("pausing the vCPUs")(Box::new(PauseRefused));
        assert_eq!(
            e.to_string(),
            "pausing the vCPUs failed on the source VM: vCPU 1 did not pause"
        );
        let source = e.source().expect("the hook's error is the source");
        assert!(
            source.downcast_ref::<PauseRefused>().is_some(),
            "{source:?}"
        );
    }

    #[test]
    fn a_recover_timeout_names_the_last_attempt_and_keeps_it() {
        let last = SourceError::Protocol("RecoverState names too few pages".into());
        let e = SourceError::RecoverTimeout {
            waited_ms: 5_000,
            attempts: 3,
            last: Some(Box::new(last)),
        };
        assert_eq!(
            e.to_string(),
            "the link did not come back within 5 s (3 reconnect attempt(s); last: protocol \
             violation by the destination: RecoverState names too few pages)"
        );
        // The boxed error is the source (Box<SourceError> is itself the error in the chain).
        let source = e.source().expect("the last attempt's error is the source");
        assert!(matches!(
            source.downcast_ref::<Box<SourceError>>().map(|b| &**b),
            Some(SourceError::Protocol(_))
        ));
        let none = SourceError::RecoverTimeout {
            waited_ms: 1_000,
            attempts: 0,
            last: None,
        };
        assert_eq!(
            none.to_string(),
            "the link did not come back within 1 s (0 reconnect attempt(s))"
        );
    }
}
