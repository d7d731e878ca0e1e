//! KVM-backed implementation of the migration crate's dirty-log hook: the dirty log of a
//! memslot, for precopy on the source and the collapse's deltas on the destination.

use std::sync::Arc;

use migration::types::{DirtyLog, HookError};

use crate::memory::Region;
use crate::vm::Vm;

/// Why reading a memslot's dirty log failed (turning logging on and off fails with the memory
/// layer's own [`crate::memory::MemoryError`], which names the slot).
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

/// `KVM_GET_DIRTY_LOG` per memslot; enabling re-sets the slot with `KVM_MEM_LOG_DIRTY_PAGES`,
/// keeping its guest_memfd binding as it is (a postcopy destination's guest_memfd slots stay
/// plain, a launched VM's are bound).
pub struct KvmDirtyLog {
    pub vm: Arc<Vm>,
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
        Ok(ram.set_slot_dirty_log(self.vm.fd(), slot as usize, true)?)
    }

    fn disable(&self, slot: u32) -> Result<(), HookError> {
        self.region(slot)?;
        let ram = self.vm.ram();
        Ok(ram.set_slot_dirty_log(self.vm.fd(), slot as usize, false)?)
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
