//! A VM: the KVM VM fd, its guest RAM, its devices and its vCPUs, and the VM-wide state
//! (interrupt controllers, PIT, kvmclock) that migration carries.

use migration::sync::MutexExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootConfig, BootError, BootInfo, GuestKind};
use crate::devices::serial::SerialSnapshot;
use crate::devices::serial::SERIAL_IRQ;
use crate::devices::{Console, DebugDevice, Devices, ExitPort, SerialDevice, I8042};
use crate::memory::{Backing, GuestRam, MemoryError};
use crate::vcpu::{self, StopReason, StopSignal, VcpuError, VcpuHandle, VcpuState};

/// Where KVM's TSS for real-mode emulation goes (3 pages just below the BIOS area, inside the
/// 32-bit hole, never RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {0} (is KVM available, and is this process root or in the kvm group?)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("boot: {0}")]
    Boot(#[from] BootError),
    #[error("vCPU: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("{vcpus} vCPUs requested; between 1 and {max} are supported")]
    VcpuCount { vcpus: u8, max: u8 },
    #[error("VM state: the state has {state} vCPUs, this VM {vm}")]
    StateVcpuCount { state: usize, vm: usize },
    #[error("VM state: the serial device: {0}")]
    Serial(#[from] crate::devices::serial::SerialRestoreError),
    #[error("the {what} lock is poisoned (a thread panicked holding it)")]
    Poisoned { what: &'static str },
    /// Its vCPUs are gone: the guest exited, crashed or reset, or the VMM stopped it.
    #[error("the VM is not running: {0}")]
    NotRunning(String),
}

/// VM-wide device state: what lives in KVM (PIC, IOAPIC, PIT, kvmclock), the UART, and every
/// vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: SerialSnapshot,
    pub vcpus: Vec<VcpuState>,
}

/// A VM.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    devices: Arc<Devices>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    vcpu_count: u8,
    stop: Arc<StopSignal>,
    msr_indices: Vec<u32>,
}

/// Largest vCPU count the VMM accepts (the MP table and APIC IDs fit comfortably).
pub const MAX_VCPUS: u8 = 32;

impl Vm {
    /// Creates the VM with its memory (registered as memslots), interrupt controllers, PIT and
    /// devices. No vCPU exists yet.
    pub fn new(backing: Backing, memory: u64, vcpus: u8, console: Console) -> Result<Vm, VmError> {
        Self::with_memslots(backing, memory, vcpus, console, true)
    }

