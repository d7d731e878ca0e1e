//! What the control API can do to this VMM's one VM: the [`VmControl`] of a booted VM
//! (`vmm run`) and of a received one (`vmm receive`), which is the same VM once it runs: it can
//! be paused, resumed, shut down and migrated on. Which request is allowed in which state is
//! decided here, in one place.

use migration::sync::MutexExt;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use migration::source::{MigrationControl, Phase};
use migration::{MigrationInfo, MigrationStatus};

use crate::api::model::{
    Ping, RegionInfo, RetargetReply, SendMigration, VcpuInfo, VmConfigInfo, VmInfo, VmState,
};
use crate::api::{ControlError, VmControl};
use crate::events::{EventMonitor, EventSource};
use crate::vcpu::StopReason;
use crate::vm::Vm;

pub use crate::api::model::Tunables;

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

/// Why a migration failed, as the migrator reports it (its own typed error, shared: the
/// controller keeps it as the reason a lost VM stops for).
pub type MigrateCause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A failed migration: what went wrong, and what became of the VM here.
#[derive(Debug)]
pub struct MigrateFailure {
    pub error: MigrateCause,
    pub after: AfterFailure,
    /// The VM's own state ended the migration (its guest exited, reset or crashed), not the
    /// migration machinery: answered as a conflict (409), not a failure (500).
    pub vm_stopped: bool,
}

/// What a `vm.send-migration` request asks for, checked.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub to: String,
    pub mode: migration::types::Mode,
    pub secret_file: Option<PathBuf>,
    /// TLS directory (QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem).
    pub tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of `to`).
    pub tls_server_name: Option<String>,
    /// Allow plaintext (with a secret) to a non-loopback destination.
    pub allow_plaintext: bool,
    /// How long to keep reconnecting after a link failure past the switchover.
    pub recover_timeout: Duration,
    pub tunables: Tunables,
}

/// Default of [`MigrateRequest::recover_timeout`].
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// Carries out migrations of a running VM (the migration glue implements it). On success the
/// VM runs on the destination. `control` is the running migration's handle (its phase and
/// statistics; where recovery reconnects; cancel).
pub trait MigrateHandler: Send + Sync {
    fn migrate(
        &self,
        vm: &Arc<Vm>,
        req: &MigrateRequest,
        control: Arc<MigrationControl>,
        events: Option<Arc<EventMonitor>>,
    ) -> Result<serde_json::Value, MigrateFailure>;
}

/// A destination URL without Cloud Hypervisor's `tcp:` prefix (`tcp:HOST:PORT` or `HOST:PORT`).
fn host_port(url: &str) -> &str {
    url.strip_prefix("tcp:").unwrap_or(url)
}

/// Where the VM came from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// `vmm run` booted this kernel.
    Booted { kernel: PathBuf },
    /// `vmm receive` received it.
    Received,
}

/// The controller of this VMM's VM.
pub struct VmController {
    origin: Origin,
    vm: OnceLock<Arc<Vm>>,
    migrate: Option<Arc<dyn MigrateHandler>>,
    events: Option<Arc<EventMonitor>>,
    /// An incoming migration's statistics, from accept until the VMM exits.
    incoming: Mutex<Option<Arc<migration::ReceiveMonitor>>>,
    /// The incoming VM's vCPUs have not run yet.
    arriving: AtomicBool,
    /// Pages are still arriving (postcopy after the VM started here).
    incoming_active: AtomicBool,
    /// The outgoing migration in progress.
    outgoing: Mutex<Option<Arc<MigrationControl>>>,
    /// The last outgoing migration (its final statistics).
    last_outgoing: Mutex<Option<Arc<MigrationControl>>>,
    paused: AtomicBool,
    /// Set when a migration handed the VM over.
    handed_over: AtomicBool,
    /// Set when a migration lost the VM (why).
    lost: Mutex<Option<MigrateCause>>,
    /// The last migration left the VM paused with its outcome unknown.
    outcome_unknown: AtomicBool,
    /// `vm.shutdown` was asked for.
    shutdown_requested: AtomicBool,
    capabilities: OnceLock<serde_json::Value>,
}

