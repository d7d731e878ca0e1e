//! The engine object: regions, their plans and state, the userfaultfd, the worker threads, and
//! the public API the protocol driver and the VMM use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use super::collapse::{self, CollapseJob};
use super::fault_service;
use super::native;
use super::region_tracker::RegionTracker;
use super::staging::Staging;
use super::stats::{PostcopyStats, StatsCollector};
use super::strategy::{
    plan_region_with, probe_native, FinalBacking, RegionPlan, ServeMode, Strategy,
};
use super::sys;
use super::wp_dirty_log::UffdWpDirtyLog;
use super::PostcopyError;
use crate::live_stats::EngineLive;
use crate::types::{
    DirtyLog, MemoryKind, MemslotSwap, PageFetcher, RamRegion, VcpuControl, PAGE_SIZE,
};

/// Size of the fault worker pool (page fetches for different faults proceed in parallel).
const FAULT_WORKERS: usize = 4;

/// The state of one region while postcopy runs.
pub(crate) struct RegionState {
    pub region: RamRegion,
    pub plan: RegionPlan,
    pub tracker: RegionTracker,
    /// Staging (staged modes only); taken (freed) when the whole region collapsed.
    pub staging: RwLock<Option<Staging>>,
    /// Per unit: collapsed? Workers hold it shared around a staging write + CONTINUE; the
    /// collapse holds it exclusively around the final delta and the swap.
    pub units: Vec<RwLock<bool>>,
    pub units_done: AtomicU64,
    pub finalized: AtomicBool,
    pub dirty_enabled: Mutex<bool>,
    /// Dirty bits fetched for the whole memslot but not yet consumed by a unit collapse.
    pub dirty_acc: Mutex<Vec<u64>>,
}

impl RegionState {
    /// Primary address of page `page`.
    pub fn host_page(&self, page: u64) -> usize {
        self.region.host_addr + (page * PAGE_SIZE) as usize
    }

    /// Final-backing alias address of page `page` (shmem page cache, hugetlb page, guest_memfd).
    pub fn alias_page(&self, page: u64) -> Option<usize> {
        self.region
            .alias_addr
            .map(|a| a + (page * PAGE_SIZE) as usize)
    }

    /// Whether this region's completion needs collapses.
    pub fn needs_collapse(&self) -> bool {
        matches!(
            self.plan.mode,
            ServeMode::ShmemContinue | ServeMode::Staged(_) | ServeMode::NativeHugetlb
        )
    }

    /// Whether the region is done (all pages arrived and, if needed, collapsed and cleaned up).
    pub fn done(&self) -> bool {
        self.tracker.complete()
            && (!self.needs_collapse() || self.finalized.load(Ordering::Acquire))
    }
}

/// A fault that joined one being served: when it was read, and its vCPU (if a vCPU's).
pub(crate) type Joined = (Instant, Option<usize>);

/// State shared by the engine's threads.
pub(crate) struct Shared {
    pub regions: Vec<RegionState>,
    pub uffd: Uffd,
    pub fetcher: Arc<dyn PageFetcher>,
    pub vcpus: Arc<dyn VcpuControl>,
    pub dirty: Arc<dyn DirtyLog>,
    pub memslots: Arc<dyn MemslotSwap>,
    pub stats: StatsCollector,
    /// Faults being served: (region, page) for 4 KiB modes, (region, huge index | HUGE_KEY) for
    /// whole-page mode, with the read times (and vCPUs) of later faults on the same key: those are left to
    /// the first one's CONTINUE / wake, which also records their latency.
    pub inflight: Mutex<HashMap<(usize, u64), Vec<Joined>>>,
    /// Fault events read and not yet finished by a worker.
    pub faults_pending: AtomicU64,
    pub collapse_tx: Mutex<Option<mpsc::Sender<CollapseJob>>>,
    pub shutdown: AtomicBool,
    pub fatal: Mutex<Option<Arc<PostcopyError>>>,
    pub progress: Mutex<()>,
    pub progress_cv: Condvar,
}

