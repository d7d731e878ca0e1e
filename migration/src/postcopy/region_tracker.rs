//! Per-region page arrival tracking: which 4 KiB pages have arrived in their final place, which
//! went through the staging mapping, and how many pages of each collapse unit are complete.
//!
//! The arrival bit is the single source of truth for "this page must never be overwritten by a
//! later copy": once it is set, the guest may have written the page.

use crate::sync::MutexExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::types::AtomicPageSet;
use std::sync::{Mutex, MutexGuard};

/// Number of page locks per region; a page's lock serialises "check arrival, write, set arrival".
///
/// A fault whose page shares a stripe with a page the bulk receiver is writing waits for that
/// write (and, if the receiver is preempted meanwhile, for the receiver to run again: milliseconds
/// on two busy cores). With 256 stripes and the shmem bulk path holding 64 of them across a
/// 256 KiB `pwrite`, a quarter of the faults in that window collided. 4096 stripes cost 32 KiB
/// per region.
pub(crate) const PAGE_LOCK_STRIPES: usize = 4096;

/// Arrival state of one region.
#[derive(Debug)]
pub struct RegionTracker {
    pages: u64,
    pages_per_unit: u64,
    arrived: AtomicPageSet,
    staged: AtomicPageSet,
    unit_arrived: Vec<AtomicU32>,
    arrived_total: AtomicU64,
    page_locks: Vec<Mutex<()>>,
}

impl RegionTracker {
    /// A tracker for `pages` 4 KiB pages grouped in units of `pages_per_unit` pages (the last
    /// unit may be shorter).
    pub fn new(pages: u64, pages_per_unit: u64) -> Self {
        let ppu = pages_per_unit.max(1);
        let units = pages.div_ceil(ppu);
        RegionTracker {
            pages,
            pages_per_unit: ppu,
            arrived: AtomicPageSet::new(pages),
            staged: AtomicPageSet::new(pages),
            unit_arrived: (0..units).map(|_| AtomicU32::new(0)).collect(),
            arrived_total: AtomicU64::new(0),
            page_locks: (0..PAGE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Number of 4 KiB pages in the region.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages per collapse unit.
    pub fn pages_per_unit(&self) -> u64 {
        self.pages_per_unit
    }

    /// Number of units.
    pub fn units(&self) -> u64 {
        self.unit_arrived.len() as u64
    }

    /// Unit holding page `page`.
    pub fn unit_of(&self, page: u64) -> u64 {
        page / self.pages_per_unit
    }

    /// Page range `[first, end)` of unit `unit`.
    pub fn unit_pages(&self, unit: u64) -> (u64, u64) {
        let first = unit * self.pages_per_unit;
        (first, (first + self.pages_per_unit).min(self.pages))
    }

    /// Whether page `page` has arrived.
    pub fn arrived(&self, page: u64) -> bool {
        self.arrived.contains(page)
    }

    /// Mark page `page` arrived. Returns `Some(unit)` when this call completed that unit.
    pub fn mark_arrived(&self, page: u64) -> Option<u64> {
        if !self.arrived.insert(page) {
            return None;
        }
        self.arrived_total.fetch_add(1, Ordering::AcqRel);
        let unit = self.unit_of(page);
        let (first, end) = self.unit_pages(unit);
        let done = self.unit_arrived[unit as usize].fetch_add(1, Ordering::AcqRel) as u64 + 1;
        (done == end - first).then_some(unit)
    }

    /// Mark pages `[first, end)` arrived at once (pages known to be zero in their final place,
    /// so nothing is written). Returns how many were not arrived before and the units this
    /// call completed.
    pub fn mark_arrived_run(&self, first: u64, end: u64) -> (u64, Vec<u64>) {
        let end = end.min(self.pages);
        let mut newly = 0;
        let mut completed = Vec::new();
        let mut p = first;
        while p < end {
            let unit = self.unit_of(p);
            let (ufirst, uend) = self.unit_pages(unit);
            let stop = uend.min(end);
            let n = self.arrived.insert_range(p, stop);
            if n > 0 {
                newly += n;
                self.arrived_total.fetch_add(n, Ordering::AcqRel);
                let done = u64::from(
                    self.unit_arrived[unit as usize].fetch_add(n as u32, Ordering::AcqRel),
                ) + n;
                if done == uend - ufirst {
                    completed.push(unit);
                }
            }
            p = stop;
        }
        (newly, completed)
    }

    /// Whether every page of unit `unit` arrived.
    pub fn unit_complete(&self, unit: u64) -> bool {
        let (first, end) = self.unit_pages(unit);
        self.unit_arrived
            .get(unit as usize)
            .is_some_and(|c| c.load(Ordering::Acquire) as u64 == end - first)
    }

    /// Pages arrived so far.
    pub fn arrived_count(&self) -> u64 {
        self.arrived_total.load(Ordering::Acquire)
    }

    /// Whether every page of the region arrived.
    pub fn complete(&self) -> bool {
        self.arrived_count() == self.pages
    }

    /// Whether page `page` went through the staging mapping (and was CONTINUEd there).
    pub fn staged(&self, page: u64) -> bool {
        self.staged.contains(page)
    }

    /// Mark page `page` staged; true if it was not staged before.
    pub fn mark_staged(&self, page: u64) -> bool {
        self.staged.insert(page)
    }

    /// Staged pages in `[first, end)`.
    pub fn staged_in(&self, first: u64, end: u64) -> u64 {
        self.staged.count_in(first, end)
    }

    /// The lock serialising writes of page `page` against arrival checks.
    pub fn lock_page(&self, page: u64) -> MutexGuard<'_, ()> {
        let stripe = (page as usize) % PAGE_LOCK_STRIPES;
        // A poisoned stripe only means another thread panicked while holding it; the bitmap
        // state is atomic and stays consistent, so go on.
        self.page_locks[stripe].lock_unpoisoned()
    }

    /// Missing pages in `[first, end)`.
    pub fn missing_in(&self, first: u64, end: u64) -> Vec<u64> {
        (first..end.min(self.pages))
            .filter(|&p| !self.arrived(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_completes_once() {
        let t = RegionTracker::new(10, 4);
        assert_eq!(t.units(), 3);
        for p in 0..3 {
            assert_eq!(t.mark_arrived(p), None);
        }
        assert_eq!(t.mark_arrived(3), Some(0));
        assert_eq!(t.mark_arrived(3), None);
        assert_eq!(t.mark_arrived(8), None);
        assert_eq!(t.mark_arrived(9), Some(2));
        assert!(t.unit_complete(2));
        assert!(!t.unit_complete(1));
        assert_eq!(t.missing_in(0, 10), vec![4, 5, 6, 7]);
        assert_eq!(t.arrived_count(), 6);
    }

    #[test]
    fn run_marking_counts_and_completes_units() {
        let t = RegionTracker::new(300, 128);
        assert_eq!(t.mark_arrived(5), None);
        assert_eq!(t.mark_arrived(130), None);
        let (n, units) = t.mark_arrived_run(0, 200);
        assert_eq!(n, 198);
        assert_eq!(units, vec![0]);
        assert!(!t.unit_complete(1));
        let (n, units) = t.mark_arrived_run(190, 300);
        assert_eq!(n, 100);
        assert_eq!(units, vec![1, 2]);
        assert!(t.complete());
        assert_eq!(t.mark_arrived_run(0, 300), (0, vec![]));
    }
}
