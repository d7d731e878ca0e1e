//! One summary of a latency distribution, shared by every report that prints one (the fault
//! phases in `--stats-json`, `vmm fault-limit --json`).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Count and percentiles of a latency distribution, in microseconds (all zero if empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Absent from reports written before it was added.
    #[serde(default)]
    pub mean: f64,
}

impl LatencySummary {
    /// Summary of a histogram of nanoseconds.
    pub fn of_ns(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        LatencySummary {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_uniform_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1 << 40, 3).unwrap();
        for i in 1..=1000u64 {
            h.record(i * 1000).unwrap();
        }
        let s = LatencySummary::of_ns(&h);
        assert_eq!(s.count, 1000);
        assert!((499.0..=501.0).contains(&s.p50), "{s:?}");
        assert!((989.0..=991.0).contains(&s.p99), "{s:?}");
        assert!((999.0..=1001.0).contains(&s.max), "{s:?}");
        assert!((500.0..=501.0).contains(&s.mean), "{s:?}");
        assert_eq!(
            LatencySummary::of_ns(&Histogram::new(3).unwrap()),
            LatencySummary::default()
        );
    }
}
