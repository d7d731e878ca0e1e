//! The new mount API, which glibc 2.36 wraps but the libc crate does not: `fsopen(2)`,
//! `fsconfig(2)` and `fsmount(2)` (include/uapi/linux/mount.h, fs/fsopen.c, fs/namespace.c).
//!
//! The VMM uses it for one thing: a private tmpfs instance with its own mount options, mounted
//! *detached* (never attached to any mount namespace), so nothing on the host changes and the
//! instance goes away when the last descriptor to it (the mount's or a file's) is closed.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `FSOPEN_CLOEXEC` (include/uapi/linux/mount.h).
pub const FSOPEN_CLOEXEC: libc::c_uint = 0x0000_0001;
/// `FSCONFIG_SET_STRING`: set a parameter to a string value (include/uapi/linux/mount.h).
pub const FSCONFIG_SET_STRING: libc::c_uint = 1;
/// `FSCONFIG_CMD_CREATE`: create the superblock from the parameters set so far
/// (include/uapi/linux/mount.h).
pub const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
/// `FSMOUNT_CLOEXEC` (include/uapi/linux/mount.h).
pub const FSMOUNT_CLOEXEC: libc::c_uint = 0x0000_0001;

/// Which step of [`detached_mount`] failed, and how.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("fsopen({fs}) failed: {source}")]
    Open { fs: String, source: io::Error },
    #[error("setting {key}={value} on {fs} failed: {source}")]
    Option {
        fs: String,
        key: String,
        value: String,
        source: io::Error,
    },
    #[error("creating the {fs} instance failed: {source}")]
    Create { fs: String, source: io::Error },
    #[error("fsmount of the {fs} instance failed: {source}")]
    Mount { fs: String, source: io::Error },
}

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new instance of filesystem `fs` with the string options `options`, mounted detached: the
/// returned descriptor is the mount's root (use it with `openat`). Needs `CAP_SYS_ADMIN`.
pub fn detached_mount(fs: &CStr, options: &[(&CStr, &CStr)]) -> Result<OwnedFd, MountError> {
    let name = || fs.to_string_lossy().into_owned();
    // SAFETY: `fs` is a NUL-terminated string that lives across the call; fsopen reads it and
    // returns a new descriptor or -1.
    let ctx = owned(unsafe { libc::syscall(libc::SYS_fsopen, fs.as_ptr(), FSOPEN_CLOEXEC) })
        .map_err(|source| MountError::Open { fs: name(), source })?;
    for (key, value) in options {
        // SAFETY: `ctx` is an fs context descriptor; key and value are NUL-terminated strings
        // that live across the call; the fifth argument (aux) is unused for SET_STRING.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                ctx.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        if rc < 0 {
            return Err(MountError::Option {
                fs: name(),
                key: key.to_string_lossy().into_owned(),
                value: value.to_string_lossy().into_owned(),
                source: io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: `ctx` is an fs context descriptor; CMD_CREATE takes no key, value or aux.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            ctx.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(MountError::Create {
            fs: name(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `ctx` is an fs context with a created superblock; no mount attribute flags.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, ctx.as_raw_fd(), FSMOUNT_CLOEXEC, 0u32) })
        .map_err(|source| MountError::Mount { fs: name(), source })
}

/// A new unnamed file (`O_TMPFILE`, read-write, close-on-exec) in the root of the mount
/// `mnt` returned by [`detached_mount`]: it goes when its last descriptor and mapping do.
pub fn tmpfile(mnt: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: `mnt` is an open directory descriptor and "." a NUL-terminated path; openat
    // returns a new descriptor or -1.
    let fd = unsafe {
        libc::openat(
            mnt.as_raw_fd(),
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            libc::S_IRUSR | libc::S_IWUSR,
        )
    };
    owned(libc::c_long::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_filesystem_is_refused_by_name() {
        match detached_mount(c"no-such-fs", &[]) {
            Err(MountError::Open { fs, source }) => {
                assert_eq!(fs, "no-such-fs");
                assert_eq!(source.raw_os_error(), Some(libc::ENODEV));
            }
            other => panic!("expected an fsopen error, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_option_is_refused_by_name() {
        match detached_mount(c"tmpfs", &[(c"no-such-option", c"1")]) {
            Err(MountError::Option { key, .. }) => assert_eq!(key, "no-such-option"),
            Err(MountError::Open { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                // Not root: nothing to check.
            }
            other => panic!("expected an option error, got {other:?}"),
        }
    }
}
