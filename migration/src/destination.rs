//! Destination-side protocol driver: accepts one authenticated source, validates its Config,
//! receives pages and state, starts the VM at switchover, and in postcopy hands the urgent channel
//! to the memory engine as a [`PageFetcher`] while bulk pages keep arriving on the main channel.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Secret;
use crate::live_stats::{EngineLive, ReceiveMonitor};
use crate::liveness::{Heartbeat, SharedWriter};
use crate::stats::ReceiveSummary;
use crate::thread_priority::{self, PriorityGuard, ThreadRole};
use crate::transport::{Acceptor, Channel, LiveChannel, Timeouts, TransportError};
use crate::types::{ChannelDown, HookError, Mode, PageFetcher, PageSet, RamLayout, PAGE_SIZE};
use crate::urgent_client::{Unwatched, UrgentClient};
use crate::wire::{
    self, check_run, DoneStats, ErrorCode, Kind, Message, MigrationConfig, WireError, MAX_RUN_PAGES,
};

const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// The VM being received, as the destination driver needs it (the VMM implements this, after it
/// built guest memory from [`IncomingMigration::config`]). Guest memory must start zero-filled:
/// pages announced as zero are not written unless they held data before.
pub trait DestinationVm {
    /// Write whole pages (`data.len()` a multiple of 4096) at `gpa` before the vCPUs run
    /// (precopy and the precopy part of hybrid). `gpa..gpa+len` lies inside one region.
    fn write_pages(&self, gpa: u64, data: &[u8]) -> Result<(), HookError>;
    /// Deliver the device and vCPU state blob (called once, just before `start`).
    fn load_state(&self, state: &[u8]) -> Result<(), HookError>;
    /// Postcopy: set up the memory engine, which fetches missing pages through `fetcher`;
    /// `present` holds the pages already written by `write_pages` (global page indexes of
    /// [`MigrationConfig::layout`]). Returns where bulk pages go from now on.
    fn begin_postcopy(
        &self,
        fetcher: Arc<dyn PageFetcher>,
        present: &PageSet,
    ) -> Result<Arc<dyn PostcopySink>, HookError>;
    /// Start the vCPUs.
    fn start(&self) -> Result<(), HookError>;
    /// Thread ids of the vCPU threads (created by now), for their CPU placement while postcopy
    /// runs ([`crate::cpu_placement`]); the default: none.
    fn vcpu_tids(&self) -> Vec<i32> {
        Vec::new()
    }
}

/// What the postcopy engine did, reported back to the source in Done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyOutcome {
    pub collapses: u64,
    pub faults: u64,
}

/// The postcopy engine's entry points for bulk pages (the engine implements this).
pub trait PostcopySink: Send + Sync {
    /// One 4 KiB page arrived on the main channel (it may also have been fetched already).
    fn bulk_page(&self, gpa: u64, data: &[u8]) -> Result<(), HookError>;
    /// Whole pages from `gpa` on (`data.len()` a multiple of 4096, inside one region) arrived
    /// on the main channel: the same as [`PostcopySink::bulk_page`] for each, which the default
    /// does; an implementation may store the run at once.
    fn bulk_pages(&self, gpa: u64, data: &[u8]) -> Result<(), HookError> {
        for (i, page) in data.chunks_exact(PAGE).enumerate() {
            self.bulk_page(gpa + i as u64 * PAGE_SIZE, page)?;
        }
        Ok(())
    }
    /// `count` zero pages from `gpa` arrived (inside one region). The driver calls it only for
    /// pages it never wrote data to, so an implementation may rely on guest memory starting
    /// zero-filled and just mark them arrived; the default writes zeros through `bulk_page`.
    fn bulk_zero(&self, gpa: u64, count: u64) -> Result<(), HookError> {
        for i in 0..count {
            self.bulk_page(gpa + i * PAGE_SIZE, &ZERO_PAGE)?;
        }
        Ok(())
    }
    /// Every page has been sent: finish (e.g. the last collapses) and report.
    fn finished(&self) -> Result<PostcopyOutcome, HookError>;
    /// The engine's live figures ([`crate::postcopy::PostcopyEngine::live`]), which the
    /// receive's [`ReceiveMonitor`] then includes; None (the default): none.
    fn live(&self) -> Option<Arc<EngineLive>> {
        None
    }
}

