//! The one place that knows how a page gets into guest memory in each serve mode: UFFDIO_COPY,
//! UFFDIO_CONTINUE, UFFDIO_ZEROPAGE, alias writes, MADV_POPULATE, wakes, and what EEXIST,
//! ENOENT, EFAULT and EAGAIN mean for each. The fault service, the bulk path and the collapse
//! call an [`Installer`]; none of them issues a userfaultfd ioctl itself.
//!
//! | mode | store (arrived data) | map a 4 KiB page | map a huge page |
//! |---|---|---|---|
//! | anon | UFFDIO_COPY (maps + wakes) | UFFDIO_ZEROPAGE or wake | - |
//! | shmem | alias write | CONTINUE, EFAULT → ZEROPAGE | - |
//! | staged | alias write (final) | CONTINUE the staging page | - |
//! | huge (whole) | alias write | - | POPULATE_READ + CONTINUE |
//! | native | alias write | CONTINUE, EFAULT → POPULATE_WRITE + CONTINUE | - |

use std::sync::atomic::Ordering;
use std::sync::Arc;

use userfaultfd::Uffd;

use super::region::Region;
use super::stats::StatsCollector;
use super::supervisor::Supervisor;
use super::sys::{self, Copied};
use super::PostcopyError;
use crate::types::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// What [`Installer::store`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Written into the final backing only; the guest's mapping is made later
    /// ([`Installer::map_page`]).
    Written,
    /// Written and mapped for the guest, its waiters woken (anon UFFDIO_COPY).
    Mapped,
    /// Something was there already (anon: EEXIST); its waiters were woken, nothing written.
    Present,
}

/// Installs pages into guest memory. One implementation drives the kernel
/// ([`UffdInstaller`]); tests of the fault service and the collapse use a double.
pub(crate) trait Installer: Send + Sync {
    /// Put the contents of page `page` of `r`, which has not arrived, into its final place.
    /// The caller holds the page's lock.
    fn store(&self, r: &Region, page: u64, data: &[u8; 4096]) -> Result<Stored, PostcopyError>;
    /// Page `page` of `r` arrived (its final place, or for a staged region its staging page,
    /// holds it): map it at 4 KiB for the guest and wake the threads waiting on it.
    fn map_page(&self, r: &Region, page: u64) -> Result<(), PostcopyError>;
    /// Every 4 KiB of the huge page at `first` of `r` arrived: map the whole page and wake.
    fn map_huge(&self, r: &Region, first: u64) -> Result<(), PostcopyError>;
    /// Only wake the threads waiting on `[addr, addr + len)`.
    fn wake(&self, addr: usize, len: usize);
    /// A bulk frame is about to be written page by page into `[first, first + count)` of `r`
    /// (some of them may have arrived already). Make their final pages present in one call
    /// where each 4 KiB written through the alias would otherwise take its own page fault.
    fn prepare_bulk(&self, _r: &Region, _first: u64, _count: u64) -> Result<(), PostcopyError> {
        Ok(())
    }
}

/// The kernel's installer: the engine's userfaultfd.
pub(crate) struct UffdInstaller {
    uffd: Arc<Uffd>,
    sup: Arc<Supervisor>,
    stats: Arc<StatsCollector>,
}

impl UffdInstaller {
    pub fn new(uffd: Arc<Uffd>, sup: Arc<Supervisor>, stats: Arc<StatsCollector>) -> Self {
        UffdInstaller { uffd, sup, stats }
    }

    fn count_eagain(&self, n: u32) {
        if n > 0 {
            self.stats
                .uffd_eagain
                .fetch_add(u64::from(n), Ordering::Relaxed);
        }
    }

    /// `UFFDIO_CONTINUE` `[addr, addr + len)` of `slot` (EAGAIN-safe); EEXIST / ENOENT
    /// (already mapped, or the range was collapsed under us) mean "wake only".
    fn continue_or_wake(&self, slot: u32, addr: usize, len: usize) -> Result<(), PostcopyError> {
        let (rc, eagain) = sys::uffd_ioctl(
            || self.uffd.r#continue(addr as *mut libc::c_void, len, true),
            || self.sup.stopping(),
        );
        self.count_eagain(eagain);
        match rc {
            Ok(_) => Ok(()),
            Err(e) if matches!(sys::uffd_errno(&e), Some(libc::EEXIST | libc::ENOENT)) => {
                self.wake(addr, len);
                Ok(())
            }
            Err(source) => Err(PostcopyError::UffdRange {
                slot,
                what: match sys::uffd_errno(&source) {
                    Some(libc::EFAULT) => "UFFDIO_CONTINUE (EFAULT: page not in the page cache)",
                    Some(libc::EINVAL) => "UFFDIO_CONTINUE (EINVAL)",
                    Some(libc::EAGAIN) => "UFFDIO_CONTINUE (EAGAIN while stopping)",
                    Some(libc::ENOMEM) => "UFFDIO_CONTINUE (ENOMEM)",
                    _ => "UFFDIO_CONTINUE",
                },
                addr,
                len,
                source,
            }),
        }
    }

