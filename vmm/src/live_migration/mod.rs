//! The VMM's side of live migration: it implements the `migration` crate's traits for a running
//! [`Vm`](crate::vm::Vm) (`source`) and builds and runs an incoming VM (`destination`).
//!
//! The protocol, the postcopy memory engine and the collapse live in the `migration` crate; this
//! module only connects them to KVM: memslots, dirty logs, vCPU pause/resume and state.

pub mod destination;
pub mod kvm_hooks;
pub mod source;

use migration::types::RamRegion;

use crate::memory::GuestRam;

/// Why the VM's device and vCPU state blob could not be encoded (source) or decoded
/// (destination); the VM's own save/restore errors pass through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum StateBlobError {
    #[error("encoding the VM state as JSON failed: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("decoding the VM state from JSON failed: {0}")]
    Decode(#[source] serde_json::Error),
}

/// Guest RAM as the migration crate sees it: one `RamRegion` per memslot.
pub fn ram_regions(ram: &GuestRam) -> Vec<RamRegion> {
    let kind = ram.backing();
    (0u32..)
        .zip(ram.regions())
        .map(|(slot, r)| RamRegion {
            slot,
            gpa: r.guest_addr,
            size: r.size,
            host_addr: r.primary.as_ptr() as usize,
            alias_addr: r.alias.as_ref().map(|a| a.as_ptr() as usize),
            fd: r.raw_fd(),
            fd_offset: r.fd_offset,
            kind,
            page_size: ram.backing().page_size(),
        })
        .collect()
}
