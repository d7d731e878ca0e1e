//! Parsers for what the processes under test print: the workload guest's console lines, the
//! source's `vmm migrate --json` summary, and the destination's `--stats-json` file.

use crate::histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Errors from parsing process output.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: `WORKLOAD {kind}` lacks field `{field}`: {text:?}")]
    MissingField {
        line: usize,
        kind: &'static str,
        field: &'static str,
        text: String,
    },
    #[error("line {line}: field `{field}` has bad value {value:?}: {text:?}")]
    BadValue {
        line: usize,
        field: String,
        value: String,
        text: String,
    },
    #[error("no JSON object found in {what} ({len} bytes of output)")]
    NoJson { what: &'static str, len: usize },
    #[error("{what} is not the expected JSON object: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// `WORKLOAD start ...`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStart {
    pub vcpus: u64,
    pub span_bytes: u64,
    pub pages: u64,
    pub pattern: String,
    pub writes: String,
    pub passes: u64,
    pub seed: u64,
    /// 0 when the VMM gave none (times are then in TSC cycles).
    pub tsc_khz: u64,
    /// The guest's stall threshold (`stall_threshold_ns`), absent from older guests and in
    /// cycle units.
    #[serde(default)]
    pub stall_threshold_ns: Option<u64>,
}

/// `WORKLOAD pass ...`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadPass {
    pub n: u64,
    pub pages: u64,
    pub mismatches: u64,
    pub elapsed_ms: u64,
    pub slow_accesses: u64,
}

/// `WORKLOAD MISMATCH ...`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub gpa: u64,
    pub expected: u64,
    pub found: u64,
    pub vcpu: u64,
}

/// `WORKLOAD HIST ...`: a guest-side bucketed histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestHist {
    pub name: String,
    pub unit: String,
    /// `(lower bound, count)` per bucket, as printed.
    pub buckets: Vec<(u64, u64)>,
    /// `pass=K`: the slow accesses of pass K alone (printed right after its pass line). Absent
    /// on the final whole-run histograms.
    #[serde(default)]
    pub pass: Option<u64>,
    /// How many `WORKLOAD pass` lines preceded this line in the same output.
    pub after_passes: usize,
    /// The bucket scheme: sub-buckets per power of two (`sub=`; guests that do not state it
    /// use [`histogram::LEGACY_GUEST_SUB_BUCKETS`]).
    #[serde(default = "legacy_sub_buckets")]
    pub sub_buckets: u64,
    /// `threshold=`: the value the histogram starts at (slow accesses, stalls), if stated.
    #[serde(default)]
    pub threshold: Option<u64>,
}

fn legacy_sub_buckets() -> u64 {
    histogram::LEGACY_GUEST_SUB_BUCKETS
}

impl GuestHist {
    /// The histogram (each bucket at its midpoint, in the line's unit), decoded with the
    /// scheme the line states.
    pub fn histogram(&self) -> Result<histogram::LatencyHistogram, histogram::HistogramError> {
        histogram::from_guest_buckets(&self.buckets, self.sub_buckets)
    }
}

/// `WORKLOAD RESULT ...`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub ok: bool,
    pub passes: u64,
    pub pages: u64,
    pub mismatches: u64,
    pub ft_count: u64,
    /// 0 when the guest reported cycles (no tsc_khz).
    pub ft_p50_ns: u64,
    pub ft_p99_ns: u64,
    pub ft_max_ns: u64,
    /// Stalls of the whole run (iterations over the stall threshold) and the longest, ns;
    /// 0 from older guests.
    #[serde(default)]
    pub stall_count: u64,
    #[serde(default)]
    pub stall_max_ns: u64,
}

/// Everything recognised in one process's console output, in order of appearance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestOutput {
    pub start: Option<WorkloadStart>,
    pub passes: Vec<WorkloadPass>,
    pub mismatches: Vec<Mismatch>,
    pub hists: Vec<GuestHist>,
    pub result: Option<WorkloadResult>,
    /// `WORKLOAD` lines of a known kind that did not parse, with the reason. A line can be cut
    /// in two by the switchover (its start printed by the source, its end by the destination),
    /// so a transcript is not rejected for one.
    #[serde(default)]
    pub malformed: Vec<String>,
}