    /// `UFFDIO_ZEROPAGE` one page at `addr` (EAGAIN-safe); EEXIST (a page is there already)
    /// means "wake only".
    fn zeropage_or_wake(&self, slot: u32, addr: usize) -> Result<(), PostcopyError> {
        let (rc, eagain) = sys::uffd_ioctl(
            || {
                // SAFETY: `addr` is a page of a region the engine registered with userfaultfd;
                // UFFDIO_ZEROPAGE only fills a hole (anon: an unmapped page; shmem: a
                // page-cache hole) and never replaces a page that is there (EEXIST).
                unsafe { self.uffd.zeropage(addr as *mut libc::c_void, PAGE, true) }
            },
            || self.sup.stopping(),
        );
        self.count_eagain(eagain);
        match rc {
            Ok(_) => Ok(()),
            Err(e) if sys::uffd_errno(&e) == Some(libc::EEXIST) => {
                self.wake(addr, PAGE);
                Ok(())
            }
            Err(source) => Err(PostcopyError::UffdRange {
                slot,
                what: "UFFDIO_ZEROPAGE",
                addr,
                len: PAGE,
                source,
            }),
        }
    }

    fn alias(r: &Region, page: u64) -> Result<usize, PostcopyError> {
        r.alias_page(page).ok_or(PostcopyError::NoAlias {
            slot: r.region.slot,
        })
    }

    /// Anonymous memory: UFFDIO_COPY, which maps the page and wakes its waiters.
    fn store_anon(
        &self,
        r: &Region,
        page: u64,
        data: &[u8; 4096],
    ) -> Result<Stored, PostcopyError> {
        let dst = r.host_page(page);
        // SAFETY: `dst` is a page of the MISSING-registered anonymous region the engine
        // manages; UFFDIO_COPY does not overwrite a present page (EEXIST).
        let rc = unsafe { sys::uffd_copy(&self.uffd, data, dst, true, || self.sup.stopping()) };
        match rc {
            Ok(Copied::Done { eagain }) => {
                self.count_eagain(eagain);
                Ok(Stored::Mapped)
            }
            Ok(Copied::Exists) => {
                self.wake(dst, PAGE);
                Ok(Stored::Present)
            }
            Err(source) => Err(PostcopyError::UffdRange {
                slot: r.region.slot,
                what: "UFFDIO_COPY",
                addr: dst,
                len: PAGE,
                source,
            }),
        }
    }

    /// Native modes: CONTINUE exactly the 4 KiB. A page that arrived in a zero run was never
    /// written, so its final page may be missing from the page cache (CONTINUE: EFAULT): fault
    /// it in, zero-filled, through the alias nothing is registered on (a page already there is
    /// only looked up), then CONTINUE again.
    fn map_native(&self, r: &Region, page: u64) -> Result<(), PostcopyError> {
        let slot = r.region.slot;
        let addr = r.host_page(page);
        match self.continue_or_wake(slot, addr, PAGE) {
            Err(PostcopyError::UffdRange { source, .. })
                if sys::uffd_errno(&source) == Some(libc::EFAULT) =>
            {
                let alias = Self::alias(r, page)?;
                // SAFETY: the alias covers the region and nothing is registered on it;
                // POPULATE_WRITE only allocates a missing page (zero-filled), never changes one.
                unsafe { sys::madvise(alias, PAGE, libc::MADV_POPULATE_WRITE) }.map_err(
                    |source| PostcopyError::Populate {
                        slot,
                        addr: alias,
                        len: PAGE,
                        source,
                    },
                )?;
                self.continue_or_wake(slot, addr, PAGE)
            }
            other => other,
        }
    }

