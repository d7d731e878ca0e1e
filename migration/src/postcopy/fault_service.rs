//! The userfaultfd fault service: a small pool of workers; the kernel wakes one idle worker
//! per fault (each waits on an epoll of its own holding the O_NONBLOCK uffd as an exclusive
//! waiter, and the supervisor's stop eventfd), which reads the event and serves the fault
//! itself (fetch over the urgent channel, store the page through the [`Arrivals`], map it
//! through the [`Installer`]). It keeps serving while a collapse has the vCPUs paused.
//!
//! The service holds only what it uses: the regions, the arrivals (and through them the
//! installer), the page fetcher, the statistics and the supervisor.

use crate::sync::{MutexExt, RwLockExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::arrival::Arrivals;
use super::fault_phases::FaultStamps;
use super::installer::{Installer, Stored};
use super::parked::Parked;
use super::region::{Region, Regions};
use super::stats::StatsCollector;
use super::strategy::ServeMode;
use super::supervisor::Supervisor;
use super::PostcopyError;
use crate::thread_hook::ThreadKind;
use crate::thread_priority::{self, ThreadRole};
use crate::types::{FetchError, FetchTimes, PageFetcher, PAGE_SIZE};

/// Marks whole-huge-page keys in the in-flight set.
const HUGE_KEY: u64 = 1 << 63;
/// Threads that fetch the pages of one huge page in parallel (whole-page mode).
const HUGE_FETCH_THREADS: usize = 8;

/// A fault that joined one being served: when it was read, and its vCPU (if a vCPU's).
type Joined = (Instant, Option<usize>);

/// One fault to serve.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultJob {
    pub region: usize,
    pub addr: usize,
    /// When the reader woke on the userfaultfd (the first phase starts there).
    pub woke: Instant,
    /// When the reader read the event.
    pub read_at: Instant,
    /// The faulting vCPU (None: another thread, or no thread ids).
    pub vcpu: Option<usize>,
}

/// The fault service: serves one fault at a time per calling thread.
pub(crate) struct FaultService {
    regions: Arc<Regions>,
    arrivals: Arc<Arrivals>,
    installer: Arc<dyn Installer>,
    fetcher: Arc<dyn PageFetcher>,
    stats: Arc<StatsCollector>,
    sup: Arc<Supervisor>,
    /// Faults being served: (region, page) for 4 KiB modes, (region, huge index | HUGE_KEY)
    /// for whole-page mode, with the read times (and vCPUs) of later faults on the same key:
    /// those are left to the first one's CONTINUE / wake, which also records their latency.
    inflight: Mutex<HashMap<(usize, u64), Vec<Joined>>>,
    /// Fault events read and not yet finished by a worker.
    pending: AtomicU64,
}

impl FaultService {
    pub fn new(
        arrivals: Arc<Arrivals>,
        fetcher: Arc<dyn PageFetcher>,
        stats: Arc<StatsCollector>,
    ) -> Self {
        FaultService {
            regions: Arc::clone(&arrivals.regions),
            installer: Arc::clone(&arrivals.installer),
            sup: Arc::clone(&arrivals.sup),
            arrivals,
            fetcher,
            stats,
            inflight: Mutex::new(HashMap::new()),
            pending: AtomicU64::new(0),
        }
    }

    /// Whether no fault is being served.
    pub fn idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Serve one fault event and account for it (the worker's body; tests call it directly).
    pub fn handle(&self, job: &FaultJob) {
        self.stats.faults_served.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.serve(job) {
            self.sup.fail(e);
        }
        let left = self.pending.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.regions.all_arrived() {
            self.sup.notify_progress();
        }
    }

    /// A fault event was read: count it pending until [`FaultService::handle`] is done.
    pub fn accept(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }
}

/// One worker's wait for faults: an epoll instance of its own holding the userfaultfd
/// (`EPOLLEXCLUSIVE`) and the supervisor's stop eventfd. Every idle worker waits on its own
/// instance, and the kernel wakes exactly one of them per fault (the faulting thread's
/// `wake_up_poll` on the userfaultfd stops at the first exclusive waiter); that worker reads
/// the event and serves it. No worker wakes another: a leader handing the reader's place on
/// to a follower cost a wake-up per fault, which on two cores preempted the worker that was
/// about to serve it (measured: docs/measuring.md, *One wake-up per fault*).
struct FaultWait {
    epoll: Epoll,
}

/// What a worker's epoll reports.
const UFFD_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

impl FaultWait {
    fn new(uffd: &Uffd, sup: &Supervisor) -> Result<Self, PostcopyError> {
        let epoll_err = |source: nix::errno::Errno| PostcopyError::FaultService {
            what: "setting up a fault worker's epoll",
            source: source.into(),
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(epoll_err)?;
        epoll
            .add(
                std::os::fd::AsFd::as_fd(uffd),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, UFFD_TOKEN),
            )
            .map_err(epoll_err)?;
        epoll
            .add(
                sup.stop_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN),
            )
            .map_err(epoll_err)?;
        Ok(FaultWait { epoll })
    }
}

