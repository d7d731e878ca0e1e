//! The Linux kernel interfaces the VMM uses that the crates it builds on (libc, kvm-bindings,
//! userfaultfd-sys, nix) do not export, in one place: constants and structs copied from the
//! kernel's UAPI headers, each with the header it comes from, and every raw `ioctl(2)` and
//! `syscall(2)` the workspace makes, as checked wrappers. A wrapper whose soundness depends on
//! its arguments is an `unsafe fn` and says what the caller must guarantee.
//!
//! Values are those of Linux 6.18. What a crate already exports is used from that crate and is
//! not repeated here. See docs/architecture.md for which kernel features the design relies on.

pub mod ioctl;
pub mod kvm;
pub mod mount;
pub mod pagemap;
pub mod sched;
pub mod uffd;
