//! The size sweep (`harness run --sweep size`): one or more scenarios run at several guest RAM
//! sizes and vCPU counts, then blackout, total time, guest-seen fault p50/p99 and the
//! destination's extra memory plotted against the size, with a verdict on each expectation
//! (blackout flat, total time linear in size, fault latency flat). See docs/measuring.md.

use crate::report::{plot_err, ReportError, TargetCheck, Verdict};
use crate::results::{Results, ScenarioResult, Status};
use crate::scenario::Scenario;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The sizes a sweep runs unless told (`--sizes`).
pub const DEFAULT_SIZES: &str = "256M,1G,4G,8G";
/// The vCPU counts a sweep runs unless told (`--sweep-vcpus`).
pub const DEFAULT_VCPUS: &str = "1,2";
/// The scenario a sweep runs unless `--scenario` names others.
pub const DEFAULT_BASE: &str = "shmem-4k-staged-random-loopback";
/// Smallest guest RAM of a sweep point, MiB (the workload guest's page tables and the VMM's
/// layout need a little; 64 MiB boots and migrates in a second or two).
pub const MIN_MIB: u64 = 64;
/// Largest, MiB (1 TiB: beyond any host this runs on; a typo guard).
pub const MAX_MIB: u64 = 1 << 20;
/// The most vCPUs the workload guest runs.
pub const MAX_VCPUS: u32 = 64;
/// Memory a sweep point leaves free beside source + destination guest RAM, MiB (the VMMs'
/// own memory, page tables, the harness, and whatever else runs on the host).
pub const HEADROOM_MIB: u64 = 2048;

/// What the verdicts allow (report only: no timed test asserts these).
pub mod targets {
    /// Blackout is flat when its largest point is within this factor of its smallest ...
    pub const BLACKOUT_RATIO: f64 = 2.0;
    /// ... or within this many ms of it (sub-millisecond blackouts vary by more than 2x).
    pub const BLACKOUT_SLACK_MS: f64 = 1.0;
    /// Total time is linear when a least-squares line through (size, total) explains at
    /// least this share of its variance (R²) ...
    pub const LINEAR_R2: f64 = 0.98;
    /// ... and no point is further from the line than this fraction of the largest point's
    /// total (relative to the largest, not to the point's own: the smallest point's total is
    /// under a second, and half a second of run-to-run noise there is no curvature).
    pub const LINEAR_RESIDUAL: f64 = 0.05;
    /// Guest fault p50 is flat when its largest point is within this factor of its smallest.
    pub const P50_RATIO: f64 = 1.5;
    /// The same for the p99 (a tail moves more from run to run).
    pub const P99_RATIO: f64 = 2.0;
}

/// Bad sweep arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SweepError {
    #[error("--sizes is empty: give a comma-separated list such as 256M,1G,4G")]
    NoSizes,
    #[error(
        "bad size {0:?}: a whole number of MiB or GiB with its suffix, e.g. 256M or 4G \
         (M, MiB, G, GiB; case does not matter)"
    )]
    BadSize(String),
    #[error("size {0:?} is below the smallest sweep point, {MIN_MIB} MiB")]
    TooSmall(String),
    #[error("size {0:?} is above the largest sweep point, {MAX_MIB} MiB")]
    TooLarge(String),
    #[error("size {0:?} is listed twice (as {1} MiB)")]
    Duplicate(String, u64),
    #[error("--sweep-vcpus is empty: give a comma-separated list such as 1,2")]
    NoVcpus,
    #[error("bad vCPU count {0:?}: a whole number from 1 to {MAX_VCPUS}")]
    BadVcpus(String),
    #[error("vCPU count {0} is listed twice")]
    DuplicateVcpus(u32),
    #[error(
        "{size} MiB is not a whole number of {backing} pages ({page_mib} MiB each): scenario \
         {scenario} cannot run at that size"
    )]
    NotPageMultiple {
        scenario: String,
        backing: &'static str,
        size: u64,
        page_mib: u64,
    },
    #[error("scenario {0} cannot be swept: QEMU's postcopy is not ours (and runs one vCPU)")]
    Peer(String),
    #[error("no scenario to sweep")]
    NoBase,
}

/// Parses one size (`256M`, `1G`, `4GiB`, `512mib`) into MiB.
pub fn parse_size(text: &str) -> Result<u64, SweepError> {
    let t = text.trim();
    let bad = || SweepError::BadSize(text.to_string());
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "m" | "mib" => 0,
        "g" | "gib" => 10,
        _ => return Err(bad()),
    };
    // Too many digits for a u64: beyond the largest point anyway.
    let n: u64 = digits
        .parse()
        .map_err(|_| SweepError::TooLarge(text.to_string()))?;
    let mib = n
        .checked_mul(1 << shift)
        .ok_or_else(|| SweepError::TooLarge(text.to_string()))?;
    if mib < MIN_MIB {
        return Err(SweepError::TooSmall(text.to_string()));
    }
    if mib > MAX_MIB {
        return Err(SweepError::TooLarge(text.to_string()));
    }
    Ok(mib)
}