impl VmController {
    pub fn new(
        origin: Origin,
        migrate: Option<Arc<dyn MigrateHandler>>,
        events: Option<Arc<EventMonitor>>,
    ) -> Arc<VmController> {
        let received = matches!(origin, Origin::Received);
        Arc::new(VmController {
            origin,
            vm: OnceLock::new(),
            migrate,
            events,
            incoming: Mutex::new(None),
            arriving: AtomicBool::new(received),
            incoming_active: AtomicBool::new(received),
            outgoing: Mutex::new(None),
            last_outgoing: Mutex::new(None),
            paused: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            lost: Mutex::new(None),
            outcome_unknown: AtomicBool::new(false),
            shutdown_requested: AtomicBool::new(false),
            capabilities: OnceLock::new(),
        })
    }

    /// The VM exists (booted, or created for an incoming migration).
    pub fn set_vm(&self, vm: Arc<Vm>) {
        let _ = self.vm.set(vm);
    }

    /// The incoming migration's statistics source.
    pub fn set_incoming(&self, info: Arc<migration::ReceiveMonitor>) {
        *self.incoming.lock_unpoisoned() = Some(info);
    }

    /// The incoming VM's vCPUs run now (pages may still be arriving).
    pub fn incoming_started(&self) {
        self.arriving.store(false, Ordering::SeqCst);
    }

    /// Every page arrived: the VM is a VM like any other now.
    pub fn incoming_completed(&self) {
        self.arriving.store(false, Ordering::SeqCst);
        self.incoming_active.store(false, Ordering::SeqCst);
    }

    /// The event monitor, if any.
    pub fn events(&self) -> Option<&EventMonitor> {
        self.events.as_deref()
    }

    /// The event monitor as the migration crate's event sink.
    pub fn event_sink(&self) -> Option<Arc<dyn migration::EventSink>> {
        self.events
            .clone()
            .map(|e| e as Arc<dyn migration::EventSink>)
    }

    /// Emits a VM event.
    pub fn emit(&self, event: &str, properties: serde_json::Value) {
        crate::events::emit(self.events(), EventSource::Vm, event, properties);
    }

    /// Why the VM was lost, if a migration lost it.
    pub fn lost(&self) -> Option<MigrateCause> {
        self.lost.lock_unpoisoned().clone()
    }

    /// `vm.shutdown` stopped the VM.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown_requested.load(Ordering::SeqCst)
    }

    /// The statistics of the outgoing migration in progress (or the last one), else of the
    /// incoming one, else none.
    fn migration_info(&self) -> MigrationInfo {
        let outgoing = self
            .outgoing
            .lock_unpoisoned()
            .clone()
            .or_else(|| self.last_outgoing.lock_unpoisoned().clone());
        if let Some(c) = outgoing {
            return c.info();
        }
        if let Some(m) = self.incoming.lock_unpoisoned().clone() {
            return m.info();
        }
        MigrationInfo::default()
    }

    /// The VM stopped on its own (the guest exited, crashed or reset): ends an outgoing
    /// migration still before its switchover at once, saying so (see
    /// `migration::source::MigrationControl::vm_stopped`). Nothing to do otherwise.
    pub fn vm_stopped(&self, why: &str) {
        let control = self.outgoing.lock_unpoisoned().clone();
        if let Some(control) = control {
            if control.vm_stopped(why.to_string()).is_ok() {
                tracing::warn!("the VM stopped ({why}) during its migration: the migration ends");
            }
        }
    }

    /// The outgoing migration's phase, if one runs.
    pub fn outgoing_phase(&self) -> Option<Phase> {
        self.outgoing
            .lock_unpoisoned()
            .as_ref()
            .and_then(|c| c.phase())
    }

    fn running_vm(&self) -> Result<&Arc<Vm>, ControlError> {
        if self.arriving.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict(
                "the VM is still arriving (an incoming migration has not started it yet)".into(),
            ));
        }
        if self.is_stopped() {
            return Err(ControlError::Conflict(
                "the VM has stopped; this VMM is exiting".into(),
            ));
        }
        self.vm
            .get()
            .ok_or_else(|| ControlError::Conflict("there is no VM yet".into()))
    }

    fn is_stopped(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
            || self.shutdown_requested()
            || self.lost.lock_unpoisoned().is_some()
            || self
                .vm
                .get()
                .is_some_and(|vm| vm.stop_signal().reason().is_some())
    }

    fn no_migration_running(&self, what: &str) -> Result<(), ControlError> {
        if self.incoming_active.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict(format!(
                "cannot {what}: pages of the incoming migration are still arriving (retry once vm.migration says completed)"
            )));
        }
        if self.outgoing.lock_unpoisoned().is_some() {
            return Err(ControlError::Conflict(format!(
                "cannot {what}: a migration is in progress"
            )));
        }
        Ok(())
    }

    fn check_request(&self, req: SendMigration) -> Result<MigrateRequest, ControlError> {
        let to = host_port(&req.destination_url).to_string();
        if to.is_empty() {
            return Err(ControlError::BadRequest(
                "destination_url is empty (HOST:PORT of a waiting vmm receive)".into(),
            ));
        }
        let mode = req.mode;
        let t = &req.tunables;
        if t.downtime_limit_ms == Some(0) {
            return Err(ControlError::BadRequest(
                "downtime_limit_ms must be at least 1".into(),
            ));
        }
        if t.max_rounds == Some(0) {
            return Err(ControlError::BadRequest(
                "max_rounds must be at least 1".into(),
            ));
        }
        if t.max_bandwidth == Some(0) || t.max_postcopy_bandwidth == Some(0) {
            return Err(ControlError::BadRequest(
                "a bandwidth cap must be above 0 bytes/s (leave it out for no cap)".into(),
            ));
        }
        if t.timeout_s == Some(0) {
            return Err(ControlError::BadRequest(
                "timeout_s must be at least 1".into(),
            ));
        }
        Ok(MigrateRequest {
            to,
            mode,
            secret_file: req.secret_file.map(PathBuf::from),
            tls_dir: req.tls_dir.map(PathBuf::from),
            tls_server_name: req.tls_server_name,
            allow_plaintext: req.allow_plaintext,
            recover_timeout: req
                .recover_timeout_s
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_RECOVER_TIMEOUT),
            tunables: req.tunables,
        })
    }
}

