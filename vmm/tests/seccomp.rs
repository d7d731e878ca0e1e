//! Seccomp: a thread that makes a system call its role forbids stops the process with a report
//! naming the role and the call (real filters, in a child process of this test binary); log
//! mode lets the call through; `vmm run --seccomp off` and `--seccomp log` run the workload
//! guest (the default, on, is what every other VM and migration test runs under).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vmm::seccomp::{self, Mode, Role, VIOLATION_EXIT};

/// Set in the child process this test binary starts: which mode and role it filters with.
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

/// The file the child opens when asked to open one instead of a socket.
const CHILD_OPENS: &str = "/proc/self/status";

/// What the child's filtered thread does.
#[derive(Clone, Copy, PartialEq)]
enum ChildDoes {
    /// Opens a TCP socket (no role but main and api may).
    Socket,
    /// Opens [`CHILD_OPENS`].
    OpenFile,
    /// Allocates 4 MB in 100 KB blocks and frees them: the C library's malloc shrinks the
    /// thread's heap, and the first shrink in a process reads a /proc file.
    FreeMuch,
}

/// In the child: set seccomp up as `vmm run` does, then in a thread narrowed to `role`, do
/// `does` and exit 0 if that returned.
fn child(mode: Mode, role: Role, does: ChildDoes) -> ! {
    seccomp::init(mode).expect("seccomp init");
    let t = std::thread::spawn(move || {
        seccomp::enter(role).expect("entering the role");
        match does {
            ChildDoes::Socket => {}
            ChildDoes::OpenFile => {
                return match std::fs::File::open(CHILD_OPENS) {
                    Ok(_) => 0,
                    Err(_) => -1,
                };
            }
            ChildDoes::FreeMuch => {
                let blocks: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 100_000]).collect();
                let sum: u64 = blocks.iter().map(|b| u64::from(b[99_999])).sum();
                drop(std::hint::black_box(blocks));
                return if sum == (0..40).sum::<u64>() { 0 } else { -1 };
            }
        }
        // SAFETY: socket has no memory arguments; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: fd is the descriptor socket just returned.
            unsafe { libc::close(fd) };
        }
        fd
    });
    let fd = t.join().expect("the filtered thread");
    // SAFETY: _exit ends the process at once (no libtest teardown under the filter).
    unsafe { libc::_exit(if fd >= 0 { 0 } else { 2 }) }
}

/// Runs `child_process` of this binary with `mode`/`role`; returns (status code, stderr).
fn run_child(mode: &str, role: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_process", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{mode}:{role}"))
        .output()
        .expect("running the child");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Not a test of its own: the body of the child process the tests below start.
#[test]
#[ignore]
fn child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, role) = spec.split_once(':').expect("mode:role");
    let mode: Mode = mode.parse().expect("mode");
    let (role, does) = match role.split_once('+') {
        Some((r, "open")) => (r, ChildDoes::OpenFile),
        Some((r, "free")) => (r, ChildDoes::FreeMuch),
        Some((_, other)) => panic!("child action {other}"),
        None => (role, ChildDoes::Socket),
    };
    let role = match role {
        "vcpu" => Role::Vcpu,
        "fault-service" => Role::FaultService,
        "migration" => Role::Migration,
        "api" => Role::Api,
        other => panic!("role {other}"),
    };
    child(mode, role, does);
}

#[test]
fn a_forbidden_system_call_stops_the_process_and_names_the_thread_role_and_call() {
    for role in ["vcpu", "fault-service", "migration"] {
        let (code, err) = run_child("on", role);
        assert_eq!(code, Some(VIOLATION_EXIT), "{role}: {err}");
        assert!(
            err.contains(&format!("seccomp: the {role} thread"))
                && err.contains(&format!("system call {} (socket)", libc::SYS_socket))
                && err.contains("forbids"),
            "{role}: {err}"
        );
    }
}

#[test]
fn the_report_names_the_path_and_where_the_call_came_from() {
    let (code, err) = run_child("on", "vcpu+open");
    assert_eq!(code, Some(VIOLATION_EXIT), "{err}");
    assert!(
        err.contains(&format!("system call {} (openat)", libc::SYS_openat)),
        "{err}"
    );
    assert!(err.contains(&format!("path \"{CHILD_OPENS}\"")), "{err}");
    // The call is in the C library's open wrapper, and the stack holds this test binary's
    // std::fs::File::open caller: both named as object+offset.
    assert!(err.contains("called at libc.so.6+0x"), "{err}");
    let exe = std::env::current_exe().expect("test binary");
    let exe = exe
        .file_name()
        .and_then(|n| n.to_str())
        .expect("test binary name");
    assert!(err.contains(&format!(" {exe}+0x")), "{err}");
}

/// A filtered thread that frees a lot must not be stopped: glibc reads
/// /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks, which once stopped a
/// migrated VM's ending vCPU thread.
#[test]
fn a_filtered_thread_may_free_much_memory() {
    for role in ["vcpu", "fault-service", "migration"] {
        let (code, err) = run_child("on", &format!("{role}+free"));
        assert_eq!(code, Some(0), "{role}: {err}");
    }
}

#[test]
fn log_mode_lets_the_call_through_and_api_may_open_sockets() {
    let (code, err) = run_child("log", "vcpu");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run_child("on", "api");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn vmm_run_works_with_seccomp_off_and_log() {
    let kernel = image("workload.elf");
    for mode in ["off", "log"] {
        let out = run_vmm(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "64M",
                "--vcpus",
                "2",
                "--seccomp",
                mode,
                "--cmdline",
                "span=16M passes=1 pattern=random",
            ],
            Duration::from_secs(120),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result = workload_result(&stdout).unwrap_or_else(|| {
            panic!(
                "--seccomp {mode}: no WORKLOAD RESULT line\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(field(&result, "status"), Some("ok"), "{stdout}");
        assert_eq!(out.status.code(), Some(0), "--seccomp {mode}");
    }
    let out = run_vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            "--seccomp",
            "maybe",
        ],
        Duration::from_secs(30),
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seccomp"));
}
