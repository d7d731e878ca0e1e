//! The collapse engine: once every 4 KiB of a unit arrived, give the guest its final mapping back.
//!
//! Staged units (hugetlb, guest_memfd): copy the pages the guest dirtied in the staging into the
//! final backing, repeat while the delta shrinks, then swap by a freeze ([`freeze_and_swap`]):
//! no vCPU is paused. The unit is frozen (its lock taken and its staging PTEs dropped, so a guest
//! access faults and waits), the last delta copied, the final backing (the huge page, or the
//! guest_memfd's range) mmap(MAP_FIXED) over the unit and the range woken. Only a vCPU that
//! touches the unit during the freeze waits. The memslot never changes: KVM learns of the new
//! pages through its MMU notifier, when the old PTEs go.
//!
//! When a unit collapses is the plan's decision
//! ([`super::strategy::RegionPlan::collapse_after_last_page`]): as soon as it is complete (huge
//! pages back early), or only once every page arrived (guest_memfd: nothing to gain early, and
//! a freeze beside in-flight faults costs them time).
//!
//! The staging is freed off the critical path. shmem units: MADV_COLLAPSE, adjacent complete
//! units in one call (each call drains every CPU's LRU lists first, which on busy cores was
//! most of the time).
//! Runs on its own thread, never on a fault-service thread; every unit reaches it as a
//! [`UnitDone`] message (native units too: see `native`). The [`Collapser`] holds only the
//! hooks a collapse uses: the dirty log.

