//! One summary of a latency distribution, shared by every report that prints one (the fault
//! phases in `--stats-json`, `vmm fault-limit --json`).

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize};

/// Count and percentiles of a latency distribution, in microseconds (all zero if empty).
///
/// Read leniently, as the harness reads reports of other peers and older VMMs with it: a
/// missing field is zero (`mean` is absent from reports written before it was added), and the
/// count may be written as a float.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencySummary {
    #[serde(deserialize_with = "count_of")]
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// A count written as an integer or a float (a whole, non-negative number either way).
fn count_of<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 {
        Ok(v.round() as u64)
    } else {
        Err(serde::de::Error::custom(format!("bad count {v}")))
    }
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

    #[test]
    fn reads_counts_as_floats_and_missing_fields_as_zero() {
        let s: LatencySummary = serde_json::from_str(r#"{"count":1000.0,"p50":1.5}"#).unwrap();
        assert_eq!(
            s,
            LatencySummary {
                count: 1000,
                p50: 1.5,
                ..LatencySummary::default()
            }
        );
        assert!(serde_json::from_str::<LatencySummary>(r#"{"count":-1}"#).is_err());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"count":1000,"p50":1.5,"p90":0.0,"p99":0.0,"p999":0.0,"max":0.0,"mean":0.0}"#
        );
    }
}