    /// shmem: CONTINUE one page that arrived; a page that arrived in a zero run is not in the
    /// page cache (CONTINUE: EFAULT), so it gets a zeroed page (UFFDIO_ZEROPAGE, which never
    /// replaces a page already there: EEXIST, wake only).
    fn map_shmem(&self, r: &Region, page: u64) -> Result<(), PostcopyError> {
        let slot = r.region.slot;
        let addr = r.host_page(page);
        match self.continue_or_wake(slot, addr, PAGE) {
            Err(PostcopyError::UffdRange { source, .. })
                if sys::uffd_errno(&source) == Some(libc::EFAULT) =>
            {
                self.zeropage_or_wake(slot, addr)
            }
            other => other,
        }
    }
}

impl Installer for UffdInstaller {
    fn store(&self, r: &Region, page: u64, data: &[u8; 4096]) -> Result<Stored, PostcopyError> {
        use super::strategy::ServeMode::*;
        match r.mode() {
            AnonCopy => self.store_anon(r, page, data),
            ShmemContinue | Staged(_) | HugeWhole | NativeHugetlb | NativeGuestMemfd => {
                let dst = Self::alias(r, page)?;
                // SAFETY: the alias mapping covers the whole region (checked when the engine
                // was built) and nothing faults on it; `data` is 4 KiB.
                unsafe { sys::write_page(dst, data) };
                Ok(Stored::Written)
            }
        }
    }

    fn map_page(&self, r: &Region, page: u64) -> Result<(), PostcopyError> {
        use super::strategy::ServeMode::*;
        let addr = r.host_page(page);
        match r.mode() {
            // A page that arrived as part of a zero run was never copied in: the zero page
            // (EEXIST: present already, only wake).
            AnonCopy => self.zeropage_or_wake(r.region.slot, addr),
            ShmemContinue => self.map_shmem(r, page),
            // The staging page holds it (the fault service copied it there).
            Staged(_) => self.continue_or_wake(r.region.slot, addr, PAGE),
            NativeHugetlb | NativeGuestMemfd => self.map_native(r, page),
            HugeWhole => self.map_huge(r, page),
        }
    }

    fn map_huge(&self, r: &Region, first: u64) -> Result<(), PostcopyError> {
        let huge = r.region.page_size as usize;
        let first = first - first % r.tracker.pages_per_unit();
        let addr = r.host_page(first);
        // A huge page whose every 4 KiB arrived in zero runs was never written, so it is not
        // in the hugetlb page cache and CONTINUE would fail (EFAULT): fault it in
        // (zero-filled) through the alias first. A page that is there already is only looked
        // up.
        let alias = Self::alias(r, first)?;
        // SAFETY: the alias covers the region, nothing is registered on it; POPULATE_READ
        // changes no contents.
        unsafe { sys::madvise(alias, huge, libc::MADV_POPULATE_READ) }.map_err(|source| {
            PostcopyError::Populate {
                slot: r.region.slot,
                addr: alias,
                len: huge,
                source,
            }
        })?;
        self.continue_or_wake(r.region.slot, addr, huge)
    }

    /// guest_memfd has 4 KiB folios: a write through the alias faults each page in (on this
    /// host a user page fault also exits to the outer hypervisor), so fault the frame's pages
    /// in with one MADV_POPULATE_WRITE. hugetlb is prefaulted before Ready, shmem's bulk pages
    /// are written with pwrite and anonymous ones with UFFDIO_COPY: nothing to do for them.
    fn prepare_bulk(&self, r: &Region, first: u64, count: u64) -> Result<(), PostcopyError> {
        use super::strategy::{FinalBacking, ServeMode::*};
        if !matches!(
            r.mode(),
            Staged(FinalBacking::GuestMemfd) | NativeGuestMemfd
        ) {
            return Ok(());
        }
        let alias = Self::alias(r, first)?;
        let len = count as usize * PAGE;
        // SAFETY: the alias covers the region (the caller checked the run lies inside it) and
        // nothing is registered on it; POPULATE_WRITE only allocates missing pages
        // (zero-filled), it never changes a page that is there.
        unsafe { sys::madvise(alias, len, libc::MADV_POPULATE_WRITE) }.map_err(|source| {
            PostcopyError::Populate {
                slot: r.region.slot,
                addr: alias,
                len,
                source,
            }
        })
    }

    fn wake(&self, addr: usize, len: usize) {
        if let Err(e) = self.uffd.wake(addr as *mut libc::c_void, len) {
            tracing::debug!("UFFDIO_WAKE of {addr:#x}+{len:#x} failed: {e}");
        }
    }
}
