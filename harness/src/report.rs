//! The human-facing outputs: `report.md` (scenarios side by side, each figure next to its limit
//! as a ratio, and where each target stands), SVG plots (fault latency CDF per strategy, fault
//! latency over time, background throughput over time), and a text comparison of two runs.

use crate::histogram::LatencyHistogram;
use crate::results::{self, kind, Results, ResultsError, ScenarioResult, Status};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Errors from report generation.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("drawing plot {path}: {source}")]
    Plot {
        path: PathBuf,
        #[source]
        source: PlotError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The project's targets.
pub mod targets {
    /// 4k-staged loopback guest-seen p50 within this factor of the limit's p50.
    pub const P50_RATIO: f64 = 1.2;
    /// ... and p99 within this factor of the limit's p99.
    pub const P99_RATIO: f64 = 3.0;
    /// On 1 GiB pages, huge's p50 at least this many times 4k-staged's.
    pub const HUGE_OVER_4K: f64 = 1000.0;
    /// Collapse vCPU stall per 1 GiB region, us.
    pub const COLLAPSE_STALL_US: f64 = 1000.0;
    /// Background throughput as a fraction of raw TCP.
    pub const THROUGHPUT_FRACTION: f64 = 0.8;
    /// Background throughput as a fraction of raw TCP with the guest's vCPUs spinning beside
    /// it (`raw_loaded_gbps`), on loopback ...
    pub const LOADED_FRACTION_LOOPBACK: f64 = 0.90;
    /// ... and on the veth links.
    pub const LOADED_FRACTION_VETH: f64 = 0.95;
    /// 1 GiB `huge`: the guest-seen stall within this factor of the VMM's fault (either way).
    pub const HUGE_STALL_RATIO: f64 = 2.0;
    /// Blackout, ms.
    pub const BLACKOUT_MS: f64 = 5.0;
    /// TLS: 4 KiB fault p50 at most this factor of the same scenario in plaintext.
    pub const TLS_P50_RATIO: f64 = 1.10;
    /// TLS: background throughput at least this fraction of the same scenario in plaintext.
    pub const TLS_THROUGHPUT_FRACTION: f64 = 0.8;
}

/// Where a scenario stands against a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    NotMeasured,
}

