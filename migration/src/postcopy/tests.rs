//! Unit tests of the fault service and the collapse over a fake [`Installer`]: real memory
//! (anonymous mappings, memfds), no userfaultfd. The fake records what it was asked to do and
//! writes stored pages where the kernel would put them. The engine against the real kernel is
//! tested in tests/postcopy_engine.rs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::arrival::Arrivals;
use super::collapse::{self, Collapser};
use super::fault_service::{FaultJob, FaultService};
use super::installer::{Installer, Stored};
use super::region::{Region, Regions, UnitDone};
use super::staging::Staging;
use super::stats::StatsCollector;
use super::strategy::{FinalBacking, RegionPlan, ServeMode};
use super::supervisor::Supervisor;
use super::PostcopyError;
use crate::types::{Backing, DirtyLog, FetchError, PageFetcher, RamRegion, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
const GPA: u64 = 0x1_0000_0000;

/// What the fake installer was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Store(u64),
    MapPage(u64),
    MapHuge(u64),
    Wake(usize, usize),
}

/// Writes stored pages where the kernel would (anon: the primary mapping, as UFFDIO_COPY does;
/// other modes: the alias) and records every call; `fail_map` makes map_page fail.
#[derive(Default)]
struct FakeInstaller {
    calls: Mutex<Vec<Call>>,
    fail_map: AtomicBool,
}

impl FakeInstaller {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Installer for FakeInstaller {
    fn store(&self, r: &Region, page: u64, data: &[u8; 4096]) -> Result<Stored, PostcopyError> {
        self.calls.lock().unwrap().push(Call::Store(page));
        let (dst, stored) = match r.mode() {
            ServeMode::AnonCopy => (r.host_page(page), Stored::Mapped),
            _ => (
                r.alias_page(page).ok_or(PostcopyError::NoAlias {
                    slot: r.region.slot,
                })?,
                Stored::Written,
            ),
        };
        // SAFETY: the test's own mappings cover the region (primary and alias).
        unsafe { super::sys::write_page(dst, data) };
        Ok(stored)
    }
    fn map_page(&self, _r: &Region, page: u64) -> Result<(), PostcopyError> {
        self.calls.lock().unwrap().push(Call::MapPage(page));
        if self.fail_map.load(Ordering::Relaxed) {
            return Err(PostcopyError::UffdHangup);
        }
        Ok(())
    }
    fn map_huge(&self, _r: &Region, first: u64) -> Result<(), PostcopyError> {
        self.calls.lock().unwrap().push(Call::MapHuge(first));
        Ok(())
    }
    fn wake(&self, addr: usize, len: usize) {
        self.calls.lock().unwrap().push(Call::Wake(addr, len));
    }
}

fn pattern(gpa: u64) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    for (i, c) in p.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(gpa.rotate_left(17) ^ i as u64 ^ 0xa5a5).to_le_bytes());
    }
    p
}

/// Serves the pattern; the first `fail_first` fetches fail as a link that is down; with a
/// gate, every fetch waits at the barrier first (to hold a fault in flight).
#[derive(Default)]
struct Fetcher {
    fetches: AtomicU64,
    fail_first: AtomicU64,
    bad_address: AtomicBool,
    gate: Option<Arc<Barrier>>,
}

impl PageFetcher for Fetcher {
    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError> {
        if let Some(g) = &self.gate {
            g.wait();
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if self.bad_address.load(Ordering::Relaxed) {
            return Err(FetchError::BadAddress { gpa });
        }
        if self
            .fail_first
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(FetchError::Timeout { gpa, waited_ms: 1 });
        }
        buf.copy_from_slice(&pattern(gpa));
        Ok(())
    }
}

fn anon_map(len: usize) -> usize {
    // SAFETY: a fresh anonymous mapping; checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

fn memfd(len: usize) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"postcopy-unit-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd_create");
    let file = std::fs::File::from(fd);
    file.set_len(len as u64)
        .expect("ftruncate of the test memfd");
    OwnedFd::from(file)
}

fn read_page(addr: usize) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    // SAFETY: the test's own mapping.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, p.as_mut_ptr(), PAGE) };
    p
}

fn plan(mode: ServeMode, unit_size: u64) -> RegionPlan {
    RegionPlan {
        mode,
        unit_size,
        collapse_after_last_page: false,
        note: None,
        native_fallback: None,
    }
}