use crate::sync::{MutexExt, RwLockExt};
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::{RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use super::installer::Installer;
use super::native;
use super::region::{Region, Regions, UnitDone};
use super::stats::{CollapseRecord, StatsCollector, METHOD_SKIPPED_EMPTY};
use super::strategy::{FinalBacking, ServeMode};
use super::supervisor::Supervisor;
use super::sys;
use super::PostcopyError;
use crate::types::{runs_where, DirtyLog, PAGE_SIZE};

/// A unit whose pages all arrived (the collapse thread's message).
pub type CollapseJob = UnitDone;

/// What the collapse thread works with.
pub(crate) struct Collapser {
    pub regions: Arc<Regions>,
    pub installer: Arc<dyn Installer>,
    pub dirty: Arc<dyn DirtyLog>,
    pub stats: Arc<StatsCollector>,
    pub sup: Arc<Supervisor>,
}

impl Collapser {
    /// Enable dirty logging of region `ri` once, before its first staging page is CONTINUEd.
    pub fn ensure_dirty_enabled(&self, ri: usize) -> Result<(), PostcopyError> {
        let r = &self.regions[ri];
        let mut on = r.dirty_enabled.lock_unpoisoned();
        if !*on {
            self.dirty
                .enable(r.region.slot)
                .map_err(PostcopyError::dirty_log(r.region.slot, "enable"))?;
            *on = true;
        }
        Ok(())
    }
}

/// Stop the delta rounds when a round copies at most this many pages.
const SMALL_DELTA: u64 = 8;
/// Upper bound on delta rounds before the freeze.
const MAX_ROUNDS: u32 = 10;
/// Units above this size get their staging PTEs dropped before the freeze.
const DONTNEED_ABOVE: u64 = 2 << 20;

/// The collapse thread's loop. Jobs that queued up meanwhile are taken together: shmem units
/// are collapsed in runs of adjacent units (see [`collapse_shmem_batch`]). Units whose plan
/// says [`super::strategy::RegionPlan::collapse_after_last_page`] wait in `deferred` until
/// every page arrived.
pub(crate) fn run(shared: &Collapser, rx: mpsc::Receiver<CollapseJob>) {
    // Background work: under a CPU placement, beside the bulk receive, off the vCPUs' CPUs.
    let _bulk = crate::thread_priority::enter(crate::thread_priority::ThreadRole::Bulk);
    let mut deferred: Vec<CollapseJob> = Vec::new();
    loop {
        let first = if deferred.is_empty() {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            }
        } else {
            // The last page's unit may be queued after the last arrival is counted: look again.
            match rx.recv_timeout(DEFERRED_POLL) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut jobs: Vec<CollapseJob> = first.into_iter().chain(rx.try_iter()).collect();
        // Native units have nothing to copy: settle them at once.
        jobs.retain(|j| {
            let native = shared.regions[j.region].mode().is_native();
            if native {
                native::settle_unit(&shared.regions[j.region], &shared.stats, j.unit);
                shared.sup.notify_progress();
            }
            !native
        });
        let (later, now): (Vec<_>, Vec<_>) = jobs
            .into_iter()
            .partition(|j| shared.regions[j.region].plan.collapse_after_last_page);
        deferred.extend(later);
        let mut jobs = now;
        if !deferred.is_empty()
            && (shared.regions.all_arrived() || shared.stats.staging_pages() > STAGING_BUDGET_PAGES)
        {
            jobs.append(&mut deferred);
        }
        if jobs.is_empty() {
            continue;
        }
        if shared.sup.stopping() {
            return;
        }
        let (shmem, others): (Vec<_>, Vec<_>) = jobs
            .into_iter()
            .partition(|j| matches!(shared.regions[j.region].plan.mode, ServeMode::ShmemContinue));
        if !shmem.is_empty() {
            if let Err(e) = collapse_shmem_batch(shared, shmem) {
                shared.sup.fail(e);
            }
            shared.sup.notify_progress();
        }
        for job in others {
            if shared.sup.stopping() {
                return;
            }
            let res = match shared.regions[job.region].mode() {
                ServeMode::Staged(backing) => collapse_staged(shared, job, backing),
                _ => Ok(()),
            };
            if let Err(e) = res {
                shared.sup.fail(e);
            }
            shared.sup.notify_progress();
        }
    }
}

/// Deferred units wait for the last page only while the staging holds at most this much
/// (64 MiB): beyond it they collapse at once, which frees their staging. A deferred hugetlb or
/// guest_memfd unit keeps every page staged that the guest touched; shmem stages nothing.
pub(crate) const STAGING_BUDGET_PAGES: u64 = (64 << 20) / PAGE_SIZE;

/// How often the collapse thread looks whether every page arrived while it holds deferred units.
const DEFERRED_POLL: Duration = Duration::from_millis(10);

/// Most shmem units one `MADV_COLLAPSE` call covers.
const SHMEM_RUN_MAX: u64 = 64;

/// Collapse complete shmem units, adjacent ones together.
///
/// Every `MADV_COLLAPSE` call begins with `lru_add_drain_all()`, which queues work on every CPU
/// and waits for all of it; with the vCPUs keeping both cores busy that wait, not the collapse,
/// was most of a unit's time (tens to thousands of ms). One call over a run of adjacent units
/// drains once for the whole run (the kernel collapses each 2 MiB range of it in turn).
///
/// Each unit gets a [`CollapseRecord`]; a batched unit's `total_ns` is its share (time / units)
/// of the calls that covered it.
fn collapse_shmem_batch(
    shared: &Collapser,
    mut jobs: Vec<CollapseJob>,
) -> Result<(), PostcopyError> {
    jobs.sort_by_key(|j| (j.region, j.unit));
    jobs.dedup_by_key(|j| (j.region, j.unit));
    let mut run: Vec<CollapseJob> = Vec::new();
    for job in jobs {
        if shmem_unit_empty(shared, job) {
            finish_shmem_unit(shared, job, 0, METHOD_SKIPPED_EMPTY, true);
            continue;
        }
        if !shmem_unit_collapsible(shared, job) {
            finish_shmem_unit(shared, job, 0, "madv-collapse", false);
            continue;
        }
        let adjacent = run
            .last()
            .is_some_and(|l| l.region == job.region && l.unit + 1 == job.unit);
        if !adjacent || run.len() as u64 >= SHMEM_RUN_MAX {
            collapse_shmem_run(shared, &run)?;
            run.clear();
        }
        run.push(job);
    }
    collapse_shmem_run(shared, &run)
}

/// Whether a complete unit is all page-cache holes: it arrived entirely in zero runs and was
/// never touched, so there is nothing to collapse (and filling 2 MiB of zeros only to collapse
/// them costs memory and CPU while the migration runs); guest touches map zero pages later.
fn shmem_unit_empty(shared: &Collapser, job: CollapseJob) -> bool {
    let r = &shared.regions[job.region];
    let (first, end) = r.tracker.unit_pages(job.unit);
    let len = ((end - first) * PAGE_SIZE) as usize;
    r.alias_page(first)
        .is_some_and(|a| sys::resident_pages(a, len).is_ok_and(|n| n == 0))
}

/// Only whole, aligned 2 MiB ranges can become a PMD.
fn shmem_unit_collapsible(shared: &Collapser, job: CollapseJob) -> bool {
    let r = &shared.regions[job.region];
    let (first, end) = r.tracker.unit_pages(job.unit);
    let len = (end - first) * PAGE_SIZE;
    len == super::strategy::SHMEM_COLLAPSE_UNIT
        && r.host_page(first).is_multiple_of(len as usize)
        && r.alias_page(first).is_some()
}

/// Collapse `run` (adjacent, complete, collapsible units of one region, in order): fill its
/// page-cache holes, then one `MADV_COLLAPSE` over all of it; if that fails, split it in halves
/// and try each (so one unit the kernel refuses costs a few calls, not one per unit).
fn collapse_shmem_run(shared: &Collapser, run: &[CollapseJob]) -> Result<(), PostcopyError> {
    let (Some(head), Some(tail)) = (run.first(), run.last()) else {
        return Ok(());
    };
    let r = &shared.regions[head.region];
    let (first, _) = r.tracker.unit_pages(head.unit);
    let (_, end) = r.tracker.unit_pages(tail.unit);
    let t0 = Instant::now();
    fill_holes(r, first * PAGE_SIZE, (end - first) * PAGE_SIZE);
    let fill = t0.elapsed();
    let fill_ns = ns(fill) / run.len() as u64;
    let mut spent = vec![fill_ns; run.len()];
    let mut ok = vec![false; run.len()];
    let t1 = Instant::now();
    collapse_split(shared, run, 0, &mut spent, &mut ok);
    tracing::debug!(
        slot = r.region.slot,
        first_unit = head.unit,
        units = run.len(),
        fill_ns = ns(fill),
        collapse_ns = ns(t1.elapsed()),
        failed = ok.iter().filter(|o| !**o).count(),
        "collapsed a run of shmem units"
    );
    for (i, job) in run.iter().enumerate() {
        finish_shmem_unit(shared, *job, spent[i], "madv-collapse", ok[i]);
    }
    Ok(())
}

/// `MADV_COLLAPSE` of `run[..]` (whose first unit is `run[0]`, at index `base` of the
/// bookkeeping slices); on failure, halves.
fn collapse_split(
    shared: &Collapser,
    run: &[CollapseJob],
    base: usize,
    spent: &mut [u64],
    ok: &mut [bool],
) {
    let (Some(head), Some(tail)) = (run.first(), run.last()) else {
        return;
    };
    let r = &shared.regions[head.region];
    let (first, _) = r.tracker.unit_pages(head.unit);
    let (_, end) = r.tracker.unit_pages(tail.unit);
    let addr = r.host_page(first);
    let len = ((end - first) * PAGE_SIZE) as usize;
    let t = Instant::now();
    // Faults served in these units meanwhile are timed as their collapse stall.
    r.set_collapsing(Some((head.unit, tail.unit + 1)));
    // SAFETY: a run of complete units of a shmem region the engine serves; MADV_COLLAPSE does
    // not change contents.
    let mut rc = unsafe { sys::madvise(addr, len, libc::MADV_COLLAPSE) };
    // EAGAIN is transient (a page locked or under writeback, a busy LRU): a single unit gets
    // a few more tries before it is left 4 KiB-mapped.
    let mut tries = 0;
    while run.len() == 1
        && tries < 3
        && rc
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EAGAIN))
    {
        tries += 1;
        std::thread::sleep(Duration::from_millis(1));
        // SAFETY: as above.
        rc = unsafe { sys::madvise(addr, len, libc::MADV_COLLAPSE) };
    }
    r.set_collapsing(None);
    let share = ns(t.elapsed()) / run.len() as u64;
    for s in &mut spent[base..base + run.len()] {
        *s += share;
    }
    match rc {
        Ok(()) => ok[base..base + run.len()].fill(true),
        Err(e) if run.len() == 1 => {
            tracing::debug!(
                "MADV_COLLAPSE of slot {} at {addr:#x} failed: {e}",
                r.region.slot
            );
        }
        Err(_) => {
            let half = run.len() / 2;
            collapse_split(shared, &run[..half], base, spent, ok);
            collapse_split(shared, &run[half..], base + half, spent, ok);
        }
    }
}

