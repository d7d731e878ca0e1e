//! How each region is served during postcopy: the strategy the operator asked for, what the
//! kernel offers (detected, never assumed), and the resulting per-region plan.

use std::os::fd::RawFd;

use userfaultfd::{RegisterMode, UffdBuilder};

use super::sys;
use crate::types::{Granularity, MemoryKind, RamRegion, PAGE_SIZE};

/// 2 MiB: the THP / collapse unit for shmem regions.
pub const SHMEM_COLLAPSE_UNIT: u64 = 2 << 20;

/// Postcopy strategy for huge-page-backed regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Strategy {
    /// Serve 4 KiB from a shmem staging mapping, collapse to huge pages when complete.
    FourK,
    /// The baseline: fetch the whole huge page, then CONTINUE it.
    Huge,
    /// Use kernel HGM / guest_memfd userfaultfd where the kernel has it (detected); falls back
    /// to `FourK` otherwise.
    Native,
}

impl From<Granularity> for Strategy {
    fn from(g: Granularity) -> Self {
        match g {
            Granularity::FourK => Strategy::FourK,
            Granularity::Huge => Strategy::Huge,
        }
    }
}

/// What the final backing of a staged region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalBacking {
    /// A hugetlb file: collapse = mmap(MAP_FIXED) of the file over the staging range.
    Hugetlb,
    /// A guest_memfd: collapse = swap the memslot to the guest_memfd (MemslotSwap).
    GuestMemfd,
}

/// How faults and bulk pages of one region are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// Anonymous memory: MISSING + UFFDIO_COPY.
    AnonCopy,
    /// shmem: write through the alias, CONTINUE 4 KiB; MADV_COLLAPSE complete 2 MiB ranges.
    ShmemContinue,
    /// Staged 4 KiB service over a huge / guest_memfd region, collapsed unit by unit.
    Staged(FinalBacking),
    /// Whole huge page service (baseline).
    HugeWhole,
}

/// The plan for one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan {
    pub mode: ServeMode,
    /// Collapse / arrival unit in bytes (huge page, 2 MiB shmem range, or the whole region).
    pub unit_size: u64,
    /// Why the plan differs from what the strategy asked for (fallbacks), if it does.
    pub note: Option<String>,
}

/// Plan a region for `strategy`. `Native` is probed against the kernel here.
pub fn plan_region(region: &RamRegion, strategy: Strategy) -> RegionPlan {
    match region.kind {
        MemoryKind::Anon => RegionPlan {
            mode: ServeMode::AnonCopy,
            unit_size: region.size.max(PAGE_SIZE),
            note: None,
        },
        MemoryKind::Shmem => RegionPlan {
            mode: ServeMode::ShmemContinue,
            unit_size: SHMEM_COLLAPSE_UNIT.min(region.size),
            note: None,
        },
        MemoryKind::Hugetlb2m | MemoryKind::Hugetlb1g => {
            let staged = RegionPlan {
                mode: ServeMode::Staged(FinalBacking::Hugetlb),
                unit_size: region.page_size,
                note: None,
            };
            match strategy {
                Strategy::FourK => staged,
                Strategy::Huge => RegionPlan {
                    mode: ServeMode::HugeWhole,
                    unit_size: region.page_size,
                    note: None,
                },
                Strategy::Native => {
                    let why = match region.fd {
                        Some(fd) => {
                            probe_hugetlb_4k_continue(fd, region.fd_offset, region.page_size)
                        }
                        None => Err("region has no hugetlb fd to probe".to_string()),
                    };
                    match why {
                        Ok(()) => RegionPlan {
                            note: Some(
                                "native 4 KiB CONTINUE on hugetlb was detected, but the engine \
                                 has no HGM path yet: using 4 KiB staging"
                                    .into(),
                            ),
                            ..staged
                        },
                        Err(reason) => RegionPlan {
                            note: Some(format!(
                                "native strategy unavailable ({reason}); fell back to 4 KiB staging + collapse"
                            )),
                            ..staged
                        },
                    }
                }
            }
        }
        MemoryKind::GuestMemfd => {
            let note = match strategy {
                Strategy::FourK => None,
                Strategy::Huge => Some(
                    "guest_memfd has no whole-page userfault path; using 4 KiB staging".to_string(),
                ),
                Strategy::Native => Some(match region.alias_addr {
                    Some(alias) => match probe_uffd_register(alias, region.page_size.max(PAGE_SIZE) as usize) {
                        Ok(()) => "guest_memfd accepted userfaultfd registration, but the engine has no native guest_memfd path yet: using 4 KiB staging".to_string(),
                        Err(reason) => format!("native strategy unavailable ({reason}); fell back to 4 KiB staging + memslot swap"),
                    },
                    None => "native strategy unavailable (no guest_memfd mapping to probe); fell back to 4 KiB staging + memslot swap".to_string(),
                }),
            };
            RegionPlan {
                mode: ServeMode::Staged(FinalBacking::GuestMemfd),
                unit_size: region.size,
                note,
            }
        }
    }
}

/// Probe whether a 4 KiB `UFFDIO_CONTINUE` inside a hugetlb mapping passes the kernel's
/// alignment check (it fails with EINVAL without HGM). Uses a temporary mapping and userfaultfd,
/// allocates no huge page.
pub fn probe_hugetlb_4k_continue(fd: RawFd, offset: u64, page_size: u64) -> Result<(), String> {
    let len = page_size as usize;
    let addr = sys::map_shared(len, fd, offset)
        .map_err(|e| format!("probe mmap of the hugetlb file failed: {e}"))?;
    let result = (|| {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .map_err(|e| format!("probe userfaultfd failed: {e}"))?;
        uffd.register_with_mode(addr as *mut libc::c_void, len, RegisterMode::MINOR)
            .map_err(|e| format!("probe MINOR registration failed: {e}"))?;
        match uffd.r#continue(addr as *mut libc::c_void, PAGE_SIZE as usize, false) {
            Err(e) if sys::uffd_errno(&e) == Some(libc::EINVAL) => Err(
                "4 KiB UFFDIO_CONTINUE inside a hugetlb page returns EINVAL (no HGM in this kernel)"
                    .to_string(),
            ),
            // Anything else (EFAULT/ENOENT for a page not in the cache, or success) passed the
            // granularity check.
            _ => Ok(()),
        }
    })();
    if let Err(e) = sys::unmap(addr, len) {
        tracing::warn!("unmapping the HGM probe mapping failed: {e}");
    }
    result
}

/// Probe whether `[addr, addr + len)` can be registered with userfaultfd (MINOR).
pub fn probe_uffd_register(addr: usize, len: usize) -> Result<(), String> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .create()
        .map_err(|e| format!("probe userfaultfd failed: {e}"))?;
    match uffd.register_with_mode(addr as *mut libc::c_void, len, RegisterMode::MINOR) {
        Ok(_) => {
            let _ = uffd.unregister(addr as *mut libc::c_void, len);
            Ok(())
        }
        Err(e) => Err(format!(
            "userfaultfd MINOR registration of the guest_memfd mapping failed: {e:?}"
        )),
    }
}
