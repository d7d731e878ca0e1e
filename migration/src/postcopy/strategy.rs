//! How each region is served during postcopy: the strategy the operator asked for, what the
//! kernel offers (detected, never assumed), and the resulting per-region plan.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, RawFd};

use super::sys;
use crate::types::{Backing, Granularity, RamRegion, PAGE_SIZE};

/// 2 MiB: the THP / collapse unit for shmem regions.
pub const SHMEM_COLLAPSE_UNIT: u64 = 2 << 20;

/// 2 MiB: the unit in which a staged guest_memfd region moves to its guest_memfd. A freeze of
/// one unit takes about as long as a 2 MiB hugetlb unit's (a few hundred microseconds); the
/// whole region at once was a memslot delete and create with every vCPU paused (about 2 ms
/// for 256 MiB, most of it KVM zapping its shadow pages).
pub const GUEST_MEMFD_COLLAPSE_UNIT: u64 = 2 << 20;

/// What the final backing of a staged region is. Either way the collapse maps it over the
/// staging range (mmap(MAP_FIXED)) under a freeze of the unit; the memslot stays as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalBacking {
    /// A hugetlb file: the huge page replaces the unit's 4 KiB staging pages.
    Hugetlb,
    /// A guest_memfd (created mmap-able and shared): its range replaces the staging. The
    /// memslot stays a plain one over the region's address, which now maps the guest_memfd:
    /// binding the slot to the guest_memfd would mean deleting and re-creating it with every
    /// vCPU paused.
    GuestMemfd,
}

impl FinalBacking {
    /// The collapse method's name in the statistics ([`super::stats::CollapseRecord::method`]).
    pub fn collapse_method(self) -> &'static str {
        match self {
            FinalBacking::Hugetlb => "hugetlb-mmap",
            FinalBacking::GuestMemfd => "guest-memfd-mmap",
        }
    }

    /// The swap step, for an error that names it.
    pub fn remap_step(self) -> &'static str {
        match self {
            FinalBacking::Hugetlb => "mmap(MAP_FIXED) of the hugetlb page",
            FinalBacking::GuestMemfd => "mmap(MAP_FIXED) of the guest_memfd range",
        }
    }
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
    /// Collapse / arrival unit in bytes (huge page, 2 MiB shmem or guest_memfd range, or the
    /// whole region).
    pub unit_size: u64,
    /// Collapse the units only once every page of the migration arrived (or the staging
    /// outgrew its budget, see `collapse::STAGING_BUDGET_PAGES`), instead of each as soon as
    /// it is complete: every staged mode and shmem. A collapse beside in-flight faults costs
    /// them time: a hugetlb or guest_memfd freeze takes the mmap lock and KVM's MMU notifier;
    /// a shmem `MADV_COLLAPSE` holds each 2 MiB range's pages locked while it copies and
    /// remaps them, so a vCPU that touches the range waits (milliseconds here). Measured on
    /// 256 MiB, 3 alternating runs each: guest p99 0.14x (shmem) and 0.40x (hugetlb-2m). The
    /// cost: the guest runs 4 KiB-mapped until the end, and staged pages stay staged.
    pub collapse_after_last_page: bool,
    /// Why the plan differs from what the strategy asked for (fallbacks), if it does.
    pub note: Option<String>,
    /// With [`Granularity::Native`] on a region the native path could serve: why it does not
    /// (the probe's answer), so the region fell back to 4 KiB staging. `None` when the native
    /// path is used, or was not asked for.
    pub native_fallback: Option<String>,
}