/// Pages that arrived in zero runs were never written, so they are page-cache holes (which
/// MADV_COLLAPSE refuses). Find them (`mincore` on the alias: page-cache residency, no fault)
/// and allocate each run of holes, zero-filled, with `fallocate` on the memfd: no page fault,
/// no page-table entry on the alias that the collapse would then have to unmap, no mmap lock.
/// Most units have no hole at all (the guest wrote every page, or none: those are skipped as
/// empty), so the common case costs one `mincore`. Without an fd, holes are faulted in through
/// the alias. A failure is only logged: the collapse then fails too and the unit stays
/// 4 KiB-mapped.
fn fill_holes(r: &Region, off: u64, len: u64) {
    let Some(alias) = r.alias_page(off / PAGE_SIZE) else {
        return;
    };
    let resident = match sys::page_cache_map(alias, len as usize) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(
                "mincore of slot {} at {alias:#x} failed: {e}",
                r.region.slot
            );
            vec![false; (len / PAGE_SIZE) as usize]
        }
    };
    for (start, end) in runs_where(0, resident.len() as u64, |i| !resident[i as usize]) {
        let (h_off, h_len) = (off + start * PAGE_SIZE, (end - start) * PAGE_SIZE);
        let res = match r.region.fd {
            Some(fd) => sys::fill_holes(fd, r.region.fd_offset + h_off, h_len),
            // SAFETY: the region's alias, which nothing is registered on; POPULATE_WRITE only
            // allocates the holes (zero-filled), which arrived as zero pages.
            None => unsafe {
                sys::madvise(
                    alias + (start * PAGE_SIZE) as usize,
                    h_len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            },
        };
        if let Err(e) = res {
            tracing::debug!(
                "filling the page-cache holes of slot {} at offset {h_off:#x} (+{h_len:#x}) failed: {e}",
                r.region.slot
            );
        }
    }
}

