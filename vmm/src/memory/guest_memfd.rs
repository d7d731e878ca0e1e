//! KVM guest_memfd guest RAM: one guest_memfd per region, created mappable and shared
//! (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`), mapped twice, and bound to its memslot
//! with `KVM_SET_USER_MEMORY_REGION2` and `KVM_MEM_GUEST_MEMFD`.

use std::os::fd::{FromRawFd, OwnedFd};

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::VmFd;

use super::{map_file_region, Backing, MemoryError, Region};

// kvm-bindings 0.14 lacks the guest_memfd flag capability and flags of Linux 6.18.
pub use kernel_abi::kvm::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
};

/// The flags this VMM creates guest_memfds with.
pub const GUEST_MEMFD_FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// Names of the bits set in a `KVM_CAP_GUEST_MEMFD_FLAGS` value; unknown bits as `bit N`.
pub fn flag_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| flags & (1 << bit) != 0)
        .map(|bit| match 1u64 << bit {
            GUEST_MEMFD_FLAG_MMAP => "MMAP".to_string(),
            GUEST_MEMFD_FLAG_INIT_SHARED => "INIT_SHARED".to_string(),
            _ => format!("bit {bit}"),
        })
        .collect()
}

/// Whether this host's KVM can give a VM mappable guest_memfds: opens `/dev/kvm` and a VM,
/// so a destination refuses `--backing guest-memfd` before it listens, not after a source
/// has started sending.
pub fn check_host() -> Result<(), MemoryError> {
    let vm = kvm_ioctls::Kvm::new()
        .and_then(|kvm| kvm.create_vm())
        .map_err(MemoryError::HostKvm)?;
    check_vm(&vm)
}

/// Whether `vm` has guest_memfd at all and supports [`GUEST_MEMFD_FLAGS`].
fn check_vm(vm: &VmFd) -> Result<(), MemoryError> {
    if !vm.check_extension(kvm_ioctls::Cap::GuestMemfd) {
        return Err(MemoryError::GuestMemfdUnsupported);
    }
    let supported =
        u64::try_from(vm.check_extension_raw(u64::from(KVM_CAP_GUEST_MEMFD_FLAGS))).unwrap_or(0);
    if supported & GUEST_MEMFD_FLAGS != GUEST_MEMFD_FLAGS {
        return Err(MemoryError::GuestMemfdFlagsUnsupported {
            wanted: GUEST_MEMFD_FLAGS,
            supported,
        });
    }
    Ok(())
}

/// Creates a guest_memfd of `size` bytes on `vm` with [`GUEST_MEMFD_FLAGS`], after checking that
/// the VM has guest_memfd at all and supports those flags.
pub fn create(vm: &VmFd, size: u64) -> Result<OwnedFd, MemoryError> {
    check_vm(vm)?;
    let raw = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size,
            flags: GUEST_MEMFD_FLAGS,
            reserved: [0; 6],
        })
        .map_err(|source| MemoryError::CreateGuestMemfd {
            size,
            flags: GUEST_MEMFD_FLAGS,
            source,
        })?;
    // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Creates one guest_memfd region: its guest_memfd, the primary mapping (the memslot's
/// `userspace_addr`) and the alias.
pub(crate) fn region(vm: &VmFd, guest_addr: u64, size: usize) -> Result<Region, MemoryError> {
    let fd = create(vm, size as u64)?;
    map_file_region(Backing::GuestMemfd, guest_addr, size, fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names_decode() {
        assert_eq!(flag_names(3), vec!["MMAP", "INIT_SHARED"]);
        assert_eq!(flag_names(0b101), vec!["MMAP", "bit 2"]);
        assert!(flag_names(0).is_empty());
    }
}
