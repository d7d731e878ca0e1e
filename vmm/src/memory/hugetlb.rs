//! hugetlbfs guest RAM: a hugetlb memfd (2 MiB or 1 GiB pages) per region, mapped `MAP_SHARED`
//! twice.
//!
//! A shared hugetlb mapping reserves its huge pages when it is created, so a pool that is too
//! small fails at `mmap` (ENOMEM) and never later at a fault (SIGBUS). Before mapping anything,
//! [`check_pool`] compares the pool with what guest RAM needs, so the usual failure names the
//! numbers and the command that fixes it.

use std::os::fd::OwnedFd;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::hugepages::{pool_status, reserve_command};
use super::{map_file_region, Backing, MemoryError, Region};

fn memfd_flags(backing: Backing) -> MemFdCreateFlag {
    let size = match backing {
        Backing::Hugetlb1g => MemFdCreateFlag::MFD_HUGE_1GB,
        _ => MemFdCreateFlag::MFD_HUGE_2MB,
    };
    MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_HUGETLB | size
}

/// Fails with [`MemoryError::PoolTooSmall`] unless the pool of `backing`'s page size has
/// `size / page_size` available (free, unreserved) pages.
pub(crate) fn check_pool(backing: Backing, size: u64) -> Result<(), MemoryError> {
    let page_size = backing.page_size();
    let needed = size / page_size;
    let status = pool_status(page_size)?;
    let free = status.available();
    if free >= needed {
        return Ok(());
    }
    let want_total = status.total + (needed - free);
    Err(MemoryError::PoolTooSmall {
        backing,
        page_kib: page_size / 1024,
        needed,
        free,
        total: status.total,
        command: reserve_command(page_size, want_total),
    })
}

/// Creates the hugetlb memfd of one region, `size` bytes long (a multiple of the page size).
pub(crate) fn create_file(backing: Backing, size: usize) -> Result<OwnedFd, MemoryError> {
    let fd = memfd_create(c"vmm-guest-ram-hugetlb", memfd_flags(backing)).map_err(|e| {
        MemoryError::Memfd {
            backing,
            source: e.into(),
        }
    })?;
    super::truncate(backing, &fd, size)?;
    Ok(fd)
}

/// Creates one hugetlb region: its memfd, the primary mapping (which reserves the huge pages)
/// and the alias. A pool that ran dry since [`check_pool`] shows as an `mmap` ENOMEM, which
/// [`super::GuestRam::new`] turns into [`MemoryError::PoolTooSmall`].
pub(crate) fn region(
    backing: Backing,
    guest_addr: u64,
    size: usize,
) -> Result<Region, MemoryError> {
    let fd = create_file(backing, size)?;
    map_file_region(backing, guest_addr, size, fd)
}