/// Why receiving a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("migration session: {0}")]
    Session(#[from] TransportError),
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    #[error("{op} failed on the destination VM: {source}")]
    Vm {
        op: &'static str,
        #[source]
        source: HookError,
    },
    #[error("protocol violation by the source: {0}")]
    Protocol(String),
    #[error("cannot start a migration thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the source did not come back within {} s: {source}", waited_ms / 1000)]
    RecoverTimeout {
        waited_ms: u64,
        #[source]
        source: TransportError,
    },
    /// The switchover had begun (the source's State arrived) but the VM never started here:
    /// the source keeps the VM (it resumes it, or an operator decides).
    #[error(
        "the migration was abandoned before the VM started here (the source keeps the VM): {0}"
    )]
    Abandoned(Box<DestinationError>),
    /// The VM already runs here and pages are missing that only the source has.
    #[error("VM lost: the VM runs here with pages that never arrived, and the migration cannot be completed: {0}")]
    AfterStart(Box<DestinationError>),
}

impl DestinationError {
    /// Whether the error is a failure of the link (reset, closed, silent), which the migration
    /// survives once the source's State arrived, by recovering.
    pub fn is_link_failure(&self) -> bool {
        match self {
            DestinationError::Wire(e) => e.is_link_failure(),
            DestinationError::Session(t) => t.is_link_failure(),
            _ => false,
        }
    }
}

fn vm_err(op: &'static str) -> impl FnOnce(HookError) -> DestinationError {
    move |source| DestinationError::Vm { op, source }
}

fn protocol(msg: impl Into<String>) -> DestinationError {
    DestinationError::Protocol(msg.into())
}

/// Listen for one incoming migration at a time.
pub struct Listener {
    acceptor: Arc<Acceptor>,
}

/// Listen on `addr` with default timeouts. Without a secret only loopback addresses are allowed.
pub fn listen(addr: SocketAddr, secret: Option<Secret>) -> Result<Listener, DestinationError> {
    listen_with(addr, secret, Timeouts::default())
}

/// Listen on `addr` with the given timeouts (plaintext: loopback only).
pub fn listen_with(
    addr: SocketAddr,
    secret: Option<Secret>,
    timeouts: Timeouts,
) -> Result<Listener, DestinationError> {
    Ok(Listener {
        acceptor: Arc::new(Acceptor::bind(addr, secret, timeouts)?),
    })
}

/// Listen on `addr`; with `tls` every connection, recoveries included, must run TLS 1.3 with a
/// client certificate of the CA. A non-loopback address needs TLS, or a secret and
/// `allow_plaintext`.
pub fn listen_secure(
    addr: SocketAddr,
    secret: Option<Secret>,
    tls: Option<crate::tls::ServerTls>,
    allow_plaintext: bool,
    timeouts: Timeouts,
) -> Result<Listener, DestinationError> {
    Ok(Listener {
        acceptor: Arc::new(Acceptor::bind_with(
            addr,
            secret,
            tls,
            allow_plaintext,
            timeouts,
        )?),
    })
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, DestinationError> {
        Ok(self.acceptor.local_addr()?)
    }

    /// Wait for a source; authenticate both channels and read and validate its Config.
    /// An error concerns that one connection attempt; the listener stays usable.
    pub fn accept(&self) -> Result<IncomingMigration, DestinationError> {
        self.accept_with(Arc::default())
    }

    /// [`Listener::accept`], publishing the receive's live statistics and events on `monitor`
    /// (status setup from now on).
    pub fn accept_with(
        &self,
        monitor: Arc<ReceiveMonitor>,
    ) -> Result<IncomingMigration, DestinationError> {
        monitor.waiting();
        let session = self.acceptor.accept()?;
        // The clock starts with the source, not with the wait for one.
        monitor.accepting();
        let mut main = session.main;
        let timeouts = *self.acceptor.timeouts();
        let config = match main.reader.read("waiting for Config") {
            Ok(Message::Config(c)) => {
                main.lift_size_limit();
                c
            }
            Ok(other) => {
                let e = wire::unexpected(other, "waiting for Config", "Config");
                main.send_error(ErrorCode::Protocol, &e.to_string());
                return Err(e.into());
            }
            Err(e) => {
                main.send_error(ErrorCode::Protocol, &e.to_string());
                return Err(e.into());
            }
        };
        monitor.config_known(config.layout.total_pages());
        Ok(IncomingMigration {
            session_id: session.id,
            config,
            main,
            urgent: session.urgent,
            timeouts,
            acceptor: Arc::clone(&self.acceptor),
            monitor,
        })
    }
}

