#![allow(dead_code)] // the shared harness (support/harness.rs) has helpers only the other suites use

//! The control plane's side of the migration crate, over real TCP on loopback: live statistics
//! polled during a postcopy migration into a real userfaultfd postcopy engine (the faulting
//! test threads registered as vCPUs), cancel before and after the switchover, the bandwidth
//! caps, the overall timeout, and the event sequence of one migration.

include!("support/harness.rs");

use migration::live_stats::{EventLog, MigrationEvent, MigrationInfo, MigrationStatus};
use migration::postcopy::PostcopyEngine;
use migration::source::{CancelError, MigrationControl};
use migration::types::Granularity;
use migration::ReceiveMonitor;

/// Guest RAM of the destination: anonymous mappings the postcopy engine registers with
/// userfaultfd (MISSING faults, UFFDIO_COPY).
struct AnonRam {
    layout: RamLayout,
    hosts: Vec<usize>,
}

impl AnonRam {
    fn new(layout: &RamLayout) -> Self {
        let hosts = layout
            .regions()
            .iter()
            .map(|r| {
                // SAFETY: a fresh anonymous mapping; the result is checked.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        r.size as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                p as usize
            })
            .collect();
        AnonRam {
            layout: layout.clone(),
            hosts,
        }
    }

    fn regions(&self) -> Vec<RamRegion> {
        self.layout
            .regions()
            .iter()
            .zip(&self.hosts)
            .map(|(r, &h)| RamRegion {
                slot: r.slot,
                gpa: r.gpa,
                size: r.size,
                host_addr: h,
                alias_addr: None,
                fd: None,
                fd_offset: 0,
                kind: Backing::Anon,
                page_size: PAGE_SIZE,
            })
            .collect()
    }

    fn host(&self, page: u64) -> usize {
        let gpa = self.layout.page_gpa(page).unwrap();
        let ri = self.layout.region_of(gpa).unwrap();
        self.hosts[ri] + (gpa - self.layout.regions()[ri].gpa) as usize
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        // SAFETY: one page inside a live mapping of this RAM (a missing page faults and is
        // served by the engine).
        unsafe {
            std::ptr::copy_nonoverlapping(self.host(page) as *const u8, out.as_mut_ptr(), PAGE)
        };
    }
}

impl Drop for AnonRam {
    fn drop(&mut self) {
        for (r, &h) in self.layout.regions().iter().zip(&self.hosts) {
            // SAFETY: our own mapping, no longer used.
            unsafe { libc::munmap(h as *mut libc::c_void, r.size as usize) };
        }
    }
}

struct NoDirty;
impl DirtyLog for NoDirty {
    fn enable(&self, _: u32) -> Result<(), migration::types::HookError> {
        Err("no dirty log here".into())
    }
    fn disable(&self, _: u32) -> Result<(), migration::types::HookError> {
        Err("no dirty log here".into())
    }
    fn fetch(&self, _: u32) -> Result<Vec<u64>, migration::types::HookError> {
        Err("no dirty log here".into())
    }
}

const VCPUS: usize = 2;
const TOUCHES_PER_VCPU: u64 = 400;

/// A postcopy destination with the real engine; `VCPUS` threads read random pages of guest RAM
/// (real userfaults) once started, registered with the engine as the vCPUs.
struct EngineDest {
    ram: Arc<AnonRam>,
    engine: Mutex<Option<Arc<EngineSink>>>,
    vcpus: Mutex<Vec<JoinHandle<()>>>,
    state: Mutex<Option<Vec<u8>>>,
}

struct EngineSink {
    engine: PostcopyEngine,
    vcpus: Mutex<Vec<JoinHandle<()>>>,
}

impl PostcopySink for EngineSink {
    fn bulk_page(&self, gpa: u64, data: &[u8]) -> Result<(), migration::types::HookError> {
        let page: &[u8; 4096] = data.try_into().map_err(|_| "not a page".to_string())?;
        self.engine
            .bulk_page(gpa, page)
            .map(|_| ())
            .map_err(Into::into)
    }
    fn bulk_pages(&self, gpa: u64, data: &[u8]) -> Result<(), migration::types::HookError> {
        self.engine
            .bulk_pages(gpa, data)
            .map(|_| ())
            .map_err(Into::into)
    }
    fn bulk_zero(&self, gpa: u64, count: u64) -> Result<(), migration::types::HookError> {
        self.engine
            .bulk_zero(gpa, count)
            .map(|_| ())
            .map_err(Into::into)
    }
    fn finished(&self) -> Result<PostcopyOutcome, migration::types::HookError> {
        for h in self.vcpus.lock().unwrap().drain(..) {
            h.join().map_err(|_| "a vCPU thread panicked".to_string())?;
        }
        self.engine
            .wait_complete_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let s = self.engine.stats();
        Ok(PostcopyOutcome {
            collapses: s.collapses,
            faults: s.faults_served,
        })
    }
    fn live(&self) -> Option<Arc<migration::live_stats::EngineLive>> {
        Some(self.engine.live())
    }
}