/// One recognised console line.
#[derive(Clone, Debug, PartialEq)]
pub enum GuestLine {
    Start(WorkloadStart),
    Pass(WorkloadPass),
    Mismatch(Mismatch),
    Hist(GuestHist),
    Result(WorkloadResult),
}

/// `key=value` fields of one line.
struct Fields<'a> {
    line: usize,
    text: &'a str,
    kind: &'static str,
    map: BTreeMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    fn new(line: usize, text: &'a str, kind: &'static str, rest: &'a str) -> Self {
        let map = rest
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        Self {
            line,
            text,
            kind,
            map,
        }
    }

    fn str(&self, field: &'static str) -> Result<&'a str, ParseError> {
        self.map
            .get(field)
            .copied()
            .ok_or_else(|| ParseError::MissingField {
                line: self.line,
                kind: self.kind,
                field,
                text: self.text.to_string(),
            })
    }

    fn bad(&self, field: &str, value: &str) -> ParseError {
        ParseError::BadValue {
            line: self.line,
            field: field.to_string(),
            value: value.to_string(),
            text: self.text.to_string(),
        }
    }

    /// A numeric field that older or cycle-unit output may lack (0 then).
    fn num_or_zero(&self, field: &'static str) -> Result<u64, ParseError> {
        match self.map.get(field) {
            Some(v) => parse_u64(v).ok_or_else(|| self.bad(field, v)),
            None => Ok(0),
        }
    }

    /// A numeric field that may be absent.
    fn opt_num(&self, field: &'static str) -> Result<Option<u64>, ParseError> {
        self.map
            .get(field)
            .map(|v| parse_u64(v).ok_or_else(|| self.bad(field, v)))
            .transpose()
    }

    fn num(&self, field: &'static str) -> Result<u64, ParseError> {
        let v = self.str(field)?;
        parse_u64(v).ok_or_else(|| self.bad(field, v))
    }
}

