//! The engine object: it plans the regions, prepares them (staging, userfaultfd registration),
//! wires the parts together and hands out the public API the protocol driver and the VMM use.
//!
//! Parts (no cycles: each imports only those below it):
//! - [`FaultService`] (fault_service) serves userfaults: fetcher, arrivals, installer;
//! - [`Collapser`] (collapse, native) finishes units: dirty-log deltas, the freeze and swap;
//! - [`Arrivals`] (arrival) stores arrived pages and sends completed units as messages;
//! - [`Installer`] (installer) owns every userfaultfd ioctl and what its errors mean;
//! - [`Regions`] (region) the fixed regions; [`Supervisor`] (supervisor) stop, fatal error,
//!   progress.

use crate::sync::MutexExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};

use super::arrival::Arrivals;
use super::collapse::{self, Collapser};
use super::fault_service::{self, FaultService};
use super::installer::{Installer, UffdInstaller};
use super::parked::Parked;
use super::region::{Region, Regions};
use super::staging::Staging;
use super::stats::{PostcopyStats, StatsCollector};
use super::strategy::{
    plan_region_with, probe_native, FinalBacking, ProbeError, RegionPlan, ServeMode,
};
use super::supervisor::Supervisor;
use super::sys;
use super::PostcopyError;
use crate::live_stats::EngineLive;
use crate::thread_hook::ThreadKind;
use crate::types::{runs_where, Backing, DirtyLog, Granularity, PageFetcher, RamRegion, PAGE_SIZE};

/// Size of the fault worker pool (page fetches for different faults proceed in parallel).
const FAULT_WORKERS: usize = 4;
/// The collapse thread's name.
const COLLAPSE_THREAD: &str = "postcopy-collapse";

/// What prepare() decided for one region.
#[derive(Clone, Debug)]
pub struct RegionReport {
    pub slot: u32,
    pub kind: Backing,
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
    dirty: Arc<dyn DirtyLog>,
    /// Built here, not in prepare(): its histograms take about 2 ms to allocate, which a
    /// destination can spend before the blackout (see `vmm`'s `DestSide::prebuild_engine`).
    stats: Arc<StatsCollector>,
    /// The fault workers and the collapse thread, started here (before the blackout) and
    /// given their loops by prepare() (see `parked`).
    parked: Parked,
}

/// The parts of a running engine.
struct Running {
    regions: Arc<Regions>,
    arrivals: Arc<Arrivals>,
    faults: Arc<FaultService>,
    stats: Arc<StatsCollector>,
    sup: Arc<Supervisor>,
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
    /// Plan the regions for `strategy`, check they are usable and allocate the statistics.
    /// Nothing is mapped or registered yet, and no page source is needed yet (see
    /// [`PostcopyEngine::prepare`]): a destination builds the engine before the blackout.
    pub fn new(
        regions: Vec<RamRegion>,
        strategy: Granularity,
        dirty: Arc<dyn DirtyLog>,
    ) -> Result<Self, PostcopyError> {
        Self::with_native_probe(regions, strategy, probe_native, dirty)
    }

