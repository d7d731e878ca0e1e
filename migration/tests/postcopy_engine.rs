//! Postcopy engine against the real kernel: userfaultfd, shmem memfds, hugetlb pages (2 MiB,
//! and 1 GiB when the pool can be grown), MADV_COLLAPSE, mmap(MAP_FIXED) collapse with a writer
//! thread running (dirty tracking by a conservative "every page dirty" log), the EAGAIN-safe
//! UFFDIO_COPY racing a non-cooperative madvise, and a page fetcher over a loopback TCP socket. Simulated vCPUs are threads whose accesses block in userfaultfd.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::postcopy::{PostcopyEngine, ServeMode};
use migration::wire::WireError;
use migration::{Backing, ChannelDown, DirtyLog, FetchError, Granularity, PageFetcher, RamRegion};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const GPA_BASE: u64 = 0x1_0000_0000;

// ---------------------------------------------------------------- source content

/// Word `w` of the source page at `gpa`.
fn src_word(gpa: u64, w: usize) -> u64 {
    (gpa ^ 0x5a5a_0000_0000_0000).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64) << 3 | 1
}

fn src_page(gpa: u64, buf: &mut [u8; 4096]) {
    for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&src_word(gpa, w).to_le_bytes());
    }
}

/// Fetches from the pattern directly, counting requests.
struct LocalFetcher {
    fetches: AtomicU64,
    delay: Duration,
}

impl PageFetcher for LocalFetcher {
    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        src_page(gpa, buf);
        Ok(())
    }
}

/// Fetches over a real loopback TCP connection from a server thread that serves the pattern.
struct TcpFetcher {
    conn: Mutex<TcpStream>,
    fetches: AtomicU64,
}

impl TcpFetcher {
    fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut req = [0u8; 8];
            let mut page = [0u8; 4096];
            while s.read_exact(&mut req).is_ok() {
                src_page(u64::from_le_bytes(req), &mut page);
                if s.write_all(&page).is_err() {
                    break;
                }
            }
        });
        let conn = TcpStream::connect(addr).unwrap();
        conn.set_nodelay(true).unwrap();
        Arc::new(TcpFetcher {
            conn: Mutex::new(conn),
            fetches: AtomicU64::new(0),
        })
    }
}

impl PageFetcher for TcpFetcher {
    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut c = self.conn.lock().unwrap();
        let io = c
            .write_all(&gpa.to_le_bytes())
            .and_then(|_| c.read_exact(buf));
        io.map_err(|source| FetchError::Disconnected {
            gpa,
            reason: ChannelDown::Wire(Arc::new(WireError::Io {
                during: "fetching a page",
                source,
            })),
        })
    }
}

/// A dirty log for regions that never need one (anon, shmem): any call is a test failure.
struct NoDirty;
impl DirtyLog for NoDirty {
    fn enable(&self, slot: u32) -> Result<(), migration::types::HookError> {
        Err(format!("unexpected dirty-log enable of slot {slot}").into())
    }
    fn disable(&self, slot: u32) -> Result<(), migration::types::HookError> {
        Err(format!("unexpected dirty-log disable of slot {slot}").into())
    }
    fn fetch(&self, slot: u32) -> Result<Vec<u64>, migration::types::HookError> {
        Err(format!("unexpected dirty-log fetch of slot {slot}").into())
    }
}

