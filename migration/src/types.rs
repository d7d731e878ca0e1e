//! Types shared by the migration modules and the VMM that drives them: guest RAM regions as the
//! migration code sees them, the migration mode, and the traits the VMM implements.

use serde::{Deserialize, Serialize};

/// Size of the page the protocol moves (and the postcopy fault granularity of the 4 KiB path).
pub const PAGE_SIZE: u64 = 4096;

/// How a region is backed (mirror of `vmm::memory::Backing`; the VMM converts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryKind {
    Anon,
    Shmem,
    Hugetlb2m,
    Hugetlb1g,
    GuestMemfd,
}

impl MemoryKind {
    /// The code this kind has on the wire.
    pub fn to_wire(self) -> u8 {
        match self {
            MemoryKind::Anon => 0,
            MemoryKind::Shmem => 1,
            MemoryKind::Hugetlb2m => 2,
            MemoryKind::Hugetlb1g => 3,
            MemoryKind::GuestMemfd => 4,
        }
    }

    /// The kind a wire code names, if any.
    pub fn from_wire(code: u8) -> Option<Self> {
        Some(match code {
            0 => MemoryKind::Anon,
            1 => MemoryKind::Shmem,
            2 => MemoryKind::Hugetlb2m,
            3 => MemoryKind::Hugetlb1g,
            4 => MemoryKind::GuestMemfd,
            _ => return None,
        })
    }
}

/// One guest RAM region as the migration code sees it (one KVM memslot).
#[derive(Clone, Debug)]
pub struct RamRegion {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    /// Primary mapping (KVM's userspace_addr; vCPUs fault here).
    pub host_addr: usize,
    /// Alias mapping of the same pages that nothing faults on (None for anon).
    pub alias_addr: Option<usize>,
    /// The backing file (memfd / hugetlb memfd / guest_memfd), if any; borrowed, not owned.
    pub fd: Option<std::os::fd::RawFd>,
    pub fd_offset: u64,
    pub kind: MemoryKind,
    /// Page size of the backing (4096, 2 MiB, 1 GiB).
    pub page_size: u64,
}

/// Migration mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Send all RAM, iterate over dirtied pages, pause, send the rest and the state, start.
    Precopy,
    /// Pause, send the state, start the destination, then move RAM (faults first, bulk behind).
    Postcopy,
    /// A few precopy rounds, then postcopy for what was dirtied since.
    Hybrid,
}

impl Mode {
    /// The code this mode has on the wire.
    pub fn to_wire(self) -> u8 {
        match self {
            Mode::Precopy => 0,
            Mode::Postcopy => 1,
            Mode::Hybrid => 2,
        }
    }

    /// The mode a wire code names, if any.
    pub fn from_wire(code: u8) -> Option<Self> {
        Some(match code {
            0 => Mode::Precopy,
            1 => Mode::Postcopy,
            2 => Mode::Hybrid,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown migration mode {other:?} (expected precopy, postcopy or hybrid)"
            )),
        }
    }
}

/// Postcopy fault granularity on the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// Serve faults 4 KiB at a time (stage, then collapse).
    FourK,
    /// Serve faults a whole backing page at a time (the baseline).
    Huge,
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "4k" | "4K" => Ok(Granularity::FourK),
            "huge" => Ok(Granularity::Huge),
            other => Err(format!(
                "unknown postcopy granularity {other:?} (expected 4k or huge)"
            )),
        }
    }
}

/// Destination: stop/start all vCPUs for a collapse's final step. `pause()` must return only when
/// every vCPU is out of KVM_RUN or blocked in a userfault (the fault service keeps running).
pub trait VcpuControl: Send + Sync {
    fn pause(&self) -> Result<(), String>;
    fn resume(&self);
}

/// Dirty pages of guest writes since the last call, for one memslot (KVM_GET_DIRTY_LOG bitmap:
/// bit i = page i of the slot). Used by collapse on the destination and precopy on the source.
pub trait DirtyLog: Send + Sync {
    fn enable(&self, slot: u32) -> Result<(), String>;
    fn disable(&self, slot: u32) -> Result<(), String>;
    fn fetch(&self, slot: u32) -> Result<Vec<u64>, String>;
}

/// Destination: swap a guest_memfd region's memslot from the staging mapping to the guest_memfd
/// (collapse for guest_memfd).
pub trait MemslotSwap: Send + Sync {
    fn swap_to_final(&self, region: &RamRegion) -> Result<(), String>;
}

/// Why fetching a page from the source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("page fetch of gpa {gpa:#x} got no reply within {waited_ms} ms")]
    Timeout { gpa: u64, waited_ms: u64 },
    #[error("urgent channel to the source is down (fetching gpa {gpa:#x}): {reason}")]
    Disconnected { gpa: u64, reason: String },
    #[error("gpa {gpa:#x} is not a page-aligned address inside the migrated RAM layout")]
    BadAddress { gpa: u64 },
}

