//! One quick scenario end to end: real source and destination VMM processes, a real migration,
//! and every field of results.json checked; and the postcopy-recovery scenario (the link reset
//! once mid-push by a relay in the harness), checked for the reset, the recovery on both sides
//! and a verified guest; and a tiny size sweep (two sizes, one vCPU), checked for the sweep's
//! fields, its report section and plots, and a merge. Needs the vmm binary (`HARNESS_VMM`, else
//! target/release/vmm or target/debug/vmm of this workspace) and the workload guest
//! (guest-images/out/workload.elf, `guest-images/build-workload.sh`). Runs as root (huge pages).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The vmm binary: `$HARNESS_VMM`, else the workspace's target/release/vmm, else
/// target/debug/vmm (`CARGO_TARGET_DIR` respected).
fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HARNESS_VMM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "HARNESS_VMM={} is not a file", p.display());
        return p;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                manifest.join("..").join(t)
            }
        })
        .unwrap_or_else(|| manifest.join("../target"));
    let candidates = [target.join("release/vmm"), target.join("debug/vmm")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no vmm binary at {:?}: build it (`cargo build --release -p vmm`) or set HARNESS_VMM",
                candidates
            )
        })
}

const PERCENTILES: [&str; 6] = ["p50", "p90", "p99", "p999", "max", "count"];

fn number(v: &serde_json::Value, path: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {v}"))
}

/// Runs `harness run --quick --scenario NAME` into `out`; returns results.json.
/// The guest's stalls (present and sane beside its timed faults), the VMM-side blocktime
/// under its issue name, and the loaded raw TCP limit.
fn check_stalls_blocktime_and_loaded_raw(s: &serde_json::Value) {
    // The guest states its threshold (20 us) and saw stalls: every userfault it waited for
    // (tens of us at least) holds up its loop past it.
    assert_eq!(
        number(&s["guest_stall_threshold_us"], "guest_stall_threshold_us"),
        20.0
    );
    let st = |p: &str| number(&s["guest_stall_us"][p], &format!("guest_stall_us.{p}"));
    assert!(st("count") > 0.0, "no guest stalls");
    // Bucket lower bounds are within 3.1% of the value: the smallest stall's bucket may start
    // just below the threshold.
    assert!(st("p50") >= 20.0 * 0.96, "stall p50 {}", st("p50"));
    assert!(st("p50") <= st("p99") && st("p99") <= st("max"));
    // A stall is a whole iteration, the timed load included: the slowest stall is at least
    // the slowest timed fault (each within half a 3.1% bucket).
    let fault_max = number(&s["fault_us"]["max"], "fault_us.max");
    assert!(
        st("max") >= fault_max * 0.96,
        "stall max {} < timed fault max {fault_max}",
        st("max")
    );
    // blocktime_ms is the VMM's own per-vCPU counter (ours or QEMU's), one entry per vCPU.
    let bt = s["blocktime_ms"].as_array().unwrap();
    assert_eq!(bt.len(), 1, "{bt:?}");
    let own = if s["peer"].is_null() {
        &s["vmm_vcpu_blocktime_ms"]
    } else {
        &s["peer_vcpu_blocktime_ms"]
    };
    assert_eq!(&s["blocktime_ms"], own);
    assert!(number(&bt[0], "blocktime_ms[0]") >= 0.0);
    let loaded = number(&s["raw_loaded_gbps"], "raw_loaded_gbps");
    assert!(loaded > 0.0, "raw_loaded_gbps {loaded}");
    let memory = number(&s["raw_memory_gbps"], "raw_memory_gbps");
    assert!(memory > 0.0, "raw_memory_gbps {memory}");
}