/// The name of fault worker `i`.
pub(crate) fn worker_name(i: usize) -> String {
    format!("postcopy-fault-{i}")
}

/// Start `workers` serving threads. There is no separate reader: each idle worker waits on
/// the userfaultfd (see [`FaultWait`]), and the worker woken for a fault reads it and serves
/// it, so a fault costs no hand-off between threads.
pub(crate) fn spawn(
    service: &Arc<FaultService>,
    uffd: &Arc<Uffd>,
    workers: usize,
    parked: &mut Parked,
) -> Result<Vec<JoinHandle<()>>, PostcopyError> {
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let s = Arc::clone(service);
        let u = Arc::clone(uffd);
        let wait = FaultWait::new(uffd, &service.sup)?;
        threads.push(
            parked
                .launch(
                    &worker_name(i),
                    ThreadKind::FaultService,
                    Box::new(move || worker(&s, &u, &wait)),
                )
                .map_err(|source| PostcopyError::Spawn {
                    what: "fault worker",
                    source,
                })?,
        );
    }
    Ok(threads)
}

fn worker(service: &FaultService, uffd: &Uffd, wait: &FaultWait) {
    let _priority = thread_priority::enter(ThreadRole::Urgent);
    // One event per read: the worker serves what it reads, and a fault left in the queue
    // wakes (or is found by) another worker.
    let mut buf = EventBuffer::new(1);
    while let Some(job) = next_fault(service, uffd, wait, &mut buf) {
        service.handle(&job);
    }
}

/// Wait for a fault event (on the worker's epoll: the userfaultfd and the stop eventfd) and
/// read it. None when stopping or on a fatal error (reported).
fn next_fault(
    service: &FaultService,
    uffd: &Uffd,
    wait: &FaultWait,
    buf: &mut EventBuffer,
) -> Option<FaultJob> {
    let sup = &service.sup;
    let mut ready = [EpollEvent::empty(); 2];
    while !sup.stopping() {
        let waited = wait.epoll.wait(&mut ready, EpollTimeout::NONE);
        let woke = Instant::now();
        let n = match waited {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                sup.fail(PostcopyError::FaultService {
                    what: "epoll_wait on the userfaultfd",
                    source: e.into(),
                });
                return None;
            }
        };
        if sup.stopping() {
            return None;
        }
        let Some(uffd_ready) = ready[..n].iter().find(|e| e.data() == UFFD_TOKEN) else {
            continue;
        };
        let flags = uffd_ready.events();
        if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            sup.fail(PostcopyError::UffdHangup);
            return None;
        }
        if !flags.contains(EpollFlags::EPOLLIN) {
            continue;
        }
        let events = match uffd.read_events(buf) {
            Ok(ev) => ev,
            // Another worker read it first (its epoll was ready too): wait again.
            Err(userfaultfd::Error::SystemError(nix_errno)) if nix_errno as i32 == libc::EAGAIN => {
                continue
            }
            Err(e) => {
                sup.fail(PostcopyError::Uffd(e));
                return None;
            }
        };
        let read_at = Instant::now();
        for ev in events {
            match ev {
                Ok(Event::Pagefault {
                    addr, thread_id, ..
                }) => {
                    let addr = addr as usize;
                    match service.regions.locate_host(addr) {
                        Some(region) => {
                            service.accept();
                            // UFFD_FEATURE_THREAD_ID: the faulting thread; a vCPU's blocks.
                            let vcpu = service.stats.live.fault_read(thread_id.as_raw(), read_at);
                            return Some(FaultJob {
                                region,
                                addr,
                                woke,
                                read_at,
                                vcpu,
                            });
                        }
                        None => {
                            tracing::warn!("userfault at {addr:#x} outside every postcopy region")
                        }
                    }
                }
                Ok(other) => tracing::debug!("ignoring userfaultfd event {other:?}"),
                Err(e) => tracing::warn!("bad userfaultfd event: {e}"),
            }
        }
    }
    None
}

