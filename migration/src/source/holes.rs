//! Never-written guest RAM, found without touching it: the source sends such ranges as zero runs
//! instead of reading them page by page (reading a shmem hole allocates and zeroes a page, about
//! 2 s per GiB here, and keeps the memory allocated).
//!
//! - shmem / memfd backings: `lseek(SEEK_DATA / SEEK_HOLE)` on the backing file. tmpfs counts a
//!   swapped-out page as data, so a hole really is never-written (or punched) memory.
//! - private anonymous memory: `/proc/self/pagemap`; a page neither present nor swapped was never
//!   touched (or was discarded) and reads as zeros.
//! - everything else (hugetlbfs answers "all data", guest_memfd has no lseek): no hole knowledge,
//!   every page is read.
//!
//! A wrong "hole" would lose guest data, so every failure or unexpected answer means "data".

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;

use nix::unistd::Whence;

use kernel_abi::pagemap::{PM_PRESENT, PM_SWAPPED};

use crate::types::{Backing, RamRegion, PAGE_SIZE};

/// Pagemap entries read at once (one 4 KiB read covers 2 MiB of guest RAM).
const PAGEMAP_CHUNK: u64 = 512;

/// How a region's holes are found.
enum Probe {
    /// `lseek` on the backing file; pages start at `offset` in it.
    Seek { fd: RawFd, offset: u64 },
    /// `/proc/self/pagemap` entries of the mapping at `host`.
    Pagemap { file: File, host: usize },
    /// No hole knowledge: every page is data.
    None,
}

/// Whether a stretch of pages holds data or is a hole, and where the stretch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    pub hole: bool,
    /// First page (region-relative) after the stretch.
    pub end: u64,
}

/// Hole knowledge of one region, with the last answer cached.
pub(super) struct RegionHoles {
    probe: Probe,
    pages: u64,
    /// Last extent found: pages `[start, extent.end)` share `extent.hole`.
    cached: Option<(u64, Extent)>,
    /// Pagemap entries `[chunk_start, chunk_start + chunk.len())`.
    chunk_start: u64,
    chunk: Vec<u64>,
}

impl RegionHoles {
    /// Hole knowledge for `region` (the source's own mapping and backing file).
    pub fn new(region: &RamRegion) -> Self {
        let pages = region.size / PAGE_SIZE;
        let probe = match (region.kind, region.fd) {
            (Backing::Shmem, Some(fd)) if seek_works(fd, region.fd_offset) => Probe::Seek {
                fd,
                offset: region.fd_offset,
            },
            (Backing::Anon, _) => match File::open("/proc/self/pagemap") {
                Ok(file) => Probe::Pagemap {
                    file,
                    host: region.host_addr,
                },
                Err(e) => {
                    tracing::debug!("no pagemap ({e}): anonymous RAM is read page by page");
                    Probe::None
                }
            },
            _ => Probe::None,
        };
        RegionHoles {
            probe,
            pages,
            cached: None,
            chunk_start: 0,
            chunk: Vec::new(),
        }
    }

    /// Whether this region can report holes at all.
    #[cfg(test)]
    pub fn knows_holes(&self) -> bool {
        !matches!(self.probe, Probe::None)
    }

    /// The stretch that page `page` (region-relative, < pages) belongs to, from `page` on.
    pub fn extent(&mut self, page: u64) -> Extent {
        if let Some((start, e)) = self.cached {
            if page >= start && page < e.end {
                return e;
            }
        }
        let e = match &self.probe {
            Probe::None => Extent {
                hole: false,
                end: self.pages,
            },
            Probe::Seek { fd, offset } => seek_extent(*fd, *offset, page, self.pages),
            Probe::Pagemap { .. } => self.pagemap_extent(page),
        };
        // Never an empty stretch: a caller always makes progress.
        let e = Extent {
            hole: e.hole,
            end: e.end.clamp(page + 1, self.pages.max(page + 1)),
        };
        self.cached = Some((page, e));
        e
    }

    fn pagemap_extent(&mut self, page: u64) -> Extent {
        let data = Extent {
            hole: false,
            end: page + 1,
        };
        let mut hole = None;
        let mut p = page;
        while p < self.pages {
            if !self.load_chunk(p) {
                return data;
            }
            let entry = self.chunk[(p - self.chunk_start) as usize];
            let is_hole = entry & (PM_PRESENT | PM_SWAPPED) == 0;
            match hole {
                None => hole = Some(is_hole),
                Some(h) if h != is_hole => break,
                Some(_) => {}
            }
            p += 1;
        }
        Extent {
            hole: hole.unwrap_or(false),
            end: p,
        }
    }

    /// Make sure the pagemap entry of `page` is loaded; false if pagemap cannot be read.
    fn load_chunk(&mut self, page: u64) -> bool {
        if page >= self.chunk_start && page < self.chunk_start + self.chunk.len() as u64 {
            return true;
        }
        let Probe::Pagemap { file, host } = &self.probe else {
            return false;
        };
        let start = page - page % PAGEMAP_CHUNK;
        let n = PAGEMAP_CHUNK.min(self.pages - start) as usize;
        let mut bytes = vec![0u8; n * 8];
        let vpn = (*host as u64 / PAGE_SIZE) + start;
        if let Err(e) = file.read_exact_at(&mut bytes, vpn * 8) {
            tracing::debug!("reading pagemap failed ({e}): treating the rest as data");
            self.probe = Probe::None;
            return false;
        }
        self.chunk = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8])))
            .collect();
        self.chunk_start = start;
        true
    }
}

