//! Latency histograms: construction, percentile summaries, merging, convolution (sum of two
//! independent latencies) and V2 serialization (binary, or base64 text for files and JSON).
//!
//! Every histogram the harness records holds nanoseconds.

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest value a histogram tracks: 100 s in nanoseconds (larger values are clamped).
pub const MAX_TRACKED_NS: u64 = 100_000_000_000;
/// Significant decimal digits kept by every histogram.
pub const SIGFIG: u8 = 3;

/// Errors from histogram handling.
#[derive(Debug, thiserror::Error)]
pub enum HistogramError {
    #[error("creating a histogram (1..={max} ns, {sigfig} significant digits) failed: {source}")]
    Create {
        max: u64,
        sigfig: u8,
        source: hdrhistogram::CreationError,
    },
    #[error("merging histograms failed: {0}")]
    Merge(#[from] hdrhistogram::AdditionError),
    #[error("serializing a histogram ({count} samples) failed: {source}")]
    Serialize {
        count: u64,
        source: hdrhistogram::serialization::V2SerializeError,
    },
    #[error("decoding base64 histogram text ({len} characters) failed: {source}")]
    Base64 {
        len: usize,
        source: base64::DecodeError,
    },
    #[error("deserializing a V2 histogram ({len} bytes) failed: {source}")]
    Deserialize {
        len: usize,
        source: hdrhistogram::serialization::DeserializeError,
    },
}

/// A latency histogram in nanoseconds.
pub type LatencyHistogram = Histogram<u64>;

/// A new empty histogram covering 1 ns ..= [`MAX_TRACKED_NS`].
pub fn new_histogram() -> Result<LatencyHistogram, HistogramError> {
    Histogram::new_with_bounds(1, MAX_TRACKED_NS, SIGFIG).map_err(|source| HistogramError::Create {
        max: MAX_TRACKED_NS,
        sigfig: SIGFIG,
        source,
    })
}

/// Builds a histogram from raw nanosecond samples (values above the range are clamped).
pub fn from_samples(samples: &[u64]) -> Result<LatencyHistogram, HistogramError> {
    let mut h = new_histogram()?;
    for &s in samples {
        h.saturating_record(s.max(1));
    }
    Ok(h)
}

/// Percentile summary of a latency distribution, in the unit named by the field holding it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Percentiles {
    /// Summary of a nanosecond histogram, expressed in units of `divisor` ns
    /// (1.0 = ns, 1e3 = us, 1e6 = ms). An empty histogram gives all zeros and count 0.
    pub fn of(h: &LatencyHistogram, divisor: f64) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / divisor;
        Self {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / divisor,
            count: h.len(),
        }
    }

    /// Summary in microseconds.
    pub fn us(h: &LatencyHistogram) -> Self {
        Self::of(h, 1e3)
    }
}

/// Short summary (median, maximum, count) used for collapse stalls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShortSummary {
    pub p50: f64,
    pub max: f64,
    pub count: u64,
}

impl ShortSummary {
    /// Summary of a nanosecond histogram in microseconds.
    pub fn us(h: &LatencyHistogram) -> Self {
        let p = Percentiles::us(h);
        Self {
            p50: p.p50,
            max: p.max,
            count: p.count,
        }
    }
}

/// Adds every histogram of `parts` into a new one.
pub fn merge<'a, I>(parts: I) -> Result<LatencyHistogram, HistogramError>
where
    I: IntoIterator<Item = &'a LatencyHistogram>,
{
    let mut total = new_histogram()?;
    for p in parts {
        total.add(p)?;
    }
    Ok(total)
}

/// The `n` highest samples of `h` (all of them if it holds no more than `n`), at the values
/// `h` recorded them.
pub fn top_n(h: &LatencyHistogram, n: u64) -> Result<LatencyHistogram, HistogramError> {
    let mut out = new_histogram()?;
    let mut left = n;
    let recorded: Vec<(u64, u64)> = h
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    for (value, count) in recorded.into_iter().rev() {
        if left == 0 {
            break;
        }
        let take = count.min(left);
        out.saturating_record_n(value.max(1), take);
        left -= take;
    }
    Ok(out)
}

