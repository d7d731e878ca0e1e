//! One quick scenario end to end: real source and destination VMM processes, a real migration,
//! and every field of results.json checked. Needs `cargo build -p vmm` and the workload guest
//! (guest-images/out/workload.elf).

use std::path::Path;
use std::process::Command;

const PERCENTILES: [&str; 6] = ["p50", "p90", "p99", "p999", "max", "count"];

fn number(v: &serde_json::Value, path: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {v}"))
}

#[test]
#[ignore = "needs vmm migrate"]
fn quick_scenario_writes_every_field() {
    let out = tempfile::tempdir().unwrap();
    let scenario = "shmem-4k-staged-random-loopback";
    let status = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["run", "--scenario", scenario, "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "harness run exited with {status}");

    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let res: serde_json::Value = serde_json::from_str(&text).unwrap();
    let scenarios = res["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1);
    let s = &scenarios[0];
    assert_eq!(s["status"], "ok", "scenario failed: {}", s["error"]);
    assert_eq!(s["name"], scenario);
    assert_eq!(s["backing"], "shmem");
    assert_eq!(s["strategy"], "4k-staged");
    assert_eq!(s["link"], "loopback");
    assert_eq!(s["pattern"], "random");
    for field in ["fault_us", "limit_us"] {
        for p in PERCENTILES {
            let v = number(&s[field][p], &format!("{field}.{p}"));
            assert!(v > 0.0, "{field}.{p} = {v}");
        }
    }
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
    for p in ["p50", "max", "count"] {
        number(
            &s["collapse_stall_us"][p],
            &format!("collapse_stall_us.{p}"),
        );
    }
    assert!(number(&s["faults_served"], "faults_served") > 0.0);
    number(&s["pages_pushed"], "pages_pushed");

    // Raw histograms readable, report and plots written.
    let hist = s["histograms"].as_object().unwrap();
    for kind in ["guest_fault", "limit", "vmm_fault"] {
        let file = hist[kind].as_str().unwrap();
        let b64 = std::fs::read_to_string(out.path().join("hist").join(file)).unwrap();
        let h = harness::histogram::from_base64(&b64).unwrap();
        assert!(!h.is_empty(), "{kind} histogram is empty");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains(scenario));
    let plots = std::fs::read_dir(out.path().join("plots")).unwrap().count();
    assert!(plots >= 2, "{plots} plots");
    assert!(Path::new(&out.path().join("raw")).is_dir());
}
