//! Types shared by the migration modules and the VMM that drives them: guest RAM regions as the
//! migration code sees them, the shared vocabulary (backing, migration mode, postcopy
//! granularity: one definition each, used by the wire, the VMM's CLI and API, and the harness),
//! and the traits the VMM implements.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vocab::vocabulary;

/// Size of the page the protocol moves (and the postcopy fault granularity of the 4 KiB path).
pub const PAGE_SIZE: u64 = 4096;

vocabulary! {
    /// How guest RAM is backed on the host (`vmm run|receive --backing`, the API's `backing`,
    /// and the Config frame's `memory_kind` code).
    pub enum Backing: u8, "backing" {
        /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
        Anon = "anon" => 0,
        /// shmem, mapped shared: a file on the VMM's private `huge=always` tmpfs (2 MiB folios), or
        /// a memfd (`memfd_create`) where that tmpfs cannot be mounted.
        Shmem = "shmem" => 1,
        /// A hugetlbfs memfd with 2 MiB pages.
        Hugetlb2m = "hugetlb-2m" => 2,
        /// A hugetlbfs memfd with 1 GiB pages.
        Hugetlb1g = "hugetlb-1g" => 3,
        /// A KVM guest_memfd created with `MMAP | INIT_SHARED`, bound with `KVM_MEM_GUEST_MEMFD`.
        GuestMemfd = "guest-memfd" => 4,
    }
}

/// 2 MiB, the smaller x86-64 huge page.
pub const HUGE_PAGE_2M: u64 = 2 << 20;
/// 1 GiB, the larger x86-64 huge page.
pub const HUGE_PAGE_1G: u64 = 1 << 30;

impl Backing {
    /// The page size the backing allocates in; guest RAM size must be a multiple of it.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlb2m => HUGE_PAGE_2M,
            Backing::Hugetlb1g => HUGE_PAGE_1G,
            Backing::Anon | Backing::Shmem | Backing::GuestMemfd => PAGE_SIZE,
        }
    }

    /// True for the hugetlb backings.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, Backing::Hugetlb2m | Backing::Hugetlb1g)
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
    pub kind: Backing,
    /// Page size of the backing (4096, 2 MiB, 1 GiB).
    pub page_size: u64,
}

vocabulary! {
    /// Migration mode (`vmm migrate --mode`, the API's `mode`, the Config frame's `mode` code).
    pub enum Mode: u8, "migration mode" {
        /// Send all RAM, iterate over dirtied pages, pause, send the rest and the state, start.
        Precopy = "precopy" => 0,
        /// Pause, send the state, start the destination, then move RAM (faults first, bulk
        /// behind).
        Postcopy = "postcopy" => 1,
        /// A few precopy rounds, then postcopy for what was dirtied since.
        Hybrid = "hybrid" => 2,
    }
}

vocabulary! {
    /// Postcopy fault granularity on the destination (`vmm receive --granularity`).
    pub enum Granularity, "postcopy granularity" {
        /// Serve faults 4 KiB at a time (stage, then collapse).
        FourK = "4k",
        /// Serve faults a whole backing page at a time (the baseline).
        Huge = "huge",
        /// Use the kernel's own 4 KiB fault support on huge / guest_memfd backings where a probe
        /// finds it (HGM `UFFDIO_CONTINUE` on hugetlb, userfaultfd on guest_memfd); fall back to
        /// `FourK` (stage, then collapse) where it does not, saying why.
        Native = "native",
    }
}

/// What a hook the VMM implements reports when it fails, across the crate seam: the VMM's own
/// typed error, boxed, with its source chain intact.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Dirty pages of guest writes since the last call, for one memslot (KVM_GET_DIRTY_LOG bitmap:
/// bit i = page i of the slot). Used by collapse on the destination and precopy on the source.
pub trait DirtyLog: Send + Sync {
    fn enable(&self, slot: u32) -> Result<(), HookError>;
    fn disable(&self, slot: u32) -> Result<(), HookError>;
    fn fetch(&self, slot: u32) -> Result<Vec<u64>, HookError>;
}