/// Decimal or `0x` hexadecimal.
fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Parses one console line (1-based `line` number for messages). Lines that are not
/// `WORKLOAD` lines, or `WORKLOAD` lines of an unknown kind, give `Ok(None)`; a known kind with
/// a missing or malformed field is an error. The `WORKLOAD` marker may be preceded by other text
/// (a console prefix).
pub fn parse_line(line: usize, text: &str) -> Result<Option<GuestLine>, ParseError> {
    let Some(pos) = text.find("WORKLOAD ") else {
        return Ok(None);
    };
    let body = text[pos + "WORKLOAD ".len()..].trim();
    let (kind, rest) = body.split_once(' ').unwrap_or((body, ""));
    let parsed = match kind {
        "start" => {
            let f = Fields::new(line, text, "start", rest);
            GuestLine::Start(WorkloadStart {
                vcpus: f.num("vcpus")?,
                span_bytes: f.num("span_bytes")?,
                pages: f.num("pages")?,
                pattern: f.str("pattern")?.to_string(),
                writes: f.str("writes")?.to_string(),
                passes: f.num("passes")?,
                seed: f.num("seed")?,
                tsc_khz: f.num_or_zero("tsc_khz")?,
                stall_threshold_ns: f.opt_num("stall_threshold_ns")?,
            })
        }
        "pass" => {
            let f = Fields::new(line, text, "pass", rest);
            GuestLine::Pass(WorkloadPass {
                n: f.num("n")?,
                pages: f.num("pages")?,
                mismatches: f.num("mismatches")?,
                elapsed_ms: f.num("elapsed_ms")?,
                slow_accesses: f.num("slow_accesses")?,
            })
        }
        "MISMATCH" => {
            let f = Fields::new(line, text, "MISMATCH", rest);
            GuestLine::Mismatch(Mismatch {
                gpa: f.num("gpa")?,
                expected: f.num("expected")?,
                found: f.num("found")?,
                vcpu: f.num("vcpu")?,
            })
        }
        "HIST" => {
            let f = Fields::new(line, text, "HIST", rest);
            let raw = f.str("buckets")?;
            let mut buckets = Vec::new();
            for item in raw.split(',').filter(|s| !s.is_empty()) {
                let (lo, count) = item
                    .split_once(':')
                    .and_then(|(l, c)| Some((parse_u64(l)?, parse_u64(c)?)))
                    .ok_or_else(|| f.bad("buckets", item))?;
                buckets.push((lo, count));
            }
            GuestLine::Hist(GuestHist {
                name: f.str("name")?.to_string(),
                unit: f.str("unit")?.to_string(),
                buckets,
                pass: f.opt_num("pass")?,
                after_passes: 0,
                sub_buckets: match f.opt_num("sub")? {
                    Some(0) => return Err(f.bad("sub", "0")),
                    Some(n) => n,
                    None => histogram::LEGACY_GUEST_SUB_BUCKETS,
                },
                threshold: f.opt_num("threshold")?,
            })
        }
        "RESULT" => {
            let f = Fields::new(line, text, "RESULT", rest);
            let status = f.str("status")?;
            let ok = match status {
                "ok" => true,
                "fail" => false,
                other => return Err(f.bad("status", other)),
            };
            GuestLine::Result(WorkloadResult {
                ok,
                passes: f.num("passes")?,
                pages: f.num("pages")?,
                mismatches: f.num("mismatches")?,
                ft_count: f.num("ft_count")?,
                ft_p50_ns: f.num_or_zero("ft_p50_ns")?,
                ft_p99_ns: f.num_or_zero("ft_p99_ns")?,
                ft_max_ns: f.num_or_zero("ft_max_ns")?,
                stall_count: f.num_or_zero("stall_count")?,
                stall_max_ns: f.num_or_zero("stall_max_ns")?,
            })
        }
        _ => return Ok(None),
    };
    Ok(Some(parsed))
}

impl GuestOutput {
    /// Adds one recognised line.
    pub fn push(&mut self, line: GuestLine) {
        match line {
            GuestLine::Start(s) => self.start = Some(s),
            GuestLine::Pass(p) => self.passes.push(p),
            GuestLine::Mismatch(m) => self.mismatches.push(m),
            GuestLine::Hist(mut h) => {
                h.after_passes = self.passes.len();
                self.hists.push(h);
            }
            GuestLine::Result(r) => self.result = Some(r),
        }
    }

    /// Parses a whole console transcript; malformed `WORKLOAD` lines are kept in
    /// [`GuestOutput::malformed`] (see there).
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for (i, line) in text.lines().enumerate() {
            match parse_line(i + 1, line) {
                Ok(Some(l)) => out.push(l),
                Ok(None) => {}
                Err(e) => out.malformed.push(e.to_string()),
            }
        }
        out
    }

    /// The per-pass histograms named `name` (`pass=K` lines), in order.
    pub fn pass_hists<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a GuestHist> + 'a {
        self.hists_named(name).filter(|h| h.pass.is_some())
    }

    /// The whole-run histogram named `name` (the last line without `pass=`), if printed.
    pub fn final_hist<'a>(&'a self, name: &'a str) -> Option<&'a GuestHist> {
        self.hists_named(name).filter(|h| h.pass.is_none()).last()
    }

    /// The histograms named `name` (e.g. `access_slow`), in order.
    pub fn hists_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a GuestHist> + 'a {
        self.hists.iter().filter(move |h| h.name == name)
    }
}