/// Record a shmem unit's outcome and count it done.
fn finish_shmem_unit(
    shared: &Collapser,
    job: CollapseJob,
    total_ns: u64,
    method: &'static str,
    ok: bool,
) {
    let r = &shared.regions[job.region];
    let (first, end) = r.tracker.unit_pages(job.unit);
    let mut record = CollapseRecord::without_swap(
        r.region.slot,
        first * PAGE_SIZE,
        (end - first) * PAGE_SIZE,
        method,
        total_ns,
        ok,
    );
    record.stall_ns = r.take_collapse_wait(job.unit);
    shared.stats.collapse(record);
    r.unit_settled();
}

/// Pull the memslot's dirty log into the region's accumulated bitmap, then take (and clear) the
/// bits of pages `[first, end)`.
fn take_unit_dirty(
    shared: &Collapser,
    r: &Region,
    first: u64,
    end: u64,
) -> Result<Vec<u64>, PostcopyError> {
    if !*r.dirty_enabled.lock_unpoisoned() {
        return Ok(Vec::new());
    }
    let fresh = shared
        .dirty
        .fetch(r.region.slot)
        .map_err(PostcopyError::dirty_log(r.region.slot, "fetch"))?;
    let mut acc = r.dirty_acc.lock_unpoisoned();
    for (a, f) in acc.iter_mut().zip(fresh.iter()) {
        *a |= *f;
    }
    // Word by word: a unit's log is mostly zero words, and this runs inside the freeze.
    let mut pages = Vec::new();
    let mut p = first;
    while p < end {
        let (w, b) = ((p / 64) as usize, p % 64);
        let in_word = (64 - b).min(end - p);
        let mask = if in_word == 64 {
            u64::MAX
        } else {
            ((1u64 << in_word) - 1) << b
        };
        let mut bits = acc[w] & mask;
        acc[w] &= !mask;
        while bits != 0 {
            pages.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
        p += in_word;
    }
    Ok(pages)
}

/// Copy dirtied staging pages into the final backing; returns how many were copied. Pages that
/// never went through the staging are skipped (a dirty log may over-report, and such a page's
/// staging is a hole).
fn copy_delta(r: &Region, stage_alias: usize, pages: &[u64]) -> u64 {
    let Some(final_alias) = r.region.alias_addr else {
        return 0;
    };
    let mut n = 0;
    for &p in pages {
        if r.tracker.staged(p) {
            let off = (p * PAGE_SIZE) as usize;
            // SAFETY: both aliases cover the region; the page is staged, so its staging page is
            // populated; only the guest writes it (tracked by the dirty log).
            unsafe { sys::copy_page(stage_alias + off, final_alias + off) };
            n += 1;
        }
    }
    n
}

fn collapse_staged(
    shared: &Collapser,
    job: CollapseJob,
    backing: FinalBacking,
) -> Result<(), PostcopyError> {
    let r = &shared.regions[job.region];
    let slot = r.region.slot;
    let (first, end) = r.tracker.unit_pages(job.unit);
    let off = first * PAGE_SIZE;
    let len = (end - first) * PAGE_SIZE;
    let addr = r.region.host_addr + off as usize;
    let fd = r.region.fd.ok_or(PostcopyError::NoFinalFd { slot })?;
    let err = |what| collapse_error(slot, off, what);
    let stage_alias = {
        let st = r.staging.read_unpoisoned();
        match st.as_ref() {
            Some(s) => s.alias_at(0),
            None => return Ok(()),
        }
    };
    let t0 = Instant::now();
    let mut delta_pages = Vec::new();
    let mut stall_ns = 0;
    let (mut zap_ns, mut final_delta_ns, mut swap_ns, mut dontneed_ns) = (0, 0, 0, 0);

    // A unit the guest never touched has nothing in the staging: swap without a freeze (the
    // unit lock keeps faults out; a waiter is woken into the final mapping).
    let untouched = r.tracker.staged_in(first, end) == 0;
    if untouched {
        let mut collapsed = r.units[job.unit as usize].write_unpoisoned();
        if r.tracker.staged_in(first, end) == 0 {
            // SAFETY: the unit's range is the engine's; under the unit lock no fault is served
            // in it, and the guest never touched it (no staging page), so the final backing,
            // which holds every page that arrived, replaces nothing anyone sees.
            unsafe { sys::map_shared_fixed(addr, len as usize, fd, r.region.fd_offset + off) }
                .map_err(err(backing.remap_step()))?;
            *collapsed = true;
        }
        drop(collapsed);
    }
    if !*r.units[job.unit as usize].read_unpoisoned() {
        // Delta rounds while the guest runs.
        let mut prev = u64::MAX;
        loop {
            let dirty = take_unit_dirty(shared, r, first, end)?;
            let n = copy_delta(r, stage_alias, &dirty);
            delta_pages.push(n);
            if n <= SMALL_DELTA || n >= prev || delta_pages.len() as u32 >= MAX_ROUNDS {
                break;
            }
            prev = n;
        }
        if len > DONTNEED_ABOVE {
            // Shared memory keeps the data; the guest refaults what it touches (MINOR, local).
            let t = Instant::now();
            // SAFETY: the staging range is shared memory: dropping its PTEs keeps the data.
            unsafe { sys::madvise(addr, len as usize, libc::MADV_DONTNEED) }
                .map_err(err("MADV_DONTNEED of the staging range"))?;
            dontneed_ns = t.elapsed().as_nanos() as u64;
        }
        let u = UnitRange {
            stage_alias,
            addr,
            len: len as usize,
            fd,
            off,
            first,
            end,
        };
        let t = freeze_and_swap(shared, r, job.unit, &u, backing)?;
        delta_pages.push(t.final_delta);
        final_delta_ns = t.final_delta_ns;
        swap_ns = t.swap_ns;
        stall_ns = t.stall_ns;
        zap_ns = t.zap_ns;
    } else {
        shared.installer.wake(addr, len as usize);
    }
    let total_ns = t0.elapsed().as_nanos() as u64;
    // Stable now: the unit is collapsed, nothing stages into it any more.
    let staged_pages = r.tracker.staged_in(first, end);

    // Off the critical path: free the unit's staging.
    let t_free = Instant::now();
    if let Some(st) = r.staging.read_unpoisoned().as_ref() {
        st.free_range(off, len)
            .map_err(err("punching the staging hole"))?;
    }
    shared.stats.staging_sub(staged_pages);
    shared.stats.collapse(CollapseRecord {
        slot,
        unit_offset: off,
        unit_size: len,
        method: backing.collapse_method(),
        total_ns,
        stall_ns,
        delta_rounds: delta_pages.len() as u32,
        delta_pages: delta_pages.clone(),
        staged_pages,
        zap_ns,
        final_delta_ns,
        swap_ns,
        dontneed_ns,
        free_ns: t_free.elapsed().as_nanos() as u64,
        ok: true,
    });
    tracing::debug!(
        slot,
        offset = off,
        size = len,
        stall_ns,
        zap_ns,
        final_delta_ns,
        swap_ns,
        dontneed_ns,
        total_ns,
        staged_pages,
        ?delta_pages,
        "collapsed"
    );
    if r.units_done.load(std::sync::atomic::Ordering::Acquire) + 1 == r.tracker.units() {
        let mut on = r.dirty_enabled.lock_unpoisoned();
        if *on {
            shared
                .dirty
                .disable(slot)
                .map_err(PostcopyError::dirty_log(slot, "disable"))?;
            *on = false;
        }
        drop(on);
        // Closing the staging memfd and its alias.
        r.staging.write_unpoisoned().take();
    }
    r.unit_settled();
    Ok(())
}

/// What the critical section of a staged collapse did, and how long its parts took.
#[derive(Debug, Default)]
struct SwapTimes {
    /// Pages copied in the last delta.
    final_delta: u64,
    /// Dropping the staging PTEs inside the freeze.
    zap_ns: u64,
    final_delta_ns: u64,
    swap_ns: u64,
    /// The longest a vCPU can have waited for this collapse.
    stall_ns: u64,
}

/// A unit's range, its staging and its final backing's fd, as the swap needs them.
struct UnitRange {
    stage_alias: usize,
    addr: usize,
    len: usize,
    fd: std::os::fd::RawFd,
    off: u64,
    first: u64,
    end: u64,
}

/// Maps an I/O error of step `what` of collapsing the unit at `offset` of `slot`.
fn collapse_error(
    slot: u32,
    offset: u64,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> PostcopyError {
    move |source| PostcopyError::Collapse {
        slot,
        offset,
        what,
        source,
    }
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos() as u64
}

/// Swap a staged unit to its final backing without pausing anyone. Take the unit lock (a worker serving a fault in the
/// unit then waits for it, so its vCPU does), then drop every staging PTE of the unit (and with
/// them KVM's mappings, through its MMU notifier): from here any guest access to the unit is a
/// MINOR userfault whose worker waits on the lock, so the staging cannot change any more and the
/// last dirty log is exact. Copy that delta, map the final backing (the huge page, or the
/// guest_memfd's range) over the range, mark the unit collapsed, unlock, and wake the range. A vCPU waits only if it touches this unit during the
/// freeze, and at most for the freeze; vCPUs elsewhere never stop.
fn freeze_and_swap(
    shared: &Collapser,
    r: &Region,
    unit: u64,
    u: &UnitRange,
    backing: FinalBacking,
) -> Result<SwapTimes, PostcopyError> {
    let slot = r.region.slot;
    let err = |what| collapse_error(slot, u.off, what);
    let mut t = SwapTimes::default();
    // Every vCPU that touches the unit waits for the freeze: do not get preempted inside it.
    let _boost = crate::thread_priority::enter(crate::thread_priority::ThreadRole::Freeze);
    let (mut collapsed, t_freeze) = write_unit_lock(&r.units[unit as usize]);
    let result = (|| -> Result<(), PostcopyError> {
        // SAFETY: the staging range is shared memory: dropping its PTEs keeps the data.
        unsafe { sys::madvise(u.addr, u.len, libc::MADV_DONTNEED) }
            .map_err(err("MADV_DONTNEED of the staging range inside the freeze"))?;
        let t_zapped = Instant::now();
        t.zap_ns = ns(t_zapped - t_freeze);
        let dirty = take_unit_dirty(shared, r, u.first, u.end)?;
        t.final_delta = copy_delta(r, u.stage_alias, &dirty);
        let t_swap = Instant::now();
        t.final_delta_ns = ns(t_swap - t_zapped);
        // SAFETY: the unit is frozen (its lock held, its staging PTEs dropped): no guest access
        // or fault is served in it, and the final backing holds every page plus the last delta.
        unsafe { sys::map_shared_fixed(u.addr, u.len, u.fd, r.region.fd_offset + u.off) }
            .map_err(err(backing.remap_step()))?;
        t.swap_ns = ns(t_swap.elapsed());
        *collapsed = true;
        Ok(())
    })();
    drop(collapsed);
    // Unmapping does not wake a thread already asleep in the old range's userfault wait.
    shared.installer.wake(u.addr, u.len);
    t.stall_ns = ns(t_freeze.elapsed());
    result.map(|()| t)
}

/// How long [`write_unit_lock`] lets fault workers in before it waits like any writer.
const LOCK_POLITE_FOR: Duration = Duration::from_millis(100);

/// Take a unit's lock for writing without holding up the faults being served meanwhile: a
/// writer that waits on the lock blocks every new reader (a worker about to CONTINUE a page of
/// the unit, and so its vCPU) until the current readers are done, and on two busy cores a
/// reader can be preempted for milliseconds. So poll with `try_write` while workers come and
/// go, and block only if that takes unusually long. Returns the guard and when it was taken:
/// the freeze (the stall a vCPU can see) starts there.
fn write_unit_lock(lock: &RwLock<bool>) -> (RwLockWriteGuard<'_, bool>, Instant) {
    let start = Instant::now();
    loop {
        match lock.try_write() {
            Ok(g) => return (g, Instant::now()),
            Err(TryLockError::Poisoned(p)) => return (p.into_inner(), Instant::now()),
            Err(TryLockError::WouldBlock) if start.elapsed() < LOCK_POLITE_FOR => {
                std::thread::sleep(Duration::from_micros(20));
            }
            Err(TryLockError::WouldBlock) => {
                let t = Instant::now();
                return (lock.write_unpoisoned(), t);
            }
        }
    }
}