/// Parses `--sizes` (comma-separated, see [`parse_size`]) into MiB, smallest first.
pub fn parse_sizes(text: &str) -> Result<Vec<u64>, SweepError> {
    let mut out: Vec<(u64, &str)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mib = parse_size(part)?;
        if out.iter().any(|&(m, _)| m == mib) {
            return Err(SweepError::Duplicate(part.to_string(), mib));
        }
        out.push((mib, part));
    }
    if out.is_empty() {
        return Err(SweepError::NoSizes);
    }
    let mut sizes: Vec<u64> = out.into_iter().map(|(m, _)| m).collect();
    sizes.sort_unstable();
    Ok(sizes)
}

/// Parses `--sweep-vcpus` (comma-separated counts), smallest first.
pub fn parse_vcpus(text: &str) -> Result<Vec<u32>, SweepError> {
    let mut out: Vec<u32> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v: u32 = part
            .parse()
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or_else(|| SweepError::BadVcpus(part.to_string()))?;
        if out.contains(&v) {
            return Err(SweepError::DuplicateVcpus(v));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err(SweepError::NoVcpus);
    }
    out.sort_unstable();
    Ok(out)
}

/// The name of a sweep point: the base scenario's, then the size in MiB and the vCPUs
/// (`shmem-4k-staged-random-loopback-4096m-2vcpu`).
pub fn point_name(base: &str, memory_mib: u64, vcpus: u32) -> String {
    format!("{base}-{memory_mib}m-{vcpus}vcpu")
}

/// Guest passes (random pattern) of a sweep point of `memory_mib`, unless `--passes` says:
/// 24 at 256 MiB, as `--quick` runs it, fewer as the RAM grows, at least 6. A pass's time and
/// the push's both grow with the size, so the same few passes still span the migration; the
/// first (every page written, tens of us each under shadow paging here) takes about a minute
/// at 8 GiB, each later one about 5 s.
pub fn default_passes(memory_mib: u64) -> u32 {
    let scaled = (24 * 256 / memory_mib.max(1)).max(6);
    u32::try_from(scaled).unwrap_or(24).min(24)
}

