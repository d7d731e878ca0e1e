//! The source side: a running VM as `migration::source::SourceVm`, and the `migrate` request of
//! the control API.

use std::net::ToSocketAddrs;
use std::sync::Arc;

use migration::auth::Secret;
use migration::source::{self, MigrateOptions, MigrationControl, SourceVm};
use migration::tls::ClientTls;
use migration::types::{DirtyLog, HookError, RamRegion};

use super::kvm_hooks::KvmDirtyLog;
use super::StateBlobError;
use crate::control::{AfterFailure, MigrateFailure, MigrateHandler, MigrateRequest};
use crate::events::EventMonitor;
use crate::vm::Vm;

/// A running VM seen by the source protocol driver.
pub struct SourceSide {
    vm: Arc<Vm>,
    dirty: KvmDirtyLog,
}

impl SourceSide {
    pub fn new(vm: Arc<Vm>) -> Self {
        SourceSide {
            dirty: KvmDirtyLog { vm: vm.clone() },
            vm,
        }
    }
}

impl SourceVm for SourceSide {
    fn ram_regions(&self) -> Vec<RamRegion> {
        super::ram_regions(self.vm.ram())
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        &self.dirty
    }

    fn vcpu_count(&self) -> u32 {
        u32::from(self.vm.vcpu_count())
    }

    fn pause(&self) -> Result<(), HookError> {
        Ok(self.vm.pause()?)
    }

    fn resume(&self) -> Result<(), HookError> {
        self.vm.resume();
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, HookError> {
        let state = self.vm.save_state()?;
        Ok(serde_json::to_vec(&state).map_err(StateBlobError::Encode)?)
    }
}

/// The host of a `host:port` destination if it is a DNS name (None for an IP address).
fn dns_host(to: &str) -> Option<&str> {
    if to.parse::<std::net::SocketAddr>().is_ok() {
        return None;
    }
    let host = to.rsplit_once(':').map(|(h, _)| h).unwrap_or(to);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        None
    } else {
        Some(host)
    }
}

/// Why a `migrate` request failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot resolve destination '{to}': {source}")]
    Resolve {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("destination '{to}' has no address")]
    NoAddress { to: String },
    #[error(transparent)]
    Secret(#[from] migration::auth::AuthError),
    #[error("TLS settings from {dir}: {source}", dir = dir.display())]
    Tls {
        dir: std::path::PathBuf,
        #[source]
        source: migration::tls::TlsError,
    },
    #[error(transparent)]
    Migration(#[from] source::SourceError),
}

/// Serves `migrate` requests of the control API.
pub struct Migrator;

impl MigrateHandler for Migrator {
    fn migrate(
        &self,
        vm: &Arc<Vm>,
        req: &MigrateRequest,
        control: Arc<MigrationControl>,
        events: Option<Arc<EventMonitor>>,
    ) -> Result<serde_json::Value, MigrateFailure> {
        let fail = |e: MigrateError| MigrateFailure {
            error: Arc::new(e),
            after: AfterFailure::Resumed,
            vm_stopped: false,
        };
        let to = &req.to;
        let mode = req.mode;
        let addr = to
            .to_socket_addrs()
            .map_err(|source| {
                fail(MigrateError::Resolve {
                    to: to.clone(),
                    source,
                })
            })?
            .next()
            .ok_or_else(|| fail(MigrateError::NoAddress { to: to.clone() }))?;
        let mut opts = MigrateOptions::new(mode);
        opts.timeouts.recover = req.recover_timeout;
        let t = &req.tunables;
        if let Some(ms) = t.downtime_limit_ms {
            opts.downtime_target = std::time::Duration::from_millis(ms);
        }
        if let Some(r) = t.max_rounds {
            opts.max_rounds = r;
        }
        opts.precopy_bandwidth = t.max_bandwidth;
        opts.postcopy_bandwidth = t.max_postcopy_bandwidth;
        opts.timeout = t.timeout_s.map(std::time::Duration::from_secs);
        opts.events = events.map(|e| e as Arc<dyn migration::EventSink>);
        opts.control = control;
        if let Some(p) = &req.secret_file {
            opts.secret = Some(Secret::from_file(p).map_err(|e| fail(e.into()))?);
        }
        opts.allow_plaintext = req.allow_plaintext;
        if let Some(dir) = &req.tls_dir {
            // The destination's certificate must name the host of `--to` (an IP address is
            // checked against the address each connection goes to, so a retargeted recovery
            // checks its new address), or `--tls-server-name`.
            let name = req
                .tls_server_name
                .clone()
                .or_else(|| dns_host(to).map(str::to_owned));
            opts.tls = Some(ClientTls::from_dir(dir, name.as_deref()).map_err(|source| {
                fail(MigrateError::Tls {
                    dir: dir.clone(),
                    source,
                })
            })?);
        }
        let side = SourceSide::new(vm.clone());
        let report = |_: source::Progress| {};
        match source::migrate(&side, addr, opts, &report) {
            // The destination runs the VM now: the launcher stops this one after replying.
            // Every page reached the destination (Done): the summary is only a report, and the
            // handover stands even if it cannot be encoded.
            Ok(summary) => Ok(serde_json::to_value(summary)
                .unwrap_or_else(|e| serde_json::json!({ "summary_error": e.to_string() }))),
            Err(e) => Err(MigrateFailure {
                vm_stopped: matches!(e, source::SourceError::VmStopped(_)),
                after: if e.destination_started() {
                    AfterFailure::Lost
                } else if e.keeps_paused() {
                    AfterFailure::Unknown
                } else {
                    AfterFailure::Resumed
                },
                error: Arc::new(MigrateError::Migration(e)),
            }),
        }
    }
}
