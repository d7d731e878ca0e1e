//! Thin, checked wrappers over the mapping syscalls the postcopy engine uses, and the kernel
//! constants that no crate in the workspace exports (each defined once, with its header).

use std::io;
use std::os::fd::RawFd;

/// `UFFD_FEATURE_THREAD_ID` from include/uapi/linux/userfaultfd.h: fault messages carry the
/// faulting thread's id (`uffd_msg.arg.pagefault.feat.ptid`), which the userfaultfd crate
/// decodes into `Event::Pagefault::thread_id` with its `linux4_14` feature.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` from include/uapi/linux/userfaultfd.h.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_ASYNC` from include/uapi/linux/userfaultfd.h.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP` from include/uapi/linux/userfaultfd.h (the userfaultfd crate only
/// exports it behind its `linux5_7` feature, which the workspace does not enable).
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// Pointer to `addr` for the syscalls.
fn ptr(addr: usize) -> *mut libc::c_void {
    addr as *mut libc::c_void
}

/// `mmap(addr, len, RW, MAP_SHARED | MAP_FIXED, fd, offset)`: replace whatever is mapped at
/// `[addr, addr + len)` with a shared mapping of `fd`.
pub fn map_shared_fixed(addr: usize, len: usize, fd: RawFd, offset: u64) -> io::Result<()> {
    // SAFETY: the caller owns the address range (it is one of the engine's region ranges, which
    // the engine was handed to manage); MAP_FIXED replaces it atomically; the result is checked.
    let got = unsafe {
        libc::mmap(
            ptr(addr),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            offset as libc::off_t,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mmap(NULL, len, RW, MAP_SHARED, fd, offset)`: a new shared mapping of `fd`.
pub fn map_shared(len: usize, fd: RawFd, offset: u64) -> io::Result<usize> {
    // SAFETY: a fresh mapping chosen by the kernel; nothing else is touched; result checked.
    let got = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// `munmap(addr, len)`.
pub fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller passes a mapping it created and no longer uses.
    if unsafe { libc::munmap(ptr(addr), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `madvise(addr, len, advice)`.
pub fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise on a range the engine manages; DONTNEED on shared memory keeps the data
    // in the page cache and COLLAPSE does not change contents; the result is checked.
    if unsafe { libc::madvise(ptr(addr), len, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many 4 KiB pages of `[addr, addr + len)` are resident (`mincore`; for a shared file
/// mapping: in the page cache, mapped here or not).
pub fn resident_pages(addr: usize, len: usize) -> io::Result<usize> {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires; the range is a
    // mapping the engine owns; the result is checked.
    if unsafe { libc::mincore(ptr(addr), len, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|b| **b & 1 != 0).count())
}

/// Free `[offset, offset + len)` of a shmem file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`).
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a file descriptor the engine owns; the result is checked.
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copy one 4 KiB page between two mappings the engine owns.
///
/// # Safety
/// `src` and `dst` must each be valid for 4096 bytes (inside live mappings) and not overlap.
pub unsafe fn copy_page(src: usize, dst: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, 4096) };
}

/// Write a 4 KiB buffer into a mapping the engine owns.
///
/// # Safety
/// `dst` must be valid for 4096 bytes of writes (inside a live mapping).
pub unsafe fn write_page(dst: usize, data: &[u8; 4096]) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, 4096) };
}

/// The errno inside a userfaultfd crate error, if it carries one (the crate uses another nix
/// version than the workspace, so compare raw numbers).
pub fn uffd_errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => Some(*errno as i32),
        _ => None,
    }
}

/// Runs a userfaultfd ioctl (`UFFDIO_COPY`, `UFFDIO_CONTINUE`, `UFFDIO_ZEROPAGE`) again while
/// it fails with EAGAIN: the address space is changing under userfaultfd (`mmap_changing`, e.g.
/// an madvise, a remap or a fork in flight), nothing was done, and the kernel asks the caller
/// to try again. Gives up after 10 000 tries (returning the EAGAIN) rather than spin forever.
pub fn retry_eagain<T>(
    mut op: impl FnMut() -> Result<T, userfaultfd::Error>,
) -> Result<T, userfaultfd::Error> {
    let mut result = op();
    let mut tries = 0;
    while matches!(&result, Err(e) if uffd_errno(e) == Some(libc::EAGAIN)) && tries < 10_000 {
        tries += 1;
        std::thread::yield_now();
        result = op();
    }
    result
}

/// While alive, the calling thread runs SCHED_FIFO (lowest real-time priority), so that on a
/// machine with every core busy it is not preempted by ordinary threads; dropped, it goes back
/// to SCHED_OTHER. For short critical sections that other threads wait on (a collapse freeze).
/// Without the privilege (EPERM) it does nothing and says so once, at debug level.
pub struct RealtimeBoost {
    boosted: bool,
}

impl RealtimeBoost {
    pub fn new() -> Self {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
        // call; the result is checked.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        if rc != 0 {
            tracing::debug!(
                "no real-time priority for the collapse freeze: {}",
                io::Error::last_os_error()
            );
        }
        RealtimeBoost { boosted: rc == 0 }
    }
}

impl Default for RealtimeBoost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RealtimeBoost {
    fn drop(&mut self) {
        if self.boosted {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in new(); SCHED_OTHER takes priority 0.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
            if rc != 0 {
                tracing::warn!(
                    "could not drop the real-time priority again: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}
