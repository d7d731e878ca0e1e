//! /proc/PID/pagemap: the entry bits (Documentation/admin-guide/mm/pagemap.rst; defined in
//! fs/proc/task_mmu.c) and the `PAGEMAP_SCAN` ioctl (include/uapi/linux/fs.h, Linux 6.7).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::ioctl;

/// Pagemap entry: the page is present in RAM (`PM_PRESENT`, bit 63).
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: the page is swapped out (`PM_SWAP`, bit 62).
pub const PM_SWAPPED: u64 = 1 << 62;

/// `struct page_region` from include/uapi/linux/fs.h: one run of pages `PAGEMAP_SCAN` reports.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg` from include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Default, Debug)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `PM_SCAN_WP_MATCHING` from include/uapi/linux/fs.h: write-protect the pages reported.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN` from include/uapi/linux/fs.h: the page was written since it was
/// write-protected (uffd-wp bit clear).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGEMAP_SCAN = _IOWR('f', 0x10, struct pm_scan_arg)` from include/uapi/linux/fs.h.
pub const PAGEMAP_SCAN: libc::c_ulong =
    ioctl::iowr(ioctl::TYPE_FS, 0x10, std::mem::size_of::<PmScanArg>());

/// `PAGEMAP_SCAN` on an open /proc/self/pagemap: returns the number of `page_region`s written
/// to `arg.vec`.
///
/// # Safety
/// `arg.vec` must point to `arg.vec_len` writable `PageRegion`s that live across the call, and
/// if `arg.flags` asks the kernel to change the pages (`PM_SCAN_WP_MATCHING`), write-protecting
/// `[arg.start, arg.end)` must be acceptable to whoever owns that range (a userfaultfd
/// registered for write-protection on it).
pub unsafe fn pagemap_scan(pagemap: BorrowedFd<'_>, arg: &mut PmScanArg) -> io::Result<usize> {
    // SAFETY: `arg` is a valid pm_scan_arg on the caller's stack; the kernel writes at most
    // `vec_len` regions to `vec`, which the caller guarantees is valid.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg as *mut PmScanArg) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