impl VmControl for VmController {
    fn ping(&self) -> Ping {
        let capabilities = self
            .capabilities
            .get_or_init(|| {
                serde_json::to_value(crate::probe::probe()).unwrap_or(serde_json::Value::Null)
            })
            .clone();
        Ping {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            capabilities,
        }
    }

    fn info(&self) -> VmInfo {
        let phase = self.outgoing_phase();
        let state = if self.is_stopped() {
            VmState::Shutdown
        } else if self.arriving.load(Ordering::SeqCst) {
            VmState::Receiving
        } else if self.paused.load(Ordering::SeqCst)
            || self.outcome_unknown.load(Ordering::SeqCst)
            || matches!(
                phase,
                Some(Phase::Switchover | Phase::Postcopy | Phase::PostcopyPaused | Phase::Done)
            )
        {
            VmState::Paused
        } else {
            VmState::Running
        };
        let vm = self.vm.get();
        let config = vm.map(|vm| VmConfigInfo {
            vcpus: vm.vcpu_count(),
            memory_bytes: vm.ram().size(),
            backing: vm.ram().backing(),
            page_size: vm.ram().backing().page_size(),
            kernel: match &self.origin {
                Origin::Booted { kernel } => Some(kernel.display().to_string()),
                Origin::Received => None,
            },
            origin: match self.origin {
                Origin::Booted { .. } => "booted",
                Origin::Received => "received",
            }
            .to_string(),
        });
        let memory = vm
            .map(|vm| {
                (0u32..)
                    .zip(vm.ram().regions())
                    .map(|(slot, r)| RegionInfo {
                        slot,
                        guest_addr: r.guest_addr,
                        size: r.size,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let vcpus = vm
            .map(|vm| {
                (0..vm.vcpu_count())
                    .map(|index| VcpuInfo { index })
                    .collect()
            })
            .unwrap_or_default();
        let migration_status = match phase {
            Some(p) => Some(p.status()),
            None => Some(self.migration_info().status).filter(|s| *s != MigrationStatus::None),
        };
        VmInfo {
            state,
            config,
            memory,
            vcpus,
            migration_status,
            migration_outcome_unknown: self.outcome_unknown.load(Ordering::SeqCst),
        }
    }

    fn pause(&self) -> Result<(), ControlError> {
        let vm = self.running_vm()?;
        self.no_migration_running("pause")?;
        if self.paused.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = vm.pause() {
            self.paused.store(false, Ordering::SeqCst);
            return Err(ControlError::Failed(format!("pausing the VM: {e}")));
        }
        self.emit("paused", serde_json::json!({}));
        Ok(())
    }

    fn resume(&self, force: bool) -> Result<(), ControlError> {
        let vm = self.running_vm()?;
        if self.outgoing.lock_unpoisoned().is_some() {
            return Err(ControlError::Conflict(
                "a migration is in progress: the VM stays paused until it ends".into(),
            ));
        }
        if self.outcome_unknown.load(Ordering::SeqCst) && !force {
            return Err(ControlError::Conflict("the last migration's outcome is unknown: the destination may run this VM; resume with \"force\":true only if it surely does not".into()));
        }
        let was_paused = self.paused.swap(false, Ordering::SeqCst)
            || self.outcome_unknown.swap(false, Ordering::SeqCst);
        vm.resume();
        if was_paused {
            self.emit("resumed", serde_json::json!({ "forced": force }));
        }
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ControlError> {
        let vm = self.running_vm()?;
        self.no_migration_running("shut down")?;
        self.shutdown_requested.store(true, Ordering::SeqCst);
        vm.stop_signal().stop(StopReason::Stopped);
        Ok(())
    }

    fn send_migration(&self, req: SendMigration) -> Result<serde_json::Value, ControlError> {
        let vm = self.running_vm()?.clone();
        let Some(m) = &self.migrate else {
            return Err(ControlError::Unsupported("this VMM cannot migrate".into()));
        };
        let req = self.check_request(req)?;
        if self.outcome_unknown.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict("the last migration's outcome is unknown: resolve it first (resume with force, or stop this VMM)".into()));
        }
        if self.paused.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict(
                "the VM is paused: resume it before migrating".into(),
            ));
        }
        self.no_migration_running("migrate")?;
        let control = Arc::new(MigrationControl::default());
        {
            let mut c = self.outgoing.lock_unpoisoned();
            if c.is_some() {
                return Err(ControlError::Conflict(
                    "a migration is in progress already".into(),
                ));
            }
            *c = Some(control.clone());
        }
        let r = m.migrate(&vm, &req, control.clone(), self.events.clone());
        *self.last_outgoing.lock_unpoisoned() = Some(control);
        let r = match r {
            Ok(v) => {
                self.handed_over.store(true, Ordering::SeqCst);
                // The destination runs the VM: stop this copy; the API drains this reply
                // before the VMM exits.
                vm.stop_signal().stop(StopReason::Stopped);
                Ok(v)
            }
            Err(e) => {
                match e.after {
                    AfterFailure::Resumed => {}
                    AfterFailure::Lost => {
                        *self.lost.lock_unpoisoned() = Some(e.error.clone());
                        vm.stop_signal().stop(StopReason::Stopped);
                    }
                    AfterFailure::Unknown => self.outcome_unknown.store(true, Ordering::SeqCst),
                }
                if e.vm_stopped {
                    Err(ControlError::Conflict(e.error.to_string()))
                } else {
                    Err(ControlError::Failed(e.error.to_string()))
                }
            }
        };
        self.outgoing.lock_unpoisoned().take();
        r
    }

    fn migration(&self) -> Result<MigrationInfo, ControlError> {
        Ok(self.migration_info())
    }

    fn cancel_migration(&self) -> Result<(), ControlError> {
        let control = self.outgoing.lock_unpoisoned().clone();
        let Some(control) = control else {
            if self.incoming_active.load(Ordering::SeqCst) {
                return Err(ControlError::Conflict(
                    "an incoming migration cannot be cancelled here: cancel it on the source"
                        .into(),
                ));
            }
            return Err(ControlError::Conflict("no migration is in progress".into()));
        };
        control
            .cancel()
            .map_err(|e| ControlError::Conflict(e.to_string()))
    }

    fn retarget(&self, to: &str) -> Result<RetargetReply, ControlError> {
        let control = self.outgoing.lock_unpoisoned().clone();
        let Some(control) = control else {
            return Err(ControlError::Conflict("no migration is in progress".into()));
        };
        let addr = host_port(to)
            .to_socket_addrs()
            .map_err(|e| ControlError::BadRequest(format!("cannot resolve '{to}': {e}")))?
            .next()
            .ok_or_else(|| ControlError::BadRequest(format!("'{to}' has no address")))?;
        control.retarget(addr);
        Ok(RetargetReply {
            destination: addr.to_string(),
        })
    }
}
