//! Source-side protocol driver: precopy rounds, switchover, and the postcopy bulk push (which
//! moves on to the pages near the latest fault) beside the urgent page server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

mod holes;
use holes::RegionHoles;

use crate::auth::Secret;
use crate::stats::{MigrationSummary, SourceCounters};
use crate::thread_priority::{self, ThreadRole};
use crate::transport::{self, Channel, Timeouts, TransportError};
use crate::types::{
    AtomicPageSet, DirtyLog, LayoutError, MemoryKind, Mode, PageSet, RamLayout, RamRegion,
    PAGE_SIZE,
};
use crate::wire::{
    self, check_run, DoneStats, ErrorCode, FrameReader, FrameWriter, Kind, Message,
    MigrationConfig, WireError, MAX_PAGES_PER_FRAME, MAX_RUN_PAGES, MAX_STATE_BYTES,
};

const PAGE: usize = PAGE_SIZE as usize;

/// The VM being migrated away, as the source driver needs it (the VMM implements this).
pub trait SourceVm {
    /// Guest RAM. Every `host_addr..host_addr+size` must stay mapped and readable until
    /// `migrate` returns.
    fn ram_regions(&self) -> Vec<RamRegion>;
    /// Dirty tracking of guest writes (per memslot).
    fn dirty_log(&self) -> &dyn DirtyLog;
    fn vcpu_count(&self) -> u32;
    /// Stop every vCPU (returns once none runs guest code) and keep devices from writing RAM.
    fn pause(&self) -> Result<(), String>;
    /// Let the vCPUs run again after a failed switchover.
    fn resume(&self) -> Result<(), String>;
    /// Device and vCPU state, taken while paused (at most 64 MiB).
    fn save_state(&self) -> Result<Vec<u8>, String>;
}

/// How to migrate.
#[derive(Debug)]
pub struct MigrateOptions {
    pub mode: Mode,
    /// Shared secret; without one only a loopback destination is allowed.
    pub secret: Option<Secret>,
    pub timeouts: Timeouts,
    /// Precopy stops iterating once the remaining dirty pages would take this long to send at
    /// the measured bandwidth.
    pub downtime_target: Duration,
    /// Most precopy rounds (the full pass included) before stopping anyway.
    pub max_rounds: u32,
    /// Precopy rounds (the full pass included) hybrid runs before it switches to postcopy.
    pub hybrid_rounds: u32,
    /// Announce all-zero pages as zero runs instead of sending their bytes.
    pub zero_runs: bool,
}

impl MigrateOptions {
    /// Defaults: no secret, default timeouts, 10 ms downtime target, 30 rounds, hybrid 3 rounds.
    pub fn new(mode: Mode) -> Self {
        MigrateOptions {
            mode,
            secret: None,
            timeouts: Timeouts::default(),
            downtime_target: Duration::from_millis(10),
            max_rounds: 30,
            hybrid_rounds: 3,
            zero_runs: true,
        }
    }
}

/// Where the source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Phase {
    Connecting,
    Precopy,
    Switchover,
    Postcopy,
    Done,
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
    #[error("{op} failed on the source VM: {message}")]
    Vm { op: &'static str, message: String },
    #[error("device state is {len} bytes, more than the protocol allows ({MAX_STATE_BYTES})")]
    StateTooLarge { len: usize },
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    #[error("urgent page server: {0}")]
    UrgentServer(WireError),
    #[error("the destination had {missing} page(s) left after Complete")]
    Incomplete { missing: u64 },
    /// The destination already runs the VM: the source stays paused and must not resume it.
    #[error(
        "migration failed after the destination started the VM (the source VM stays paused): {0}"
    )]
    AfterStart(Box<SourceError>),
}

impl SourceError {
    /// Whether the destination confirmed it started the VM before the failure (then the source
    /// VM must stay paused).
    pub fn destination_started(&self) -> bool {
        matches!(self, SourceError::AfterStart(_))
    }
}

