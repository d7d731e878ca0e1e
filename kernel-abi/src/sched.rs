//! `sched_getattr(2)` / `sched_setattr(2)`, which glibc does not wrap
//! (include/uapi/linux/sched/types.h, kernel/sched/syscalls.c).

use std::io;

/// `sched_attr` size the kernel accepts without utilization clamps (`SCHED_ATTR_SIZE_VER0` of
/// include/uapi/linux/sched/types.h); libc's `sched_attr` is this version.
pub const SCHED_ATTR_SIZE_VER0: u32 = 48;

/// The scheduling attributes of thread `tid` (0: the calling thread).
pub fn sched_getattr(tid: libc::pid_t) -> io::Result<libc::sched_attr> {
    let mut attr = libc::sched_attr {
        size: SCHED_ATTR_SIZE_VER0,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_getattr writes at most `size` (the third argument, == size_of sched_attr
    // VER0 == the struct libc defines) bytes into `attr`, which lives across the call; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut libc::sched_attr,
            SCHED_ATTR_SIZE_VER0,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Sets the scheduling attributes of thread `tid` (0: the calling thread). `attr.size` must be
/// [`SCHED_ATTR_SIZE_VER0`] (EINVAL otherwise: the kernel would read `size` bytes).
pub fn sched_setattr(tid: libc::pid_t, attr: &libc::sched_attr) -> io::Result<()> {
    if attr.size != SCHED_ATTR_SIZE_VER0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `attr` is a fully initialized sched_attr that lives across the call and whose
    // `size` (checked above) is the size of the struct libc defines, so the kernel reads only
    // that struct; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            attr as *const libc::sched_attr,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
