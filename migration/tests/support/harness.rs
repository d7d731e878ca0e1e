// The test VMs and helpers of the protocol tests (protocol.rs, tls.rs), included into each of
// them with `include!`: plain memory as guest RAM, a writer thread as the source's guest, fault
// threads as the destination's vCPUs, listeners, options, and what a recovered migration must
// show. Not a test crate of its own (it lives in a subdirectory).

/// What the suites use, imported once (each suite uses a part of it).
#[allow(unused_imports)]
mod prelude {
    pub use std::io::{Read, Write};
    pub use std::net::{SocketAddr, TcpListener, TcpStream};
    pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::{Arc, Mutex};
    pub use std::thread::JoinHandle;
    pub use std::time::{Duration, Instant};

    pub use migration::auth::Secret;
    pub use migration::destination::{
        self, DestinationError, DestinationVm, PostcopyOutcome, PostcopySink,
    };
    pub use migration::relay::Relay;
    pub use migration::source::{self, MigrateOptions, SourceError, SourceVm};
    pub use migration::transport::{self, Acceptor, Timeouts};
    pub use migration::types::{AtomicPageSet, PageSet, RamLayout, RegionLayout};
    pub use migration::wire::{self, Message, MigrationConfig};
    pub use migration::{DirtyLog, FetchError, Backing, Mode, PageFetcher, RamRegion, PAGE_SIZE};
    pub use rand::{Rng, SeedableRng};
}
#[allow(unused_imports)]
use prelude::*;

const PAGE: usize = PAGE_SIZE as usize;
const MIB: u64 = 1 << 20;

fn timeouts() -> Timeouts {
    Timeouts {
        handshake: Duration::from_secs(2),
        io: Duration::from_secs(2),
        setup: Duration::from_secs(20),
        tick: Duration::from_millis(20),
        recover: Duration::from_secs(15),
        ..Timeouts::default()
    }
}

fn secret(tag: u8) -> Secret {
    Secret::from_bytes(vec![tag; 32]).unwrap()
}

/// Guest RAM analogue: regions of plain memory, addressed as u64 words so the "guest" thread
/// and the migration code can share them.
struct Memory {
    layout: RamLayout,
    bufs: Vec<Vec<AtomicU64>>,
}

impl Memory {
    fn new(regions: &[(u32, u64, u64)]) -> Self {
        let layout = RamLayout::new(
            regions
                .iter()
                .map(|&(slot, gpa, size)| RegionLayout { slot, gpa, size })
                .collect(),
        )
        .unwrap();
        let bufs = layout
            .regions()
            .iter()
            .map(|r| (0..r.size / 8).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Memory { layout, bufs }
    }

    fn from_layout(layout: &RamLayout) -> Self {
        let r: Vec<_> = layout
            .regions()
            .iter()
            .map(|r| (r.slot, r.gpa, r.size))
            .collect();
        Self::new(&r)
    }

    fn ram_regions(&self) -> Vec<RamRegion> {
        self.layout
            .regions()
            .iter()
            .zip(&self.bufs)
            .map(|(r, b)| RamRegion {
                slot: r.slot,
                gpa: r.gpa,
                size: r.size,
                host_addr: b.as_ptr() as usize,
                alias_addr: None,
                fd: None,
                fd_offset: 0,
                kind: Backing::Anon,
                page_size: PAGE_SIZE,
            })
            .collect()
    }

    /// (region, word offset) of a page index.
    fn locate(&self, page: u64) -> (usize, usize) {
        let gpa = self.layout.page_gpa(page).unwrap();
        let ri = self.layout.region_of(gpa).unwrap();
        (ri, ((gpa - self.layout.regions()[ri].gpa) / 8) as usize)
    }

    fn fill_page(&self, page: u64, seed: u64) {
        let (ri, w) = self.locate(page);
        for i in 0..PAGE / 8 {
            self.bufs[ri][w + i].store(
                seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64) ^ (page << 20),
                Ordering::Relaxed,
            );
        }
    }

    fn host(&self, gpa: u64) -> *mut u8 {
        let ri = self.layout.region_of(gpa).unwrap();
        let off = (gpa - self.layout.regions()[ri].gpa) as usize;
        assert!(off < self.bufs[ri].len() * 8);
        // The words are AtomicU64 (interior mutability), so writing through this pointer is allowed.
        (self.bufs[ri].as_ptr() as *mut u8).wrapping_add(off)
    }

