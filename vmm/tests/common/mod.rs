//! Helpers shared by the VMM's integration tests: where the binary and guest images are, running
//! the VMM with a deadline, reading the workload guest's result line, and huge page reservations.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::memory::hugepages::{lock_hugepages, HugepageLock, PoolReservation};

/// The `vmm` binary under test.
pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmm"))
}

/// A guest image from `guest-images/out/`; panics with the command that builds it if missing.
pub fn image(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-images/out")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest images with guest-images/build-all.sh",
        p.display()
    );
    p
}

/// Runs `vmm` with `args`, killing it (by its PID) after `limit`. Returns its output.
pub fn run_vmm(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    wait_with_deadline(child, limit)
}

/// Waits for `child`, killing it after `limit`; collects stdout and stderr.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait vmm") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap_or_default();
            panic!(
                "vmm did not finish within {limit:?}; output so far:\n{}",
                String::from_utf8_lossy(&stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// The key=value fields of the workload's `WORKLOAD RESULT` line, if it printed one.
pub fn workload_result(stdout: &str) -> Option<Vec<(String, String)>> {
    let line = stdout.lines().find(|l| l.starts_with("WORKLOAD RESULT"))?;
    Some(
        line.split_whitespace()
            .skip(2)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// One field of a key=value list.
pub fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Huge pages for one test: the lock serializing pool changes plus a reservation that restores
/// the pool when dropped (declared in that order so the reservation is undone before unlocking).
pub struct Hugepages {
    _reservation: PoolReservation,
    _lock: HugepageLock,
}

/// Reserves `pages` free pages of `page_size` bytes, or returns why not.
pub fn reserve_hugepages(page_size: u64, pages: u64) -> Result<Hugepages, String> {
    let lock = lock_hugepages().map_err(|e| format!("huge page lock: {e}"))?;
    let reservation =
        PoolReservation::ensure_available(page_size, pages).map_err(|e| e.to_string())?;
    Ok(Hugepages {
        _reservation: reservation,
        _lock: lock,
    })
}