fn vm_err(op: &'static str) -> impl FnOnce(String) -> SourceError {
    move |message| SourceError::Vm { op, message }
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

    /// Copy `dst.len() / 4096` pages starting at global page `index` (all in one region).
    fn copy_pages(&self, index: u64, dst: &mut [u8]) {
        let (ri, gpa) = self.locate(index);
        let r = &self.layout.regions()[ri];
        let offset = gpa - r.gpa;
        debug_assert!(offset + dst.len() as u64 <= r.size);
        let src = self.hosts[ri] + offset as usize;
        // SAFETY: SourceVm::ram_regions promises host_addr..host_addr+size is mapped and readable
        // for the whole migration; the run lies inside the region (checked by the callers, which
        // build runs from layout pages). The guest may write concurrently: that is what dirty
        // tracking (precopy) or the paused vCPUs (postcopy) account for, and we copy raw bytes
        // only.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
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
    /// Pending data run: first page, page count, region; the bytes are in `data`.
    run: Option<(u64, u32, usize)>,
    data: Vec<u8>,
    /// Pending zero run: first page, count, region.
    zero: Option<(u64, u32, usize)>,
    /// Count pages as bulk push.
    push: bool,
    /// Never-written ranges of each region (sent as zero runs without reading them).
    holes: Vec<RegionHoles>,
}

impl<'a> PageSender<'a> {
    fn new(ram: &'a GuestRam, counters: &'a SourceCounters, zero_runs: bool, push: bool) -> Self {
        PageSender {
            ram,
            counters,
            zero_runs,
            run: None,
            data: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize * PAGE),
            zero: None,
            push,
            holes: if zero_runs { ram.holes() } else { Vec::new() },
        }
    }

    fn add(
        &mut self,
        w: &mut FrameWriter<std::net::TcpStream>,
        index: u64,
    ) -> Result<(), WireError> {
        let (region, gpa) = self.ram.locate(index);
        let in_region = (gpa - self.ram.layout.regions()[region].gpa) / PAGE_SIZE;
        let hole = self
            .holes
            .get_mut(region)
            .is_some_and(|h| h.extent(in_region).hole);
        let zero = hole || {
            if let Some((first, count, r)) = self.run {
                if r != region || first + count as u64 != index || count == MAX_PAGES_PER_FRAME {
                    self.flush_data(w)?;
                }
            }
            let off = self.data.len();
            self.data.resize(off + PAGE, 0);
            self.ram.copy_pages(index, &mut self.data[off..]);
            let zero = self.zero_runs && is_zero(&self.data[off..]);
            if zero {
                self.data.truncate(off);
            }
            zero
        };
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

    fn flush_data(&mut self, w: &mut FrameWriter<std::net::TcpStream>) -> Result<(), WireError> {
        if let Some((first, count, _)) = self.run.take() {
            let gpa = self.ram.locate(first).1;
            let before = w.bytes_written();
            w.send(
                &Message::Pages {
                    gpa,
                    data: &self.data,
                },
                "sending pages",
            )?;
            SourceCounters::add(&self.counters.bytes_sent, w.bytes_written() - before);
            self.count(count as u64, false);
            self.data.clear();
        }
        Ok(())
    }

    fn flush_zero(&mut self, w: &mut FrameWriter<std::net::TcpStream>) -> Result<(), WireError> {
        if let Some((first, count, _)) = self.zero.take() {
            let gpa = self.ram.locate(first).1;
            let before = w.bytes_written();
            w.send(&Message::ZeroPages { gpa, count }, "sending zero pages")?;
            SourceCounters::add(&self.counters.bytes_sent, w.bytes_written() - before);
            self.count(count as u64, true);
        }
        Ok(())
    }

    fn flush(&mut self, w: &mut FrameWriter<std::net::TcpStream>) -> Result<(), WireError> {
        self.flush_data(w)?;
        self.flush_zero(w)
    }
}

/// What must be undone if the migration fails.
#[derive(Default)]
struct Cleanup {
    dirty_slots: Vec<u32>,
    paused: bool,
    started: bool,
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
    let mut run: Option<(u64, u32, usize)> = None;
    let flush = |main: &mut Channel, run: (u64, u32, usize)| {
        let gpa = ram.locate(run.0).1;
        send_counted(
            main,
            counters,
            &Message::Discard { gpa, count: run.1 },
            "sending discards",
        )
    };
    for index in set.iter() {
        let region = ram.locate(index).0;
        match &mut run {
            Some((first, count, r))
                if *r == region && *first + *count as u64 == index && *count < MAX_RUN_PAGES =>
            {
                *count += 1
            }
            _ => {
                if let Some(r) = run.take() {
                    flush(main, r)?;
                }
                run = Some((index, 1, region));
            }
        }
    }
    if let Some(r) = run {
        flush(main, r)?;
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
    let mut cleanup = Cleanup::default();
    let result = run(vm, to, &opts, progress, &mut cleanup);
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
                return Err(SourceError::AfterStart(Box::new(e)));
            }
            if cleanup.paused {
                if let Err(r) = vm.resume() {
                    tracing::error!(
                        "migration failed ({e}) and resuming the source VM failed too: {r}"
                    );
                } else {
                    tracing::info!("migration failed ({e}); the source VM runs again");
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
    let counters = SourceCounters::default();
    let regions = vm.ram_regions();
    let ram = GuestRam::new(&regions)?;
    let total = ram.layout.total_pages();
    let memory_kind = regions.first().map(|r| r.kind).unwrap_or(MemoryKind::Anon);
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

    let session = transport::connect(to, opts.secret.as_ref(), &opts.timeouts)
        .map_err(|source| SourceError::Session { addr: to, source })?;
    let session_id = session.id;
    let urgent = session.urgent;
    let main = cleanup.main.insert(session.main);
    let config = MigrationConfig {
        mode: opts.mode,
        memory_kind,
        vcpu_count: vm.vcpu_count(),
        layout: ram.layout.clone(),
    };
    send_counted(main, &counters, &Message::Config(config), "sending Config")?;
    match main
        .reader
        .read_within(opts.timeouts.setup, "waiting for Ready")?
    {
        Message::Ready => {}
        other => return Err(wire::unexpected(other, "waiting for Ready", "Ready").into()),
    }

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
            let mut sender = PageSender::new(&ram, &counters, opts.zero_runs, false);
            for index in to_send.iter() {
                sender.add(&mut main.writer, index)?;
            }
            sender.flush(&mut main.writer)?;
            send_counted(
                main,
                &counters,
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

    let done = if opts.mode == Mode::Precopy {
        let mut sender = PageSender::new(&ram, &counters, opts.zero_runs, false);
        for index in pending.iter() {
            sender.add(&mut main.writer, index)?;
        }
        sender.flush(&mut main.writer)?;
        send_counted(main, &counters, &Message::State(&state), "sending State")?;
        send_counted(
            main,
            &counters,
            &Message::Complete { pages: total },
            "sending Complete",
        )?;
        send_counted(main, &counters, &Message::Switchover, "sending Switchover")?;
        wait_started(main, &opts.timeouts)?;
        cleanup.started = true;
        let blackout = blackout_start.elapsed();
        let done = wait_done(main, &opts.timeouts)?;
        (blackout, done)
    } else {
        // Pages the destination holds now: everything in hybrid except what was dirtied since
        // it got it; nothing in postcopy.
        let holds = if opts.mode == Mode::Hybrid {
            send_discards(main, &counters, &ram, &pending)?;
            let mut h = PageSet::full(total);
            for i in pending.iter() {
                h.remove(i);
            }
            h
        } else {
            PageSet::new(total)
        };
        postcopy(
            main,
            urgent,
            &ram,
            &counters,
            &state,
            holds,
            opts,
            &mut cleanup.started,
            blackout_start,
            &report,
            rounds,
        )?
    };
    let (blackout, dest) = done;
    if dest.pages_received != total {
        return Err(SourceError::Incomplete {
            missing: total.saturating_sub(dest.pages_received),
        });
    }
    cleanup.main.take();
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
        destination: dest,
    })
}

fn wait_started(main: &mut Channel, timeouts: &Timeouts) -> Result<(), SourceError> {
    match main
        .reader
        .read_within(timeouts.setup, "waiting for Started")?
    {
        Message::Started => Ok(()),
        other => Err(wire::unexpected(other, "waiting for Started", "Started").into()),
    }
}

fn wait_done(main: &mut Channel, timeouts: &Timeouts) -> Result<DoneStats, SourceError> {
    match main
        .reader
        .read_within(timeouts.setup, "waiting for Done")?
    {
        Message::Done(stats) => Ok(stats),
        other => Err(wire::unexpected(other, "waiting for Done", "Done").into()),
    }
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
    mut reader: FrameReader<std::net::TcpStream>,
    mut writer: FrameWriter<std::net::TcpStream>,
    ram: &GuestRam,
    push: &PushState,
    counters: &SourceCounters,
) -> Result<(), WireError> {
    let mut page = vec![0u8; PAGE];
    while !push.stop.load(Ordering::Acquire) {
        let (id, gpa) = match reader.poll("waiting for page requests") {
            Ok(None) => continue,
            Ok(Some(Message::PageRequest { id, gpa })) => (id, gpa),
            Ok(Some(other)) => {
                let e = wire::unexpected(other, "waiting for page requests", "PageRequest");
                let _ = writer.send(
                    &Message::Error {
                        code: ErrorCode::Protocol,
                        message: e.to_string(),
                    },
                    "reporting an error",
                );
                return Err(e);
            }
            Err(WireError::Closed { .. }) if push.stop.load(Ordering::Acquire) => return Ok(()),
            Err(e) => return Err(e),
        };
        let index = match check_run(&ram.layout, Kind::PageRequest, gpa, 1) {
            Ok(i) => i,
            Err(e) => {
                let _ = writer.send(
                    &Message::Error {
                        code: ErrorCode::Protocol,
                        message: e.to_string(),
                    },
                    "reporting an error",
                );
                return Err(e);
            }
        };
        ram.copy_pages(index, &mut page);
        let before = writer.bytes_written();
        writer.send(
            &Message::PageReply {
                id,
                gpa,
                data: &page,
            },
            "sending a page reply",
        )?;
        SourceCounters::add(&counters.bytes_sent, writer.bytes_written() - before);
        SourceCounters::add(&counters.pages_sent, 1);
        SourceCounters::add(&counters.faults_served, 1);
        push.sent.insert(index);
        push.hint.store(index, Ordering::Release);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn postcopy(
    main: &mut Channel,
    urgent: Channel,
    ram: &GuestRam,
    counters: &SourceCounters,
    state: &[u8],
    holds: PageSet,
    opts: &MigrateOptions,
    started: &mut bool,
    blackout_start: Instant,
    report: &dyn Fn(Phase, u32, u64),
    rounds: u32,
) -> Result<(Duration, DoneStats), SourceError> {
    let total = ram.layout.total_pages();
    let push = PushState {
        sent: AtomicPageSet::from_set(&holds),
        hint: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
    };
    send_counted(main, counters, &Message::State(state), "sending State")?;
    let (ureader, uwriter, ustream) = urgent.into_parts();
    std::thread::scope(|scope| {
        let server = std::thread::Builder::new()
            .name("mig-urgent-srv".into())
            .spawn_scoped(scope, || {
                let _priority = thread_priority::enter(ThreadRole::Urgent);
                urgent_server(ureader, uwriter, ram, &push, counters)
            })
            .map_err(|e| SourceError::Vm {
                op: "spawning the urgent page server thread",
                message: e.to_string(),
            });
        let server = match server {
            Ok(s) => s,
            Err(e) => return Err(e),
        };
        let result = (|| -> Result<(Duration, DoneStats), SourceError> {
            send_counted(
                main,
                counters,
                &Message::PostcopyStart,
                "sending PostcopyStart",
            )?;
            wait_started(main, &opts.timeouts)?;
            *started = true;
            let blackout = blackout_start.elapsed();
            report(Phase::Postcopy, rounds, total - holds.count());
            let push_start = Instant::now();
            let bytes_before = SourceCounters::get(&counters.bytes_sent);
            let mut sender = PageSender::new(ram, counters, opts.zero_runs, true);
            let mut cursor = 0u64;
            let mut frames = 0u64;
            loop {
                let hint = push.hint.swap(u64::MAX, Ordering::AcqRel);
                if hint != u64::MAX {
                    // Move on to the pages after the latest fault: the guest is likely to want them next.
                    sender.flush(&mut main.writer)?;
                    cursor = hint + 1;
                }
                let Some(index) = push.sent.next_absent(cursor) else {
                    break;
                };
                if index < cursor {
                    // Wrapped around: finish the pending frame before starting over.
                    sender.flush(&mut main.writer)?;
                }
                cursor = index + 1;
                if push.sent.insert(index) {
                    sender.add(&mut main.writer, index)?;
                    frames += 1;
                    if frames.is_multiple_of(16384) {
                        report(
                            Phase::Postcopy,
                            rounds,
                            total - push.sent.snapshot().count(),
                        );
                    }
                }
            }
            sender.flush(&mut main.writer)?;
            SourceCounters::add(
                &counters.transfer_bytes,
                SourceCounters::get(&counters.bytes_sent) - bytes_before,
            );
            SourceCounters::add(
                &counters.transfer_ns,
                push_start.elapsed().as_nanos() as u64,
            );
            send_counted(
                main,
                counters,
                &Message::Complete { pages: total },
                "sending Complete",
            )?;
            let done = wait_done(main, &opts.timeouts)?;
            Ok((blackout, done))
        })();
        push.stop.store(true, Ordering::Release);
        let _ = ustream.shutdown(std::net::Shutdown::Both);
        let served = server.join();
        let done = result?;
        match served {
            Ok(Ok(())) | Ok(Err(WireError::Closed { .. })) => Ok(done),
            Ok(Err(e)) => Err(SourceError::UrgentServer(e)),
            Err(_) => Err(SourceError::Vm {
                op: "urgent page server thread",
                message: "panicked".into(),
            }),
        }
    })
}