    /// [`PostcopyEngine::new`] with the kernel probe of the native strategy given: `probe`
    /// answers, for a hugetlb or guest_memfd region, whether the kernel has the native path
    /// (`Ok`) or why not (`Err`). `new` passes [`probe_native`].
    pub fn with_native_probe(
        regions: Vec<RamRegion>,
        strategy: Granularity,
        probe: impl Fn(&RamRegion) -> Result<(), ProbeError>,
        dirty: Arc<dyn DirtyLog>,
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
        let live = Arc::<EngineLive>::default();
        let stats = Arc::new(StatsCollector::with_live(Arc::clone(&live)));
        let mut parked = Parked::default();
        let names = (0..FAULT_WORKERS)
            .map(|i| (fault_service::worker_name(i), ThreadKind::FaultService))
            .chain([(COLLAPSE_THREAD.to_owned(), ThreadKind::Collapse)]);
        for (name, kind) in names {
            // Without it, prepare() starts the thread itself.
            if let Err(e) = parked.park(&name, kind) {
                tracing::debug!("cannot start {name} ahead of the blackout: {e}");
            }
        }
        Ok(PostcopyEngine {
            state: State::Configured(Box::new(Config {
                regions,
                plans,
                dirty,
                stats,
                parked,
            })),
            live,
        })
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
            State::Running(run) => run.regions.iter().map(|r| r.plan.clone()).collect(),
            State::Stopped => Vec::new(),
        }
    }

    /// Before the vCPUs start: map staging where needed, register every region with
    /// userfaultfd, and start the fault service (fetching missing pages with `fetcher`) and
    /// the collapse thread.
    pub fn prepare(
        &mut self,
        fetcher: Arc<dyn PageFetcher>,
    ) -> Result<PrepareReport, PostcopyError> {
        let cfg = match std::mem::replace(&mut self.state, State::Stopped) {
            State::Configured(cfg) => cfg,
            other => {
                self.state = other;
                return Err(PostcopyError::AlreadyPrepared);
            }
        };
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
        let uffd = match create(FeatureFlags::from_bits_retain(
            userfaultfd_sys::UFFD_FEATURE_THREAD_ID,
        )) {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(
                    "userfaultfd without UFFD_FEATURE_THREAD_ID ({e}): no per-vCPU blocktime"
                );
                create(FeatureFlags::empty()).map_err(PostcopyError::Uffd)?
            }
        };

        let t_uffd = Instant::now();
        let (mut staging_ns, mut register_ns) = (0u64, 0u64);
        let mut states = Vec::with_capacity(cfg.regions.len());
        let mut report = Vec::new();
        for (region, plan) in cfg.regions.iter().zip(cfg.plans.iter()) {
            let len = region.size as usize;
            let t = Instant::now();
            let staging = match plan.mode {
                ServeMode::Staged(_) => {
                    Some(Staging::create_over(region.slot, region.host_addr, len)?)
                }
                _ => None,
            };
            staging_ns += t.elapsed().as_nanos() as u64;
            if plan.mode.is_native() {
                // Served in place: whatever was mapped before (precopy writes of a hybrid
                // migration) must fault again, so every page not arrived reaches the service.
                // SAFETY: the region's shared mapping, before the vCPUs run: the page cache
                // keeps the data.
                unsafe { sys::madvise(region.host_addr, len, libc::MADV_DONTNEED) }.map_err(
                    |source| PostcopyError::Native {
                        slot: region.slot,
                        what: "MADV_DONTNEED of the region's mapping",
                        source,
                    },
                )?;
            }
            let t = Instant::now();
            let mode = match plan.mode {
                ServeMode::AnonCopy => RegisterMode::MISSING,
                // What the probe registered: a guest_memfd fault on a page it has not
                // allocated yet is a MINOR fault too (the page is allocated on fault).
                ServeMode::NativeGuestMemfd => RegisterMode::MINOR,
                _ => RegisterMode::MISSING | RegisterMode::MINOR,
            };
            uffd.register_with_mode(region.host_addr as *mut libc::c_void, len, mode)
                .map_err(|source| PostcopyError::UffdRange {
                    slot: region.slot,
                    what: "UFFDIO_REGISTER",
                    addr: region.host_addr,
                    len,
                    source,
                })?;
            register_ns += t.elapsed().as_nanos() as u64;
            report.push(RegionReport {
                slot: region.slot,
                kind: region.kind,
                mode: plan.mode,
                unit_size: plan.unit_size,
                note: plan.note.clone(),
                native_fallback: plan.native_fallback.clone(),
            });
            states.push(Region::new(region.clone(), plan.clone(), staging));
        }

        *self.live.slot_gpa.lock_unpoisoned() = states
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
        let regions = Arc::new(Regions::new(states));
        let uffd = Arc::new(uffd);
        let sup = Arc::new(Supervisor::new()?);
        let stats = cfg.stats;
        let installer: Arc<dyn Installer> = Arc::new(UffdInstaller::new(
            Arc::clone(&uffd),
            Arc::clone(&sup),
            Arc::clone(&stats),
        ));
        let (units_tx, units_rx) = mpsc::channel();
        let arrivals = Arc::new(Arrivals::new(
            Arc::clone(&regions),
            Arc::clone(&installer),
            units_tx,
            Arc::clone(&sup),
        ));
        let collapser = Collapser {
            regions: Arc::clone(&regions),
            installer,
            dirty: cfg.dirty,
            stats: Arc::clone(&stats),
            sup: Arc::clone(&sup),
        };
        // Dirty logging of every region that will collapse goes on now, before any vCPU runs.
        // Turning it on later, from a fault-service thread, deadlocks: a memslot update waits
        // for KVM's SRCU readers, and a vCPU sleeping in a userfault is one of them, waiting
        // for the very thread that is updating the memslot.
        for ri in 0..regions.len() {
            if matches!(regions[ri].mode(), ServeMode::Staged(_)) {
                collapser.ensure_dirty_enabled(ri)?;
            }
        }
        let t_threads = Instant::now();
        let faults = Arc::new(FaultService::new(
            Arc::clone(&arrivals),
            fetcher,
            Arc::clone(&stats),
        ));
        let mut parked = cfg.parked;
        let mut threads = fault_service::spawn(&faults, &uffd, FAULT_WORKERS, &mut parked)?;
        threads.push(
            parked
                .launch(
                    COLLAPSE_THREAD,
                    ThreadKind::Collapse,
                    Box::new(move || collapse::run(&collapser, units_rx)),
                )
                .map_err(|source| PostcopyError::Spawn {
                    what: "collapse",
                    source,
                })?,
        );
        tracing::debug!(
            staging_us = staging_ns / 1000,
            register_us = register_ns / 1000,
            setup_us = (t_threads - t_uffd).as_micros() as u64,
            threads_us = t_threads.elapsed().as_micros() as u64,
            "postcopy engine prepared"
        );
        self.state = State::Running(Running {
            regions,
            arrivals,
            faults,
            stats,
            sup,
            threads,
        });
        Ok(PrepareReport { regions: report })
    }

    fn running(&self) -> Result<&Running, PostcopyError> {
        match &self.state {
            State::Running(run) => Ok(run),
            _ => Err(PostcopyError::NotPrepared),
        }
    }

    /// A background page from the source. Ignored (Ok(false)) if the page already arrived (the
    /// fault service fetched it, or an earlier copy): the guest may have written it since.
    pub fn bulk_page(&self, gpa: u64, data: &[u8; 4096]) -> Result<bool, PostcopyError> {
        let run = self.running()?;
        let (ri, page) = run
            .regions
            .locate_gpa(gpa)
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &run.regions[ri];
        let written = {
            let _g = r.tracker.lock_page(page);
            run.arrivals.store_locked(ri, page, data)?.is_some()
        };
        let counter = if written {
            &run.stats.bulk_pages_applied
        } else {
            &run.stats.bulk_pages_ignored
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
        let run = self.running()?;
        let count = (data.len() / PAGE) as u64;
        let (ri, first) = run
            .regions
            .locate_gpa(gpa)
            .filter(|_| count > 0 && data.len().is_multiple_of(PAGE))
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &run.regions[ri];
        if first + count > r.tracker.pages() {
            return Err(PostcopyError::BadGpa {
                gpa: gpa + (count - 1) * PAGE_SIZE,
            });
        }
        let fd = match (r.plan.mode, r.region.fd) {
            (ServeMode::ShmemContinue, Some(fd)) => fd,
            _ => {
                run.arrivals.installer.prepare_bulk(r, first, count)?;
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
        // them in a row cannot deadlock. Few, so a fault that shares a stripe with one of them
        // rarely waits, and then only for a 64 KiB write.
        const LOCK_CHUNK: u64 = 16;
        const _: () = assert!(LOCK_CHUNK as usize <= super::region_tracker::PAGE_LOCK_STRIPES);
        let mut written = 0u64;
        let mut chunk = first;
        while chunk < first + count {
            let end = (chunk + LOCK_CHUNK).min(first + count);
            let _guards: Vec<_> = (chunk..end).map(|p| r.tracker.lock_page(p)).collect();
            for (run_start, p) in runs_where(chunk, end, |p| !r.tracker.arrived(p)) {
                let bytes =
                    &data[((run_start - first) as usize) * PAGE..((p - first) as usize) * PAGE];
                let offset = r.region.fd_offset + run_start * PAGE_SIZE;
                // SAFETY: a region's backing fd stays open for the engine's lifetime
                // (RamRegion::fd), longer than this borrow.
                let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                if let Err(e) = sys::pwrite_all(file, bytes, offset) {
                    // The alias write path below does the same job, page by page.
                    tracing::debug!(
                        "pwrite of {} bytes at {offset:#x} failed ({e}): writing through the alias",
                        bytes.len()
                    );
                    for q in run_start..p {
                        let page: &[u8; 4096] = data[((q - first) as usize) * PAGE..][..PAGE]
                            .try_into()
                            .map_err(|_| PostcopyError::BadGpa { gpa })?;
                        run.arrivals.store_locked(ri, q, page)?;
                    }
                } else {
                    for q in run_start..p {
                        run.arrivals.mark_arrived(ri, q);
                    }
                }
                written += p - run_start;
            }
            chunk = end;
        }
        if r.tracker.complete() {
            run.sup.notify_progress();
        }
        run.stats
            .bulk_pages_applied
            .fetch_add(written, Ordering::Relaxed);
        run.stats
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
        let run = self.running()?;
        run.stats
            .zero_pages_applied
            .fetch_add(newly, Ordering::Relaxed);
        run.stats
            .zero_pages_ignored
            .fetch_add(count - newly, Ordering::Relaxed);
        Ok(newly)
    }

    /// Marks `count` pages from `gpa` (inside one region) as arrived without writing anything:
    /// guest memory (the page cache, the huge page, the anonymous mapping) already holds their
    /// contents, e.g. pages a hybrid migration's precopy rounds wrote. Units this completes are
    /// scheduled for collapse. Returns how many pages were newly marked.
    pub fn mark_present(&self, gpa: u64, count: u64) -> Result<u64, PostcopyError> {
        let run = self.running()?;
        if count == 0 {
            return Ok(0);
        }
        let (ri, first) = run
            .regions
            .locate_gpa(gpa)
            .ok_or(PostcopyError::BadGpa { gpa })?;
        let r = &run.regions[ri];
        let end = first
            .checked_add(count)
            .filter(|&e| e <= r.tracker.pages())
            .ok_or(PostcopyError::BadGpa {
                gpa: gpa.saturating_add(count.saturating_sub(1).saturating_mul(PAGE_SIZE)),
            })?;
        // No page lock: nothing is written. A concurrent writer of the same page (a fetch, a
        // bulk page) writes the same contents before the guest can see the page, and only the
        // first to set the arrival bit counts it.
        Ok(run.arrivals.mark_run(ri, first, end))
    }

    /// Block until every page arrived and every unit collapsed (and the staging was freed).
    pub fn wait_complete(&self) -> Result<(), PostcopyError> {
        self.wait_complete_timeout(None)
    }

    /// [`PostcopyEngine::wait_complete`] with an optional deadline. Sleeps on the progress
    /// condition, which every change that can complete the engine (or fail it) notifies.
    pub fn wait_complete_timeout(&self, timeout: Option<Duration>) -> Result<(), PostcopyError> {
        let run = self.running()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guard = run.sup.lock();
        loop {
            if let Some(err) = run.sup.fatal() {
                return Err(PostcopyError::Failed(err));
            }
            if run.regions.all_done() && run.faults.idle() {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.timeout_error(run, timeout.unwrap_or_default()));
                    }
                    Some(left)
                }
                None => None,
            };
            guard = run.sup.wait(guard, left);
        }
    }

    fn timeout_error(&self, run: &Running, t: Duration) -> PostcopyError {
        let (mut arrived, mut total, mut collapsed, mut units) = (0, 0, 0, 0);
        for r in run.regions.iter() {
            arrived += r.tracker.arrived_count();
            total += r.tracker.pages();
            if r.needs_collapse() {
                collapsed += r.units_done.load(Ordering::Acquire);
                units += r.tracker.units();
            }
        }
        PostcopyError::Timeout {
            ms: t.as_millis() as u64,
            arrived,
            total,
            collapsed,
            units,
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> PostcopyStats {
        match &self.state {
            State::Running(run) => run.stats.snapshot(),
            _ => PostcopyStats::default(),
        }
    }

    /// Stop the fault service and the collapse thread. The regions stay registered with the
    /// userfaultfd until it closes (when the engine is dropped); collapsed ranges are plain
    /// huge mappings.
    pub fn shutdown(&mut self) {
        if let State::Running(run) = std::mem::replace(&mut self.state, State::Stopped) {
            run.sup.stop();
            run.arrivals.close();
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
