//! `vmm fault-limit` end to end: the workload guest's first touch of every page served by a raw
//! userfault handler (shmem MINOR + CONTINUE, anon MISSING + COPY), the JSON it prints, and the
//! errors bad input gets.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

fn fault_limit_json(backing: &str, extra: &[&str]) -> serde_json::Value {
    let kernel = image("workload.elf");
    let mut args = vec![
        "fault-limit",
        "--kernel",
        kernel.to_str().unwrap(),
        "--backing",
        backing,
        "--memory",
        "128M",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run_vmm(&args, LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn num(v: &serde_json::Value, path: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {v}"))
}

/// Checks the summaries of one report: both sides counted faults, percentiles are ordered and
/// in a plausible range, and the guest (whose time includes the handler's) saw at least the
/// VMM side's median.
fn check_plausible(j: &serde_json::Value) {
    let g = &j["guest_us"];
    let v = &j["vmm_us"];
    let guest_count = num(&g["count"], "guest_us.count");
    let vmm_count = num(&v["count"], "vmm_us.count");
    // 128 MiB: tens of thousands of pages, each first-touched once by the guest.
    assert!(guest_count > 10_000.0, "guest count {guest_count}");
    assert!(vmm_count > 0.0, "vmm count {vmm_count}");
    // Every guest first touch is a fault the handler served (plus faults on page tables etc.).
    assert!(
        vmm_count >= guest_count * 0.99,
        "{vmm_count} VMM faults for {guest_count} touches"
    );
    for s in [g, v] {
        let p: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
            .iter()
            .map(|k| num(&s[*k], k))
            .collect();
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "unordered {p:?}");
    }
    let (gp50, vp50) = (num(&g["p50"], "guest p50"), num(&v["p50"], "vmm p50"));
    // A vCPU userfault costs a few microseconds at least and well under 10 ms at the median.
    assert!(gp50 > 1.0 && gp50 < 10_000.0, "guest p50 {gp50} us");
    assert!(vp50 > 0.1 && vp50 < 10_000.0, "VMM p50 {vp50} us");
    assert!(gp50 >= vp50, "guest p50 {gp50} < VMM p50 {vp50}");
    assert!(!j["guest_buckets_ns"].as_array().unwrap().is_empty());
    assert!(!j["vmm_histogram_ns"].as_array().unwrap().is_empty());
}

#[test]
fn shmem_vcpu_round_trip_is_measured() {
    let j = fault_limit_json("shmem", &[]);
    assert_eq!(j["measured_backing"], "shmem");
    assert_eq!(j["service"], "shmem MINOR + UFFDIO_CONTINUE 4 KiB");
    assert!(j["note"].is_null());
    check_plausible(&j);
}

#[test]
fn guest_memfd_is_measured_on_shmem_and_anon_with_copy() {
    let j = fault_limit_json("guest-memfd", &["--vcpus", "2"]);
    assert_eq!(j["requested_backing"], "guest-memfd");
    assert_eq!(j["measured_backing"], "shmem");
    assert!(j["note"].as_str().unwrap().contains("shmem"));
    assert_eq!(j["vcpus"], 2);
    check_plausible(&j);

    let j = fault_limit_json("anon", &[]);
    assert_eq!(j["measured_backing"], "anon");
    assert_eq!(j["service"], "anon MISSING + UFFDIO_COPY 4 KiB");
    check_plausible(&j);
}

#[test]
fn text_output_names_both_sides() {
    let kernel = image("workload.elf");
    let out = run_vmm(
        &[
            "fault-limit",
            "--kernel",
            kernel.to_str().unwrap(),
            "--backing",
            "hugetlb-1g",
            "--memory",
            "1G",
            "--cmdline",
            "span=16M passes=1",
        ],
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("guest-seen") && stdout.contains("VMM-side"),
        "{stdout}"
    );
    assert!(stdout.contains("measured on shmem"), "{stdout}");
    assert!(
        stdout.contains("note: measured on shmem of the same size"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let kernel = image("workload.elf");
    let k = kernel.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "fault-limit",
                "--kernel",
                "/nonexistent/workload.elf",
                "--backing",
                "shmem",
                "--memory",
                "64M",
            ],
            1,
            "kernel /nonexistent/workload.elf does not exist",
        ),
        (
            &[
                "fault-limit",
                "--kernel",
                k,
                "--backing",
                "floppy",
                "--memory",
                "64M",
            ],
            2,
            "invalid value 'floppy' for '--backing",
        ),
        (
            &[
                "fault-limit",
                "--kernel",
                k,
                "--backing",
                "shmem",
                "--memory",
                "0",
            ],
            1,
            "greater than zero",
        ),
        (
            // The size is checked against the requested backing even though shmem is measured.
            &[
                "fault-limit",
                "--kernel",
                k,
                "--backing",
                "hugetlb-1g",
                "--memory",
                "64M",
            ],
            1,
            "not a multiple of the hugetlb-1g page size",
        ),
        (
            &[
                "fault-limit",
                "--kernel",
                k,
                "--backing",
                "shmem",
                "--memory",
                "64M",
                "--vcpus",
                "0",
            ],
            1,
            "0 vCPUs requested",
        ),
        (
            &[
                "fault-limit",
                "--kernel",
                k,
                "--backing",
                "shmem",
                "--memory",
                "64M",
                "--cmdline",
                "pattern=zigzag",
            ],
            1,
            "exited with code 2",
        ),
    ];
    for (args, code, text) in cases {
        let out = run_vmm(args, LIMIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(text),
            "{args:?}: expected '{text}' in:\n{stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("guest-seen"));
    }
}