impl DestinationVm for EngineDest {
    fn write_pages(&self, _: u64, _: &[u8]) -> Result<(), migration::types::HookError> {
        Err("postcopy only".into())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), migration::types::HookError> {
        *self.state.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn begin_postcopy(
        &self,
        fetcher: Arc<dyn PageFetcher>,
        _present: &PageSet,
    ) -> Result<Arc<dyn PostcopySink>, migration::types::HookError> {
        let mut engine =
            PostcopyEngine::new(self.ram.regions(), Granularity::FourK, Arc::new(NoDirty))
                .map_err(|e| e.to_string())?;
        engine.prepare(fetcher).map_err(|e| e.to_string())?;
        let sink = Arc::new(EngineSink {
            engine,
            vcpus: Mutex::new(Vec::new()),
        });
        *self.engine.lock().unwrap() = Some(sink.clone());
        Ok(sink)
    }
    fn start(&self) -> Result<(), migration::types::HookError> {
        let sink = self.engine.lock().unwrap().clone().ok_or("no engine")?;
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let go = Arc::new(std::sync::Barrier::new(VCPUS + 1));
        let mut handles = Vec::new();
        for v in 0..VCPUS {
            let (ram, tid_tx, go) = (self.ram.clone(), tid_tx.clone(), go.clone());
            handles.push(std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tid_tx.send((v, tid)).unwrap();
                go.wait();
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + v as u64);
                let total = ram.layout.total_pages();
                for _ in 0..TOUCHES_PER_VCPU {
                    let page = rng.gen_range(0..total);
                    // A read of a missing page is a userfault of this thread.
                    // SAFETY: inside the live mapping.
                    let _ = unsafe { std::ptr::read_volatile(ram.host(page) as *const u8) };
                }
            }));
        }
        let mut tids = vec![0; VCPUS];
        for _ in 0..VCPUS {
            let (v, tid) = tid_rx.recv().unwrap();
            tids[v] = tid;
        }
        sink.engine.set_vcpu_tids(tids);
        go.wait();
        *sink.vcpus.lock().unwrap() = handles;
        *self.vcpus.lock().unwrap() = Vec::new();
        Ok(())
    }
}

type EngineResult = Result<(Arc<AnonRam>, migration::stats::ReceiveSummary), DestinationError>;

fn spawn_engine_destination(
    l: destination::Listener,
    monitor: Arc<ReceiveMonitor>,
) -> JoinHandle<EngineResult> {
    std::thread::spawn(move || {
        let incoming = l.accept_with(monitor)?;
        let vm = EngineDest {
            ram: Arc::new(AnonRam::new(&incoming.config().layout)),
            engine: Mutex::new(None),
            vcpus: Mutex::new(Vec::new()),
            state: Mutex::new(None),
        };
        let summary = incoming.receive(&vm)?;
        // Stop the engine's threads before the RAM goes.
        vm.engine.lock().unwrap().take();
        Ok((vm.ram.clone(), summary))
    })
}

/// `info()` of both sides every `every` while `running`.
fn poll_info(
    every: Duration,
    running: Arc<AtomicBool>,
    read: impl Fn() -> MigrationInfo + Send + 'static,
) -> JoinHandle<Vec<MigrationInfo>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while running.load(Ordering::Acquire) {
            seen.push(read());
            std::thread::sleep(every);
        }
        seen.push(read());
        seen
    })
}