/// The destination's own memory: sampled (anonymous memory and page tables above zero) and
/// the extra-memory figure made of them and the staging peak.
fn check_dst_memory(s: &serde_json::Value) {
    let anon = number(&s["dst_rss_anon_peak_mib"], "dst_rss_anon_peak_mib");
    let pte = number(&s["dst_pte_peak_mib"], "dst_pte_peak_mib");
    let staging = number(&s["staging_peak_mib"], "staging_peak_mib");
    let extra = number(&s["dst_extra_mib"], "dst_extra_mib");
    assert!(
        anon > 0.0 && pte > 0.0,
        "anon {anon} MiB, page tables {pte} MiB"
    );
    // The peak of the sum is at most the sum of the peaks, and at least each part's.
    assert!(
        extra <= anon + pte + staging + 1e-9 && extra >= anon.max(pte) + staging - 1e-9,
        "extra {extra} MiB against anon {anon} + page tables {pte} + staging {staging}"
    );
}

fn workload_guest() -> PathBuf {
    let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out/workload.elf");
    assert!(
        kernel.is_file(),
        "no workload guest at {}: run guest-images/build-workload.sh",
        kernel.display()
    );
    kernel
}

fn run_scenario(scenario: &str, out: &Path) -> serde_json::Value {
    run_scenarios(&[scenario], out)
}

/// Runs `harness run --quick --scenario A --scenario B ...` into `out`; returns results.json.
fn run_scenarios(scenarios: &[&str], out: &Path) -> serde_json::Value {
    run_scenarios_with(scenarios, &workload_guest(), out)
}

/// [`run_scenarios`] with another guest kernel.
fn run_scenarios_with(scenarios: &[&str], kernel: &Path, out: &Path) -> serde_json::Value {
    let vmm = vmm_binary();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
    cmd.args(["run", "--quick", "--phase-timeout", "40"]);
    for s in scenarios {
        cmd.args(["--scenario", s]);
    }
    let status = cmd
        .arg("--vmm")
        .arg(&vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "harness run exited with {status}");
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The scenario called `name` in results.json.
fn scenario_named<'a>(res: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    res["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from results.json"))
}

/// A pinned scenario ran both VMMs with `--migration-cpus` (the host's last CPU, where it has
/// two or more), each of which said where its threads go, and measured its faults.
fn check_pinned(res: &serde_json::Value, name: &str, out: &Path) {
    let s = scenario_named(res, name);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        assert_eq!(s["status"], "skipped", "{s}");
        return;
    }
    assert_scenario_ok(s, out);
    let list = s["migration_cpus"].as_str().expect("migration_cpus");
    assert!(list.parse::<usize>().is_ok(), "migration_cpus {list:?}");
    for side in ["src", "dst"] {
        let log = std::fs::read_to_string(out.join(format!("raw/{name}.{side}.err"))).unwrap();
        assert!(
            log.contains(&format!(
                "migrations keep bulk threads on CPUs {list}, vCPUs and the fault path on"
            )),
            "{side} log of {name}:\n{log}"
        );
    }
    assert!(number(&s["fault_us"]["count"], "fault_us.count") > 0.0);
}

/// A scenario the host cannot run is in results.json as not run, with the reason, and the
/// report lists it under its own heading; the run as a whole still succeeded.
fn check_not_run(res: &serde_json::Value, name: &str, why: &str, out: &Path) {
    let s = scenario_named(res, name);
    assert_eq!(s["status"], "skipped", "{s}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(why),
        "{name}: error {error:?} does not say {why:?}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Not run on this host")
            && md.contains(&format!("- `{name}`: not run: {why}")),
        "report.md does not list {name} as not run"
    );
    assert!(
        md.contains("1 not run on this host"),
        "report.md summary line"
    );
}

