//! The end of a unit in the kernel-native serve modes (used only where the kernel was found to
//! have them; see `strategy::probe_native`).
//!
//! With HGM a hugetlb region is served in place: every 4 KiB a fault CONTINUEd is a piece of the
//! final huge page already, so a completed huge page has nothing to copy and nothing to swap.
//! What is left is the mapping granularity: the page is offered to `MADV_COLLAPSE`, which an
//! HGM kernel may use to map it huge again. A kernel that refuses (this one: EINVAL) leaves the
//! mapping as it maps it; the collapse record says which of the two happened. A native
//! guest_memfd region has no unit work at all (the guest_memfd is the memory the guest runs
//! on from the start, and its memslot never changes).

use std::time::Instant;

use super::region::Region;
use super::stats::{CollapseRecord, StatsCollector};
use super::strategy::ServeMode;
use super::sys;
use crate::types::PAGE_SIZE;

/// Method names recorded in the collapse statistics.
pub const METHOD_MADV_COLLAPSE: &str = "native-hugetlb-madv-collapse";
/// MADV_COLLAPSE on hugetlb returned EINVAL (the kernel has no hugetlb collapse).
pub const METHOD_LEFT_EINVAL: &str =
    "native-hugetlb-none (MADV_COLLAPSE on hugetlb: EINVAL; mapping left as the kernel maps it)";
/// MADV_COLLAPSE on hugetlb failed with another error (logged).
pub const METHOD_LEFT_FAILED: &str =
    "native-hugetlb-none (MADV_COLLAPSE on hugetlb failed; mapping left as the kernel maps it)";

/// Unit `unit` of native region `r` has fully arrived: record it (and, for hugetlb, offer the
/// huge page to MADV_COLLAPSE). Runs on the collapse thread: no copy, no vCPU pause, no
/// memslot change.
pub(crate) fn settle_unit(r: &Region, stats: &StatsCollector, unit: u64) {
    if r.mode() != ServeMode::NativeHugetlb {
        return;
    }
    let (first, end) = r.tracker.unit_pages(unit);
    let off = first * PAGE_SIZE;
    let len = (end - first) * PAGE_SIZE;
    let addr = r.host_page(first);
    let t0 = Instant::now();
    // SAFETY: a complete huge page of a region the engine serves; MADV_COLLAPSE does not
    // change contents.
    let method = match unsafe { sys::madvise(addr, len as usize, libc::MADV_COLLAPSE) } {
        Ok(()) => METHOD_MADV_COLLAPSE,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => METHOD_LEFT_EINVAL,
        Err(e) => {
            tracing::debug!(
                "MADV_COLLAPSE of native hugetlb slot {} at {addr:#x}+{len:#x} failed: {e}",
                r.region.slot
            );
            METHOD_LEFT_FAILED
        }
    };
    // The guest's memory is complete and correct either way; only the mapping size differs.
    stats.collapse(CollapseRecord::without_swap(
        r.region.slot,
        off,
        len,
        method,
        t0.elapsed().as_nanos() as u64,
        true,
    ));
    r.unit_settled();
}