/// Every sweep point of `bases` x `sizes` x `vcpus`, vCPU count first, then size (so the
/// points sharing a link set-up run together), each with `passes` (else
/// [`default_passes`]).
pub fn expand(
    bases: &[Scenario],
    sizes: &[u64],
    vcpus: &[u32],
    passes: Option<u32>,
) -> Result<Vec<Scenario>, SweepError> {
    if bases.is_empty() {
        return Err(SweepError::NoBase);
    }
    if sizes.is_empty() {
        return Err(SweepError::NoSizes);
    }
    if vcpus.is_empty() {
        return Err(SweepError::NoVcpus);
    }
    let mut out = Vec::new();
    for base in bases {
        if base.strategy == crate::scenario::Strategy::Qemu {
            return Err(SweepError::Peer(base.name.clone()));
        }
        let page_mib = (base.backing.page_size() >> 20).max(1);
        for &size in sizes {
            if size % page_mib != 0 {
                return Err(SweepError::NotPageMultiple {
                    scenario: base.name.clone(),
                    backing: base.backing.name(),
                    size,
                    page_mib,
                });
            }
        }
        for &v in vcpus {
            for &size in sizes {
                let mut s = base.clone();
                s.name = point_name(&base.name, size, v);
                s.memory_mib = size;
                s.vcpus = Some(v);
                s.passes = Some(passes.unwrap_or_else(|| default_passes(size)));
                s.sweep_of = Some(base.name.clone());
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// The host memory a sweep point can use, from `/proc/meminfo`, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMemory {
    pub available_kb: u64,
    /// Free pages already in the 2 MiB and 1 GiB pools (and their size in KiB).
    pub huge_free: [(u64, u64); 2],
}

impl HostMemory {
    /// Reads `/proc/meminfo` and the pools' `free_hugepages`.
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let available_kb = text.lines().find_map(|l| {
            l.strip_prefix("MemAvailable:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })?;
        let free = |kib: u64| {
            std::fs::read_to_string(format!(
                "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
            ))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
        };
        Some(Self {
            available_kb,
            huge_free: [(2048, free(2048)), (1 << 20, free(1 << 20))],
        })
    }
}

/// A sweep point whose source and destination guest RAM, with [`HEADROOM_MIB`], do not fit in
/// the host's memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "needs {want_mib} MiB ({guest_mib} MiB guest RAM on the source and as much on the \
     destination{pooled}, plus {headroom} MiB headroom) but the host has {available_mib} MiB \
     available (MemAvailable)",
    headroom = HEADROOM_MIB,
    pooled = if *pooled_mib > 0 {
        format!(", less {pooled_mib} MiB already free in the huge page pool")
    } else {
        String::new()
    }
)]
pub struct DoesNotFit {
    /// What the point needs from available memory, headroom included.
    pub want_mib: u64,
    /// Guest RAM of one side.
    pub guest_mib: u64,
    /// Free huge pages already in the pool that count against the need.
    pub pooled_mib: u64,
    /// `MemAvailable`.
    pub available_mib: u64,
}

/// Whether scenario `s` (source + destination guest RAM, plus [`HEADROOM_MIB`]) fits in
/// `host`: free huge pages already in the pool count for a hugetlb backing, the rest must
/// come from available memory.
pub fn fits_in(s: &Scenario, host: &HostMemory) -> Result<(), DoesNotFit> {
    let need_kb = 2 * (s.memory_mib << 10);
    let pooled_kb = crate::scenario::huge_kib(s.backing).map_or(0, |kib| {
        host.huge_free
            .iter()
            .find(|&&(k, _)| k == kib)
            .map_or(0, |&(k, free)| k * free)
    });
    let from_available = need_kb.saturating_sub(pooled_kb);
    let want = from_available + (HEADROOM_MIB << 10);
    if want <= host.available_kb {
        return Ok(());
    }
    Err(DoesNotFit {
        want_mib: want >> 10,
        guest_mib: s.memory_mib,
        pooled_mib: pooled_kb >> 10,
        available_mib: host.available_kb >> 10,
    })
}

/// [`fits_in`] the host's memory now (a host whose memory cannot be read is let through: the
/// VMMs will say what fails).
pub fn check_fits(s: &Scenario) -> Result<(), DoesNotFit> {
    match HostMemory::read() {
        Some(host) => fits_in(s, &host),
        None => Ok(()),
    }
}

/// Splits `points` into those that fit the host's memory now and those that do not (with the
/// reason).
pub fn split_fitting(points: Vec<Scenario>) -> (Vec<Scenario>, Vec<(Scenario, DoesNotFit)>) {
    let host = HostMemory::read();
    let mut fit = Vec::new();
    let mut skipped = Vec::new();
    for s in points {
        match host.as_ref().map_or(Ok(()), |h| fits_in(&s, h)) {
            Ok(()) => fit.push(s),
            Err(why) => skipped.push((s, why)),
        }
    }
    (fit, skipped)
}

// ---- The report side -------------------------------------------------------------------------

/// One line of the sweep: a base scenario at one vCPU count, its ok points smallest first.
pub struct Series<'a> {
    pub base: String,
    pub vcpus: u32,
    pub points: Vec<&'a ScenarioResult>,
}

impl Series<'_> {
    fn label(&self, several_bases: bool) -> String {
        let v = if self.vcpus == 1 { "vCPU" } else { "vCPUs" };
        if several_bases {
            format!("{}, {} {v}", self.base, self.vcpus)
        } else {
            format!("{} {v}", self.vcpus)
        }
    }

    /// (size GiB, value) of every point that has the figure.
    fn xy(&self, f: impl Fn(&ScenarioResult) -> Option<f64>) -> Vec<(f64, f64)> {
        self.points
            .iter()
            .filter_map(|s| Some((gib(s.memory_mib?), f(s)?)))
            .collect()
    }
}

fn gib(mib: u64) -> f64 {
    mib as f64 / 1024.0
}

/// The sweep's series in `r` (ok points only), by base scenario then vCPUs.
pub fn series(r: &Results) -> Vec<Series<'_>> {
    let mut g: BTreeMap<(String, u32), Vec<&ScenarioResult>> = BTreeMap::new();
    for s in r.scenarios.iter().filter(|s| s.status == Status::Ok) {
        if let (Some(base), Some(_)) = (&s.sweep_of, s.memory_mib) {
            g.entry((base.clone(), s.vcpus.unwrap_or(1)))
                .or_default()
                .push(s);
        }
    }
    g.into_iter()
        .map(|((base, vcpus), mut points)| {
            points.sort_by_key(|s| s.memory_mib);
            Series {
                base,
                vcpus,
                points,
            }
        })
        .collect()
}

fn has_sweep(r: &Results) -> bool {
    r.scenarios.iter().any(|s| s.sweep_of.is_some())
}

/// A least-squares line y = a + b x through `pts`: (a, b, R²). None with fewer than two
/// distinct x.
pub fn fit_line(pts: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
    let sse: f64 = pts.iter().map(|p| (p.1 - a - b * p.0).powi(2)).sum();
    let r2 = if syy > 0.0 { 1.0 - sse / syy } else { 1.0 };
    Some((a, b, r2))
}

