//! Saving and restoring a vCPU's complete architectural state, for migration.
//!
//! Captured: general and special registers, XSAVE (FPU/SSE/AVX), XCRs, the MSRs KVM lists as
//! saveable, the local APIC, pending vCPU events and the MP state. The order of restore follows
//! what KVM requires (sregs before MSRs and LAPIC, events last).

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::VcpuError;

/// A vCPU's state, serializable for the migration stream.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area (`kvm_xsave.region`).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

fn kvm(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::SaveState { ioctl, source }
}

fn kvm_restore(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::RestoreState { ioctl, source }
}

impl VcpuState {
    /// Reads the state of a paused vCPU. `msr_indices` is the list of MSRs to save (from
    /// `KVM_GET_MSR_INDEX_LIST`).
    pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        // KVM_GET_MSRS takes at most KVM_MAX_MSR_ENTRIES at a time; read in chunks.
        for chunk in msr_indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m =
                Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrCount(entries.len()))?;
            let n = fd.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
            msrs.extend_from_slice(&m.as_slice()[..n]);
        }
        Ok(VcpuState {
            index,
            regs,
            sregs,
            xsave: xsave.region.to_vec(),
            xcrs,
            msrs,
            lapic,
            events,
            mp_state,
        })
    }

    /// Loads this state into a (not running) vCPU.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_restore("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_restore("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm_restore("KVM_SET_REGS"))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(VcpuError::XsaveSize {
                got: self.xsave.len(),
                expected: xsave.region.len(),
            });
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a legacy 4 KiB XSAVE area read by KVM_GET_XSAVE on a vCPU of the
        // same kind; it has no trailing extra area, which is what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm_restore("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs)
            .map_err(kvm_restore("KVM_SET_XCRS"))?;
        for chunk in self.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let m = Msrs::from_entries(chunk).map_err(|_| VcpuError::MsrCount(chunk.len()))?;
            let n = fd.set_msrs(&m).map_err(kvm_restore("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(VcpuError::MsrRejected {
                    index: chunk[n].index,
                });
            }
        }
        fd.set_lapic(&self.lapic)
            .map_err(kvm_restore("KVM_SET_LAPIC"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_restore("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
