//! The collapse engine: once every 4 KiB of a unit arrived, give the guest its huge mapping back.
//!
//! Staged units (hugetlb, guest_memfd): copy the pages the guest dirtied in the staging into the
//! final backing, repeat while the delta shrinks, drop the staging PTEs of big units, then swap:
//! - hugetlb ([`freeze_and_swap`]): no vCPU is paused. The unit is frozen (its lock taken and
//!   its staging PTEs dropped, so a guest access faults and waits), the last delta copied, the
//!   huge page mmap(MAP_FIXED) over the range and the range woken. Only a vCPU that touches the
//!   unit during the freeze waits.
//! - guest_memfd ([`pause_and_swap`]): the memslot itself changes, so every vCPU is paused (the
//!   fault service keeps serving) for the last delta and the memslot swap.
//!
//! The staging is freed off the critical path. shmem units: MADV_COLLAPSE.
//! Runs on its own thread, never on a fault-service thread.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::{RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use super::engine::{RegionState, Shared};
use super::stats::CollapseRecord;
use super::strategy::{FinalBacking, ServeMode};
use super::sys;
use super::PostcopyError;
use crate::types::PAGE_SIZE;

/// One unit whose pages all arrived.
#[derive(Debug, Clone, Copy)]
pub struct CollapseJob {
    pub region: usize,
    pub unit: u64,
}

/// Stop the delta rounds when a round copies at most this many pages.
const SMALL_DELTA: u64 = 8;
/// Upper bound on delta rounds before the pause.
const MAX_ROUNDS: u32 = 10;
/// Units above this size get their staging PTEs dropped before the pause.
const DONTNEED_ABOVE: u64 = 2 << 20;

/// The collapse thread's loop.
pub(crate) fn run(shared: Arc<Shared>, rx: mpsc::Receiver<CollapseJob>) {
    while let Ok(job) = rx.recv() {
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let r = &shared.regions[job.region];
        let res = match r.plan.mode {
            ServeMode::ShmemContinue => collapse_shmem(&shared, job),
            ServeMode::Staged(backing) => collapse_staged(&shared, job, backing),
            _ => Ok(()),
        };
        if let Err(e) = res {
            shared.fail(e.to_string());
        }
        shared.notify_progress();
    }
}

fn collapse_shmem(shared: &Shared, job: CollapseJob) -> Result<(), PostcopyError> {
    let r = &shared.regions[job.region];
    let (first, end) = r.tracker.unit_pages(job.unit);
    let off = first * PAGE_SIZE;
    let len = (end - first) * PAGE_SIZE;
    let addr = r.region.host_addr + off as usize;
    let t0 = Instant::now();
    // Only whole, aligned 2 MiB ranges can become a PMD; all their pages are in the page cache
    // (the unit completed), so the collapse cannot fill a hole with zeros.
    let alias = r.alias_page(first);
    // A range that is all page-cache holes arrived entirely in zero runs and was never touched:
    // there is nothing to collapse (and filling 2 MiB of zeros only to collapse them costs
    // memory and CPU while the migration runs); guest touches map zero pages later.
    let empty = alias.is_some_and(|a| sys::resident_pages(a, len as usize).is_ok_and(|n| n == 0));
    let ok = if empty {
        true
    } else if len == super::strategy::SHMEM_COLLAPSE_UNIT && addr.is_multiple_of(len as usize) {
        // Pages that arrived in zero runs were never written, so they are page-cache holes
        // (which MADV_COLLAPSE refuses); fault them in, zero-filled, through the alias that
        // nothing is registered on. Pages already there are only looked up.
        if let Some(alias) = alias {
            if let Err(e) = sys::madvise(alias, len as usize, libc::MADV_POPULATE_WRITE) {
                tracing::info!(
                    "populating the zero pages of slot {} at alias {alias:#x} failed: {e}",
                    r.region.slot
                );
            }
        }
        match sys::madvise(addr, len as usize, libc::MADV_COLLAPSE) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(
                    "MADV_COLLAPSE of slot {} at {addr:#x} failed: {e}",
                    r.region.slot
                );
                false
            }
        }
    } else {
        false
    };
    shared.stats.collapse(CollapseRecord {
        slot: r.region.slot,
        unit_offset: off,
        unit_size: len,
        method: if empty {
            "none (all zero, never touched)"
        } else {
            "madv-collapse"
        },
        total_ns: t0.elapsed().as_nanos() as u64,
        stall_ns: 0,
        delta_rounds: 0,
        delta_pages: Vec::new(),
        staged_pages: 0,
        pause_ns: 0,
        zap_ns: 0,
        final_delta_ns: 0,
        swap_ns: 0,
        dontneed_ns: 0,
        free_ns: 0,
        ok,
    });
    let done = r.units_done.fetch_add(1, Ordering::AcqRel) + 1;
    if done == r.tracker.units() {
        r.finalized.store(true, Ordering::Release);
    }
    Ok(())
}

