//! Shared-memory guest RAM: a shmem file per region, mapped `MAP_SHARED` twice.
//!
//! The file lives on a tmpfs instance of the VMM's own, mounted `huge=always` and *detached*
//! (`fsopen`/`fsmount`, never attached to any mount namespace: nothing on the host changes, and
//! the instance goes when its last file is closed). Its page cache then holds 2 MiB folios
//! wherever the kernel finds 2 MiB of free contiguous memory, whatever the host's
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled` says: the guest runs on huge mappings,
//! and a migration destination that serves 4 KiB faults into such a folio (`UFFDIO_CONTINUE`
//! maps one 4 KiB piece of it) later needs no copy to collapse it: `MADV_COLLAPSE` of a range
//! whose page cache is one 2 MiB folio only replaces the page table with a PMD mapping (tens of
//! microseconds, against milliseconds to copy 512 small folios into a new huge one).
//!
//! Without `CAP_SYS_ADMIN`, or on a kernel without shmem THP, the file is a plain memfd
//! (4 KiB folios, which `MADV_COLLAPSE` copies); [`Region::huge_folios`] says which.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use kernel_abi::mount::{detached_mount, tmpfile, MountError};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::{map_file_region, Backing, MemoryError, Region};

/// The VMM's huge tmpfs instance, mounted on first use; the error says why there is none.
fn huge_tmpfs() -> Result<&'static OwnedFd, &'static MountError> {
    static MOUNT: OnceLock<Result<OwnedFd, MountError>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mnt = detached_mount(c"tmpfs", &[(c"huge", c"always")]);
            match &mnt {
                Ok(_) => tracing::debug!("shmem guest memory: a private tmpfs with huge=always"),
                Err(e) => tracing::info!(
                    "shmem guest memory falls back to 4 KiB folios (memfd): no private huge \
                     tmpfs ({e})"
                ),
            }
            mnt
        })
        .as_ref()
}

/// Creates the file of one shmem region, `size` bytes long, and says whether its page cache
/// takes 2 MiB folios (the huge tmpfs) or not (a memfd).
pub(crate) fn create_file(size: usize) -> Result<(OwnedFd, bool), MemoryError> {
    let (fd, huge) = match huge_tmpfs() {
        // An unnamed file on the instance: gone when the last descriptor and mapping are.
        Ok(mnt) => (
            tmpfile(mnt).map_err(|source| MemoryError::HugeTmpfsFile { source })?,
            true,
        ),
        Err(_) => {
            let fd = memfd_create(c"vmm-guest-ram-shmem", MemFdCreateFlag::MFD_CLOEXEC).map_err(
                |e| MemoryError::Memfd {
                    backing: Backing::Shmem,
                    source: e.into(),
                },
            )?;
            (fd, false)
        }
    };
    super::truncate(Backing::Shmem, &fd, size)?;
    Ok((fd, huge))
}

/// `ShmemPmdMapped` (kB) of this process's mapping that starts at `addr`: how much of it the
/// kernel maps by 2 MiB folios.
pub fn pmd_mapped_kb(addr: u64) -> std::io::Result<u64> {
    super::smaps::read()?
        .iter()
        .find(|e| e.start == addr)
        .map(|e| e.field("ShmemPmdMapped"))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no mapping at {addr:#x} in /proc/self/smaps"),
            )
        })
}

/// Creates one shmem region: its file, the primary mapping and the alias.
pub(crate) fn region(guest_addr: u64, size: usize) -> Result<Region, MemoryError> {
    let (fd, huge) = create_file(size)?;
    let mut region = map_file_region(Backing::Shmem, guest_addr, size, fd)?;
    region.huge_folios = huge;
    Ok(region)
}
