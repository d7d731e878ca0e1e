//! KVM values kvm-bindings 0.14 lacks (include/uapi/linux/kvm.h, Linux 6.18).

/// `KVM_CAP_GUEST_MEMFD_FLAGS`: `KVM_CHECK_EXTENSION` on a VM returns the supported
/// `KVM_CREATE_GUEST_MEMFD` flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the guest_memfd can be `mmap`ed by userspace.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: the memory starts shared with the host (faultable through an
/// `mmap`), not private.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