/// What a failed scenario's processes printed: the last lines of each of its `raw/*.err`
/// files, so that a failure in CI says why without the run directory.
fn failure_detail(out: &Path, scenario: &str) -> String {
    let mut detail = String::new();
    for part in ["migrate", "src", "dst"] {
        let path = out.join("raw").join(format!("{scenario}.{part}.err"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        detail.push_str(&format!(
            "\n--- {part} stderr (last lines) ---\n{}",
            tail.join("\n")
        ));
    }
    detail
}

/// Fails with the scenario's error and its processes' stderr unless it ran.
fn assert_scenario_ok(s: &serde_json::Value, out: &Path) {
    assert_eq!(
        s["status"],
        "ok",
        "scenario failed: {}{}",
        s["error"],
        failure_detail(out, s["name"].as_str().unwrap_or_default())
    );
}

#[test]
fn quick_scenario_writes_every_field() {
    let out = tempfile::tempdir().unwrap();
    // guest_memfd RAM (256 MiB) received through 4 KiB shmem staging and mapped in 2 MiB units
    // after the last page: faults, 128 collapses (freezes) and a staging peak. It takes no huge
    // pages, so it never waits for the huge page lock other test runs hold for minutes.
    // Where the host's KVM has no guest_memfd, shmem RAM instead (no huge pages either; its
    // faults served in place, 2 MiB units collapsed), run beside the guest_memfd scenario,
    // which the harness must then report as not run, saying why.
    let gmem = "guest-memfd-4k-staged-random-loopback";
    let no_gmem = harness::probe::host(&vmm_binary())
        .expect("vmm probe --json")
        .no_guest_memfd;
    let (scenario, backing) = match no_gmem {
        None => (gmem, "guest-memfd"),
        Some(_) => ("shmem-4k-staged-random-loopback", "shmem"),
    };
    // Beside it, a pinned scenario (no huge pages either): both VMMs with `--migration-cpus`.
    let pinned = "shmem-4k-staged-random-loopback-pinned";
    let res = match &no_gmem {
        None => run_scenarios(&[scenario, pinned], out.path()),
        Some(_) => run_scenarios(&[scenario, pinned, gmem], out.path()),
    };
    let scenarios = res["scenarios"].as_array().unwrap();
    if let Some(why) = &no_gmem {
        check_not_run(&res, gmem, why, out.path());
    } else {
        assert_eq!(scenarios.len(), 2);
    }
    check_pinned(&res, pinned, out.path());
    let s = scenario_named(&res, scenario);
    assert_scenario_ok(s, out.path());
    assert_eq!(s["name"], scenario);
    assert_eq!(s["backing"], backing);
    assert_eq!(s["granularity"], "4k");
    assert_eq!(s["strategy"], "4k-staged");
    assert_eq!(s["link"], "loopback");
    assert_eq!(s["pattern"], "random");
    for field in ["fault_us", "limit_us"] {
        for p in PERCENTILES {
            let v = number(&s[field][p], &format!("{field}.{p}"));
            assert!(v > 0.0, "{field}.{p} = {v}");
        }
    }
    // The limit is the vCPU userfault round trip (measured by `vmm fault-limit` on shmem, where
    // the 4k-staged strategy stages guest_memfd faults) plus the TCP round trip; the thread
    // limit stays beside it.
    assert_eq!(
        s["limit_basis"], "vcpu",
        "vCPU limit error: {}",
        s["vcpu_limit_error"]
    );
    assert!(s["vcpu_limit_error"].is_null());
    assert_eq!(s["vcpu_uffd_backing"], "shmem");
    assert_eq!(
        s["vcpu_uffd_service"],
        "shmem MINOR + UFFDIO_CONTINUE 4 KiB"
    );
    for field in [
        "uffd_rtt_us",
        "tcp_rtt_us",
        "thread_limit_us",
        "vcpu_uffd_rtt_us",
        "vcpu_uffd_vmm_us",
        "tcp_rtt_loaded_us",
        "loaded_limit_us",
    ] {
        for p in PERCENTILES {
            let v = number(&s[field][p], &format!("{field}.{p}"));
            assert!(v > 0.0, "{field}.{p} = {v}");
        }
    }
    let p50 = |f: &str| number(&s[f]["p50"], f);
    // The guest's view of a vCPU fault includes the handler's; the limit adds a TCP round
    // trip to the vCPU round trip, so it is above each part.
    assert!(p50("vcpu_uffd_rtt_us") >= p50("vcpu_uffd_vmm_us"));
    assert!(p50("limit_us") >= p50("vcpu_uffd_rtt_us"));
    assert!(p50("limit_us") >= p50("tcp_rtt_us"));
    assert!(p50("thread_limit_us") >= p50("uffd_rtt_us"));
    // The loaded limit is the same vCPU round trip plus the round trip beside a bulk stream.
    assert!(p50("loaded_limit_us") >= p50("vcpu_uffd_rtt_us"));
    assert!(p50("loaded_limit_us") >= p50("tcp_rtt_loaded_us"));
    assert!(out.path().join("raw/fault-limit-shmem.json").is_file());
    for field in [
        "blackout_ms",
        "total_s",
        "throughput_gbps",
        "raw_throughput_gbps",
        "staging_peak_mib",
    ] {
        let v = number(&s[field], field);
        assert!(v >= 0.0, "{field} = {v}");
    }
    assert!(number(&s["total_s"], "total_s") > 0.0);
    assert!(number(&s["throughput_gbps"], "throughput_gbps") > 0.0);
    // Size and destination memory: recorded for every scenario; a plain one is no sweep point.
    assert_eq!(number(&s["memory_mib"], "memory_mib"), 256.0);
    assert_eq!(number(&s["vcpus"], "vcpus"), 1.0);
    assert!(s["sweep_of"].is_null());
    check_dst_memory(s);
    for p in ["p50", "max", "count"] {
        number(
            &s["collapse_stall_us"][p],
            &format!("collapse_stall_us.{p}"),
        );
    }
    // The staged memory is swapped back into guest_memfd (shmem: its units collapsed): at
    // least one collapse.
    assert!(number(&s["collapse_stall_us"]["count"], "collapse_stall_us.count") > 0.0);
    if backing == "guest-memfd" {
        assert!(number(&s["staging_peak_mib"], "staging_peak_mib") > 0.0);
    }
    // Guest-seen faults come from the per-pass histograms of the passes that overlapped
    // postcopy, and the VMM saw at least one fault.
    assert!(!s["guest_fault_passes"].as_array().unwrap().is_empty());
    assert!(s["guest_fault_source"]
        .as_str()
        .unwrap()
        .starts_with("per-pass"));
    assert!(number(&s["vmm_fault_us"]["count"], "vmm_fault_us.count") > 0.0);
    assert!(number(&s["faults_served"], "faults_served") > 0.0);
    number(&s["pages_pushed"], "pages_pushed");
    check_stalls_blocktime_and_loaded_raw(s);
    // Phase timing: in results.json exactly when the destination's stats file has it.
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join(format!("raw/{scenario}.stats.json"))).unwrap(),
    )
    .unwrap();
    let phases = s["fault_phase_us"].as_object().unwrap();
    match stats["fault_phase_us"].as_object() {
        Some(raw) => {
            assert_eq!(
                phases.keys().collect::<Vec<_>>(),
                raw.keys().collect::<Vec<_>>()
            );
            for (phase, st) in phases {
                assert_eq!(
                    number(&st["count"], phase),
                    number(&raw[phase]["count"], phase),
                    "{phase}"
                );
                assert!(number(&st["max"], phase) >= number(&st["p50"], phase));
            }
            let slow = stats["slow_faults"].as_array().map_or(0, Vec::len);
            if slow > 0 {
                assert_eq!(
                    number(&s["fault_tail"]["faults"], "fault_tail.faults"),
                    slow as f64
                );
            }
        }
        None => {
            assert!(phases.is_empty(), "{phases:?}");
            assert!(s["fault_tail"].is_null());
        }
    }

    // Raw histograms readable, report and plots written.
    let hist = s["histograms"].as_object().unwrap();
    for kind in [
        "guest_fault",
        "limit",
        "vmm_fault",
        "thread_limit",
        "uffd_rtt",
        "vcpu_uffd_rtt",
        "vcpu_uffd_vmm",
        "guest_stall",
    ] {
        let file = hist[kind].as_str().unwrap();
        let b64 = std::fs::read_to_string(out.path().join("hist").join(file)).unwrap();
        let h = harness::histogram::from_base64(&b64).unwrap();
        assert!(!h.is_empty(), "{kind} histogram is empty");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains(scenario));
    let p50_target = format!("p50 <= {}x limit", harness::report::targets::P50_RATIO);
    assert!(
        md.contains("## Targets") && md.contains(&p50_target),
        "{p50_target}"
    );
    // The report says what the limit is made of and shows both round trips.
    assert!(md.contains("**The limit** = the raw *vCPU* userfault round trip"));
    assert!(md.contains("thread limit p50") && md.contains("vCPU uffd p50 guest / VMM"));
    assert!(md.contains("- vCPU userfault round trip on shmem"));
    assert!(md.contains("## Guest stalls (us)") && md.contains("| raw loaded TCP Gbit/s |"));
    assert!(
        md.contains("## Faults against a busy link (us)"),
        "no loaded-limit section in the report"
    );
    assert!(md.contains("of raw loaded TCP (loopback)"));
    assert!(res["host_checks"].is_object());
    let plots = std::fs::read_dir(out.path().join("plots")).unwrap().count();
    assert!(plots >= 2, "{plots} plots");
    assert!(Path::new(&out.path().join("raw")).is_dir());
}

