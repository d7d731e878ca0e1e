//! Every remote fault timed by phase: one HdrHistogram per phase, and a preallocated record
//! per fault (no allocation on the fault path) from which the slowest faults are reported with
//! the phase that took their time.
//!
//! The phases of one remote fault, back to back (they add up to its total):
//! - `uffd_to_read`: the reader woke on the userfaultfd → a worker holds the fault (the event
//!   read and the hand-off to the worker);
//! - `request_written`: → the page request was written to the urgent channel;
//! - `source_reply`: the source's own time, request read → reply written (echoed in the
//!   reply);
//! - `reply_read`: request written → reply read off the channel, less the source's time (the
//!   network both ways and the reader's wake-up);
//! - `stored`: → the page is in its final place (hand-off to the waiting worker, copies,
//!   for anon the UFFDIO_COPY);
//! - `installed`: → UFFDIO_CONTINUE / zero page / wake done (the vCPU can run).
//!
//! Faults served locally, faults that joined another, and faults whose fetch failed (an
//! outage) are not remote faults in this sense and are not recorded here.

use crate::sync::MutexExt;
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The phase names, in order (the keys of `fault_phase_us`).
pub const PHASES: [&str; 6] = [
    "uffd_to_read",
    "request_written",
    "source_reply",
    "reply_read",
    "stored",
    "installed",
];
const N: usize = PHASES.len();

/// Per-fault records kept (the first ones; 56 bytes each, allocated once with the engine).
pub const MAX_PHASE_RECORDS: usize = 1 << 16;
/// Most slow faults reported.
pub const MAX_SLOW_FAULTS: usize = 200;
/// Histogram range: 1 ns .. 1 hour, 3 significant digits.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// When one remote fault passed each step.
#[derive(Clone, Copy, Debug)]
pub struct FaultStamps {
    /// The reader woke on the userfaultfd.
    pub woke: Instant,
    /// A worker took the fault.
    pub started: Instant,
    pub request_written: Instant,
    pub reply_read: Instant,
    /// The source's own time, nanoseconds.
    pub source_ns: u64,
    pub stored: Instant,
    pub installed: Instant,
}

impl FaultStamps {
    /// Phase durations in nanoseconds, in [`PHASES`] order.
    pub fn phases_ns(&self) -> [u64; N] {
        let d = |a: Instant, b: Instant| b.saturating_duration_since(a).as_nanos() as u64;
        let round_trip = d(self.request_written, self.reply_read);
        let source = self.source_ns.min(round_trip);
        [
            d(self.woke, self.started),
            d(self.started, self.request_written),
            source,
            round_trip - source,
            d(self.reply_read, self.stored),
            d(self.stored, self.installed),
        ]
    }
}

/// One phase's distribution, microseconds.
pub type PhaseSummary = crate::latency::LatencySummary;

/// `fault_phase_us`: every phase's distribution, keyed by [`PHASES`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultPhaseSummary {
    pub uffd_to_read: PhaseSummary,
    pub request_written: PhaseSummary,
    pub source_reply: PhaseSummary,
    pub reply_read: PhaseSummary,
    pub stored: PhaseSummary,
    pub installed: PhaseSummary,
}

/// One fault above the p99 of the total, and where its time went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlowFault {
    pub total_us: f64,
    pub phases_us: PhaseTimes,
}

/// One fault's phases, microseconds, keyed by [`PHASES`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTimes {
    pub uffd_to_read: f64,
    pub request_written: f64,
    pub source_reply: f64,
    pub reply_read: f64,
    pub stored: f64,
    pub installed: f64,
}

impl PhaseTimes {
    fn from_ns(ns: &[u64; N]) -> Self {
        let us = |i: usize| ns[i] as f64 / 1e3;
        PhaseTimes {
            uffd_to_read: us(0),
            request_written: us(1),
            source_reply: us(2),
            reply_read: us(3),
            stored: us(4),
            installed: us(5),
        }
    }
}

struct Inner {
    phases: Vec<Histogram<u64>>,
    total: Histogram<u64>,
    /// Per fault: its phases, ns (capacity MAX_PHASE_RECORDS, never grown).
    records: Vec<[u64; N]>,
}

/// The phase recorder of one engine.
pub struct FaultPhases {
    inner: Mutex<Option<Inner>>,
}

impl std::fmt::Debug for FaultPhases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPhases").finish_non_exhaustive()
    }
}

impl Default for FaultPhases {
    fn default() -> Self {
        Self::new()
    }
}

fn hist() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).ok()
}

