//! A minimal KVM VMM whose guest RAM can live on 1 GiB or 2 MiB hugetlb pages, shmem, anonymous
//! memory or guest_memfd, and which live-migrates guests by userfaultfd postcopy at 4 KiB
//! granularity.
//!
//! Rooms (one module each): [`memory`] (guest RAM backends and layout), [`boot`] (Linux boot
//! protocol and the workload guest), [`vcpu`] (vCPU threads and state), [`devices`] (serial,
//! reset, exit port, MMIO debug device), [`vm`] (the VM and its VM-wide state), [`api`] (the
//! control socket), [`launcher`] (what `vmm run` does), [`probe`] (what the host offers),
//! [`fault_limit`] (the raw vCPU userfault round trip, `vmm fault-limit`), [`seccomp`] (the
//! system calls each thread may make).
//!
//! See docs/architecture.md for how the pieces fit, docs/api.md for the control socket and
//! docs/platform.md for what the host must offer.

pub mod api;
pub mod boot;
pub mod control;
pub mod devices;
pub mod events;
pub mod fault_limit;
pub mod launcher;
pub mod live_migration;
pub mod memory;
pub mod probe;
pub mod progress;
pub mod seccomp;
pub mod signals;
pub mod size;
pub mod vcpu;
pub mod vm;
