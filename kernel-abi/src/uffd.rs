//! userfaultfd values userfaultfd-sys 0.6 does not guarantee, and the raw userfaultfd calls
//! (include/uapi/linux/userfaultfd.h, Linux 6.18).
//!
//! userfaultfd-sys generates its feature bits from the build host's headers, so a bit newer than
//! its fixed `linux5_13` set may be missing there; these are defined here once.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::ioctl;

/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19): write-protection on hugetlbfs and shmem.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protecting a range also protects its
/// not-yet-populated pages.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_POISON` (Linux 6.6): `UFFDIO_POISON`.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write faults on wp ranges resolve themselves (the PTE's
/// uffd-wp bit is cleared without a message); `PAGEMAP_SCAN` reads and re-arms them.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_FEATURE_MOVE` (Linux 6.8): `UFFDIO_MOVE`.
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// `USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)`: the /dev/userfaultfd ioctl that returns
/// a new userfaultfd (userfaultfd-sys has only `USERFAULTFD_IOC`).
pub const USERFAULTFD_IOC_NEW: libc::c_ulong = ioctl::io(ioctl::TYPE_UFFD, 0x00);

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3F, struct uffdio_api)` (24 bytes).
const UFFDIO_API: libc::c_ulong = ioctl::iowr(ioctl::TYPE_UFFD, 0x3F, 24);
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)` (32 bytes).
const UFFDIO_REGISTER: libc::c_ulong = ioctl::iowr(ioctl::TYPE_UFFD, 0x00, 32);
/// `UFFDIO_CONTINUE = _IOWR(UFFDIO, 0x07, struct uffdio_continue)` (32 bytes).
const UFFDIO_CONTINUE: libc::c_ulong = ioctl::iowr(ioctl::TYPE_UFFD, 0x07, 32);
/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xAA;

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// A new userfaultfd from `userfaultfd(2)`, with open `flags` (`O_CLOEXEC`, `O_NONBLOCK`,
/// `UFFD_USER_MODE_ONLY`).
pub fn userfaultfd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the system call returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new userfaultfd from an open /dev/userfaultfd (`USERFAULTFD_IOC_NEW`), with open `flags`.
pub fn userfaultfd_from_dev(dev: &File, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's open flags as its argument (no pointer)
    // and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `UFFDIO_API` handshake asking for `features`; returns the features the kernel supports
/// (ask for 0 to learn them all).
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which lives on our stack.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api.features)
}

/// `UFFDIO_REGISTER` of `len` bytes at `addr` in `mode` (`UFFDIO_REGISTER_MODE_*`). Registering
/// changes no memory: accesses to the range then wait for this userfaultfd's answer.
pub fn register(uffd: BorrowedFd<'_>, addr: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start: addr, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `uffdio_register` on our stack; the
    // kernel checks that the range is mapped and registrable.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `UFFDIO_CONTINUE` of `len` bytes at `addr` (a MINOR-registered range): maps the page cache
/// pages already there, which is what a read fault would map; returns the bytes mapped.
pub fn continue_range(uffd: BorrowedFd<'_>, addr: u64, len: u64) -> io::Result<i64> {
    let mut cont = UffdioContinue {
        range: UffdioRange { start: addr, len },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: UFFDIO_CONTINUE reads and writes exactly one `uffdio_continue` on our stack; it
    // only installs the file's own pages where none is mapped (the kernel checks the range).
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_CONTINUE,
            &mut cont as *mut UffdioContinue,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cont.mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_request_numbers() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioContinue>(), 32);
        // The values userfaultfd-sys 0.6 has for these requests.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
    }
}