/// Why the kernel has no native 4 KiB path for a region (the probe's answer), or why a probe
/// could not reach an answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("region has no hugetlb fd to probe")]
    NoHugetlbFd,
    #[error("no guest_memfd mapping to probe")]
    NoGuestMemfdMapping,
    #[error("probe mmap of the hugetlb file failed: {0}")]
    Map(#[source] io::Error),
    #[error("probe userfaultfd failed: {0}")]
    Uffd(#[source] io::Error),
    #[error("probe UFFDIO_API failed: {0}")]
    Api(#[source] io::Error),
    /// `UFFDIO_API` refuses `UFFD_FEATURE_MINOR_HUGETLBFS` (EINVAL): no MINOR faults on
    /// hugetlb, so no CONTINUE of any size.
    #[error("UFFDIO_API refuses UFFD_FEATURE_MINOR_HUGETLBFS (no MINOR faults on hugetlb)")]
    NoMinorHugetlbfs,
    #[error("probe MINOR registration failed: {0}")]
    Register(#[source] io::Error),
    #[error("4 KiB UFFDIO_CONTINUE inside a hugetlb page returns EINVAL (no HGM in this kernel)")]
    NoHgm,
    #[error("userfaultfd {mode} registration of the guest_memfd mapping failed: {source}")]
    GuestMemfdRegister {
        mode: UffdMode,
        #[source]
        source: io::Error,
    },
    /// A probe answer given by the caller (tests, an operator override).
    #[error("{0}")]
    Other(String),
}

/// A userfaultfd registration mode a probe tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// `UFFDIO_REGISTER_MODE_MINOR`: faults on pages already in the page cache.
    Minor,
    /// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages not there yet.
    Missing,
}

impl UffdMode {
    /// The mode's bit for `UFFDIO_REGISTER`.
    pub fn bits(self) -> u64 {
        match self {
            UffdMode::Minor => userfaultfd_sys::UFFDIO_REGISTER_MODE_MINOR,
            UffdMode::Missing => userfaultfd_sys::UFFDIO_REGISTER_MODE_MISSING,
        }
    }

    /// The mode's name without the `UFFDIO_REGISTER_MODE_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            UffdMode::Minor => "MINOR",
            UffdMode::Missing => "MISSING",
        }
    }
}

impl fmt::Display for UffdMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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
        collapse_after_last_page: matches!(mode, ServeMode::Staged(_) | ServeMode::ShmemContinue),
        note: None,
        native_fallback: None,
    };
    let staged_guest_memfd = || {
        plan(
            ServeMode::Staged(FinalBacking::GuestMemfd),
            GUEST_MEMFD_COLLAPSE_UNIT.min(region.size),
        )
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
            Granularity::FourK => staged_guest_memfd(),
            Granularity::Huge => RegionPlan {
                note: Some(
                    "guest_memfd has no whole-page userfault path; using 4 KiB staging".into(),
                ),
                ..staged_guest_memfd()
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
                        "native strategy unavailable ({reason}); fell back to 4 KiB staging"
                    )),
                    native_fallback: Some(reason.to_string()),
                    ..staged_guest_memfd()
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
            Some(alias) => probe_uffd_register(
                alias,
                region.page_size.max(PAGE_SIZE) as usize,
                UffdMode::Minor,
            ),
            None => Err(ProbeError::NoGuestMemfdMapping),
        },
    }
}

/// What the kernel answered [`probe_hugetlb_continue`].
#[derive(Debug)]
pub struct HgmAnswer {
    /// `UFFDIO_CONTINUE` of the first 4 KiB of the huge page: the bytes mapped, or the error.
    pub small: io::Result<i64>,
    /// Only where `small` failed: `UFFDIO_CONTINUE` of the whole huge page, the control (with
    /// the page in the page cache it must work, or the probe itself is broken).
    pub whole: Option<io::Result<i64>>,
    /// Where `small` mapped the 4 KiB: their first byte, read back through the probe's mapping.
    pub read_back: Option<u8>,
}

impl HgmAnswer {
    /// Whether the 4 KiB CONTINUE passed the kernel's granularity check: without HGM it fails
    /// with EINVAL; anything else (success, or EFAULT/ENOENT for a page not in the page cache)
    /// passed it.
    pub fn has_hgm(&self) -> bool {
        !matches!(&self.small, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
    }
}

/// The HGM probe: maps the huge page at `offset` of the hugetlb file `fd` a second time,
/// MINOR-registers that mapping with a new userfaultfd and asks to CONTINUE only its first
/// 4 KiB (and, where that fails, the whole page as a control). Allocates no huge page: a page
/// not in the page cache answers EFAULT after the granularity check. The mapping and the
/// userfaultfd are the probe's own and gone when it returns.
pub fn probe_hugetlb_continue(
    fd: RawFd,
    offset: u64,
    page_size: u64,
) -> Result<HgmAnswer, ProbeError> {
    let uffd = kernel_abi::uffd::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(ProbeError::Uffd)?;
    match kernel_abi::uffd::api(uffd.as_fd(), userfaultfd_sys::UFFD_FEATURE_MINOR_HUGETLBFS) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(ProbeError::NoMinorHugetlbfs)
        }
        Err(e) => return Err(ProbeError::Api(e)),
        Ok(_) => {}
    }
    let len = page_size as usize;
    let addr = sys::map_shared(len, fd, offset).map_err(ProbeError::Map)?;
    let result = (|| {
        // Nothing touches this mapping but the read below, after its 4 KiB are mapped: a touch
        // of a registered, unmapped page would wait for a CONTINUE only this thread could send.
        kernel_abi::uffd::register(uffd.as_fd(), addr as u64, page_size, UffdMode::Minor.bits())
            .map_err(ProbeError::Register)?;
        let small = kernel_abi::uffd::continue_range(uffd.as_fd(), addr as u64, PAGE_SIZE);
        let whole = small
            .is_err()
            .then(|| kernel_abi::uffd::continue_range(uffd.as_fd(), addr as u64, page_size));
        let read_back = small.is_ok().then(|| {
            // SAFETY: inside the probe's live mapping, whose first 4 KiB the CONTINUE just
            // mapped, so the read does not fault into the userfaultfd.
            unsafe { (addr as *const u8).read_volatile() }
        });
        Ok(HgmAnswer {
            small,
            whole,
            read_back,
        })
    })();
    // Close the userfaultfd (unregisters) before unmapping.
    drop(uffd);
    // SAFETY: the probe's own temporary mapping, not used after this.
    if let Err(e) = unsafe { sys::unmap(addr, len) } {
        tracing::warn!("unmapping the HGM probe mapping failed: {e}");
    }
    result
}

