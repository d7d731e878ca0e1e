//! Private anonymous guest RAM (`MAP_PRIVATE | MAP_ANONYMOUS`).
//!
//! Private anonymous memory has no file behind it, so it cannot be mapped a second time: a
//! region of it has no alias. (`mremap` with old size 0 would duplicate only shared mappings, and
//! a `fork`-style copy is copy-on-write, not the same pages.) Postcopy into anon memory therefore
//! uses `UFFDIO_COPY`, which fills a page atomically without an alias.

use super::{Backing, MemoryError, Region};
use crate::memory::mapping::Mapping;

/// Maps one region of private anonymous memory. Pages are allocated on first touch.
pub(crate) fn region(guest_addr: u64, size: usize) -> Result<Region, MemoryError> {
    let primary = Mapping::anonymous(size).map_err(|source| MemoryError::Mmap {
        backing: Backing::Anon,
        what: "primary",
        size: size as u64,
        source,
    })?;
    Ok(Region {
        guest_addr,
        size: size as u64,
        primary,
        alias: None,
        fd: None,
        fd_offset: 0,
        huge_folios: false,
    })
}
