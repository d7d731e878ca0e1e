//! What `vmm run` does: build the VM, boot the guest, serve the API, and wait for the guest to
//! exit or for SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
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
    let _api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(
            p,
            Arc::new(VmApi {
                vm: vm.clone(),
                migrate,
                handed_over: std::sync::atomic::AtomicBool::new(false),
            }),
        )?),
        None => None,
    };
    let outcome = wait(&vm);
    vm.shutdown();
    outcome
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

/// A failed migration: what went wrong, and whether the VM was handed over anyway (the
/// destination runs it, so this VMM must stop without resuming it).
#[derive(Debug)]
pub struct MigrateFailure {
    pub message: String,
    pub handed_over: bool,
}

/// Carries out `migrate` requests for a running VM (the migration glue implements it). On
/// success the VM runs on the destination, and this VMM stops once the reply is sent.
pub trait MigrateHandler: Send + Sync {
    fn migrate(
        &self,
        vm: &Arc<Vm>,
        to: &str,
        mode: &str,
        secret_file: Option<&std::path::Path>,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, MigrateFailure>;
}

struct VmApi {
    vm: Arc<Vm>,
    migrate: Option<Arc<dyn MigrateHandler>>,
    /// Set when a migration handed the VM over; the VM stops once the reply is written.
    handed_over: std::sync::atomic::AtomicBool,
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
            })),
            Request::Pause => self
                .vm
                .pause()
                .map(|_| serde_json::json!({}))
                .map_err(|e| e.to_string()),
            Request::Resume => {
                self.vm.resume();
                Ok(serde_json::json!({}))
            }
            Request::Migrate {
                to,
                mode,
                secret_file,
            } => match &self.migrate {
                Some(m) => {
                    let r = m.migrate(
                        &self.vm,
                        &to,
                        &mode,
                        secret_file.as_deref().map(std::path::Path::new),
                        progress,
                    );
                    if r.as_ref().map_or_else(|e| e.handed_over, |_| true) {
                        self.handed_over
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    r.map_err(|e| e.message)
                }
                None => Err("this VMM cannot migrate".into()),
            },
        }
    }

    fn after_reply(&self) {
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            self.vm.stop_signal().stop(StopReason::Stopped);
        }
    }
}