/// Probe whether a 4 KiB `UFFDIO_CONTINUE` inside a hugetlb mapping passes the kernel's
/// alignment check (it fails with EINVAL without HGM): [`probe_hugetlb_continue`], reduced to
/// the plan's yes or no.
pub fn probe_hugetlb_4k_continue(fd: RawFd, offset: u64, page_size: u64) -> Result<(), ProbeError> {
    if probe_hugetlb_continue(fd, offset, page_size)?.has_hgm() {
        Ok(())
    } else {
        Err(ProbeError::NoHgm)
    }
}

/// Probe whether `[addr, addr + len)` can be registered with a new userfaultfd in `mode`. The
/// userfaultfd is closed (the range unregistered) before this returns.
pub fn probe_uffd_register(addr: usize, len: usize, mode: UffdMode) -> Result<(), ProbeError> {
    let uffd = kernel_abi::uffd::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(ProbeError::Uffd)?;
    kernel_abi::uffd::api(uffd.as_fd(), 0).map_err(ProbeError::Api)?;
    kernel_abi::uffd::register(uffd.as_fd(), addr as u64, len as u64, mode.bits())
        .map_err(|source| ProbeError::GuestMemfdRegister { mode, source })
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
    fn native_on_guest_memfd_registers_it_or_falls_back_to_staging_collapsed_after_the_last_page() {
        let r = region(Backing::GuestMemfd, 256 * MIB, 4096);
        let native = plan_region_with(&r, Granularity::Native, |_| Ok(()));
        assert_eq!(native.mode, ServeMode::NativeGuestMemfd);
        assert_eq!(native.native_fallback, None);
        assert!(!native.collapse_after_last_page);
        let fallback = plan_region_with(&r, Granularity::Native, |_| {
            Err(ProbeError::Other("EINVAL".into()))
        });
        assert_eq!(fallback.mode, ServeMode::Staged(FinalBacking::GuestMemfd));
        assert_eq!(fallback.unit_size, GUEST_MEMFD_COLLAPSE_UNIT);
        assert!(fallback.collapse_after_last_page);
        assert_eq!(fallback.native_fallback.as_deref(), Some("EINVAL"));
        // 4 KiB staging asked for directly: the same units, the same timing; a region smaller
        // than a unit is one unit.
        let staged = plan_region_with(&r, Granularity::FourK, never_probed);
        assert_eq!(
            (staged.unit_size, staged.collapse_after_last_page),
            (GUEST_MEMFD_COLLAPSE_UNIT, true)
        );
        let small = region(Backing::GuestMemfd, MIB, 4096);
        assert_eq!(
            plan_region_with(&small, Granularity::FourK, never_probed).unit_size,
            MIB
        );
        // hugetlb and shmem at 4 KiB wait for the last page too; whole-page service and anon
        // have nothing to collapse later.
        for (kind, page) in [(Backing::Hugetlb2m, 2 * MIB), (Backing::Shmem, 4096)] {
            let p = plan_region_with(
                &region(kind, 256 * MIB, page),
                Granularity::FourK,
                never_probed,
            );
            assert!(p.collapse_after_last_page, "{kind:?}");
        }
        for (kind, page, g) in [
            (Backing::Hugetlb2m, 2 * MIB, Granularity::Huge),
            (Backing::Anon, 4096, Granularity::FourK),
        ] {
            let p = plan_region_with(&region(kind, 256 * MIB, page), g, never_probed);
            assert!(!p.collapse_after_last_page, "{kind:?} {g:?}");
        }
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
