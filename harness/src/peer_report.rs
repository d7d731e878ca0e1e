//! The report's comparison with the peer: each of our strategies next to QEMU's postcopy on the
//! same backing, link, pattern and memory size, from the same run. Every figure is given as
//! ours / QEMU's (below 1 is better for ours, except throughput, where above 1 is), and the
//! figures where QEMU is ahead are listed plainly.

use crate::report::{TargetCheck, Verdict};
use crate::results::{Results, ScenarioResult, Status};
use std::fmt::Write as _;

/// Guest-seen p50 of 4k-staged on 1 GiB pages at least this many times below QEMU's.
pub const HUGETLB_1G_FACTOR: f64 = 1000.0;

/// One of our scenarios and the QEMU scenario beside it.
pub struct Pair<'a> {
    pub ours: &'a ScenarioResult,
    pub qemu: &'a ScenarioResult,
}

/// Every (ours, QEMU) pair of ok scenarios on the same backing, link and pattern.
pub fn pairs(r: &Results) -> Vec<Pair<'_>> {
    let ok = || r.scenarios.iter().filter(|s| s.status == Status::Ok);
    let mut out = Vec::new();
    for q in ok().filter(|s| s.peer.is_some()) {
        for o in ok().filter(|s| s.peer.is_none()) {
            if o.backing == q.backing && o.link == q.link && o.pattern == q.pattern {
                out.push(Pair { ours: o, qemu: q });
            }
        }
    }
    out
}

/// The QEMU side's per-fault latency, us: its guest-seen p50/p99 when the guest timed any
/// fault, else its vCPU blocktime per postcopy request (on 1 GiB pages QEMU fetches the whole
/// page on the first access after the switchover, which the guest times only if it was its
/// timed load; nothing faults after that). Returns (p50, p99, what it is).
pub fn qemu_fault(q: &ScenarioResult) -> Option<(f64, f64, &'static str)> {
    if q.fault_us.count > 0 {
        return Some((q.fault_us.p50, q.fault_us.p99, "guest-seen"));
    }
    let blocked: f64 = q.peer_vcpu_blocktime_ms.iter().sum();
    let n = q.postcopy_requests.filter(|&n| n > 0)?;
    (blocked > 0.0).then(|| {
        let per = blocked * 1e3 / n as f64;
        (per, per, "QEMU vCPU blocktime per request")
    })
}

/// ours / QEMU as "0.12x", "-" if either is missing or zero.
fn ratio(ours: Option<f64>, qemu: Option<f64>) -> String {
    match (ours, qemu) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => {
            let r = a / b;
            if !(0.01..100.0).contains(&r) {
                format!("{r:.2e}x")
            } else {
                format!("{r:.2}x")
            }
        }
        _ => "-".into(),
    }
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// The figures of one side, in table order: p50, p99, blocktime per vCPU, blackout, total,
/// background throughput.
fn figures(s: &ScenarioResult, is_qemu: bool) -> [Option<f64>; 6] {
    let (p50, p99) = if is_qemu {
        qemu_fault(s).map_or((None, None), |(a, b, _)| (Some(a), Some(b)))
    } else if s.fault_us.count > 0 {
        (Some(s.fault_us.p50), Some(s.fault_us.p99))
    } else {
        (None, None)
    };
    let blocktime = if is_qemu && s.guest_blocktime_ms.is_none() {
        // No timed fault: QEMU's own per-vCPU figure.
        let v = &s.peer_vcpu_blocktime_ms;
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    } else {
        s.guest_blocktime_ms
    };
    [
        p50,
        p99,
        blocktime,
        s.blackout_ms,
        s.total_s,
        s.throughput_gbps,
    ]
}

const NAMES: [&str; 6] = [
    "guest-seen p50",
    "guest-seen p99",
    "blocktime per vCPU",
    "blackout",
    "total time",
    "background throughput",
];

