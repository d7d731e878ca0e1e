//! A dirty tracker without KVM: userfaultfd WP_ASYNC write-protection read and re-armed
//! atomically with `PAGEMAP_SCAN` (exact on this kernel, see docs/PLATFORM). The postcopy engine
//! registers the staging ranges for WP (see `PostcopyEngine::use_uffd_wp_dirty_log`); writes
//! then clear the PTE's uffd-wp bit without any fault message, and a scan reports and
//! re-protects the written pages. Covers writes through the primary mapping by any thread of
//! this process (vCPU threads included), not writes through other mappings.
//!
//! A page installed by `UFFDIO_CONTINUE` since the last scan counts as written (its PTE has no
//! wp bit): an over-report, which the collapse tolerates.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use super::PostcopyError;
use crate::types::{DirtyLog, HookError, PAGE_SIZE};

/// `struct page_region` from include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` from include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Default, Debug)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PM_SCAN_WP_MATCHING` from include/uapi/linux/fs.h.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN` from include/uapi/linux/fs.h.
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGEMAP_SCAN = _IOWR('f', 0x10, struct pm_scan_arg)` from include/uapi/linux/fs.h.
const PAGEMAP_SCAN: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 0x10, std::mem::size_of::<PmScanArg>()) as libc::c_ulong;

#[derive(Debug, Clone, Copy)]
struct SlotRange {
    addr: usize,
    len: usize,
}

/// userfaultfd WP_ASYNC + PAGEMAP_SCAN dirty tracker, per memslot range.
#[derive(Debug)]
pub struct UffdWpDirtyLog {
    pagemap: File,
    slots: Mutex<HashMap<u32, SlotRange>>,
}

impl UffdWpDirtyLog {
    /// Open /proc/self/pagemap.
    pub fn new() -> Result<Self, PostcopyError> {
        let pagemap =
            File::open("/proc/self/pagemap").map_err(|source| PostcopyError::Tracker {
                what: "opening /proc/self/pagemap",
                source,
            })?;
        Ok(UffdWpDirtyLog {
            pagemap,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Track memslot `slot` at `[addr, addr + len)` (must be WP_ASYNC-registered by then for
    /// scans to see it; ranges that are not — e.g. collapsed to hugetlb — are skipped).
    pub fn add_slot(&self, slot: u32, addr: usize, len: usize) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, SlotRange { addr, len });
    }

    fn range(&self, slot: u32) -> Result<SlotRange, String> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&slot)
            .copied()
            .ok_or_else(|| format!("slot {slot} is not tracked by the uffd-wp dirty log"))
    }

    /// Scan `range`, write-protect what was written, return the dirty bitmap (bit i = page i).
    fn scan(&self, range: SlotRange) -> Result<Vec<u64>, String> {
        let pages = (range.len as u64) / PAGE_SIZE;
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        let mut regions = vec![PageRegion::default(); 512];
        let end = (range.addr + range.len) as u64;
        let mut start = range.addr as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING,
                start,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` page_regions into
            // `regions`, which outlives the call; the result is checked.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(format!(
                    "PAGEMAP_SCAN of {start:#x}..{end:#x} failed: {}",
                    std::io::Error::last_os_error()
                ));
            }
            for reg in &regions[..n as usize] {
                let mut a = reg.start.max(range.addr as u64);
                while a < reg.end.min(end) {
                    let p = (a - range.addr as u64) / PAGE_SIZE;
                    bitmap[(p / 64) as usize] |= 1 << (p % 64);
                    a += PAGE_SIZE;
                }
            }
            if arg.walk_end <= start {
                return Err(format!("PAGEMAP_SCAN made no progress at {start:#x}"));
            }
            start = arg.walk_end;
        }
        Ok(bitmap)
    }
}

impl DirtyLog for UffdWpDirtyLog {
    fn enable(&self, slot: u32) -> Result<(), HookError> {
        // Arm write-protection over the whole range; what it reports now is history.
        let range = self.range(slot)?;
        self.scan(range)?;
        Ok(())
    }

    fn disable(&self, slot: u32) -> Result<(), HookError> {
        self.range(slot)?;
        Ok(())
    }

    fn fetch(&self, slot: u32) -> Result<Vec<u64>, HookError> {
        let range = self.range(slot)?;
        Ok(self.scan(range)?)
    }
}
