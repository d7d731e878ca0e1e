//! 4 KiB staging for regions whose final backing cannot be served at 4 KiB by userfaultfd
//! (hugetlb without HGM, guest_memfd): a shmem memfd mapped at the guest's address (the
//! memslot's userspace_addr, so KVM needs no change) plus an alias mapping the engine writes
//! through. Freed unit by unit as the region collapses.
//!
//! The staging must hold 4 KiB folios: a 2 MiB folio would be zeroed whole on the first 4 KiB
//! written to it, on the fault path. So the file lives on a tmpfs instance of the VMM's own,
//! mounted `huge=never` and detached (see `kernel_abi::mount`), whatever the host's
//! `shmem_enabled` says (except `force`, which overrides every mount). Without `CAP_SYS_ADMIN`
//! it is a memfd, whose folio size follows `shmem_enabled` (`never` on the hosts measured).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

use kernel_abi::mount::{detached_mount, tmpfile, MountError};

use super::sys;
use super::PostcopyError;

/// The VMM's `huge=never` tmpfs instance, mounted on first use; the error says why there is
/// none.
fn small_folio_tmpfs() -> Result<&'static OwnedFd, &'static MountError> {
    static MOUNT: OnceLock<Result<OwnedFd, MountError>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mnt = detached_mount(c"tmpfs", &[(c"huge", c"never")]);
            if let Err(e) = &mnt {
                tracing::info!("postcopy staging on a memfd: no private huge=never tmpfs ({e})");
            }
            mnt
        })
        .as_ref()
}

/// The staging file of one region and its alias mapping.
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
        let fd = match small_folio_tmpfs() {
            Ok(mnt) => tmpfile(mnt).map_err(|source| PostcopyError::Staging {
                slot,
                what: "O_TMPFILE on the staging tmpfs",
                source,
            })?,
            Err(_) => nix::sys::memfd::memfd_create(
                c"postcopy-staging",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .map_err(|e| PostcopyError::Staging {
                slot,
                what: "memfd_create",
                source: e.into(),
            })?,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 4 << 20;

    /// The staging charges 4 KiB per page written, never a whole 2 MiB folio, and as root it
    /// is a file on the VMM's own tmpfs rather than a memfd.
    #[test]
    fn staging_pages_are_4k_folios() {
        // SAFETY: a fresh anonymous mapping nothing else uses; unmapped below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let staging = Staging::create_over(1, host as usize, LEN).expect("staging");
        staging.write(2 << 20, &[7u8; 4096]).expect("write a page");
        let st = nix::sys::stat::fstat(staging.fd.as_raw_fd()).expect("fstat");
        assert_eq!(st.st_blocks * 512, 4096, "one 4 KiB page allocated");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", staging.fd.as_raw_fd()))
            .expect("fd link");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                !link.to_string_lossy().contains("memfd:"),
                "as root the staging is on the private tmpfs, got {link:?}"
            );
        }
        // SAFETY: a 4 KiB read inside the staging alias, which maps the page written above.
        let byte = unsafe { *(staging.alias_at(2 << 20) as *const u8) };
        assert_eq!(byte, 7);
        drop(staging);
        // SAFETY: `host` is the mapping made above; the staging mapped over it and is gone.
        unsafe { libc::munmap(host, LEN) };
    }
}