/// A dirty log without KVM: every page is reported dirty on every fetch. Conservative (the
/// collapse copies every staged page in every delta round, the final one inside the freeze),
/// so a guest write is never lost, which is what the collapse tests check.
#[derive(Default)]
struct AllDirty {
    enabled: Mutex<Vec<u32>>,
    fetches: AtomicU64,
}
impl DirtyLog for AllDirty {
    fn enable(&self, slot: u32) -> Result<(), migration::types::HookError> {
        self.enabled.lock().unwrap().push(slot);
        Ok(())
    }
    fn disable(&self, slot: u32) -> Result<(), migration::types::HookError> {
        self.enabled.lock().unwrap().retain(|s| *s != slot);
        Ok(())
    }
    fn fetch(&self, slot: u32) -> Result<Vec<u64>, migration::types::HookError> {
        if !self.enabled.lock().unwrap().contains(&slot) {
            return Err(format!("dirty-log fetch of slot {slot}, which is not enabled").into());
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        // Big enough for every region these tests use (2 GiB of 4 KiB pages).
        Ok(vec![u64::MAX; (2usize << 30) / PAGE / 64])
    }
}

// ---------------------------------------------------------------- memory helpers

/// Grows a hugetlb pool under the shared test lock and gives the pages back when dropped.
struct HugePool {
    _lock: File,
    path: String,
    orig: u64,
}

impl HugePool {
    fn reserve(size_kb: u64, pages: u64) -> Result<HugePool, String> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/lock/vmm-tests-hugepages.lock")
            .map_err(|e| format!("open lock: {e}"))?;
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock: {}", std::io::Error::last_os_error()));
        }
        let dir = format!("/sys/kernel/mm/hugepages/hugepages-{size_kb}kB");
        let read = |f: &str| -> Result<u64, String> {
            std::fs::read_to_string(format!("{dir}/{f}"))
                .map_err(|e| format!("{dir}/{f}: {e}"))?
                .trim()
                .parse::<u64>()
                .map_err(|e| e.to_string())
        };
        let orig = read("nr_hugepages")?;
        let path = format!("{dir}/nr_hugepages");
        let pool = HugePool {
            _lock: lock,
            path: path.clone(),
            orig,
        };
        // Free pages already in the pool (ci/test.sh reserves the 1 GiB one before the build)
        // are used first; the pool grows only by what is missing.
        let free = read("free_hugepages")?;
        if free < pages {
            std::fs::write(&path, (orig + pages - free).to_string())
                .map_err(|e| format!("{path}: {e}"))?;
        }
        let free = read("free_hugepages")?;
        if free < pages {
            return Err(format!(
                "needs {pages} free {size_kb} kB pages, the pool has only {free} free (nr_hugepages now {})",
                read("nr_hugepages")?
            ));
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.orig.to_string());
    }
}

fn memfd(name: &str, flags: libc::c_uint, size: usize) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid name; checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags | libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: our fd; checked.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