/// Every counter that must never decrease, named.
fn counters(i: &MigrationInfo) -> Vec<(String, u64)> {
    let mut c = vec![
        ("total-time".to_string(), i.total_time),
        ("transferred".into(), i.ram.transferred),
        ("duplicate".into(), i.ram.duplicate),
        ("normal".into(), i.ram.normal),
        ("normal-bytes".into(), i.ram.normal_bytes),
        ("dirty-sync-count".into(), i.ram.dirty_sync_count),
        ("postcopy-requests".into(), i.ram.postcopy_requests),
        ("recoveries".into(), i.recoveries),
        ("paused-time".into(), i.paused_time),
        (
            "postcopy-blocktime".into(),
            i.postcopy_blocktime.unwrap_or(0),
        ),
        ("collapses-done".into(), i.collapses_done.unwrap_or(0)),
        (
            "latency samples".into(),
            i.postcopy_latency_dist.iter().sum::<u64>(),
        ),
    ];
    for (v, b) in i.postcopy_vcpu_blocktime.iter().enumerate() {
        c.push((format!("postcopy-vcpu-blocktime[{v}]"), *b));
    }
    c
}

fn assert_monotonic(side: &str, seen: &[MigrationInfo]) {
    for w in seen.windows(2) {
        for ((name, a), (_, b)) in counters(&w[0]).into_iter().zip(counters(&w[1])) {
            assert!(a <= b, "{side}: {name} went down from {a} to {b}");
        }
        // Once the engine's per-vCPU list appears it never shrinks.
        assert!(
            w[0].postcopy_vcpu_blocktime.len() <= w[1].postcopy_vcpu_blocktime.len(),
            "{side}: the vCPU blocktime list shrank"
        );
    }
}

#[test]
fn statistics_polled_during_a_postcopy_migration_into_the_real_engine() {
    let (l, addr) = listener(None);
    let monitor = ReceiveMonitor::new();
    let dest_events = Arc::new(EventLog::default());
    monitor.set_event_sink(dest_events.clone());
    let dest = spawn_engine_destination(l, monitor.clone());
    let src = TestSource::new(LAYOUT_64M);
    let mut opts = options(Mode::Postcopy, None);
    // Slow the push so the vCPU threads fault on pages it has not reached yet (and the polls
    // see postcopy-active); the urgent replies stay uncapped.
    opts.postcopy_bandwidth = Some(64 << 20);
    let src_events = Arc::new(EventLog::default());
    opts.events = Some(src_events.clone());
    let control = opts.control.clone();
    let running = Arc::new(AtomicBool::new(true));
    let src_polls = {
        let c = control.clone();
        poll_info(Duration::from_millis(20), running.clone(), move || c.info())
    };
    let dest_polls = {
        let m = monitor.clone();
        poll_info(Duration::from_millis(20), running.clone(), move || m.info())
    };
    let summary = source::migrate(&src, addr, opts, &|_| {}).unwrap();
    let (ram, recv) = dest.join().unwrap().unwrap();
    running.store(false, Ordering::Release);
    let src_seen = src_polls.join().unwrap();
    let dest_seen = dest_polls.join().unwrap();
    println!("source: {}", serde_json::to_string(&summary).unwrap());
    println!("destination: {}", serde_json::to_string(&recv).unwrap());
    let (s_end, d_end) = (control.info(), monitor.info());
    println!("source info: {}", serde_json::to_string(&s_end).unwrap());
    println!(
        "destination info: {}",
        serde_json::to_string(&d_end).unwrap()
    );

    // The memory arrived whole.
    let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for p in 0..src.mem.layout.total_pages() {
        ram.read_page(p, &mut a);
        src.mem.read_page(p, &mut b);
        assert!(a == b, "page {p} differs");
    }

    assert_monotonic("source", &src_seen);
    assert_monotonic("destination", &dest_seen);
    for (side, seen) in [("source", &src_seen), ("destination", &dest_seen)] {
        assert!(
            seen.iter()
                .any(|i| i.status == MigrationStatus::PostcopyActive),
            "{side} never showed postcopy-active in {} polls",
            seen.len()
        );
    }
    assert_eq!(s_end.status, MigrationStatus::Completed);
    assert_eq!(d_end.status, MigrationStatus::Completed);
    assert_eq!(s_end.ram.remaining, 0);
    assert_eq!(s_end.ram.total, 64 * MIB);
    assert!(s_end.downtime.is_some() && d_end.downtime.is_some());
    // The urgent channel carried the vCPUs' faults, counted alike on both sides.
    assert!(s_end.ram.postcopy_requests > 0, "no postcopy request");
    assert_eq!(s_end.ram.postcopy_requests, summary.faults_served);
    assert_eq!(d_end.ram.postcopy_requests, recv.stats.urgent_pages);
    assert_eq!(s_end.ram.transferred, summary.bytes_sent);
    // Per-vCPU blocktime from the faulting threads' ids.
    assert_eq!(d_end.postcopy_vcpu_blocktime.len(), VCPUS);
    assert!(
        d_end.postcopy_vcpu_blocktime.iter().sum::<u64>() > 0,
        "no vCPU blocktime: {:?}",
        d_end.postcopy_vcpu_blocktime
    );
    assert!(d_end.postcopy_latency.is_some_and(|l| l > 0));
    let samples: u64 = d_end.postcopy_latency_dist.iter().sum();
    assert!(samples > 0, "empty latency distribution");
    assert!(d_end.postcopy_blocktime.is_some());
    assert_eq!(d_end.collapses_pending, Some(0));
    // Events of both sides, in order.
    let src_ev = src_events.events();
    assert!(matches!(
        src_ev.first(),
        Some(MigrationEvent::Started {
            mode: Mode::Postcopy
        })
    ));
    assert!(
        matches!(src_ev.get(1), Some(MigrationEvent::PostcopyActive)),
        "{src_ev:?}"
    );
    assert!(
        matches!(src_ev.last(), Some(MigrationEvent::Completed { .. })),
        "{src_ev:?}"
    );
    assert_eq!(src_ev.len(), 3, "{src_ev:?}");
    let dest_ev = dest_events.events();
    assert!(
        matches!(dest_ev.first(), Some(MigrationEvent::Started { .. })),
        "{dest_ev:?}"
    );
    assert!(
        matches!(dest_ev.get(1), Some(MigrationEvent::PostcopyActive)),
        "{dest_ev:?}"
    );
    assert!(
        matches!(dest_ev.last(), Some(MigrationEvent::Completed { .. })),
        "{dest_ev:?}"
    );
}