impl FaultPhases {
    pub fn new() -> Self {
        let inner = (|| {
            Some(Inner {
                phases: (0..N).map(|_| hist()).collect::<Option<Vec<_>>>()?,
                total: hist()?,
                records: Vec::with_capacity(MAX_PHASE_RECORDS),
            })
        })();
        if inner.is_none() {
            tracing::warn!("no fault phase histograms (bad bounds): phases are not recorded");
        }
        FaultPhases {
            inner: Mutex::new(inner),
        }
    }

    /// Record one remote fault. No allocation: the histograms and the record buffer exist.
    pub fn record(&self, stamps: &FaultStamps) {
        let ns = stamps.phases_ns();
        let total: u64 = ns.iter().sum();
        let mut g = self.inner.lock_unpoisoned();
        let Some(inner) = g.as_mut() else { return };
        for (h, v) in inner.phases.iter_mut().zip(ns) {
            h.saturating_record(v.max(1));
        }
        inner.total.saturating_record(total.max(1));
        if inner.records.len() < inner.records.capacity() {
            inner.records.push(ns);
        }
    }

    /// The distributions and the slowest faults: up to [`MAX_SLOW_FAULTS`] of the kept
    /// records whose total is above the p99 of all totals, slowest first.
    pub fn summary(&self) -> (FaultPhaseSummary, Vec<SlowFault>) {
        let g = self.inner.lock_unpoisoned();
        let Some(inner) = g.as_ref() else {
            return Default::default();
        };
        let s = PhaseSummary::of_ns;
        let p = &inner.phases;
        let summary = FaultPhaseSummary {
            uffd_to_read: s(&p[0]),
            request_written: s(&p[1]),
            source_reply: s(&p[2]),
            reply_read: s(&p[3]),
            stored: s(&p[4]),
            installed: s(&p[5]),
        };
        let mut slow: Vec<(u64, &[u64; N])> = Vec::new();
        if !inner.total.is_empty() {
            let p99 = inner.total.value_at_quantile(0.99);
            slow = inner
                .records
                .iter()
                .map(|r| (r.iter().sum::<u64>(), r))
                // The histogram's p99 is the bucket's upper value: compare equivalently.
                .filter(|(t, _)| inner.total.highest_equivalent(*t) > p99)
                .collect();
            slow.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
            slow.truncate(MAX_SLOW_FAULTS);
        }
        let slow = slow
            .into_iter()
            .map(|(t, r)| SlowFault {
                total_us: t as f64 / 1e3,
                phases_us: PhaseTimes::from_ns(r),
            })
            .collect();
        (summary, slow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stamps(base: Instant, us: [u64; 6]) -> FaultStamps {
        let at = |n: usize| base + Duration::from_micros(us[..n].iter().sum());
        // Phase 2 (source) lies inside the round trip 2+3.
        FaultStamps {
            woke: base,
            started: at(1),
            request_written: at(2),
            reply_read: at(4),
            source_ns: us[2] * 1000,
            stored: at(5),
            installed: at(6),
        }
    }

    #[test]
    fn phases_add_up_and_the_slow_faults_name_the_phase_that_took_the_time() {
        let fp = FaultPhases::new();
        let base = Instant::now();
        for _ in 0..990 {
            fp.record(&stamps(base, [5, 3, 10, 40, 2, 4]));
        }
        for i in 0..10 {
            fp.record(&stamps(base, [5, 3, 10, 40, 2, 4000 + i]));
        }
        let (sum, slow) = fp.summary();
        assert_eq!(sum.installed.count, 1000);
        assert!(
            (sum.reply_read.p50 - 40.0).abs() < 0.1,
            "{:?}",
            sum.reply_read
        );
        assert!((sum.source_reply.p99 - 10.0).abs() < 0.1);
        assert!(sum.installed.max >= 4009.0 && sum.installed.max < 4020.0);
        assert_eq!(slow.len(), 10, "{slow:?}");
        assert!(slow[0].total_us > slow[9].total_us);
        for f in &slow {
            assert!(f.phases_us.installed >= 4000.0);
            let p = &f.phases_us;
            let sum = p.uffd_to_read
                + p.request_written
                + p.source_reply
                + p.reply_read
                + p.stored
                + p.installed;
            assert!((sum - f.total_us).abs() < 0.01);
        }
        let json = serde_json::to_value(&sum).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        let mut want: Vec<String> = PHASES.iter().map(|s| s.to_string()).collect();
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn a_source_time_longer_than_the_round_trip_is_clamped() {
        let base = Instant::now();
        let mut s = stamps(base, [1, 1, 1, 1, 1, 1]);
        s.source_ns = 1_000_000_000;
        let ns = s.phases_ns();
        assert_eq!(ns[2], 2000);
        assert_eq!(ns[3], 0);
    }
}
