//! The order in which a vCPU visits the pages of its share in one pass.

use crate::cmdline::Pattern;
use crate::pattern::mix64;

/// Share-relative page numbers for one pass of one vCPU.
pub struct Order {
    pattern: Pattern,
    n: u64,
    key: u64,
    /// Feistel domain: 2^(2*half_bits) >= n.
    half_bits: u32,
    hot: u64,
}

impl Order {
    /// The order for pass `pass` (1-based) of a share of `n` pages. Pass 1 of hotset is
    /// sequential, so that every page is written once.
    pub fn new(pattern: Pattern, n: u64, seed: u64, vcpu: u64, pass: u64) -> Self {
        let pattern = if pattern == Pattern::Hotset && pass == 1 {
            Pattern::Sequential
        } else {
            pattern
        };
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let key = mix64(seed ^ mix64(vcpu.wrapping_mul(0x1_0000_0001) ^ mix64(pass)));
        Order {
            pattern,
            n,
            key,
            half_bits,
            hot: (n / 10).max(1),
        }
    }

    /// Accesses in the pass (every pattern visits as many pages as the share has).
    pub fn len(&self) -> u64 {
        self.n
    }

    /// The page visited at step `i` (< len).
    #[inline]
    pub fn page(&self, i: u64) -> u64 {
        match self.pattern {
            Pattern::Sequential => i,
            Pattern::Random => self.permute(i),
            Pattern::Hotset => {
                let r = mix64(self.key ^ i);
                if r % 100 < 90 {
                    (r >> 8) % self.hot
                } else {
                    (r >> 8) % self.n
                }
            }
        }
    }

    /// A keyed bijection of [0, n): a 4-round Feistel network on 2*half_bits bits,
    /// cycle-walked back into range.
    fn permute(&self, i: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let mut x = i;
        loop {
            let (mut l, mut r) = (x >> self.half_bits, x & mask);
            for round in 0..4u64 {
                let f = mix64(
                    r ^ self
                        .key
                        .wrapping_add(round.wrapping_mul(0xA076_1D64_78BD_642F)),
                ) & mask;
                (l, r) = (r, l ^ f);
            }
            x = (l << self.half_bits) | r;
            if x < self.n {
                return x;
            }
        }
    }
}