/// A TestSource's pause/resume counts must balance: the VM runs here.
fn assert_runs_here(src: &TestSource) {
    assert_eq!(src.pauses(), src.resumes(), "the source VM was left paused");
}

/// Wait until `control` shows `status` (or panic after 20 s).
fn wait_status(control: &MigrationControl, status: MigrationStatus) {
    assert!(
        wait_until(Duration::from_secs(20), || control.info().status == status),
        "never reached {status}: {:?}",
        control.info()
    );
}

#[test]
fn cancel_during_precopy_leaves_the_vm_running() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    src.run_guest(512);
    let mut opts = options(Mode::Precopy, None);
    opts.precopy_bandwidth = Some(16 << 20); // ~3 s for the first pass
    let events = Arc::new(EventLog::default());
    opts.events = Some(events.clone());
    let control = opts.control.clone();
    assert_eq!(control.cancel(), Err(CancelError::NotRunning));
    let canceller = {
        let c = control.clone();
        std::thread::spawn(move || {
            wait_status(&c, MigrationStatus::Active);
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            c.cancel().unwrap();
            t
        })
    };
    let r = source::migrate(&src, addr, opts, &|_| {});
    let returned = Instant::now();
    let asked = canceller.join().unwrap();
    src.stop_guest();
    assert!(matches!(r, Err(SourceError::Cancelled)), "{r:?}");
    let e = r.unwrap_err();
    assert!(!e.destination_started() && !e.keeps_paused());
    let took = returned.saturating_duration_since(asked);
    assert!(took < Duration::from_millis(500), "cancel took {took:?}");
    assert_runs_here(&src);
    let info = control.info();
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert!(info.ram.transferred > 0 && info.ram.transferred < 64 * MIB);
    assert_eq!(control.cancel(), Err(CancelError::NotRunning));
    // The destination was told.
    let d = dest.join().unwrap();
    assert!(
        matches!(
            &d,
            Err(DestinationError::Wire(wire::WireError::Remote { .. }))
        ),
        "{:?}",
        d.as_ref().err()
    );
    let ev = events.events();
    assert!(matches!(ev.first(), Some(MigrationEvent::Started { .. })));
    assert_eq!(ev.last(), Some(&MigrationEvent::Cancelled), "{ev:?}");
}