/// A fault service over one region.
struct Rig {
    regions: Arc<Regions>,
    installer: Arc<FakeInstaller>,
    arrivals: Arc<Arrivals>,
    service: Arc<FaultService>,
    stats: Arc<StatsCollector>,
    sup: Arc<Supervisor>,
    units: Mutex<mpsc::Receiver<UnitDone>>,
}

fn rig(region: Region, fetcher: Arc<Fetcher>) -> Rig {
    let regions = Arc::new(Regions::new(vec![region]));
    let installer = Arc::new(FakeInstaller::default());
    let sup = Arc::new(Supervisor::new().unwrap());
    let stats = Arc::new(StatsCollector::default());
    let (tx, units) = mpsc::channel();
    let arrivals = Arc::new(Arrivals::new(
        Arc::clone(&regions),
        installer.clone(),
        tx,
        Arc::clone(&sup),
    ));
    let service = Arc::new(FaultService::new(
        Arc::clone(&arrivals),
        fetcher,
        Arc::clone(&stats),
    ));
    Rig {
        regions,
        installer,
        arrivals,
        service,
        stats,
        sup,
        units: Mutex::new(units),
    }
}

impl Rig {
    fn fault(&self, page: u64) {
        let r = &self.regions[0];
        self.service.accept();
        let now = Instant::now();
        self.service.handle(&FaultJob {
            region: 0,
            addr: r.host_page(page) + 8,
            woke: now,
            read_at: now,
            vcpu: None,
        });
    }
}

fn anon_region(pages: u64) -> Region {
    let host = anon_map(pages as usize * PAGE);
    let region = RamRegion {
        slot: 3,
        gpa: GPA,
        size: pages * PAGE_SIZE,
        host_addr: host,
        alias_addr: None,
        fd: None,
        fd_offset: 0,
        kind: Backing::Anon,
        page_size: PAGE_SIZE,
    };
    Region::new(region, plan(ServeMode::AnonCopy, pages * PAGE_SIZE), None)
}

/// A shmem region: `host` and `alias` both map one memfd (the fake does not CONTINUE, so
/// what the alias holds is what the guest sees).
fn shmem_region(pages: u64, unit_pages: u64) -> (Region, OwnedFd) {
    let len = pages as usize * PAGE;
    let fd = memfd(len);
    let host = super::sys::map_shared(len, fd.as_raw_fd(), 0).unwrap();
    let alias = super::sys::map_shared(len, fd.as_raw_fd(), 0).unwrap();
    let region = RamRegion {
        slot: 4,
        gpa: GPA,
        size: len as u64,
        host_addr: host,
        alias_addr: Some(alias),
        fd: Some(fd.as_raw_fd()),
        fd_offset: 0,
        kind: Backing::Shmem,
        page_size: PAGE_SIZE,
    };
    (
        Region::new(
            region,
            plan(ServeMode::ShmemContinue, unit_pages * PAGE_SIZE),
            None,
        ),
        fd,
    )
}

#[test]
fn anon_fault_fetches_stores_once_and_needs_no_second_mapping() {
    let fetcher = Arc::new(Fetcher::default());
    let rig = rig(anon_region(4), fetcher.clone());
    rig.fault(2);
    let r = &rig.regions[0];
    assert_eq!(read_page(r.host_page(2)), pattern(GPA + 2 * PAGE_SIZE));
    // UFFDIO_COPY mapped it and woke the waiter: no CONTINUE / zero page after it.
    assert_eq!(rig.installer.calls(), vec![Call::Store(2)]);
    assert!(r.tracker.arrived(2));
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 1);
    let st = rig.stats.snapshot();
    assert_eq!((st.faults_served, st.pages_fetched), (1, 1));
    assert_eq!(st.fault_latency_count, 1);
    // A remote fault: timed by phase.
    assert_eq!(st.fault_phase_us.installed.count, 1);
    assert_eq!(st.fault_phase_us.uffd_to_read.count, 1);
    assert!(rig.service.idle());
    assert!(rig.sup.fatal().is_none());
}

#[test]
fn a_page_that_arrived_is_mapped_locally_without_a_fetch() {
    let fetcher = Arc::new(Fetcher::default());
    let rig = rig(anon_region(4), fetcher.clone());
    // A zero run marked it arrived: nothing written, so the fault maps the zero page.
    assert_eq!(rig.arrivals.mark_run(0, 1, 2), 1);
    rig.fault(1);
    assert_eq!(rig.installer.calls(), vec![Call::MapPage(1)]);
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 0);
    let st = rig.stats.snapshot();
    assert_eq!(st.pages_served_locally, 1);
    assert_eq!(
        st.fault_phase_us.installed.count, 0,
        "a local fault has no remote phases"
    );
}