/// Summary printed by `vmm migrate --json` on the source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateSummary {
    pub blackout_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub bytes_sent: Option<u64>,
    pub pages_sent: Option<u64>,
    pub faults_served: Option<u64>,
    pub pages_pushed: Option<u64>,
    pub collapses: Option<u64>,
    /// Time the source spent streaming guest memory (precopy rounds + postcopy bulk push).
    #[serde(default)]
    pub transfer_ms: Option<f64>,
    /// Bytes sent during `transfer_ms`.
    #[serde(default)]
    pub transfer_bytes: Option<u64>,
    /// Times the link failed after the switchover and the source reconnected into the same
    /// session (postcopy recovery).
    #[serde(default)]
    pub recoveries: Option<u32>,
    /// Time the source spent postcopy-paused (link down, waiting to reconnect), in all, ms.
    #[serde(default)]
    pub paused_ms: Option<f64>,
    /// Every other field, kept for the raw record.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Statistics the destination writes with `--stats-json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationStats {
    /// userfaultfd faults handled (including those resolved without the network).
    pub faults_served: Option<u64>,
    /// Faults that fetched their page from the source.
    #[serde(default)]
    pub pages_fetched: Option<u64>,
    /// Faults resolved from data already received (no network).
    pub pages_fetched_local: Option<u64>,
    pub collapses: Option<u64>,
    /// The stall each collapse could cause a vCPU (its freeze), ns.
    #[serde(default)]
    pub collapse_stall_ns: Vec<u64>,
    /// Whole duration of each collapse, ns.
    #[serde(default)]
    pub collapse_total_ns: Vec<u64>,
    /// VMM-side latency of each fault (fault read to CONTINUE done), in ns.
    #[serde(default)]
    pub fault_ns: Vec<u64>,
    /// VMM-side latency of the faults whose page fetch failed at least once because the link
    /// was down (they waited through a postcopy-paused outage), ns. Not in `fault_ns`.
    #[serde(default)]
    pub outage_fault_ns: Vec<u64>,
    /// Times the link failed after the switchover and the source came back.
    #[serde(default)]
    pub recoveries: Option<u32>,
    /// Time the destination spent postcopy-paused, in all, ms.
    #[serde(default)]
    pub paused_ms: Option<f64>,
    pub staging_peak_bytes: Option<u64>,
    /// The VMM's own per-vCPU blocktime (userfaultfd thread ids), ms.
    #[serde(default)]
    pub postcopy_vcpu_blocktime_ms: Vec<f64>,
    /// The time every vCPU was blocked at once, ms.
    #[serde(default)]
    pub postcopy_blocktime_ms: Option<f64>,
    /// Per-fault phase timing: phase name (see [`FAULT_PHASES`]) -> summary, us. Absent from
    /// destinations that do not time phases (older VMMs, QEMU).
    #[serde(default)]
    pub fault_phase_us: BTreeMap<String, PhaseStats>,
    /// The faults above the p99 of the total (at most 200), each with its phases, us.
    #[serde(default)]
    pub slow_faults: Vec<SlowFault>,
    /// With `--granularity native`: why the native path was not used, if it was not.
    #[serde(default)]
    pub native_fallback: Option<String>,
    /// How the destination served each region.
    #[serde(default)]
    pub regions: Vec<migration::stats::RegionServe>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The phases of one remote fault, in order (the destination's `fault_phase_us` keys):
/// uffd event to read; request written; the source's receive-to-reply time (echoed in the
/// reply); reply read; stored; CONTINUE/COPY done.
pub use migration::postcopy::PHASES as FAULT_PHASES;

/// Summary of one fault phase as the destination reports it, us: the migration crate's own
/// record (count, p50, p90, p99, p999, max, mean), read leniently (missing fields zero, the
/// count an integer or a float). The destination gives only these figures (no histogram), so
/// runs can only be merged figure by figure.
pub type PhaseStats = migration::postcopy::PhaseSummary;

/// The destination's `fault_phase_us`, keyed by phase name; empty when no fault was timed.
pub fn phase_map(s: &migration::postcopy::FaultPhaseSummary) -> BTreeMap<String, PhaseStats> {
    let phases = [
        &s.uffd_to_read,
        &s.request_written,
        &s.source_reply,
        &s.reply_read,
        &s.stored,
        &s.installed,
    ];
    if phases.iter().all(|p| p.count == 0) {
        return BTreeMap::new();
    }
    FAULT_PHASES
        .iter()
        .zip(phases)
        .map(|(name, p)| (name.to_string(), *p))
        .collect()
}

impl From<&migration::postcopy::SlowFault> for SlowFault {
    fn from(f: &migration::postcopy::SlowFault) -> Self {
        let t = &f.phases_us;
        let values = [
            t.uffd_to_read,
            t.request_written,
            t.source_reply,
            t.reply_read,
            t.stored,
            t.installed,
        ];
        SlowFault {
            total_us: f.total_us,
            phases_us: FAULT_PHASES
                .iter()
                .zip(values)
                .map(|(name, v)| (name.to_string(), v))
                .collect(),
        }
    }
}

/// One fault above the p99 of the total: its total and each phase, us.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlowFault {
    pub total_us: f64,
    #[serde(default)]
    pub phases_us: BTreeMap<String, f64>,
}