/// A shared mapping of `fd`, aligned to `align` (reserve a bigger PROT_NONE area first).
fn map_aligned(fd: RawFd, size: usize, align: usize) -> usize {
    // SAFETY: fresh anonymous reservation; checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size + align,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let addr = (base as usize).next_multiple_of(align);
    // SAFETY: inside our reservation; checked.
    let got = unsafe {
        libc::mmap(
            addr as *mut _,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    assert_ne!(
        got,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    addr
}

/// Unmaps a test mapping when dropped (before the huge-page pool guard gives pages back).
struct Unmap(usize, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: the test owns this mapping and nothing uses it any more.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

fn read_word(addr: usize) -> u64 {
    // SAFETY: addr is inside a live test mapping; volatile so the access really happens.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_word(addr: usize, v: u64) {
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

/// Check the whole page at primary `addr` against the source page `gpa`, except word `skip`.
fn check_page(addr: usize, gpa: u64, skip: Option<usize>) {
    for w in 0..PAGE / 8 {
        if Some(w) == skip {
            continue;
        }
        let got = read_word(addr + w * 8);
        assert_eq!(got, src_word(gpa, w), "gpa {gpa:#x} word {w} at {addr:#x}");
    }
}

/// The smaps fields of the VMA starting at `start`.
fn smaps_of(start: usize) -> Vec<(String, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let s = usize::from_str_radix(first.split('-').next().unwrap(), 16).unwrap_or(0);
            inside = s == start;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once(':') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

fn smaps_kb(fields: &[(String, String)], key: &str) -> u64 {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn engine(region: RamRegion, strategy: Granularity, dirty: Arc<dyn DirtyLog>) -> PostcopyEngine {
    PostcopyEngine::new(vec![region], strategy, dirty).unwrap()
}

/// Push every page of the region as a bulk page (optionally only every `step`th page first).
fn push_bulk(eng: &PostcopyEngine, gpa: u64, size: usize, pace: Duration) -> (u64, u64) {
    let mut buf = [0u8; 4096];
    let (mut applied, mut ignored) = (0, 0);
    for p in 0..(size / PAGE) as u64 {
        let g = gpa + p * PAGE as u64;
        src_page(g, &mut buf);
        if eng.bulk_page(g, &buf).unwrap() {
            applied += 1;
        } else {
            ignored += 1;
        }
        if !pace.is_zero() && p % 64 == 0 {
            std::thread::sleep(pace);
        }
    }
    (applied, ignored)
}

/// A file-backed guest region for the engine: its memfd, the primary mapping (aligned to
/// `align`) and the alias (aligned to the page size), unmapped on drop.
struct FileRegion {
    region: RamRegion,
    _maps: (Unmap, Unmap),
    _fd: OwnedFd,
}

impl FileRegion {
    fn new(
        name: &str,
        flags: libc::c_uint,
        size: usize,
        align: usize,
        slot: u32,
        kind: Backing,
        page_size: usize,
    ) -> Self {
        let fd = memfd(name, flags, size);
        let host = map_aligned(fd.as_raw_fd(), size, align);
        let alias = map_aligned(fd.as_raw_fd(), size, page_size);
        FileRegion {
            region: RamRegion {
                slot,
                gpa: GPA_BASE,
                size: size as u64,
                host_addr: host,
                alias_addr: Some(alias),
                fd: Some(fd.as_raw_fd()),
                fd_offset: 0,
                kind,
                page_size: page_size as u64,
            },
            _maps: (Unmap(host, size), Unmap(alias, size)),
            _fd: fd,
        }
    }

    fn host(&self) -> usize {
        self.region.host_addr
    }

    fn alias(&self) -> usize {
        self.region.alias_addr.unwrap_or(0)
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn shmem_4k_faults_then_madv_collapse() {
    let size = 4 * MIB;
    let f = FileRegion::new("shmem-guest", 0, size, 2 * MIB, 0, Backing::Shmem, PAGE);
    let (host, region) = (f.host(), f.region.clone());
    let fetcher = Arc::new(LocalFetcher {
        fetches: AtomicU64::new(0),
        delay: Duration::from_micros(50),
    });
    let mut eng = engine(region, Granularity::FourK, Arc::new(NoDirty));
    let rep = eng.prepare(fetcher.clone()).unwrap();
    assert_eq!(rep.regions[0].mode, ServeMode::ShmemContinue);

    // Two "vCPUs" touch scattered pages before any bulk data: every touch blocks in userfaultfd.
    let touched: Vec<u64> = (0..(size / PAGE) as u64).filter(|p| p % 7 == 3).collect();
    std::thread::scope(|s| {
        for half in touched.chunks(touched.len().div_ceil(2)) {
            s.spawn(move || {
                for &p in half {
                    check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
                }
            });
        }
    });
    let st = eng.stats();
    assert!(
        st.faults_served >= touched.len() as u64,
        "faults {}",
        st.faults_served
    );
    assert_eq!(
        st.pages_fetched,
        touched.len() as u64,
        "each touched page fetched once"
    );
    let (applied, ignored) = push_bulk(&eng, GPA_BASE, size, Duration::ZERO);
    assert_eq!(ignored, touched.len() as u64);
    assert_eq!(applied + ignored, (size / PAGE) as u64);
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for p in 0..(size / PAGE) as u64 {
        check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
    }
    let st = eng.stats();
    assert_eq!(st.collapses, 2, "{:?}", st.collapse_records);
    let smaps = smaps_of(host);
    let pmd = smaps_kb(&smaps, "ShmemPmdMapped")
        + smaps_kb(&smaps, "FilePmdMapped")
        + smaps_kb(&smaps, "AnonHugePages");
    println!(
        "shmem: smaps PMD-mapped {pmd} kB, fault p50 {} ns, collapse records {:?}",
        st.fault_latency_p50_ns, st.collapse_records
    );
    assert!(pmd >= 2048, "no PMD mapping after MADV_COLLAPSE: {smaps:?}");
    assert!(!st.fault_latency_ns.is_empty());
    // Every fault that fetched over the socket is timed by phase.
    let phases = &st.fault_phase_us;
    assert!(phases.installed.count > 0, "{phases:?}");
    assert!(phases.installed.count <= st.pages_fetched);
    assert_eq!(phases.uffd_to_read.count, phases.installed.count);
    assert!(phases.reply_read.p50 > 0.0, "{phases:?}");
    assert!(st.slow_faults.len() <= 200);
}

#[test]
fn anon_missing_copy() {
    let size = 2 * MIB;
    // SAFETY: fresh anonymous mapping; checked.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let host = host as usize;
    let region = RamRegion {
        slot: 1,
        gpa: GPA_BASE,
        size: size as u64,
        host_addr: host,
        alias_addr: None,
        fd: None,
        fd_offset: 0,
        kind: Backing::Anon,
        page_size: PAGE as u64,
    };
    let fetcher = Arc::new(LocalFetcher {
        fetches: AtomicU64::new(0),
        delay: Duration::from_micros(20),
    });
    let mut eng = engine(region, Granularity::FourK, Arc::new(NoDirty));
    eng.prepare(fetcher.clone()).unwrap();
    // Both threads touch the same pages: each page must be fetched once.
    let pages: Vec<u64> = (0..64).map(|i| i * 5).collect();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let pages = &pages;
            s.spawn(move || {
                for &p in pages {
                    let a = host + p as usize * PAGE;
                    check_page(a, GPA_BASE + p * PAGE as u64, None);
                }
            });
        }
    });
    // Guest writes one page; a later bulk copy of it must not overwrite.
    write_word(host, 0xdead_beef);
    let (_, ignored) = push_bulk(&eng, GPA_BASE, size, Duration::ZERO);
    assert_eq!(ignored, pages.len() as u64);
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(read_word(host), 0xdead_beef, "bulk overwrote a guest write");
    for p in 1..(size / PAGE) as u64 {
        check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
    }
    assert!(fetcher.fetches.load(Ordering::Relaxed) <= pages.len() as u64 + 2);
    assert_eq!(eng.stats().pages_fetched, pages.len() as u64);
}

/// A vCPU-like writer: touches `pages` (reads check the source), then keeps writing a counter to
/// word 1 of each. Returns the last value written per page.
fn writer_thread(
    host: usize,
    pages: Vec<u64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        for &p in &pages {
            check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
        }
        let mut last = vec![0u64; pages.len()];
        let mut v = 1u64;
        while !stop.load(Ordering::Acquire) {
            for (i, &p) in pages.iter().enumerate() {
                write_word(host + p as usize * PAGE + 8, v);
                last[i] = v;
                v += 1;
            }
        }
        last
    })
}

fn hugetlb_fourk_collapse(page_kb: u64, huge_pages: u64, kind: Backing, mfd_flag: libc::c_uint) {
    let huge = (page_kb * 1024) as usize;
    let size = huge * huge_pages as usize;
    let _pool = HugePool::reserve(page_kb, huge_pages).unwrap_or_else(|e| {
        panic!("this test needs {huge_pages} free {page_kb} kB huge page(s): {e}")
    });
    let f = FileRegion::new(
        "hugetlb-guest",
        libc::MFD_HUGETLB | mfd_flag,
        size,
        huge,
        2,
        kind,
        huge,
    );
    let (host, alias, region) = (f.host(), f.alias(), f.region.clone());
    let fetcher = TcpFetcher::start();
    let dirty = Arc::new(AllDirty::default());
    let mut eng = PostcopyEngine::new(vec![region], Granularity::FourK, dirty.clone()).unwrap();
    let rep = eng.prepare(fetcher.clone()).unwrap();
    assert!(matches!(rep.regions[0].mode, ServeMode::Staged(_)));
    assert_eq!(
        smaps_kb(&smaps_of(host), "KernelPageSize"),
        4,
        "staging must be 4 KiB-mapped"
    );

    // Writers in the first and the last huge page.
    let ppu = (huge / PAGE) as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let mut w_pages: Vec<u64> = (0..48)
        .map(|i| i * 3 + 1)
        .chain((0..16).map(|i| (huge_pages - 1) * ppu + i * 11 + 2))
        .collect();
    w_pages.sort_unstable();
    w_pages.dedup();
    let writer = writer_thread(host, w_pages.clone(), stop.clone());
    // A reader "vCPU" touching pages elsewhere (reads only).
    let r_pages: Vec<u64> = (0..32)
        .map(|i| ppu / 2 + i * 13)
        .filter(|p| !w_pages.contains(p))
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for &p in &r_pages {
                check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
            }
        });
    });
    std::thread::sleep(Duration::from_millis(50));
    // Background pages, paced so the writer runs during the collapse.
    let (_applied, ignored) = push_bulk(&eng, GPA_BASE, size, Duration::from_micros(20));
    assert!(ignored >= r_pages.len() as u64);
    eng.wait_complete_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // Keep writing into the huge mapping for a moment, then stop.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    let last = writer.join().unwrap();

    for (i, &p) in w_pages.iter().enumerate() {
        let a = host + p as usize * PAGE;
        assert_eq!(
            read_word(a + 8),
            last[i],
            "writer's last value lost at page {p}"
        );
        assert_eq!(
            read_word(alias + p as usize * PAGE + 8),
            last[i],
            "final backing differs at page {p}"
        );
        check_page(a, GPA_BASE + p * PAGE as u64, Some(1));
    }
    for p in (0..(size / PAGE) as u64).step_by(7) {
        if !w_pages.contains(&p) {
            check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
        }
    }
    let st = eng.stats();
    let smaps = smaps_of(host);
    println!(
        "hugetlb {page_kb} kB FourK: collapses {:?}\n stall p50 {} ns max {} ns, staging peak {:.2} MiB, faults {} fetched {} local {} fault p50 {} ns",
        st.collapse_records, st.collapse_stall_p50_ns, st.collapse_stall_max_ns, st.staging_peak_mib,
        st.faults_served, st.pages_fetched, st.pages_served_locally, st.fault_latency_p50_ns,
    );
    assert_eq!(st.collapses, huge_pages, "every huge page collapses");
    assert!(
        dirty.fetches.load(Ordering::Relaxed) > 0,
        "the collapse never read the dirty log"
    );
    assert!(
        dirty.enabled.lock().unwrap().is_empty(),
        "dirty logging still on after the last collapse"
    );
    assert_eq!(
        smaps_kb(&smaps, "KernelPageSize"),
        page_kb,
        "range not hugetlb-mapped: {smaps:?}"
    );
    assert_eq!(st.staging_current_bytes, 0, "staging not freed");
    assert!(st.staging_peak_mib > 0.0);
    assert!(st
        .collapse_records
        .iter()
        .any(|r| r.stall_ns > 0 && r.delta_rounds >= 2));
    assert!(st
        .collapse_records
        .iter()
        .all(|r| r.method == "hugetlb-mmap"));
    assert!(fetcher.fetches.load(Ordering::Relaxed) >= (w_pages.len() + r_pages.len()) as u64);
}

