//! What `vmm run` does: build the VM, boot the guest, serve the API, and wait for the guest to
//! exit or for SIGINT/SIGTERM.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{ApiError, ApiHandler, ApiServer, Request};
use crate::boot::BootConfig;
use crate::devices::Console;
use crate::memory::Backing;
use crate::signals;
use crate::vcpu::StopReason;
use crate::vm::{Vm, VmError};

/// Where guest serial output goes.
#[derive(Debug, Clone)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
}

/// Everything `vmm run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory: u64,
    pub vcpus: u8,
    pub backing: Backing,
    pub serial: SerialTarget,
    pub api_socket: Option<PathBuf>,
}

/// Errors of `vmm run`.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    #[error("control API: {0}")]
    Api(#[from] ApiError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] vmm_sys_util::errno::Error),
    #[error("the guest crashed: {0}")]
    GuestCrashed(String),
    #[error("the guest reset itself (reset request or triple fault)")]
    GuestReset,
    /// A migration failed after the destination started the VM: this copy is stale.
    #[error("{0}")]
    VmLost(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote this exit code.
    GuestExit(i32),
    /// A signal stopped the VMM.
    Signalled(i32),
    /// The VM was handed to a migration destination.
    MigratedAway,
}

impl RunOutcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::GuestExit(c) => *c,
            RunOutcome::Signalled(s) => 128 + s,
            RunOutcome::MigratedAway => 0,
        }
    }
}

/// Builds the console for `target`.
pub fn console_for(target: &SerialTarget) -> Result<Console, LaunchError> {
    match target {
        SerialTarget::Stdout => Ok(Console::stdout()),
        SerialTarget::File(p) => Console::file(p).map_err(|source| LaunchError::SerialFile {
            path: p.clone(),
            source,
        }),
    }
}

/// Runs a VM until the guest exits, a signal arrives, or it migrates away.
pub fn run(
    cfg: &RunConfig,
    migrate: Option<Arc<dyn MigrateHandler>>,
) -> Result<RunOutcome, LaunchError> {
    if !cfg.kernel.is_file() {
        return Err(LaunchError::KernelMissing(cfg.kernel.clone()));
    }
    if let Some(i) = &cfg.initrd {
        if !i.is_file() {
            return Err(LaunchError::InitrdMissing(i.clone()));
        }
    }
    signals::install().map_err(LaunchError::Signals)?;
    let console = console_for(&cfg.serial)?;
    let mut vm = Vm::new(cfg.backing, cfg.memory, cfg.vcpus, console)?;
    let info = vm.boot(&BootConfig {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
        vcpus: cfg.vcpus,
        tsc_khz: None,
    })?;
    tracing::info!(entry = format!("{:#x}", info.entry), kind = ?info.kind, "guest started");
    let vm = Arc::new(vm);
    let api = Arc::new(VmApi {
        vm: vm.clone(),
        migrate,
        handed_over: AtomicBool::new(false),
        lost: Mutex::new(None),
        outcome_unknown: AtomicBool::new(false),
        control: Mutex::new(None),
    });
    let _api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p, api.clone())?),
        None => None,
    };
    let outcome = wait(&vm);
    if let Ok(RunOutcome::Signalled(sig)) = &outcome {
        let phase = lock(&api.control).as_ref().and_then(|c| c.phase());
        if matches!(
            phase,
            Some(migration::source::Phase::Postcopy | migration::source::Phase::PostcopyPaused)
        ) {
            eprintln!(
                "vmm: signal {sig} during postcopy: VM lost (the destination runs it, and pages that only this VMM had are gone with it)"
            );
        }
    }
    vm.shutdown();
    if let Some(why) = lock(&api.lost).take() {
        return Err(LaunchError::VmLost(why));
    }
    outcome
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for the VM to stop, turning the stop reason into an outcome.
pub fn wait(vm: &Vm) -> Result<RunOutcome, LaunchError> {
    loop {
        if let Some(sig) = signals::received() {
            tracing::info!("signal {sig} received, shutting down");
            return Ok(RunOutcome::Signalled(sig));
        }
        match vm.wait(Duration::from_millis(100)) {
            None => continue,
            Some(StopReason::GuestExit(c)) => return Ok(RunOutcome::GuestExit(c)),
            Some(StopReason::Stopped) => return Ok(RunOutcome::MigratedAway),
            Some(StopReason::Reset) => return Err(LaunchError::GuestReset),
            Some(StopReason::Crash(m)) => return Err(LaunchError::GuestCrashed(m)),
        }
    }
}

/// How a failed migration left the VM here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Nothing was handed over: the VM runs here again.
    Resumed,
    /// The destination started the VM and the migration could not be completed: the VM is
    /// lost (this copy is stale); this VMM stops, exiting non-zero.
    Lost,
    /// The destination may or may not run the VM: it stays paused here until an operator
    /// decides (`resume` with `force`).
    Unknown,
}

/// A failed migration: what went wrong, and what became of the VM here.
#[derive(Debug)]
pub struct MigrateFailure {
    pub message: String,
    pub after: AfterFailure,
}