/// An authenticated source whose Config was validated; nothing of the VM was accepted yet.
pub struct IncomingMigration {
    session_id: u64,
    config: MigrationConfig,
    main: Channel,
    urgent: Channel,
    timeouts: Timeouts,
    /// Where a recovering source reconnects.
    acceptor: Arc<Acceptor>,
    monitor: Arc<ReceiveMonitor>,
}

impl IncomingMigration {
    /// The receive's live statistics and events.
    pub fn monitor(&self) -> &Arc<ReceiveMonitor> {
        &self.monitor
    }

    /// What the source announced (build guest memory from `config().layout`).
    pub fn config(&self) -> &MigrationConfig {
        &self.config
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// The source's address (main channel).
    pub fn peer(&self) -> SocketAddr {
        self.main.peer()
    }

    /// Refuse the migration (e.g. guest memory could not be built); the source gets `reason`.
    pub fn reject(mut self, reason: &str) {
        self.main.send_error(ErrorCode::Rejected, reason);
        self.main.shutdown();
        self.urgent.shutdown();
    }

    /// Receive the VM into `vm` and start it. On error before the start nothing was started
    /// and the caller releases the memory it built. From the moment the source's State
    /// arrived, a failed link does not end the migration: the destination is postcopy-paused
    /// (faulting vCPUs wait, the others run, collapses go on) and waits up to the recover
    /// timeout for the source to come back into this session.
    pub fn receive(self, vm: &dyn DestinationVm) -> Result<ReceiveSummary, DestinationError> {
        let IncomingMigration {
            session_id,
            config,
            main,
            urgent,
            timeouts,
            acceptor,
            monitor,
        } = self;
        let mut rx = Receiver {
            monitor: monitor.clone(),
            config: &config,
            timeouts,
            session_id,
            acceptor,
            have: PageSet::new(config.layout.total_pages()),
            data_written: PageSet::new(config.layout.total_pages()),
            stats: DoneStats::default(),
            state: None,
            complete: false,
            started: false,
            live: false,
            done_sent: false,
            discarded: false,
            start_ms: 0.0,
            postcopy: None,
            heartbeat: None,
            recoveries: 0,
            paused: Duration::ZERO,
            bytes_before: 0,
        };
        let t0 = Instant::now();
        let mut main = main.into_shared();
        let mut urgent = Some(urgent.into_shared());
        let result = rx.run(vm, &mut main, &mut urgent);
        rx.heartbeat.take();
        if let Some(pc) = rx.postcopy.take() {
            pc.stop();
        }
        if let Some(u) = urgent {
            u.shutdown();
        }
        monitor.bytes.store(
            rx.bytes_before + main.reader.bytes_read(),
            Ordering::Relaxed,
        );
        monitor.finished(result.as_ref().err().map(|e| e.to_string()));
        match result {
            Ok(()) => Ok(ReceiveSummary {
                mode: config.mode,
                session_id,
                total_ms: t0.elapsed().as_secs_f64() * 1000.0,
                start_ms: rx.start_ms,
                state_bytes: rx.state.as_ref().map_or(0, |s| s.len() as u64),
                bytes_received: rx.bytes_before + main.reader.bytes_read(),
                recoveries: rx.recoveries,
                paused_ms: rx.paused.as_secs_f64() * 1000.0,
                stats: rx.stats,
            }),
            Err(e) => {
                if !matches!(
                    e,
                    DestinationError::Wire(WireError::Remote { .. })
                        | DestinationError::RecoverTimeout { .. }
                ) {
                    let code = match e {
                        DestinationError::Vm { .. } | DestinationError::Thread(_) => {
                            ErrorCode::Internal
                        }
                        _ => ErrorCode::Protocol,
                    };
                    main.send_error(code, &e.to_string());
                }
                main.shutdown();
                if rx.started {
                    Err(DestinationError::AfterStart(Box::new(e)))
                } else if rx.state.is_some() {
                    Err(DestinationError::Abandoned(Box::new(e)))
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// The postcopy part of a receive: the engine's sink and the urgent client.
struct Postcopy {
    sink: Arc<dyn PostcopySink>,
    client: Arc<UrgentClient>,
    /// The bulk receive loop (this thread) in the Bulk role while postcopy runs (today the
    /// default priority: the urgent threads are the ones raised; see `thread_priority`).
    _bulk_priority: Option<PriorityGuard>,
    /// The vCPU threads beside the fault path while postcopy runs, under a CPU placement.
    _vcpus_placed: crate::cpu_placement::PlacedThreads,
}

impl Postcopy {
    fn stop(self) {
        self.client.close(ChannelDown::Ended);
    }
}

/// What one step of the receive state machine leaves to do.
enum Flow {
    Continue,
    Finished,
}

struct Receiver<'a> {
    monitor: Arc<ReceiveMonitor>,
    config: &'a MigrationConfig,
    timeouts: Timeouts,
    session_id: u64,
    acceptor: Arc<Acceptor>,
    /// Pages the destination holds (precopy writes, bulk pages, zero runs).
    have: PageSet,
    /// Pages that got non-zero data before the vCPUs ran (a later zero run must overwrite them).
    data_written: PageSet,
    stats: DoneStats,
    state: Option<Vec<u8>>,
    complete: bool,
    started: bool,
    /// The switchover frame arrived: both sides send heartbeats and watch liveness.
    live: bool,
    /// Done went out; the source closing the connection ends the receive.
    done_sent: bool,
    /// A hybrid's Discard frames arrived (its switchover has begun).
    discarded: bool,
    start_ms: f64,
    postcopy: Option<Postcopy>,
    heartbeat: Option<Heartbeat>,
    recoveries: u32,
    paused: Duration,
    /// Bytes read on main channels before the current one.
    bytes_before: u64,
}

impl Receiver<'_> {
    fn layout(&self) -> &RamLayout {
        &self.config.layout
    }

    fn run(
        &mut self,
        vm: &dyn DestinationVm,
        main: &mut LiveChannel,
        urgent: &mut Option<LiveChannel>,
    ) -> Result<(), DestinationError> {
        main.send(&Message::Ready, "sending Ready")?;
        self.monitor
            .ready(self.config.mode, self.layout().total_pages());
        loop {
            match self.step(vm, main, urgent) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Finished) => return Ok(()),
                Err(e) if e.is_link_failure() && (self.state.is_some() || self.switch_near()) => {
                    let e = Arc::new(e);
                    match self.recover(main, &e) {
                        Ok(()) => {}
                        // Every page is here and Done went out: the source may report a
                        // failure, but the VM runs complete here.
                        Err(_) if self.done_sent => {
                            tracing::warn!(
                                "the source did not confirm Done before the link failed ({e}); every page is here"
                            );
                            return Ok(());
                        }
                        Err(r) => return Err(r),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The source may have paused the VM and sent its State although none of it arrived: a
    /// hybrid's Discards came, or a postcopy's Ready went out. Then the destination waits a
    /// short while for the source to ask whether the VM started here (it did not), so the
    /// source can resume it instead of staying paused with the outcome unknown.
    fn switch_near(&self) -> bool {
        match self.config.mode {
            Mode::Postcopy => true,
            Mode::Hybrid => self.discarded,
            Mode::Precopy => self.complete,
        }
    }

    /// How long to wait for the source to come back: the recover timeout once its State
    /// arrived, else a few liveness bounds (see [`Receiver::switch_near`]).
    fn recover_wait(&self) -> Duration {
        if self.state.is_some() {
            self.timeouts.recover
        } else {
            self.timeouts.recover.min(self.timeouts.liveness * 5)
        }
    }

    /// Read and handle one frame of the main channel.
    fn step(
        &mut self,
        vm: &dyn DestinationVm,
        main: &mut LiveChannel,
        urgent: &mut Option<LiveChannel>,
    ) -> Result<Flow, DestinationError> {
        self.monitor.bytes.store(
            self.bytes_before + main.reader.bytes_read(),
            Ordering::Relaxed,
        );
        let msg = match main.reader.read("receiving the migration stream") {
            Ok(m) => m,
            Err(WireError::Closed { .. }) if self.done_sent => return Ok(Flow::Finished),
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::Pages { gpa, data } => {
                let count = (data.len() / PAGE) as u64;
                let first = check_run(self.layout(), Kind::Pages, gpa, count)?;
                match &self.postcopy {
                    Some(pc) => pc
                        .sink
                        .bulk_pages(gpa, data)
                        .map_err(vm_err("storing bulk pages"))?,
                    None => {
                        vm.write_pages(gpa, data).map_err(vm_err("writing pages"))?;
                        for i in first..first + count {
                            self.data_written.insert(i);
                        }
                    }
                }
                for i in first..first + count {
                    self.have.insert(i);
                }
                self.stats.bulk_pages += count;
                self.monitor.pages.fetch_add(count, Ordering::Relaxed);
            }
            Message::ZeroPages { gpa, count } => {
                let count = count as u64;
                let first = check_run(self.layout(), Kind::ZeroPages, gpa, count)?;
                self.zero_pages(vm, gpa, first, count)?;
            }
            Message::Discard { gpa, count } => {
                let count = count as u64;
                let first = check_run(self.layout(), Kind::Discard, gpa, count)?;
                if self.postcopy.is_some() || self.config.mode != Mode::Hybrid {
                    return Err(protocol(
                        "Discard outside the switchover of a hybrid migration",
                    ));
                }
                for i in first..first + count {
                    self.have.remove(i);
                }
                self.discarded = true;
            }
            Message::RoundEnd { round, pages } => {
                tracing::debug!(round, pages, "precopy round received");
                self.monitor.round_received();
            }
            Message::State(blob) => {
                if self.state.is_some() {
                    return Err(protocol("State sent twice"));
                }
                self.state = Some(blob.to_vec());
                self.monitor.state_received();
            }
            Message::Complete { pages } => {
                if pages != self.layout().total_pages() {
                    return Err(protocol(format!(
                        "Complete names {pages} pages but the layout has {}",
                        self.layout().total_pages()
                    )));
                }
                self.complete = true;
                if self.postcopy.is_some() {
                    self.finish_postcopy(main)?;
                } else if self.started {
                    // A precopy whose Done was lost: every page is here.
                    self.send_done(main)?;
                }
            }
            Message::Switchover { nonce } => {
                let writers = self.go_live(main, None)?;
                self.start_heartbeat(writers)?;
                self.switchover(vm, main, nonce)?;
            }
            Message::PostcopyStart { nonce } => {
                let writers = self.go_live(main, urgent.as_mut())?;
                let watch = self.postcopy_start(vm, main, urgent, nonce)?;
                // The threads start once Started is on its way, outside the blackout.
                self.start_heartbeat(writers)?;
                watch.watch().map_err(DestinationError::Thread)?;
            }
            other => {
                return Err(wire::unexpected(
                    other,
                    "receiving the migration stream",
                    "a page, state or control message",
                )
                .into())
            }
        }
        Ok(Flow::Continue)
    }

    /// A zero run arrived: mark it, overwriting only pages that got data before.
    fn zero_pages(
        &mut self,
        vm: &dyn DestinationVm,
        gpa: u64,
        first: u64,
        count: u64,
    ) -> Result<(), DestinationError> {
        match &self.postcopy {
            Some(pc) => {
                // Memory that got data in a precopy round (and was discarded since) must be
                // overwritten; the rest is still zero-filled.
                let mut i = first;
                while i < first + count {
                    let page_gpa = gpa + (i - first) * PAGE_SIZE;
                    if self.data_written.contains(i) {
                        pc.sink
                            .bulk_page(page_gpa, &ZERO_PAGE)
                            .map_err(vm_err("storing a bulk zero page"))?;
                        self.data_written.remove(i);
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < first + count && !self.data_written.contains(j) {
                        j += 1;
                    }
                    pc.sink
                        .bulk_zero(page_gpa, j - i)
                        .map_err(vm_err("storing bulk zero pages"))?;
                    i = j;
                }
            }
            None => {
                for i in first..first + count {
                    if self.data_written.contains(i) {
                        vm.write_pages(gpa + (i - first) * PAGE_SIZE, &ZERO_PAGE)
                            .map_err(vm_err("zeroing a page"))?;
                        self.data_written.remove(i);
                    }
                }
            }
        }
        for i in first..first + count {
            self.have.insert(i);
        }
        self.stats.zero_pages += count;
        self.monitor.zero_pages.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// The switchover frame arrived: from now on a silent link is a dead one, and both sides
    /// send heartbeats (on the writers returned, once [`Receiver::start_heartbeat`] starts them).
    fn go_live(
        &mut self,
        main: &mut LiveChannel,
        urgent: Option<&mut LiveChannel>,
    ) -> Result<Vec<SharedWriter>, DestinationError> {
        if self.live {
            return Err(protocol("a second switchover frame"));
        }
        self.live = true;
        main.set_liveness(self.timeouts.liveness);
        let mut writers = vec![main.writer.clone()];
        if let Some(u) = urgent {
            u.set_liveness(self.timeouts.liveness);
            writers.push(u.writer.clone());
        }
        Ok(writers)
    }

    /// Heartbeats on `writers` from now on.
    fn start_heartbeat(&mut self, writers: Vec<SharedWriter>) -> Result<(), DestinationError> {
        self.heartbeat = Some(
            Heartbeat::start(writers, self.timeouts.heartbeat).map_err(DestinationError::Thread)?,
        );
        Ok(())
    }

    /// postcopy-paused: wait for the source to come back into this session, tell it what we
    /// hold and whether the VM runs, and carry on with the new channels.
    fn recover(
        &mut self,
        main: &mut LiveChannel,
        why: &Arc<DestinationError>,
    ) -> Result<(), DestinationError> {
        let since = Instant::now();
        let wait = self.recover_wait();
        let deadline = since + wait;
        self.heartbeat.take();
        main.shutdown();
        if let Some(pc) = &self.postcopy {
            pc.client.detach(ChannelDown::LinkFailed(Arc::clone(why)));
        }
        self.monitor.paused(why.to_string());
        tracing::warn!(
            "postcopy-paused: the link to the source failed ({why}); {}; waiting up to {} s for the source to reconnect",
            if self.started {
                "vCPUs that touch a missing page wait, the others run"
            } else {
                "the VM has not started here"
            },
            wait.as_secs()
        );
        let session = loop {
            let mut session = match self.acceptor.accept_recovery(self.session_id, deadline) {
                Ok(s) => s,
                Err(e) => {
                    self.paused += since.elapsed();
                    return Err(DestinationError::RecoverTimeout {
                        waited_ms: since.elapsed().as_millis() as u64,
                        source: e,
                    });
                }
            };
            match self.send_recover_state(&mut session.main) {
                Ok(()) => break session,
                Err(e) => {
                    tracing::warn!("recovery handshake failed: {e}");
                    session.main.shutdown();
                    session.urgent.shutdown();
                }
            }
        };
        self.bytes_before += main.reader.bytes_read();
        *main = session.main.into_shared();
        let mut urgent = session.urgent.into_shared();
        main.set_liveness(self.timeouts.liveness);
        let mut writers = vec![main.writer.clone()];
        if let Some(pc) = &self.postcopy {
            urgent.set_liveness(self.timeouts.liveness);
            writers.push(urgent.writer.clone());
            pc.client
                .attach(urgent, main.stream_handle().ok())
                .map_err(DestinationError::Thread)?;
        }
        self.heartbeat = Some(
            Heartbeat::start(writers, self.timeouts.heartbeat).map_err(DestinationError::Thread)?,
        );
        self.recoveries += 1;
        self.paused += since.elapsed();
        self.monitor.recovered(self.postcopy.is_some());
        tracing::warn!(
            "postcopy resumed after {} ms (recovery #{})",
            since.elapsed().as_millis(),
            self.recoveries
        );
        Ok(())
    }

    /// Pages the destination holds: what came on the main channel and as urgent replies.
    fn held(&self) -> PageSet {
        let mut all = self.have.clone();
        if let Some(pc) = &self.postcopy {
            for i in pc.client.received.snapshot().iter() {
                all.insert(i);
            }
        }
        all
    }

    /// Send ReceivedMap runs of every page held, then RecoverState.
    fn send_recover_state(&self, main: &mut Channel) -> Result<(), DestinationError> {
        let held = self.held();
        for (gpa, count) in self.layout().runs(&held, MAX_RUN_PAGES) {
            main.send(
                &Message::ReceivedMap { gpa, count },
                "sending the received map",
            )?;
        }
        main.send(
            &Message::RecoverState {
                started: self.started,
                held_pages: held.count(),
            },
            "sending RecoverState",
        )?;
        Ok(())
    }

    fn take_state(&mut self) -> Result<&[u8], DestinationError> {
        self.state
            .as_deref()
            .ok_or_else(|| protocol("switchover before the State message"))
    }

    /// Every page is here: say Done, then send nothing more (no heartbeat, no page request),
    /// so the source can close cleanly once it read it; its close (EOF) ends the receive.
    fn send_done(&mut self, main: &mut LiveChannel) -> Result<(), DestinationError> {
        self.heartbeat.take();
        if let Some(pc) = &self.postcopy {
            pc.client.detach(ChannelDown::AllArrived);
        }
        main.send(&Message::Done(self.stats), "sending Done")?;
        self.done_sent = true;
        Ok(())
    }

    /// Precopy switchover: load the state, start the vCPUs, and answer Started with the
    /// switchover's `nonce`.
    fn switchover(
        &mut self,
        vm: &dyn DestinationVm,
        main: &mut LiveChannel,
        nonce: u64,
    ) -> Result<(), DestinationError> {
        if self.postcopy.is_some() || self.config.mode != Mode::Precopy {
            return Err(protocol("Switchover in a postcopy or hybrid migration"));
        }
        if !self.complete {
            return Err(protocol("Switchover before Complete"));
        }
        let missing = self.layout().total_pages() - self.have.count();
        if missing != 0 {
            return Err(protocol(format!(
                "Switchover with {missing} page(s) never sent"
            )));
        }
        let t = Instant::now();
        vm.load_state(self.take_state()?)
            .map_err(vm_err("loading device and vCPU state"))?;
        vm.start().map_err(vm_err("starting the vCPUs"))?;
        self.started = true;
        self.monitor.vm_started(false);
        self.start_ms = t.elapsed().as_secs_f64() * 1000.0;
        main.send(&Message::Started { nonce }, "sending Started")?;
        self.stats.pages_received = self.have.count();
        self.send_done(main)
    }

    fn postcopy_start(
        &mut self,
        vm: &dyn DestinationVm,
        main: &mut LiveChannel,
        urgent: &mut Option<LiveChannel>,
        nonce: u64,
    ) -> Result<Unwatched, DestinationError> {
        if self.postcopy.is_some() || self.config.mode == Mode::Precopy {
            return Err(protocol(
                "PostcopyStart in a precopy migration or sent twice",
            ));
        }
        let channel = urgent
            .take()
            .ok_or_else(|| protocol("PostcopyStart sent twice"))?;
        let t = Instant::now();
        self.take_state()?;
        let client = UrgentClient::new(self.layout().clone(), self.timeouts.io);
        let watch = client
            .attach_unwatched(channel, main.stream_handle().ok())
            .map_err(DestinationError::Thread)?;
        self.monitor.attach_urgent(client.clone());
        let fetcher: Arc<dyn PageFetcher> = client.clone();
        let sink = match vm.begin_postcopy(fetcher, &self.have) {
            Ok(s) => s,
            Err(source) => {
                client.close(ChannelDown::SetupFailed);
                return Err(DestinationError::Vm {
                    op: "setting up postcopy",
                    source,
                });
            }
        };
        if let Some(live) = sink.live() {
            self.monitor.attach_engine(live);
        }
        self.postcopy = Some(Postcopy {
            sink,
            client,
            _bulk_priority: Some(thread_priority::enter(ThreadRole::Bulk)),
            _vcpus_placed: crate::cpu_placement::place_threads(&vm.vcpu_tids(), ThreadRole::Vcpu),
        });
        vm.load_state(self.take_state()?)
            .map_err(vm_err("loading device and vCPU state"))?;
        vm.start().map_err(vm_err("starting the vCPUs"))?;
        self.started = true;
        self.monitor.vm_started(true);
        self.start_ms = t.elapsed().as_secs_f64() * 1000.0;
        main.send(&Message::Started { nonce }, "sending Started")?;
        Ok(watch)
    }

    fn finish_postcopy(&mut self, main: &mut LiveChannel) -> Result<(), DestinationError> {
        let Some(pc) = &self.postcopy else {
            return Err(protocol("postcopy not started"));
        };
        // Pages the push skipped were answered on the urgent channel; a reply may still be on its
        // way there, so give the urgent reader a bounded time to catch up.
        let deadline = Instant::now() + self.timeouts.io;
        let all = loop {
            let all = self.held();
            let missing = self.config.layout.total_pages() - all.count();
            if missing == 0 {
                break all;
            }
            if let Some(reason) = pc.client.down_reason() {
                // The urgent link failed with replies outstanding: recover, after which the
                // source pushes what is missing and sends Complete again.
                return Err(DestinationError::Wire(WireError::Io {
                    during: "waiting for the last page replies",
                    source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, reason),
                }));
            }
            if Instant::now() >= deadline {
                return Err(protocol(format!(
                    "Complete with {missing} page(s) neither pushed nor fetched"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let outcome = pc.sink.finished().map_err(vm_err("finishing postcopy"))?;
        self.stats.pages_received = all.count();
        self.stats.urgent_pages = pc.client.replies.load(Ordering::Relaxed);
        self.stats.collapses = outcome.collapses;
        self.stats.faults = outcome.faults;
        self.send_done(main)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// A VMM's own error, as a hook returns it.
    #[derive(Debug, thiserror::Error)]
    #[error("memslot 3 at gpa 0x100000: KVM said no")]
    struct SlotRefused;

    #[test]
    fn a_hook_error_crosses_the_seam_with_its_type_and_message() {
        let e = vm_err("writing pages")(Box::new(SlotRefused));
        assert_eq!(
            e.to_string(),
            "writing pages failed on the destination VM: memslot 3 at gpa 0x100000: KVM said no"
        );
        let source = e.source().expect("the hook's error is the source");
        assert!(source.downcast_ref::<SlotRefused>().is_some(), "{source:?}");
    }
}