/// Finds the JSON object in a process's stdout: the whole text if it is one object, else the
/// last line that parses as an object.
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &'static str,
) -> Result<T, ParseError> {
    let t = text.trim();
    if t.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<T>(t) {
            return Ok(v);
        }
    }
    let last = t
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{') && l.ends_with('}'))
        .ok_or(ParseError::NoJson {
            what,
            len: text.len(),
        })?;
    serde_json::from_str(last).map_err(|source| ParseError::Json { what, source })
}

impl MigrateSummary {
    /// Parses the stdout of `vmm migrate --json`.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        json_object(text, "the `vmm migrate --json` output")
    }
}

impl DestinationStats {
    /// Parses the destination's stats file.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        json_object(text, "the destination's --stats-json file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSCRIPT: &str = "\
vmm: guest starting
WORKLOAD start vcpus=2 span_bytes=268435456 pages=65536 pattern=random writes=100 passes=0 seed=7 tsc_khz=2100000 pt=1g usable_bytes=268000000
WORKLOAD pass n=1 pages=65536 mismatches=0 elapsed_ms=812 slow_accesses=3
WORKLOAD HIST name=access_slow pass=1 unit=ns buckets=16384:2,32768:1
WORKLOAD pass n=2 pages=6
[serial] WORKLOAD pass n=2 pages=65536 mismatches=1 elapsed_ms=900 slow_accesses=0
WORKLOAD MISMATCH gpa=0x1000 expected=0xdeadbeef found=0x0 vcpu=1
WORKLOAD HIST name=first_touch unit=ns buckets=1024:10,2048:5,4096:0
WORKLOAD FUTURE something=1
WORKLOAD RESULT status=fail passes=2 pages=65536 mismatches=1 ft_count=15 ft_p50_ns=1500 ft_p99_ns=3000 ft_max_ns=3500
";

    #[test]
    fn parses_every_line_kind() {
        let out = GuestOutput::parse(TRANSCRIPT);
        assert_eq!(out.malformed.len(), 1, "{:?}", out.malformed);
        assert!(out.malformed[0].contains("line 5"), "{:?}", out.malformed);
        let s = out.start.as_ref().unwrap();
        assert_eq!((s.vcpus, s.pages, s.tsc_khz), (2, 65536, 2_100_000));
        assert_eq!(s.pattern, "random");
        assert_eq!(out.passes.len(), 2);
        assert_eq!(out.passes[1].mismatches, 1);
        assert_eq!(out.passes[0].slow_accesses, 3);
        assert_eq!(
            out.mismatches,
            vec![Mismatch {
                gpa: 0x1000,
                expected: 0xdead_beef,
                found: 0,
                vcpu: 1
            }]
        );
        assert_eq!(out.hists.len(), 2);
        let slow: Vec<_> = out.hists_named("access_slow").collect();
        assert_eq!(slow.len(), 1);
        assert_eq!(slow[0].buckets, vec![(16384, 2), (32768, 1)]);
        assert_eq!(slow[0].after_passes, 1);
        assert_eq!(slow[0].pass, Some(1));
        assert_eq!(out.pass_hists("access_slow").count(), 1);
        assert!(out.final_hist("access_slow").is_none());
        assert_eq!(out.final_hist("first_touch").unwrap().pass, None);
        assert_eq!(out.hists[1].after_passes, 2);
        let r = out.result.unwrap();
        assert!(!r.ok);
        assert_eq!((r.ft_count, r.ft_p50_ns, r.ft_max_ns), (15, 1500, 3500));
    }