/// What a `migrate` request asks for.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub to: String,
    pub mode: String,
    pub secret_file: Option<std::path::PathBuf>,
    /// TLS directory (QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem).
    pub tls_dir: Option<std::path::PathBuf>,
    /// The name the destination's certificate must carry (default: the host of `to`).
    pub tls_server_name: Option<String>,
    /// Allow plaintext (with a secret) to a non-loopback destination.
    pub allow_plaintext: bool,
    /// How long to keep reconnecting after a link failure past the switchover.
    pub recover_timeout: Duration,
}

/// Default of [`MigrateRequest::recover_timeout`].
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// Carries out `migrate` requests for a running VM (the migration glue implements it). On
/// success the VM runs on the destination, and this VMM stops once the reply is sent.
/// `control` is the running migration's handle (its phase; where recovery reconnects).
pub trait MigrateHandler: Send + Sync {
    fn migrate(
        &self,
        vm: &Arc<Vm>,
        req: &MigrateRequest,
        control: Arc<migration::source::MigrationControl>,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, MigrateFailure>;
}

struct VmApi {
    vm: Arc<Vm>,
    migrate: Option<Arc<dyn MigrateHandler>>,
    /// Set when a migration handed the VM over; the VM stops once the reply is written.
    handed_over: AtomicBool,
    /// Set when a migration lost the VM (why); the VM stops once the reply is written and
    /// `run` fails with it.
    lost: Mutex<Option<String>>,
    /// The last migration left the VM paused with its outcome unknown.
    outcome_unknown: AtomicBool,
    /// The running migration, if any.
    control: Mutex<Option<Arc<migration::source::MigrationControl>>>,
}

impl ApiHandler for VmApi {
    fn handle(
        &self,
        req: Request,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => Ok(serde_json::json!({
                "state": if self.vm.stop_signal().reason().is_some() { "stopped" } else { "running" },
                "vcpus": self.vm.vcpu_count(),
                "memory_bytes": self.vm.ram().size(),
                "backing": self.vm.ram().backing().name(),
                "migration": lock(&self.control).as_ref().and_then(|c| c.phase()).map(|p| p.name()),
                "migration_outcome_unknown": self.outcome_unknown.load(Ordering::SeqCst),
            })),
            Request::Pause => self
                .vm
                .pause()
                .map(|_| serde_json::json!({}))
                .map_err(|e| e.to_string()),
            Request::Resume { force } => {
                if lock(&self.control).is_some() {
                    return Err(
                        "a migration is in progress: the VM stays paused until it ends".into(),
                    );
                }
                if self.outcome_unknown.load(Ordering::SeqCst) && !force {
                    return Err("the last migration's outcome is unknown: the destination may run this VM; resume with \"force\":true only if it surely does not".into());
                }
                self.outcome_unknown.store(false, Ordering::SeqCst);
                self.vm.resume();
                Ok(serde_json::json!({}))
            }
            Request::MigrateRetarget { to } => {
                let control = lock(&self.control).clone();
                let Some(control) = control else {
                    return Err("no migration is in progress".into());
                };
                let addr = to
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve '{to}': {e}"))?
                    .next()
                    .ok_or_else(|| format!("'{to}' has no address"))?;
                control.retarget(addr);
                Ok(serde_json::json!({ "to": addr.to_string() }))
            }
            Request::Migrate {
                to,
                mode,
                secret_file,
                tls_dir,
                tls_server_name,
                allow_plaintext,
                recover_timeout_s,
            } => {
                let Some(m) = &self.migrate else {
                    return Err("this VMM cannot migrate".into());
                };
                if self.outcome_unknown.load(Ordering::SeqCst) {
                    return Err("the last migration's outcome is unknown: resolve it first (resume with force, or stop this VMM)".into());
                }
                let control = Arc::new(migration::source::MigrationControl::default());
                {
                    let mut c = lock(&self.control);
                    if c.is_some() {
                        return Err("a migration is in progress already".into());
                    }
                    *c = Some(control.clone());
                }
                let req = MigrateRequest {
                    to,
                    mode,
                    secret_file: secret_file.map(std::path::PathBuf::from),
                    tls_dir: tls_dir.map(std::path::PathBuf::from),
                    tls_server_name,
                    allow_plaintext,
                    recover_timeout: recover_timeout_s
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_RECOVER_TIMEOUT),
                };
                let r = m.migrate(&self.vm, &req, control, progress);
                lock(&self.control).take();
                match r {
                    Ok(v) => {
                        self.handed_over.store(true, Ordering::SeqCst);
                        Ok(v)
                    }
                    Err(e) => {
                        match e.after {
                            AfterFailure::Resumed => {}
                            AfterFailure::Lost => *lock(&self.lost) = Some(e.message.clone()),
                            AfterFailure::Unknown => {
                                self.outcome_unknown.store(true, Ordering::SeqCst)
                            }
                        }
                        Err(e.message)
                    }
                }
            }
        }
    }

    fn after_reply(&self) {
        if self.handed_over.load(Ordering::SeqCst) || lock(&self.lost).is_some() {
            self.vm.stop_signal().stop(StopReason::Stopped);
        }
    }
}
