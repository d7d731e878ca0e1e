//! KVM-backed implementations of the migration crate's hooks: the dirty log of a memslot, vCPU
//! pause/resume, and the guest_memfd memslot swap at collapse.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use migration::types::{DirtyLog, HookError, MemslotSwap, RamRegion, VcpuControl};

use crate::memory::{MemoryError, Region};
use crate::vm::Vm;

/// Why the guest_memfd memslot swap of a collapse failed.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("deleting staging memslot {idx}: {source}")]
    DeleteStaging {
        idx: usize,
        #[source]
        source: MemoryError,
    },
    #[error("binding memslot {idx} to its guest_memfd: {source}")]
    Bind {
        idx: usize,
        #[source]
        source: MemoryError,
    },
}

/// Why reading a memslot's dirty log failed (turning logging on and off fails with the memory
/// layer's own [`MemoryError`], which names the slot).
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("the VM has no memslot {slot}")]
    NoSlot { slot: u32 },
    #[error("KVM_GET_DIRTY_LOG of memslot {slot} failed: {source}")]
    Fetch {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// `KVM_GET_DIRTY_LOG` per memslot; enabling re-sets the slot with `KVM_MEM_LOG_DIRTY_PAGES`.
pub struct KvmDirtyLog {
    pub vm: Arc<Vm>,
    /// guest_memfd regions staged for postcopy are plain slots; they must stay unbound when the
    /// dirty flag is toggled.
    pub bind_guest_memfd: bool,
    /// Slots a [`GuestMemfdSwap`] has bound to their guest_memfd since: KVM cannot change them
    /// any more, and they were re-created without dirty logging.
    pub swapped: SwappedSlots,
}

/// The slots bound to their guest_memfd by a collapse, shared by the dirty log and the swap.
pub type SwappedSlots = Arc<Mutex<HashSet<u32>>>;

fn is_swapped(s: &SwappedSlots, slot: u32) -> bool {
    s.lock().map(|s| s.contains(&slot)).unwrap_or(false)
}

impl KvmDirtyLog {
    /// The region behind memslot `slot`.
    fn region(&self, slot: u32) -> Result<&Region, DirtyLogError> {
        self.vm
            .ram()
            .regions()
            .get(slot as usize)
            .ok_or(DirtyLogError::NoSlot { slot })
    }
}

impl DirtyLog for KvmDirtyLog {
    fn enable(&self, slot: u32) -> Result<(), HookError> {
        self.region(slot)?;
        let ram = self.vm.ram();
        Ok(ram.set_slot(self.vm.fd(), slot as usize, true, self.bind_guest_memfd)?)
    }

    fn disable(&self, slot: u32) -> Result<(), HookError> {
        if is_swapped(&self.swapped, slot) {
            return Ok(());
        }
        self.region(slot)?;
        let ram = self.vm.ram();
        Ok(ram.set_slot(self.vm.fd(), slot as usize, false, self.bind_guest_memfd)?)
    }

    fn fetch(&self, slot: u32) -> Result<Vec<u64>, HookError> {
        let r = self.region(slot)?;
        Ok(self
            .vm
            .fd()
            .get_dirty_log(slot, r.size as usize)
            .map_err(|source| DirtyLogError::Fetch { slot, source })?)
    }
}

/// Pauses and resumes every vCPU of the VM.
pub struct KvmVcpus(pub Arc<Vm>);

impl VcpuControl for KvmVcpus {
    fn pause(&self) -> Result<(), HookError> {
        Ok(self.0.pause()?)
    }

    fn resume(&self) {
        self.0.resume()
    }
}

/// Binds a staged guest_memfd region's memslot to its guest_memfd: guest_memfd slots cannot be
/// modified, so the plain staging slot is deleted and re-created bound.
pub struct GuestMemfdSwap {
    pub vm: Arc<Vm>,
    pub swapped: SwappedSlots,
}

impl MemslotSwap for GuestMemfdSwap {
    fn swap_to_final(&self, region: &RamRegion) -> Result<(), HookError> {
        let ram = self.vm.ram();
        let idx = region.slot as usize;
        ram.delete_slot(self.vm.fd(), idx)
            .map_err(|source| SwapError::DeleteStaging { idx, source })?;
        ram.set_slot(self.vm.fd(), idx, false, true)
            .map_err(|source| SwapError::Bind { idx, source })?;
        if let Ok(mut s) = self.swapped.lock() {
            s.insert(region.slot);
        }
        Ok(())
    }
}