/// `h` split into (everything but its `n` highest samples, those `n` highest samples), at the
/// values `h` recorded them; `n` larger than `h` puts everything in the second part.
pub fn split_top_n(
    h: &LatencyHistogram,
    n: u64,
) -> Result<(LatencyHistogram, LatencyHistogram), HistogramError> {
    let (mut rest, mut top) = (new_histogram()?, new_histogram()?);
    let mut left = n;
    let recorded: Vec<(u64, u64)> = h
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    for (value, count) in recorded.into_iter().rev() {
        let take = count.min(left);
        if take > 0 {
            top.saturating_record_n(value.max(1), take);
            left -= take;
        }
        if count > take {
            rest.saturating_record_n(value.max(1), count - take);
        }
    }
    Ok((rest, top))
}

/// Distribution of `A + B` for independent `A ~ a` and `B ~ b`: every pair of recorded buckets
/// (values va, vb with counts ca, cb) contributes ca*cb samples at va+vb. The result's count is
/// the product of the counts, so percentiles are exact up to the histograms' bucket precision.
/// Empty inputs give an empty result.
pub fn convolve(
    a: &LatencyHistogram,
    b: &LatencyHistogram,
) -> Result<LatencyHistogram, HistogramError> {
    let mut out = new_histogram()?;
    let bs: Vec<(u64, u64)> = b
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    for va in a.iter_recorded() {
        let (x, cx) = (va.value_iterated_to(), va.count_at_value());
        for &(y, cy) in &bs {
            // Saturating: a clamped value is still "slower than the tracked range".
            let v = x.saturating_add(y).min(MAX_TRACKED_NS);
            out.saturating_record_n(v, cx.saturating_mul(cy));
        }
    }
    Ok(out)
}

/// V2 binary serialization (uncompressed).
pub fn to_v2_bytes(h: &LatencyHistogram) -> Result<Vec<u8>, HistogramError> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|source| HistogramError::Serialize {
            count: h.len(),
            source,
        })?;
    Ok(buf)
}

/// V2 serialization as standard base64 text.
pub fn to_base64(h: &LatencyHistogram) -> Result<String, HistogramError> {
    Ok(base64::engine::general_purpose::STANDARD.encode(to_v2_bytes(h)?))
}

/// Reads a V2 (plain or deflate-compressed) serialized histogram.
pub fn from_v2_bytes(bytes: &[u8]) -> Result<LatencyHistogram, HistogramError> {
    let mut cursor = std::io::Cursor::new(bytes);
    Deserializer::new()
        .deserialize(&mut cursor)
        .map_err(|source| HistogramError::Deserialize {
            len: bytes.len(),
            source,
        })
}

/// Reads base64 text of a V2 serialized histogram (surrounding whitespace is ignored).
pub fn from_base64(text: &str) -> Result<LatencyHistogram, HistogramError> {
    let t = text.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(t)
        .map_err(|source| HistogramError::Base64 {
            len: t.len(),
            source,
        })?;
    from_v2_bytes(&bytes)
}

/// Sub-buckets per power of two of the workload guest's log-linear histograms
/// (`guest-images/workload/src/hist.rs`: `1 << SUB_BITS`; a test here reads it from there).
/// The guest states it on every `WORKLOAD HIST` line (`sub=32`).
pub const GUEST_SUB_BUCKETS: u64 = 32;
/// The scheme of guests that print no `sub=` (before it was stated): 8 per power of two.
pub const LEGACY_GUEST_SUB_BUCKETS: u64 = 8;

/// Width of the bucket whose lower bound is `lo` in the guest's log-linear scheme with `sub`
/// sub-buckets per power of two (a power of two itself): values below `sub` have a bucket
/// each, then every power of two is split into `sub` equal buckets.
pub fn guest_bucket_width_in(lo: u64, sub: u64) -> u64 {
    let sub = sub.max(1).next_power_of_two();
    if lo < sub {
        1
    } else {
        let e = 63 - lo.leading_zeros();
        1u64 << (e - sub.trailing_zeros())
    }
}