/// A fault being served: the first fault on its key. Later faults on the same key join it;
/// [`Inflight::served`] records the latency of all of them. Dropped without `served` (an error,
/// shutdown), it only removes the key.
struct Inflight<'a> {
    service: &'a FaultService,
    key: (usize, u64),
    read_at: Instant,
    vcpu: Option<usize>,
    done: bool,
}

impl Inflight<'_> {
    /// The fault is resolved (CONTINUE / COPY / wake done): record its latency and that of the
    /// faults that joined it; `outage`: its fetch waited for a link that was down.
    ///
    /// Faults that joined are woken once more here, after the key is gone. The mapping's own
    /// wake only reaches threads already queued on the userfaultfd when it ran; a thread can
    /// fault on the same range again after that wake (its mapping was zapped meanwhile, e.g.
    /// by a collapse replacing the page tables) and its event then joins this claim. Without
    /// this wake nothing would resolve it: the page has arrived, so no later fault on it is
    /// ever served. Any event read after the key is removed claims the page anew.
    fn served(mut self, outage: bool) {
        let joined = self
            .service
            .inflight
            .lock_unpoisoned()
            .remove(&self.key)
            .unwrap_or_default();
        if !joined.is_empty() {
            let (addr, len) = self.service.claimed_range(self.key);
            self.service.installer.wake(addr, len);
        }
        let now = Instant::now();
        let stats = &self.service.stats;
        stats.fault_latency(
            now.saturating_duration_since(self.read_at).as_nanos() as u64,
            outage,
        );
        if let Some(v) = self.vcpu {
            stats.live.vcpu_woken(v, now);
        }
        for (t, vcpu) in joined {
            stats.fault_latency(now.saturating_duration_since(t).as_nanos() as u64, outage);
            if let Some(v) = vcpu {
                stats.live.vcpu_woken(v, now);
            }
        }
        self.done = true;
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.service.inflight.lock_unpoisoned().remove(&self.key);
        }
    }
}

impl FaultService {
    /// The range whose mapping resolves the faults on claim key `(region, key)`: its 4 KiB page,
    /// or (a [`HUGE_KEY`] key) its whole huge page.
    fn claimed_range(&self, (ri, key): (usize, u64)) -> (usize, usize) {
        let r = &self.regions[ri];
        if key & HUGE_KEY != 0 {
            let first = (key & !HUGE_KEY) * r.tracker.pages_per_unit();
            (r.host_page(first), r.region.page_size as usize)
        } else {
            (r.host_page(key), PAGE_SIZE as usize)
        }
    }

    /// Claim `key` for `job`; None if a fault on it is being served already (this one then
    /// joins it and is woken by it: see [`Inflight::served`]).
    fn claim(&self, key: (usize, u64), job: &FaultJob) -> Option<Inflight<'_>> {
        let (read_at, vcpu) = (job.read_at, job.vcpu);
        let mut map = self.inflight.lock_unpoisoned();
        if let Some(joined) = map.get_mut(&key) {
            joined.push((read_at, vcpu));
            drop(map);
            self.stats.faults_coalesced.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        map.insert(key, Vec::new());
        Some(Inflight {
            service: self,
            key,
            read_at,
            vcpu,
            done: false,
        })
    }

