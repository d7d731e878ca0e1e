//! The destination side (`vmm receive`): wait for one incoming VM, build it from what the source
//! announces, receive its memory and state, run it, and serve postcopy faults through the
//! migration crate's engine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::auth::Secret;
use migration::destination::{self, DestinationVm, PostcopyOutcome, PostcopySink};
use migration::postcopy::{PostcopyEngine, PostcopyStats, ServeMode};
use migration::stats::{DestinationStats, RegionServe};
use migration::types::{Granularity, HookError, Mode, PageFetcher, PageSet, PAGE_SIZE};

use super::kvm_hooks::KvmDirtyLog;
use super::StateBlobError;
use crate::api::ApiServer;
use crate::control::{Origin, VmController};
use crate::events::EventMonitor;
use crate::launcher::{self, LaunchError, RunOutcome, SerialTarget};
use crate::memory::{Backing, GuestRam, MemoryError, Region};
use crate::signals;
use crate::vm::{Vm, VmError, VmState};

/// What `vmm receive` needs.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    pub listen: SocketAddr,
    pub backing: Backing,
    pub granularity: Granularity,
    pub secret_file: Option<PathBuf>,
    /// TLS directory (QEMU's layout: ca-cert.pem, server-cert.pem, server-key.pem): every
    /// connection, recoveries included, must run TLS 1.3 with a client certificate of the CA.
    pub tls_dir: Option<PathBuf>,
    /// Allow plaintext (with a secret) on a non-loopback address.
    pub allow_plaintext: bool,
    pub serial: SerialTarget,
    /// Where to write the destination's statistics as JSON when the migration completes.
    pub stats_json: Option<PathBuf>,
    /// How long to wait in postcopy-paused for the source to reconnect after a link failure.
    pub recover_timeout: Duration,
    /// The control API's socket: it answers from the start (the migration's statistics while
    /// the VM arrives) and, once the VM runs, every request a booted VM answers.
    pub api_socket: Option<PathBuf>,
}

