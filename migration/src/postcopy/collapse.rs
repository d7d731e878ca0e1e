//! The collapse engine: once every 4 KiB of a unit arrived, give the guest its huge mapping back.
//!
//! Staged units (hugetlb, guest_memfd): copy the pages the guest dirtied in the staging into the
//! final backing, repeat while the delta shrinks, drop the staging PTEs of big units, pause the
//! vCPUs (the fault service keeps serving), copy the last delta, mmap(MAP_FIXED) the huge page
//! over the range (or swap the memslot to the guest_memfd), mark it collapsed, UFFDIO_WAKE the
//! range, resume, then free the staging off the critical path. shmem units: MADV_COLLAPSE.
//! Runs on its own thread, never on a fault-service thread.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

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
    let mut pages = Vec::new();
    for p in first..end {
        let (w, b) = ((p / 64) as usize, p % 64);
        if acc[w] & (1 << b) != 0 {
            acc[w] &= !(1 << b);
            pages.push(p);
        }
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
    let (mut pause_ns, mut final_delta_ns, mut swap_ns, mut dontneed_ns) = (0, 0, 0, 0);

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
        let t_pause = Instant::now();
        shared
            .vcpus
            .pause()
            .map_err(|reason| PostcopyError::Pause { slot, reason })?;
        let t_paused = Instant::now();
        pause_ns = (t_paused - t_pause).as_nanos() as u64;
        let result = (|| -> Result<(), PostcopyError> {
            let mut collapsed = r.units[job.unit as usize]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let dirty = take_unit_dirty(shared, r, first, end)?;
            delta_pages.push(copy_delta(r, stage_alias, &dirty));
            let t_swap = Instant::now();
            final_delta_ns = (t_swap - t_paused).as_nanos() as u64;
            match backing {
                FinalBacking::Hugetlb => {
                    sys::map_shared_fixed(addr, len as usize, fd, r.region.fd_offset + off)
                        .map_err(err("mmap(MAP_FIXED) of the hugetlb page"))?;
                }
                FinalBacking::GuestMemfd => {
                    shared
                        .memslots
                        .swap_to_final(&r.region)
                        .map_err(|reason| PostcopyError::MemslotSwap { slot, reason })?;
                    // Keep the primary address showing the final memory for the VMM's own
                    // accesses (its devices): map the guest_memfd there too.
                    sys::map_shared_fixed(addr, len as usize, fd, r.region.fd_offset + off)
                        .map_err(err("mmap(MAP_FIXED) of the guest_memfd over the staging"))?;
                }
            }
            *collapsed = true;
            Ok(())
        })();
        // Unmapping does not wake a thread already asleep in the old range's userfault wait.
        let _ = shared.uffd.wake(addr as *mut libc::c_void, len as usize);
        swap_ns = (t_paused.elapsed().as_nanos() as u64).saturating_sub(final_delta_ns);
        shared.vcpus.resume();
        stall_ns = t_pause.elapsed().as_nanos() as u64;
        result?;
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