#[test]
fn a_source_that_cannot_boot_fails_its_scenario_with_the_vmm_error() {
    let out = tempfile::tempdir().unwrap();
    let kernel = out.path().join("not-a-kernel");
    std::fs::write(&kernel, b"short").unwrap();
    let scenario = "shmem-4k-staged-random-loopback";
    let res = run_scenarios_with(&[scenario], &kernel, out.path());
    let s = &res["scenarios"][0];
    assert_eq!(s["status"], "failed", "{s}");
    let error = s["error"].as_str().unwrap_or_default();
    // The VMM's own error, not a wait that timed out.
    assert!(
        error
            .starts_with("the source VMM exited (exit status: 1) before its guest finished a pass")
            && error.contains("not-a-kernel is neither an ELF"),
        "{error}"
    );
}

#[test]
fn reset_scenario_recovers_and_keeps_outage_faults_apart() {
    let out = tempfile::tempdir().unwrap();
    // 256 MiB on 2 MiB pages (it waits for the huge page lock if another test run holds it);
    // the relay resets every connection once a third of the guest RAM size has gone through.
    let scenario = "hugetlb-2m-4k-staged-random-loopback-reset1";
    let res = run_scenario(scenario, out.path());
    let scenarios = res["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1);
    let s = &scenarios[0];
    assert_scenario_ok(s, out.path());
    assert_eq!(s["name"], scenario);
    assert_eq!(s["link"], "loopback-reset1");
    assert!(s["link_fault"].as_str().unwrap().contains("reset"));
    // The relay reset the link, both sides recovered, both were paused for a while.
    assert!(number(&s["link_resets"], "link_resets") >= 1.0);
    assert!(number(&s["recoveries"], "recoveries") >= 1.0);
    assert!(number(&s["dst_recoveries"], "dst_recoveries") >= 1.0);
    assert!(number(&s["paused_ms"], "paused_ms") > 0.0);
    assert!(number(&s["dst_paused_ms"], "dst_paused_ms") > 0.0);
    // The guest verified every page after the migration.
    assert_eq!(s["guest_ok"], true);
    assert_eq!(number(&s["guest_mismatches"], "guest_mismatches"), 0.0);
    // Normal faults measured; outage faults (if a vCPU faulted during the outage) kept apart:
    // their own summary and histogram, never in the normal ones.
    assert!(number(&s["vmm_fault_us"]["count"], "vmm_fault_us.count") > 0.0);
    assert!(number(&s["fault_us"]["count"], "fault_us.count") > 0.0);
    for field in ["outage_fault_us", "guest_outage_fault_us"] {
        for p in PERCENTILES {
            number(&s[field][p], &format!("{field}.{p}"));
        }
    }
    let outage = number(&s["outage_fault_us"]["count"], "outage_fault_us.count");
    let hist = s["histograms"].as_object().unwrap();
    assert_eq!(hist.contains_key("outage_fault"), outage > 0.0);
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join(format!("raw/{scenario}.stats.json"))).unwrap(),
    )
    .unwrap();
    let raw_outage = stats["outage_fault_ns"].as_array().unwrap().len();
    assert_eq!(raw_outage as f64, outage);
    let raw_normal = stats["fault_ns"].as_array().unwrap().len();
    assert_eq!(
        raw_normal as f64,
        number(&s["vmm_fault_us"]["count"], "vmm_fault_us.count")
    );
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("## Postcopy recovery"));
    assert!(md
        .lines()
        .any(|l| l.starts_with(&format!("| {scenario} | ok |"))));
}

