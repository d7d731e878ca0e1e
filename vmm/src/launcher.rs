//! What `vmm run` does: build the VM, boot the guest, serve the API, and wait for the guest to
//! exit or for SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiError, ApiServer};
use crate::boot::BootConfig;
use crate::control::{MigrateHandler, Origin, VmController};
use crate::devices::Console;
use crate::events::EventMonitor;
use crate::memory::Backing;
use crate::signals;
use crate::vcpu::{Crash, StopReason};
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
    Signals(#[source] std::io::Error),
    #[error("the guest crashed: {0}")]
    GuestCrashed(#[source] Crash),
    #[error("the guest reset itself (reset request or triple fault)")]
    GuestReset,
    /// A migration failed after the destination started the VM: this copy is stale.
    #[error(transparent)]
    VmLost(crate::control::MigrateCause),
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
    /// `vm.shutdown` stopped it.
    ShutDown,
}

impl RunOutcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::GuestExit(c) => *c,
            RunOutcome::Signalled(s) => 128 + s,
            RunOutcome::MigratedAway | RunOutcome::ShutDown => 0,
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

/// Runs a VM until the guest exits, a signal arrives, `vm.shutdown` or it migrates away.
pub fn run(
    cfg: &RunConfig,
    migrate: Option<Arc<dyn MigrateHandler>>,
    events: Option<Arc<EventMonitor>>,
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
    let ctl = VmController::new(
        Origin::Booted {
            kernel: cfg.kernel.clone(),
        },
        migrate,
        events,
    );
    let info = vm.boot(&BootConfig {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
        vcpus: cfg.vcpus,
        tsc_khz: None,
    })?;
    tracing::debug!(entry = format!("{:#x}", info.entry), kind = ?info.kind, "guest started");
    let vm = Arc::new(vm);
    ctl.set_vm(vm.clone());
    ctl.emit(
        "booted",
        serde_json::json!({
            "kernel": cfg.kernel.display().to_string(),
            "vcpus": cfg.vcpus,
            "memory_bytes": cfg.memory,
            "backing": cfg.backing.name(),
        }),
    );
    let api = match &cfg.api_socket {
        Some(p) => Some(ApiServer::start(p, ctl.clone())?),
        None => None,
    };
    run_until_stopped(&vm, &ctl, api)
}

/// Serves a running VM (booted, or received and started) until it stops: the guest exits, a
/// signal arrives, `vm.shutdown`, or it migrates away; then stops the vCPUs, lets the API
/// finish the replies in flight (a migration's summary) and removes its socket.
pub fn run_until_stopped(
    vm: &Arc<Vm>,
    ctl: &Arc<VmController>,
    api: Option<ApiServer>,
) -> Result<RunOutcome, LaunchError> {
    let outcome = wait(vm);
    if matches!(
        outcome,
        Ok(RunOutcome::GuestExit(_)) | Err(LaunchError::GuestReset | LaunchError::GuestCrashed(_))
    ) {
        // An outgoing migration has nothing left to hand over: it ends now, and its reply (the
        // API drains replies in flight below) says why.
        ctl.vm_stopped(&vm.stopped_because());
    }
    if let Ok(RunOutcome::Signalled(sig)) = &outcome {
        if matches!(
            ctl.outgoing_phase(),
            Some(migration::source::Phase::Postcopy | migration::source::Phase::PostcopyPaused)
        ) {
            tracing::error!(
                "signal {sig} during postcopy: VM lost (the destination runs it, and pages that only this VMM had are gone with it)"
            );
        }
    }
    vm.shutdown();
    let outcome = match outcome {
        Ok(RunOutcome::MigratedAway) if ctl.shutdown_requested() => Ok(RunOutcome::ShutDown),
        o => o,
    };
    let why = match &outcome {
        Ok(RunOutcome::GuestExit(c)) => serde_json::json!({ "reason": "guest-exit", "code": c }),
        Ok(RunOutcome::Signalled(s)) => serde_json::json!({ "reason": "signal", "signal": s }),
        Ok(RunOutcome::MigratedAway) => serde_json::json!({ "reason": "migrated" }),
        Ok(RunOutcome::ShutDown) => serde_json::json!({ "reason": "api" }),
        Err(e) => serde_json::json!({ "reason": "error", "error": e.to_string() }),
    };
    let lost = ctl.lost();
    if lost.is_some() {
        ctl.emit("shutdown", serde_json::json!({ "reason": "vm-lost" }));
    } else {
        ctl.emit("shutdown", why);
    }
    if let Some(api) = api {
        api.shutdown();
    }
    if let Some(why) = lost {
        return Err(LaunchError::VmLost(why));
    }
    outcome
}

/// Waits for the VM to stop, turning the stop reason into an outcome. A SIGINT/SIGTERM stops
/// the VM (see [`signals`]) and is reported as [`RunOutcome::Signalled`].
pub fn wait(vm: &Vm) -> Result<RunOutcome, LaunchError> {
    let stop = vm.stop_signal();
    signals::on_signal(move |_| stop.stop(StopReason::Stopped));
    let outcome = loop {
        // The timeout only bounds one wait: every stop, a signal's included, wakes it.
        let reason = vm.wait(Duration::from_secs(3600));
        if let Some(sig) = signals::received() {
            tracing::debug!("signal {sig} received, shutting down");
            break Ok(RunOutcome::Signalled(sig));
        }
        match reason {
            None => continue,
            Some(StopReason::GuestExit(c)) => break Ok(RunOutcome::GuestExit(c)),
            Some(StopReason::Stopped) => break Ok(RunOutcome::MigratedAway),
            Some(StopReason::Reset) => break Err(LaunchError::GuestReset),
            Some(StopReason::Crash(m)) => break Err(LaunchError::GuestCrashed(m)),
        }
    };
    signals::record_only();
    outcome
}