    fn write_bytes(&self, gpa: u64, data: &[u8]) {
        let end = gpa + data.len() as u64 - 1;
        assert_eq!(self.layout.region_of(end), self.layout.region_of(gpa));
        // SAFETY: gpa..gpa+len lies inside one region's buffer (checked above); the buffer is
        // made of AtomicU64 cells, which permit writes through shared references.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host(gpa), data.len()) };
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        let gpa = self.layout.page_gpa(page).unwrap();
        // SAFETY: one page inside one region's buffer; `out` is 4096 bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.host(gpa), out.as_mut_ptr(), PAGE) };
    }

    /// Index of the first page that differs.
    fn first_difference(&self, other: &Memory) -> Option<u64> {
        let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
        (0..self.layout.total_pages()).find(|&p| {
            self.read_page(p, &mut a);
            other.read_page(p, &mut b);
            a != b
        })
    }
}

/// Dirty log of the test "guest": one bit per page, set by the writer after each write.
struct TestDirtyLog {
    layout: RamLayout,
    bits: Vec<Vec<AtomicU64>>,
    enabled: AtomicUsize,
}

impl TestDirtyLog {
    fn mark(&self, page: u64) {
        let gpa = self.layout.page_gpa(page).unwrap();
        let ri = self.layout.region_of(gpa).unwrap();
        let p = page - self.layout.region_first_page(ri);
        self.bits[ri][(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
    }
}

impl DirtyLog for TestDirtyLog {
    fn enable(&self, _slot: u32) -> Result<(), migration::types::HookError> {
        self.enabled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn disable(&self, _slot: u32) -> Result<(), migration::types::HookError> {
        self.enabled.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
    fn fetch(&self, slot: u32) -> Result<Vec<u64>, migration::types::HookError> {
        let ri = self
            .layout
            .regions()
            .iter()
            .position(|r| r.slot == slot)
            .ok_or("no such slot")?;
        Ok(self.bits[ri]
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect())
    }
}

/// The source "VM": memory, a guest writer thread, pause/resume bookkeeping.
struct TestSource {
    mem: Arc<Memory>,
    dirty: Arc<TestDirtyLog>,
    paused: Arc<AtomicBool>,
    gate: Arc<Mutex<()>>,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    stop_writer: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<u64>>>,
    state: Vec<u8>,
}

impl TestSource {
    /// How often the migration paused this VM.
    fn pauses(&self) -> usize {
        self.pauses.load(Ordering::Relaxed)
    }

    /// How often the migration resumed this VM.
    fn resumes(&self) -> usize {
        self.resumes.load(Ordering::Relaxed)
    }

    /// Asserts that the migration left dirty logging off.
    fn assert_dirty_logging_off(&self) {
        assert_eq!(
            self.dirty.enabled.load(Ordering::Relaxed),
            0,
            "dirty logging left enabled"
        );
    }

    /// Memory with a pattern on about 3 of 4 pages (the rest zero).
    fn new(regions: &[(u32, u64, u64)]) -> Self {
        let mem = Arc::new(Memory::new(regions));
        for p in 0..mem.layout.total_pages() {
            if p % 4 != 3 {
                mem.fill_page(p, p);
            }
        }
        let layout = mem.layout.clone();
        let bits = layout
            .regions()
            .iter()
            .map(|r| {
                (0..(r.size / PAGE_SIZE).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        TestSource {
            dirty: Arc::new(TestDirtyLog {
                layout,
                bits,
                enabled: AtomicUsize::new(0),
            }),
            mem,
            paused: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(Mutex::new(())),
            pauses: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            stop_writer: Arc::new(AtomicBool::new(false)),
            writer: Mutex::new(None),
            state: (0..100_000u32).map(|i| (i * 7) as u8).collect(),
        }
    }

    /// Start a "guest" that keeps rewriting random pages (a hot set of `hot` pages) until paused.
    fn run_guest(&self, hot: u64) {
        let (mem, dirty, paused, gate, stop) = (
            self.mem.clone(),
            self.dirty.clone(),
            self.paused.clone(),
            self.gate.clone(),
            self.stop_writer.clone(),
        );
        *self.writer.lock().unwrap() = Some(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut writes = 0u64;
            let total = mem.layout.total_pages();
            while !stop.load(Ordering::Relaxed) {
                let g = gate.lock().unwrap();
                if paused.load(Ordering::Acquire) {
                    drop(g);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let page = if rng.gen_bool(0.9) {
                    rng.gen_range(0..hot)
                } else {
                    rng.gen_range(0..total)
                };
                mem.fill_page(page, 1_000_000 + writes);
                dirty.mark(page);
                writes += 1;
                drop(g);
                if writes.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            writes
        }));
    }

    fn stop_guest(&self) -> u64 {
        self.stop_writer.store(true, Ordering::Relaxed);
        self.writer
            .lock()
            .unwrap()
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or(0)
    }
}

impl SourceVm for TestSource {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.mem.ram_regions()
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        &*self.dirty
    }
    fn vcpu_count(&self) -> u32 {
        2
    }
    fn pause(&self) -> Result<(), migration::types::HookError> {
        self.paused.store(true, Ordering::Release);
        drop(self.gate.lock().unwrap());
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn resume(&self) -> Result<(), migration::types::HookError> {
        self.paused.store(false, Ordering::Release);
        self.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, migration::types::HookError> {
        Ok(self.state.clone())
    }
}

/// Destination "VM": memory, the state it got, and in postcopy "vCPU" threads that fault on
/// random missing pages through the fetcher.
struct TestDest {
    mem: Arc<Memory>,
    present: Arc<AtomicPageSet>,
    state: Mutex<Option<Vec<u8>>>,
    started: AtomicBool,
    fail_start: bool,
    fetcher: Mutex<Option<Arc<dyn PageFetcher>>>,
    faulters: Faulters,
    faults: Arc<AtomicU64>,
    /// Runs at the start of `start` (a test's hook into the switchover).
    before_start: Option<StartHook>,
}

type StartHook = Box<dyn Fn() + Send + Sync>;

impl TestDest {
    fn new(config: &MigrationConfig) -> Self {
        let mem = Arc::new(Memory::from_layout(&config.layout));
        TestDest {
            present: Arc::new(AtomicPageSet::new(config.layout.total_pages())),
            mem,
            state: Mutex::new(None),
            started: AtomicBool::new(false),
            fail_start: false,
            fetcher: Mutex::new(None),
            faulters: Arc::new(Mutex::new(Vec::new())),
            faults: Arc::new(AtomicU64::new(0)),
            before_start: None,
        }
    }
}

struct TestSink {
    mem: Arc<Memory>,
    present: Arc<AtomicPageSet>,
    lock: Mutex<()>,
    faulters: Faulters,
    faults: Arc<AtomicU64>,
}

impl PostcopySink for TestSink {
    fn bulk_page(&self, gpa: u64, data: &[u8]) -> Result<(), migration::types::HookError> {
        let page = self.mem.layout.page_index(gpa).ok_or("bad gpa")?;
        let _g = self.lock.lock().unwrap();
        if !self.present.contains(page) {
            self.mem.write_bytes(gpa, data);
            self.present.insert(page);
        }
        Ok(())
    }
    fn finished(&self) -> Result<PostcopyOutcome, migration::types::HookError> {
        for h in self.faulters.lock().unwrap().drain(..) {
            h.join()
                .map_err(|_| "faulter panicked")?
                .map_err(|e| e.to_string())?;
        }
        if self.present.next_absent(0).is_some() {
            return Err("pages missing at finish".into());
        }
        Ok(PostcopyOutcome {
            collapses: 3,
            faults: self.faults.load(Ordering::Relaxed),
        })
    }
}

/// The "vCPU" fault threads of a postcopy destination.
type Faulters = Arc<Mutex<Vec<JoinHandle<Result<u64, FetchError>>>>>;
/// What a destination thread hands back: its memory, the state it got, its summary.
type DestinationResult =
    Result<(Arc<Memory>, Vec<u8>, migration::stats::ReceiveSummary), DestinationError>;

const FAULT_THREADS: usize = 4;
const FAULTS_PER_THREAD: usize = 150;

impl DestinationVm for TestDest {
    fn write_pages(&self, gpa: u64, data: &[u8]) -> Result<(), migration::types::HookError> {
        assert!(
            !self.started.load(Ordering::Relaxed),
            "precopy write after start"
        );
        self.mem.write_bytes(gpa, data);
        Ok(())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), migration::types::HookError> {
        *self.state.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn begin_postcopy(
        &self,
        fetcher: Arc<dyn PageFetcher>,
        present: &PageSet,
    ) -> Result<Arc<dyn PostcopySink>, migration::types::HookError> {
        for p in present.iter() {
            self.present.insert(p);
        }
        *self.fetcher.lock().unwrap() = Some(fetcher);
        Ok(Arc::new(TestSink {
            mem: self.mem.clone(),
            present: self.present.clone(),
            lock: Mutex::new(()),
            faulters: self.faulters.clone(),
            faults: self.faults.clone(),
        }))
    }
    fn start(&self) -> Result<(), migration::types::HookError> {
        if let Some(hook) = &self.before_start {
            hook();
        }
        if self.fail_start {
            return Err("test: the vCPUs refuse to start".into());
        }
        self.started.store(true, Ordering::Relaxed);
        let Some(fetcher) = self.fetcher.lock().unwrap().clone() else {
            return Ok(());
        };
        for t in 0..FAULT_THREADS {
            let (fetcher, mem, present, faults) = (
                fetcher.clone(),
                self.mem.clone(),
                self.present.clone(),
                self.faults.clone(),
            );
            self.faulters
                .lock()
                .unwrap()
                .push(std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let mut buf = [0u8; PAGE];
                    let mut fetched = 0;
                    for _ in 0..FAULTS_PER_THREAD {
                        let page = rng.gen_range(0..mem.layout.total_pages());
                        if present.contains(page) {
                            continue;
                        }
                        let gpa = mem.layout.page_gpa(page).unwrap();
                        // Like the real fault service: a fetch that fails because the link is
                        // down waits and tries again (the page may also arrive meanwhile).
                        loop {
                            match fetcher.fetch(gpa, &mut buf) {
                                Ok(()) => break,
                                Err(e @ FetchError::BadAddress { .. }) => return Err(e),
                                Err(_) if present.contains(page) => break,
                                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                            }
                        }
                        if present.contains(page) {
                            continue;
                        }
                        // Like the real engine: the first copy to arrive wins.
                        if present.insert(page) {
                            mem.write_bytes(gpa, &buf);
                        }
                        fetched += 1;
                        faults.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(fetched)
                }));
        }
        Ok(())
    }
}

/// Run a destination daemon for one migration in a thread; returns the dest memory on success.
fn spawn_destination(
    listener: destination::Listener,
    fail_start: bool,
) -> JoinHandle<DestinationResult> {
    spawn_destination_with(listener, fail_start, None, None)
}

/// [`spawn_destination`] that also reports the session id on `session` once accepted, and runs
/// `before_start` when the VM starts.
fn spawn_destination_with(
    listener: destination::Listener,
    fail_start: bool,
    session: Option<std::sync::mpsc::Sender<u64>>,
    before_start: Option<StartHook>,
) -> JoinHandle<DestinationResult> {
    std::thread::spawn(move || {
        let incoming = listener.accept()?;
        if let Some(tx) = session {
            let _ = tx.send(incoming.session_id());
        }
        let mut vm = TestDest::new(incoming.config());
        vm.fail_start = fail_start;
        vm.before_start = before_start;
        let summary = incoming.receive(&vm)?;
        let state = vm.state.lock().unwrap().clone().unwrap_or_default();
        Ok((vm.mem.clone(), state, summary))
    })
}

fn listener(secret: Option<Secret>) -> (destination::Listener, SocketAddr) {
    let l = destination::listen_with("127.0.0.1:0".parse().unwrap(), secret, timeouts()).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn options(mode: Mode, secret: Option<Secret>) -> MigrateOptions {
    let mut o = MigrateOptions::new(mode);
    o.secret = secret;
    o.timeouts = timeouts();
    o
}

const LAYOUT_64M: &[(u32, u64, u64)] = &[(0, 0, 48 * MIB), (1, 4 << 30, 16 * MIB)];

const LAYOUT_128M: &[(u32, u64, u64)] = &[(0, 0, 96 * MIB), (1, 4 << 30, 32 * MIB)];

/// Polls `cond` every millisecond for up to `limit`; true if it held.
fn wait_until(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

fn relay_to(addr: SocketAddr) -> Relay {
    Relay::start("127.0.0.1:0".parse().unwrap(), addr).unwrap()
}

/// What every recovered migration must give: the same memory and state on both sides, the
/// source never resumed, both sides counting the recoveries.
fn assert_recovered(
    src: &TestSource,
    summary: &migration::MigrationSummary,
    dest: JoinHandle<DestinationResult>,
    at_least: u32,
) {
    let (mem, state, recv) = dest.join().unwrap().unwrap();
    println!("source: {}", serde_json::to_string(summary).unwrap());
    println!("destination: {}", serde_json::to_string(&recv).unwrap());
    assert_eq!(
        mem.first_difference(&src.mem),
        None,
        "destination memory differs from the source after recovery"
    );
    assert_eq!(state, src.state, "state blob");
    assert_eq!(src.resumes(), 0, "the source resumed");
    assert!(
        summary.recoveries >= at_least,
        "source counted {} recoveries, want at least {at_least}",
        summary.recoveries
    );
    assert!(
        recv.recoveries >= at_least,
        "destination counted {} recoveries, want at least {at_least}",
        recv.recoveries
    );
    assert!(summary.paused_ms > 0.0 && recv.paused_ms > 0.0);
    assert_eq!(
        summary.destination.pages_received,
        src.mem.layout.total_pages()
    );
}