/// Something that fetches one 4 KiB page from the source on the urgent channel (the destination
/// driver implements it on top of the transport; the postcopy fault service uses it).
pub trait PageFetcher: Send + Sync {
    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError>;
}

/// One region of the RAM layout the source announces (gpa range and memslot number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
}

/// The guest RAM layout of a migration: regions sorted by gpa, non-overlapping, page-aligned.
/// Pages are also numbered globally (region after region) for bitmaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<RegionLayout>,
    /// First global page index of each region.
    first_page: Vec<u64>,
    total_pages: u64,
}

/// Why a list of regions is not a valid RAM layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("RAM layout has no regions")]
    Empty,
    #[error("RAM region slot {slot} at gpa {gpa:#x} size {size:#x} is empty, not 4 KiB-aligned or wraps around")]
    BadRegion { slot: u32, gpa: u64, size: u64 },
    #[error("RAM regions at gpa {first:#x} and {second:#x} overlap")]
    Overlap { first: u64, second: u64 },
    #[error("RAM layout uses memslot {slot} twice")]
    DuplicateSlot { slot: u32 },
}

impl RamLayout {
    /// Build a layout from regions in any order; checks alignment, overlap and slot uniqueness.
    pub fn new(mut regions: Vec<RegionLayout>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        for r in &regions {
            if r.size == 0
                || r.gpa % PAGE_SIZE != 0
                || r.size % PAGE_SIZE != 0
                || r.gpa.checked_add(r.size).is_none()
            {
                return Err(LayoutError::BadRegion { slot: r.slot, gpa: r.gpa, size: r.size });
            }
        }
        regions.sort_by_key(|r| r.gpa);
        for pair in regions.windows(2) {
            if pair[0].gpa + pair[0].size > pair[1].gpa {
                return Err(LayoutError::Overlap { first: pair[0].gpa, second: pair[1].gpa });
            }
        }
        let mut slots: Vec<u32> = regions.iter().map(|r| r.slot).collect();
        slots.sort_unstable();
        if let Some(pair) = slots.windows(2).find(|p| p[0] == p[1]) {
            return Err(LayoutError::DuplicateSlot { slot: pair[0] });
        }
        let mut first_page = Vec::with_capacity(regions.len());
        let mut total_pages = 0u64;
        for r in &regions {
            first_page.push(total_pages);
            total_pages += r.size / PAGE_SIZE;
        }
        Ok(RamLayout { regions, first_page, total_pages })
    }

    /// The layout of a VM's RAM regions.
    pub fn from_regions(regions: &[RamRegion]) -> Result<Self, LayoutError> {
        Self::new(
            regions
                .iter()
                .map(|r| RegionLayout { slot: r.slot, gpa: r.gpa, size: r.size })
                .collect(),
        )
    }

    /// The regions, sorted by gpa.
    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }

    /// Number of 4 KiB pages in the whole layout.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Total RAM bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_SIZE
    }

    /// Index (into `regions()`) of the region holding `gpa`.
    pub fn region_of(&self, gpa: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let idx = i.checked_sub(1)?;
        let r = &self.regions[idx];
        (gpa - r.gpa < r.size).then_some(idx)
    }

    /// Global page index of the page-aligned `gpa`, if it lies in the layout.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        if gpa % PAGE_SIZE != 0 {
            return None;
        }
        let idx = self.region_of(gpa)?;
        Some(self.first_page[idx] + (gpa - self.regions[idx].gpa) / PAGE_SIZE)
    }

    /// Guest physical address of global page `index`.
    pub fn page_gpa(&self, index: u64) -> Option<u64> {
        if index >= self.total_pages {
            return None;
        }
        let i = self.first_page.partition_point(|&f| f <= index) - 1;
        Some(self.regions[i].gpa + (index - self.first_page[i]) * PAGE_SIZE)
    }

    /// First global page index of region `idx`.
    pub fn region_first_page(&self, idx: usize) -> u64 {
        self.first_page[idx]
    }

    /// Whether `count` pages starting at `gpa` are page-aligned and all inside one region.
    /// Returns the global index of the first page.
    pub fn run_index(&self, gpa: u64, count: u64) -> Option<u64> {
        let first = self.page_index(gpa)?;
        let idx = self.region_of(gpa)?;
        let r = &self.regions[idx];
        let end = gpa.checked_add(count.checked_mul(PAGE_SIZE)?)?;
        (count > 0 && end <= r.gpa + r.size).then_some(first)
    }
}