/// Errors of `vmm receive`.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("reading the secret file: {0}")]
    Secret(#[source] migration::auth::AuthError),
    #[error("TLS settings from {dir}: {source}", dir = dir.display())]
    Tls {
        dir: PathBuf,
        source: migration::tls::TlsError,
    },
    #[error("listening for a migration on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: destination::DestinationError,
    },
    #[error("accepting the migration: {0}")]
    Accept(#[source] destination::DestinationError),
    #[error("the source's VM cannot be built here: {0}")]
    Incompatible(String),
    #[error("the source's VM cannot be built here: {vcpus} vCPUs is more than this VMM runs")]
    TooManyVcpus { vcpus: u32 },
    #[error(
        "the source's VM cannot be built here: {bytes} bytes of guest RAM on {backing}: {source}"
    )]
    Memory {
        bytes: u64,
        backing: Backing,
        #[source]
        source: MemoryError,
    },
    #[error("the source's VM cannot be built here: registering guest memory with KVM: {0}")]
    Register(#[source] MemoryError),
    #[error("building the VM: {0}")]
    Vm(#[from] VmError),
    #[error("the migration failed: {0}")]
    Receive(#[source] destination::DestinationError),
    /// The VM ran here and cannot be completed. Its memory and vCPU threads were left as
    /// they were (faulting vCPUs blocked, nothing torn down), for the process to exit.
    #[error("{0}")]
    Lost(#[source] destination::DestinationError),
    #[error("running the VM: {0}")]
    Run(#[from] LaunchError),
    #[error("control API: {0}")]
    Api(#[from] crate::api::ApiError),
    #[error("writing statistics to {path}: {source}")]
    Stats {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The regions' fallback reasons, distinct, joined by "; ".
fn native_fallback(regions: &[RegionServe]) -> Option<String> {
    let mut reasons: Vec<&str> = Vec::new();
    for r in regions {
        if let Some(why) = r.native_fallback.as_deref() {
            if !reasons.contains(&why) {
                reasons.push(why);
            }
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// The incoming VM as the destination protocol driver sees it.
struct DestSide {
    vm: Arc<Vm>,
    strategy: Granularity,
    engine: Mutex<Option<Arc<EngineSink>>>,
    /// Postcopy and hybrid: the engine built before Ready (plans and statistics, about 2 ms),
    /// which begin_postcopy prepares inside the blackout. None once taken.
    prebuilt: Mutex<Option<PostcopyEngine>>,
    /// Postcopy and hybrid: the memslots were registered before Ready with dirty logging on
    /// (see `receive`), because the engine is expected to stage.
    dirty_logged: bool,
    /// Set once the vCPUs were started.
    started: Arc<AtomicBool>,
    ctl: Arc<VmController>,
}

/// The postcopy engine as the protocol driver's bulk-page sink.
struct EngineSink {
    engine: PostcopyEngine,
    /// How each region is served (prepare()'s report).
    serve: Vec<RegionServe>,
}

/// Why a hook of the incoming VM failed, where the VM's, guest memory's or the postcopy
/// engine's own error (passed through unchanged) would not say it.
#[derive(Debug, thiserror::Error)]
pub enum IncomingVmError {
    #[error("the bulk page at gpa {gpa:#x} is {len} bytes, not 4096")]
    PageSize { gpa: u64, len: usize },
    #[error("punching stale pages {gpa:#x}+{len:#x} out of guest memory failed: {source}")]
    PunchHole {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("dropping stale pages {gpa:#x}+{len:#x} from guest memory failed: {source}")]
    Discard {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

impl PostcopySink for EngineSink {
    fn bulk_page(&self, gpa: u64, data: &[u8]) -> Result<(), HookError> {
        let page: &[u8; 4096] = data.try_into().map_err(|_| IncomingVmError::PageSize {
            gpa,
            len: data.len(),
        })?;
        self.engine.bulk_page(gpa, page)?;
        Ok(())
    }

    fn bulk_pages(&self, gpa: u64, data: &[u8]) -> Result<(), HookError> {
        self.engine.bulk_pages(gpa, data)?;
        Ok(())
    }

    fn bulk_zero(&self, gpa: u64, count: u64) -> Result<(), HookError> {
        // Guest RAM here starts zero-filled: the engine only marks the pages arrived.
        self.engine.bulk_zero(gpa, count)?;
        Ok(())
    }

    fn live(&self) -> Option<Arc<migration::live_stats::EngineLive>> {
        Some(self.engine.live())
    }

    fn finished(&self) -> Result<PostcopyOutcome, HookError> {
        self.engine.wait_complete()?;
        let s = self.engine.stats();
        Ok(PostcopyOutcome {
            collapses: s.collapses,
            faults: s.faults_served,
        })
    }
}

impl DestSide {
    /// Whether the postcopy engine will most likely stage this backing (and so log dirty
    /// pages): hugetlb unless whole-page service was asked for (native falls back to staging
    /// on kernels without HGM), and guest_memfd always.
    fn expects_staging(backing: Backing, strategy: Granularity) -> bool {
        match backing {
            Backing::GuestMemfd => true,
            b if b.is_hugetlb() => strategy != Granularity::Huge,
            _ => false,
        }
    }

    /// The postcopy engine over this VM's RAM: plans and statistics, nothing mapped yet.
    fn build_engine(&self) -> Result<PostcopyEngine, migration::postcopy::PostcopyError> {
        PostcopyEngine::new(
            super::ram_regions(self.vm.ram()),
            self.strategy,
            Arc::new(KvmDirtyLog {
                vm: self.vm.clone(),
            }),
        )
    }

    /// Registers every memslot, with dirty logging if `dirty_log`, bound to its guest_memfd if
    /// `bind` (a staged guest_memfd region runs from a plain slot; its collapse maps the
    /// guest_memfd under that slot's address, and the slot stays plain).
    fn register_slots(&self, dirty_log: bool, bind: bool) -> Result<(), MemoryError> {
        let ram = self.vm.ram();
        for i in 0..ram.regions().len() {
            ram.set_slot(self.vm.fd(), i, dirty_log, bind)?;
        }
        Ok(())
    }
}

impl DestinationVm for DestSide {
    fn write_pages(&self, gpa: u64, data: &[u8]) -> Result<(), HookError> {
        let dst = self.vm.ram().host_ptr(gpa, data.len() as u64)?;
        // SAFETY: host_ptr checked that gpa..gpa+len lies in one region's primary mapping,
        // which lives as long as the VM; vCPUs are not running yet, so nothing else accesses it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn load_state(&self, state: &[u8]) -> Result<(), HookError> {
        let state: VmState = serde_json::from_slice(state).map_err(StateBlobError::Decode)?;
        Ok(self.vm.restore_state(&state)?)
    }

    fn begin_postcopy(
        &self,
        fetcher: Arc<dyn PageFetcher>,
        present: &PageSet,
    ) -> Result<Arc<dyn PostcopySink>, HookError> {
        let t0 = std::time::Instant::now();
        if present.count() > 0 {
            discard_absent_pages(self.vm.ram(), present)?;
        }
        let t_discard = t0.elapsed();
        let prebuilt = self.prebuilt.lock().ok().and_then(|mut p| p.take());
        let mut engine = match prebuilt {
            Some(engine) => engine,
            None => self.build_engine()?,
        };
        engine.set_vcpu_tids(self.vm.vcpu_tids());
        let t_new = t0.elapsed();
        let report = engine.prepare(fetcher)?;
        if self.dirty_logged {
            // A region the engine does not stage after all (native service) needs no log.
            for r in &report.regions {
                if !matches!(r.mode, ServeMode::Staged(_)) {
                    self.vm
                        .ram()
                        .set_slot_dirty_log(self.vm.fd(), r.slot as usize, false)?;
                }
            }
        }
        tracing::debug!(
            discard_us = t_discard.as_micros() as u64,
            engine_new_us = (t_new - t_discard).as_micros() as u64,
            prepare_us = (t0.elapsed() - t_new).as_micros() as u64,
            "postcopy set up (inside the blackout)"
        );
        let serve = RegionServe::from_report(&report);
        // Say how every region is served, and why native was not used where it was asked for:
        // on stderr (operators, the harness log) as well as in the statistics.
        for r in &serve {
            tracing::info!(
                "postcopy slot {} ({}): serve mode {}{}",
                r.slot,
                r.kind,
                r.serve_mode,
                r.note
                    .as_deref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            );
        }
        if let Some(why) = native_fallback(&serve) {
            tracing::info!("native postcopy fell back to 4 KiB staging: {why}");
        }
        // Pages that came in precopy rounds (hybrid) are in guest memory already (page cache,
        // huge page, anonymous mapping): the engine only marks them, serves them locally and
        // never asks the source for them.
        for_each_run(self.vm.ram(), present, true, |r, start, count| {
            engine
                .mark_present(r.guest_addr + start * PAGE_SIZE, count)
                .map(|_| ())
        })?;
        let sink = Arc::new(EngineSink { engine, serve });
        if let Ok(mut e) = self.engine.lock() {
            *e = Some(sink.clone());
        }
        Ok(sink)
    }

    fn vcpu_tids(&self) -> Vec<i32> {
        self.vm.vcpu_tids()
    }

    fn start(&self) -> Result<(), HookError> {
        let postcopy = self.engine.lock().map(|e| e.is_some()).unwrap_or(false);
        if !postcopy {
            self.register_slots(false, true)?;
        }
        self.started.store(true, Ordering::SeqCst);
        self.ctl.incoming_started();
        self.vm.resume();
        Ok(())
    }
}

/// Drops every page postcopy still has to bring (never sent, or sent in a precopy round and
/// discarded since because the guest dirtied it) from anonymous and shmem memory, so the guest's
/// next touch faults into the engine instead of reading stale data. Staged backings (hugetlb,
/// guest_memfd) need nothing: the engine maps empty staging over them and fetches what has not
/// arrived.
fn discard_absent_pages(ram: &GuestRam, present: &PageSet) -> Result<(), IncomingVmError> {
    if !matches!(ram.backing(), Backing::Anon | Backing::Shmem) {
        return Ok(());
    }
    for_each_run(ram, present, false, |r, start, count| {
        let (off, len) = (start * PAGE_SIZE, count * PAGE_SIZE);
        // shmem on 2 MiB folios keeps its page cache: a hole punched in part of a folio would
        // split it, and the unit's collapse would have to copy it. What a page there holds
        // from a precopy round stays unreachable: the guest's mapping of it is dropped below,
        // the engine maps a page only once it arrived, and an arrival overwrites it (a fetched
        // or bulk page is written, and a zero run rewrites every page that had data; see the
        // migration crate's destination).
        if let Some(fd) = r.raw_fd().filter(|_| !r.huge_folios) {
            // Punching a hole in the region's own memfd only drops page cache contents in the
            // given range, which no one else uses yet.
            if let Err(e) = nix::fcntl::fallocate(
                fd,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (r.fd_offset + off) as libc::off_t,
                len as libc::off_t,
            ) {
                return Err(IncomingVmError::PunchHole {
                    gpa: r.guest_addr + off,
                    len,
                    source: std::io::Error::from(e),
                });
            }
        }
        r.primary
            .discard(off as usize, len as usize)
            .map_err(|source| IncomingVmError::Discard {
                gpa: r.guest_addr + off,
                len,
                source,
            })
    })
}

/// Calls `f(region, first page in the region, page count)` for every maximal run of pages whose
/// membership in `set` (global page numbers over all regions, in order) equals `member`.
fn for_each_run<E>(
    ram: &GuestRam,
    set: &PageSet,
    member: bool,
    mut f: impl FnMut(&Region, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut first_page = 0u64;
    for r in ram.regions() {
        let pages = r.size / PAGE_SIZE;
        for (start, count) in set.runs(member, first_page, first_page + pages) {
            f(r, start - first_page, count)?;
        }
        first_page += pages;
    }
    Ok(())
}

/// Runs `vmm receive`: returns how the received guest ended.
pub fn receive(
    cfg: &ReceiveConfig,
    events: Option<Arc<EventMonitor>>,
) -> Result<RunOutcome, ReceiveError> {
    signals::install().map_err(|e| ReceiveError::Run(LaunchError::Signals(e)))?;
    let ctl = VmController::new(
        Origin::Received,
        Some(Arc::new(super::source::Migrator)),
        events,
    );
    // Accepting and receiving block; a SIGINT/SIGTERM before the migration completes ends
    // the process at once, from this thread: nothing is torn down first (no userfaultfd is
    // closed, no staging unmapped), so a vCPU waiting for a page that never arrived never runs
    // on (exit_group kills it in its wait), and the kernel frees guest RAM with the process.
    let started = Arc::new(AtomicBool::new(false));
    {
        let started = started.clone();
        let api_socket = cfg.api_socket.clone();
        signals::on_signal(move |sig| {
            if started.load(Ordering::SeqCst) {
                tracing::error!(
                    "signal {sig} during the migration: VM lost (it ran here with pages that had not arrived; the source's copy is stale)"
                );
            } else {
                tracing::warn!(
                    "signal {sig} during the migration, exiting (the VM never started here; the source keeps it)"
                );
            }
            if let Some(p) = &api_socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(128 + sig);
        });
    }
    let secret = match &cfg.secret_file {
        Some(p) => Some(Secret::from_file(p).map_err(ReceiveError::Secret)?),
        None => None,
    };
    let timeouts = migration::Timeouts {
        recover: cfg.recover_timeout,
        ..Default::default()
    };
    let tls =
        match &cfg.tls_dir {
            Some(dir) => Some(migration::tls::ServerTls::from_dir(dir).map_err(|source| {
                ReceiveError::Tls {
                    dir: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let listener =
        destination::listen_secure(cfg.listen, secret, tls, cfg.allow_plaintext, timeouts)
            .map_err(|source| ReceiveError::Listen {
                addr: cfg.listen,
                source,
            })?;
    tracing::info!(
        "waiting for a migration on {}{}",
        cfg.listen,
        if cfg.tls_dir.is_some() {
            " (TLS 1.3, client certificate required)"
        } else {
            ""
        }
    );
    let monitor = migration::ReceiveMonitor::new();
    if let Some(ev) = ctl.event_sink() {
        monitor.set_event_sink(ev);
    }
    ctl.set_incoming(monitor.clone());
    let api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p, ctl.clone())?),
        None => None,
    };
    let incoming = listener
        .accept_with(monitor)
        .map_err(ReceiveError::Accept)?;
    tracing::info!(
        "incoming migration session {:#x} from {}",
        incoming.session_id(),
        incoming.peer()
    );
    let config = incoming.config().clone();
    let memory = config.layout.total_bytes();
    let vcpus = match u8::try_from(config.vcpu_count) {
        Ok(v) => v,
        Err(_) => {
            let e = ReceiveError::TooManyVcpus {
                vcpus: config.vcpu_count,
            };
            incoming.reject(&e.to_string());
            return Err(e);
        }
    };
    if let Err(source) = GuestRam::validate(cfg.backing, memory) {
        let e = ReceiveError::Memory {
            bytes: memory,
            backing: cfg.backing,
            source,
        };
        incoming.reject(&e.to_string());
        return Err(e);
    }
    if cfg.backing == Backing::Anon && config.mode != Mode::Precopy {
        // Anonymous memory is served by UFFDIO_COPY; that needs no alias, so it works too.
        tracing::debug!("postcopy into anonymous memory: faults are served with UFFDIO_COPY");
    }
    let console = launcher::console_for(&cfg.serial)?;
    let vm = match Vm::with_memslots(cfg.backing, memory, vcpus, console, false) {
        Ok(vm) => vm,
        Err(e) => {
            incoming.reject(&e.to_string());
            return Err(e.into());
        }
    };
    let theirs: Vec<(u64, u64)> = config
        .layout
        .regions()
        .iter()
        .map(|r| (r.gpa, r.size))
        .collect();
    let ours: Vec<(u64, u64)> = vm
        .ram()
        .regions()
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if theirs != ours {
        let msg = layout_mismatch(&theirs, &ours);
        incoming.reject(&msg);
        return Err(ReceiveError::Incompatible(msg));
    }
    if config.mode != Mode::Precopy && vm.ram().prefaults() {
        // Before Ready: the source still runs while guest RAM is allocated and zeroed.
        let t = std::time::Instant::now();
        if let Err(e) = vm.ram().prefault() {
            incoming.reject(&e.to_string());
            return Err(ReceiveError::Vm(e.into()));
        }
        tracing::debug!(
            "faulted in {} MiB of {} guest memory in {:.0} ms",
            memory >> 20,
            cfg.backing,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let mut vm = vm;
    vm.start_vcpus_paused()?;
    let vm = Arc::new(vm);
    ctl.set_vm(vm.clone());
    let strategy = cfg.granularity;
    let postcopy = config.mode != Mode::Precopy;
    let dirty_logged = postcopy && DestSide::expects_staging(cfg.backing, strategy);
    let side = DestSide {
        vm: vm.clone(),
        strategy,
        engine: Mutex::new(None),
        prebuilt: Mutex::new(None),
        dirty_logged,
        started: started.clone(),
        ctl: ctl.clone(),
    };
    if postcopy {
        // Register the memslots now, before Ready, the way begin_postcopy needs them, with
        // dirty logging already on where the engine is expected to stage. Creating a memslot
        // allocates KVM's per-page metadata and turning dirty logging on its bitmap: 0.6-7.5 ms
        // for 1 GiB measured here, which begin_postcopy would otherwise spend in the blackout.
        let bind = cfg.backing != Backing::GuestMemfd;
        if let Err(source) = side.register_slots(dirty_logged, bind) {
            let e = ReceiveError::Register(source);
            incoming.reject(&e.to_string());
            return Err(e);
        }
        // Likewise the engine's plans and statistics. If this fails, begin_postcopy builds it
        // again and reports the error then (a precopy-only outcome never needs it).
        match side.build_engine() {
            Ok(engine) => {
                if let Ok(mut p) = side.prebuilt.lock() {
                    *p = Some(engine);
                }
            }
            Err(e) => tracing::debug!("building the postcopy engine before Ready: {e}"),
        }
    }
    let summary = match incoming.receive(&side) {
        Ok(s) => s,
        Err(e) if started.load(Ordering::SeqCst) => {
            // The guest ran here and pages are missing that only the source had. Tearing
            // anything down now (the engine closes its userfaultfd, the staging is unmapped)
            // would let a vCPU read those pages as zeros: stop the vCPUs that can be stopped,
            // keep the rest blocked in their faults, and leave the whole VM to the process
            // exit, which kills every thread where it waits.
            for v in vm.request_pause_all() {
                tracing::debug!("pausing a vCPU of the lost VM: {v}");
            }
            std::mem::forget(side);
            std::mem::forget(vm);
            drop(api);
            return Err(ReceiveError::Lost(e));
        }
        Err(e) => {
            signals::record_only();
            return Err(ReceiveError::Receive(e));
        }
    };
    // From here a signal stops the received VM cleanly (launcher::wait).
    signals::record_only();
    tracing::debug!(?summary, "migration received");
    let engine = side.engine.lock().ok().and_then(|e| e.clone());
    if let Some(path) = &cfg.stats_json {
        let stats = destination_stats(
            cfg,
            &summary,
            engine.as_ref().map(|e| e.engine.stats()),
            engine.as_ref().map(|e| e.engine.live()),
            engine.as_ref().map(|e| e.serve.clone()).unwrap_or_default(),
        );
        let text = serde_json::to_string_pretty(&stats).unwrap_or_default();
        std::fs::write(path, text).map_err(|source| ReceiveError::Stats {
            path: path.clone(),
            source,
        })?;
    }
    ctl.incoming_completed();
    let outcome = launcher::run_until_stopped(&vm, &ctl, api);
    drop(engine);
    Ok(outcome?)
}

/// A short, one-line account of how two RAM layouts differ: the region counts and the first
/// region that is not the same (a layout of hundreds of regions must not make an error line of
/// kilobytes).
fn layout_mismatch(theirs: &[(u64, u64)], ours: &[(u64, u64)]) -> String {
    let first = theirs.iter().zip(ours).position(|(a, b)| a != b);
    let at = match first {
        Some(i) => format!(
            "; region {i} is {:#x}+{:#x} on the source, {:#x}+{:#x} here",
            theirs[i].0, theirs[i].1, ours[i].0, ours[i].1
        ),
        None => String::new(),
    };
    format!(
        "RAM layout differs: the source has {} region(s), this destination {}{at}",
        theirs.len(),
        ours.len()
    )
}

fn destination_stats(
    cfg: &ReceiveConfig,
    summary: &migration::stats::ReceiveSummary,
    engine: Option<PostcopyStats>,
    live: Option<Arc<migration::live_stats::EngineLive>>,
    regions: Vec<RegionServe>,
) -> DestinationStats {
    let ms = |ns: u64| ns as f64 / 1e6;
    let e = engine.unwrap_or_default();
    let (hugetlb, pmd) = smaps_huge_kb();
    DestinationStats {
        mode: summary.mode,
        backing: cfg.backing,
        granularity: cfg.granularity,
        total_ms: summary.total_ms,
        start_ms: summary.start_ms,
        bytes_received: summary.bytes_received,
        pages_received: summary.stats.pages_received,
        urgent_pages: summary.stats.urgent_pages,
        bulk_pages: summary.stats.bulk_pages,
        faults_served: e.faults_served,
        pages_fetched: e.pages_fetched,
        pages_fetched_local: e.pages_served_locally,
        collapses: e.collapses,
        collapses_skipped: e.collapses_skipped,
        collapse_failures: e.collapse_failures,
        collapse_stall_ns: e.collapse_records.iter().map(|r| r.stall_ns).collect(),
        collapse_total_ns: e.collapse_records.iter().map(|r| r.total_ns).collect(),
        fault_ns: e.fault_latency_ns,
        outage_fault_ns: e.outage_fault_latency_ns,
        staging_peak_bytes: (e.staging_peak_mib * 1024.0 * 1024.0) as u64,
        staging_current_bytes: e.staging_current_bytes,
        recoveries: summary.recoveries,
        paused_ms: summary.paused_ms,
        postcopy_vcpu_blocktime_ms: live
            .as_ref()
            .map(|l| l.vcpu_blocked_ns().into_iter().map(ms).collect())
            .unwrap_or_default(),
        postcopy_blocktime_ms: live.as_ref().map(|l| ms(l.all_blocked_ns())),
        smaps_hugetlb_kb: hugetlb,
        smaps_shmem_pmd_kb: pmd,
        native_fallback: native_fallback(&regions),
        regions,
        collapse_methods: e
            .collapse_records
            .iter()
            .map(|r| r.method.to_string())
            .collect(),
        fault_phase_us: e.fault_phase_us,
        slow_faults: e.slow_faults,
    }
}

/// Sums Private_Hugetlb + Shared_Hugetlb and ShmemPmdMapped over this process's mappings (kB).
pub fn smaps_huge_kb() -> (u64, u64) {
    let entries = crate::memory::smaps::read().unwrap_or_default();
    let sum = |keys: &[&str]| -> u64 {
        entries
            .iter()
            .flat_map(|e| keys.iter().map(move |k| e.field(k)))
            .sum()
    };
    (
        sum(&["Private_Hugetlb", "Shared_Hugetlb"]),
        sum(&["ShmemPmdMapped", "FilePmdMapped"]),
    )
}
