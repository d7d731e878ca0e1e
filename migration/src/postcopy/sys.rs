//! Thin, checked wrappers over the mapping and userfaultfd calls the postcopy engine uses. The
//! kernel constants no crate exports live in the `kernel-abi` crate, each with its header.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::FallocateFlags;

/// Pointer to `addr` for the syscalls.
fn ptr(addr: usize) -> *mut libc::c_void {
    addr as *mut libc::c_void
}

/// `mmap(addr, len, RW, MAP_SHARED | MAP_FIXED, fd, offset)`: replace whatever is mapped at
/// `[addr, addr + len)` with a shared mapping of `fd`.
///
/// # Safety
/// The caller must own `[addr, addr + len)`: no Rust reference into the range may be alive,
/// and everything that uses the range (the guest, the engine) must expect its contents to
/// become those of `fd` at `offset`.
pub unsafe fn map_shared_fixed(addr: usize, len: usize, fd: RawFd, offset: u64) -> io::Result<()> {
    // SAFETY: the caller owns the range (see above); MAP_FIXED replaces it atomically; the
    // result is checked.
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
///
/// # Safety
/// `[addr, addr + len)` must be a mapping the caller created and that nothing uses any more.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    if unsafe { libc::munmap(ptr(addr), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
/// `[addr, addr + len)` must be a range the caller manages, and `advice` must not change what
/// a reader of the range sees in a way the caller does not expect (`MADV_DONTNEED` on a
/// private anonymous mapping zeroes it; on shared memory the page cache keeps the data;
/// `MADV_COLLAPSE` and `MADV_POPULATE_*` keep the contents).
pub unsafe fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: guaranteed by the caller; the result is checked.
    if unsafe { libc::madvise(ptr(addr), len, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Per 4 KiB page of `[addr, addr + len)`: whether it is resident (for a shared file mapping:
/// in the page cache, mapped here or not; nothing is faulted in). `mincore` is the one call
/// here neither nix nor std wraps.
pub fn page_cache_map(addr: usize, len: usize) -> io::Result<Vec<bool>> {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires; mincore only
    // reads the page tables of the range (an unmapped range is ENOMEM); the result is checked.
    if unsafe { libc::mincore(ptr(addr), len, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// How many 4 KiB pages of `[addr, addr + len)` are resident (see [`page_cache_map`]).
pub fn resident_pages(addr: usize, len: usize) -> io::Result<usize> {
    Ok(page_cache_map(addr, len)?
        .into_iter()
        .filter(|r| *r)
        .count())
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn fallocate(fd: RawFd, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    let (off, n) = (off_t(offset)?, off_t(len)?);
    loop {
        match nix::fcntl::fallocate(fd, mode, off, n) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Free `[offset, offset + len)` of a shmem file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`).
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(fd, mode, offset, len)
}

/// Allocate every missing page of `[offset, offset + len)` of a file (`fallocate` mode 0:
/// shmem pages come zeroed); pages already there are kept as they are.
pub fn fill_holes(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(fd, FallocateFlags::empty(), offset, len)
}

/// Write all of `data` at `offset` of `fd` (retrying short writes and EINTR).
pub fn pwrite_all(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match nix::sys::uio::pwrite(fd, data, off_t(offset)?) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
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
/// version than the workspace, so compare raw numbers). The crate reports a `UFFDIO_COPY` that
/// failed with EAGAIN as `PartiallyCopied`: that is EAGAIN too.
pub fn uffd_errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => Some(*errno as i32),
        userfaultfd::Error::PartiallyCopied(_) => Some(libc::EAGAIN),
        _ => None,
    }
}

/// Waits before the next try of an ioctl that said EAGAIN: a few yields, then sleeps growing
/// from 10 us to 1 ms (the kernel clears `mmap_changing` once the thread changing the address
/// space gets to run, which can take a scheduler tick on a busy machine).
fn eagain_backoff(tries: u32) {
    if tries < 16 {
        std::thread::yield_now();
    } else {
        let us = (10u64 << ((tries - 16) / 4).min(7)).min(1000);
        std::thread::sleep(std::time::Duration::from_micros(us));
    }
}

/// Runs a userfaultfd ioctl (`UFFDIO_CONTINUE`, `UFFDIO_ZEROPAGE`, `UFFDIO_WRITEPROTECT`, ...)
/// again while it fails with EAGAIN: the address space is changing under userfaultfd
/// (`mmap_changing`: an madvise, a remap or a fork in flight), nothing was done, and the kernel
/// asks the caller to try again. EAGAIN is never a failure of its own: the ioctl is retried
/// (with a backoff) until it gives another answer, or until `give_up()` says to stop (then
/// the EAGAIN is returned). Returns the result and how many EAGAINs it saw. For
/// `UFFDIO_COPY` use [`uffd_copy`], which also handles a partial copy.
pub fn uffd_ioctl<T>(
    mut op: impl FnMut() -> Result<T, userfaultfd::Error>,
    give_up: impl Fn() -> bool,
) -> (Result<T, userfaultfd::Error>, u32) {
    let mut tries = 0u32;
    loop {
        match op() {
            Err(e) if uffd_errno(&e) == Some(libc::EAGAIN) && !give_up() => {
                tries = tries.saturating_add(1);
                eagain_backoff(tries);
            }
            other => return (other, tries),
        }
    }
}

/// What [`uffd_copy`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied {
    /// The bytes were copied in (and the waiters woken, if asked); `eagain`: how many times
    /// the kernel said EAGAIN first.
    Done { eagain: u32 },
    /// A page was there already (EEXIST): nothing was written. The caller wakes the waiters.
    Exists,
}

/// `UFFDIO_COPY` of `src` to `[dst, dst + src.len())`, EAGAIN-safe: on EAGAIN (the kernel
/// copied `n` bytes, maybe none, and the address space is changing), the rest is copied again
/// after a backoff, until it is all in, EEXIST says a page is there, another error, or
/// `give_up()` (then the EAGAIN is returned).
///
/// # Safety
/// `[dst, dst + src.len())` must be inside a range registered with `uffd` in MISSING mode,
/// whose contents the caller owns (UFFDIO_COPY never replaces a present page: EEXIST).
pub unsafe fn uffd_copy(
    uffd: &userfaultfd::Uffd,
    src: &[u8],
    dst: usize,
    wake: bool,
    give_up: impl Fn() -> bool,
) -> Result<Copied, userfaultfd::Error> {
    let mut done = 0usize;
    let mut tries = 0u32;
    while done < src.len() {
        // SAFETY: the caller guarantees the destination; `src[done..]` is a live buffer.
        let rc = unsafe {
            uffd.copy(
                src[done..].as_ptr() as *const libc::c_void,
                (dst + done) as *mut libc::c_void,
                src.len() - done,
                wake,
            )
        };
        match rc {
            // No error: the kernel copied everything asked.
            Ok(_) => done = src.len(),
            Err(userfaultfd::Error::PartiallyCopied(n)) if !give_up() => {
                // `n` is the bytes copied, or a negative errno (-EAGAIN: none) cast to usize.
                if n < src.len() - done {
                    done += n;
                }
                tries = tries.saturating_add(1);
                eagain_backoff(tries);
            }
            Err(e) if uffd_errno(&e) == Some(libc::EEXIST) => return Ok(Copied::Exists),
            Err(e) => return Err(e),
        }
    }
    Ok(Copied::Done { eagain: tries })
}