impl Verdict {
    pub(crate) fn of(ok: bool) -> Self {
        if ok {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    pub(crate) fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One row of the targets table.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetCheck {
    pub target: String,
    pub scenario: String,
    pub value: String,
    pub verdict: Verdict,
}

fn ok_scenarios(r: &Results) -> impl Iterator<Item = &ScenarioResult> {
    r.scenarios.iter().filter(|s| s.status == Status::Ok)
}

/// Ok scenarios run by our VMM (not the peer): the project's own targets apply to these.
fn our_scenarios(r: &Results) -> impl Iterator<Item = &ScenarioResult> {
    ok_scenarios(r).filter(|s| s.peer.is_none())
}

/// Checks every target against every scenario of ours it applies to, then the targets against
/// the peer ([`crate::peer_report::check_targets`]); a target no scenario measured gets one
/// "not measured" row.
pub fn check_targets(r: &Results) -> Vec<TargetCheck> {
    use targets::*;
    let mut out = Vec::new();
    let push_or_missing = |target: String, rows: Vec<TargetCheck>, out: &mut Vec<_>| {
        if rows.is_empty() {
            out.push(TargetCheck {
                target,
                scenario: "-".into(),
                value: "-".into(),
                verdict: Verdict::NotMeasured,
            });
        } else {
            out.extend(rows);
        }
    };

    let rows = our_scenarios(r)
        .filter(|s| s.strategy == "4k-staged" && s.link == "loopback")
        .filter(|s| s.fault_us.count > 0 && s.limit_us.count > 0)
        .flat_map(|s| {
            let p50 = s.fault_us.p50 / s.limit_us.p50;
            let p99 = s.fault_us.p99 / s.limit_us.p99;
            [
                TargetCheck {
                    target: format!("4k-staged loopback p50 <= {P50_RATIO}x limit"),
                    scenario: s.name.clone(),
                    value: format!(
                        "{:.1} / {:.1} us = {p50:.2}x",
                        s.fault_us.p50, s.limit_us.p50
                    ),
                    verdict: Verdict::of(p50 <= P50_RATIO),
                },
                TargetCheck {
                    target: format!("4k-staged loopback p99 <= {P99_RATIO}x limit"),
                    scenario: s.name.clone(),
                    value: format!(
                        "{:.1} / {:.1} us = {p99:.2}x",
                        s.fault_us.p99, s.limit_us.p99
                    ),
                    verdict: Verdict::of(p99 <= P99_RATIO),
                },
            ]
        })
        .collect();
    push_or_missing(
        "4k-staged loopback fault latency vs limit".into(),
        rows,
        &mut out,
    );

    let mut rows = Vec::new();
    for s in our_scenarios(r).filter(|s| s.backing == "hugetlb-1g" && s.strategy == "4k-staged") {
        let huge = our_scenarios(r).find(|h| {
            h.backing == s.backing
                && h.strategy == "huge"
                && h.link == s.link
                && h.pattern == s.pattern
        });
        if let Some(h) = huge {
            // The VMM side sees every fault. The guest cannot time a fault on the 1 GiB page
            // holding its own code and stack (the faulting access is an instruction fetch or a
            // push, not its timed load), which is what the huge strategy's one fault is.
            let (side, a, b) = if s.vmm_fault_us.count > 0 && h.vmm_fault_us.count > 0 {
                ("VMM side", &s.vmm_fault_us, &h.vmm_fault_us)
            } else {
                ("guest side", &s.fault_us, &h.fault_us)
            };
            if a.count > 0 && b.count > 0 && a.p50 > 0.0 {
                let ratio = b.p50 / a.p50;
                rows.push(TargetCheck {
                    target: format!("1 GiB: huge p50 >= {HUGE_OVER_4K}x 4k-staged p50"),
                    scenario: format!("{} vs {}", s.name, h.name),
                    value: format!(
                        "{side}: 4k-staged {:.1} us (n={}) vs huge {:.1} us (n={}) = {}",
                        a.p50,
                        a.count,
                        b.p50,
                        b.count,
                        times(ratio)
                    ),
                    verdict: Verdict::of(ratio >= HUGE_OVER_4K),
                });
            }
        }
    }
    push_or_missing(
        format!("1 GiB: huge p50 >= {HUGE_OVER_4K}x 4k-staged p50"),
        rows,
        &mut out,
    );

    let rows = our_scenarios(r)
        .filter(|s| s.collapse_stall_us.count > 0)
        .map(|s| TargetCheck {
            target: format!("collapse stall <= {COLLAPSE_STALL_US} us per region"),
            scenario: s.name.clone(),
            value: format!(
                "max {:.0} us over {} collapses",
                s.collapse_stall_us.max, s.collapse_stall_us.count
            ),
            verdict: Verdict::of(s.collapse_stall_us.max <= COLLAPSE_STALL_US),
        })
        .collect();
    push_or_missing(
        format!("collapse stall <= {COLLAPSE_STALL_US} us per region"),
        rows,
        &mut out,
    );

    // A link with a fault pauses the push for the outage: its throughput says nothing about
    // the link (see the "Postcopy recovery" section).
    let rows = our_scenarios(r)
        .filter(|s| s.link_fault.is_none())
        .filter_map(|s| Some((s, s.throughput_gbps?, s.raw_throughput_gbps?)))
        .filter(|(_, _, raw)| *raw > 0.0)
        .map(|(s, t, raw)| TargetCheck {
            target: format!(
                "throughput >= {:.0}% of raw TCP",
                THROUGHPUT_FRACTION * 100.0
            ),
            scenario: s.name.clone(),
            value: format!("{t:.2} / {raw:.2} Gbit/s = {:.0}%", t / raw * 100.0),
            verdict: Verdict::of(t >= THROUGHPUT_FRACTION * raw),
        })
        .collect();
    push_or_missing(
        format!(
            "throughput >= {:.0}% of raw TCP",
            THROUGHPUT_FRACTION * 100.0
        ),
        rows,
        &mut out,
    );

    // Against raw TCP with the guest's vCPUs spinning beside it: the honest limit while the
    // guest runs. Links with a fault are left out (as above), and TLS links, whose bar is
    // their plaintext twin (below).
    for (link, fraction) in [
        ("loopback", LOADED_FRACTION_LOOPBACK),
        ("veth", LOADED_FRACTION_VETH),
    ] {
        let target = format!(
            "background >= {:.0}% of raw loaded TCP ({link})",
            fraction * 100.0
        );
        let rows = our_scenarios(r)
            .filter(|s| s.link_fault.is_none() && !s.link.ends_with("-tls"))
            .filter(|s| s.link.split('-').next() == Some(link))
            .filter_map(|s| Some((s, s.throughput_gbps?, s.raw_loaded_gbps?)))
            .filter(|(_, _, raw)| *raw > 0.0)
            .map(|(s, t, raw)| TargetCheck {
                target: target.clone(),
                scenario: s.name.clone(),
                value: match s.raw_memory_gbps.filter(|m| *m > 0.0) {
                    Some(m) => format!(
                        "{t:.2} / {raw:.2} Gbit/s = {:.0}% (of raw memory TCP {m:.2}: {:.0}%)",
                        t / raw * 100.0,
                        t / m * 100.0
                    ),
                    None => format!("{t:.2} / {raw:.2} Gbit/s = {:.0}%", t / raw * 100.0),
                },
                verdict: Verdict::of(t >= fraction * raw),
            })
            .collect();
        push_or_missing(target, rows, &mut out);
    }

    // The 1 GiB `huge` baseline's one whole-page fault, as the guest's progress shows it (its
    // longest stall) against the VMM's longest fault.
    let target = format!("1 GiB huge: guest stall within {HUGE_STALL_RATIO}x of the VMM's fault");
    let rows = our_scenarios(r)
        .filter(|s| s.backing == "hugetlb-1g" && s.strategy == "huge")
        .filter(|s| s.vmm_fault_us.count > 0 && s.vmm_fault_us.max > 0.0)
        .filter(|s| s.guest_stall_threshold_us.is_some() || s.guest_stall_us.count > 0)
        .map(|s| {
            let (g, v) = (s.guest_stall_us.max, s.vmm_fault_us.max);
            let q = g / v;
            TargetCheck {
                target: target.clone(),
                scenario: s.name.clone(),
                value: format!(
                    "guest longest stall {g:.0} us (n={}) / VMM longest fault {v:.0} us (n={}) = {}",
                    s.guest_stall_us.count,
                    s.vmm_fault_us.count,
                    times(q)
                ),
                verdict: Verdict::of((1.0 / HUGE_STALL_RATIO..=HUGE_STALL_RATIO).contains(&q)),
            }
        })
        .collect();
    push_or_missing(target, rows, &mut out);

    let rows = our_scenarios(r)
        .filter_map(|s| Some((s, s.blackout_ms?)))
        .map(|(s, b)| TargetCheck {
            target: format!("blackout <= {BLACKOUT_MS} ms"),
            scenario: s.name.clone(),
            value: format!("{b:.2} ms"),
            verdict: Verdict::of(b <= BLACKOUT_MS),
        })
        .collect();
    push_or_missing(format!("blackout <= {BLACKOUT_MS} ms"), rows, &mut out);

    let mut rows = Vec::new();
    for (p, t) in tls_pairs(r) {
        if p.fault_us.count > 0 && t.fault_us.count > 0 && p.fault_us.p50 > 0.0 {
            let q = t.fault_us.p50 / p.fault_us.p50;
            rows.push(TargetCheck {
                target: format!("TLS fault p50 <= {TLS_P50_RATIO}x plaintext"),
                scenario: format!("{} vs {}", t.name, p.name),
                value: format!(
                    "{:.1} us (n={}) / {:.1} us (n={}) = {q:.2}x",
                    t.fault_us.p50, t.fault_us.count, p.fault_us.p50, p.fault_us.count
                ),
                verdict: Verdict::of(q <= TLS_P50_RATIO),
            });
        }
        if let (Some(tg), Some(pg)) = (t.throughput_gbps, p.throughput_gbps) {
            if pg > 0.0 {
                rows.push(TargetCheck {
                    target: format!(
                        "TLS background >= {:.0}% of plaintext",
                        TLS_THROUGHPUT_FRACTION * 100.0
                    ),
                    scenario: format!("{} vs {}", t.name, p.name),
                    value: format!("{tg:.2} / {pg:.2} Gbit/s = {:.0}%", tg / pg * 100.0),
                    verdict: Verdict::of(tg >= TLS_THROUGHPUT_FRACTION * pg),
                });
            }
        }
    }
    push_or_missing(
        "TLS vs plaintext (fault p50, background)".into(),
        rows,
        &mut out,
    );
    out.extend(crate::peer_report::check_targets(r));
    out.extend(crate::sweep::check_targets(r));
    out
}

/// A ratio as "123x", "1.23x" or "0.012x".
fn times(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

/// `part` as a whole percentage of `whole` ("-" if either is missing or `whole` is not positive).
fn percent_of(part: Option<f64>, whole: Option<f64>) -> String {
    match (part, whole) {
        (Some(p), Some(w)) if w > 0.0 => format!("{:.0}%", p / w * 100.0),
        _ => "-".into(),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn count_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// File-name-safe form of a label.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Scenarios grouped by everything but the strategy (the plots compare strategies); each
/// sweep point is a group of its own (its size and vCPUs in the key).
fn strategy_groups(r: &Results) -> BTreeMap<String, Vec<&ScenarioResult>> {
    let mut g: BTreeMap<String, Vec<&ScenarioResult>> = BTreeMap::new();
    for s in ok_scenarios(r) {
        let mut key = format!("{}-{}-{}", s.link, s.backing, s.pattern);
        if let (Some(_), Some(mib)) = (&s.sweep_of, s.memory_mib) {
            key.push_str(&format!("-{mib}m-{}vcpu", s.vcpus.unwrap_or(1)));
        }
        g.entry(key).or_default().push(s);
    }
    g
}

/// The markdown report text. `plots` are paths relative to the report's directory.
/// What the native-strategy scenarios got: served natively, or fell back (and why).
fn native_section(md: &mut String, r: &Results) {
    let native: Vec<&ScenarioResult> = r
        .scenarios
        .iter()
        .filter(|s| s.strategy == "native")
        .collect();
    if native.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Native strategy\n");
    for s in native {
        let modes = if s.serve_modes.is_empty() {
            "not reported".to_string()
        } else {
            s.serve_modes.join(", ")
        };
        let _ = match &s.native_fallback {
            Some(why) => writeln!(
                md,
                "- {}: **fell back to 4k-staged** (serve mode {modes}): {why}",
                s.name
            ),
            None => writeln!(md, "- {}: served natively (serve mode {modes})", s.name),
        };
    }
}

/// Each TLS scenario (`NAME-tls`) beside its plaintext twin (`NAME`) in the same results, both
/// ok.
fn tls_pairs(r: &Results) -> Vec<(&ScenarioResult, &ScenarioResult)> {
    ok_scenarios(r)
        .filter_map(|t| {
            let plain = t.name.strip_suffix("-tls")?;
            Some((ok_scenarios(r).find(|p| p.name == plain)?, t))
        })
        .collect()
}

/// TLS vs plaintext: guest-seen and VMM-side 4 KiB fault p50/p99 and background throughput of
/// each pair, as TLS / plaintext.
fn tls_section(md: &mut String, r: &Results) {
    let pairs = tls_pairs(r);
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## TLS vs plaintext\n");
    let _ = writeln!(
        md,
        "Each TLS 1.3 scenario beside the same scenario in plaintext, as TLS / plaintext. \
         Targets: fault p50 at most {:.0}% more, background throughput at least {:.0}%. Guest = \
         the guest's timed slow loads; VMM = fault read to CONTINUE done.\n",
        (targets::TLS_P50_RATIO - 1.0) * 100.0,
        targets::TLS_THROUGHPUT_FRACTION * 100.0
    );
    let _ = writeln!(
        md,
        "| pair | guest faults plain / TLS | guest p50 plain | TLS | ratio | guest p99 plain | TLS | ratio | \
         VMM p50 plain | TLS | ratio | VMM p99 plain | TLS | ratio | Gbit/s plain | TLS | ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (p, t) in pairs {
        let _ = writeln!(
            md,
            "| {} | {} / {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            t.name,
            p.fault_us.count,
            t.fault_us.count,
            p.fault_us.p50,
            t.fault_us.p50,
            ratio(t.fault_us.p50, p.fault_us.p50),
            p.fault_us.p99,
            t.fault_us.p99,
            ratio(t.fault_us.p99, p.fault_us.p99),
            p.vmm_fault_us.p50,
            t.vmm_fault_us.p50,
            ratio(t.vmm_fault_us.p50, p.vmm_fault_us.p50),
            p.vmm_fault_us.p99,
            t.vmm_fault_us.p99,
            ratio(t.vmm_fault_us.p99, p.vmm_fault_us.p99),
            opt(p.throughput_gbps, 2),
            opt(t.throughput_gbps, 2),
            ratio(
                t.throughput_gbps.unwrap_or(0.0),
                p.throughput_gbps.unwrap_or(0.0)
            ),
        );
    }
}

fn count_u32(v: Option<u32>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The scenarios whose link injected a fault (failed ones included: a fault that never fired
/// shows as 0 resets): what the relay did, what both sides counted, and the outage faults next
/// to the normal ones of the same scenario.
fn recovery_section(md: &mut String, r: &Results) {
    let faulty: Vec<&ScenarioResult> = r
        .scenarios
        .iter()
        .filter(|s| s.link_fault.is_some())
        .collect();
    if faulty.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "
## Postcopy recovery
"
    );
    let _ = writeln!(
        md,
        "Links with a fault: a relay between source and destination injects it during the \
         postcopy push; both sides pause (\"postcopy-paused\"), the source reconnects into the \
         same session and the push goes on. \"outage faults\" = the faults whose page fetch \
         failed at least once because the link was down (VMM side, `outage_fault_ns`); they \
         are *not* in the normal fault figures (VMM p50/p99 here and in the tables above, and \
         the CDF plots). The guest-side outage faults are an estimate: the guest's slowest \
         fault samples, as many as the VMM counted outage faults. The throughput target is not \
         applied to these scenarios (the push stands still during the outage).\n"
    );
    for s in &faulty {
        let _ = writeln!(
            md,
            "- {}: {}",
            s.name,
            s.link_fault.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        md,
        "\n| scenario | status | relay resets | recoveries src / dst | paused ms src / dst | \
         outage faults | outage p50 | outage p99 | outage max | normal VMM faults | normal VMM p50 | \
         normal VMM p99 | guest outage faults | guest outage p50 / max | normal guest p50 / p99 |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in faulty {
        let (o, v, go, g) = (
            &s.outage_fault_us,
            &s.vmm_fault_us,
            &s.guest_outage_fault_us,
            &s.fault_us,
        );
        let status = match (s.status, s.link_resets) {
            (_, Some(0)) => "**fault never fired**",
            (Status::Ok, _) => "ok",
            (Status::Failed, _) => "**failed**",
            (Status::Skipped, _) => "not run",
        };
        let _ = writeln!(
            md,
            "| {} | {status} | {} | {} / {} | {} / {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} / {:.1} | {:.1} / {:.1} |",
            s.name,
            count_opt(s.link_resets),
            count_u32(s.recoveries),
            count_u32(s.dst_recoveries),
            opt(s.paused_ms, 1),
            opt(s.dst_paused_ms, 1),
            o.count,
            o.p50,
            o.p99,
            o.max,
            v.count,
            v.p50,
            v.p99,
            go.count,
            go.p50,
            go.max,
            g.p50,
            g.p99
        );
    }
}

/// The guest's faults against the loaded limit: the same userfault round trip with the TCP
/// round trip measured beside a raw bulk stream and spinning threads (information; the targets
/// stay against the limit).
fn loaded_limit_section(md: &mut String, r: &Results) {
    let rows: Vec<&ScenarioResult> = ok_scenarios(r)
        .filter(|s| s.loaded_limit_us.count > 0 && s.fault_us.count > 0)
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Faults against a busy link (us)\n");
    let _ = writeln!(
        md,
        "The loaded limit is the limit's userfault round trip convolved with the 4 KiB TCP round \
         trip measured while a raw bulk stream (1 MiB writes) runs on a second connection of the \
         same link and one thread per vCPU spins: the request and the reply wait for CPUs \
         behind the stream's system calls, as a fault's do behind the push. What a fault's tail \
         has above it is the VMM's; up to it, the platform's. The targets stay against the \
         limit.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | TCP RTT p50 / p99 | loaded TCP RTT p50 / p99 | loaded limit p50 / p99 | guest p50 / p99 | guest / loaded limit p50 / p99 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for s in rows {
        let (t, tl, ll, f) = (
            &s.tcp_rtt_us,
            &s.tcp_rtt_loaded_us,
            &s.loaded_limit_us,
            &s.fault_us,
        );
        let _ = writeln!(
            md,
            "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} |",
            s.name,
            t.p50,
            t.p99,
            tl.p50,
            tl.p99,
            ll.p50,
            ll.p99,
            f.p50,
            f.p99,
            ratio(f.p50, ll.p50),
            ratio(f.p99, ll.p99)
        );
    }
}

/// Says what the limit column is made of, with the vCPU round trip(s) of this run.
fn limit_explanation(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "**The limit** = the raw *vCPU* userfault round trip with the page already local, as the \
         guest sees it (`vmm fault-limit`: the workload guest's first store to each page, every \
         page served by a minimal handler), convolved with the raw 4 KiB request/reply TCP round \
         trip on the scenario's link; both measured in this run. Column \"limit from\" says \
         `vcpu` for that, or `thread` where the vCPU measurement failed and the limit fell back \
         to the thread one. \"thread limit\" = the raw userfault round trip served to a thread \
         (\"uffd\", no vCPU, no KVM) convolved with the same TCP round trip: an optimistic floor, \
         kept for comparison.\n"
    );
    let mut seen: Vec<(String, String)> = Vec::new();
    for s in &r.scenarios {
        if let (Some(b), Some(sv)) = (&s.vcpu_uffd_backing, &s.vcpu_uffd_service) {
            if seen.iter().any(|(x, _)| x == b) {
                continue;
            }
            seen.push((b.clone(), sv.clone()));
            let (v, vv) = (&s.vcpu_uffd_rtt_us, &s.vcpu_uffd_vmm_us);
            let _ = writeln!(
                md,
                "- vCPU userfault round trip on {b} ({sv}): guest-seen p50 {:.1} / p99 {:.1} us, \
                 VMM-side p50 {:.1} / p99 {:.1} us ({} faults); thread round trip p50 {:.1} / \
                 p99 {:.1} us.",
                v.p50, v.p99, vv.p50, vv.p99, v.count, s.uffd_rtt_us.p50, s.uffd_rtt_us.p99
            );
        }
    }
    for s in r.scenarios.iter().filter(|s| s.vcpu_limit_error.is_some()) {
        let _ = writeln!(
            md,
            "- {}: no vCPU round trip ({}); its limit is the thread limit.",
            s.name,
            s.vcpu_limit_error.as_deref().unwrap_or("")
        );
    }
    if !seen.is_empty() {
        let _ = writeln!(
            md,
            "\nHuge and guest_memfd backings are measured on shmem: the 4k-staged strategy serves \
             their faults from a shmem staging mapping (MINOR + 4 KiB UFFDIO_CONTINUE).\n"
        );
    }
}

/// Blocktime per vCPU as "a / b ms" (or "-").
fn per_vcpu_ms(v: &[f64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// "## Guest stalls": the guest's view of every stall next to its timed loads and the VMM's
/// faults.
fn stall_section(md: &mut String, r: &Results) {
    let rows: Vec<&ScenarioResult> = ok_scenarios(r)
        .filter(|s| s.guest_stall_us.count > 0 || s.guest_stall_threshold_us.is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Guest stalls (us)\n");
    let _ = writeln!(
        md,
        "A stall = an iteration of the guest's inner loop (one page: timed load, verification, \
         maybe rewrite; normally a few us) that took longer than the threshold the guest states, \
         per vCPU, in the same destination passes as the guest's timed faults. It counts what \
         the timed load cannot: a fault on a code, stack, page-table or generation-array page \
         (the 1 GiB `huge` baseline's one whole-page fault), and the host not running the vCPU. \
         Blocktime = the VMM's own per-vCPU blocked time (userfaultfd thread ids), ms per vCPU.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | threshold | stalls | stall p50 | stall p99 | stall max | timed p99 | timed max | \
         VMM p99 | VMM max | longest stall / longest VMM fault | blocktime ms per vCPU (VMM) |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in rows {
        let st = &s.guest_stall_us;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            s.name,
            opt(s.guest_stall_threshold_us, 0),
            st.count,
            st.p50,
            st.p99,
            st.max,
            s.fault_us.p99,
            s.fault_us.max,
            s.vmm_fault_us.p99,
            s.vmm_fault_us.max,
            ratio(st.max, s.vmm_fault_us.max),
            per_vcpu_ms(&s.blocktime_ms)
        );
    }
}

/// "## Fault phases": each phase's summary, then the tail table (faults above the p99).
fn phase_section(md: &mut String, r: &Results) {
    use crate::guest_output::FAULT_PHASES;
    let rows: Vec<&ScenarioResult> = ok_scenarios(r)
        .filter(|s| !s.fault_phase_us.is_empty() || s.fault_tail.is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    // Phases in the remote fault's order, then any other the destination names.
    let mut phases: Vec<String> = FAULT_PHASES.iter().map(|p| p.to_string()).collect();
    for s in &rows {
        let named = s
            .fault_phase_us
            .keys()
            .chain(s.fault_tail.iter().flat_map(|t| t.phase_us.keys()));
        for p in named {
            if !phases.contains(p) {
                phases.push(p.clone());
            }
        }
    }
    let _ = writeln!(md, "\n## Fault phases (us)\n");
    let merged = rows.iter().any(|s| s.runs > 1);
    let _ = writeln!(
        md,
        "Each remote fault timed by phase on the destination (`fault_phase_us`): uffd event to \
         read, request written, the source's receive-to-reply time (echoed in the reply), reply \
         read, stored, CONTINUE/COPY done. Per phase p50 / p99 / max (count).{}\n",
        if merged {
            " **Merged runs**: the destination gives only these figures per run, no histogram: \
             counts are summed, max is the largest, and p50 / p99 are the **median of the \
             runs' figures**, not percentiles of the pooled faults."
        } else {
            ""
        }
    );
    let _ = write!(md, "| scenario |");
    for p in &phases {
        let _ = write!(md, " {p} |");
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "|---|{}", "---:|".repeat(phases.len()));
    for s in &rows {
        let _ = write!(md, "| {} |", s.name);
        for p in &phases {
            match s.fault_phase_us.get(p) {
                Some(st) => {
                    let _ = write!(
                        md,
                        " {:.1} / {:.1} / {:.1} ({}) |",
                        st.p50, st.p99, st.max, st.count
                    );
                }
                None => md.push_str(" - |"),
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\n**Tail**: the faults above the p99 of the total (`slow_faults`, at most 200 per run; \
         merged runs pool them). Per phase, its share of those faults' total time, then the phase \
         that was the longest most often. \"other\" = time no phase accounts for.\n"
    );
    let _ = write!(md, "| scenario | slow faults | mean total us |");
    for p in &phases {
        let _ = write!(md, " {p} |");
    }
    let _ = writeln!(md, " other | dominant phase (faults) |");
    let _ = writeln!(
        md,
        "|---|---:|---:|{}---:|---|",
        "---:|".repeat(phases.len())
    );
    for s in &rows {
        let Some(t) = &s.fault_tail else {
            let _ = writeln!(
                md,
                "| {} | 0 | - |{} - | - |",
                s.name,
                " - |".repeat(phases.len())
            );
            continue;
        };
        let _ = write!(
            md,
            "| {} | {} | {:.1} |",
            s.name,
            t.faults,
            t.total_us / t.faults.max(1) as f64
        );
        for p in &phases {
            let _ = write!(md, " {:.0}% |", t.share(p) * 100.0);
        }
        let dominant = match t.most_dominant() {
            Some((p, n)) => format!("{p} ({n} of {})", t.faults),
            None => "-".into(),
        };
        let _ = writeln!(md, " {:.0}% | {dominant} |", t.unaccounted() * 100.0);
    }
}

pub fn render_markdown(r: &Results, plots: &[(String, String)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Postcopy latency report\n");
    let ok = ok_scenarios(r).count();
    let skipped = r
        .scenarios
        .iter()
        .filter(|s| s.status == Status::Skipped)
        .count();
    let _ = writeln!(
        md,
        "{} scenarios ({} ok, {} failed{}){}. Latencies in microseconds; every figure is shown \
         next to its limit measured in the same run on the same link (see docs/measuring.md).\n",
        r.scenarios.len(),
        ok,
        r.scenarios.len() - ok - skipped,
        if skipped > 0 {
            format!(", {skipped} not run on this host")
        } else {
            String::new()
        },
        if r.quick { ", quick subset" } else { "" }
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| target | scenario | value | verdict |\n|---|---|---|---|"
    );
    for t in check_targets(r) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.target,
            t.scenario,
            t.value,
            t.verdict.text()
        );
    }

    if !r.host_checks.is_empty() {
        let _ = writeln!(md, "\n## Host\n");
        let _ = writeln!(
            md,
            "`vmm probe --json` checks. The `native` strategy (`vmm receive --granularity \
             native`) uses kernel-native 4 KiB faults on huge pages / guest_memfd only where the \
             destination's own probe finds them, and falls back to 4k-staged otherwise.\n"
        );
        for (name, c) in &r.host_checks {
            let _ = writeln!(md, "- `{name}`: **{}**: {}", c.result, c.detail);
        }
    }
    native_section(&mut md, r);

    let _ = writeln!(md, "\n## Fault latency (us)\n");
    let _ = writeln!(
        md,
        "Guest = the guest's timed first load of a page that was slow (> 2 us), in the destination \
         passes that overlapped postcopy (column \"passes\"); limit = see below; VMM = fault \
         read to CONTINUE done (`fault_ns`, one sample per userfault); \"slow after\" = slow \
         accesses in later passes (host noise, collapses), not counted as faults.\n"
    );
    limit_explanation(&mut md, r);
    let _ = writeln!(
        md,
        "| scenario | guest slow accesses | passes | slow after | guest p50 | limit p50 | ratio | guest p99 | limit p99 | ratio | \
         guest p99.9 | guest max | VMM faults | VMM p50 | ratio | VMM p99 | ratio | VMM max | uffd p50 | TCP RTT p50 | \
         limit from | vCPU uffd p50 guest / VMM | vCPU uffd p99 guest / VMM | thread limit p50 | thread limit p99 |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    for s in ok_scenarios(r) {
        let (f, l) = (&s.fault_us, &s.limit_us);
        let passes = match (s.guest_fault_passes.first(), s.guest_fault_passes.last()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "all".into(),
        };
        let _ = write!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} |",
            s.name,
            f.count,
            passes,
            count_opt(s.guest_slow_after_migration),
            f.p50,
            l.p50,
            ratio(f.p50, l.p50),
            f.p99,
            l.p99,
            ratio(f.p99, l.p99),
            f.p999,
            f.max,
            s.vmm_fault_us.count,
            s.vmm_fault_us.p50,
            ratio(s.vmm_fault_us.p50, l.p50),
            s.vmm_fault_us.p99,
            ratio(s.vmm_fault_us.p99, l.p99),
            s.vmm_fault_us.max,
            s.uffd_rtt_us.p50,
            s.tcp_rtt_us.p50
        );
        // The limit's parts, after the long-standing columns.
        let (v, vv) = (&s.vcpu_uffd_rtt_us, &s.vcpu_uffd_vmm_us);
        let _ = writeln!(
            md,
            " {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} | {:.1} |",
            if s.limit_basis.is_empty() {
                "-"
            } else {
                s.limit_basis.as_str()
            },
            v.p50,
            vv.p50,
            v.p99,
            vv.p99,
            s.thread_limit_us.p50,
            s.thread_limit_us.p99
        );
    }

    loaded_limit_section(&mut md, r);

    let _ = writeln!(md, "\n## Migration\n");
    let _ = writeln!(
        md,
        "| scenario | blackout ms (<= {}) | total s | background Gbit/s | overall Gbit/s | raw TCP Gbit/s | of raw | \
         collapse stall p50 / max us (n) | staging peak MiB | dst extra MiB | urgent pages (fault channel) | pages pushed | \
         urgent per pushed | uffd faults | fetched remote / local | raw loaded TCP Gbit/s | of raw loaded | \
         raw memory TCP Gbit/s | of raw memory |",
        targets::BLACKOUT_MS
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in ok_scenarios(r) {
        let of_raw = percent_of(s.throughput_gbps, s.raw_throughput_gbps);
        let per_pushed = match (s.faults_served, s.pages_pushed) {
            (Some(f), Some(p)) if p > 0 => format!("{:.4}", f as f64 / p as f64),
            _ => "-".into(),
        };
        let of_loaded = percent_of(s.throughput_gbps, s.raw_loaded_gbps);
        let of_memory = percent_of(s.throughput_gbps, s.raw_memory_gbps);
        let c = &s.collapse_stall_us;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} ({}) | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
            s.name,
            opt(s.blackout_ms, 2),
            opt(s.total_s, 2),
            opt(s.throughput_gbps, 2),
            opt(s.overall_gbps, 2),
            opt(s.raw_throughput_gbps, 2),
            of_raw,
            c.p50,
            c.max,
            c.count,
            opt(s.staging_peak_mib, 1),
            opt(s.dst_extra_mib, 1),
            count_opt(s.faults_served),
            count_opt(s.pages_pushed),
            per_pushed,
            count_opt(s.uffd_faults),
            count_opt(s.pages_fetched),
            count_opt(s.pages_fetched_local),
            opt(s.raw_loaded_gbps, 2),
            of_loaded,
            opt(s.raw_memory_gbps, 2),
            of_memory
        );
    }
    let _ = writeln!(
        md,
        "\n\"raw loaded TCP\" = raw TCP on the same link with one spinning thread per guest vCPU \
         beside the sender (the CPUs the guest takes while it runs): the honest limit of the \
         background push. \"raw memory TCP\" = the same, but streamed from one RAM-sized \
         pre-touched buffer into another, so every byte is read from and written to memory as \
         guest pages are: the gap between the two is memory traffic, not the network.\n"
    );

    stall_section(&mut md, r);
    phase_section(&mut md, r);
    recovery_section(&mut md, r);
    tls_section(&mut md, r);
    crate::peer_report::section(&mut md, r);
    crate::sweep::section(&mut md, r);

    let failed: Vec<_> = r
        .scenarios
        .iter()
        .filter(|s| s.status == Status::Failed)
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(md, "\n## Failed scenarios\n");
        for s in failed {
            let _ = writeln!(
                md,
                "- `{}`: {}",
                s.name,
                s.error.as_deref().unwrap_or("no error recorded")
            );
        }
    }

    let not_run: Vec<&ScenarioResult> = r
        .scenarios
        .iter()
        .filter(|s| s.status == Status::Skipped)
        .collect();
    if !not_run.is_empty() {
        let _ = writeln!(md, "\n## Not run on this host\n");
        for s in not_run {
            let _ = writeln!(
                md,
                "- `{}`: {}",
                s.name,
                s.error.as_deref().unwrap_or("no reason recorded")
            );
        }
    }

    if !plots.is_empty() {
        let _ = writeln!(md, "\n## Plots\n");
        for (title, path) in plots {
            let _ = writeln!(md, "### {title}\n\n![{title}]({path})\n");
        }
    }
    md
}

/// What plotters reports when drawing an SVG fails.
pub type PlotError = plotters::drawing::DrawingAreaErrorKind<std::io::Error>;

pub(crate) fn plot_err(path: &Path) -> impl Fn(PlotError) -> ReportError + '_ {
    move |source| ReportError::Plot {
        path: path.to_path_buf(),
        source,
    }
}

/// Points of an empirical CDF: (latency us, fraction at or below).
pub fn cdf_points(h: &LatencyHistogram) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts: Vec<(f64, f64)> = (0..=200)
        .map(|i| {
            // Denser near the tail: q = 1 - 10^(-3 i / 200).
            let q = 1.0 - 10f64.powf(-3.0 * i as f64 / 200.0);
            let q = if i == 0 { 0.0 } else { q };
            (h.value_at_quantile(q).max(1) as f64 / 1e3, q)
        })
        .collect();
    pts.push((h.max().max(1) as f64 / 1e3, 1.0));
    pts
}

type Series = (String, Vec<(f64, f64)>);

fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), ReportError> {
    let e = plot_err(path);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.05 } else { 1.0 };
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let builder = |root| {
        let mut b = ChartBuilder::on(root);
        b.caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64);
        b
    };
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .map_err(&e)?;
            for (i, (name, p)) in series.iter().enumerate() {
                let color: RGBAColor = if name.starts_with("limit") || name.starts_with("raw") {
                    BLACK.to_rgba()
                } else {
                    Palette99::pick(i).to_rgba()
                };
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                    .map_err(&e)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(&e)?;
        }};
    }
    if log_x {
        let x0 = if x0 > 0.0 { x0 / 1.2 } else { 0.1 };
        finish!(builder(&root)
            .build_cartesian_2d((x0..x1 * 1.2).log_scale(), 0f64..y1)
            .map_err(&e)?);
    } else {
        finish!(builder(&root)
            .build_cartesian_2d(x0..x1, 0f64..y1)
            .map_err(&e)?);
    }
    root.present().map_err(&e)?;
    Ok(())
}

