//! Guest RAM: layout, backends and the alias mapping.
//!
//! Guest RAM is split around the 32-bit PCI hole ([`layout`]) into regions, one KVM memslot each.
//! Every region is backed by one of the [`Backing`] kinds; each backend maps the memory twice:
//! the *primary* mapping, whose address KVM is given as the memslot's `userspace_addr` and on which
//! vCPUs fault, and an *alias* mapping of the same pages that nothing faults on (postcopy writes
//! received pages through it). Anonymous private memory cannot be aliased; its alias is `None` and
//! postcopy fills it with `UFFDIO_COPY` instead.

pub mod anon;
pub mod guest_memfd;
pub mod hugepages;
pub mod hugetlb;
pub mod layout;
pub mod mapping;
pub mod shmem;

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::str::FromStr;

pub use layout::{MMIO_HOLD_END, MMIO_HOLE_START};
pub use mapping::Mapping;

/// 4 KiB, the base page size.
pub const PAGE_SIZE_4K: u64 = 4096;
/// 2 MiB huge page.
pub const PAGE_SIZE_2M: u64 = 2 << 20;
/// 1 GiB huge page.
pub const PAGE_SIZE_1G: u64 = 1 << 30;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anon,
    /// A shmem memfd (`memfd_create`), mapped shared.
    Shmem,
    /// A hugetlbfs memfd with 2 MiB pages.
    Hugetlb2m,
    /// A hugetlbfs memfd with 1 GiB pages.
    Hugetlb1g,
    /// A KVM guest_memfd created with `MMAP | INIT_SHARED`, bound with `KVM_MEM_GUEST_MEMFD`.
    GuestMemfd,
}

impl Backing {
    /// All backings, in the order `--help` lists them.
    pub const ALL: [Backing; 5] = [
        Backing::Anon,
        Backing::Shmem,
        Backing::Hugetlb2m,
        Backing::Hugetlb1g,
        Backing::GuestMemfd,
    ];

    /// The page size the backing allocates in; guest RAM size must be a multiple of it.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlb2m => PAGE_SIZE_2M,
            Backing::Hugetlb1g => PAGE_SIZE_1G,
            _ => PAGE_SIZE_4K,
        }
    }

    /// The name used on the command line and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Shmem => "shmem",
            Backing::Hugetlb2m => "hugetlb-2m",
            Backing::Hugetlb1g => "hugetlb-1g",
            Backing::GuestMemfd => "guest-memfd",
        }
    }

    /// True for the hugetlb backings.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, Backing::Hugetlb2m | Backing::Hugetlb1g)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backing {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backing::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| MemoryError::UnknownBacking(s.to_string()))
    }
}

/// Errors of guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("unknown backing '{0}' (expected one of: anon, shmem, hugetlb-2m, hugetlb-1g, guest-memfd)")]
    UnknownBacking(String),
    #[error("memory size must be greater than zero")]
    ZeroSize,
    #[error("memory size {size} bytes is not a multiple of the {backing} page size ({page_size} bytes)")]
    Unaligned { size: u64, backing: Backing, page_size: u64 },
    #[error(
        "the {page_kib} kB huge page pool is too small: {needed} pages needed, {free} free \
         ({total} total); reserve them with: echo {want_total} > {sysfs_path}"
    )]
    PoolTooSmall {
        page_kib: u64,
        needed: u64,
        free: u64,
        total: u64,
        want_total: u64,
        sysfs_path: String,
    },
    #[error("memfd_create for {backing} failed: {source}")]
    Memfd { backing: Backing, source: std::io::Error },
    #[error("sizing the {backing} memory file to {size} bytes failed: {source}")]
    Truncate { backing: Backing, size: u64, source: std::io::Error },
    #[error("mmap of {size} bytes of {backing} memory failed: {source}")]
    Mmap { backing: Backing, size: u64, source: std::io::Error },
    #[error("KVM_CREATE_GUEST_MEMFD failed: {0}")]
    CreateGuestMemfd(#[source] kvm_ioctls::Error),
    #[error("populating huge pages failed (pool exhausted while faulting them in?): {0}")]
    Populate(#[source] std::io::Error),
    #[error("guest physical range {addr:#x}+{len:#x} is not in guest RAM")]
    OutOfRange { addr: u64, len: u64 },
    #[error("reading huge page pool state from {path}: {source}")]
    Sysfs { path: String, source: std::io::Error },
}

/// One contiguous range of guest RAM: one KVM memslot.
#[derive(Debug)]
pub struct Region {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of the backing's page size).
    pub size: u64,
    /// The mapping KVM's memslot points at; vCPUs fault here.
    pub primary: Mapping,
    /// A second mapping of the same pages that nothing faults on (`None` for anon).
    pub alias: Option<Mapping>,
    /// The file behind the region (memfd or guest_memfd), if any.
    pub fd: Option<OwnedFd>,
    /// Offset of the region in `fd`.
    pub fd_offset: u64,
}

impl Region {
    /// True if `gpa..gpa+len` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.guest_addr
            && len <= self.size
            && gpa - self.guest_addr <= self.size - len
    }

    /// Raw fd behind the region, if any.
    pub fn raw_fd(&self) -> Option<i32> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }
}

/// All of guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    backing: Backing,
    regions: Vec<Region>,
    /// guest_memfd regions need the memslot to name the guest_memfd.
    pub(crate) guest_memfd: bool,
}
