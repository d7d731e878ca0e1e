//! The regions the engine serves, fixed once prepared: each region's memory, its plan, and the
//! state that changes while postcopy runs (arrival tracking, staging, per-unit collapse locks).
//! [`Regions`] locates a page by guest physical or host address.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::region_tracker::RegionTracker;
use super::staging::Staging;
use super::strategy::{RegionPlan, ServeMode};
use crate::types::{RamRegion, PAGE_SIZE};

/// One region while postcopy runs. Its memory and plan never change; the rest is interior
/// state with its own locks.
pub(crate) struct Region {
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
    /// shmem: the units `[first, end)` a `MADV_COLLAPSE` works on now, as `first << 32 | end`
    /// ([`NOT_COLLAPSING`]: none). A vCPU touching them waits for the kernel (page locks).
    collapsing: AtomicU64,
    /// shmem, per unit: the longest fault served while the unit was being collapsed, ns: the
    /// collapse stall a vCPU saw there (shmem has no freeze of its own to time).
    collapse_waits: Vec<AtomicU64>,
}

/// [`Region::collapsing`] when no collapse runs.
const NOT_COLLAPSING: u64 = u64::MAX;

impl Region {
    /// A region about to be served with `plan` (its staging, if any, already created).
    pub fn new(region: RamRegion, plan: RegionPlan, staging: Option<Staging>) -> Self {
        let ppu = (plan.unit_size / PAGE_SIZE).max(1);
        let tracker = RegionTracker::new(region.size / PAGE_SIZE, ppu);
        let tracker_units = tracker.units();
        let collapse_waits = if plan.mode == ServeMode::ShmemContinue {
            (0..tracker_units).map(|_| AtomicU64::new(0)).collect()
        } else {
            Vec::new()
        };
        let units = (0..tracker_units).map(|_| RwLock::new(false)).collect();
        let words = (region.size / PAGE_SIZE).div_ceil(64) as usize;
        Region {
            region,
            plan,
            tracker,
            staging: RwLock::new(staging),
            units,
            units_done: AtomicU64::new(0),
            finalized: AtomicBool::new(false),
            dirty_enabled: Mutex::new(false),
            dirty_acc: Mutex::new(vec![0; words]),
            collapsing: AtomicU64::new(NOT_COLLAPSING),
            collapse_waits,
        }
    }

    /// shmem: a `MADV_COLLAPSE` of units `[first, end)` starts (`Some`) or ended (`None`).
    pub fn set_collapsing(&self, units: Option<(u64, u64)>) {
        let v = units.map_or(NOT_COLLAPSING, |(first, end)| (first << 32) | end);
        self.collapsing.store(v, Ordering::Release);
    }

    /// Whether unit `unit` is being collapsed now (shmem).
    pub fn collapsing_unit(&self, unit: u64) -> bool {
        let v = self.collapsing.load(Ordering::Acquire);
        v != NOT_COLLAPSING && (v >> 32..v & 0xffff_ffff).contains(&unit)
    }

    /// A fault in unit `unit` was served while the unit was being collapsed and took `ns`.
    pub fn note_collapse_wait(&self, unit: u64, ns: u64) {
        if let Some(w) = self.collapse_waits.get(unit as usize) {
            w.fetch_max(ns, Ordering::AcqRel);
        }
    }

    /// The longest such fault of unit `unit` so far (and forget it).
    pub fn take_collapse_wait(&self, unit: u64) -> u64 {
        self.collapse_waits
            .get(unit as usize)
            .map_or(0, |w| w.swap(0, Ordering::AcqRel))
    }

    /// The serve mode.
    pub fn mode(&self) -> ServeMode {
        self.plan.mode
    }

    /// Primary address of page `page`.
    pub fn host_page(&self, page: u64) -> usize {
        self.region.host_addr + (page * PAGE_SIZE) as usize
    }

    /// Page index of primary address `addr` (which must be inside the region).
    pub fn page_of_host(&self, addr: usize) -> u64 {
        ((addr - self.region.host_addr) as u64) / PAGE_SIZE
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

    /// Count one unit settled (collapsed, skipped or left); marks the region finalized with
    /// its last unit. Returns true for the last.
    pub fn unit_settled(&self) -> bool {
        let done = self.units_done.fetch_add(1, Ordering::AcqRel) + 1;
        let last = done == self.tracker.units();
        if last {
            self.finalized.store(true, Ordering::Release);
        }
        last
    }
}

/// A unit whose pages all arrived: the message the arriving side sends to the collapse thread
/// (always a message, whatever the serve mode: no unit work runs on a fault or bulk thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitDone {
    pub region: usize,
    pub unit: u64,
}

/// The engine's regions, fixed for its lifetime.
pub(crate) struct Regions(Vec<Region>);

impl Regions {
    pub fn new(regions: Vec<Region>) -> Self {
        Regions(regions)
    }

    /// Region index and page index of `gpa`.
    pub fn locate_gpa(&self, gpa: u64) -> Option<(usize, u64)> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        self.0.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.region.gpa && gpa - r.region.gpa < r.region.size)
                .then(|| (i, (gpa - r.region.gpa) / PAGE_SIZE))
        })
    }

    /// Region index of primary address `addr`.
    pub fn locate_host(&self, addr: usize) -> Option<usize> {
        self.0.iter().position(|r| {
            addr >= r.region.host_addr && addr - r.region.host_addr < r.region.size as usize
        })
    }

    /// Whether every page of every region arrived.
    pub fn all_arrived(&self) -> bool {
        self.0.iter().all(|r| r.tracker.complete())
    }

    /// Whether every region is done.
    pub fn all_done(&self) -> bool {
        self.0.iter().all(Region::done)
    }
}

impl std::ops::Deref for Regions {
    type Target = [Region];
    fn deref(&self) -> &[Region] {
        &self.0
    }
}