impl Shared {
    /// Region index and page index of `gpa`.
    pub fn locate_gpa(&self, gpa: u64) -> Option<(usize, u64)> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.region.gpa && gpa - r.region.gpa < r.region.size)
                .then(|| (i, (gpa - r.region.gpa) / PAGE_SIZE))
        })
    }

    /// Region index of primary address `addr`.
    pub fn locate_host(&self, addr: usize) -> Option<usize> {
        self.regions.iter().position(|r| {
            addr >= r.region.host_addr && addr - r.region.host_addr < r.region.size as usize
        })
    }

    /// Record the first fatal error (later ones are logged only).
    pub fn fail(&self, err: PostcopyError) {
        tracing::error!("postcopy engine: {err}");
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(Arc::new(err));
        }
        drop(f);
        self.notify_progress();
    }

    /// Wake wait_complete().
    pub fn notify_progress(&self) {
        let _g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        self.progress_cv.notify_all();
    }

    /// Sleep until the next progress notification or `timeout`, whichever comes first.
    pub fn wait_progress(&self, timeout: Duration) {
        let g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.progress_cv.wait_timeout(g, timeout);
    }

    /// A page arrived and completed unit `unit` of region `ri`: schedule what the unit needs.
    pub fn unit_arrived(&self, ri: usize, unit: u64) {
        let r = &self.regions[ri];
        if r.plan.mode.is_native() {
            native::settle_unit(self, ri, unit);
        } else if r.needs_collapse() {
            let sent = self
                .collapse_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|tx| tx.send(CollapseJob { region: ri, unit }).is_ok());
            if sent == Some(false) {
                self.fail(PostcopyError::CollapseThreadGone {
                    slot: r.region.slot,
                    unit,
                });
            }
        }
        self.notify_progress();
    }

    /// Enable dirty logging of region `ri` once, before its first staging page is CONTINUEd.
    pub fn ensure_dirty_enabled(&self, ri: usize) -> Result<(), PostcopyError> {
        let r = &self.regions[ri];
        let mut on = r.dirty_enabled.lock().unwrap_or_else(|p| p.into_inner());
        if !*on {
            self.dirty
                .enable(r.region.slot)
                .map_err(|source| PostcopyError::DirtyLog {
                    slot: r.region.slot,
                    what: "enable",
                    source,
                })?;
            *on = true;
        }
        Ok(())
    }

    /// Write a background or fetched page into its final place unless it already arrived.
    /// Returns true if written. Must be called with the page lock held.
    pub fn store_final_locked(
        &self,
        ri: usize,
        page: u64,
        data: &[u8; 4096],
    ) -> Result<bool, PostcopyError> {
        let r = &self.regions[ri];
        if r.tracker.arrived(page) {
            return Ok(false);
        }
        match r.plan.mode {
            ServeMode::AnonCopy => {
                let dst = r.host_page(page);
                let copy = || {
                    // SAFETY: `dst` is a page of the MISSING-registered anonymous region the
                    // engine manages; `data` is a live 4 KiB buffer; UFFDIO_COPY does not
                    // overwrite a present page (EEXIST).
                    unsafe {
                        self.uffd.copy(
                            data.as_ptr() as *const libc::c_void,
                            dst as *mut libc::c_void,
                            PAGE_SIZE as usize,
                            true,
                        )
                    }
                };
                match sys::retry_eagain(copy) {
                    Ok(_) => {}
                    Err(e) if sys::uffd_errno(&e) == Some(libc::EEXIST) => {
                        let _ = self.uffd.wake(dst as *mut libc::c_void, PAGE_SIZE as usize);
                    }
                    Err(source) => {
                        return Err(PostcopyError::UffdRange {
                            slot: r.region.slot,
                            what: "UFFDIO_COPY",
                            addr: dst,
                            len: PAGE_SIZE as usize,
                            source,
                        })
                    }
                }
            }
            ServeMode::ShmemContinue
            | ServeMode::Staged(_)
            | ServeMode::HugeWhole
            | ServeMode::NativeHugetlb
            | ServeMode::NativeGuestMemfd => {
                let dst = r.alias_page(page).ok_or_else(|| PostcopyError::BadRegion {
                    slot: r.region.slot,
                    kind: r.region.kind,
                    gpa: r.region.gpa,
                    size: r.region.size,
                    reason: "no alias mapping".into(),
                })?;
                // SAFETY: the alias mapping covers the whole region (checked in new()) and
                // nothing faults on it; `data` is 4 KiB.
                unsafe { sys::write_page(dst, data) };
            }
        }
        if let Some(unit) = r.tracker.mark_arrived(page) {
            self.unit_arrived(ri, unit);
        } else if r.tracker.complete() {
            self.notify_progress();
        }
        Ok(true)
    }

    /// `UFFDIO_CONTINUE` `[addr, addr + len)`; EEXIST / ENOENT (already mapped, or the range was
    /// collapsed under us) are "wake only".
    pub fn continue_or_wake(
        &self,
        slot: u32,
        addr: usize,
        len: usize,
    ) -> Result<(), PostcopyError> {
        match sys::retry_eagain(|| self.uffd.r#continue(addr as *mut libc::c_void, len, true)) {
            Ok(_) => Ok(()),
            Err(e) if matches!(sys::uffd_errno(&e), Some(libc::EEXIST | libc::ENOENT)) => {
                let _ = self.uffd.wake(addr as *mut libc::c_void, len);
                Ok(())
            }
            Err(source) => Err(PostcopyError::UffdRange {
                slot,
                what: match sys::uffd_errno(&source) {
                    Some(libc::EFAULT) => "UFFDIO_CONTINUE (EFAULT: page not in the page cache)",
                    Some(libc::EINVAL) => "UFFDIO_CONTINUE (EINVAL)",
                    Some(libc::EAGAIN) => "UFFDIO_CONTINUE (EAGAIN)",
                    Some(libc::ENOMEM) => "UFFDIO_CONTINUE (ENOMEM)",
                    _ => "UFFDIO_CONTINUE",
                },
                addr,
                len,
                source,
            }),
        }
    }

    /// `UFFDIO_ZEROPAGE` one page at `addr` of region `ri` (retrying while the kernel says
    /// EAGAIN); EEXIST (a page is there already) is "wake only".
    fn zeropage_or_wake(&self, ri: usize, addr: usize) -> Result<(), PostcopyError> {
        let len = PAGE_SIZE as usize;
        let zeropage = || {
            // SAFETY: `addr` is a page of a region the engine registered with userfaultfd;
            // UFFDIO_ZEROPAGE only fills a hole (anon: an unmapped page; shmem: a page-cache
            // hole) and never replaces a page that is there (EEXIST).
            unsafe { self.uffd.zeropage(addr as *mut libc::c_void, len, true) }
        };
        match sys::retry_eagain(zeropage) {
            Ok(_) => Ok(()),
            Err(e) if sys::uffd_errno(&e) == Some(libc::EEXIST) => {
                let _ = self.uffd.wake(addr as *mut libc::c_void, len);
                Ok(())
            }
            Err(source) => Err(PostcopyError::UffdRange {
                slot: self.regions[ri].region.slot,
                what: "UFFDIO_ZEROPAGE",
                addr,
                len,
                source,
            }),
        }
    }

    /// Make sure the page at primary address `addr` of anonymous region `ri` is mapped and wake
    /// its waiters: a page that arrived as part of a zero run was never copied in, so it gets
    /// the zero page (EEXIST: it is present already, only wake).
    pub fn anon_zero_or_wake(&self, ri: usize, addr: usize) -> Result<(), PostcopyError> {
        self.zeropage_or_wake(ri, addr)
    }

    /// shmem: `UFFDIO_CONTINUE` one page that arrived; a page that arrived as part of a zero run
    /// is not in the page cache (CONTINUE: EFAULT), so it gets a zeroed page (UFFDIO_ZEROPAGE,
    /// which never replaces a page already there: EEXIST, wake only).
    pub fn continue_or_zero(&self, ri: usize, addr: usize) -> Result<(), PostcopyError> {
        let slot = self.regions[ri].region.slot;
        match self.continue_or_wake(slot, addr, PAGE_SIZE as usize) {
            Err(PostcopyError::UffdRange { source, .. })
                if sys::uffd_errno(&source) == Some(libc::EFAULT) =>
            {
                self.zeropage_or_wake(ri, addr)
            }
            other => other,
        }
    }

    /// Native modes (HGM hugetlb, guest_memfd with userfaultfd): `UFFDIO_CONTINUE` exactly the
    /// 4 KiB at `addr` of region `ri`, which arrived. A page that arrived in a zero run was never
    /// written, so its final page may be missing from the page cache (CONTINUE: EFAULT): fault
    /// it in, zero-filled, through the alias nothing is registered on (a page already there is
    /// only looked up), then CONTINUE again.
    pub fn continue_native(&self, ri: usize, addr: usize) -> Result<(), PostcopyError> {
        let r = &self.regions[ri];
        let slot = r.region.slot;
        let len = PAGE_SIZE as usize;
        match self.continue_or_wake(slot, addr, len) {
            Err(PostcopyError::UffdRange { source, .. })
                if sys::uffd_errno(&source) == Some(libc::EFAULT) =>
            {
                let page = ((addr - r.region.host_addr) as u64) / PAGE_SIZE;
                let alias = r.alias_page(page).ok_or(PostcopyError::NotPrepared)?;
                sys::madvise(alias, len, libc::MADV_POPULATE_WRITE).map_err(|source| {
                    PostcopyError::Populate {
                        slot,
                        addr: alias,
                        len,
                        source,
                    }
                })?;
                self.continue_or_wake(slot, addr, len)
            }
            other => other,
        }
    }

    /// Whether every page of every region arrived.
    pub fn all_arrived(&self) -> bool {
        self.regions.iter().all(|r| r.tracker.complete())
    }

    /// Whether every region is done and no fault is still being served.
    pub fn all_done(&self) -> bool {
        self.regions.iter().all(|r| r.done()) && self.faults_pending.load(Ordering::Acquire) == 0
    }
}