/// Pull the memslot's dirty log into the region's accumulated bitmap, then take (and clear) the
/// bits of pages `[first, end)`.
fn take_unit_dirty(
    shared: &Shared,
    r: &RegionState,
    first: u64,
    end: u64,
) -> Result<Vec<u64>, PostcopyError> {
    if !*r.dirty_enabled.lock().unwrap_or_else(|p| p.into_inner()) {
        return Ok(Vec::new());
    }
    let fresh = shared
        .dirty
        .fetch(r.region.slot)
        .map_err(|reason| PostcopyError::DirtyLog {
            slot: r.region.slot,
            what: "fetch",
            reason,
        })?;
    let mut acc = r.dirty_acc.lock().unwrap_or_else(|p| p.into_inner());
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
fn copy_delta(r: &RegionState, stage_alias: usize, pages: &[u64]) -> u64 {
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
    shared: &Shared,
    job: CollapseJob,
    backing: FinalBacking,
) -> Result<(), PostcopyError> {
    let r = &shared.regions[job.region];
    let slot = r.region.slot;
    let (first, end) = r.tracker.unit_pages(job.unit);
    let off = first * PAGE_SIZE;
    let len = (end - first) * PAGE_SIZE;
    let addr = r.region.host_addr + off as usize;
    let fd = r.region.fd.ok_or(PostcopyError::NotPrepared)?;
    let err = |what: &'static str| {
        move |source: std::io::Error| PostcopyError::Collapse {
            slot,
            offset: off,
            what,
            source,
        }
    };
    let stage_alias = {
        let st = r.staging.read().unwrap_or_else(|p| p.into_inner());
        match st.as_ref() {
            Some(s) => s.alias_at(0),
            None => return Ok(()),
        }
    };
    let t0 = Instant::now();
    let mut delta_pages = Vec::new();
    let mut stall_ns = 0;
    let (mut pause_ns, mut zap_ns, mut final_delta_ns, mut swap_ns, mut dontneed_ns) =
        (0, 0, 0, 0, 0);

    // A unit the guest never touched has nothing in the staging: swap without pausing (the
    // unit lock keeps faults out; a waiter is woken into the huge mapping).
    let untouched = r.tracker.staged_in(first, end) == 0 && backing == FinalBacking::Hugetlb;
    if untouched {
        let mut collapsed = r.units[job.unit as usize]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if r.tracker.staged_in(first, end) == 0 {
            sys::map_shared_fixed(addr, len as usize, fd, r.region.fd_offset + off)
                .map_err(err("mmap(MAP_FIXED) of the hugetlb page"))?;
            *collapsed = true;
        }
        drop(collapsed);
    }
    if !*r.units[job.unit as usize]
        .read()
        .unwrap_or_else(|p| p.into_inner())
    {
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
            sys::madvise(addr, len as usize, libc::MADV_DONTNEED)
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
        let t = match backing {
            FinalBacking::Hugetlb => freeze_and_swap(shared, r, job.unit, &u)?,
            FinalBacking::GuestMemfd => pause_and_swap(shared, r, job.unit, &u)?,
        };
        delta_pages.push(t.final_delta);
        pause_ns = t.pause_ns;
        final_delta_ns = t.final_delta_ns;
        swap_ns = t.swap_ns;
        stall_ns = t.stall_ns;
        zap_ns = t.zap_ns;
    } else {
        let _ = shared.uffd.wake(addr as *mut libc::c_void, len as usize);
    }
    let total_ns = t0.elapsed().as_nanos() as u64;
    // Stable now: the unit is collapsed, nothing stages into it any more.
    let staged_pages = r.tracker.staged_in(first, end);

    // Off the critical path: free the unit's staging.
    let t_free = Instant::now();
    if let Some(st) = r.staging.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        st.free_range(off, len)
            .map_err(err("punching the staging hole"))?;
    }
    shared.stats.staging_sub(staged_pages);
    shared.stats.collapse(CollapseRecord {
        slot,
        unit_offset: off,
        unit_size: len,
        method: match backing {
            FinalBacking::Hugetlb => "hugetlb-mmap",
            FinalBacking::GuestMemfd => "memslot-swap",
        },
        total_ns,
        stall_ns,
        delta_rounds: delta_pages.len() as u32,
        delta_pages: delta_pages.clone(),
        staged_pages,
        pause_ns,
        zap_ns,
        final_delta_ns,
        swap_ns,
        dontneed_ns,
        free_ns: t_free.elapsed().as_nanos() as u64,
        ok: true,
    });
    tracing::info!(
        slot,
        offset = off,
        size = len,
        stall_ns,
        pause_ns,
        zap_ns,
        final_delta_ns,
        swap_ns,
        dontneed_ns,
        total_ns,
        staged_pages,
        ?delta_pages,
        "collapsed"
    );
    let done = r.units_done.fetch_add(1, Ordering::AcqRel) + 1;
    if done == r.tracker.units() {
        let mut on = r.dirty_enabled.lock().unwrap_or_else(|p| p.into_inner());
        if *on {
            shared
                .dirty
                .disable(slot)
                .map_err(|reason| PostcopyError::DirtyLog {
                    slot,
                    what: "disable",
                    reason,
                })?;
            *on = false;
        }
        drop(on);
        // Closing the staging memfd and its alias.
        r.staging.write().unwrap_or_else(|p| p.into_inner()).take();
        r.finalized.store(true, Ordering::Release);
    }
    Ok(())
}