    #[test]
    fn rejects_malformed_known_lines() {
        assert!(parse_line(
            1,
            "WORKLOAD pass n=1 pages=x mismatches=0 elapsed_ms=1 slow_accesses=0"
        )
        .is_err());
        assert!(parse_line(1, "WORKLOAD pass n=1").is_err());
        assert!(parse_line(1, "WORKLOAD HIST name=a unit=ns buckets=1:2,3").is_err());
        assert!(parse_line(1, "WORKLOAD RESULT status=maybe passes=1 pages=1 mismatches=0 ft_count=0 ft_p50_ns=0 ft_p99_ns=0 ft_max_ns=0").is_err());
        assert_eq!(parse_line(1, "hello").unwrap(), None);
    }

    #[test]
    fn parses_migrate_summary_and_stats() {
        let m = MigrateSummary::parse(
            "connecting\n{\"blackout_ms\": 3.5, \"total_ms\": 1200, \"bytes_sent\": 1073741824, \"pages_sent\": 262144, \"faults_served\": 90, \"pages_pushed\": 262054, \"collapses\": 1, \"mode\": \"postcopy\"}\n",
        )
        .unwrap();
        assert_eq!(m.blackout_ms, Some(3.5));
        assert_eq!(m.total_ms, Some(1200.0));
        assert_eq!(m.pages_pushed, Some(262_054));
        assert_eq!(m.extra["mode"], "postcopy");
        assert!(MigrateSummary::parse("no json here").is_err());

        let s = DestinationStats::parse(
            "{\"faults_served\": 3, \"pages_fetched_local\": 1, \"collapses\": 1,\n \"collapse_stall_ns\": [400000], \"fault_ns\": [20000, 30000, 25000], \"staging_peak_bytes\": 12288}",
        )
        .unwrap();
        assert_eq!(s.fault_ns, vec![20_000, 30_000, 25_000]);
        assert_eq!(s.collapse_stall_ns, vec![400_000]);
        assert_eq!(s.staging_peak_bytes, Some(12288));
        assert!(s.fault_phase_us.is_empty() && s.slow_faults.is_empty());
        assert!(s.outage_fault_ns.is_empty());
        assert_eq!((s.recoveries, s.paused_ms), (None, None));
        assert_eq!((m.recoveries, m.paused_ms), (None, None));
    }

    #[test]
    fn parses_recovery_figures() {
        let m = MigrateSummary::parse(
            r#"{"blackout_ms":1.0,"total_ms":3000,"recoveries":1,"paused_ms":1012.5}"#,
        )
        .unwrap();
        assert_eq!((m.recoveries, m.paused_ms), (Some(1), Some(1012.5)));
        let s = DestinationStats::parse(
            r#"{"faults_served":4,"fault_ns":[20000,30000],"outage_fault_ns":[900000000,950000000],"recoveries":1,"paused_ms":998.0}"#,
        )
        .unwrap();
        assert_eq!(s.fault_ns, vec![20_000, 30_000]);
        assert_eq!(s.outage_fault_ns, vec![900_000_000, 950_000_000]);
        assert_eq!((s.recoveries, s.paused_ms), (Some(1), Some(998.0)));
        assert!(!s.extra.contains_key("outage_fault_ns"));
    }