#[test]
fn hugetlb_2m_fourk_collapse_with_writer() {
    hugetlb_fourk_collapse(2048, 2, Backing::Hugetlb2m, libc::MFD_HUGE_2MB);
}

#[test]
fn hugetlb_1g_fourk_collapse_with_writer() {
    hugetlb_fourk_collapse(1024 * 1024, 1, Backing::Hugetlb1g, libc::MFD_HUGE_1GB);
}

#[test]
fn hugetlb_2m_whole_page_baseline() {
    let huge = 2 * MIB;
    let size = 2 * huge;
    let _pool = HugePool::reserve(2048, 2).expect("2 MiB pool");
    let f = FileRegion::new(
        "hugetlb-guest",
        libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        size,
        huge,
        3,
        Backing::Hugetlb2m,
        huge,
    );
    let (host, region) = (f.host(), f.region.clone());
    let fetcher = Arc::new(LocalFetcher {
        fetches: AtomicU64::new(0),
        delay: Duration::ZERO,
    });
    let mut eng = engine(region, Granularity::Huge, Arc::new(NoDirty));
    let rep = eng.prepare(fetcher.clone()).unwrap();
    assert_eq!(rep.regions[0].mode, ServeMode::HugeWhole);
    // Touch one page of huge page 0: the whole 2 MiB must be fetched and mapped.
    check_page(host + 5 * PAGE, GPA_BASE + 5 * PAGE as u64, None);
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 512);
    write_word(host + 7 * PAGE, 0x1234);
    let (_, ignored) = push_bulk(&eng, GPA_BASE, size, Duration::ZERO);
    assert_eq!(ignored, 512);
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(read_word(host + 7 * PAGE), 0x1234);
    for p in 0..(size / PAGE) as u64 {
        if p != 7 {
            check_page(host + p as usize * PAGE, GPA_BASE + p * PAGE as u64, None);
        }
    }
    assert_eq!(smaps_kb(&smaps_of(host), "KernelPageSize"), 2048);
    // A fault's latency is recorded right after the CONTINUE that woke the faulting thread, so
    // give the fault service a moment to record the last one.
    let t = Instant::now();
    let mut st = eng.stats();
    while (st.fault_latency_ns.len() as u64) < st.faults_served
        && t.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(1));
        st = eng.stats();
    }
    assert_eq!(st.pages_fetched, 512);
    println!(
        "whole-page: fault latency samples {:?}",
        st.fault_latency_ns
    );
    assert!(st.faults_served >= 1);
    assert_eq!(
        st.fault_latency_ns.len() as u64,
        st.faults_served,
        "every whole-page fault has a latency sample"
    );
}