/// What the critical section of a staged collapse did, and how long its parts took.
#[derive(Debug, Default)]
struct SwapTimes {
    /// Pages copied in the last delta.
    final_delta: u64,
    /// Parking every vCPU (pause-based swaps only).
    pause_ns: u64,
    /// Dropping the staging PTEs inside the freeze (freeze-based swaps only).
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

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos() as u64
}

/// hugetlb: swap without pausing anyone. Take the unit lock (a worker serving a fault in the
/// unit then waits for it, so its vCPU does), then drop every staging PTE of the unit (and with
/// them KVM's mappings, through its MMU notifier): from here any guest access to the unit is a
/// MINOR userfault whose worker waits on the lock, so the staging cannot change any more and the
/// last dirty log is exact. Copy that delta, map the huge page over the range, mark the unit
/// collapsed, unlock, and wake the range. A vCPU waits only if it touches this unit during the
/// freeze, and at most for the freeze; vCPUs elsewhere never stop.
fn freeze_and_swap(
    shared: &Shared,
    r: &RegionState,
    unit: u64,
    u: &UnitRange,
) -> Result<SwapTimes, PostcopyError> {
    let slot = r.region.slot;
    let err = |what: &'static str| {
        move |source: std::io::Error| PostcopyError::Collapse {
            slot,
            offset: u.off,
            what,
            source,
        }
    };
    let mut t = SwapTimes::default();
    // Every vCPU that touches the unit waits for the freeze: do not get preempted inside it.
    let _boost = sys::RealtimeBoost::new();
    let (mut collapsed, t_freeze) = write_unit_lock(&r.units[unit as usize]);
    let result = (|| -> Result<(), PostcopyError> {
        sys::madvise(u.addr, u.len, libc::MADV_DONTNEED)
            .map_err(err("MADV_DONTNEED of the staging range inside the freeze"))?;
        let t_zapped = Instant::now();
        t.zap_ns = ns(t_zapped - t_freeze);
        let dirty = take_unit_dirty(shared, r, u.first, u.end)?;
        t.final_delta = copy_delta(r, u.stage_alias, &dirty);
        let t_swap = Instant::now();
        t.final_delta_ns = ns(t_swap - t_zapped);
        sys::map_shared_fixed(u.addr, u.len, u.fd, r.region.fd_offset + u.off)
            .map_err(err("mmap(MAP_FIXED) of the hugetlb page"))?;
        t.swap_ns = ns(t_swap.elapsed());
        *collapsed = true;
        Ok(())
    })();
    drop(collapsed);
    // Unmapping does not wake a thread already asleep in the old range's userfault wait.
    let _ = shared.uffd.wake(u.addr as *mut libc::c_void, u.len);
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
                return (lock.write().unwrap_or_else(|p| p.into_inner()), t);
            }
        }
    }
}

/// guest_memfd: the memslot itself changes (deleted and created again bound to the
/// guest_memfd), and a vCPU must not run into the gap, so every vCPU is paused (the fault
/// service keeps serving) around the last delta and the swap.
fn pause_and_swap(
    shared: &Shared,
    r: &RegionState,
    unit: u64,
    u: &UnitRange,
) -> Result<SwapTimes, PostcopyError> {
    let slot = r.region.slot;
    let mut t = SwapTimes::default();
    let t_pause = Instant::now();
    shared
        .vcpus
        .pause()
        .map_err(|reason| PostcopyError::Pause { slot, reason })?;
    let t_paused = Instant::now();
    t.pause_ns = ns(t_paused - t_pause);
    let result = (|| -> Result<(), PostcopyError> {
        let mut collapsed = r.units[unit as usize]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let dirty = take_unit_dirty(shared, r, u.first, u.end)?;
        t.final_delta = copy_delta(r, u.stage_alias, &dirty);
        let t_swap = Instant::now();
        t.final_delta_ns = ns(t_swap - t_paused);
        shared
            .memslots
            .swap_to_final(&r.region)
            .map_err(|reason| PostcopyError::MemslotSwap { slot, reason })?;
        // Keep the primary address showing the final memory for the VMM's own accesses (its
        // devices): map the guest_memfd there too.
        sys::map_shared_fixed(u.addr, u.len, u.fd, r.region.fd_offset + u.off).map_err(
            |source| PostcopyError::Collapse {
                slot,
                offset: u.off,
                what: "mmap(MAP_FIXED) of the guest_memfd over the staging",
                source,
            },
        )?;
        t.swap_ns = ns(t_swap.elapsed());
        *collapsed = true;
        Ok(())
    })();
    let _ = shared.uffd.wake(u.addr as *mut libc::c_void, u.len);
    shared.vcpus.resume();
    t.stall_ns = ns(t_pause.elapsed());
    result.map(|()| t)
}
