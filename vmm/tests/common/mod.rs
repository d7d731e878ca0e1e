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
    let child = vmm_command(args).spawn().expect("spawn vmm");
    wait_with_deadline(child, limit)
}

/// A `vmm` command with `args`, stdin closed and both outputs piped.
pub fn vmm_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `vmm migrate --json` arguments: the VM behind the API socket `sock` to `to` in `mode`, then
/// `extra`.
pub fn migrate_args<'a>(
    sock: &'a std::path::Path,
    to: &'a str,
    mode: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "migrate",
        "--api-socket",
        sock.to_str().expect("UTF-8 socket path"),
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

/// How a `vmm migrate` run ended.
pub struct MigrateRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl MigrateRun {
    /// Its outputs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "migrate stdout:\n{}\nmigrate stderr:\n{}",
            self.stdout, self.stderr
        )
    }

    /// Asserts that it exited 0 and returns its JSON summary (the last JSON line it printed);
    /// `ctx` ends the failure messages.
    pub fn expect_summary(&self, ctx: &str) -> serde_json::Value {
        assert_eq!(self.code, Some(0), "vmm migrate failed\n{ctx}");
        self.stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON summary\n{ctx}"))
    }
}

/// Bytes no VMM takes for a migration stream: an HTTP request, then 4 KiB of noise.
pub fn junk_bytes() -> Vec<u8> {
    b"GET / HTTP/1.1\r\nHost: vmm\r\n\r\n"
        .iter()
        .copied()
        .chain((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8))
        .collect()
}

