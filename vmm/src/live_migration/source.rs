//! The source side: a running VM as `migration::source::SourceVm`, and the `migrate` request of
//! the control API.

use std::cell::RefCell;
use std::net::ToSocketAddrs;
use std::sync::Arc;

use migration::auth::Secret;
use migration::source::{self, MigrateOptions, SourceVm};
use migration::types::{DirtyLog, Mode, RamRegion};

use super::kvm_hooks::KvmDirtyLog;
use crate::launcher::MigrateHandler;
use crate::vcpu::StopReason;
use crate::vm::Vm;

/// A running VM seen by the source protocol driver.
pub struct SourceSide {
    vm: Arc<Vm>,
    dirty: KvmDirtyLog,
}

impl SourceSide {
    pub fn new(vm: Arc<Vm>) -> Self {
        SourceSide {
            dirty: KvmDirtyLog {
                vm: vm.clone(),
                bind_guest_memfd: true,
            },
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

    fn pause(&self) -> Result<(), String> {
        self.vm.pause().map_err(|e| e.to_string())
    }

    fn resume(&self) -> Result<(), String> {
        self.vm.resume();
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, String> {
        let state = self.vm.save_state().map_err(|e| e.to_string())?;
        serde_json::to_vec(&state).map_err(|e| format!("encoding VM state: {e}"))
    }
}

/// Serves `migrate` requests of the control API.
pub struct Migrator;

impl MigrateHandler for Migrator {
    fn migrate(
        &self,
        vm: &Arc<Vm>,
        to: &str,
        mode: &str,
        secret: Option<Vec<u8>>,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, String> {
        let mode: Mode = mode.parse()?;
        let addr = to
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve destination '{to}': {e}"))?
            .next()
            .ok_or_else(|| format!("destination '{to}' has no address"))?;
        let mut opts = MigrateOptions::new(mode);
        if let Some(s) = secret {
            opts.secret = Some(Secret::from_bytes(s).map_err(|e| e.to_string())?);
        }
        let side = SourceSide::new(vm.clone());
        let progress = RefCell::new(progress);
        let report = |p: source::Progress| {
            if let Ok(v) = serde_json::to_value(p) {
                (progress.borrow_mut())(v);
            }
        };
        match source::migrate(&side, addr, opts, &report) {
            Ok(summary) => {
                // The destination runs the VM now: this VMM is done with it.
                vm.stop_signal().stop(StopReason::Stopped);
                serde_json::to_value(summary).map_err(|e| e.to_string())
            }
            Err(e) if e.destination_started() => {
                vm.stop_signal().stop(StopReason::Stopped);
                Err(e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}
