//! The userfaultfd fault service: one thread reads fault events (poll on the O_NONBLOCK uffd),
//! a small pool serves them (fetch over the urgent channel, write the page, CONTINUE / COPY,
//! wake). It keeps serving while a collapse has the vCPUs paused.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use userfaultfd::{Event, EventBuffer};

use super::engine::Shared;
use super::strategy::ServeMode;
use super::sys;
use super::PostcopyError;
use crate::thread_priority::{self, ThreadRole};
use crate::types::{FetchError, PAGE_SIZE};

/// Marks whole-huge-page keys in the in-flight set.
const HUGE_KEY: u64 = 1 << 63;
/// Threads that fetch the pages of one huge page in parallel (whole-page mode).
const HUGE_FETCH_THREADS: usize = 8;

/// One fault to serve.
struct FaultJob {
    region: usize,
    addr: usize,
    read_at: Instant,
    /// The faulting vCPU (None: another thread, or no thread ids).
    vcpu: Option<usize>,
}

/// Start the reader thread and `workers` serving threads.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    workers: usize,
) -> Result<Vec<JoinHandle<()>>, PostcopyError> {
    let (tx, rx) = mpsc::channel::<FaultJob>();
    let rx = Arc::new(Mutex::new(rx));
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let s = Arc::clone(shared);
        let rx = Arc::clone(&rx);
        threads.push(
            std::thread::Builder::new()
                .name(format!("postcopy-fault-{i}"))
                .spawn(move || {
                    crate::thread_hook::started(crate::thread_hook::ThreadKind::FaultService);
                    worker(s, rx)
                })
                .map_err(|source| PostcopyError::Spawn {
                    what: "fault worker",
                    source,
                })?,
        );
    }
    let s = Arc::clone(shared);
    threads.push(
        std::thread::Builder::new()
            .name("postcopy-uffd-reader".into())
            .spawn(move || {
                crate::thread_hook::started(crate::thread_hook::ThreadKind::FaultService);
                reader(s, tx)
            })
            .map_err(|source| PostcopyError::Spawn {
                what: "uffd reader",
                source,
            })?,
    );
    Ok(threads)
}

fn reader(shared: Arc<Shared>, tx: mpsc::Sender<FaultJob>) {
    let _priority = thread_priority::enter(ThreadRole::Urgent);
    let mut buf = EventBuffer::new(64);
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&shared.uffd),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(50u8)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                shared.fail(PostcopyError::FaultService {
                    what: "poll on the userfaultfd",
                    source: e.into(),
                });
                return;
            }
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
        {
            shared.fail(PostcopyError::UffdHangup);
            return;
        }
        let events = match shared.uffd.read_events(&mut buf) {
            Ok(ev) => ev,
            Err(e) => {
                shared.fail(PostcopyError::Uffd(e));
                return;
            }
        };
        let read_at = Instant::now();
        for ev in events {
            match ev {
                Ok(Event::Pagefault {
                    addr, thread_id, ..
                }) => {
                    let addr = addr as usize;
                    match shared.locate_host(addr) {
                        Some(region) => {
                            shared.faults_pending.fetch_add(1, Ordering::AcqRel);
                            // UFFD_FEATURE_THREAD_ID: the faulting thread; a vCPU's blocks.
                            let vcpu = shared.stats.live.fault_read(thread_id.as_raw(), read_at);
                            if tx
                                .send(FaultJob {
                                    region,
                                    addr,
                                    read_at,
                                    vcpu,
                                })
                                .is_err()
                            {
                                return;
                            }
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
}

fn worker(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::Receiver<FaultJob>>>) {
    let _priority = thread_priority::enter(ThreadRole::Urgent);
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        shared.stats.faults_served.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = serve(&shared, &job) {
            shared.fail(e);
        }
        let left = shared.faults_pending.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && shared.all_arrived() {
            shared.notify_progress();
        }
    }
}

/// A fault being served: the first fault on its key. Later faults on the same key join it;
/// [`Inflight::served`] records the latency of all of them. Dropped without `served` (an error,
/// shutdown), it only removes the key.
struct Inflight<'a> {
    shared: &'a Shared,
    key: (usize, u64),
    read_at: Instant,
    vcpu: Option<usize>,
    done: bool,
}

impl Inflight<'_> {
    /// The fault is resolved (CONTINUE / COPY / wake done): record its latency and that of the
    /// faults that joined it; `outage`: its fetch waited for a link that was down.
    fn served(mut self, outage: bool) {
        let now = Instant::now();
        let joined = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key)
            .unwrap_or_default();
        let stats = &self.shared.stats;
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
            self.shared
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.key);
        }
    }
}

