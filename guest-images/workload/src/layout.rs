//! Where the span and the per-page generation numbers live in guest RAM.
//!
//! Usable RAM = the e820 RAM ranges, clipped to [end of image and page tables, end of the
//! identity map), page-aligned. The generation array (one u32 per span page) takes the first
//! pages of usable RAM; the span is the next `pages` pages, possibly over several ranges
//! (e.g. below 3 GiB and above 4 GiB). Every vCPU computes the same layout independently.

use crate::bootparams::{BootParams, RamRange};

pub const PAGE: u64 = 4096;
/// Most RAM ranges kept.
const MAX_SEGMENTS: usize = 16;

/// A run of span pages at consecutive guest physical addresses.
#[derive(Clone, Copy, Default)]
struct Segment {
    /// Guest physical address of the run's first page.
    gpa: u64,
    /// Span index of the run's first page.
    first: u64,
    pages: u64,
}

pub struct Layout {
    segments: [Segment; MAX_SEGMENTS],
    nsegments: usize,
    /// Pages in the span.
    pub pages: u64,
    /// Guest physical address of the u32 generation array.
    pub gen_base: u64,
    /// Usable pages in total (span + generation array + unused).
    pub usable_pages: u64,
}

/// Not enough RAM for even one span page.
pub struct NoRam;

impl Layout {
    /// Builds the layout for a span of `span_bytes` (None = all usable RAM).
    pub fn new(
        bp: &BootParams,
        free_start: u64,
        mapped_limit: u64,
        span_bytes: Option<u64>,
    ) -> Result<Layout, NoRam> {
        let mut ranges = [RamRange::default(); MAX_SEGMENTS];
        let mut n = 0;
        bp.for_each_ram(|r| {
            let start = r.start.max(free_start).next_multiple_of(PAGE);
            let end = r.end.min(mapped_limit) & !(PAGE - 1);
            if start < end && n < MAX_SEGMENTS {
                ranges[n] = RamRange { start, end };
                n += 1;
            }
        });
        let ranges = &mut ranges[..n];
        ranges.sort_unstable_by_key(|r| r.start);
        // Drop overlaps, should the table have any.
        for i in 1..ranges.len() {
            let prev_end = ranges[i - 1].end;
            if ranges[i].start < prev_end {
                ranges[i].start = prev_end.min(ranges[i].end);
            }
        }
        let usable: u64 = ranges.iter().map(|r| (r.end - r.start) / PAGE).sum();
        // One u32 per page: usable/1024 pages always suffice (plus one for rounding).
        let gen_pages = usable.div_ceil(PAGE / 4) + 1;
        let Some(gi) = ranges
            .iter()
            .position(|r| (r.end - r.start) / PAGE > gen_pages)
        else {
            return Err(NoRam);
        };
        let gen_base = ranges[gi].start;
        ranges[gi].start += gen_pages * PAGE;
        let available = usable - gen_pages;
        let pages = match span_bytes {
            Some(b) => (b / PAGE).min(available),
            None => available,
        };
        if pages == 0 {
            return Err(NoRam);
        }
        let mut layout = Layout {
            segments: [Segment::default(); MAX_SEGMENTS],
            nsegments: 0,
            pages,
            gen_base,
            usable_pages: usable,
        };
        let mut first = 0;
        for r in ranges.iter() {
            if first == pages {
                break;
            }
            let take = ((r.end - r.start) / PAGE).min(pages - first);
            if take == 0 {
                continue;
            }
            layout.segments[layout.nsegments] = Segment {
                gpa: r.start,
                first,
                pages: take,
            };
            layout.nsegments += 1;
            first += take;
        }
        Ok(layout)
    }

    /// Guest physical address of span page `index` (< `pages`).
    #[inline]
    pub fn gpa(&self, index: u64) -> u64 {
        for s in &self.segments[..self.nsegments] {
            if index < s.first + s.pages {
                return s.gpa + (index - s.first) * PAGE;
            }
        }
        // Unreachable for index < pages; fall back to the last segment's arithmetic.
        let s = &self.segments[self.nsegments - 1];
        s.gpa + (index - s.first) * PAGE
    }

    /// The span pages of `vcpu` out of `vcpus`: [first, first + count).
    pub fn share(&self, vcpu: u64, vcpus: u64) -> (u64, u64) {
        let lo = (u128::from(self.pages) * u128::from(vcpu) / u128::from(vcpus)) as u64;
        let hi = (u128::from(self.pages) * u128::from(vcpu + 1) / u128::from(vcpus)) as u64;
        (lo, hi - lo)
    }
}