/// [`guest_bucket_width_in`] of the current scheme ([`GUEST_SUB_BUCKETS`]).
pub fn guest_bucket_width(lo: u64) -> u64 {
    guest_bucket_width_in(lo, GUEST_SUB_BUCKETS)
}

/// Builds a histogram from the workload guest's bucketed histogram (`(lower bound, count)`
/// pairs; only non-empty buckets are listed) in the current scheme ([`GUEST_SUB_BUCKETS`]).
/// See [`from_guest_buckets`].
pub fn from_buckets(buckets: &[(u64, u64)]) -> Result<LatencyHistogram, HistogramError> {
    from_guest_buckets(buckets, GUEST_SUB_BUCKETS)
}

/// Builds a histogram from guest buckets of the scheme with `sub` sub-buckets per power of
/// two. Each bucket's samples are recorded at the bucket's midpoint
/// ([`guest_bucket_width_in`]), so a percentile read from the result is off by at most half a
/// bucket width: 1/(2*sub) of the value (1.6% with 32, 6% with the legacy 8).
pub fn from_guest_buckets(
    buckets: &[(u64, u64)],
    sub: u64,
) -> Result<LatencyHistogram, HistogramError> {
    let mut h = new_histogram()?;
    for &(lo, count) in buckets {
        if count == 0 {
            continue;
        }
        let v = lo.saturating_add(guest_bucket_width_in(lo, sub) / 2);
        h.saturating_record_n(v.max(1), count);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_uniform_samples() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let h = from_samples(&samples).unwrap();
        let p = Percentiles::us(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() <= 1.0, "p50 {}", p.p50);
        assert!((p.p99 - 990.0).abs() <= 1.0, "p99 {}", p.p99);
        assert!((p.max - 1000.0).abs() <= 1.0, "max {}", p.max);
        assert_eq!(Percentiles::us(&new_histogram().unwrap()).count, 0);
    }

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let a = from_samples(&[10, 20, 30]).unwrap();
        let b = from_samples(&[5_000, 6_000]).unwrap();
        let m = merge([&a, &b]).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m.min(), 10);
        assert!(m.max() >= 6_000 && m.max() < 6_010);
        assert_eq!(m.value_at_quantile(0.5), 30);
    }

    #[test]
    fn convolution_is_distribution_of_sums() {
        // a in {10, 20} us, b in {100, 300} us, equally likely: sums 110, 120, 310, 320.
        let a = from_samples(&[10_000, 20_000]).unwrap();
        let b = from_samples(&[100_000, 300_000]).unwrap();
        let c = convolve(&a, &b).unwrap();
        assert_eq!(c.len(), 4);
        let p = Percentiles::us(&c);
        assert!((p.p50 - 120.0).abs() < 0.5, "p50 {}", p.p50);
        assert!((p.max - 320.0).abs() < 0.5, "max {}", p.max);
        assert!((c.min() as f64 / 1e3 - 110.0).abs() < 0.5);
    }

    #[test]
    fn v2_base64_round_trip() {
        let h = from_samples(&[1, 2, 3, 1_000, 1_000_000, 50_000_000]).unwrap();
        let text = to_base64(&h).unwrap();
        let back = from_base64(&format!("  {text}\n")).unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(from_base64("not base64!").is_err());
        assert!(from_v2_bytes(&[0, 1, 2, 3]).is_err());
    }

    #[test]
    fn buckets_are_recorded_at_midpoints() {
        // The legacy scheme: 8 per power of two.
        let w = |lo| guest_bucket_width_in(lo, LEGACY_GUEST_SUB_BUCKETS);
        assert_eq!((w(5), w(8), w(16), w(1024), w(1920)), (1, 1, 2, 128, 128));
        let h = from_guest_buckets(&[(1024, 3), (2048, 0), (4096, 1)], 8).unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h.value_at_quantile(0.5), h.lowest_equivalent(1088));
        assert_eq!(h.max(), h.highest_equivalent(4096 + 256));
        // The current scheme: 32 per power of two.
        assert_eq!(guest_bucket_width(31), 1);
        assert_eq!(guest_bucket_width(32), 1);
        assert_eq!(guest_bucket_width(64), 2);
        assert_eq!(guest_bucket_width(1024), 32);
        assert_eq!(guest_bucket_width(2016), 32);
        let h = from_buckets(&[(1024, 3), (4096, 1)]).unwrap();
        assert_eq!(h.value_at_quantile(0.5), h.lowest_equivalent(1024 + 16));
        assert_eq!(h.max(), h.highest_equivalent(4096 + 64));
    }

    /// The guest's bucket index and lower bound (`guest-images/workload/src/hist.rs`), written
    /// again from its description, for `sub_bits`.
    fn guest_bucket(v: u64, sub_bits: u32) -> u64 {
        let sub = 1u64 << sub_bits;
        if v < sub {
            return v;
        }
        let shift = u64::from(63 - v.leading_zeros() - sub_bits);
        sub + shift * sub + ((v >> shift) & (sub - 1))
    }

    fn guest_lower_bound(i: u64, sub_bits: u32) -> u64 {
        let sub = 1u64 << sub_bits;
        if i < sub {
            return i;
        }
        (sub + (i - sub) % sub) << ((i - sub) / sub)
    }

    #[test]
    fn the_guest_and_the_harness_agree_on_the_bucket_scheme() {
        // The guest's constant, read from its source: the scheme is defined there once.
        let src = include_str!("../../guest-images/workload/src/hist.rs");
        let line = src
            .lines()
            .find(|l| l.starts_with("pub const SUB_BITS: u32 = "))
            .expect("hist.rs defines SUB_BITS");
        let bits: u32 = line
            .trim_start_matches("pub const SUB_BITS: u32 = ")
            .trim_end_matches(';')
            .parse()
            .expect("SUB_BITS is a number");
        assert_eq!(1u64 << bits, GUEST_SUB_BUCKETS, "guest hist.rs: {line}");
        // Every bucket's width is the distance to the next lower bound, and every value falls
        // in the bucket [lo, lo + width) that the harness decodes, for both schemes.
        for (bits, sub) in [(bits, GUEST_SUB_BUCKETS), (3, LEGACY_GUEST_SUB_BUCKETS)] {
            for i in 0..(sub + 40 * sub) {
                let lo = guest_lower_bound(i, bits);
                let next = guest_lower_bound(i + 1, bits);
                assert_eq!(
                    guest_bucket_width_in(lo, sub),
                    next - lo,
                    "bucket {i} lo {lo}"
                );
                assert_eq!(guest_bucket(lo, bits), i);
                assert_eq!(guest_bucket(next - 1, bits), i);
            }
            // Relative width: at most 1/sub above the exact range.
            let lo = guest_lower_bound(sub + 20 * sub, bits);
            assert!(guest_bucket_width_in(lo, sub) as f64 / lo as f64 <= 1.0 / sub as f64);
        }
    }

    #[test]
    fn top_n_keeps_the_slowest_samples() {
        let h = from_samples(&[3_000, 4_000, 5_000, 60_000, 70_000, 80_000]).unwrap();
        let t = top_n(&h, 3).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.min() >= 59_000, "{}", t.min());
        assert_eq!(top_n(&h, 100).unwrap().len(), 6);
        assert_eq!(top_n(&h, 0).unwrap().len(), 0);
    }

    #[test]
    fn split_top_n_separates_the_slowest_samples() {
        let h = from_samples(&[3_000, 4_000, 4_000, 900_000_000, 950_000_000]).unwrap();
        let (rest, top) = split_top_n(&h, 2).unwrap();
        assert_eq!((rest.len(), top.len()), (3, 2));
        assert!(rest.max() < 5_000, "{}", rest.max());
        assert!(top.min() >= 899_000_000, "{}", top.min());
        // Ties are split by count, not by value.
        let (rest, top) = split_top_n(&h, 4).unwrap();
        assert_eq!((rest.len(), top.len()), (1, 4));
        let (rest, top) = split_top_n(&h, 0).unwrap();
        assert_eq!((rest.len(), top.len()), (5, 0));
        let (rest, top) = split_top_n(&h, 10).unwrap();
        assert_eq!((rest.len(), top.len()), (0, 5));
    }
}
