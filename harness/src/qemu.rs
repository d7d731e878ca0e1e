//! The peer VMM, QEMU: finding the binary and its version, building a source or destination
//! command line for the workload guest, a QMP client (one JSON object per line, serde_json),
//! and hugetlbfs mounts for `memory-backend-file` (made and removed by the harness, also on a
//! signal through [`crate::cleanup`]).
//!
//! The guest boots through its PVH entry (`-kernel workload.elf`), prints on the first ISA
//! serial port (`-serial stdio`) and ends through `isa-debug-exit` on port 0xf4, which makes
//! QEMU exit with `(code << 1) | 1`.

use serde_json::{json, Value};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The QEMU binary looked for on PATH (or named by `HARNESS_QEMU`).
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Errors from QEMU handling.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP: bad JSON {line:?}: {source}")]
    Json {
        line: String,
        source: serde_json::Error,
    },
    #[error("{0} timed out")]
    Timeout(String),
    #[error("`{cmd}` failed: {detail}")]
    Tool { cmd: String, detail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// The QEMU binary: `HARNESS_QEMU` if set, else `qemu-system-x86_64` on PATH; `None` if there
/// is none (the caller skips QEMU scenarios and says so).
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HARNESS_QEMU") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU_BINARY))
        .find(|p| p.is_file())
}

/// The first line of `qemu --version`, e.g. `QEMU emulator version 7.2.22 (Debian ...)`.
pub fn version(qemu: &Path) -> Result<String, QemuError> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(io(format!("running {} --version", qemu.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| out.status.success() && !l.is_empty())
        .ok_or_else(|| QemuError::Tool {
            cmd: format!("{} --version", qemu.display()),
            detail: format!("{}: {:?}", out.status, text),
        })
}

/// How guest RAM is backed on the QEMU side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memory {
    /// `memory-backend-memfd,share=on` (shmem).
    Memfd,
    /// `memory-backend-file,share=on,mem-path=FILE` on a hugetlbfs mount.
    HugetlbFile(PathBuf),
}

/// One QEMU process of a migration.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub memory: Memory,
    /// The QMP socket QEMU listens on.
    pub qmp: PathBuf,
    /// Destination: start with `-incoming defer` (capabilities are set over QMP first).
    pub incoming: bool,
}

/// QEMU's arguments for `cfg` (KVM, one `pc` machine with RAM from the named backend, no
/// default devices, serial on stdout, `isa-debug-exit` on port 0xf4, QMP on a Unix socket).
pub fn args(cfg: &GuestConfig) -> Vec<String> {
    let size = format!("{}M", cfg.memory_mib);
    let backend = match &cfg.memory {
        Memory::Memfd => format!("memory-backend-memfd,id=ram0,size={size},share=on"),
        Memory::HugetlbFile(path) => format!(
            "memory-backend-file,id=ram0,size={size},share=on,mem-path={}",
            path.display()
        ),
    };
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        // `host` fails here (KVM refuses MSR_IA32_ARCH_CAPABILITIES under PVM).
        "-cpu",
        "max,-arch-capabilities",
        "-machine",
        "pc,memory-backend=ram0",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-object".into(),
        backend,
        "-m".into(),
        size,
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-append".into(),
        cfg.cmdline.clone(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", cfg.qmp.display()),
    ]);
    if cfg.incoming {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a
}

