//! An owned `mmap` range of the VMM's address space.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A range of the VMM's virtual address space created by `mmap`, unmapped on drop.
///
/// `Mapping` never hands out Rust references into the memory: guest memory is shared with vCPUs,
/// the kernel (userfaultfd, KVM) and other mappings of the same file, so all access goes through
/// raw pointers with volatile or `copy` semantics.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is an address range plus a length; it owns no thread-bound state, and its
// memory is meant to be accessed concurrently through raw pointers.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only gives out the address, length and raw pointers; see `Send`.
unsafe impl Sync for Mapping {}

/// `mmap` that maps `MAP_FAILED` to the OS error.
///
/// # Safety
/// Same as `libc::mmap`: with `MAP_FIXED` the caller must own `addr..addr+len`.
unsafe fn raw_mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: u64,
) -> io::Result<NonNull<u8>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: forwarded to the caller.
    let p = unsafe { libc::mmap(addr, len, prot, flags, fd, offset) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

impl Mapping {
    /// A new private anonymous read/write mapping (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    /// Pages are allocated on first touch.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at a kernel-chosen address touches no existing memory.
        let addr = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )?
        };
        Ok(Mapping { addr, len })
    }

    /// A new shared read/write mapping of `len` bytes of `fd` from `offset` (`MAP_SHARED`).
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at a kernel-chosen address touches no existing memory.
        let addr = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )?
        };
        Ok(Mapping { addr, len })
    }

    /// Reserves `len` bytes of address space aligned to `align` (a power of two, at least 4 KiB)
    /// as `PROT_NONE`. Fill it with [`Mapping::map_shared_fixed`]; this is how a range that will
    /// later be replaced by a 1 GiB huge page mapping gets its alignment.
    pub fn reserve(len: usize, align: usize) -> io::Result<Mapping> {
        if !align.is_power_of_two() || align < 4096 || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let total = len
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh mapping at a kernel-chosen address touches no existing memory.
        let base = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )?
        };
        let start = base.as_ptr() as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let head = aligned - start;
        let tail = total - head - len;
        // SAFETY: head and tail lie inside the mapping just created, which no one else knows of.
        unsafe {
            if head > 0 {
                libc::munmap(base.as_ptr().cast(), head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let addr = NonNull::new(aligned as *mut u8)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Mapping { addr, len })
    }

    /// Takes ownership of an existing mapping.
    ///
    /// # Safety
    /// `addr..addr+len` must be a mapping the caller owns and that nothing else unmaps.
    pub unsafe fn from_raw(addr: NonNull<u8>, len: usize) -> Mapping {
        Mapping { addr, len }
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// First byte of the mapping as a number (e.g. a memslot's `userspace_addr`).
    pub fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the mapping has no bytes (never the case for a mapping made here).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if `offset..offset+len` lies inside the mapping.
    pub fn contains(&self, offset: usize, len: usize) -> bool {
        offset <= self.len && len <= self.len - offset
    }

    /// Pointer to `offset` if `offset..offset+len` lies inside the mapping.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Option<*mut u8> {
        // SAFETY: offset is within the mapping (checked), so the result stays in bounds.
        self.contains(offset, len)
            .then(|| unsafe { self.addr.as_ptr().add(offset) })
    }

    fn check_range(&self, offset: usize, len: usize) -> io::Result<*mut u8> {
        self.ptr_at(offset, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ERANGE))
    }

    /// Replaces `offset..offset+len` of this mapping with a read/write `MAP_SHARED | MAP_FIXED`
    /// mapping of `fd` from `fd_offset` (e.g. collapsing a 4 KiB staging range back onto its
    /// hugetlb file). The range stays owned by this `Mapping` and is unmapped with it.
    /// `offset`, `len` and `fd_offset` must be aligned to the file's page size.
    pub fn map_shared_fixed(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
    ) -> io::Result<()> {
        let at = self.check_range(offset, len)?;
        // SAFETY: `at..at+len` lies inside this mapping, which we own; MAP_FIXED replaces only it.
        unsafe {
            raw_mmap(
                at.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                fd_offset,
            )?;
        }
        Ok(())
    }

    /// `madvise(advice)` on `offset..offset+len` of the mapping.
    pub fn madvise(&self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        let at = self.check_range(offset, len)?;
        // SAFETY: the range lies inside this mapping; madvise does not unmap it.
        let r = unsafe { libc::madvise(at.cast(), len, advice) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drops the page table entries of `offset..offset+len` (`MADV_DONTNEED`). For shared file
    /// mappings the data stays in the file and the next touch refaults it; for private anonymous
    /// memory the range reads back as zeros.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        self.madvise(offset, len, libc::MADV_DONTNEED)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own addr..addr+len (created by mmap, or handed over via `from_raw`).
        let r = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if r != 0 {
            tracing::warn!(
                addr = self.addr.as_ptr() as u64,
                len = self.len,
                error = %io::Error::last_os_error(),
                "munmap of guest memory mapping failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_reads_writes() {
        let m = Mapping::anonymous(8192).unwrap();
        assert_eq!(m.len(), 8192);
        let p = m.ptr_at(4096, 4096).unwrap();
        // SAFETY: in bounds of a live read/write mapping.
        unsafe {
            p.write_volatile(7);
            assert_eq!(p.read_volatile(), 7);
        }
        assert!(m.ptr_at(4096, 4097).is_none());
        assert!(m.ptr_at(8192, 0).is_some());
        assert!(m.ptr_at(8193, 0).is_none());
    }

    #[test]
    fn reserve_is_aligned() {
        let m = Mapping::reserve(2 << 20, 2 << 20).unwrap();
        assert_eq!(m.addr() % (2 << 20), 0);
        assert!(Mapping::reserve(4096, 3).is_err());
    }

    #[test]
    fn map_shared_fixed_replaces_part() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        let alias = Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 0, 4096).unwrap();
        // SAFETY: in bounds of a live read/write mapping.
        unsafe { alias.as_ptr().write_volatile(42) };
        let m = Mapping::reserve(8192, 4096).unwrap();
        m.map_shared_fixed(4096, 4096, std::os::fd::AsFd::as_fd(&fd), 0)
            .unwrap();
        // SAFETY: the second page is now a read/write mapping of the memfd.
        assert_eq!(unsafe { m.as_ptr().add(4096).read_volatile() }, 42);
        assert!(m
            .map_shared_fixed(4096, 8192, std::os::fd::AsFd::as_fd(&fd), 0)
            .is_err());
    }
}
