//! The CPUID table a vCPU gets: what KVM supports, with per-vCPU topology fixed up.
//!
//! Under PVM `KVM_SET_CPUID2` is only partly honoured (docs/platform.md): nothing here relies on
//! hiding a feature from the guest.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: HTT (multi-core package).
const EDX_HTT: u32 = 1 << 28;

/// Patches `cpuid` for vCPU `index` of `count`.
pub fn patch(cpuid: &mut CpuId, index: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // EDX: x2APIC ID of this logical processor.
                e.edx = u32::from(index);
            }
            _ => {}
        }
    }
}