#[test]
fn shmem_fault_writes_the_alias_then_maps_and_completes_the_unit() {
    let fetcher = Arc::new(Fetcher::default());
    let (region, _fd) = shmem_region(4, 2);
    let rig = rig(region, fetcher);
    rig.fault(0);
    assert!(
        rig.units.lock().unwrap().try_recv().is_err(),
        "a unit completed after 1 of 2 pages"
    );
    rig.fault(1);
    let r = &rig.regions[0];
    assert_eq!(
        rig.installer.calls(),
        vec![
            Call::Store(0),
            Call::MapPage(0),
            Call::Store(1),
            Call::MapPage(1)
        ]
    );
    for p in 0..2 {
        assert_eq!(read_page(r.host_page(p)), pattern(GPA + p * PAGE_SIZE));
    }
    // Unit completion is a message to the collapse thread, from whoever completed it.
    assert_eq!(
        rig.units.lock().unwrap().try_recv(),
        Ok(UnitDone { region: 0, unit: 0 })
    );
    assert!(rig.units.lock().unwrap().try_recv().is_err());
}

#[test]
fn a_shmem_fault_served_while_its_unit_collapses_is_that_units_stall() {
    let fetcher = Arc::new(Fetcher::default());
    let (region, _fd) = shmem_region(8, 2);
    let rig = rig(region, fetcher);
    let r = &rig.regions[0];
    // Units 1 and 2 (pages 2..6) are being collapsed; pages 0 and 6 lie outside.
    r.set_collapsing(Some((1, 3)));
    assert!(!r.collapsing_unit(0) && r.collapsing_unit(1) && r.collapsing_unit(2));
    assert!(!r.collapsing_unit(3));
    rig.fault(0);
    rig.fault(3);
    rig.fault(6);
    r.set_collapsing(None);
    assert!(!r.collapsing_unit(1));
    assert_eq!(r.take_collapse_wait(0), 0, "unit 0 was not collapsing");
    assert_eq!(r.take_collapse_wait(3), 0, "unit 3 was not collapsing");
    let stall = r.take_collapse_wait(1);
    assert!(stall > 0, "the fault in unit 1 is its stall");
    assert_eq!(r.take_collapse_wait(1), 0, "taken once");
}

#[test]
fn faults_on_a_page_in_flight_join_it_and_are_resolved_by_its_mapping() {
    let gate = Arc::new(Barrier::new(2));
    let fetcher = Arc::new(Fetcher {
        gate: Some(gate.clone()),
        ..Fetcher::default()
    });
    let (region, _fd) = shmem_region(4, 4);
    let rig = Arc::new(rig(region, fetcher.clone()));
    let first = {
        let rig = Arc::clone(&rig);
        std::thread::spawn(move || rig.fault(3))
    };
    // The first fault is now inside its fetch (at the gate) until the joiner is handled.
    let t = Instant::now();
    while rig.stats.faults_served.load(Ordering::Relaxed) < 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(20));
    rig.fault(3); // joins: returns at once
    assert_eq!(rig.stats.snapshot().faults_coalesced, 1);
    gate.wait();
    first.join().unwrap();
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 1, "fetched twice");
    // The page is mapped once; the joiner is woken again after the claim is gone (it may have
    // queued after the mapping's own wake).
    let page3 = rig.regions[0].host_page(3);
    assert_eq!(
        rig.installer.calls(),
        vec![Call::Store(3), Call::MapPage(3), Call::Wake(page3, PAGE)]
    );
    let st = rig.stats.snapshot();
    assert_eq!(st.fault_latency_count, 2, "the joined fault has no latency");
    assert!(rig.service.idle());
}

#[test]
fn a_failed_fetch_is_retried_and_counted_as_an_outage() {
    let fetcher = Arc::new(Fetcher {
        fail_first: AtomicU64::new(2),
        ..Fetcher::default()
    });
    let rig = rig(anon_region(2), fetcher.clone());
    rig.fault(0);
    assert_eq!(fetcher.fetches.load(Ordering::Relaxed), 3);
    let st = rig.stats.snapshot();
    assert_eq!(st.fetch_retries, 2);
    assert_eq!(st.outage_fault_latency_ns.len(), 1);
    assert_eq!(
        st.fault_latency_count, 0,
        "an outage fault blurred the normal latency"
    );
    assert_eq!(
        st.fault_phase_us.installed.count, 0,
        "an outage fault in the phases"
    );
    assert_eq!(read_page(rig.regions[0].host_page(0)), pattern(GPA));
}