/// Runs `vmm migrate --json` (see [`migrate_args`]) to its end, killing it after `limit`.
pub fn run_migrate(
    sock: &std::path::Path,
    to: &str,
    mode: &str,
    extra: &[&str],
    limit: Duration,
) -> MigrateRun {
    let start = Instant::now();
    let out = run_vmm(&migrate_args(sock, to, mode, extra), limit);
    MigrateRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
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
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "vmm did not finish within {limit:?}; stdout so far:\n{}\nstderr so far:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
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

/// Asserts that a workload RESULT line says the guest verified its memory (status ok, no
/// mismatch) and, if `passes` is given, made that many passes; `ctx` ends each failure message.
pub fn assert_workload_ok(result: &[(String, String)], passes: Option<u32>, ctx: &str) {
    assert_eq!(field(result, "status"), Some("ok"), "{ctx}");
    assert_eq!(field(result, "mismatches"), Some("0"), "{ctx}");
    if let Some(passes) = passes {
        assert_eq!(
            field(result, "passes"),
            Some(passes.to_string().as_str()),
            "{ctx}"
        );
    }
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

/// Huge pages of several sizes for one test, under one lock (the lock is not reentrant: two
/// [`reserve_hugepages`] calls in one test would wait for each other).
pub struct HugepagesOf {
    _reservations: Vec<PoolReservation>,
    _lock: HugepageLock,
}

/// Reserves `pages` free pages of each `(page_size, pages)`, or returns why not.
pub fn reserve_hugepages_of(wants: &[(u64, u64)]) -> Result<HugepagesOf, String> {
    let lock = lock_hugepages().map_err(|e| format!("huge page lock: {e}"))?;
    let mut reservations = Vec::new();
    for &(page_size, pages) in wants {
        reservations
            .push(PoolReservation::ensure_available(page_size, pages).map_err(|e| e.to_string())?);
    }
    Ok(HugepagesOf {
        _reservations: reservations,
        _lock: lock,
    })
}

/// A process a test started: its output is collected in the background (so it never blocks on
/// a full pipe) and it is killed, by its PID, when dropped without having been waited for.
pub struct Proc {
    name: String,
    child: Child,
    exited: Option<std::process::ExitStatus>,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn collect(mut pipe: impl Read + Send + 'static, into: std::sync::Arc<std::sync::Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

impl Proc {
    /// Starts `vmm` with `args`; `name` labels it in failure messages.
    pub fn vmm(name: &str, args: &[&str]) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut cmd = vmm_command(args);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe. The child is killed if the thread that started it (the test)
        // dies without running Drop, e.g. when the test runner kills a test that ran too long.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().expect("spawn vmm");
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        collect(child.stdout.take().expect("stdout piped"), stdout.clone());
        collect(child.stderr.take().expect("stderr piped"), stderr.clone());
        Proc {
            name: name.to_string(),
            child,
            exited: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Both outputs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- {} (pid {}) stdout:\n{}\n--- {} stderr:\n{}",
            self.name,
            self.pid(),
            without_histograms(&self.stdout()),
            self.name,
            self.stderr()
        )
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("waitpid");
        }
        self.exited
    }

    /// Waits until `pred` holds for its stdout or stderr; panics after `limit` or if it exits
    /// first.
    pub fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str, &str) -> bool) {
        let start = Instant::now();
        loop {
            if pred(&self.stdout(), &self.stderr()) {
                return;
            }
            if let Some(s) = self.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                if pred(&self.stdout(), &self.stderr()) {
                    return;
                }
                panic!(
                    "{} exited ({s}) before {what}\n{}",
                    self.name,
                    self.describe()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "no {what} from {} within {limit:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for it to exit; kills it and panics after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.wait_or_explain(limit, Proc::describe)
    }

    /// Waits for it to exit; after `limit` kills it and panics with what `explain` says about it.
    pub fn wait_or_explain(
        &mut self,
        limit: Duration,
        explain: impl FnOnce(&Proc) -> String,
    ) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            if start.elapsed() > limit {
                // Where each thread waits, read before the kill: what a hang needs explained.
                let threads = self.threads();
                self.kill();
                panic!(
                    "{} did not exit within {limit:?}\n{}\n--- {} threads when it was killed:\n{threads}",
                    self.name,
                    explain(self),
                    self.name,
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Each thread's name, state, kernel wait channel and kernel stack (root can read the
    /// stack), from /proc: which of them a hang is waiting in.
    pub fn threads(&self) -> String {
        let dir = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(&dir) else {
            return format!("({dir} unreadable: the process is gone)");
        };
        let read =
            |p: &std::path::Path, f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let mut out = String::new();
        for t in tasks.flatten() {
            let p = t.path();
            let stat = read(&p, "stat");
            // The state is the field after the parenthesised name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?");
            out.push_str(&format!(
                "{} {} state {state} wchan {}\n",
                t.file_name().to_string_lossy(),
                read(&p, "comm").trim(),
                read(&p, "wchan").trim(),
            ));
            for frame in read(&p, "stack").lines().take(12) {
                out.push_str(&format!("    {frame}\n"));
            }
        }
        out
    }

    /// Sends `sig` to it (by PID), unless it has exited already.
    pub fn signal(&mut self, sig: i32) {
        if self.try_wait().is_none() {
            // SAFETY: the PID is of our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Kills it (SIGKILL by PID) and reaps it, unless it has exited already.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output without the workload's long histogram lines.
pub fn without_histograms(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with("WORKLOAD HIST"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Longest a VM may take to boot and print its first pass, or `vmm receive` to listen.
pub const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// `vmm run` arguments of the workload guest with `cmdline`.
pub fn workload_run_args(backing: &str, memory: &str, vcpus: u8, cmdline: &str) -> Vec<String> {
    let kernel = image("workload.elf");
    [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        memory,
        "--vcpus",
        &vcpus.to_string(),
        "--backing",
        backing,
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `vmm run` arguments of a source running the workload guest (`span=64M pattern=random`,
/// `passes` passes) with an API socket at `sock`.
pub fn workload_source_args(
    backing: &str,
    memory: &str,
    vcpus: u8,
    passes: u32,
    sock: &std::path::Path,
) -> Vec<String> {
    let cmdline = format!("span=64M passes={passes} pattern=random");
    let mut args = workload_run_args(backing, memory, vcpus, &cmdline);
    args.extend(["--api-socket".into(), sock.to_str().unwrap().into()]);
    args
}

/// Starts a workload source VM (see [`workload_source_args`]) and waits until its API socket is
/// up and the guest finished a pass.
pub fn start_workload_source(
    backing: &str,
    memory: &str,
    vcpus: u8,
    passes: u32,
    sock: &std::path::Path,
) -> Proc {
    start_workload_source_with(backing, memory, vcpus, passes, sock, &[])
}

/// [`start_workload_source`] with `extra` arguments to `vmm run`.
pub fn start_workload_source_with(
    backing: &str,
    memory: &str,
    vcpus: u8,
    passes: u32,
    sock: &std::path::Path,
    extra: &[String],
) -> Proc {
    let mut args = workload_source_args(backing, memory, vcpus, passes, sock);
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Proc::vmm("source", &args);
    src.wait_for("first WORKLOAD pass line", BOOT_LIMIT, |out, _| {
        out.contains("WORKLOAD pass ")
    });
    src.wait_for("API socket", BOOT_LIMIT, |_, _| sock.exists());
    src
}

/// Starts `vmm receive` (labelled `name`) on 127.0.0.1:`port` with `extra` arguments and waits
/// until it listens.
pub fn start_receive(
    name: &str,
    backing: &str,
    granularity: &str,
    port: u16,
    extra: &[&str],
) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "receive",
        "--listen",
        &listen,
        "--backing",
        backing,
        "--granularity",
        granularity,
    ];
    args.extend_from_slice(extra);
    let mut dst = Proc::vmm(name, &args);
    dst.wait_for("'waiting for a migration'", BOOT_LIMIT, |_, err| {
        err.contains("waiting for a migration")
    });
    dst
}

/// Whether this host can run guest_memfd guest RAM. Where its KVM lacks guest_memfd (some hosts
/// of this kind have none), a test of guest_memfd RAM checks instead what a user there gets:
/// `vmm run --backing guest-memfd` and `vmm receive --backing guest-memfd` both exit 1 at once,
/// the second before it listens, each saying that the host's KVM has no guest_memfd. Returns
/// false after those checks; the caller then ends.
pub fn guest_memfd_or_refusal() -> bool {
    let why = match vmm::memory::guest_memfd::check_host() {
        Ok(()) => return true,
        Err(e) => e.to_string(),
    };
    eprintln!("this host cannot run guest_memfd guest RAM ({why}): checking the refusal instead");
    let run = workload_run_args("guest-memfd", "256M", 1, "passes=1");
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let listen = format!("127.0.0.1:{}", free_port());
    let receive = ["receive", "--listen", &listen, "--backing", "guest-memfd"];
    for args in [&run[..], &receive[..]] {
        let out = run_vmm(args, BOOT_LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "vmm {} on a host without guest_memfd: {err}",
            args[0]
        );
        assert!(
            err.contains(&why) && err.lines().count() == 1,
            "vmm {} should say in one line why guest_memfd cannot run ({why}): {err}",
            args[0]
        );
    }
    false
}
