//! Arbitrary region lists into RamLayout::new and run_index queries (see
//! `wire_checks::check_config_layout`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::wire_checks::check_config_layout(data));