/// The guest's exit code from QEMU's exit status under `isa-debug-exit`: `(code << 1) | 1`.
/// `None` for an even status (QEMU itself ended: an error, a signal, or `quit`).
pub fn guest_exit_code(status: i32) -> Option<i32> {
    (status & 1 == 1).then_some(status >> 1)
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket as it starts),
    /// and leaves the capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QemuError> {
        let end = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < end => {
                    tracing::trace!("QMP {}: {e}, retrying", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io(format!("connecting to QMP {}", path.display()))(e)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("setting the QMP read timeout"))?;
        let writer = stream.try_clone().map_err(io("cloning the QMP socket"))?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!("no greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io("reading from QMP"))?;
        if n == 0 {
            return Err(QemuError::Protocol("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|source| QemuError::Json {
            line: line.trim().to_string(),
            source,
        })
    }

    /// Runs `command` with `arguments`; returns its `return` value (events seen meanwhile go
    /// to [`Qmp::events`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(io(format!("sending QMP {command}")))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QemuError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(QemuError::Protocol(format!(
                "unexpected reply to {command}: {v}"
            )));
        }
    }

    /// The names of the migration capabilities this QEMU has.
    pub fn capabilities(&mut self) -> Result<Vec<String>, QemuError> {
        let caps = self.execute("query-migrate-capabilities", None)?;
        Ok(caps
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["capability"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Turns the named capabilities on.
    pub fn set_capabilities(&mut self, names: &[&str]) -> Result<(), QemuError> {
        let caps: Vec<Value> = names
            .iter()
            .map(|n| json!({ "capability": n, "state": true }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )?;
        Ok(())
    }

    /// Polls `query-migrate` every `every` until its status is one of `until` (or `failed`,
    /// `cancelled`), for at most `timeout`; returns the last reply.
    pub fn wait_migrate(
        &mut self,
        until: &[&str],
        every: Duration,
        timeout: Duration,
    ) -> Result<Value, QemuError> {
        let end = Instant::now() + timeout;
        loop {
            let v = self.execute("query-migrate", None)?;
            let status = v["status"].as_str().unwrap_or("");
            if until.contains(&status) || status == "failed" || status == "cancelled" {
                return Ok(v);
            }
            if Instant::now() >= end {
                return Err(QemuError::Timeout(format!(
                    "waiting for migration status {until:?} (last: {v})"
                )));
            }
            std::thread::sleep(every);
        }
    }
}

/// `{"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ...}` -> `7.2.22`.
pub fn version_of(query_version: &Value) -> Option<String> {
    let q = &query_version["qemu"];
    Some(format!(
        "{}.{}.{}",
        q["major"].as_u64()?,
        q["minor"].as_u64()?,
        q["micro"].as_u64()?
    ))
}

/// A hugetlbfs mount of one page size on a fresh directory, unmounted and removed on drop
/// (and by [`crate::cleanup::run_all`] on a signal).
pub struct HugetlbMount {
    dir: PathBuf,
}

impl HugetlbMount {
    /// Mounts hugetlbfs with `pagesize=<page_kib>K` on a new directory under the temp dir.
    pub fn new(page_kib: u64, tag: &str) -> Result<Self, QemuError> {
        let dir = std::env::temp_dir().join(format!(
            "harness-hugetlbfs-{}-{tag}-{page_kib}k",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let cdir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| QemuError::Tool {
            cmd: "mount".into(),
            detail: format!("{} has a NUL byte", dir.display()),
        })?;
        let opts = CString::new(format!("pagesize={page_kib}K")).unwrap_or_default();
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call; it reads them
        // only.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                cdir.as_ptr(),
                c"hugetlbfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(io(format!(
                "mounting hugetlbfs (pagesize={page_kib}K) on {}",
                dir.display()
            ))(e));
        }
        crate::cleanup::register_mount(&dir);
        Ok(Self { dir })
    }

    /// A file path inside the mount.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for HugetlbMount {
    fn drop(&mut self) {
        if let Err(e) = crate::cleanup::unmount(&self.dir) {
            tracing::error!("{e}");
        }
        crate::cleanup::unregister_mount(&self.dir);
    }
}

/// The TSC rate in kHz, measured against the monotonic clock over `over` (QEMU does not tell
/// the guest its TSC rate the way our VMM does with `tsc_khz=`; under KVM the guest's TSC runs
/// at the host's rate).
pub fn measure_tsc_khz(over: Duration) -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (c0, t0) = (tsc(), Instant::now());
    std::thread::sleep(over);
    let (c1, t1) = (tsc(), Instant::now());
    let ns = t1.duration_since(t0).as_nanos().max(1);
    (u128::from(c1.wrapping_sub(c0)) * 1_000_000 / ns) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_decodes_isa_debug_exit() {
        assert_eq!(guest_exit_code(1), Some(0));
        assert_eq!(guest_exit_code(3), Some(1));
        assert_eq!(guest_exit_code(0), None);
        assert_eq!(guest_exit_code(2), None);
    }

    #[test]
    fn args_name_the_backend_and_defer_the_destination() {
        let cfg = GuestConfig {
            kernel: "/k.elf".into(),
            cmdline: "passes=3 tsc_khz=1".into(),
            memory_mib: 256,
            vcpus: 1,
            memory: Memory::HugetlbFile("/mnt/h/src".into()),
            qmp: "/tmp/q.sock".into(),
            incoming: true,
        };
        let a = args(&cfg).join(" ");
        assert!(a.contains("memory-backend-file,id=ram0,size=256M,share=on,mem-path=/mnt/h/src"));
        assert!(a.contains("-incoming defer"));
        assert!(a.contains("-append passes=3 tsc_khz=1"));
        let a = args(&GuestConfig {
            memory: Memory::Memfd,
            incoming: false,
            ..cfg
        })
        .join(" ");
        assert!(a.contains("memory-backend-memfd,id=ram0,size=256M,share=on"));
        assert!(!a.contains("-incoming"));
    }

    #[test]
    fn version_of_query_version() {
        let v = json!({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "x"});
        assert_eq!(version_of(&v).as_deref(), Some("7.2.22"));
        assert_eq!(version_of(&json!({})), None);
    }

    #[test]
    fn hugetlbfs_mount_is_made_and_removed() {
        let m = HugetlbMount::new(2048, "unit-test").unwrap();
        let dir = m.dir().to_path_buf();
        let entry = format!(" {} hugetlbfs ", dir.display());
        let mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(mounts().contains(&entry), "{}", mounts());
        assert!(mounts().contains("pagesize=2M"));
        assert_eq!(m.file("x.ram"), dir.join("x.ram"));
        drop(m);
        assert!(!mounts().contains(&entry));
        assert!(!dir.exists());
    }

    #[test]
    fn tsc_rate_is_plausible() {
        let khz = measure_tsc_khz(Duration::from_millis(50));
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