/// The figures where QEMU is ahead of ours in `p` (names).
pub fn qemu_ahead(p: &Pair<'_>) -> Vec<&'static str> {
    let (o, q) = (figures(p.ours, false), figures(p.qemu, true));
    (0..6)
        .filter(|&i| match (o[i], q[i]) {
            // Throughput: more is better; everything else: less is better.
            (Some(a), Some(b)) if i == 5 => b > a,
            (Some(a), Some(b)) => b < a,
            _ => false,
        })
        .map(|i| NAMES[i])
        .collect()
}

/// The targets against QEMU.
pub fn check_targets(r: &Results) -> Vec<TargetCheck> {
    let ps = pairs(r);
    let mut out = Vec::new();
    let mut missing = |target: String, rows: Vec<TargetCheck>| {
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
    let t =
        format!("vs QEMU: 4k-staged on hugetlb-1g: guest p50 >= {HUGETLB_1G_FACTOR}x below QEMU's");
    let rows = ps
        .iter()
        .filter(|p| p.ours.backing == "hugetlb-1g" && p.ours.strategy == "4k-staged")
        .filter(|p| p.ours.fault_us.count > 0)
        .filter_map(|p| {
            let (q50, _, what) = qemu_fault(p.qemu)?;
            let factor = q50 / p.ours.fault_us.p50;
            Some(TargetCheck {
                target: t.clone(),
                scenario: format!("{} vs {}", p.ours.name, p.qemu.name),
                value: format!(
                    "{:.1} us vs QEMU {q50:.0} us ({what}) = {factor:.0}x below",
                    p.ours.fault_us.p50
                ),
                verdict: Verdict::of(factor >= HUGETLB_1G_FACTOR),
            })
        })
        .collect();
    missing(t, rows);

    let t = "vs QEMU: shmem 4 KiB: guest p50 and p99 <= QEMU's".to_string();
    let rows = ps
        .iter()
        .filter(|p| p.ours.backing == "shmem" && p.ours.strategy == "4k-staged")
        .filter(|p| p.ours.fault_us.count > 0 && p.qemu.fault_us.count > 0)
        .map(|p| {
            let (o, q) = (&p.ours.fault_us, &p.qemu.fault_us);
            TargetCheck {
                target: t.clone(),
                scenario: format!("{} vs {}", p.ours.name, p.qemu.name),
                value: format!(
                    "p50 {:.1} vs {:.1} us ({}), p99 {:.1} vs {:.1} us ({})",
                    o.p50,
                    q.p50,
                    ratio(Some(o.p50), Some(q.p50)),
                    o.p99,
                    q.p99,
                    ratio(Some(o.p99), Some(q.p99))
                ),
                verdict: Verdict::of(o.p50 <= q.p50 && o.p99 <= q.p99),
            }
        })
        .collect();
    missing(t, rows);

    let t = "vs QEMU: blackout <= QEMU's".to_string();
    let rows = ps
        .iter()
        .filter_map(|p| Some((p, p.ours.blackout_ms?, p.qemu.blackout_ms?)))
        .map(|(p, o, q)| TargetCheck {
            target: t.clone(),
            scenario: format!("{} vs {}", p.ours.name, p.qemu.name),
            value: format!("{o:.2} vs {q:.2} ms"),
            verdict: Verdict::of(o <= q),
        })
        .collect();
    missing(t, rows);
    out
}

/// The "Beside QEMU" section of report.md (nothing if the run has no QEMU scenario).
pub fn section(md: &mut String, r: &Results) {
    let peers: Vec<&ScenarioResult> = r.scenarios.iter().filter(|s| s.peer.is_some()).collect();
    if peers.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Beside QEMU\n");
    let mut versions: Vec<String> = peers
        .iter()
        .filter_map(|s| {
            s.peer_version_line
                .clone()
                .or_else(|| s.peer_version.clone())
        })
        .collect();
    versions.dedup();
    let caps = peers
        .iter()
        .find(|s| !s.peer_capabilities.is_empty())
        .map(|s| s.peer_capabilities.join(", "))
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        md,
        "The same workload guest (PVH entry, one vCPU as ours), on the same backing, link and \
         memory size, migrated by {} in the same run (capabilities: {caps}; `migrate` then \
         `migrate-start-postcopy` at once). Guest-seen figures come from the same guest lines \
         for both VMMs; for QEMU the guest's fault samples are its `postcopy-requests` slowest \
         slow accesses (ours: the destination's userfault count). Blocktime per vCPU = the \
         sum of the guest-seen fault latencies / vCPUs (each VMM's own counter beside it: ours from \
         userfaultfd's faulting thread ids, QEMU's `postcopy-vcpu-blocktime`). Each ratio is ours / QEMU's: below 1 is better for ours, except \
         throughput.\n",
        if versions.is_empty() {
            "QEMU".to_string()
        } else {
            versions.join(", ")
        }
    );
    let ps = pairs(r);
    if ps.is_empty() {
        let _ = writeln!(md, "No scenario of ours ran beside an ok QEMU scenario.\n");
    } else {
        let _ = writeln!(
            md,
            "| ours | QEMU | p50 us ours / QEMU | ratio | p99 us ours / QEMU | ratio | \
             blocktime ms/vCPU ours / QEMU (each VMM's own counter, ours / QEMU's) | ratio | blackout ms ours / QEMU | ratio | \
             total s ours / QEMU | ratio | background Gbit/s ours / QEMU | ratio | QEMU faults (requests) |"
        );
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &ps {
            let (o, q) = (figures(p.ours, false), figures(p.qemu, true));
            let counters = |v: &[f64]| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.iter()
                        .map(|v| format!("{v:.0}"))
                        .collect::<Vec<_>>()
                        .join("/")
                }
            };
            let own = format!(
                "{} / {}",
                counters(&p.ours.vmm_vcpu_blocktime_ms),
                counters(&p.qemu.peer_vcpu_blocktime_ms)
            );
            let qsrc = qemu_fault(p.qemu).map_or("", |(_, _, what)| {
                if what == "guest-seen" {
                    ""
                } else {
                    " (blocktime/request)"
                }
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} / {}{qsrc} | {} | {} / {} | {} | {} / {} ({own}) | {} | {} / {} | {} | {} / {} | {} | {} / {} | {} | {} ({}) |",
                p.ours.name,
                p.qemu.name,
                fmt(o[0], 1),
                fmt(q[0], 1),
                ratio(o[0], q[0]),
                fmt(o[1], 1),
                fmt(q[1], 1),
                ratio(o[1], q[1]),
                fmt(o[2], 1),
                fmt(q[2], 1),
                ratio(o[2], q[2]),
                fmt(o[3], 2),
                fmt(q[3], 2),
                ratio(o[3], q[3]),
                fmt(o[4], 2),
                fmt(q[4], 2),
                ratio(o[4], q[4]),
                fmt(o[5], 2),
                fmt(q[5], 2),
                ratio(o[5], q[5]),
                p.qemu.fault_us.count,
                p.qemu
                    .postcopy_requests
                    .map_or_else(|| "-".into(), |n| n.to_string()),
            );
        }
        let _ = writeln!(md, "\n### Where QEMU is ahead\n");
        let mut any = false;
        for p in &ps {
            let ahead = qemu_ahead(p);
            if !ahead.is_empty() {
                any = true;
                let _ = writeln!(
                    md,
                    "- QEMU ({}) is ahead of `{}` on: {}.",
                    p.qemu.name,
                    p.ours.name,
                    ahead.join(", ")
                );
            }
        }
        if !any {
            let _ = writeln!(md, "- Nowhere in this run.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Percentiles;

    fn scenario(name: &str, backing: &str, strategy: &str, p50: f64) -> ScenarioResult {
        let mut s = ScenarioResult::new(name, backing, strategy, "loopback", "random");
        s.status = Status::Ok;
        s.fault_us = Percentiles {
            p50,
            p99: p50 * 2.0,
            count: 10,
            ..Default::default()
        };
        s.blackout_ms = Some(5.0);
        s.throughput_gbps = Some(10.0);
        s.guest_blocktime_ms = Some(p50 * 10.0 / 1e3);
        s
    }

    #[test]
    fn pairs_ratios_verdicts_and_where_qemu_is_ahead() {
        let ours = scenario(
            "shmem-4k-staged-random-loopback",
            "shmem",
            "4k-staged",
            50.0,
        );
        let mut q = scenario("shmem-qemu-random-loopback", "shmem", "qemu", 100.0);
        q.peer = Some("qemu".into());
        q.blackout_ms = Some(2.0);
        let ours1g = scenario(
            "hugetlb-1g-4k-staged-random-loopback",
            "hugetlb-1g",
            "4k-staged",
            60.0,
        );
        let mut q1g = scenario("hugetlb-1g-qemu-random-loopback", "hugetlb-1g", "qemu", 0.0);
        q1g.peer = Some("qemu".into());
        q1g.fault_us = Percentiles::default();
        q1g.guest_blocktime_ms = None;
        q1g.postcopy_requests = Some(1);
        q1g.peer_vcpu_blocktime_ms = vec![900.0];
        let r = Results {
            version: 1,
            quick: true,
            host_checks: Default::default(),
            scenarios: vec![ours, q, ours1g, q1g],
        };
        assert_eq!(pairs(&r).len(), 2);
        let t = check_targets(&r);
        let shmem = t
            .iter()
            .find(|t| t.target.starts_with("vs QEMU: shmem"))
            .unwrap();
        assert_eq!(shmem.verdict, Verdict::Met, "{shmem:?}");
        let g1 = t.iter().find(|t| t.target.contains("hugetlb-1g")).unwrap();
        // 900 ms per request vs 60 us = 15000x.
        assert_eq!(g1.verdict, Verdict::Met, "{g1:?}");
        let blackout: Vec<_> = t
            .iter()
            .filter(|t| t.target.starts_with("vs QEMU: blackout"))
            .collect();
        assert_eq!(blackout.len(), 2);
        assert_eq!(blackout[0].verdict, Verdict::Missed);
        let ps = pairs(&r);
        assert_eq!(qemu_ahead(&ps[0]), vec!["blackout"]);
        let mut md = String::new();
        section(&mut md, &r);
        assert!(md.contains("| shmem-4k-staged-random-loopback | shmem-qemu-random-loopback | 50.0 / 100.0 | 0.50x"), "{md}");
        assert!(md.contains("QEMU (shmem-qemu-random-loopback) is ahead of `shmem-4k-staged-random-loopback` on: blackout."), "{md}");
        assert!(md.contains("(blocktime/request)"), "{md}");
    }

    #[test]
    fn no_pair_means_not_measured() {
        let r = Results {
            version: 1,
            quick: true,
            host_checks: Default::default(),
            scenarios: vec![scenario("a", "shmem", "4k-staged", 1.0)],
        };
        assert!(check_targets(&r)
            .iter()
            .all(|t| t.verdict == Verdict::NotMeasured));
        let mut md = String::new();
        section(&mut md, &r);
        assert!(md.is_empty());
    }
}
