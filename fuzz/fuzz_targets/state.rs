//! Arbitrary bytes as the State blob the destination decodes (see `state_check::check_state`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::state_check::check_state(data));