/// Why fetching a page from the source failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("page fetch of gpa {gpa:#x} got no reply within {waited_ms} ms")]
    Timeout { gpa: u64, waited_ms: u64 },
    #[error("urgent channel to the source is down (fetching gpa {gpa:#x}): {reason}")]
    Disconnected {
        gpa: u64,
        #[source]
        reason: ChannelDown,
    },
    #[error("gpa {gpa:#x} is not a page-aligned address inside the migrated RAM layout")]
    BadAddress { gpa: u64 },
}

/// Why the urgent channel to the source is down: why a page fetch failed at once, or why the
/// channel failed the fetches waiting on it. Cheap to clone (errors it carries are shared).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelDown {
    /// Postcopy set up the client; the channel is not attached yet.
    #[error("the urgent channel is not connected yet")]
    NotConnected,
    /// The channel of this stretch was taken down and the next one is not there yet.
    #[error("the urgent channel is down")]
    NoLink,
    /// The session's link failed (postcopy-paused): fetches wait for the recovery.
    #[error("the link failed: {0}")]
    LinkFailed(#[source] Arc<crate::destination::DestinationError>),
    /// The source closed the urgent channel (the end of its session; the main channel says
    /// why).
    #[error("{during}: peer closed the connection")]
    ClosedBySource { during: &'static str },
    /// Reading or writing the channel failed, or the source sent something else than a reply.
    #[error(transparent)]
    Wire(Arc<crate::wire::WireError>),
    /// A reply for another page than the one requested.
    #[error("reply {id} carries gpa {got:#x}, but gpa {requested:#x} was requested")]
    WrongGpa { id: u64, got: u64, requested: u64 },
    /// A reply that is not one page long.
    #[error("reply {id} carries {len} bytes, not a page")]
    WrongLength { id: u64, len: usize },
    /// The fetch's own request was given up while it waited.
    #[error("the request was abandoned")]
    Abandoned,
    /// Every page arrived: no fetch is needed any more.
    #[error("every page arrived")]
    AllArrived,
    /// Closed for good: the migration ended.
    #[error("the migration ended")]
    Ended,
    /// Closed for good: setting up postcopy failed.
    #[error("setting up postcopy failed")]
    SetupFailed,
}

/// Something that fetches one 4 KiB page from the source on the urgent channel (the destination
/// driver implements it on top of the transport; the postcopy fault service uses it).
pub trait PageFetcher: Send + Sync {
    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError>;

    /// While the channel is down (a postcopy-paused outage), wait up to `timeout` for it to
    /// come back; returns whether it is up. A fetcher that cannot tell returns false at once
    /// (the caller then waits its own way).
    fn wait_connected(&self, timeout: Duration) -> bool {
        let _ = timeout;
        false
    }

    /// [`PageFetcher::fetch`], noting when the request was written, when the reply was read and
    /// the source's own time for it (the phases of a remote fault). A fetcher that cannot tell
    /// leaves `times` as it is.
    fn fetch_timed(
        &self,
        gpa: u64,
        buf: &mut [u8; 4096],
        times: &mut FetchTimes,
    ) -> Result<(), FetchError> {
        let _ = times;
        self.fetch(gpa, buf)
    }
}

/// When one remote fetch passed its steps (see [`PageFetcher::fetch_timed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchTimes {
    /// The request was written to the urgent channel.
    pub request_written: Option<std::time::Instant>,
    /// The reply was read off the channel.
    pub reply_read: Option<std::time::Instant>,
    /// The source's time from reading the request to writing the reply, nanoseconds.
    pub source_ns: u64,
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
                || !r.gpa.is_multiple_of(PAGE_SIZE)
                || !r.size.is_multiple_of(PAGE_SIZE)
                || r.gpa.checked_add(r.size).is_none()
            {
                return Err(LayoutError::BadRegion {
                    slot: r.slot,
                    gpa: r.gpa,
                    size: r.size,
                });
            }
        }
        regions.sort_by_key(|r| r.gpa);
        for pair in regions.windows(2) {
            if pair[0].gpa + pair[0].size > pair[1].gpa {
                return Err(LayoutError::Overlap {
                    first: pair[0].gpa,
                    second: pair[1].gpa,
                });
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
        Ok(RamLayout {
            regions,
            first_page,
            total_pages,
        })
    }

    /// The layout of a VM's RAM regions.
    pub fn from_regions(regions: &[RamRegion]) -> Result<Self, LayoutError> {
        Self::new(
            regions
                .iter()
                .map(|r| RegionLayout {
                    slot: r.slot,
                    gpa: r.gpa,
                    size: r.size,
                })
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
        if !gpa.is_multiple_of(PAGE_SIZE) {
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

    /// The maximal runs of the pages in `set` (global page indexes of this layout), each inside
    /// one region and at most `max` pages long, in order, as (gpa of the first page, count):
    /// what run-carrying frames (Discard, ReceivedMap) name.
    pub fn runs(&self, set: &PageSet, max: u32) -> Vec<(u64, u32)> {
        let max = u64::from(max.max(1));
        let mut out: Vec<(u64, u32)> = Vec::new();
        for (r, &first) in self.regions.iter().zip(&self.first_page) {
            for (start, count) in set.runs(true, first, first + r.size / PAGE_SIZE) {
                let mut gpa = r.gpa + (start - first) * PAGE_SIZE;
                let mut left = count;
                while left > 0 {
                    let n = left.min(max);
                    // n <= max, which came from a u32.
                    out.push((gpa, n as u32));
                    gpa += n * PAGE_SIZE;
                    left -= n;
                }
            }
        }
        out
    }
}

/// The maximal runs `[start, end)` of indices in `[from, to)` for which `pred` holds, in order:
/// the one loop that finds runs over a predicate (a page set has its own, word by word, in
/// [`PageSet::runs`]).
pub fn runs_where(
    from: u64,
    to: u64,
    mut pred: impl FnMut(u64) -> bool,
) -> impl Iterator<Item = (u64, u64)> {
    let mut at = from;
    std::iter::from_fn(move || {
        while at < to && !pred(at) {
            at += 1;
        }
        if at >= to {
            return None;
        }
        let start = at;
        while at < to && pred(at) {
            at += 1;
        }
        Some((start, at))
    })
}

/// A set of pages of a [`RamLayout`], by global page index (which pages a side holds or must
/// send). Also what a postcopy recovery would exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    bits: Vec<u64>,
    len: u64,
}

impl PageSet {
    /// An empty set over `len` pages.
    pub fn new(len: u64) -> Self {
        PageSet {
            bits: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// A set holding all `len` pages.
    pub fn full(len: u64) -> Self {
        let mut s = Self::new(len);
        s.insert_range(0, len);
        s
    }

    /// Number of pages the set ranges over.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set ranges over no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Insert page `i`; returns whether it was absent.
    pub fn insert(&mut self, i: u64) -> bool {
        let w = &mut self.bits[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }

    pub fn remove(&mut self, i: u64) {
        self.bits[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// Insert pages `start..start+count`.
    pub fn insert_range(&mut self, start: u64, count: u64) {
        for i in start..start + count {
            self.insert(i);
        }
    }

    /// OR a per-slot dirty bitmap (bit i = page i of the region) in at global page `first`.
    pub fn or_bitmap(&mut self, first: u64, pages: u64, bitmap: &[u64]) {
        for (wi, &word) in bitmap.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let p = wi as u64 * 64 + bit;
                if p < pages {
                    self.insert(first + p);
                }
            }
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(wi, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
    }

    /// The first page in `from..to` whose membership is `member`.
    fn next_where(&self, member: bool, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let word = self.bits[(i / 64) as usize];
            let word = if member { word } else { !word };
            let rest = word & (u64::MAX << (i % 64));
            if rest != 0 {
                let p = i / 64 * 64 + u64::from(rest.trailing_zeros());
                return (p < to).then_some(p);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The maximal runs of pages in `from..to` (cut at the set's end) whose membership is
    /// `member`, in order, as (first page, count).
    pub fn runs(&self, member: bool, from: u64, to: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let to = to.min(self.len);
        let mut at = from;
        std::iter::from_fn(move || {
            let start = self.next_where(member, at, to)?;
            let end = self.next_where(!member, start, to).unwrap_or(to);
            at = end;
            Some((start, end - start))
        })
    }

    /// The set as the raw bitmap (bit i of word i/64 = page i).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }
}

/// A [`PageSet`] that several threads update (e.g. pages already sent during postcopy).
#[derive(Debug)]
pub struct AtomicPageSet {
    bits: Vec<std::sync::atomic::AtomicU64>,
    len: u64,
}

impl AtomicPageSet {
    /// A set initialised from `set`.
    pub fn from_set(set: &PageSet) -> Self {
        AtomicPageSet {
            bits: set
                .words()
                .iter()
                .map(|&w| std::sync::atomic::AtomicU64::new(w))
                .collect(),
            len: set.len(),
        }
    }

    /// An empty set over `len` pages.
    pub fn new(len: u64) -> Self {
        Self::from_set(&PageSet::new(len))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, i: u64) -> bool {
        use std::sync::atomic::Ordering;
        i < self.len && self.bits[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Insert page `i`; returns whether this call inserted it (it was absent). A page outside
    /// the set is never inserted (false).
    pub fn insert(&self, i: u64) -> bool {
        use std::sync::atomic::Ordering;
        if i >= self.len {
            return false;
        }
        let old = self.bits[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel);
        old & (1 << (i % 64)) == 0
    }

    /// First page not in the set at or after `from`, wrapping around to 0; None if full.
    pub fn next_absent(&self, from: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        if self.len == 0 {
            return None;
        }
        let from = from % self.len;
        let words = self.bits.len();
        let start_word = (from / 64) as usize;
        for step in 0..=words {
            let wi = (start_word + step) % words;
            let mut absent = !self.bits[wi].load(Ordering::Acquire);
            if step == 0 {
                absent &= u64::MAX << (from % 64);
            }
            while absent != 0 {
                let p = wi as u64 * 64 + absent.trailing_zeros() as u64;
                if p < self.len {
                    return Some(p);
                }
                absent &= absent - 1;
            }
        }
        // The wrapped-around part of the first word.
        let wi = start_word;
        let absent = !self.bits[wi].load(Ordering::Acquire) & !(u64::MAX << (from % 64));
        (absent != 0).then(|| wi as u64 * 64 + absent.trailing_zeros() as u64)
    }

    /// Insert pages `[start, end)` (clamped to the set) word by word; returns how many were
    /// absent before.
    pub fn insert_range(&self, start: u64, end: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let end = end.min(self.len);
        let mut newly = 0u64;
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let prev = self.bits[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((mask & !prev).count_ones());
            i += n;
        }
        newly
    }

    /// How many pages of `[start, end)` are in the set.
    pub fn count_in(&self, start: u64, end: u64) -> u64 {
        (start..end.min(self.len))
            .filter(|&i| self.contains(i))
            .count() as u64
    }

    /// A plain copy of the set.
    pub fn snapshot(&self) -> PageSet {
        use std::sync::atomic::Ordering;
        let mut s = PageSet::new(self.len);
        for (d, w) in s.bits.iter_mut().zip(&self.bits) {
            *d = w.load(Ordering::Acquire);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_on_a_channel_that_is_down_says_why_with_the_reason_as_source() {
        use std::error::Error as _;
        let e = FetchError::Disconnected {
            gpa: 0x1000,
            reason: ChannelDown::WrongGpa {
                id: 3,
                got: 0x2000,
                requested: 0x1000,
            },
        };
        assert_eq!(
            e.to_string(),
            "urgent channel to the source is down (fetching gpa 0x1000): reply 3 carries gpa \
             0x2000, but gpa 0x1000 was requested"
        );
        let source = e.source().expect("the reason is the source");
        assert!(
            matches!(
                source.downcast_ref::<ChannelDown>(),
                Some(ChannelDown::WrongGpa { id: 3, .. })
            ),
            "{source:?}"
        );
        let wire = ChannelDown::Wire(Arc::new(crate::wire::WireError::Closed { during: "x" }));
        assert_eq!(wire.to_string(), "x: peer closed the connection");
        assert_eq!(
            ChannelDown::NotConnected.to_string(),
            "the urgent channel is not connected yet"
        );
    }

    #[test]
    fn runs_split_at_region_ends_and_at_the_limit() {
        let l = RamLayout::new(vec![
            RegionLayout {
                slot: 0,
                gpa: 0,
                size: 8 * PAGE_SIZE,
            },
            RegionLayout {
                slot: 1,
                gpa: 1 << 32,
                size: 8 * PAGE_SIZE,
            },
        ])
        .unwrap();
        let mut s = PageSet::new(16);
        s.insert_range(1, 2); // 1, 2
        s.insert_range(5, 6); // 5..8 in region 0, 8..11 in region 1
        s.insert(15);
        assert_eq!(
            l.runs(&s, 2),
            vec![
                (PAGE_SIZE, 2),
                (5 * PAGE_SIZE, 2),
                (7 * PAGE_SIZE, 1),
                (1 << 32, 2),
                ((1 << 32) + 2 * PAGE_SIZE, 1),
                ((1 << 32) + 7 * PAGE_SIZE, 1),
            ]
        );
        assert_eq!(
            l.runs(&s, 100),
            vec![
                (PAGE_SIZE, 2),
                (5 * PAGE_SIZE, 3),
                (1 << 32, 3),
                ((1 << 32) + 7 * PAGE_SIZE, 1),
            ]
        );
        assert!(l.runs(&PageSet::new(16), 4).is_empty());
    }

    #[test]
    fn runs_where_finds_maximal_runs_inside_the_bounds() {
        let holes = [true, true, false, true, false, false, true];
        let got: Vec<_> = runs_where(0, 7, |i| holes[i as usize]).collect();
        assert_eq!(got, vec![(0, 2), (3, 4), (6, 7)]);
        let got: Vec<_> = runs_where(1, 6, |i| holes[i as usize]).collect();
        assert_eq!(got, vec![(1, 2), (3, 4)]);
        assert_eq!(runs_where(4, 6, |i| holes[i as usize]).count(), 0);
        assert_eq!(runs_where(5, 5, |_| true).count(), 0);
    }

    #[test]
    fn page_set_runs_cross_words_and_stop_at_the_bounds() {
        let mut s = PageSet::new(200);
        s.insert_range(60, 10); // 60..70 across the first word boundary
        s.insert_range(128, 72); // 128..200, to the end
        s.insert(3);
        let present: Vec<_> = s.runs(true, 0, 200).collect();
        assert_eq!(present, vec![(3, 1), (60, 10), (128, 72)]);
        let absent: Vec<_> = s.runs(false, 0, 200).collect();
        assert_eq!(absent, vec![(0, 3), (4, 56), (70, 58)]);
        assert_eq!(
            s.runs(true, 62, 130).collect::<Vec<_>>(),
            vec![(62, 8), (128, 2)]
        );
        assert_eq!(
            s.runs(false, 130, 500).count(),
            0,
            "bits past the end are not pages"
        );
        assert_eq!(PageSet::new(0).runs(false, 0, 10).count(), 0);
    }

    #[test]
    fn page_sets() {
        let mut s = PageSet::new(130);
        s.insert_range(60, 10);
        assert_eq!(s.count(), 10);
        assert_eq!(s.iter().collect::<Vec<_>>(), (60..70).collect::<Vec<_>>());
        s.or_bitmap(128, 2, &[0b111]);
        assert_eq!(s.count(), 12, "bits past the region are ignored");
        let a = AtomicPageSet::from_set(&PageSet::full(130));
        assert_eq!(a.next_absent(5), None);
        let a = AtomicPageSet::new(130);
        assert_eq!(a.next_absent(129), Some(129));
        assert!(a.insert(129));
        assert!(!a.insert(129));
        assert_eq!(a.next_absent(129), Some(0));
        for i in 0..129 {
            a.insert(i);
        }
        a.snapshot();
        assert_eq!(a.next_absent(3), None);
        let b = AtomicPageSet::new(100);
        for i in 10..100 {
            b.insert(i);
        }
        assert_eq!(b.next_absent(50), Some(0));
        assert_eq!(b.next_absent(5), Some(5));
    }
}