    /// Like [`Vm::new`]; with `register_memory` false no memslot is set yet (a migration
    /// destination decides how to register each region, see `GuestRam::set_slot`).
    pub fn with_memslots(
        backing: Backing,
        memory: u64,
        vcpus: u8,
        console: Console,
        register_memory: bool,
    ) -> Result<Vm, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount {
                vcpus,
                max: MAX_VCPUS,
            });
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e} (not needed on this host)");
        }
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let ram = GuestRam::new(backing, memory, &fd)?;
        if register_memory {
            ram.register(&fd)?;
        }

        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        fd.register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(|e| VmError::Kvm("KVM_IRQFD (serial)", e))?;
        let devices = Devices {
            serial: std::sync::Mutex::new(
                SerialDevice::new(serial_evt, console.clone()).map_err(VmError::EventFd)?,
            ),
            i8042: I8042,
            exit_port: ExitPort,
            debug: DebugDevice::new(console),
        };
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .to_vec();
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            ram: Arc::new(ram),
            devices: Arc::new(devices),
            vcpus: Mutex::new(Vec::new()),
            vcpu_count: vcpus,
            stop: Arc::new(StopSignal::default()),
            msr_indices,
        })
    }

    /// Loads the guest and starts every vCPU at its boot state.
    pub fn boot(&mut self, cfg: &BootConfig) -> Result<BootInfo, VmError> {
        let fds = self.create_vcpu_fds()?;
        let mut cfg = cfg.clone();
        cfg.vcpus = self.vcpu_count;
        cfg.tsc_khz = fds.first().and_then(|fd| fd.get_tsc_khz().ok());
        let info = boot::load(&self.ram, &cfg)?;
        self.spawn_vcpus(fds, Some(&info), false)?;
        Ok(info)
    }

    /// Creates the vCPUs for a VM whose state will be restored (migration destination); they
    /// wait for [`Vm::resume`].
    pub fn start_vcpus_paused(&mut self) -> Result<(), VmError> {
        let fds = self.create_vcpu_fds()?;
        self.spawn_vcpus(fds, None, true)
    }

    fn create_vcpu_fds(&self) -> Result<Vec<VcpuFd>, VmError> {
        vcpu::install_kick_handler()?;
        let supported = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut fds = Vec::with_capacity(self.vcpu_count as usize);
        for i in 0..self.vcpu_count {
            let fd = self
                .fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            vcpu::cpuid::patch(&mut cpuid, i, self.vcpu_count);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
            vcpu::boot_regs::setup_lapic(&fd)?;
            fds.push(fd);
        }
        Ok(fds)
    }

    /// Gives the vCPUs their boot state (only the BSP for Linux guests; every vCPU for the
    /// workload guest) and starts their threads.
    fn spawn_vcpus(
        &mut self,
        fds: Vec<VcpuFd>,
        boot: Option<&BootInfo>,
        start_paused: bool,
    ) -> Result<(), VmError> {
        for (i, fd) in (0u8..).zip(fds) {
            if let Some(info) = boot {
                if i == 0 || info.kind == GuestKind::Workload {
                    vcpu::boot_regs::setup(&fd, info, i, self.vcpu_count)?;
                    if i != 0 {
                        // Workload APs start with the BSP instead of waiting for INIT/SIPI.
                        fd.set_mp_state(kvm_bindings::kvm_mp_state {
                            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                        })
                        .map_err(|e| VmError::Kvm("KVM_SET_MP_STATE", e))?;
                    }
                }
            }
            let h =
                VcpuHandle::spawn(i, fd, self.devices.clone(), self.stop.clone(), start_paused)?;
            self.vcpus().push(h);
        }
        Ok(())
    }

    /// Waits until the VM stops or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> Option<StopReason> {
        self.stop.wait(timeout)
    }

    /// The stop signal vCPUs report to (the VMM stops the VM through it too).
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    /// Why the VM stopped, in words ("the guest exited (code 0)"), or that its vCPUs did.
    pub fn stopped_because(&self) -> String {
        match self.stop.reason() {
            Some(StopReason::GuestExit(code)) => format!("the guest exited (code {code})"),
            Some(StopReason::Reset) => "the guest reset".into(),
            Some(StopReason::Crash(c)) => format!("it crashed ({c})"),
            Some(StopReason::Stopped) => "the VMM stopped it".into(),
            None => "its vCPUs have stopped".into(),
        }
    }

    /// The vCPU handles, all of them, or the error for a VM whose vCPU threads are gone (shut
    /// down after a stop).
    fn running_vcpus(&self) -> Result<MutexGuard<'_, Vec<VcpuHandle>>, VmError> {
        let handles = self.vcpus();
        if handles.len() != usize::from(self.vcpu_count) {
            return Err(VmError::NotRunning(self.stopped_because()));
        }
        Ok(handles)
    }

    /// Pauses every vCPU (returns when none is in the guest). Fails once the vCPUs are gone
    /// (a VM that stopped has nothing to pause, and no state to hand over).
    pub fn pause(&self) -> Result<(), VmError> {
        let handles = self.running_vcpus()?;
        // Kick every vCPU first, then wait: they leave the guest in parallel.
        for v in handles.iter() {
            v.request_pause()?;
        }
        for v in handles.iter() {
            v.wait_paused()?;
        }
        Ok(())
    }

    /// Asks every vCPU to leave the guest, without waiting (a vCPU blocked in a userfault
    /// leaves only once its page is served). Returns the errors of vCPUs that could not be
    /// asked.
    pub fn request_pause_all(&self) -> Vec<VmError> {
        self.vcpus()
            .iter()
            .filter_map(|v| v.request_pause().err().map(VmError::from))
            .collect()
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        for v in self.vcpus().iter() {
            v.resume();
        }
    }

    /// Saves VM and vCPU state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| VmError::Kvm("KVM_GET_IRQCHIP", e))?;
            Ok(c)
        };
        let handles = self.running_vcpus()?;
        let mut vcpus = Vec::with_capacity(handles.len());
        for v in handles.iter() {
            let idx = v.index();
            let msrs = self.msr_indices.clone();
            let s = v.with_fd(move |fd| VcpuState::save(fd, idx, &msrs))??;
            vcpus.push(s);
        }
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Kvm("KVM_GET_PIT2", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| VmError::Kvm("KVM_GET_CLOCK", e))?,
            serial: self
                .devices
                .serial
                .lock()
                .map_err(|_| VmError::Poisoned {
                    what: "serial device",
                })?
                .save(),
            vcpus,
        })
    }

    /// Restores VM and vCPU state into a VM whose vCPUs were started paused.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let handles = self.vcpus();
        if state.vcpus.len() != handles.len() {
            return Err(VmError::StateVcpuCount {
                state: state.vcpus.len(),
                vm: handles.len(),
            });
        }
        for c in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(c)
                .map_err(|e| VmError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Kvm("KVM_SET_PIT2", e))?;
        let mut clock = state.clock;
        // Only the clock value is meaningful on another host; flags describe the source.
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmError::Kvm("KVM_SET_CLOCK", e))?;
        self.devices
            .serial
            .lock()
            .map_err(|_| VmError::Poisoned {
                what: "serial device",
            })?
            .restore(&state.serial)?;
        for (v, s) in handles.iter().zip(&state.vcpus) {
            let s = s.clone();
            v.with_fd(move |fd| s.restore(fd))??;
        }
        Ok(())
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// The kernel thread id of each running vCPU thread, by vCPU index (empty before they
    /// start); the postcopy engine maps userfaults to vCPUs with it.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus().iter().map(|v| v.tid()).collect()
    }

    /// Stops every vCPU thread and joins them.
    pub fn shutdown(&self) {
        let mut handles = self.vcpus();
        for v in handles.iter_mut() {
            v.quit();
        }
        handles.clear();
    }

    fn vcpus(&self) -> MutexGuard<'_, Vec<VcpuHandle>> {
        // A poisoned lock means a thread panicked while holding it; the handles are still valid.
        self.vcpus.lock_unpoisoned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
