//! The State blob check shared by the fuzz target `state` and the corpus replay test
//! `vmm/tests/fuzz_state_corpus.rs` (which includes this file with `#[path]`, so it may use only
//! `vmm`, `serde_json` and `std`).

use vmm::devices::serial::SerialSnapshot;
use vmm::vcpu::VcpuState;
use vmm::vm::VmState;

/// Fuzz input: a State payload, decoded as the destination's `load_state` does. A blob that
/// decodes must re-encode, and the re-encoding must decode to the same value (compared by its
/// encoding: the KVM structs have no `PartialEq`).
pub fn check_state(data: &[u8]) {
    let Ok(state) = serde_json::from_slice::<VmState>(data) else {
        return;
    };
    let json = serde_json::to_vec(&state).expect("a decoded VmState encodes");
    let again: VmState = match serde_json::from_slice(&json) {
        Ok(s) => s,
        Err(e) => panic!("a re-encoded VmState does not decode: {e}"),
    };
    let json2 = serde_json::to_vec(&again).expect("a decoded VmState encodes");
    assert!(json == json2, "decode(encode(state)) differs from state");
}

/// A plausible VM state with `vcpus` vCPUs (KVM structs zeroed apart from a few registers).
pub fn sample_state(vcpus: u8) -> VmState {
    let vcpu = |index: u8| {
        let mut v = VcpuState {
            index,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            msrs: vec![Default::default(); 3],
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
        };
        v.regs.rip = 0x10_0000;
        v.regs.rflags = 2;
        v.sregs.cr0 = 0x8000_0011;
        v.xsave[0] = 0x37f;
        for (i, m) in v.msrs.iter_mut().enumerate() {
            m.index = 0xc000_0080 + i as u32;
            m.data = 0x500 + i as u64;
        }
        v
    };
    let mut state = VmState {
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
        serial: SerialSnapshot {
            baud_divisor_low: 1,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: b"ok\n".to_vec(),
        },
        vcpus: (0..vcpus).map(vcpu).collect(),
    };
    state.ioapic.chip_id = 2;
    state.pic_slave.chip_id = 1;
    state.clock.clock = 123_456_789;
    state
}

/// Seed inputs for the `state` target: name and bytes.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for n in [0u8, 1, 2] {
        let json = serde_json::to_vec(&sample_state(n)).expect("the sample state encodes");
        seeds.push((format!("seed-{n}-vcpus"), json));
    }
    // Short arrays for the KVM structs (zero-padded on decode) and an empty vCPU list.
    seeds.push((
        "seed-short-arrays".into(),
        br#"{"pic_master":[1],"pic_slave":[],"ioapic":[2],"pit":[],"clock":[0,1],"serial":{"baud_divisor_low":1,"baud_divisor_high":0,"interrupt_enable":0,"interrupt_identification":1,"line_control":3,"line_status":96,"modem_control":8,"modem_status":176,"scratch":0,"in_buffer":[]},"vcpus":[]}"#.to_vec(),
    ));
    seeds
}
