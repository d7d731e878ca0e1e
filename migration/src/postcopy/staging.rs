//! 4 KiB staging for regions whose final backing cannot be served at 4 KiB by userfaultfd
//! (hugetlb without HGM, guest_memfd): a shmem memfd mapped at the guest's address (the
//! memslot's userspace_addr, so KVM needs no change) plus an alias mapping the engine writes
//! through. Freed unit by unit as the region collapses.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::sys;
use super::PostcopyError;

/// The staging memfd of one region and its alias mapping.
#[derive(Debug)]
pub struct Staging {
    fd: OwnedFd,
    alias: usize,
    len: usize,
}

impl Staging {
    /// Create a staging memfd of `len` bytes, map it over the primary range
    /// `[host_addr, host_addr + len)` (MAP_FIXED) and map an alias of it.
    pub fn create_over(slot: u32, host_addr: usize, len: usize) -> Result<Self, PostcopyError> {
        let fd = nix::sys::memfd::memfd_create(
            c"postcopy-staging",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| PostcopyError::Staging {
            slot,
            what: "memfd_create",
            source: e.into(),
        })?;
        let size = libc::off_t::try_from(len).map_err(|_| PostcopyError::Staging {
            slot,
            what: "ftruncate",
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        nix::unistd::ftruncate(&fd, size).map_err(|e| PostcopyError::Staging {
            slot,
            what: "ftruncate",
            source: e.into(),
        })?;
        let alias =
            sys::map_shared(len, fd.as_raw_fd(), 0).map_err(|source| PostcopyError::Staging {
                slot,
                what: "mmap staging alias",
                source,
            })?;
        let staging = Staging { fd, alias, len };
        // SAFETY: the primary range is the region the engine was handed before the vCPUs run:
        // nothing reads it yet, and its pages all arrive later (through the staging).
        unsafe { sys::map_shared_fixed(host_addr, len, staging.fd.as_raw_fd(), 0) }.map_err(
            |source| PostcopyError::Staging {
                slot,
                what: "mmap staging over the primary range",
                source,
            },
        )?;
        Ok(staging)
    }

    /// Address of byte `offset` of the staging alias.
    pub fn alias_at(&self, offset: u64) -> usize {
        self.alias + offset as usize
    }

    /// Write `data` (whole pages) at byte `offset` of the staging with `pwrite`: the kernel
    /// allocates the page-cache pages and copies in one call, with no page fault on the alias
    /// and no zero-fill of a page about to be overwritten whole. The staging is mapped over
    /// the guest's range MINOR-registered; a write to its page cache raises no userfault.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        sys::pwrite_all(self.fd.as_fd(), data, offset)
    }

    /// Free the staging pages of `[offset, offset + len)` (off the critical path: slow for big
    /// ranges).
    pub fn free_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        sys::punch_hole(self.fd.as_raw_fd(), offset, len)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the alias is this staging's own mapping; the engine drops the staging only
        // when the region collapsed (nothing reads the alias any more) or on shutdown.
        if let Err(e) = unsafe { sys::unmap(self.alias, self.len) } {
            tracing::warn!(
                "unmapping the staging alias at {:#x} failed: {e}",
                self.alias
            );
        }
    }
}