#[test]
fn cancel_while_waiting_for_ready_is_prompt() {
    let (l, addr) = listener(None);
    // A destination that accepts and never answers Config with Ready.
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let dest = std::thread::spawn(move || {
        let incoming = l.accept().unwrap();
        let _ = hold_rx.recv_timeout(Duration::from_secs(30));
        drop(incoming);
    });
    let src = TestSource::new(LAYOUT_64M);
    let opts = options(Mode::Precopy, None);
    let control = opts.control.clone();
    let canceller = {
        let c = control.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            c.cancel().unwrap();
            t
        })
    };
    let r = source::migrate(&src, addr, opts, &|_| {});
    let took = Instant::now().saturating_duration_since(canceller.join().unwrap());
    assert!(matches!(r, Err(SourceError::Cancelled)), "{r:?}");
    assert!(took < Duration::from_millis(200), "cancel took {took:?}");
    assert_eq!(src.pauses(), 0);
    assert_eq!(control.info().status, MigrationStatus::Cancelled);
    let _ = hold_tx.send(());
    dest.join().unwrap();
}

#[test]
fn cancel_after_the_switchover_is_refused_and_the_migration_completes() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    let mut opts = options(Mode::Postcopy, None);
    opts.postcopy_bandwidth = Some(32 << 20); // ~2 s of push
    let control = opts.control.clone();
    let canceller = {
        let c = control.clone();
        std::thread::spawn(move || {
            wait_status(&c, MigrationStatus::PostcopyActive);
            c.cancel()
        })
    };
    let summary = source::migrate(&src, addr, opts, &|_| {}).unwrap();
    let refused = canceller.join().unwrap();
    assert_eq!(refused, Err(CancelError::PastSwitchover));
    let msg = CancelError::PastSwitchover.to_string();
    assert!(msg.contains("destination runs the VM"), "{msg}");
    let (mem, _, _) = dest.join().unwrap().unwrap();
    assert_eq!(mem.first_difference(&src.mem), None);
    assert_eq!(
        summary.destination.pages_received,
        src.mem.layout.total_pages()
    );
    assert_eq!(control.info().status, MigrationStatus::Completed);
}

#[test]
fn precopy_bandwidth_cap_limits_the_rate() {
    let cap: u64 = 24 << 20;
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    let mut opts = options(Mode::Precopy, None);
    opts.precopy_bandwidth = Some(cap);
    let control = opts.control.clone();
    let running = Arc::new(AtomicBool::new(true));
    let polls = {
        let c = control.clone();
        let running = running.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while running.load(Ordering::Acquire) {
                let i = c.info();
                if i.status == MigrationStatus::Active {
                    seen.push((Instant::now(), i.ram.transferred));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let summary = source::migrate(&src, addr, opts, &|_| {}).unwrap();
    running.store(false, Ordering::Release);
    let seen = polls.join().unwrap();
    dest.join().unwrap().unwrap();
    assert!(seen.len() >= 5, "only {} polls during precopy", seen.len());
    let (t0, b0) = seen[0];
    // One burst of the bucket plus a frame in flight.
    let slack = (4 * 256 * PAGE) as f64 + (cap / 20) as f64 + (256 * PAGE) as f64;
    for &(t, b) in &seen[1..] {
        let allowed = cap as f64 * t.duration_since(t0).as_secs_f64() * 1.3 + slack;
        assert!(
            (b - b0) as f64 <= allowed,
            "{} bytes in {:?}: over the cap of {cap} B/s",
            b - b0,
            t.duration_since(t0)
        );
    }
    // And it was not just idle: the rate is within the cap over the whole precopy too.
    let rate = summary.transfer_bytes as f64 / (summary.transfer_ms / 1000.0);
    assert!(rate <= cap as f64 * 1.3, "precopy ran at {rate} B/s");
    assert!(
        rate >= cap as f64 * 0.3,
        "precopy far below the cap: {rate} B/s"
    );
}

#[test]
fn overall_timeout_before_the_switchover_aborts_and_the_vm_runs_on() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    let mut opts = options(Mode::Precopy, None);
    opts.precopy_bandwidth = Some(8 << 20);
    opts.timeout = Some(Duration::from_millis(400));
    let control = opts.control.clone();
    let t = Instant::now();
    let r = source::migrate(&src, addr, opts, &|_| {});
    assert!(matches!(r, Err(SourceError::Timeout)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_runs_here(&src);
    let info = control.info();
    assert_eq!(info.status, MigrationStatus::Failed);
    assert!(info.error_desc.is_some_and(|e| e.contains("timeout")));
    assert!(dest.join().unwrap().is_err());
}
