//! The workload guest under QEMU: booted through its PVH entry (`-kernel workload.elf`), a
//! short finite run must print the same lines our VMM gets (parsed by the same parser), end
//! with status ok through `isa-debug-exit` (QEMU exit status `(0 << 1) | 1`), and a guest that
//! fails must exit with its own code. Needs qemu-system-x86_64 (`ci/install-deps.sh` installs
//! it); without it the test prints a SKIP line and returns.

use harness::guest_output::GuestOutput;
use harness::qemu::{self, GuestConfig, Memory};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the guest once under QEMU with `cmdline`; returns (QEMU exit status, stdout).
fn boot(qemu_bin: &Path, cmdline: &str, dir: &Path) -> (i32, String) {
    let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out/workload.elf");
    assert!(
        kernel.is_file(),
        "no workload guest at {}: run guest-images/build-workload.sh",
        kernel.display()
    );
    let cfg = GuestConfig {
        kernel,
        cmdline: cmdline.into(),
        memory_mib: 128,
        vcpus: 1,
        memory: Memory::Memfd,
        qmp: dir.join("qmp.sock"),
        incoming: false,
    };
    let mut child = Command::new(qemu_bin)
        .args(qemu::args(&cfg))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting QEMU");
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for QEMU") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not end within 120 s (cmdline {cmdline:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("reading QEMU's output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = status.code().unwrap_or_else(|| {
        panic!(
            "QEMU was killed ({status}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, stdout)
}

#[test]
fn workload_boots_under_qemu_and_exits_through_isa_debug_exit() {
    let Some(qemu_bin) = qemu::find() else {
        println!(
            "SKIP workload_boots_under_qemu: {} not found on PATH (install qemu-system-x86, \
             ci/install-deps.sh)",
            qemu::QEMU_BINARY
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (status, out) = boot(
        &qemu_bin,
        "span=32M passes=3 pattern=random tsc_khz=2000000",
        dir.path(),
    );
    assert_eq!(
        qemu::guest_exit_code(status),
        Some(0),
        "QEMU exit status {status}; output:\n{out}"
    );
    let g = GuestOutput::parse(&out);
    let start = g.start.as_ref().expect("no start line");
    assert_eq!((start.vcpus, start.pages, start.passes), (1, 8192, 3));
    assert!(
        out.lines()
            .any(|l| l.starts_with("WORKLOAD start") && l.ends_with("vmm=qemu boot=pvh")),
        "{out}"
    );
    assert_eq!(g.passes.len(), 3, "{out}");
    assert!(g
        .passes
        .iter()
        .all(|p| p.pages == 8192 && p.mismatches == 0));
    let res = g.result.as_ref().expect("no result line");
    assert!(res.ok, "{out}");
    assert!(g.final_hist("first_touch").is_some(), "{out}");
    // The guest states its stall threshold and bucket scheme, and its stall histogram holds
    // only stalls above that threshold (a bucket may start up to 3.1% below it).
    assert_eq!(start.stall_threshold_ns, Some(20_000), "{out}");
    let stall = g.final_hist("stall").expect("no stall histogram");
    assert_eq!((stall.sub_buckets, stall.threshold), (32, Some(20_000)));
    assert!(stall.buckets.iter().all(|&(lo, _)| lo >= 19_000), "{out}");

    // A bad option ends the guest from ring 3 with code 2 (QEMU status 5), an exception from
    // the ring-0 stub with code 3 (status 7): the exit code is the guest's, not QEMU's.
    let (status, out) = boot(&qemu_bin, "passes=x", dir.path());
    assert_eq!(qemu::guest_exit_code(status), Some(2), "{out}");
    assert!(
        out.contains("WORKLOAD ERROR bad option 'passes=x'"),
        "{out}"
    );
    let (status, out) = boot(&qemu_bin, "span=8M fault=ud", dir.path());
    assert_eq!(qemu::guest_exit_code(status), Some(3), "{out}");
    assert!(out.contains("WORKLOAD EXCEPTION vector=0x6"), "{out}");
}