/// `lseek` on a descriptor the source VM keeps open for the whole migration
/// (SourceVm::ram_regions); it only moves this descriptor's file offset, which nothing else in
/// the VMM relies on (guest RAM is accessed through mappings).
fn lseek(fd: RawFd, offset: u64, whence: Whence) -> Result<u64, nix::Error> {
    let off = libc::off_t::try_from(offset).map_err(|_| nix::Error::EOVERFLOW)?;
    let r = nix::unistd::lseek(fd, off, whence)?;
    u64::try_from(r).map_err(|_| nix::Error::EOVERFLOW)
}

/// Whether SEEK_DATA / SEEK_HOLE answer on `fd` at all.
fn seek_works(fd: RawFd, offset: u64) -> bool {
    match lseek(fd, offset, Whence::SeekHole) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("SEEK_HOLE unsupported ({e}): RAM is read page by page");
            false
        }
    }
}

/// The stretch of page `page` found with SEEK_DATA / SEEK_HOLE (any error: one data page).
fn seek_extent(fd: RawFd, base: u64, page: u64, pages: u64) -> Extent {
    let at = base + page * PAGE_SIZE;
    let to_page = |off: u64| off.saturating_sub(base) / PAGE_SIZE;
    let data_page = Extent {
        hole: false,
        end: page + 1,
    };
    match lseek(fd, at, Whence::SeekData) {
        // Data starts later: a hole up to there (rounded down: a partly written page is data).
        Ok(d) if d > at => Extent {
            hole: true,
            end: to_page(d).min(pages),
        },
        Ok(_) => match lseek(fd, at, Whence::SeekHole) {
            // Data up to the next hole (rounded up: a partly written page is data).
            Ok(h) if h > at => Extent {
                hole: false,
                end: to_page(h + PAGE_SIZE - 1).min(pages),
            },
            _ => data_page,
        },
        // No data after `at` at all.
        Err(nix::Error::ENXIO) => Extent {
            hole: true,
            end: pages,
        },
        Err(_) => data_page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn region(kind: Backing, fd: Option<RawFd>, host: usize, size: u64) -> RamRegion {
        RamRegion {
            slot: 0,
            gpa: 0,
            size,
            host_addr: host,
            alias_addr: None,
            fd,
            fd_offset: 0,
            kind,
            page_size: PAGE_SIZE,
        }
    }

    fn map(fd: RawFd, len: usize, flags: libc::c_int) -> *mut u8 {
        // SAFETY: a fresh mapping of `len` bytes (of `fd` or anonymous), checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u8
    }

    /// Written pages 3, 4 and 100 of 256; the rest is holes.
    fn check(holes: &mut RegionHoles) {
        let mut got = Vec::new();
        let mut p = 0;
        while p < 256 {
            let e = holes.extent(p);
            got.push((p, e.hole, e.end));
            p = e.end;
        }
        assert_eq!(
            got,
            vec![
                (0, true, 3),
                (3, false, 5),
                (5, true, 100),
                (100, false, 101),
                (101, true, 256)
            ]
        );
        // A page in the middle of a stretch.
        assert_eq!(
            holes.extent(50),
            Extent {
                hole: true,
                end: 100
            }
        );
    }

    #[test]
    fn shmem_holes_come_from_seek_data() {
        let len = 256 * PAGE_SIZE as usize;
        let memfd = File::from(
            nix::sys::memfd::memfd_create(
                c"holes-test",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .expect("memfd_create"),
        );
        memfd.set_len(len as u64).expect("sizing the memfd");
        let fd = memfd.as_raw_fd();
        let p = map(fd, len, libc::MAP_SHARED);
        for page in [3usize, 4, 100] {
            // SAFETY: inside the mapping made above.
            unsafe { *p.add(page * PAGE_SIZE as usize + 7) = 1 };
        }
        let mut holes = RegionHoles::new(&region(Backing::Shmem, Some(fd), p as usize, len as u64));
        assert!(holes.knows_holes());
        check(&mut holes);
        // SAFETY: unmapping what this test mapped (the memfd closes when dropped).
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }

    #[test]
    fn anon_holes_come_from_pagemap() {
        let len = 256 * PAGE_SIZE as usize;
        let p = map(-1, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        // No THP: a huge page would make the whole 2 MiB present.
        // SAFETY: madvise on the mapping made above.
        unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
        for page in [3usize, 4, 100] {
            // SAFETY: inside the mapping made above.
            unsafe { *p.add(page * PAGE_SIZE as usize + 7) = 1 };
        }
        let mut holes = RegionHoles::new(&region(Backing::Anon, None, p as usize, len as u64));
        assert!(holes.knows_holes());
        check(&mut holes);
        // SAFETY: unmapping what this test made.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }

    #[test]
    fn unknown_backings_are_all_data() {
        let mut holes = RegionHoles::new(&region(Backing::Hugetlb2m, None, 0, 1 << 21));
        assert!(!holes.knows_holes());
        assert_eq!(
            holes.extent(7),
            Extent {
                hole: false,
                end: 512
            }
        );
    }
}