fn size_text(g: f64) -> String {
    let mib = (g * 1024.0).round();
    if mib >= 1024.0 && mib % 1024.0 == 0.0 {
        format!("{:.0} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// One expectation judged on one series: the verdict and what it rests on (with the point
/// that deviates most when it is missed).
fn flat(pts: &[(f64, f64)], ratio: f64, slack: f64, unit: &str) -> (Verdict, String) {
    if pts.len() < 2 {
        return (Verdict::NotMeasured, "fewer than two sizes".into());
    }
    let (lo, hi) = pts.iter().fold((pts[0], pts[0]), |(lo, hi), &p| {
        (
            if p.1 < lo.1 { p } else { lo },
            if p.1 > hi.1 { p } else { hi },
        )
    });
    let r = if lo.1 > 0.0 {
        hi.1 / lo.1
    } else {
        f64::INFINITY
    };
    let ok = r <= ratio || hi.1 - lo.1 <= slack;
    let text = format!(
        "{:.1}-{:.1} {unit} over {}-{}; max/min {r:.2}x (lowest at {}, highest at {})",
        lo.1,
        hi.1,
        size_text(pts[0].0),
        size_text(pts[pts.len() - 1].0),
        size_text(lo.0),
        size_text(hi.0),
    );
    (Verdict::of(ok), text)
}

fn linear(pts: &[(f64, f64)]) -> (Verdict, String) {
    if pts.len() < 3 {
        return (
            Verdict::NotMeasured,
            "fewer than three sizes (two points always lie on a line)".into(),
        );
    }
    let Some((a, b, r2)) = fit_line(pts) else {
        return (Verdict::NotMeasured, "no two distinct sizes".into());
    };
    let largest = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    // (size, total - line) of the point furthest from the line.
    let (worst, dev) =
        pts.iter()
            .map(|&(x, y)| (x, y - (a + b * x)))
            .fold(
                (0.0, 0.0),
                |acc: (f64, f64), p| {
                    if p.1.abs() > acc.1.abs() {
                        p
                    } else {
                        acc
                    }
                },
            );
    let share = if largest > 0.0 { dev / largest } else { 0.0 };
    let ok = r2 >= targets::LINEAR_R2 && b > 0.0 && share.abs() <= targets::LINEAR_RESIDUAL;
    let line_there = a + b * worst;
    (
        Verdict::of(ok),
        format!(
            "total ≈ {a:.2} s + {b:.2} s/GiB, R² {r2:.3}; furthest from the line: {} ({dev:+.2} \
             s, {:+.0}% of the line there, {:+.1}% of the largest total)",
            size_text(worst),
            if line_there > 0.0 {
                dev / line_there * 100.0
            } else {
                0.0
            },
            share * 100.0
        ),
    )
}

fn blackout_of(s: &ScenarioResult) -> Option<f64> {
    s.blackout_ms
}
fn total_of(s: &ScenarioResult) -> Option<f64> {
    s.total_s
}
fn p50_of(s: &ScenarioResult) -> Option<f64> {
    (s.fault_us.count > 0).then_some(s.fault_us.p50)
}
fn p99_of(s: &ScenarioResult) -> Option<f64> {
    (s.fault_us.count > 0).then_some(s.fault_us.p99)
}

/// The sweep's rows of the report's targets table: per series, blackout flat, total time
/// linear, fault p50 and p99 flat. Nothing when `r` has no sweep.
pub fn check_targets(r: &Results) -> Vec<TargetCheck> {
    use targets::*;
    let mut out = Vec::new();
    if !has_sweep(r) {
        return out;
    }
    let all = series(r);
    if all.is_empty() {
        out.push(TargetCheck {
            target: "sweep: blackout flat, total time linear, fault latency flat".into(),
            scenario: "-".into(),
            value: "no sweep point succeeded".into(),
            verdict: Verdict::NotMeasured,
        });
    }
    for s in &all {
        let name = format!("{} ({} vCPU)", s.base, s.vcpus);
        let rows = [
            (
                format!(
                    "sweep: blackout flat (max <= {BLACKOUT_RATIO}x min or within \
                     {BLACKOUT_SLACK_MS} ms)"
                ),
                flat(&s.xy(blackout_of), BLACKOUT_RATIO, BLACKOUT_SLACK_MS, "ms"),
            ),
            (
                format!(
                    "sweep: total time linear in size (R² >= {LINEAR_R2}, no point further \
                     from the line than {:.0}% of the largest total)",
                    LINEAR_RESIDUAL * 100.0
                ),
                linear(&s.xy(total_of)),
            ),
            (
                format!("sweep: fault p50 flat (max <= {P50_RATIO}x min)"),
                flat(&s.xy(p50_of), P50_RATIO, 0.0, "us"),
            ),
            (
                format!("sweep: fault p99 flat (max <= {P99_RATIO}x min)"),
                flat(&s.xy(p99_of), P99_RATIO, 0.0, "us"),
            ),
        ];
        for (target, (verdict, value)) in rows {
            out.push(TargetCheck {
                target,
                scenario: name.clone(),
                value,
                verdict,
            });
        }
    }
    out
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

/// The report's "Size sweep" section: a table per series and the expectations' verdicts.
pub fn section(md: &mut String, r: &Results) {
    if !has_sweep(r) {
        return;
    }
    let _ = writeln!(md, "\n## Size sweep\n");
    let _ = writeln!(
        md,
        "Each point: the scenario at that guest RAM size and vCPU count (`harness run --sweep \
         size`). Fault latency is guest-seen (`fault_us`). **dst extra** = the destination \
         VMM's peak anonymous memory plus page tables (`/proc/PID/status` `RssAnon` + `VmPTE`, \
         sampled every 50 ms) plus its 4 KiB staging peak: what the destination host needs \
         beyond the guest RAM (KVM's own page tables not included).\n"
    );
    let _ = writeln!(
        md,
        "| scenario | RAM MiB | vCPUs | postcopy passes | blackout ms | total s | s/GiB | fault p50 | \
         fault p99 | faults | dst extra MiB | anon MiB | page tables MiB | staging MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in series(r) {
        for p in &s.points {
            let per_gib = match (p.total_s, p.memory_mib) {
                (Some(t), Some(m)) if m > 0 => Some(t / gib(m)),
                _ => None,
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.base,
                p.memory_mib.unwrap_or(0),
                s.vcpus,
                p.guest_fault_passes.len(),
                opt(p.blackout_ms, 2),
                opt(p.total_s, 2),
                opt(per_gib, 2),
                opt(p50_of(p), 1),
                opt(p99_of(p), 1),
                p.fault_us.count,
                opt(p.dst_extra_mib, 1),
                opt(p.dst_rss_anon_peak_mib, 1),
                opt(p.dst_pte_peak_mib, 1),
                opt(p.staging_peak_mib, 1),
            );
        }
    }
    let _ = writeln!(
        md,
        "\n(\"postcopy passes\" = how many destination passes overlapped postcopy: their faults \
         are the ones counted.)\n"
    );
    let failed: Vec<_> = r
        .scenarios
        .iter()
        .filter(|s| s.sweep_of.is_some() && s.status == Status::Failed)
        .collect();
    for s in &failed {
        let _ = writeln!(
            md,
            "- not in the table: `{}`: {}",
            s.name,
            s.error.as_deref().unwrap_or("failed")
        );
    }
    let _ = writeln!(md, "\nExpectations, per series:\n");
    for t in check_targets(r) {
        let _ = writeln!(
            md,
            "- {} — {}: {} ({})",
            t.scenario,
            t.target.trim_start_matches("sweep: "),
            t.verdict.text(),
            t.value
        );
    }
}

type XySeries = (String, Vec<(f64, f64)>);

/// A chart of figures against guest RAM (GiB, linear), one line with markers per series.
fn size_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[XySeries],
    log_y: bool,
) -> Result<(), ReportError> {
    let e = plot_err(path);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x1, mut y0, mut y1) = (0f64, f64::MAX, 0f64);
    for &(x, y) in pts {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let x1 = if x1 > 0.0 { x1 * 1.05 } else { 1.0 };
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("guest RAM (GiB)")
                .y_desc(y_desc)
                .draw()
                .map_err(&e)?;
            for (i, (name, p)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let p: Vec<(f64, f64)> = p
                    .iter()
                    .map(|&(x, y)| (x, if log_y { y.max(0.01) } else { y }))
                    .collect();
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                    .map_err(&e)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(p.iter().map(|&xy| Circle::new(xy, 4, color.filled())))
                    .map_err(&e)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(&e)?;
        }};
    }
    if log_y {
        let y0 = if y0 > 0.0 && y0 < f64::MAX {
            y0 / 2.0
        } else {
            0.1
        };
        let y1 = if y1 > y0 { y1 * 2.0 } else { y0 * 10.0 };
        finish!(b
            .build_cartesian_2d(0f64..x1, (y0..y1).log_scale())
            .map_err(&e)?);
    } else {
        let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
        finish!(b.build_cartesian_2d(0f64..x1, 0f64..y1).map_err(&e)?);
    }
    root.present().map_err(&e)?;
    Ok(())
}

/// The sweep's plots (`plots/sweep-*.svg`), (title, path relative to `dir`); none without a
/// sweep.
pub fn draw_plots(dir: &Path, r: &Results) -> Result<Vec<(String, String)>, ReportError> {
    let mut out = Vec::new();
    if !has_sweep(r) {
        return Ok(out);
    }
    let all = series(r);
    let several = all
        .iter()
        .map(|s| s.base.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let one = |f: fn(&ScenarioResult) -> Option<f64>| -> Vec<XySeries> {
        all.iter()
            .map(|s| (s.label(several), s.xy(f)))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    };
    let mut faults: Vec<XySeries> = Vec::new();
    for s in &all {
        for (what, f) in [("p50", p50_of as fn(&_) -> _), ("p99", p99_of)] {
            let p = s.xy(f);
            if !p.is_empty() {
                faults.push((format!("{} {what}", s.label(several)), p));
            }
        }
    }
    let plots: [(&str, &str, &str, Vec<XySeries>, bool); 4] = [
        (
            "sweep-blackout",
            "Blackout against guest RAM (expected flat)",
            "blackout (ms)",
            one(blackout_of),
            false,
        ),
        (
            "sweep-total-time",
            "Total migration time against guest RAM (expected linear)",
            "total time (s)",
            one(total_of),
            false,
        ),
        (
            "sweep-fault-latency",
            "Guest-seen fault latency p50 and p99 against guest RAM (expected flat)",
            "fault latency (us, log)",
            faults,
            true,
        ),
        (
            "sweep-dst-extra-memory",
            "Destination extra memory against guest RAM (anon + page tables + staging)",
            "destination extra memory (MiB)",
            one(|s| s.dst_extra_mib),
            false,
        ),
    ];
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|source| ReportError::Io {
        what: "creating",
        path: pdir.clone(),
        source,
    })?;
    for (file, title, y_desc, series, log_y) in plots {
        if series.is_empty() {
            continue;
        }
        let file = format!("plots/{file}.svg");
        size_chart(&dir.join(&file), title, y_desc, &series, log_y)?;
        out.push((title.to_string(), file));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{by_names, Pattern, Strategy};
    use migration::types::Backing;

    #[test]
    fn sizes_parse_with_their_suffixes_and_sort() {
        assert_eq!(parse_size("256M"), Ok(256));
        assert_eq!(parse_size("4G"), Ok(4096));
        assert_eq!(parse_size(" 2gib "), Ok(2048));
        assert_eq!(parse_size("512MiB"), Ok(512));
        assert_eq!(
            parse_sizes("8G,256M, 1G,4G").unwrap(),
            vec![256, 1024, 4096, 8192]
        );
        assert_eq!(parse_sizes(DEFAULT_SIZES).unwrap().len(), 4);
        // A trailing comma is harmless.
        assert_eq!(parse_sizes("64M,").unwrap(), vec![64]);
    }

    #[test]
    fn bad_sizes_are_clear_errors() {
        for bad in ["", "256", "G", "4T", "1.5G", "-1G", "4 G G", "0x10M", "4K"] {
            match parse_size(bad) {
                Err(SweepError::BadSize(t)) => assert_eq!(t, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(parse_size("32M"), Err(SweepError::TooSmall("32M".into())));
        assert_eq!(parse_size("0G"), Err(SweepError::TooSmall("0G".into())));
        assert_eq!(
            parse_size("2048G"),
            Err(SweepError::TooLarge("2048G".into()))
        );
        assert!(matches!(
            parse_size("99999999999999999999999G"),
            Err(SweepError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("18014398509481984G"),
            Err(SweepError::TooLarge(_))
        ));
        assert_eq!(parse_sizes(" , "), Err(SweepError::NoSizes));
        assert_eq!(
            parse_sizes("1G,1024M"),
            Err(SweepError::Duplicate("1024M".into(), 1024))
        );
        let msg = parse_sizes("256M,lots").unwrap_err().to_string();
        assert!(
            msg.contains("\"lots\"") && msg.contains("256M or 4G"),
            "{msg}"
        );
    }

    #[test]
    fn vcpu_lists_parse_and_bad_ones_are_clear_errors() {
        assert_eq!(parse_vcpus("2,1").unwrap(), vec![1, 2]);
        assert_eq!(parse_vcpus(DEFAULT_VCPUS).unwrap(), vec![1, 2]);
        assert_eq!(parse_vcpus(""), Err(SweepError::NoVcpus));
        for bad in ["0", "65", "x", "-1", "1.5"] {
            assert_eq!(parse_vcpus(bad), Err(SweepError::BadVcpus(bad.into())));
        }
        assert_eq!(parse_vcpus("1,1"), Err(SweepError::DuplicateVcpus(1)));
    }

    #[test]
    fn expansion_covers_sizes_and_vcpus_with_unique_names() {
        let base = by_names(&[DEFAULT_BASE.into()]).unwrap();
        let pts = expand(&base, &[256, 8192], &[1, 2], None).unwrap();
        let names: Vec<_> = pts.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shmem-4k-staged-random-loopback-256m-1vcpu",
                "shmem-4k-staged-random-loopback-8192m-1vcpu",
                "shmem-4k-staged-random-loopback-256m-2vcpu",
                "shmem-4k-staged-random-loopback-8192m-2vcpu",
            ]
        );
        for s in &pts {
            assert_eq!(s.sweep_of.as_deref(), Some(DEFAULT_BASE));
            assert_eq!(s.backing, Backing::Shmem);
            assert_eq!(s.strategy, Strategy::FourKStaged);
            assert_eq!(s.pattern, Pattern::Random);
        }
        assert_eq!((pts[0].memory_mib, pts[0].vcpus), (256, Some(1)));
        assert_eq!((pts[3].memory_mib, pts[3].vcpus), (8192, Some(2)));
        assert_eq!(pts[0].passes, Some(24));
        assert_eq!(pts[1].passes, Some(6));
        let fixed = expand(&base, &[256], &[1], Some(3)).unwrap();
        assert_eq!(fixed[0].passes, Some(3));
        // A size in huge pages only where it is a whole number of them.
        let gig = by_names(&["hugetlb-1g-4k-staged-random-loopback".into()]).unwrap();
        let err = expand(&gig, &[1536], &[1], None).unwrap_err();
        assert!(err.to_string().contains("1024 MiB each"), "{err}");
        assert!(expand(&gig, &[2048], &[1], None).is_ok());
        let peer = by_names(&["shmem-qemu-random-loopback".into()]).unwrap();
        assert!(matches!(
            expand(&peer, &[256], &[1], None),
            Err(SweepError::Peer(_))
        ));
        assert_eq!(expand(&[], &[256], &[1], None), Err(SweepError::NoBase));
        assert_eq!(expand(&base, &[], &[1], None), Err(SweepError::NoSizes));
        assert_eq!(expand(&base, &[256], &[], None), Err(SweepError::NoVcpus));
    }

    #[test]
    fn passes_shrink_with_size_but_not_below_six() {
        assert_eq!(default_passes(64), 24);
        assert_eq!(default_passes(256), 24);
        assert_eq!(default_passes(512), 12);
        assert_eq!(default_passes(1024), 6);
        assert_eq!(default_passes(8192), 6);
        assert_eq!(default_passes(0), 24);
    }

    #[test]
    fn a_point_that_does_not_fit_says_why() {
        let base = by_names(&[DEFAULT_BASE.into()]).unwrap();
        let pts = expand(&base, &[1024, 8192], &[1], None).unwrap();
        let host = HostMemory {
            available_kb: 12 << 20,
            huge_free: [(2048, 0), (1 << 20, 0)],
        };
        assert_eq!(fits_in(&pts[0], &host), Ok(()));
        let why = fits_in(&pts[1], &host).unwrap_err().to_string();
        assert!(
            why.contains("needs 18432 MiB") && why.contains("12288 MiB available"),
            "{why}"
        );
        // Free huge pages already in the pool count for a hugetlb backing.
        let huge = by_names(&["hugetlb-2m-4k-staged-random-loopback".into()]).unwrap();
        let hp = expand(&huge, &[8192], &[1], None).unwrap();
        let pooled = HostMemory {
            available_kb: 4 << 20,
            huge_free: [(2048, 8192), (1 << 20, 0)],
        };
        assert_eq!(fits_in(&hp[0], &pooled), Ok(()));
        assert!(fits_in(&pts[1], &pooled).is_err());
    }

    #[test]
    fn lines_are_fitted_and_flatness_judged() {
        let (a, b, r2) = fit_line(&[(0.25, 0.6), (1.0, 1.5), (4.0, 5.1), (8.0, 9.9)]).unwrap();
        assert!(
            (b - 1.2).abs() < 0.05 && a > 0.0 && r2 > 0.99,
            "{a} {b} {r2}"
        );
        assert_eq!(fit_line(&[(1.0, 1.0)]), None);
        assert_eq!(fit_line(&[(1.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(linear(&[(1.0, 1.0), (2.0, 2.0)]).0, Verdict::NotMeasured);
        assert_eq!(
            linear(&[(0.25, 0.6), (1.0, 1.5), (4.0, 5.1), (8.0, 9.9)]).0,
            Verdict::Met
        );
        // Half a second of noise at the smallest size (the first merged sweep here) is no
        // curvature: the line is judged against the largest total.
        let (v, why) = linear(&[(0.25, 1.48), (1.0, 4.47), (4.0, 21.26), (8.0, 42.67)]);
        assert_eq!(v, Verdict::Met, "{why}");
        assert!(why.contains("of the largest total"), "{why}");
        // Quadratic growth: far from any line.
        let (v, why) = linear(&[(0.25, 0.1), (1.0, 1.0), (4.0, 16.0), (8.0, 64.0)]);
        assert_eq!(v, Verdict::Missed, "{why}");
        let (v, why) = flat(&[(0.25, 40.0), (8.0, 50.0)], 1.5, 0.0, "us");
        assert_eq!(v, Verdict::Met);
        assert!(why.contains("40.0-50.0 us over 256 MiB-8 GiB"), "{why}");
        let (v, why) = flat(&[(0.25, 40.0), (1.0, 45.0), (8.0, 90.0)], 1.5, 0.0, "us");
        assert_eq!(v, Verdict::Missed);
        assert!(why.contains("highest at 8 GiB"), "{why}");
        // Sub-millisecond blackouts within the slack are flat whatever their ratio.
        assert_eq!(
            flat(&[(0.25, 0.2), (8.0, 0.9)], 2.0, 1.0, "ms").0,
            Verdict::Met
        );
        assert_eq!(flat(&[(1.0, 1.0)], 2.0, 1.0, "ms").0, Verdict::NotMeasured);
    }

    fn point(mib: u64, vcpus: u32, blackout: f64, total: f64, p50: f64) -> ScenarioResult {
        let mut r = ScenarioResult::new(
            &point_name(DEFAULT_BASE, mib, vcpus),
            "shmem",
            "4k-staged",
            "loopback",
            "random",
        );
        r.status = Status::Ok;
        r.sweep_of = Some(DEFAULT_BASE.into());
        r.memory_mib = Some(mib);
        r.vcpus = Some(vcpus);
        r.blackout_ms = Some(blackout);
        r.total_s = Some(total);
        r.fault_us.count = 100;
        r.fault_us.p50 = p50;
        r.fault_us.p99 = p50 * 3.0;
        r.dst_extra_mib = Some(10.0 + mib as f64 / 512.0);
        r
    }

    #[test]
    fn the_report_has_a_sweep_section_verdicts_and_plots() {
        let d = tempfile::tempdir().unwrap();
        let mut failed = point(8192, 2, 1.0, 1.0, 1.0);
        failed.status = Status::Failed;
        failed.error = Some("not run: needs 18432 MiB".into());
        let r = Results {
            version: crate::results::RESULTS_VERSION,
            quick: false,
            host_checks: BTreeMap::new(),
            scenarios: vec![
                point(256, 1, 1.2, 0.6, 150.0),
                point(1024, 1, 1.4, 1.5, 160.0),
                point(4096, 1, 1.3, 5.1, 170.0),
                point(8192, 1, 1.5, 9.9, 400.0),
                point(256, 2, 1.1, 0.5, 140.0),
                point(1024, 2, 1.2, 1.2, 150.0),
                failed,
            ],
        };
        let rows = check_targets(&r);
        assert_eq!(rows.len(), 8);
        let verdict = |vcpus: u32, what: &str| {
            rows.iter()
                .find(|t| {
                    t.scenario.contains(&format!("({vcpus} vCPU)")) && t.target.contains(what)
                })
                .map(|t| t.verdict)
        };
        assert_eq!(verdict(1, "blackout"), Some(Verdict::Met));
        assert_eq!(verdict(1, "linear"), Some(Verdict::Met));
        assert_eq!(verdict(1, "p50"), Some(Verdict::Missed));
        // Two sizes: a line through them says nothing.
        assert_eq!(verdict(2, "linear"), Some(Verdict::NotMeasured));
        let mut md = String::new();
        section(&mut md, &r);
        assert!(md.contains("## Size sweep"), "{md}");
        assert!(
            md.contains("| shmem-4k-staged-random-loopback | 8192 | 1 |"),
            "{md}"
        );
        assert!(md.contains("not run: needs 18432 MiB"), "{md}");
        assert!(md.contains("fault p50 flat"), "{md}");
        let plots = draw_plots(d.path(), &r).unwrap();
        let files: Vec<_> = plots.iter().map(|(_, f)| f.as_str()).collect();
        assert_eq!(
            files,
            [
                "plots/sweep-blackout.svg",
                "plots/sweep-total-time.svg",
                "plots/sweep-fault-latency.svg",
                "plots/sweep-dst-extra-memory.svg",
            ]
        );
        for f in files {
            let svg = std::fs::read_to_string(d.path().join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<circle"), "{f}");
            assert!(svg.contains("1 vCPU") && svg.contains("2 vCPUs"), "{f}");
        }
        // No sweep: no rows, no section, no plots.
        let plain = Results {
            scenarios: vec![ScenarioResult::new(
                "s",
                "shmem",
                "4k-staged",
                "loopback",
                "random",
            )],
            ..r
        };
        assert!(check_targets(&plain).is_empty());
        let mut md = String::new();
        section(&mut md, &plain);
        assert!(md.is_empty());
        assert!(draw_plots(d.path(), &plain).unwrap().is_empty());
    }
}