    #[test]
    fn parses_fault_phase_timing() {
        let s = DestinationStats::parse(
            r#"{"faults_served":1000,"fault_ns":[20000],
            "fault_phase_us":{
              "uffd_to_read":{"count":1000,"p50":1.5,"p90":3.0,"p99":9.0,"p999":40.0,"max":55.0,"mean":2.1},
              "request_written":{"count":1000.0,"p50":2.0,"p90":2.5,"p99":4.0,"p999":8.0,"max":9.0,"mean":2.2},
              "source_reply":{"count":1000,"p50":12.0,"p90":20.0,"p99":90.0,"p999":400.0,"max":700.0,"mean":15.0},
              "reply_read":{"count":1000,"p50":30.0,"p90":45.0,"p99":300.0,"p999":900.0,"max":1200.0,"mean":35.0},
              "stored":{"count":1000,"p50":1.0,"p90":1.2,"p99":2.0,"p999":3.0,"max":4.0,"mean":1.05},
              "installed":{"count":1000,"p50":3.0,"p90":4.0,"p99":8.0,"p999":30.0,"max":3000.0,"mean":3.3}},
            "slow_faults":[
              {"total_us":1500.0,"phases_us":{"uffd_to_read":2.0,"request_written":2.0,"source_reply":50.0,"reply_read":1400.0,"stored":1.0,"installed":45.0}},
              {"total_us":3100.0,"phases_us":{"uffd_to_read":1.0,"request_written":2.0,"source_reply":20.0,"reply_read":70.0,"stored":1.0,"installed":3000.0}}]}"#,
        )
        .unwrap();
        assert_eq!(s.fault_phase_us.len(), 6);
        for p in FAULT_PHASES {
            assert_eq!(s.fault_phase_us[p].count, 1000, "{p}");
        }
        assert_eq!(s.fault_phase_us["reply_read"].p99, 300.0);
        assert_eq!(s.fault_phase_us["uffd_to_read"].mean, 2.1);
        assert_eq!(s.slow_faults.len(), 2);
        assert_eq!(s.slow_faults[1].phases_us["installed"], 3000.0);
        assert!(!s.extra.contains_key("fault_phase_us"));
        // A negative count is not a count.
        assert!(
            DestinationStats::parse(r#"{"fault_phase_us":{"stored":{"count":-1,"p50":1.0}}}"#)
                .is_err()
        );
    }

    #[test]
    fn reads_the_bucket_scheme_and_threshold_of_a_hist_line() {
        let Some(GuestLine::Hist(h)) = parse_line(
            1,
            "WORKLOAD HIST name=stall pass=3 unit=ns sub=32 threshold=20000 buckets=19968:2,1048576:1",
        )
        .unwrap() else {
            panic!("not a HIST line");
        };
        assert_eq!(
            (h.sub_buckets, h.threshold, h.pass),
            (32, Some(20_000), Some(3))
        );
        let hist = h.histogram().unwrap();
        assert_eq!(hist.len(), 3);
        // 1048576 is in a bucket 32768 wide (32 per power of two): midpoint 1064960.
        assert_eq!(hist.max(), hist.highest_equivalent(1_048_576 + 16_384));
        // Without `sub=` the line is of the older 8-per-power-of-two scheme.
        let Some(GuestLine::Hist(old)) = parse_line(
            1,
            "WORKLOAD HIST name=access_slow unit=ns buckets=1048576:1",
        )
        .unwrap() else {
            panic!("not a HIST line");
        };
        assert_eq!((old.sub_buckets, old.threshold), (8, None));
        let o = old.histogram().unwrap();
        assert_eq!(o.max(), o.highest_equivalent(1_048_576 + 65_536));
        assert!(parse_line(1, "WORKLOAD HIST name=a unit=ns sub=0 buckets=1:1").is_err());
        let Some(GuestLine::Start(st)) = parse_line(
            1,
            "WORKLOAD start vcpus=1 span_bytes=4096 pages=1 pattern=random writes=100 passes=2 seed=1 tsc_khz=1 stall_threshold_ns=20000",
        )
        .unwrap() else {
            panic!("not a start line");
        };
        assert_eq!(st.stall_threshold_ns, Some(20_000));
    }
}
