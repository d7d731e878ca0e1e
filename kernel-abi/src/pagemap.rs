//! /proc/PID/pagemap: the entry bits (Documentation/admin-guide/mm/pagemap.rst; defined in
//! fs/proc/task_mmu.c).

/// Pagemap entry: the page is present in RAM (`PM_PRESENT`, bit 63).
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: the page is swapped out (`PM_SWAP`, bit 62).
pub const PM_SWAPPED: u64 = 1 << 62;