#[test]
fn qemu_scenario_writes_the_same_fields_and_names_the_peer() {
    if harness::qemu::find().is_none() {
        println!(
            "SKIP qemu_scenario_writes_the_same_fields_and_names_the_peer: {} not found on PATH \
             (install qemu-system-x86, ci/install-deps.sh)",
            harness::qemu::QEMU_BINARY
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    // QEMU's postcopy of 256 MiB of shmem (memory-backend-memfd, no huge pages) on loopback.
    let scenario = "shmem-qemu-random-loopback";
    let res = run_scenario(scenario, out.path());
    let scenarios = res["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1);
    let s = &scenarios[0];
    assert_scenario_ok(s, out.path());
    assert_eq!(s["name"], scenario);
    assert_eq!(s["backing"], "shmem");
    assert_eq!(s["strategy"], "qemu");
    assert_eq!(s["granularity"], "host-page");
    assert_eq!(s["link"], "loopback");
    assert_eq!(s["pattern"], "random");
    // The peer and its version.
    assert_eq!(s["peer"], "qemu");
    let version = s["peer_version"].as_str().unwrap();
    let parts: Vec<_> = version.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "peer_version {version:?}"
    );
    assert!(s["peer_version_line"]
        .as_str()
        .unwrap()
        .starts_with(&format!("QEMU emulator version {version}")));
    let caps: Vec<_> = s["peer_capabilities"].as_array().unwrap().iter().collect();
    assert!(caps.iter().any(|c| *c == "postcopy-ram"), "{caps:?}");
    // The same figures as ours: guest-seen faults and the limit, both non-empty.
    for field in ["fault_us", "limit_us", "tcp_rtt_us", "vcpu_uffd_rtt_us"] {
        for p in PERCENTILES {
            let v = number(&s[field][p], &format!("{field}.{p}"));
            assert!(v > 0.0, "{field}.{p} = {v}");
        }
    }
    assert_eq!(s["limit_basis"], "vcpu", "{}", s["vcpu_limit_error"]);
    for field in [
        "blackout_ms",
        "total_s",
        "throughput_gbps",
        "raw_throughput_gbps",
    ] {
        let v = number(&s[field], field);
        assert!(v > 0.0, "{field} = {v}");
    }
    assert!(!s["guest_fault_passes"].as_array().unwrap().is_empty());
    assert!(s["guest_fault_source"]
        .as_str()
        .unwrap()
        .starts_with("per-pass"));
    // QEMU's own counters beside them: pages the destination requested, per-vCPU blocktime.
    let requests = number(&s["postcopy_requests"], "postcopy_requests");
    assert!(requests > 0.0);
    assert_eq!(number(&s["faults_served"], "faults_served"), requests);
    assert_eq!(s["peer_vcpu_blocktime_ms"].as_array().unwrap().len(), 1);
    number(&s["peer_blocktime_ms"], "peer_blocktime_ms");
    assert!(number(&s["guest_blocktime_ms"], "guest_blocktime_ms") > 0.0);
    check_stalls_blocktime_and_loaded_raw(s);
    // QEMU times no phases.
    assert!(s["fault_phase_us"].as_object().unwrap().is_empty());
    assert_eq!(s["guest_ok"], true);
    assert_eq!(number(&s["guest_mismatches"], "guest_mismatches"), 0.0);
    let hist = s["histograms"].as_object().unwrap();
    for kind in ["guest_fault", "limit", "tcp_rtt", "vcpu_uffd_rtt"] {
        let file = hist[kind].as_str().unwrap();
        let b64 = std::fs::read_to_string(out.path().join("hist").join(file)).unwrap();
        assert!(!harness::histogram::from_base64(&b64).unwrap().is_empty());
    }
    assert!(!hist.contains_key("vmm_fault"));
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        md.contains("## Beside QEMU") && md.contains(version),
        "{md}"
    );
    assert!(out
        .path()
        .join(format!("raw/{scenario}.query-migrate.json"))
        .is_file());
}

/// A tiny size sweep (64 and 128 MiB, 1 vCPU, quick limits) end to end: both points ran, each
/// carries its size, vCPUs, base scenario and the sweep's figures; the report has the sweep
/// section with its verdicts and the four sweep plots; a merge of the run with itself keeps
/// the sweep. Bad sizes fail before any VM starts, saying what is wrong.
#[test]
fn size_sweep_writes_its_fields_report_and_plots() {
    let harness = env!("CARGO_BIN_EXE_harness");
    let out = tempfile::tempdir().unwrap();
    let bad = Command::new(harness)
        .args(["run", "--sweep", "size", "--sizes", "64M,lots", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad size \"lots\""), "{err}");
    assert!(!out.path().join("results.json").exists());

    let base = "shmem-4k-staged-random-loopback";
    let status = Command::new(harness)
        .args([
            "run",
            "--quick",
            "--sweep",
            "size",
            "--sizes",
            "128M,64M",
            "--sweep-vcpus",
            "1",
            "--phase-timeout",
            "40",
        ])
        .arg("--vmm")
        .arg(vmm_binary())
        .arg("--kernel")
        .arg(workload_guest())
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "harness run exited with {status}");
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let res: serde_json::Value = serde_json::from_str(&text).unwrap();
    let scenarios = res["scenarios"].as_array().unwrap();
    let names: Vec<_> = scenarios
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [format!("{base}-64m-1vcpu"), format!("{base}-128m-1vcpu")]
    );
    for (s, mib) in scenarios.iter().zip([64.0, 128.0]) {
        assert_eq!(s["status"], "ok", "{}: {}", s["name"], s["error"]);
        assert_eq!(s["sweep_of"], base);
        assert_eq!(number(&s["memory_mib"], "memory_mib"), mib);
        assert_eq!(number(&s["vcpus"], "vcpus"), 1.0);
        assert!(number(&s["blackout_ms"], "blackout_ms") > 0.0);
        assert!(number(&s["total_s"], "total_s") > 0.0);
        for p in ["p50", "p99", "count"] {
            let v = number(&s["fault_us"][p], &format!("fault_us.{p}"));
            assert!(v > 0.0, "fault_us.{p} = {v}");
        }
        check_dst_memory(s);
        assert_eq!(s["guest_ok"], true);
    }
    // A vCPU count given by the sweep names its fault-limit file.
    assert!(out
        .path()
        .join("raw/fault-limit-shmem-1vcpu.json")
        .is_file());
    let check_report = |dir: &Path| {
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("## Size sweep"), "{md}");
        assert!(md.contains("sweep: blackout flat"), "{md}");
        assert!(md.contains("sweep: fault p99 flat"), "{md}");
        assert!(md.contains(&format!("| {base} | 128 | 1 |")), "{md}");
        for plot in [
            "sweep-blackout",
            "sweep-total-time",
            "sweep-fault-latency",
            "sweep-dst-extra-memory",
        ] {
            let svg = std::fs::read_to_string(dir.join(format!("plots/{plot}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("1 vCPU"), "{plot}");
            assert!(
                md.contains(&format!("(plots/{plot}.svg)")),
                "{plot} not in the report"
            );
        }
    };
    check_report(out.path());
    // Merged with itself: two runs per point, the sweep fields kept.
    let merged = tempfile::tempdir().unwrap();
    let status = Command::new(harness)
        .arg("merge")
        .arg("--out")
        .arg(merged.path())
        .arg(out.path())
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "harness merge exited with {status}");
    let text = std::fs::read_to_string(merged.path().join("results.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    for s in m["scenarios"].as_array().unwrap() {
        assert_eq!(number(&s["runs"], "runs"), 2.0);
        assert_eq!(s["sweep_of"], base);
        number(&s["memory_mib"], "memory_mib");
        check_dst_memory(s);
    }
    check_report(merged.path());
}
