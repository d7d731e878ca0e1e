//! `vmm run` end to end: the workload guest on every backing with 1 and 2 vCPUs, a Linux kernel
//! reaching the console, clean shutdown on SIGTERM, and the errors bad input gets.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm::memory::hugepages::pool_status;
use vmm::memory::{PAGE_SIZE_1G, PAGE_SIZE_2M};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Boots the workload guest and checks it verified its memory and exited 0.
fn workload_runs(backing: &str, memory: &str, vcpus: u8) {
    let args = workload_run_args(backing, memory, vcpus, "span=32M passes=2 pattern=random");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_vmm(&args, RUN_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result = workload_result(&stdout).unwrap_or_else(|| {
        panic!("no WORKLOAD RESULT line.\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    assert_workload_ok(&result, Some(2), &stdout);
    assert!(
        stdout.contains(&format!("WORKLOAD start vcpus={vcpus} ")),
        "guest did not see {vcpus} vCPUs:\n{stdout}"
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
}

#[test]
fn workload_on_anon_1_and_2_vcpus() {
    workload_runs("anon", "256M", 1);
    workload_runs("anon", "256M", 2);
}

#[test]
fn workload_on_shmem_1_and_2_vcpus() {
    workload_runs("shmem", "256M", 1);
    workload_runs("shmem", "256M", 2);
}

#[test]
fn workload_on_guest_memfd_1_and_2_vcpus() {
    if !guest_memfd_or_refusal() {
        return;
    }
    workload_runs("guest-memfd", "256M", 1);
    workload_runs("guest-memfd", "256M", 2);
}

/// [`workload_runs`] on 1 and 2 vCPUs with `count` huge pages of `page_size` reserved; the VMM
/// gives every page back each time.
fn workload_on_hugetlb_gives_pages_back(page_size: u64, count: u64, backing: &str, memory: &str) {
    let _pages = reserve_hugepages(page_size, count)
        .unwrap_or_else(|e| panic!("reserve {count} x {page_size} bytes: {e}"));
    let free_before = pool_status(page_size).unwrap().free;
    workload_runs(backing, memory, 1);
    workload_runs(backing, memory, 2);
    assert_eq!(pool_status(page_size).unwrap().free, free_before);
}

#[test]
fn workload_on_hugetlb_2m_1_and_2_vcpus_gives_pages_back() {
    workload_on_hugetlb_gives_pages_back(PAGE_SIZE_2M, 128, "hugetlb-2m", "256M");
}

#[test]
fn workload_on_hugetlb_1g_1_and_2_vcpus_gives_pages_back() {
    workload_on_hugetlb_gives_pages_back(PAGE_SIZE_1G, 1, "hugetlb-1g", "1G");
}

#[test]
fn workload_uses_memory_above_the_pci_hole() {
    // 3.5 GiB of anonymous memory: the second region starts at 4 GiB. Anonymous memory is
    // allocated lazily, so only the touched span costs host memory.
    let kernel = image("workload.elf");
    let out = run_vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "3584M",
            "--cmdline",
            "span=3400M passes=1 pattern=sequential",
        ],
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = workload_result(&stdout).unwrap_or_else(|| panic!("no result:\n{stdout}"));
    assert_eq!(field(&result, "status"), Some("ok"), "{stdout}");
    assert_eq!(out.status.code(), Some(0));
}

/// Runs `vmm run` with bad input; returns (exit code, stderr).
fn vmm_fails(args: &[&str]) -> (Option<i32>, String) {
    let out = run_vmm(args, Duration::from_secs(30));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`vmm_fails`] with `vmm run --kernel KERNEL --memory MEMORY` and `extra`.
fn run_fails(kernel: &Path, memory: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        memory,
    ];
    args.extend_from_slice(extra);
    vmm_fails(&args)
}

#[test]
fn memory_not_a_multiple_of_the_page_size_is_refused() {
    let kernel = image("workload.elf");
    let (code, err) = run_fails(&kernel, "3M", &["--backing", "hugetlb-2m"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("not a multiple of the hugetlb-2m page size"),
        "{err}"
    );
}

#[test]
fn a_pool_too_small_says_how_to_reserve_pages() {
    let kernel = image("workload.elf");
    let _lock = vmm::memory::hugepages::lock_hugepages().unwrap();
    let free = pool_status(PAGE_SIZE_1G).unwrap().free;
    let want = free + 64;
    let (code, err) = run_fails(&kernel, &format!("{want}G"), &["--backing", "hugetlb-1g"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("{want} pages needed")), "{err}");
    assert!(err.contains(&format!("{free} free")), "{err}");
    assert!(
        err.contains("> /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"),
        "{err}"
    );
    assert_eq!(
        pool_status(PAGE_SIZE_1G).unwrap().free,
        free,
        "pages leaked"
    );
}

#[test]
fn missing_and_malformed_kernels_are_refused() {
    let (code, err) = vmm_fails(&["run", "--kernel", "/nonexistent/vmlinux", "--memory", "64M"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/vmlinux does not exist"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let (code, err) = run_fails(&junk, "64M", &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is neither an ELF (vmlinux) nor a bzImage"),
        "{err}"
    );

    // A truncated ELF: the header is right, the rest is missing.
    let elf = std::fs::read(image("workload.elf")).unwrap();
    let cut = dir.path().join("cut.elf");
    std::fs::write(&cut, &elf[..100]).unwrap();
    let (code, err) = run_fails(&cut, "64M", &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cut.elf"), "{err}");
}

#[test]
fn bad_sizes_and_backings_are_refused_by_the_command_line() {
    let kernel = image("workload.elf");
    let (code, err) = run_fails(&kernel, "lots", &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'lots' is not a size"), "{err}");
    let (code, err) = run_fails(&kernel, "64M", &["--backing", "floppy"]);
    assert_eq!(code, Some(2));
    // clap names the bad value and lists the accepted ones.
    assert!(
        err.contains("invalid value 'floppy' for '--backing"),
        "{err}"
    );
    assert!(
        err.contains("anon, shmem, hugetlb-2m, hugetlb-1g, guest-memfd"),
        "{err}"
    );
}

#[test]
fn a_bad_migration_cpu_list_is_refused_before_the_vm_starts() {
    let kernel = image("workload.elf");
    let allowed = migration::cpu_placement::CpuList::allowed().unwrap();
    let cases = [
        (
            "x".to_string(),
            "--migration-cpus x: \"x\" is not a CPU number (expected a CPU list such as"
                .to_string(),
        ),
        (
            "3-1".to_string(),
            "range \"3-1\" runs backwards".to_string(),
        ),
        (
            allowed.to_string(),
            format!(
                "--migration-cpus {allowed}: it leaves no CPU for the vCPUs and the fault path \
                 (this process may run on {allowed}; name fewer)"
            ),
        ),
        (
            "1000".to_string(),
            "--migration-cpus 1000: CPU 1000 is not one this process may run on".to_string(),
        ),
    ];
    for (list, want) in cases {
        let (code, err) = run_fails(&kernel, "64M", &["--migration-cpus", &list]);
        assert_eq!(code, Some(1), "{list}: {err}");
        assert!(err.contains(&want), "{list}: wanted {want:?} in {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn dev_kvm_not_accessible_is_explained() {
    // Drop to an unprivileged user: /dev/kvm is root-only here.
    let kernel = image("workload.elf");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("vmm");
    std::fs::copy(vmm_bin(), &bin).unwrap();
    let k = dir.path().join("workload.elf");
    std::fs::copy(kernel, &k).unwrap();
    for p in [&bin, &k] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "64M"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
}

#[test]
fn sigterm_shuts_down_cleanly_and_gives_back_huge_pages() {
    let _pages = reserve_hugepages(PAGE_SIZE_2M, 64).expect("reserve 64 x 2 MiB");
    let free_before = pool_status(PAGE_SIZE_2M).unwrap().free;
    let kernel = image("workload.elf");
    let mut child = vmm_command(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128M",
        "--backing",
        "hugetlb-2m",
        "--vcpus",
        "2",
        "--cmdline",
        "span=32M passes=0",
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Wait until the guest completed a pass, so the VM really runs with its pages in use.
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let start = Instant::now();
    loop {
        let l = lines.next().expect("guest output ended").unwrap();
        if l.starts_with("WORKLOAD pass") {
            break;
        }
        assert!(start.elapsed() < RUN_LIMIT, "no pass completed");
    }
    assert!(pool_status(PAGE_SIZE_2M).unwrap().free < free_before);
    // SAFETY: `child.id()` is the PID of the process this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::spawn(move || for _ in lines {});
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(pool_status(PAGE_SIZE_2M).unwrap().free, free_before);
}

#[test]
fn linux_banner_reaches_the_serial_console() {
    let kernel = image("vmlinux");
    let mut child = vmm_command(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "512M",
        "--vcpus",
        "2",
    ])
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("Linux version") => break true,
            Ok(l) => seen.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break false,
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "no Linux banner on the console; got:\n{}",
        seen.join("\n")
    );
}

#[test]
fn api_socket_is_private_and_answers_status() {
    let kernel = image("workload.elf");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = vmm_command(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128M",
        "--cmdline",
        "span=16M passes=0",
        "--api-socket",
        sock.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "API socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let reply = vmm::api::Client::new(&sock)
        .info()
        .map(|i| serde_json::to_value(i).expect("vm.info encodes"))
        .unwrap();
    assert_eq!(reply["state"], "running");
    assert_eq!(reply["config"]["backing"], "anon");
    // SAFETY: `child.id()` is the PID of the process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
    assert!(!sock.exists(), "API socket left behind");
}

#[test]
fn probe_reports_kvm_uffd_and_pools_as_json() {
    let out = run_vmm(&["probe", "--json"], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
    let text = v.to_string();
    for key in ["kvm", "userfaultfd", "hugepages"] {
        assert!(text.contains(key), "probe JSON lacks {key}: {text}");
    }
    let out = run_vmm(&["probe"], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.to_lowercase().contains("pvm")
            || t.to_lowercase().contains("vmx")
            || t.to_lowercase().contains("svm"),
        "{t}"
    );
}
