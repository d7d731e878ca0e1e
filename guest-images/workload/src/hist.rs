//! Log-linear latency histograms: 8 sub-buckets per power of two.
//!
//! Values 0..8 have a bucket each; above, a value v with highest set bit e falls in bucket
//! 8 + (e-3)*8 + (next three bits), whose lower bound is (8 + sub) << (e-3).
//! Each vCPU owns its histograms (plain relaxed loads/stores); vCPU 0 sums them after the
//! final barrier.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Number of buckets for the full u64 range.
pub const BUCKETS: usize = 8 + 61 * 8;

pub struct Hist {
    counts: [AtomicU64; BUCKETS],
    max: AtomicU64,
}

/// Bucket index of a value.
pub fn bucket(v: u64) -> usize {
    if v < 8 {
        return v as usize;
    }
    let e = 63 - u64::from(v.leading_zeros());
    let sub = (v >> (e - 3)) & 7;
    (8 + (e - 3) * 8 + sub) as usize
}

/// Lower bound of a bucket.
pub fn lower_bound(i: usize) -> u64 {
    if i < 8 {
        return i as u64;
    }
    let e = (i - 8) / 8;
    let sub = ((i - 8) % 8) as u64;
    (8 + sub) << e
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