    /// Fetch page `page` of region `r` from the source, retrying while the link is slow or
    /// down (a faulting vCPU waits: across a postcopy-paused outage, until the source is
    /// back); returns false if the page arrived meanwhile by another path or the engine
    /// stops. Sets `outage` if an attempt failed.
    fn fetch(
        &self,
        r: &Region,
        page: u64,
        buf: &mut [u8; 4096],
        outage: &mut bool,
        times: &mut FetchTimes,
    ) -> Result<bool, PostcopyError> {
        let gpa = r.region.gpa + page * PAGE_SIZE;
        let mut backoff = Duration::from_millis(1);
        let mut warned = false;
        loop {
            if r.tracker.arrived(page) || self.sup.stopping() {
                return Ok(false);
            }
            match self.fetcher.fetch_timed(gpa, buf, times) {
                Ok(()) => {
                    self.stats.pages_fetched.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(source @ FetchError::BadAddress { .. }) => {
                    return Err(PostcopyError::Fetch { gpa, source })
                }
                Err(e) => {
                    *outage = true;
                    // The page may still arrive by another path (the bulk stream, a
                    // reconnect): wait for progress rather than hammer a channel that is down,
                    // and serve the fault locally as soon as the page is there.
                    self.stats.fetch_retries.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(
                            "fetch of gpa {gpa:#x} failed, waiting for the page to arrive and retrying: {e}"
                        );
                        warned = true;
                    } else {
                        tracing::debug!("fetch of gpa {gpa:#x} failed again: {e}");
                    }
                    // A link that is down: wait for the urgent channel to come back (woken the
                    // moment it is re-attached), else for any page to arrive.
                    if !matches!(e, FetchError::Disconnected { .. })
                        || !self.fetcher.wait_connected(Duration::from_millis(100))
                    {
                        self.sup.wait_progress(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// Record the phases of a remote fault that was just installed (see `fault_phases`).
    fn record_phases(&self, job: &FaultJob, started: Instant, t: &FetchTimes, stored: Instant) {
        let installed = Instant::now();
        // A fetcher that does not time its steps: put the whole fetch in `reply_read`.
        let written = t.request_written.unwrap_or(started);
        let read = t.reply_read.unwrap_or(stored);
        self.stats.phases.record(&FaultStamps {
            woke: job.woke.min(job.read_at),
            started,
            request_written: written,
            reply_read: read,
            source_ns: t.source_ns,
            stored,
            installed,
        });
    }

    /// Serve one fault: the flow of its region's mode.
    pub fn serve(&self, job: &FaultJob) -> Result<(), PostcopyError> {
        let r = &self.regions[job.region];
        let page = r.page_of_host(job.addr);
        match r.mode() {
            ServeMode::AnonCopy
            | ServeMode::ShmemContinue
            | ServeMode::NativeHugetlb
            | ServeMode::NativeGuestMemfd => self.serve_4k_direct(job, page),
            ServeMode::Staged(_) => self.serve_staged(job, page),
            ServeMode::HugeWhole => self.serve_huge(job, page),
        }
    }

    /// anon, shmem and the native modes: the final place is the faulting one.
    fn serve_4k_direct(&self, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
        let ri = job.region;
        let r = &self.regions[ri];
        let Some(claim) = self.claim((ri, page), job) else {
            return Ok(()); // the first fault on this page wakes every waiter
        };
        let unit = r.tracker.unit_of(page);
        // shmem: a fault in a unit the kernel is collapsing waits for it (see
        // `Region::collapsing`); seen at its start or its end, its time is that unit's stall.
        let shmem = r.mode() == ServeMode::ShmemContinue;
        let mut in_collapse = shmem && r.collapsing_unit(unit);
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let mut stored = None;
        let mut outage = false;
        let mut times = FetchTimes::default();
        let fetched =
            !r.tracker.arrived(page) && self.fetch(r, page, &mut buf, &mut outage, &mut times)?;
        if fetched {
            let _g = r.tracker.lock_page(page);
            stored = self.arrivals.store_locked(ri, page, &buf)?;
        } else {
            self.stats
                .pages_served_locally
                .fetch_add(1, Ordering::Relaxed);
        }
        if !r.tracker.arrived(page) {
            return Ok(()); // stopping: the fetch gave up
        }
        let stored_at = Instant::now();
        // A store that mapped the page (anon UFFDIO_COPY) or found it present woke the
        // waiters; otherwise map it now.
        if !matches!(stored, Some(Stored::Mapped | Stored::Present)) {
            self.installer.map_page(r, page)?;
        }
        in_collapse |= shmem && r.collapsing_unit(unit);
        if in_collapse {
            r.note_collapse_wait(unit, job.read_at.elapsed().as_nanos() as u64);
        }
        if fetched && stored.is_some() && !outage {
            self.record_phases(job, started, &times, stored_at);
        }
        claim.served(outage);
        Ok(())
    }

    /// Staged huge / guest_memfd regions: fetched pages go to the final backing and the
    /// staging; pages that arrived in bulk are copied locally from the final backing into the
    /// staging.
    fn serve_staged(&self, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
        let ri = job.region;
        let r = &self.regions[ri];
        let Some(claim) = self.claim((ri, page), job) else {
            return Ok(());
        };
        let addr = r.host_page(page);
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let mut outage = false;
        let mut times = FetchTimes::default();
        let fetched =
            !r.tracker.arrived(page) && self.fetch(r, page, &mut buf, &mut outage, &mut times)?;
        let unit = r.tracker.unit_of(page);
        let collapsed = r.units[unit as usize].read_unpoisoned();
        if *collapsed {
            // The huge mapping replaced the staging: never touch the freed staging again.
            self.installer.wake(addr, PAGE_SIZE as usize);
            drop(collapsed);
            claim.served(outage);
            return Ok(());
        }
        let staging_guard = r.staging.read_unpoisoned();
        let Some(staging) = staging_guard.as_ref() else {
            self.installer.wake(addr, PAGE_SIZE as usize);
            drop(staging_guard);
            drop(collapsed);
            claim.served(outage);
            return Ok(());
        };
        let final_alias = r.alias_page(page).ok_or(PostcopyError::NoAlias {
            slot: r.region.slot,
        })?;
        let stored_at = {
            let _g = r.tracker.lock_page(page);
            let mut local = true;
            if fetched && !r.tracker.arrived(page) {
                self.arrivals.store_locked(ri, page, &buf)?;
                local = false;
            }
            if !r.tracker.arrived(page) {
                return Ok(()); // stopping: the fetch gave up
            }
            if !r.tracker.staged(page) {
                // SAFETY: the final alias covers the region and stays mapped for the engine's
                // lifetime; the page arrived (its final copy is complete, under the page lock,
                // which every writer of the final page holds), so it does not change while read.
                let arrived = unsafe {
                    std::slice::from_raw_parts(final_alias as *const u8, PAGE_SIZE as usize)
                };
                // The staging page is not mapped for the guest yet (not staged): nothing else
                // writes it.
                staging.write(page * PAGE_SIZE, arrived).map_err(|source| {
                    PostcopyError::Staging {
                        slot: r.region.slot,
                        what: "writing a page into the staging",
                        source,
                    }
                })?;
                r.tracker.mark_staged(page);
                self.stats.staging_add(1);
            }
            if local {
                self.stats
                    .pages_served_locally
                    .fetch_add(1, Ordering::Relaxed);
            }
            (!local).then(Instant::now)
        };
        // Guest writes after this CONTINUE are tracked: prepare() turned dirty logging on for
        // every region that collapses (never from here: see prepare()).
        self.installer.map_page(r, page)?;
        if let (Some(stored_at), false) = (stored_at, outage) {
            self.record_phases(job, started, &times, stored_at);
        }
        drop(staging_guard);
        drop(collapsed);
        claim.served(outage);
        Ok(())
    }

    /// Whole-huge-page baseline: fetch every missing 4 KiB of the huge page, then map it all.
    fn serve_huge(&self, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
        let ri = job.region;
        let r = &self.regions[ri];
        let ppu = r.tracker.pages_per_unit();
        let hidx = page / ppu;
        let Some(claim) = self.claim((ri, hidx | HUGE_KEY), job) else {
            return Ok(()); // the first fault on this huge page maps it for every waiter
        };
        let (first, end) = r.tracker.unit_pages(hidx);
        let missing = r.tracker.missing_in(first, end);
        let outage = std::sync::atomic::AtomicBool::new(false);
        if missing.is_empty() {
            self.stats
                .pages_served_locally
                .fetch_add(1, Ordering::Relaxed);
        } else {
            let chunk = missing.len().div_ceil(HUGE_FETCH_THREADS);
            let results: Vec<Result<(), PostcopyError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = missing
                    .chunks(chunk)
                    .map(|pages| {
                        let outage = &outage;
                        scope.spawn(move || -> Result<(), PostcopyError> {
                            let mut buf = [0u8; 4096];
                            let mut waited = false;
                            let mut times = FetchTimes::default();
                            for &p in pages {
                                let got = self.fetch(r, p, &mut buf, &mut waited, &mut times)?;
                                if waited {
                                    outage.store(true, Ordering::Relaxed);
                                }
                                if got {
                                    let _g = r.tracker.lock_page(p);
                                    self.arrivals.store_locked(ri, p, &buf)?;
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(PostcopyError::Panicked {
                                what: "huge-page fetch",
                            })
                        })
                    })
                    .collect()
            });
            for res in results {
                res?;
            }
        }
        if !r.tracker.unit_complete(hidx) {
            // Only possible when stopping (fetch gave up): leave the vCPU waiting.
            return Ok(());
        }
        self.installer.map_huge(r, first)?;
        claim.served(outage.load(Ordering::Relaxed));
        Ok(())
    }
}