/// Write all of `data` at `offset` of `fd` (retrying short writes and EINTR).
fn pwrite_all(fd: std::os::fd::RawFd, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `fd` is a region's backing file, open for the engine's lifetime
        // (RamRegion::fd); `data` is a live buffer of `data.len()` bytes.
        let n = unsafe { libc::pwrite(fd, data.as_ptr() as *const libc::c_void, data.len(), off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        data = &data[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// What prepare() decided for one region.
#[derive(Clone, Debug)]
pub struct RegionReport {
    pub slot: u32,
    pub kind: MemoryKind,
    pub mode: ServeMode,
    pub unit_size: u64,
    /// What the plan says about itself (e.g. "native strategy unavailable ...").
    pub note: Option<String>,
    /// With the native strategy: why this region fell back to staging (the kernel probe's
    /// answer); `None` if native serves it or native was not asked for.
    pub native_fallback: Option<String>,
}

/// What prepare() decided.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    pub regions: Vec<RegionReport>,
}

struct Config {
    regions: Vec<RamRegion>,
    plans: Vec<RegionPlan>,
    fetcher: Arc<dyn PageFetcher>,
    vcpus: Arc<dyn VcpuControl>,
    dirty: Arc<dyn DirtyLog>,
    memslots: Arc<dyn MemslotSwap>,
    wp_log: Option<Arc<UffdWpDirtyLog>>,
}

struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

enum State {
    Configured(Box<Config>),
    Running(Running),
    Stopped,
}

/// The destination postcopy memory engine.
pub struct PostcopyEngine {
    state: State,
    live: Arc<EngineLive>,
}

fn bad(region: &RamRegion, reason: impl Into<String>) -> PostcopyError {
    PostcopyError::BadRegion {
        slot: region.slot,
        kind: region.kind,
        gpa: region.gpa,
        size: region.size,
        reason: reason.into(),
    }
}

fn validate(region: &RamRegion, plan: &RegionPlan) -> Result<(), PostcopyError> {
    if region.size == 0
        || !region.size.is_multiple_of(PAGE_SIZE)
        || !region.gpa.is_multiple_of(PAGE_SIZE)
    {
        return Err(bad(
            region,
            "size and gpa must be non-zero multiples of 4 KiB",
        ));
    }
    if !region.host_addr.is_multiple_of(PAGE_SIZE as usize) {
        return Err(bad(region, "host_addr is not 4 KiB-aligned"));
    }
    let needs_alias = !matches!(plan.mode, ServeMode::AnonCopy);
    if needs_alias && region.alias_addr.is_none() {
        return Err(bad(region, "an alias mapping is required for this backing"));
    }
    if matches!(
        plan.mode,
        ServeMode::Staged(FinalBacking::Hugetlb) | ServeMode::HugeWhole | ServeMode::NativeHugetlb
    ) {
        let ps = region.page_size;
        if ps == 0 || !ps.is_power_of_two() || ps < PAGE_SIZE {
            return Err(bad(
                region,
                format!("page_size {ps:#x} is not a power of two ≥ 4 KiB"),
            ));
        }
        if !region.size.is_multiple_of(ps)
            || !(region.host_addr as u64).is_multiple_of(ps)
            || !region.fd_offset.is_multiple_of(ps)
        {
            return Err(bad(
                region,
                format!(
                    "size, host_addr and fd_offset must be multiples of the huge page size {ps:#x}"
                ),
            ));
        }
        if region.fd.is_none() {
            return Err(bad(region, "the hugetlb fd is required"));
        }
    }
    if matches!(plan.mode, ServeMode::Staged(FinalBacking::GuestMemfd)) && region.fd.is_none() {
        return Err(bad(region, "the guest_memfd fd is required"));
    }
    Ok(())
}

impl PostcopyEngine {
    /// Plan the regions for `strategy` and check they are usable. Nothing is mapped or
    /// registered yet (see [`PostcopyEngine::prepare`]).
    pub fn new(
        regions: Vec<RamRegion>,
        strategy: Strategy,
        fetcher: Arc<dyn PageFetcher>,
        vcpus: Arc<dyn VcpuControl>,
        dirty: Arc<dyn DirtyLog>,
        memslots: Arc<dyn MemslotSwap>,
    ) -> Result<Self, PostcopyError> {
        Self::with_native_probe(
            regions,
            strategy,
            probe_native,
            fetcher,
            vcpus,
            dirty,
            memslots,
        )
    }

    /// [`PostcopyEngine::new`] with the kernel probe of the native strategy given: `probe`
    /// answers, for a hugetlb or guest_memfd region, whether the kernel has the native path
    /// (`Ok`) or why not (`Err`). `new` passes [`probe_native`].
    pub fn with_native_probe(
        regions: Vec<RamRegion>,
        strategy: Strategy,
        probe: impl Fn(&RamRegion) -> Result<(), String>,
        fetcher: Arc<dyn PageFetcher>,
        vcpus: Arc<dyn VcpuControl>,
        dirty: Arc<dyn DirtyLog>,
        memslots: Arc<dyn MemslotSwap>,
    ) -> Result<Self, PostcopyError> {
        let mut plans = Vec::with_capacity(regions.len());
        for r in &regions {
            let plan = plan_region_with(r, strategy, &probe);
            validate(r, &plan)?;
            match &plan.note {
                Some(note) => tracing::debug!(
                    "postcopy slot {} ({:?}): serve mode {}: {note}",
                    r.slot,
                    r.kind,
                    plan.mode.name()
                ),
                None => tracing::debug!(
                    "postcopy slot {} ({:?}): serve mode {}",
                    r.slot,
                    r.kind,
                    plan.mode.name()
                ),
            }
            plans.push(plan);
        }
        Ok(PostcopyEngine {
            state: State::Configured(Box::new(Config {
                regions,
                plans,
                fetcher,
                vcpus,
                dirty,
                memslots,
                wp_log: None,
            })),
            live: Arc::default(),
        })
    }

    /// Use `log` (userfaultfd WP_ASYNC + PAGEMAP_SCAN) as the dirty tracker of the staged
    /// regions: prepare() then registers staging ranges for write-protect too and tells `log`
    /// where each slot lives. Pass the same log as the engine's `DirtyLog`. Call before prepare().
    pub fn use_uffd_wp_dirty_log(&mut self, log: Arc<UffdWpDirtyLog>) -> Result<(), PostcopyError> {
        match &mut self.state {
            State::Configured(cfg) => {
                cfg.wp_log = Some(log);
                Ok(())
            }
            _ => Err(PostcopyError::AlreadyPrepared),
        }
    }

    /// The live figures (per-vCPU blocktime, fault latency, collapses, staging), cheap to read
    /// from any thread, before, during and after the run.
    pub fn live(&self) -> Arc<EngineLive> {
        Arc::clone(&self.live)
    }

    /// The vCPU threads' ids (index = vCPU index): their faults count as vCPU blocktime
    /// ([`EngineLive::set_vcpu_tids`]). Call before the vCPUs run.
    pub fn set_vcpu_tids(&self, tids: Vec<i32>) {
        self.live.set_vcpu_tids(tids);
    }

    /// The per-region plans (valid before and after prepare()).
    pub fn plans(&self) -> Vec<RegionPlan> {
        match &self.state {
            State::Configured(cfg) => cfg.plans.clone(),
            State::Running(run) => run.shared.regions.iter().map(|r| r.plan.clone()).collect(),
            State::Stopped => Vec::new(),
        }
    }

    /// Before the vCPUs start: map staging where needed, register every region with
    /// userfaultfd, and start the fault service and the collapse thread.
    pub fn prepare(&mut self) -> Result<PrepareReport, PostcopyError> {
        let cfg = match std::mem::replace(&mut self.state, State::Stopped) {
            State::Configured(cfg) => cfg,
            other => {
                self.state = other;
                return Err(PostcopyError::AlreadyPrepared);
            }
        };
        let wp = cfg.wp_log.is_some();
        let mut features = FeatureFlags::empty();
        if wp {
            features |= FeatureFlags::from_bits_retain(
                sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            );
        }
        let create = |features: FeatureFlags| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(features)
                .create()
        };
        // The faulting thread's id in every fault message (UFFD_FEATURE_THREAD_ID, Linux 4.14),
        // for per-vCPU blocktime; without it the engine works the same, the blocktime stays 0.
        let uffd =
            match create(features | FeatureFlags::from_bits_retain(sys::UFFD_FEATURE_THREAD_ID)) {
                Ok(u) => u,
                Err(e) => {
                    tracing::info!(
                        "userfaultfd without UFFD_FEATURE_THREAD_ID ({e}): no per-vCPU blocktime"
                    );
                    create(features).map_err(PostcopyError::Uffd)?
                }
            };

        let mut states = Vec::with_capacity(cfg.regions.len());
        let mut report = Vec::new();
        for (region, plan) in cfg.regions.iter().zip(cfg.plans.iter()) {
            let len = region.size as usize;
            let staging = match plan.mode {
                ServeMode::Staged(_) => {
                    Some(Staging::create_over(region.slot, region.host_addr, len)?)
                }
                _ => None,
            };
            if plan.mode.is_native() {
                // Served in place: whatever was mapped before (precopy writes of a hybrid
                // migration) must fault again, so every page not arrived reaches the service.
                // The page cache keeps the data.
                sys::madvise(region.host_addr, len, libc::MADV_DONTNEED).map_err(|source| {
                    PostcopyError::Native {
                        slot: region.slot,
                        what: "MADV_DONTNEED of the region's mapping",
                        source,
                    }
                })?;
            }
            let mut mode = match plan.mode {
                ServeMode::AnonCopy => RegisterMode::MISSING,
                // What the probe registered: a guest_memfd fault on a page it has not
                // allocated yet is a MINOR fault too (the page is allocated on fault).
                ServeMode::NativeGuestMemfd => RegisterMode::MINOR,
                _ => RegisterMode::MISSING | RegisterMode::MINOR,
            };
            if wp && matches!(plan.mode, ServeMode::Staged(_)) {
                mode |= RegisterMode::from_bits_retain(sys::UFFDIO_REGISTER_MODE_WP);
            }
            uffd.register_with_mode(region.host_addr as *mut libc::c_void, len, mode)
                .map_err(|source| PostcopyError::UffdRange {
                    slot: region.slot,
                    what: "UFFDIO_REGISTER",
                    addr: region.host_addr,
                    len,
                    source,
                })?;
            if let (Some(log), ServeMode::Staged(_)) = (&cfg.wp_log, plan.mode) {
                log.add_slot(region.slot, region.host_addr, len);
            }
            let ppu = (plan.unit_size / PAGE_SIZE).max(1);
            let tracker = RegionTracker::new(region.size / PAGE_SIZE, ppu);
            let units = (0..tracker.units()).map(|_| RwLock::new(false)).collect();
            let words = (region.size / PAGE_SIZE).div_ceil(64) as usize;
            report.push(RegionReport {
                slot: region.slot,
                kind: region.kind,
                mode: plan.mode,
                unit_size: plan.unit_size,
                note: plan.note.clone(),
                native_fallback: plan.native_fallback.clone(),
            });
            states.push(RegionState {
                region: region.clone(),
                plan: plan.clone(),
                tracker,
                staging: RwLock::new(staging),
                units,
                units_done: AtomicU64::new(0),
                finalized: AtomicBool::new(false),
                dirty_enabled: Mutex::new(false),
                dirty_acc: Mutex::new(vec![0; words]),
            });
        }

        *self.live.slot_gpa.lock().unwrap_or_else(|p| p.into_inner()) = states
            .iter()
            .map(|r| (r.region.slot, r.region.gpa))
            .collect();
        self.live.units_to_collapse.store(
            states
                .iter()
                .filter(|r| r.needs_collapse())
                .map(|r| r.tracker.units())
                .sum(),
            Ordering::Relaxed,
        );
        let (collapse_tx, collapse_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            regions: states,
            uffd,
            fetcher: cfg.fetcher,
            vcpus: cfg.vcpus,
            dirty: cfg.dirty,
            memslots: cfg.memslots,
            stats: StatsCollector::with_live(Arc::clone(&self.live)),
            inflight: Mutex::new(HashMap::new()),
            faults_pending: AtomicU64::new(0),
            collapse_tx: Mutex::new(Some(collapse_tx)),
            shutdown: AtomicBool::new(false),
            fatal: Mutex::new(None),
            progress: Mutex::new(()),
            progress_cv: Condvar::new(),
        });
        // Dirty logging of every region that will collapse goes on now, before any vCPU runs.
        // Turning it on later, from a fault-service thread, deadlocks: a memslot update waits
        // for KVM's SRCU readers, and a vCPU sleeping in a userfault is one of them, waiting
        // for the very thread that is updating the memslot.
        for ri in 0..shared.regions.len() {
            if matches!(shared.regions[ri].plan.mode, ServeMode::Staged(_)) {
                shared.ensure_dirty_enabled(ri)?;
            }
        }
        let mut threads = fault_service::spawn(&shared, FAULT_WORKERS)?;
        let s = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("postcopy-collapse".into())
                .spawn(move || {
                    crate::thread_hook::started(crate::thread_hook::ThreadKind::Collapse);
                    collapse::run(s, collapse_rx)
                })
                .map_err(|source| PostcopyError::Spawn {
                    what: "collapse",
                    source,
                })?,
        );
        self.state = State::Running(Running { shared, threads });
        Ok(PrepareReport { regions: report })
    }

    fn shared(&self) -> Result<&Arc<Shared>, PostcopyError> {
        match &self.state {
            State::Running(run) => Ok(&run.shared),
            _ => Err(PostcopyError::NotPrepared),
        }
    }

    /// A background page from the source. Ignored (Ok(false)) if the page already arrived (the
    /// fault service fetched it, or an earlier copy): the guest may have written it since.
    pub fn bulk_page(&self, gpa: u64, data: &[u8; 4096]) -> Result<bool, PostcopyError> {
        let shared = self.shared()?;
        let (ri, page) = shared
            .locate_gpa(gpa)
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &shared.regions[ri];
        let written = {
            let _g = r.tracker.lock_page(page);
            shared.store_final_locked(ri, page, data)?
        };
        let counter = if written {
            &shared.stats.bulk_pages_applied
        } else {
            &shared.stats.bulk_pages_ignored
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(written)
    }

    /// Background pages from the source: `data` holds whole pages from `gpa` on, inside one
    /// region. Each page follows [`PostcopyEngine::bulk_page`]'s rule (ignored if it arrived
    /// already). A shmem region's pages go straight into its page cache with one `pwrite` per
    /// run of pages that have not arrived, under those pages' locks: no page fault and no page
    /// table entry per 4 KiB on the alias. Returns how many pages were written.
    pub fn bulk_pages(&self, gpa: u64, data: &[u8]) -> Result<u64, PostcopyError> {
        const PAGE: usize = PAGE_SIZE as usize;
        let shared = self.shared()?;
        let count = (data.len() / PAGE) as u64;
        let (ri, first) = shared
            .locate_gpa(gpa)
            .filter(|_| count > 0 && data.len().is_multiple_of(PAGE))
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &shared.regions[ri];
        if first + count > r.tracker.pages() {
            return Err(PostcopyError::BadGpa {
                gpa: gpa + (count - 1) * PAGE_SIZE,
            });
        }
        let fd = match (r.plan.mode, r.region.fd) {
            (ServeMode::ShmemContinue, Some(fd)) => fd,
            _ => {
                let mut written = 0;
                for (i, page) in data.chunks_exact(PAGE).enumerate() {
                    let page: &[u8; 4096] =
                        page.try_into().map_err(|_| PostcopyError::BadGpa { gpa })?;
                    written += u64::from(self.bulk_page(gpa + i as u64 * PAGE_SIZE, page)?);
                }
                return Ok(written);
            }
        };
        // Pages locked at once: consecutive pages have distinct lock stripes (there are more
        // stripes than this), and no other thread holds more than one page lock, so taking
        // them in a row cannot deadlock.
        const LOCK_CHUNK: u64 = 64;
        let mut written = 0u64;
        let mut chunk = first;
        while chunk < first + count {
            let end = (chunk + LOCK_CHUNK).min(first + count);
            let _guards: Vec<_> = (chunk..end).map(|p| r.tracker.lock_page(p)).collect();
            let mut p = chunk;
            while p < end {
                if r.tracker.arrived(p) {
                    p += 1;
                    continue;
                }
                let run_start = p;
                while p < end && !r.tracker.arrived(p) {
                    p += 1;
                }
                let bytes =
                    &data[((run_start - first) as usize) * PAGE..((p - first) as usize) * PAGE];
                let offset = r.region.fd_offset + run_start * PAGE_SIZE;
                if let Err(e) = pwrite_all(fd, bytes, offset) {
                    // The alias write path below does the same job, page by page.
                    tracing::debug!(
                        "pwrite of {} bytes at {offset:#x} failed ({e}): writing through the alias",
                        bytes.len()
                    );
                    for q in run_start..p {
                        let page: &[u8; 4096] = data[((q - first) as usize) * PAGE..][..PAGE]
                            .try_into()
                            .map_err(|_| PostcopyError::BadGpa { gpa })?;
                        shared.store_final_locked(ri, q, page)?;
                    }
                } else {
                    for q in run_start..p {
                        if let Some(unit) = r.tracker.mark_arrived(q) {
                            shared.unit_arrived(ri, unit);
                        }
                    }
                }
                written += p - run_start;
            }
            chunk = end;
        }
        if r.tracker.complete() {
            shared.notify_progress();
        }
        shared
            .stats
            .bulk_pages_applied
            .fetch_add(written, Ordering::Relaxed);
        shared
            .stats
            .bulk_pages_ignored
            .fetch_add(count - written, Ordering::Relaxed);
        Ok(written)
    }

    /// A run of `count` zero pages from `gpa` (inside one region). Destination memory starts
    /// zero-filled (fresh hugetlb / shmem / guest_memfd / anonymous pages, fresh staging), and
    /// nothing is written to a page before it arrives, so a zero page that has not arrived
    /// only gets its arrival bit: nothing is written (an anonymous or shmem page the guest then
    /// touches is mapped zero-filled by the fault service, never fetched). Pages that already
    /// arrived are left alone. Units the run completes are scheduled for collapse. Returns how
    /// many pages were newly marked.
    ///
    /// The caller must not use this for a page whose memory may hold earlier data (e.g. a
    /// precopy write a hybrid migration discarded): write those with
    /// [`PostcopyEngine::bulk_page`] and a zero page instead.
    pub fn bulk_zero(&self, gpa: u64, count: u64) -> Result<u64, PostcopyError> {
        let newly = self.mark_present(gpa, count)?;
        let shared = self.shared()?;
        shared
            .stats
            .zero_pages_applied
            .fetch_add(newly, Ordering::Relaxed);
        shared
            .stats
            .zero_pages_ignored
            .fetch_add(count - newly, Ordering::Relaxed);
        Ok(newly)
    }

    /// Marks `count` pages from `gpa` (inside one region) as arrived without writing anything:
    /// guest memory (the page cache, the huge page, the anonymous mapping) already holds their
    /// contents, e.g. pages a hybrid migration's precopy rounds wrote. Units this completes are
    /// scheduled for collapse. Returns how many pages were newly marked.
    pub fn mark_present(&self, gpa: u64, count: u64) -> Result<u64, PostcopyError> {
        let shared = self.shared()?;
        if count == 0 {
            return Ok(0);
        }
        let (ri, first) = shared
            .locate_gpa(gpa)
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &shared.regions[ri];
        let end = first
            .checked_add(count)
            .filter(|&e| e <= r.tracker.pages())
            .ok_or(PostcopyError::BadGpa {
                gpa: gpa.saturating_add(count.saturating_sub(1).saturating_mul(PAGE_SIZE)),
            })?;
        // No page lock: nothing is written. A concurrent writer of the same page (a fetch, a
        // bulk page) writes the same contents before the guest can see the page, and only the
        // first to set the arrival bit counts it.
        let (newly, completed) = r.tracker.mark_arrived_run(first, end);
        for unit in &completed {
            shared.unit_arrived(ri, *unit);
        }
        if completed.is_empty() && r.tracker.complete() {
            shared.notify_progress();
        }
        Ok(newly)
    }

    /// Whether the page at `gpa` has arrived.
    pub fn page_arrived(&self, gpa: u64) -> Result<bool, PostcopyError> {
        let shared = self.shared()?;
        let (ri, page) = shared
            .locate_gpa(gpa)
            .ok_or(PostcopyError::BadGpa { gpa })?;
        Ok(shared.regions[ri].tracker.arrived(page))
    }

    /// Guest physical addresses of the pages that have not arrived yet (for resuming after a
    /// reconnect, or to ask the source for what is left).
    pub fn missing_pages(&self) -> Result<Vec<u64>, PostcopyError> {
        let shared = self.shared()?;
        Ok(shared
            .regions
            .iter()
            .flat_map(|r| {
                r.tracker
                    .missing_in(0, r.tracker.pages())
                    .into_iter()
                    .map(move |p| r.region.gpa + p * PAGE_SIZE)
            })
            .collect())
    }

    /// Block until every page arrived and every unit collapsed (and the staging was freed).
    pub fn wait_complete(&self) -> Result<(), PostcopyError> {
        self.wait_complete_timeout(None)
    }

    /// [`PostcopyEngine::wait_complete`] with an optional deadline.
    pub fn wait_complete_timeout(&self, timeout: Option<Duration>) -> Result<(), PostcopyError> {
        let shared = self.shared()?;
        let start = Instant::now();
        let mut guard = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(msg) = shared
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(PostcopyError::Failed(msg));
            }
            if shared.all_done() {
                return Ok(());
            }
            if let Some(t) = timeout {
                if start.elapsed() >= t {
                    let (mut arrived, mut total, mut collapsed, mut units) = (0, 0, 0, 0);
                    for r in &shared.regions {
                        arrived += r.tracker.arrived_count();
                        total += r.tracker.pages();
                        if r.needs_collapse() {
                            collapsed += r.units_done.load(Ordering::Acquire);
                            units += r.tracker.units();
                        }
                    }
                    return Err(PostcopyError::Timeout {
                        ms: t.as_millis() as u64,
                        arrived,
                        total,
                        collapsed,
                        units,
                    });
                }
            }
            guard = shared
                .progress_cv
                .wait_timeout(guard, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> PostcopyStats {
        match &self.state {
            State::Running(run) => run.shared.stats.snapshot(),
            _ => PostcopyStats::default(),
        }
    }

    /// Stop the fault service and the collapse thread. The regions stay registered with the
    /// userfaultfd until it closes (when the engine is dropped); collapsed ranges are plain
    /// huge mappings.
    pub fn shutdown(&mut self) {
        if let State::Running(run) = std::mem::replace(&mut self.state, State::Stopped) {
            run.shared.shutdown.store(true, Ordering::Release);
            run.shared
                .collapse_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            for t in run.threads {
                if t.join().is_err() {
                    tracing::error!("a postcopy engine thread panicked");
                }
            }
        }
    }
}

impl Drop for PostcopyEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
