//! How each region is served during postcopy: the strategy the operator asked for, what the
//! kernel offers (detected, never assumed), and the resulting per-region plan.

use std::os::fd::RawFd;

use userfaultfd::{RegisterMode, UffdBuilder};

use super::sys;
use crate::types::{Backing, Granularity, RamRegion, PAGE_SIZE};

/// 2 MiB: the THP / collapse unit for shmem regions.
pub const SHMEM_COLLAPSE_UNIT: u64 = 2 << 20;

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
    /// Kernel-native HGM: the hugetlb mapping itself is MINOR-registered, pages are written
    /// through the alias and a fault CONTINUEs exactly its 4 KiB. No staging, no dirty logging;
    /// a completed huge page is only offered to MADV_COLLAPSE (see `native`).
    NativeHugetlb,
    /// Kernel-native userfaultfd on guest_memfd: the guest_memfd mapping at the memslot's
    /// userspace address is MINOR-registered and served like shmem (4 KiB CONTINUE). No
    /// staging, no memslot swap.
    NativeGuestMemfd,
}

impl ServeMode {
    /// A stable name for reports (stats JSON, logs).
    pub fn name(self) -> &'static str {
        match self {
            ServeMode::AnonCopy => "anon-uffdio-copy",
            ServeMode::ShmemContinue => "shmem-4k-continue",
            ServeMode::Staged(FinalBacking::Hugetlb) => "staged-4k-hugetlb",
            ServeMode::Staged(FinalBacking::GuestMemfd) => "staged-4k-guest-memfd",
            ServeMode::HugeWhole => "huge-whole-page",
            ServeMode::NativeHugetlb => "native-hugetlb-4k-continue",
            ServeMode::NativeGuestMemfd => "native-guest-memfd-4k-continue",
        }
    }

    /// Whether this is one of the kernel-native modes.
    pub fn is_native(self) -> bool {
        matches!(self, ServeMode::NativeHugetlb | ServeMode::NativeGuestMemfd)
    }
}

/// The plan for one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan {
    pub mode: ServeMode,
    /// Collapse / arrival unit in bytes (huge page, 2 MiB shmem range, or the whole region).
    pub unit_size: u64,
    /// Why the plan differs from what the strategy asked for (fallbacks), if it does.
    pub note: Option<String>,
    /// With [`Granularity::Native`] on a region the native path could serve: why it does not
    /// (the probe's answer), so the region fell back to 4 KiB staging. `None` when the native
    /// path is used, or was not asked for.
    pub native_fallback: Option<String>,
}