fn scatter_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    pts: &[(f64, f64)],
) -> Result<(), ReportError> {
    let e = plot_err(path);
    let x1 = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let y1 = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x1, (0.5f64..y1).log_scale())
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("fault latency (us, VMM side)")
        .draw()
        .map_err(&e)?;
    chart
        .draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y.max(0.5)), 2, BLUE.mix(0.5).filled())),
        )
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Draws every plot into `dir/plots/` and returns (title, path relative to `dir`).
pub fn draw_plots(dir: &Path, r: &Results) -> Result<Vec<(String, String)>, ReportError> {
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|source| ReportError::Io {
        what: "creating",
        path: pdir.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (group, scenarios) in strategy_groups(r) {
        let mut series: Vec<Series> = Vec::new();
        for s in &scenarios {
            if let Some(h) = results::load_histogram(dir, s, kind::GUEST_FAULT)? {
                if !h.is_empty() {
                    let who = match (&s.peer, &s.peer_version) {
                        (Some(p), Some(v)) => format!("{} {v}", p.to_uppercase()),
                        (Some(p), None) => p.to_uppercase(),
                        (None, _) => format!("ours {}", s.strategy),
                    };
                    series.push((format!("{who} (guest)"), cdf_points(&h)));
                }
            }
            // The guest's view of every stall, beside its timed loads: it shows the faults the
            // timed load cannot see (code, stack, page tables: the 1 GiB huge baseline's one).
            if let Some(h) = results::load_histogram(dir, s, kind::GUEST_STALL)? {
                if !h.is_empty() {
                    let who = match &s.peer {
                        Some(p) => p.to_uppercase(),
                        None => format!("ours {}", s.strategy),
                    };
                    series.push((format!("{who} (guest stalls)"), cdf_points(&h)));
                }
            }
        }
        if let Some(s) = scenarios.first() {
            if let Some(h) = results::load_histogram(dir, s, kind::LIMIT)? {
                if !h.is_empty() {
                    series.push(("limit".into(), cdf_points(&h)));
                }
            }
        }
        if !series.is_empty() {
            let file = format!("plots/cdf-{}.svg", slug(&group));
            let title = format!(
                "Fault latency CDF per strategy (and QEMU, if run), timed loads and stalls: {group}"
            );
            line_chart(
                &dir.join(&file),
                &title,
                "fault latency (us, log)",
                "fraction of faults",
                &series,
                true,
            )?;
            out.push((title, file));
        }

        let mut tput: Vec<Series> = scenarios
            .iter()
            .filter(|s| !s.throughput_series.is_empty())
            .map(|s| (s.strategy.clone(), s.throughput_series.clone()))
            .collect();
        if !tput.is_empty() {
            let end = tput
                .iter()
                .flat_map(|(_, p)| p.iter().map(|p| p.0))
                .fold(0.0, f64::max);
            if let Some(raw) = scenarios.iter().find_map(|s| s.raw_throughput_gbps) {
                tput.push(("raw TCP".into(), vec![(0.0, raw), (end, raw)]));
            }
            if let Some(raw) = scenarios.iter().find_map(|s| s.raw_loaded_gbps) {
                tput.push((
                    "loaded raw TCP (vCPUs spinning)".into(),
                    vec![(0.0, raw), (end, raw)],
                ));
            }
            let file = format!("plots/throughput-{}.svg", slug(&group));
            let title = format!("Background throughput over time: {group}");
            line_chart(
                &dir.join(&file),
                &title,
                "seconds since migrate started",
                "Gbit/s on the link",
                &tput,
                false,
            )?;
            out.push((title, file));
        }
    }
    out.extend(crate::sweep::draw_plots(dir, r)?);
    for s in ok_scenarios(r).filter(|s| !s.fault_series.is_empty()) {
        let file = format!("plots/latency-time-{}.svg", slug(&s.name));
        let title = format!("Fault latency through the migration: {}", s.name);
        let x_desc = if s.fault_series_x.is_empty() {
            "fault number"
        } else {
            s.fault_series_x.as_str()
        };
        scatter_chart(&dir.join(&file), &title, x_desc, &s.fault_series)?;
        out.push((title, file));
    }
    Ok(out)
}

/// Regenerates plots and `dir/report.md` from `dir/results.json`'s contents `r`.
pub fn write_report(dir: &Path, r: &Results) -> Result<PathBuf, ReportError> {
    let plots = draw_plots(dir, r)?;
    let path = dir.join("report.md");
    std::fs::write(&path, render_markdown(r, &plots)).map_err(|source| ReportError::Io {
        what: "writing",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// A markdown table comparing two runs scenario by scenario (B relative to A).
pub fn compare(a: &Results, b: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | p50 A | p50 B | B/A | p99 A | p99 B | B/A | blackout A | blackout B | Gbit/s A | Gbit/s B | \
         VMM p99 A | VMM p99 B | B/A | stall p99 A | stall p99 B | of raw loaded A | of raw loaded B |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let of_loaded = |s: &ScenarioResult| percent_of(s.throughput_gbps, s.raw_loaded_gbps);
    for sa in &a.scenarios {
        let Some(sb) = b.scenarios.iter().find(|s| s.name == sa.name) else {
            let _ = writeln!(md, "| {} | (only in A) ||||||||||||||||", sa.name);
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} |",
            sa.name,
            sa.fault_us.p50,
            sb.fault_us.p50,
            ratio(sb.fault_us.p50, sa.fault_us.p50),
            sa.fault_us.p99,
            sb.fault_us.p99,
            ratio(sb.fault_us.p99, sa.fault_us.p99),
            opt(sa.blackout_ms, 2),
            opt(sb.blackout_ms, 2),
            opt(sa.throughput_gbps, 2),
            opt(sb.throughput_gbps, 2),
            sa.vmm_fault_us.p99,
            sb.vmm_fault_us.p99,
            ratio(sb.vmm_fault_us.p99, sa.vmm_fault_us.p99),
            sa.guest_stall_us.p99,
            sb.guest_stall_us.p99,
            of_loaded(sa),
            of_loaded(sb)
        );
    }
    for sb in b
        .scenarios
        .iter()
        .filter(|sb| !a.scenarios.iter().any(|s| s.name == sb.name))
    {
        let _ = writeln!(md, "| {} | (only in B) ||||||||||||||||", sb.name);
    }
    // Scenarios with a link fault, in both runs: the recovery figures.
    let pairs: Vec<(&ScenarioResult, &ScenarioResult)> = a
        .scenarios
        .iter()
        .filter_map(|sa| Some((sa, b.scenarios.iter().find(|s| s.name == sa.name)?)))
        .filter(|(sa, sb)| sa.link_fault.is_some() || sb.link_fault.is_some())
        .collect();
    if !pairs.is_empty() {
        let _ = writeln!(
            md,
            "\n| scenario (link fault) | resets A | resets B | recoveries A | recoveries B | paused ms A | paused ms B | B/A | outage p50 A | outage p50 B | B/A | outage max A | outage max B |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (sa, sb) in pairs {
            let (oa, ob) = (&sa.outage_fault_us, &sb.outage_fault_us);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} / {} | {} / {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
                sa.name,
                count_opt(sa.link_resets),
                count_opt(sb.link_resets),
                count_u32(sa.recoveries),
                count_u32(sa.dst_recoveries),
                count_u32(sb.recoveries),
                count_u32(sb.dst_recoveries),
                opt(sa.paused_ms, 1),
                opt(sb.paused_ms, 1),
                ratio(sb.paused_ms.unwrap_or(0.0), sa.paused_ms.unwrap_or(0.0)),
                oa.p50,
                ob.p50,
                ratio(ob.p50, oa.p50),
                oa.max,
                ob.max
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::{self, Percentiles, ShortSummary};
    use crate::results::{save_histogram, RESULTS_VERSION};

    fn scenario(dir: &Path, strategy: &str, backing: &str, guest: &[u64]) -> ScenarioResult {
        let name = format!("{backing}-{strategy}-random-loopback");
        let mut s = ScenarioResult::new(&name, backing, strategy, "loopback", "random");
        s.status = Status::Ok;
        let g = histogram::from_samples(guest).unwrap();
        let limit = histogram::from_samples(&[20_000, 22_000, 30_000, 40_000]).unwrap();
        s.fault_us = Percentiles::us(&g);
        s.limit_us = Percentiles::us(&limit);
        save_histogram(dir, &mut s, kind::GUEST_FAULT, &g).unwrap();
        save_histogram(dir, &mut s, kind::LIMIT, &limit).unwrap();
        s.blackout_ms = Some(4.0);
        s.total_s = Some(1.5);
        s.throughput_gbps = Some(9.0);
        s.raw_throughput_gbps = Some(10.0);
        s.collapse_stall_us = ShortSummary {
            p50: 300.0,
            max: 1500.0,
            count: 2,
        };
        s.faults_served = Some(10);
        s.pages_pushed = Some(1000);
        s.throughput_series = vec![(0.0, 0.0), (0.5, 8.0), (1.0, 9.5)];
        s.fault_series = vec![(1.0, 25.0), (2.0, 30.0), (3.0, 400.0)];
        s.fault_series_x = "ms since vCPUs started".into();
        s
    }

    fn sample(dir: &Path) -> Results {
        let mut failed = ScenarioResult::new("x", "shmem", "4k-staged", "loopback", "random");
        failed.error = Some("vmm receive exited with 1".into());
        Results {
            version: RESULTS_VERSION,
            quick: true,
            host_checks: BTreeMap::new(),
            scenarios: vec![
                scenario(
                    dir,
                    "4k-staged",
                    "hugetlb-1g",
                    &[35_000, 36_000, 37_000, 200_000],
                ),
                scenario(dir, "huge", "hugetlb-1g", &[90_000_000, 95_000_000]),
                failed,
            ],
        }
    }

    #[test]
    fn targets_are_judged_from_the_figures() {
        let d = tempfile::tempdir().unwrap();
        let r = sample(d.path());
        let t = check_targets(&r);
        let find = |prefix: &str| {
            t.iter()
                .filter(|c| c.target.starts_with(prefix))
                .collect::<Vec<_>>()
        };
        // guest p50 36 vs limit p50 22 -> 1.64x > 1.2: missed; p99 200 vs 40 -> 5x: missed.
        let p50 = find("4k-staged loopback p50");
        assert_eq!(p50.len(), 1);
        assert_eq!(p50[0].verdict, Verdict::Missed, "{:?}", p50[0]);
        // huge 90 ms vs 4k 36 us: ~2500x: met.
        let huge = find("1 GiB");
        assert_eq!(huge[0].verdict, Verdict::Met, "{:?}", huge[0]);
        // stall max 1500 us: missed for both; throughput 90%: met; blackout 4 ms: met.
        assert!(find("collapse")
            .iter()
            .all(|c| c.verdict == Verdict::Missed));
        assert!(find("throughput").iter().all(|c| c.verdict == Verdict::Met));
        assert_eq!(find("blackout").len(), 2);
        // An empty run measures nothing.
        let empty = Results {
            version: RESULTS_VERSION,
            quick: false,
            host_checks: BTreeMap::new(),
            scenarios: vec![],
        };
        assert!(check_targets(&empty)
            .iter()
            .all(|c| c.verdict == Verdict::NotMeasured));
    }

    #[test]
    fn report_has_tables_ratios_and_svg_plots() {
        let d = tempfile::tempdir().unwrap();
        let r = sample(d.path());
        let path = write_report(d.path(), &r).unwrap();
        let md = std::fs::read_to_string(path).unwrap();
        assert!(md.contains("## Targets"));
        assert!(md.contains("| target | scenario | value | verdict |"));
        // The 4k-staged row: guest p50 36.0 next to limit p50 22.0 and their ratio.
        let row = md
            .lines()
            .find(|l| l.starts_with("| hugetlb-1g-4k-staged-random-loopback | 4 | all | - |"))
            .unwrap();
        assert!(row.contains("| 36.0 | 22.0 | 1.64x |"), "{row}");
        assert!(
            md.contains("| 4.00 | 1.50 | 9.00 | - | 10.00 | 90% |"),
            "{md}"
        );
        assert!(md.contains("`x`: vmm receive exited with 1"));
        let svgs: Vec<_> = std::fs::read_dir(d.path().join("plots"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(svgs.len(), 4, "{svgs:?}"); // 1 CDF + 1 throughput + 2 latency-over-time
        for p in &svgs {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg"), "{p:?}");
            assert!(svg.contains("<text"), "{p:?} has no text");
            assert!(
                svg.contains("<polyline") || svg.contains("<circle"),
                "{p:?}"
            );
            assert!(md.contains(&format!(
                "]({})",
                p.strip_prefix(d.path()).unwrap().display()
            )));
        }
        let cdf = svgs
            .iter()
            .find(|p| p.to_string_lossy().contains("cdf-"))
            .unwrap();
        let svg = std::fs::read_to_string(cdf).unwrap();
        assert!(svg.contains("ours 4k-staged (guest)") && svg.contains("limit"));
    }

    /// The sample run plus a reset scenario (and one whose reset never fired).
    fn with_reset(dir: &Path) -> Results {
        let mut r = sample(dir);
        let mut s = scenario(dir, "4k-staged", "hugetlb-2m", &[40_000, 50_000, 60_000]);
        s.name = "hugetlb-2m-4k-staged-random-loopback-reset1".into();
        s.link = "loopback-reset1".into();
        s.link_fault = Some("reset every connection once, after 89478485 bytes".into());
        s.link_resets = Some(1);
        s.recoveries = Some(1);
        s.dst_recoveries = Some(1);
        s.paused_ms = Some(5.5);
        s.dst_paused_ms = Some(6.9);
        s.throughput_gbps = Some(1.0); // far below raw: not judged
        let vmm = histogram::from_samples(&[30_000, 35_000, 45_000]).unwrap();
        s.vmm_fault_us = Percentiles::us(&vmm);
        let outage = histogram::from_samples(&[26_000_000, 30_000_000]).unwrap();
        s.outage_fault_us = Percentiles::us(&outage);
        save_histogram(dir, &mut s, kind::OUTAGE_FAULT, &outage).unwrap();
        let mut never = s.clone();
        never.name = "never".into();
        never.status = Status::Failed;
        never.error = Some("the link fault never fired".into());
        never.link_resets = Some(0);
        never.outage_fault_us = Percentiles::default();
        r.scenarios.push(s);
        r.scenarios.push(never);
        r
    }

    #[test]
    fn recovery_section_keeps_outage_faults_apart() {
        let d = tempfile::tempdir().unwrap();
        let r = with_reset(d.path());
        let md = render_markdown(&r, &[]);
        assert!(md.contains("## Postcopy recovery"), "{md}");
        let row = md
            .lines()
            .find(|l| l.starts_with("| hugetlb-2m-4k-staged-random-loopback-reset1 | ok |"))
            .unwrap_or_else(|| panic!("{md}"));
        // resets, recoveries, paused, outage n/p50, next to the normal VMM faults.
        assert!(
            row.contains("| 1 | 1 / 1 | 5.5 / 6.9 | 2 | 26001.4 | 30015.5 |"),
            "{row}"
        );
        assert!(row.contains("| 3 | 35.0 | 45.0 |"), "{row}");
        let never = md
            .lines()
            .find(|l| l.starts_with("| never |"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(never.contains("fault never fired"), "{never}");
        // The throughput target skips the faulty link.
        assert!(check_targets(&r)
            .iter()
            .filter(|t| t.target.starts_with("throughput"))
            .all(|t| !t.scenario.contains("reset1")));
        // A run without faults has no such section.
        assert!(!render_markdown(&sample(d.path()), &[]).contains("Postcopy recovery"));
        // The CDF plot of the faulty scenario exists and shows only the normal faults.
        write_report(d.path(), &r).unwrap();
        assert!(d
            .path()
            .join("plots/cdf-loopback-reset1-hugetlb-2m-random.svg")
            .is_file());
    }

    #[test]
    fn compare_lists_recovery_figures() {
        let d = tempfile::tempdir().unwrap();
        let a = with_reset(d.path());
        let mut b = a.clone();
        b.scenarios[3].paused_ms = Some(11.0);
        let t = compare(&a, &b);
        assert!(t.contains("| scenario (link fault) |"), "{t}");
        assert!(
            t.contains("| hugetlb-2m-4k-staged-random-loopback-reset1 | 1 | 1 | 1 / 1 | 1 / 1 | 5.5 | 11.0 | 2.00x |"),
            "{t}"
        );
        assert!(!compare(&sample(d.path()), &sample(d.path())).contains("link fault"));
    }

    #[test]
    fn compare_lists_ratios() {
        let d = tempfile::tempdir().unwrap();
        let mut a = sample(d.path());
        a.scenarios[0].fault_us.p50 = 36.0;
        let mut b = a.clone();
        b.scenarios[0].fault_us.p50 = 72.0;
        let t = compare(&a, &b);
        assert!(
            t.contains("| hugetlb-1g-4k-staged-random-loopback | 36.0 | 72.0 | 2.00x |"),
            "{t}"
        );
    }
    /// The sample run with the guest's stalls, the loaded raw TCP and phase timing filled in.
    fn with_stalls_and_phases(dir: &Path) -> Results {
        use crate::guest_output::{PhaseStats, SlowFault};
        let mut r = sample(dir);
        // 4k-staged: loaded raw 9.5 -> 9.0 is 95%: met on loopback (>= 90%).
        r.scenarios[0].raw_loaded_gbps = Some(9.5);
        // huge: loaded raw 12 -> 9.0 is 75%: missed.
        r.scenarios[1].raw_loaded_gbps = Some(12.0);
        // The huge baseline: the VMM's one 752 ms fault; the guest's timed loads never saw
        // it, its stalls do (760 ms).
        let huge = &mut r.scenarios[1];
        let vmm = histogram::from_samples(&[752_000_000]).unwrap();
        huge.vmm_fault_us = Percentiles::us(&vmm);
        let stalls = histogram::from_samples(&[25_000, 40_000, 760_000_000]).unwrap();
        huge.guest_stall_us = Percentiles::us(&stalls);
        huge.guest_stall_threshold_us = Some(20.0);
        huge.blocktime_ms = vec![752.5];
        save_histogram(dir, huge, kind::GUEST_STALL, &stalls).unwrap();
        let s = &mut r.scenarios[0];
        let st = |p50: f64, p99: f64| PhaseStats {
            count: 100,
            p50,
            p90: p50 * 1.5,
            p99,
            p999: p99 * 2.0,
            max: p99 * 3.0,
            mean: p50 * 1.1,
        };
        s.fault_phase_us = [
            ("uffd_to_read", st(2.0, 8.0)),
            ("request_written", st(3.0, 6.0)),
            ("source_reply", st(10.0, 40.0)),
            ("reply_read", st(15.0, 300.0)),
            ("stored", st(1.0, 2.0)),
            ("installed", st(4.0, 20.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let slow = |reply: f64, installed: f64| SlowFault {
            total_us: 10.0 + reply + installed,
            phases_us: [
                ("uffd_to_read", 2.0),
                ("request_written", 3.0),
                ("source_reply", 5.0),
                ("reply_read", reply),
                ("installed", installed),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        s.fault_tail =
            results::FaultTail::of(&[slow(300.0, 10.0), slow(500.0, 10.0), slow(20.0, 170.0)]);
        r
    }

    #[test]
    fn stall_and_loaded_throughput_targets_are_judged() {
        let d = tempfile::tempdir().unwrap();
        let r = with_stalls_and_phases(d.path());
        let t = check_targets(&r);
        let find = |prefix: &str| {
            t.iter()
                .filter(|c| c.target.starts_with(prefix))
                .collect::<Vec<_>>()
        };
        let lo = find("background >= 90% of raw loaded TCP (loopback)");
        assert_eq!(lo.len(), 2, "{t:?}");
        assert_eq!(lo[0].verdict, Verdict::Met, "{:?}", lo[0]);
        assert!(lo[0].value.contains("95%"), "{:?}", lo[0]);
        assert_eq!(lo[1].verdict, Verdict::Missed, "{:?}", lo[1]);
        let veth = find("background >= 95% of raw loaded TCP (veth)");
        assert_eq!(veth.len(), 1);
        assert_eq!(veth[0].verdict, Verdict::NotMeasured);
        // 760 ms stall vs 752 ms fault: within 2x.
        let huge = find("1 GiB huge: guest stall");
        assert_eq!(huge.len(), 1);
        assert_eq!(huge[0].verdict, Verdict::Met, "{:?}", huge[0]);
        // A guest that states a threshold but saw no stall missed the VMM's fault.
        let mut blind = r.clone();
        blind.scenarios[1].guest_stall_us = Percentiles::default();
        let t = check_targets(&blind);
        let huge: Vec<_> = t
            .iter()
            .filter(|c| c.target.starts_with("1 GiB huge: guest stall"))
            .collect();
        assert_eq!(huge[0].verdict, Verdict::Missed, "{:?}", huge[0]);
    }

    #[test]
    fn report_shows_stalls_phases_and_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let r = with_stalls_and_phases(d.path());
        let md = render_markdown(&r, &[]);
        assert!(md.contains("## Guest stalls (us)"), "{md}");
        let row = md
            .lines()
            .find(|l| l.starts_with("| hugetlb-1g-huge-random-loopback | 20 | 3 |"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(row.contains("| 752.5 |"), "{row}");
        assert!(md.contains("## Fault phases (us)"), "{md}");
        assert!(md.contains("| 15.0 / 300.0 / 900.0 (100) |"), "{md}");
        assert!(!md.contains("Merged runs"), "{md}");
        // Tail: 3 faults, total 1040 us of which reply_read 820 (79%); it dominated 2 of 3.
        let tail = md
            .lines()
            .find(|l| l.starts_with("| hugetlb-1g-4k-staged-random-loopback | 3 |"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(tail.contains("| 79% |"), "{tail}");
        assert!(tail.contains("reply_read (2 of 3)"), "{tail}");
        assert!(md.contains("| raw loaded TCP Gbit/s | of raw loaded |"));
        assert!(md.contains("| 9.50 | 95% |"), "{md}");
        let mut merged = r.clone();
        merged.scenarios[0].runs = 3;
        assert!(render_markdown(&merged, &[]).contains("median of the runs' figures"));
        // The CDF plot carries the stalls beside the timed loads.
        let plots = draw_plots(d.path(), &r).unwrap();
        let cdf = plots.iter().find(|(_, p)| p.contains("cdf-")).unwrap();
        let svg = std::fs::read_to_string(d.path().join(&cdf.1)).unwrap();
        assert!(svg.contains("ours huge (guest stalls)"), "no stall series");
        // A run without any of it has neither section.
        let plain = render_markdown(&sample(d.path()), &[]);
        assert!(!plain.contains("## Guest stalls") && !plain.contains("## Fault phases"));
    }

    #[test]
    fn tls_pairs_are_judged_as_ratios_to_plaintext() {
        let d = tempfile::tempdir().unwrap();
        let plain = scenario(
            d.path(),
            "4k-staged",
            "hugetlb-2m",
            &[20_000, 22_000, 24_000],
        );
        let mut tls = scenario(
            d.path(),
            "4k-staged",
            "hugetlb-2m",
            &[30_000, 33_000, 36_000],
        );
        tls.name = format!("{}-tls", plain.name);
        tls.link = "loopback-tls".into();
        tls.throughput_gbps = Some(8.1);
        let mut r = sample(d.path());
        r.scenarios = vec![plain, tls];
        let checks = check_targets(&r);
        let p50 = checks
            .iter()
            .find(|c| c.target.starts_with("TLS fault p50"))
            .unwrap();
        // 33 / 22 us: half again as slow, so the +10% target is missed.
        assert_eq!(p50.verdict, Verdict::Missed, "{}", p50.value);
        assert!(p50.value.contains("1.50x"), "{}", p50.value);
        let bg = checks
            .iter()
            .find(|c| c.target.starts_with("TLS background"))
            .unwrap();
        // 8.1 / 9.0 Gbit/s = 90%.
        assert_eq!(bg.verdict, Verdict::Met, "{}", bg.value);
        let md = render_markdown(&r, &[]);
        assert!(md.contains("## TLS vs plaintext"), "{md}");
        assert!(
            md.contains("| hugetlb-2m-4k-staged-random-loopback-tls | 3 / 3 |"),
            "{md}"
        );
        // Without a twin there is no pair, and the target says it was not measured.
        r.scenarios.remove(0);
        assert!(!render_markdown(&r, &[]).contains("## TLS vs plaintext"));
        assert!(
            check_targets(&r)
                .iter()
                .any(|c| c.target.starts_with("TLS vs plaintext")
                    && c.verdict == Verdict::NotMeasured)
        );
    }
}