/// Zero runs only mark pages arrived: a later touch maps zeros without asking the source,
/// completed units still collapse, and pages with data are untouched.
#[test]
fn zero_runs_mark_arrived_without_fetching() {
    let size = 4 * MIB;
    let pages = (size / PAGE) as u64;
    // Pages [0, 256) and [768, 1024) are zero runs; the rest is data.
    let is_zero = |p: u64| !(256..768).contains(&p);
    let push = |eng: &PostcopyEngine| {
        assert_eq!(eng.bulk_zero(GPA_BASE, 256).unwrap(), 256);
        let mut buf = [0u8; 4096];
        for p in 256..768 {
            let g = GPA_BASE + p * PAGE as u64;
            src_page(g, &mut buf);
            eng.bulk_page(g, &buf).unwrap();
        }
        assert_eq!(
            eng.bulk_zero(GPA_BASE + 768 * PAGE as u64, 256).unwrap(),
            256
        );
        // Again: already arrived, ignored.
        assert_eq!(eng.bulk_zero(GPA_BASE, 256).unwrap(), 0);
        assert!(eng.bulk_zero(GPA_BASE + 1000 * PAGE as u64, 100).is_err());
    };
    let check_all = |host: usize| {
        for p in 0..pages {
            let a = host + p as usize * PAGE;
            if is_zero(p) {
                assert_eq!(read_word(a), 0, "zero page {p}");
                assert_eq!(read_word(a + PAGE - 8), 0, "zero page {p}");
            } else {
                check_page(a, GPA_BASE + p * PAGE as u64, None);
            }
        }
    };

    // shmem: 2 MiB units complete through the zero run and collapse.
    let fd = memfd("shmem-zero", 0, size);
    let host = map_aligned(fd.as_raw_fd(), size, 2 * MIB);
    let alias = map_aligned(fd.as_raw_fd(), size, PAGE);
    let _maps = (Unmap(host, size), Unmap(alias, size));
    let fetcher = Arc::new(LocalFetcher {
        fetches: AtomicU64::new(0),
        delay: Duration::ZERO,
    });
    let region = RamRegion {
        slot: 0,
        gpa: GPA_BASE,
        size: size as u64,
        host_addr: host,
        alias_addr: Some(alias),
        fd: Some(fd.as_raw_fd()),
        fd_offset: 0,
        kind: Backing::Shmem,
        page_size: PAGE as u64,
    };
    let mut eng = engine(region, Granularity::FourK, Arc::new(NoDirty));
    eng.prepare(fetcher.clone()).unwrap();
    push(&eng);
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    check_all(host);
    let st = eng.stats();
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 0);
    assert_eq!(st.zero_pages_applied, 512);
    assert_eq!(st.zero_pages_ignored, 256);
    assert_eq!(
        st.collapses + st.collapse_failures + st.collapses_skipped,
        2
    );
    drop(eng);

    // anon: a zero-run page the guest touches gets the zero page, never a fetch.
    // SAFETY: fresh anonymous mapping; checked.
    let anon = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(anon, libc::MAP_FAILED);
    let anon = anon as usize;
    let _anon_map = Unmap(anon, size);
    let region = RamRegion {
        slot: 1,
        gpa: GPA_BASE,
        size: size as u64,
        host_addr: anon,
        alias_addr: None,
        fd: None,
        fd_offset: 0,
        kind: Backing::Anon,
        page_size: PAGE as u64,
    };
    let mut eng = engine(region, Granularity::FourK, Arc::new(NoDirty));
    eng.prepare(fetcher.clone()).unwrap();
    push(&eng);
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    check_all(anon);
    write_word(anon + 3 * PAGE, 0xfeed);
    assert_eq!(read_word(anon + 3 * PAGE), 0xfeed);
    // Complete also means no fault is still being served (its latency is recorded).
    eng.wait_complete_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let st = eng.stats();
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 0);
    assert!(st.faults_served >= 512, "faults {}", st.faults_served);
    assert_eq!(st.fault_latency_ns.len() as u64, st.faults_served);
}