#[test]
fn errors_reach_the_supervisor_as_typed_fatal_errors() {
    let fetcher = Arc::new(Fetcher {
        bad_address: AtomicBool::new(true),
        ..Fetcher::default()
    });
    let rig1 = rig(anon_region(2), fetcher);
    rig1.fault(1);
    assert!(matches!(
        rig1.sup.fatal().as_deref(),
        Some(PostcopyError::Fetch {
            source: FetchError::BadAddress { .. },
            ..
        })
    ));
    assert!(rig1.service.idle());

    let (region, _fd) = shmem_region(2, 2);
    let rig2 = rig(region, Arc::new(Fetcher::default()));
    rig2.installer.fail_map.store(true, Ordering::Relaxed);
    rig2.fault(0);
    assert!(matches!(
        rig2.sup.fatal().as_deref(),
        Some(PostcopyError::UffdHangup)
    ));
    // Only the first fatal error is kept.
    rig2.fault(1);
    assert!(matches!(
        rig2.sup.fatal().as_deref(),
        Some(PostcopyError::UffdHangup)
    ));
}

#[test]
fn a_stop_makes_a_fault_waiting_for_the_link_give_up() {
    let fetcher = Arc::new(Fetcher {
        fail_first: AtomicU64::new(u64::MAX),
        ..Fetcher::default()
    });
    let rig = Arc::new(rig(anon_region(2), fetcher));
    let t = {
        let rig = Arc::clone(&rig);
        std::thread::spawn(move || rig.fault(0))
    };
    std::thread::sleep(Duration::from_millis(30));
    rig.sup.stop();
    t.join().unwrap();
    assert!(!rig.regions[0].tracker.arrived(0));
    assert!(rig.installer.calls().is_empty());
    assert!(rig.sup.fatal().is_none());
    assert!(rig.service.idle());
}

// ---------------------------------------------------------------- the collapse