/// Why the kernel has no native 4 KiB path for a region (the probe's answer).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("region has no hugetlb fd to probe")]
    NoHugetlbFd,
    #[error("no guest_memfd mapping to probe")]
    NoGuestMemfdMapping,
    #[error("probe mmap of the hugetlb file failed: {0}")]
    Map(#[source] std::io::Error),
    #[error("probe userfaultfd failed: {0}")]
    Uffd(#[source] userfaultfd::Error),
    #[error("probe MINOR registration failed: {0}")]
    Register(#[source] userfaultfd::Error),
    #[error("4 KiB UFFDIO_CONTINUE inside a hugetlb page returns EINVAL (no HGM in this kernel)")]
    NoHgm,
    #[error("userfaultfd MINOR registration of the guest_memfd mapping failed: {0}")]
    GuestMemfdRegister(#[source] userfaultfd::Error),
    /// A probe answer given by the caller (tests, an operator override).
    #[error("{0}")]
    Other(String),
}

/// Plan a region for `strategy`, asking `probe` (called only for `Native` on a hugetlb or
/// guest_memfd region) whether the kernel has the native path for it: `Ok(())` = it does,
/// `Err(why)` = it does not.
pub fn plan_region_with(
    region: &RamRegion,
    strategy: Granularity,
    probe: impl FnOnce(&RamRegion) -> Result<(), ProbeError>,
) -> RegionPlan {
    let plan = |mode, unit_size| RegionPlan {
        mode,
        unit_size,
        note: None,
        native_fallback: None,
    };
    match region.kind {
        // The kernel's own 4 KiB paths already are the native ones for these backings.
        Backing::Anon => plan(ServeMode::AnonCopy, region.size.max(PAGE_SIZE)),
        Backing::Shmem => plan(
            ServeMode::ShmemContinue,
            SHMEM_COLLAPSE_UNIT.min(region.size),
        ),
        Backing::Hugetlb2m | Backing::Hugetlb1g => match strategy {
            Granularity::FourK => plan(ServeMode::Staged(FinalBacking::Hugetlb), region.page_size),
            Granularity::Huge => plan(ServeMode::HugeWhole, region.page_size),
            Granularity::Native => match probe(region) {
                Ok(()) => RegionPlan {
                    note: Some(
                        "native: 4 KiB UFFDIO_CONTINUE inside a hugetlb page works on this \
                         kernel (HGM): serving the hugetlb mapping directly, no staging"
                            .into(),
                    ),
                    ..plan(ServeMode::NativeHugetlb, region.page_size)
                },
                Err(reason) => RegionPlan {
                    note: Some(format!(
                        "native strategy unavailable ({reason}); fell back to 4 KiB staging + collapse"
                    )),
                    native_fallback: Some(reason.to_string()),
                    ..plan(ServeMode::Staged(FinalBacking::Hugetlb), region.page_size)
                },
            },
        },
        Backing::GuestMemfd => match strategy {
            Granularity::FourK => plan(ServeMode::Staged(FinalBacking::GuestMemfd), region.size),
            Granularity::Huge => RegionPlan {
                note: Some(
                    "guest_memfd has no whole-page userfault path; using 4 KiB staging".into(),
                ),
                ..plan(ServeMode::Staged(FinalBacking::GuestMemfd), region.size)
            },
            Granularity::Native => match probe(region) {
                Ok(()) => RegionPlan {
                    note: Some(
                        "native: the guest_memfd mapping accepts userfaultfd MINOR registration: \
                         serving it like shmem (4 KiB CONTINUE), no staging, no memslot swap"
                            .into(),
                    ),
                    ..plan(ServeMode::NativeGuestMemfd, region.size)
                },
                Err(reason) => RegionPlan {
                    note: Some(format!(
                        "native strategy unavailable ({reason}); fell back to 4 KiB staging + memslot swap"
                    )),
                    native_fallback: Some(reason.to_string()),
                    ..plan(ServeMode::Staged(FinalBacking::GuestMemfd), region.size)
                },
            },
        },
    }
}

/// Ask the kernel whether the native path exists for `region`: a 4 KiB `UFFDIO_CONTINUE`
/// inside one of its huge pages (hugetlb), or a userfaultfd MINOR registration of its mapping
/// (guest_memfd). Anonymous and shmem regions need nothing (`Ok`).
pub fn probe_native(region: &RamRegion) -> Result<(), ProbeError> {
    match region.kind {
        Backing::Anon | Backing::Shmem => Ok(()),
        Backing::Hugetlb2m | Backing::Hugetlb1g => match region.fd {
            Some(fd) => probe_hugetlb_4k_continue(fd, region.fd_offset, region.page_size),
            None => Err(ProbeError::NoHugetlbFd),
        },
        Backing::GuestMemfd => match region.alias_addr {
            Some(alias) => probe_uffd_register(alias, region.page_size.max(PAGE_SIZE) as usize),
            None => Err(ProbeError::NoGuestMemfdMapping),
        },
    }
}

/// Probe whether a 4 KiB `UFFDIO_CONTINUE` inside a hugetlb mapping passes the kernel's
/// alignment check (it fails with EINVAL without HGM). Uses a temporary mapping and userfaultfd,
/// allocates no huge page.
pub fn probe_hugetlb_4k_continue(fd: RawFd, offset: u64, page_size: u64) -> Result<(), ProbeError> {
    let len = page_size as usize;
    let addr = sys::map_shared(len, fd, offset).map_err(ProbeError::Map)?;
    let result = (|| {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .map_err(ProbeError::Uffd)?;
        uffd.register_with_mode(addr as *mut libc::c_void, len, RegisterMode::MINOR)
            .map_err(ProbeError::Register)?;
        match uffd.r#continue(addr as *mut libc::c_void, PAGE_SIZE as usize, false) {
            Err(e) if sys::uffd_errno(&e) == Some(libc::EINVAL) => Err(ProbeError::NoHgm),
            // Anything else (EFAULT/ENOENT for a page not in the cache, or success) passed the
            // granularity check.
            _ => Ok(()),
        }
    })();
    // SAFETY: the probe's own temporary mapping, not used after this.
    if let Err(e) = unsafe { sys::unmap(addr, len) } {
        tracing::warn!("unmapping the HGM probe mapping failed: {e}");
    }
    result
}

/// Probe whether `[addr, addr + len)` can be registered with userfaultfd (MINOR).
pub fn probe_uffd_register(addr: usize, len: usize) -> Result<(), ProbeError> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .create()
        .map_err(ProbeError::Uffd)?;
    match uffd.register_with_mode(addr as *mut libc::c_void, len, RegisterMode::MINOR) {
        Ok(_) => {
            let _ = uffd.unregister(addr as *mut libc::c_void, len);
            Ok(())
        }
        Err(e) => Err(ProbeError::GuestMemfdRegister(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn region(kind: Backing, size: u64, page_size: u64) -> RamRegion {
        RamRegion {
            slot: 0,
            gpa: 0,
            size,
            host_addr: 0x4000_0000,
            alias_addr: Some(0x8000_0000),
            fd: Some(3),
            fd_offset: 0,
            kind,
            page_size,
        }
    }

    fn never_probed(_: &RamRegion) -> Result<(), ProbeError> {
        panic!("the probe must not run for this plan")
    }

    #[test]
    fn native_on_anon_and_shmem_is_their_usual_path_without_probing() {
        let anon = plan_region_with(
            &region(Backing::Anon, 64 * MIB, 4096),
            Granularity::Native,
            never_probed,
        );
        assert_eq!(anon.mode, ServeMode::AnonCopy);
        assert_eq!(anon.native_fallback, None);
        let shmem = plan_region_with(
            &region(Backing::Shmem, 64 * MIB, 4096),
            Granularity::Native,
            never_probed,
        );
        assert_eq!(shmem.mode, ServeMode::ShmemContinue);
        assert_eq!(shmem.unit_size, SHMEM_COLLAPSE_UNIT);
        assert_eq!(shmem.native_fallback, None);
    }

    #[test]
    fn native_on_hugetlb_uses_hgm_when_the_probe_succeeds() {
        for (kind, page) in [
            (Backing::Hugetlb2m, 2 * MIB),
            (Backing::Hugetlb1g, 1024 * MIB),
        ] {
            let p = plan_region_with(&region(kind, 2048 * MIB, page), Granularity::Native, |_| {
                Ok(())
            });
            assert_eq!(p.mode, ServeMode::NativeHugetlb, "{kind:?}");
            assert_eq!(p.unit_size, page);
            assert_eq!(p.native_fallback, None);
            assert!(p.mode.is_native());
        }
    }

    #[test]
    fn native_on_hugetlb_falls_back_to_staging_with_the_probe_reason() {
        let p = plan_region_with(
            &region(Backing::Hugetlb2m, 256 * MIB, 2 * MIB),
            Granularity::Native,
            |_| {
                Err(ProbeError::Other(
                    "4 KiB UFFDIO_CONTINUE returns EINVAL".into(),
                ))
            },
        );
        assert_eq!(p.mode, ServeMode::Staged(FinalBacking::Hugetlb));
        assert_eq!(p.unit_size, 2 * MIB);
        assert_eq!(
            p.native_fallback.as_deref(),
            Some("4 KiB UFFDIO_CONTINUE returns EINVAL")
        );
        let note = p.note.unwrap_or_default();
        assert!(
            note.contains("EINVAL") && note.contains("fell back"),
            "{note}"
        );
    }

    #[test]
    fn native_on_guest_memfd_registers_it_or_falls_back_to_memslot_swap() {
        let r = region(Backing::GuestMemfd, 256 * MIB, 4096);
        let native = plan_region_with(&r, Granularity::Native, |_| Ok(()));
        assert_eq!(native.mode, ServeMode::NativeGuestMemfd);
        assert_eq!(native.native_fallback, None);
        let fallback = plan_region_with(&r, Granularity::Native, |_| {
            Err(ProbeError::Other("EINVAL".into()))
        });
        assert_eq!(fallback.mode, ServeMode::Staged(FinalBacking::GuestMemfd));
        assert_eq!(fallback.unit_size, 256 * MIB);
        assert_eq!(fallback.native_fallback.as_deref(), Some("EINVAL"));
    }

    #[test]
    fn other_strategies_never_probe_and_never_report_a_native_fallback() {
        for s in [Granularity::FourK, Granularity::Huge] {
            for (kind, page) in [(Backing::Hugetlb2m, 2 * MIB), (Backing::GuestMemfd, 4096)] {
                let p = plan_region_with(&region(kind, 256 * MIB, page), s, never_probed);
                assert_eq!(p.native_fallback, None, "{s:?} {kind:?}");
                assert!(!p.mode.is_native());
            }
        }
    }
}