/// Claim `key` for the fault read at `read_at`; None if a fault on it is being served already
/// (this one then joins it and is resolved by its wake).
fn claim<'a>(shared: &'a Shared, key: (usize, u64), job: &FaultJob) -> Option<Inflight<'a>> {
    let (read_at, vcpu) = (job.read_at, job.vcpu);
    let mut map = shared.inflight.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(joined) = map.get_mut(&key) {
        joined.push((read_at, vcpu));
        drop(map);
        shared
            .stats
            .faults_coalesced
            .fetch_add(1, Ordering::Relaxed);
        return None;
    }
    map.insert(key, Vec::new());
    Some(Inflight {
        shared,
        key,
        read_at,
        vcpu,
        done: false,
    })
}

/// Fetch `gpa` from the source, retrying while the link is slow or down (a faulting vCPU waits:
/// across a postcopy-paused outage, until the source is back); returns None if the page arrived
/// meanwhile by another path or the engine shuts down. Sets `outage` if an attempt failed.
fn fetch(
    shared: &Shared,
    region: usize,
    page: u64,
    buf: &mut [u8; 4096],
    outage: &mut bool,
) -> Result<Option<()>, PostcopyError> {
    let r = &shared.regions[region];
    let gpa = r.region.gpa + page * PAGE_SIZE;
    let mut backoff = Duration::from_millis(1);
    let mut warned = false;
    loop {
        if r.tracker.arrived(page) || shared.shutdown.load(Ordering::Acquire) {
            return Ok(None);
        }
        match shared.fetcher.fetch(gpa, buf) {
            Ok(()) => {
                shared.stats.pages_fetched.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(()));
            }
            Err(source @ FetchError::BadAddress { .. }) => {
                return Err(PostcopyError::Fetch { gpa, source })
            }
            Err(e) => {
                *outage = true;
                // The page may still arrive by another path (the bulk stream, a reconnect):
                // wait for progress rather than hammer a channel that is down, and serve the
                // fault locally as soon as the page is there.
                shared.stats.fetch_retries.fetch_add(1, Ordering::Relaxed);
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
                    || !shared.fetcher.wait_connected(Duration::from_millis(100))
                {
                    shared.wait_progress(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
            }
        }
    }
}

fn serve(shared: &Shared, job: &FaultJob) -> Result<(), PostcopyError> {
    let r = &shared.regions[job.region];
    let page = ((job.addr - r.region.host_addr) as u64) / PAGE_SIZE;
    match r.plan.mode {
        ServeMode::AnonCopy
        | ServeMode::ShmemContinue
        | ServeMode::NativeHugetlb
        | ServeMode::NativeGuestMemfd => serve_4k_direct(shared, job, page),
        ServeMode::Staged(_) => serve_staged(shared, job, page),
        ServeMode::HugeWhole => serve_huge(shared, job, page),
    }
}

/// anon (UFFDIO_COPY), shmem and the native modes (alias write + CONTINUE of exactly 4 KiB):
/// the final place is the faulting one.
fn serve_4k_direct(shared: &Shared, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
    let r = &shared.regions[job.region];
    let Some(claim) = claim(shared, (job.region, page), job) else {
        return Ok(()); // the first fault on this page wakes every waiter
    };
    let mut buf = [0u8; 4096];
    let mut copied = false;
    let mut outage = false;
    if !r.tracker.arrived(page) && fetch(shared, job.region, page, &mut buf, &mut outage)?.is_some()
    {
        let _g = r.tracker.lock_page(page);
        copied = shared.store_final_locked(job.region, page, &buf)?;
    } else {
        shared
            .stats
            .pages_served_locally
            .fetch_add(1, Ordering::Relaxed);
    }
    if !r.tracker.arrived(page) {
        return Ok(()); // shutting down: the fetch gave up
    }
    let addr = r.host_page(page);
    match r.plan.mode {
        // Our UFFDIO_COPY woke the waiter. Otherwise the page is in place (bulk's copy) or
        // arrived in a zero run and was never mapped: map the zero page or wake.
        ServeMode::AnonCopy if copied => {}
        ServeMode::AnonCopy => shared.anon_zero_or_wake(job.region, addr)?,
        ServeMode::NativeHugetlb | ServeMode::NativeGuestMemfd => {
            shared.continue_native(job.region, addr)?
        }
        _ => shared.continue_or_zero(job.region, addr)?,
    }
    claim.served(outage);
    Ok(())
}

/// Staged huge / guest_memfd regions: fetched pages go to the final backing and the staging;
/// pages that arrived in bulk are copied locally from the final backing into the staging.
fn serve_staged(shared: &Shared, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
    let ri = job.region;
    let r = &shared.regions[ri];
    let Some(claim) = claim(shared, (ri, page), job) else {
        return Ok(());
    };
    let addr = r.host_page(page);
    let mut buf = [0u8; 4096];
    let mut outage = false;
    let fetched = if r.tracker.arrived(page) {
        false
    } else {
        fetch(shared, ri, page, &mut buf, &mut outage)?.is_some()
    };
    let unit = r.tracker.unit_of(page);
    let collapsed = r.units[unit as usize]
        .read()
        .unwrap_or_else(|p| p.into_inner());
    if *collapsed {
        // The huge mapping replaced the staging: never touch the freed staging again.
        let _ = shared
            .uffd
            .wake(addr as *mut libc::c_void, PAGE_SIZE as usize);
        drop(collapsed);
        claim.served(outage);
        return Ok(());
    }
    let staging = r.staging.read().unwrap_or_else(|p| p.into_inner());
    let Some(staging) = staging.as_ref() else {
        let _ = shared
            .uffd
            .wake(addr as *mut libc::c_void, PAGE_SIZE as usize);
        drop(staging);
        drop(collapsed);
        claim.served(outage);
        return Ok(());
    };
    let final_alias = r.alias_page(page).ok_or(PostcopyError::NotPrepared)?;
    let stage_alias = staging.alias_at(page * PAGE_SIZE);
    {
        let _g = r.tracker.lock_page(page);
        let mut local = true;
        if fetched && !r.tracker.arrived(page) {
            shared.store_final_locked(ri, page, &buf)?;
            local = false;
        }
        if !r.tracker.arrived(page) {
            return Ok(()); // shutting down: the fetch gave up
        }
        if !r.tracker.staged(page) {
            // SAFETY: both aliases cover the region; the page arrived (its final copy is
            // complete, under the page lock); the staging page is not mapped for the guest yet
            // (not staged), so nothing else writes it.
            unsafe { sys::copy_page(final_alias, stage_alias) };
            r.tracker.mark_staged(page);
            shared.stats.staging_add(1);
        }
        if local {
            shared
                .stats
                .pages_served_locally
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    // Guest writes after this CONTINUE are tracked: prepare() turned dirty logging on for
    // every region that collapses (never from here: see prepare()).
    shared.continue_or_wake(r.region.slot, addr, PAGE_SIZE as usize)?;
    drop(collapsed);
    claim.served(outage);
    Ok(())
}

/// Whole-huge-page baseline: fetch every missing 4 KiB of the huge page, then CONTINUE it all.
fn serve_huge(shared: &Shared, job: &FaultJob, page: u64) -> Result<(), PostcopyError> {
    let ri = job.region;
    let r = &shared.regions[ri];
    let ppu = r.tracker.pages_per_unit();
    let hidx = page / ppu;
    let Some(claim) = claim(shared, (ri, hidx | HUGE_KEY), job) else {
        return Ok(()); // the first fault on this huge page continues it for every waiter
    };
    let (first, end) = r.tracker.unit_pages(hidx);
    let missing = r.tracker.missing_in(first, end);
    let outage = std::sync::atomic::AtomicBool::new(false);
    if missing.is_empty() {
        shared
            .stats
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
                        for &p in pages {
                            let got = fetch(shared, ri, p, &mut buf, &mut waited)?;
                            if waited {
                                outage.store(true, Ordering::Relaxed);
                            }
                            if got.is_some() {
                                let _g = r.tracker.lock_page(p);
                                shared.store_final_locked(ri, p, &buf)?;
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
        // Only possible on shutdown (fetch gave up): leave the vCPU waiting.
        return Ok(());
    }
    let huge = r.region.page_size as usize;
    let addr = r.region.host_addr + hidx as usize * huge;
    // A huge page whose every 4 KiB arrived in zero runs was never written, so it is not in the
    // hugetlb page cache and CONTINUE would fail (EFAULT): fault it in (zero-filled) through the
    // alias first. A page that is there already is only looked up.
    if let Some(alias) = r.alias_page(first) {
        sys::madvise(alias, huge, libc::MADV_POPULATE_READ).map_err(|source| {
            PostcopyError::Populate {
                slot: r.region.slot,
                addr: alias,
                len: huge,
                source,
            }
        })?;
    }
    shared.continue_or_wake(r.region.slot, addr, huge)?;
    claim.served(outage.load(Ordering::Relaxed));
    Ok(())
}
