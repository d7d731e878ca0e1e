//! Log-linear latency histograms: [`SUB_BUCKETS`] (32) sub-buckets per power of two, so a
//! bucket is at most 1/32 (3.1%) of its lower bound wide.
//!
//! Values below [`SUB_BUCKETS`] have a bucket each; above, a value v with highest set bit e
//! falls in bucket `SUB + (e - SUB_BITS) * SUB + (the SUB_BITS bits below the top one)`, whose
//! lower bound is `(SUB + sub) << (e - SUB_BITS)` and width `1 << (e - SUB_BITS)`.
//! Every `WORKLOAD HIST` line states the scheme (`sub=32`); the harness decodes it with the
//! same formula (`harness/src/histogram.rs`, whose test reads [`SUB_BITS`] from this file).
//! Each vCPU owns its histograms (plain relaxed loads/stores); vCPU 0 sums them after the
//! final barrier.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// log2 of the sub-buckets per power of two.
pub const SUB_BITS: u32 = 5;
/// Sub-buckets per power of two.
pub const SUB_BUCKETS: u64 = 1 << SUB_BITS;

/// Number of buckets for the full u64 range.
pub const BUCKETS: usize = (SUB_BUCKETS + (64 - SUB_BITS as u64) * SUB_BUCKETS) as usize;

pub struct Hist {
    counts: [AtomicU64; BUCKETS],
    max: AtomicU64,
}

/// Bucket index of a value.
pub fn bucket(v: u64) -> usize {
    if v < SUB_BUCKETS {
        return v as usize;
    }
    let e = u64::from(63 - v.leading_zeros());
    let shift = e - u64::from(SUB_BITS);
    let sub = (v >> shift) & (SUB_BUCKETS - 1);
    (SUB_BUCKETS + shift * SUB_BUCKETS + sub) as usize
}

/// Lower bound of a bucket.
pub fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB_BUCKETS {
        return i;
    }
    let shift = (i - SUB_BUCKETS) / SUB_BUCKETS;
    let sub = (i - SUB_BUCKETS) % SUB_BUCKETS;
    (SUB_BUCKETS + sub) << shift
}

impl Hist {
    pub const fn new() -> Self {
        Hist {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            max: AtomicU64::new(0),
        }
    }

    /// Records one value (only the owning vCPU calls this).
    #[inline]
    pub fn record(&self, v: u64) {
        let c = &self.counts[bucket(v)];
        c.store(c.load(Relaxed) + 1, Relaxed);
        if v > self.max.load(Relaxed) {
            self.max.store(v, Relaxed);
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&self, other: &Hist) {
        for (a, b) in self.counts.iter().zip(other.counts.iter()) {
            a.store(a.load(Relaxed) + b.load(Relaxed), Relaxed);
        }
        let m = other.max.load(Relaxed);
        if m > self.max.load(Relaxed) {
            self.max.store(m, Relaxed);
        }
    }

    /// Empties the histogram (only when no vCPU is recording into it).
    pub fn clear(&self) {
        for c in &self.counts {
            c.store(0, Relaxed);
        }
        self.max.store(0, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// Lower bound of the bucket holding the value at `per_mille`/1000 of the count.
    pub fn percentile(&self, per_mille: u64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = (n * per_mille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= rank {
                return lower_bound(i);
            }
        }
        self.max()
    }

    /// Non-empty buckets as (lower bound, count).
    pub fn nonempty(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| (lower_bound(i), c.load(Relaxed)))
            .filter(|&(_, c)| c != 0)
    }
}