#[test]
fn native_strategy_falls_back_with_reason() {
    let huge = 2 * MIB;
    let _pool = HugePool::reserve(2048, 1).expect("2 MiB pool");
    let f = FileRegion::new(
        "hugetlb-guest",
        libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        huge,
        huge,
        4,
        Backing::Hugetlb2m,
        huge,
    );
    let region = f.region.clone();
    let eng = engine(region, Granularity::Native, Arc::new(NoDirty));
    let plan = &eng.plans()[0];
    println!("native plan: {plan:?}");
    assert!(matches!(plan.mode, ServeMode::Staged(_)));
    assert!(
        plan.note.as_deref().unwrap_or("").contains("EINVAL"),
        "{plan:?}"
    );
}

/// UFFDIO_COPY into an anonymous range while its address space is changing: a thread's
/// `madvise(MADV_DONTNEED)` on the range waits in the kernel until its non-cooperative REMOVE
/// event is read, and until then every UFFDIO_COPY into the range fails with EAGAIN (the
/// kernel's `mmap_changing`). The engine's copy helper must retry (never treat it as fatal)
/// and the page must end up right once the event is read.
#[test]
fn anon_copy_retries_eagain_while_the_address_space_changes() {
    use migration::postcopy::sys::{uffd_copy, Copied};
    let size = 4 * PAGE;
    // SAFETY: fresh anonymous mapping; checked.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let host = host as usize;
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::EVENT_REMOVE)
        .create()
        .unwrap();
    uffd.register(host as *mut libc::c_void, size).unwrap();
    let gpa = GPA_BASE;
    let mut page = [0u8; 4096];
    src_page(gpa, &mut page);
    std::thread::scope(|s| {
        // Page 2 only: the copy goes to page 0, so the madvise cannot drop what was copied.
        let madv = s.spawn(|| {
            // SAFETY: our own anonymous mapping; page 2 holds nothing.
            unsafe {
                libc::madvise(
                    (host + 2 * PAGE) as *mut libc::c_void,
                    PAGE,
                    libc::MADV_DONTNEED,
                )
            }
        });
        // The REMOVE event is queued once the madvise is inside the kernel, waiting.
        let mut fds = [libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
        assert_eq!(n, 1, "the REMOVE event never came");
        // SAFETY: page 0 of the registered, unpopulated range; `page` is 4 KiB.
        let raw = unsafe {
            uffd.copy(
                page.as_ptr() as *const libc::c_void,
                host as *mut libc::c_void,
                PAGE,
                true,
            )
        };
        assert!(
            matches!(raw, Err(userfaultfd::Error::PartiallyCopied(_))),
            "the kernel did not say EAGAIN while the address space changes: {raw:?}"
        );
        let reader = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            // The event holds raw pointers (not Send): hand back what it was.
            format!("{:?}", uffd.read_event().unwrap())
        });
        let t = Instant::now();
        // SAFETY: as above.
        let got = unsafe { uffd_copy(&uffd, &page, host, true, || false) }.unwrap();
        let waited = t.elapsed();
        let ev = reader.join().unwrap();
        assert!(ev.starts_with("Some(Remove"), "{ev}");
        assert_eq!(madv.join().unwrap(), 0, "madvise failed");
        match got {
            Copied::Done { eagain } => assert!(eagain > 0, "no EAGAIN was retried"),
            Copied::Exists => panic!("page 0 was never populated, yet EEXIST"),
        }
        assert!(
            waited >= Duration::from_millis(40),
            "copied after {waited:?}"
        );
    });
    check_page(host, gpa, None);
    for p in 1..4 {
        assert_eq!(
            migration::postcopy::sys::resident_pages(host + p * PAGE, PAGE).unwrap(),
            0,
            "page {p} was populated"
        );
    }
}
