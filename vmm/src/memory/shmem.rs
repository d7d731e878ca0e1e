//! Shared-memory guest RAM: a shmem memfd per region, mapped `MAP_SHARED` twice.

use std::os::fd::OwnedFd;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::{map_file_region, Backing, MemoryError, Region};

/// Creates the memfd of one shmem region, `size` bytes long.
pub(crate) fn create_file(size: usize) -> Result<OwnedFd, MemoryError> {
    let fd = memfd_create(c"vmm-guest-ram-shmem", MemFdCreateFlag::MFD_CLOEXEC).map_err(|e| {
        MemoryError::Memfd {
            backing: Backing::Shmem,
            source: e.into(),
        }
    })?;
    super::truncate(Backing::Shmem, &fd, size)?;
    Ok(fd)
}

/// Creates one shmem region: its memfd, the primary mapping and the alias.
pub(crate) fn region(guest_addr: u64, size: usize) -> Result<Region, MemoryError> {
    let fd = create_file(size)?;
    map_file_region(Backing::Shmem, guest_addr, size, fd)
}