/// Reports the pages in `dirty` once (then nothing), like a dirty log after the guest wrote
/// them; records enable/disable.
#[derive(Default)]
struct ScriptedDirty {
    dirty: Mutex<Vec<u64>>,
    enabled: AtomicBool,
    disabled: AtomicBool,
}
impl DirtyLog for ScriptedDirty {
    fn enable(&self, _slot: u32) -> Result<(), crate::types::HookError> {
        self.enabled.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn disable(&self, _slot: u32) -> Result<(), crate::types::HookError> {
        self.disabled.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn fetch(&self, _slot: u32) -> Result<Vec<u64>, crate::types::HookError> {
        let mut bm = vec![0u64; 8];
        for p in self.dirty.lock().unwrap().drain(..) {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(bm)
    }
}

/// A staged unit of 2 MiB whose final backing is a memfd (the collapse's mmap(MAP_FIXED)
/// works the same on it as on a hugetlb file or a guest_memfd): pages arrive in the final
/// backing, some are staged and then written by the "guest" through the staging; the collapse
/// must carry those writes into the final backing, map it over the range, wake the range, free
/// the staging and finish the region. No vCPU pause exists for it to take.
fn staged_collapse_case(backing: FinalBacking) {
    const UNIT: usize = 2 << 20;
    let pages = (UNIT / PAGE) as u64;
    let final_fd = memfd(UNIT);
    let alias = super::sys::map_shared(UNIT, final_fd.as_raw_fd(), 0).unwrap();
    let host = anon_map(UNIT);
    let staging = Staging::create_over(5, host, UNIT).unwrap();
    let (kind, page_size) = match backing {
        FinalBacking::Hugetlb => (Backing::Hugetlb2m, UNIT as u64),
        FinalBacking::GuestMemfd => (Backing::GuestMemfd, PAGE_SIZE),
    };
    let region = RamRegion {
        slot: 5,
        gpa: GPA,
        size: UNIT as u64,
        host_addr: host,
        alias_addr: Some(alias),
        fd: Some(final_fd.as_raw_fd()),
        fd_offset: 0,
        kind,
        page_size,
    };
    let fetcher = Arc::new(Fetcher::default());
    let mut unit_plan = plan(ServeMode::Staged(backing), UNIT as u64);
    unit_plan.collapse_after_last_page = backing == FinalBacking::GuestMemfd;
    let rig = rig(Region::new(region, unit_plan, Some(staging)), fetcher);
    let dirty = Arc::new(ScriptedDirty::default());
    let collapser = Collapser {
        regions: Arc::clone(&rig.regions),
        installer: rig.installer.clone(),
        dirty: dirty.clone(),
        stats: Arc::clone(&rig.stats),
        sup: Arc::clone(&rig.sup),
    };
    collapser.ensure_dirty_enabled(0).unwrap();
    assert!(dirty.enabled.load(Ordering::Relaxed));
    // Faults on three pages stage them (final → staging); the guest then writes two of them.
    for p in [1u64, 7, 300] {
        rig.fault(p);
    }
    let r = &rig.regions[0];
    assert!(r.tracker.staged(7) && r.tracker.staged(300));
    for p in [7u64, 300] {
        // SAFETY: the staging mapping over the primary range (the guest's view).
        unsafe { *((host + p as usize * PAGE + 64) as *mut u64) = 0xfeed_0000 + p };
        dirty.dirty.lock().unwrap().push(p);
    }
    // The rest arrives in bulk.
    for p in 0..pages {
        let _g = r.tracker.lock_page(p);
        rig.arrivals
            .store_locked(0, p, &pattern(GPA + p * PAGE_SIZE))
            .unwrap();
    }
    let unit = rig
        .units
        .lock()
        .unwrap()
        .try_recv()
        .expect("the complete unit was not reported");
    assert_eq!(unit, UnitDone { region: 0, unit: 0 });
    let (tx, rx) = mpsc::channel();
    tx.send(unit).unwrap();
    drop(tx);
    collapse::run(&collapser, rx);

    assert!(rig.sup.fatal().is_none(), "{:?}", rig.sup.fatal());
    // The range now maps the final backing: a write through the alias shows at the host.
    // SAFETY: the test's own mappings.
    unsafe { *((alias + 5 * PAGE) as *mut u64) = 0x1234 };
    // SAFETY: as above.
    assert_eq!(unsafe { *((host + 5 * PAGE) as *const u64) }, 0x1234);
    for p in [7u64, 300] {
        // SAFETY: as above.
        let v = unsafe { *((alias + p as usize * PAGE + 64) as *const u64) };
        assert_eq!(v, 0xfeed_0000 + p, "the guest's write to page {p} was lost");
    }
    assert_eq!(read_page(alias + PAGE), pattern(GPA + PAGE_SIZE));
    assert!(rig.installer.calls().contains(&Call::Wake(host, UNIT)));
    let st = rig.stats.snapshot();
    assert_eq!(st.collapses, 1);
    let rec = &st.collapse_records[0];
    assert_eq!(rec.method, backing.collapse_method());
    assert_eq!(rec.staged_pages, 3);
    assert_eq!(rec.delta_pages.iter().sum::<u64>(), 2);
    assert_eq!(st.staging_current_bytes, 0);
    assert!(dirty.disabled.load(Ordering::Relaxed));
    assert!(r.done());
    assert!(r.staging.read().unwrap().is_none(), "staging not freed");
}

#[test]
fn staged_hugetlb_collapse_carries_guest_writes_into_the_final_backing_and_wakes_the_unit() {
    staged_collapse_case(FinalBacking::Hugetlb);
}

#[test]
fn staged_guest_memfd_collapse_carries_guest_writes_into_the_final_backing_and_wakes_the_unit() {
    staged_collapse_case(FinalBacking::GuestMemfd);
}

/// A plan that collapses after the last page: a complete unit waits on the collapse thread
/// while another unit still misses pages, and collapses together with it once the last page
/// arrived. A plan without it collapses the complete unit at once.
#[test]
fn units_planned_after_the_last_page_wait_for_it() {
    const UNIT: usize = 2 << 20;
    // (plan waits for the last page, staging over its budget): an early collapse is allowed
    // unless the plan waits and the staging is within budget.
    for (after_last_page, over_budget) in [(true, false), (false, false), (true, true)] {
        let final_fd = memfd(2 * UNIT);
        let alias = super::sys::map_shared(2 * UNIT, final_fd.as_raw_fd(), 0).unwrap();
        let host = anon_map(2 * UNIT);
        let staging = Staging::create_over(5, host, 2 * UNIT).unwrap();
        let region = RamRegion {
            slot: 5,
            gpa: GPA,
            size: 2 * UNIT as u64,
            host_addr: host,
            alias_addr: Some(alias),
            fd: Some(final_fd.as_raw_fd()),
            fd_offset: 0,
            kind: Backing::GuestMemfd,
            page_size: PAGE_SIZE,
        };
        let mut unit_plan = plan(ServeMode::Staged(FinalBacking::GuestMemfd), UNIT as u64);
        unit_plan.collapse_after_last_page = after_last_page;
        let rig = rig(
            Region::new(region, unit_plan, Some(staging)),
            Arc::new(Fetcher::default()),
        );
        let collapser = Arc::new(Collapser {
            regions: Arc::clone(&rig.regions),
            installer: rig.installer.clone(),
            dirty: Arc::new(ScriptedDirty::default()),
            stats: Arc::clone(&rig.stats),
            sup: Arc::clone(&rig.sup),
        });
        let r = &rig.regions[0];
        collapser.ensure_dirty_enabled(0).unwrap();
        let unit_pages = (UNIT / PAGE) as u64;
        let arrive = |from: u64| {
            for p in from..from + unit_pages {
                let _g = r.tracker.lock_page(p);
                rig.arrivals
                    .store_locked(0, p, &pattern(GPA + p * PAGE_SIZE))
                    .unwrap();
            }
            rig.units
                .lock()
                .unwrap()
                .try_recv()
                .expect("no unit message")
        };
        if over_budget {
            rig.stats.staging_add(collapse::STAGING_BUDGET_PAGES + 1);
        }
        let may_collapse_early = !after_last_page || over_budget;
        let (tx, rx) = mpsc::channel();
        tx.send(arrive(0)).unwrap();
        let c = Arc::clone(&collapser);
        let thread = std::thread::spawn(move || collapse::run(&c, rx));
        // Give the collapse thread time to take the first unit (and collapse it, or not): a
        // unit it may collapse at once is waited for (up to 10 s on a loaded host), one it must
        // hold back gets 200 ms to show it does not.
        let wait = Instant::now();
        let early = loop {
            let n = rig.stats.snapshot().collapses;
            let waited = wait.elapsed();
            if n > 0 || waited >= Duration::from_secs(10) {
                break n;
            }
            if !may_collapse_early && waited >= Duration::from_millis(200) {
                break n;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            early,
            u64::from(may_collapse_early),
            "collapses before the last page (after_last_page {after_last_page}, over_budget {over_budget})"
        );
        tx.send(arrive(unit_pages)).unwrap();
        drop(tx);
        thread.join().unwrap();
        assert!(rig.sup.fatal().is_none(), "{:?}", rig.sup.fatal());
        assert_eq!(rig.stats.snapshot().collapses, 2);
        assert!(r.done());
        // Both units now map the final backing.
        for p in [3, unit_pages + 3] {
            // SAFETY: the test's own mappings.
            unsafe { *((alias + p as usize * PAGE) as *mut u64) = 0xabc0 + p };
            // SAFETY: as above.
            let seen = unsafe { *((host + p as usize * PAGE) as *const u64) };
            assert_eq!(seen, 0xabc0 + p, "page {p} does not map the final backing");
        }
    }
}

/// Units of native regions and of regions with nothing to collapse also come as messages and
/// settle the region on the collapse thread, never on the thread that completed them.
#[test]
fn native_units_settle_on_the_collapse_thread() {
    let (mut region, _fd) = shmem_region(4, 4);
    region.plan.mode = ServeMode::NativeHugetlb;
    let rig = rig(region, Arc::new(Fetcher::default()));
    assert_eq!(rig.arrivals.mark_run(0, 0, 4), 4);
    let unit = rig
        .units
        .lock()
        .unwrap()
        .try_recv()
        .expect("no unit message");
    let collapser = Collapser {
        regions: Arc::clone(&rig.regions),
        installer: rig.installer.clone(),
        dirty: Arc::new(ScriptedDirty::default()),
        stats: Arc::clone(&rig.stats),
        sup: Arc::clone(&rig.sup),
    };
    let (tx, rx) = mpsc::channel();
    tx.send(unit).unwrap();
    drop(tx);
    collapse::run(&collapser, rx);
    let r = &rig.regions[0];
    assert_eq!(r.units_done.load(Ordering::Relaxed), 1);
    assert!(r.done());
    assert!(rig.installer.calls().is_empty());
    // MADV_COLLAPSE of a 16 KiB shmem range cannot map it huge: the record says so, and the
    // memory is complete either way.
    let st = rig.stats.snapshot();
    assert_eq!(st.collapse_records.len(), 1);
    assert!(st.collapse_records[0].method.starts_with("native-hugetlb"));
}
