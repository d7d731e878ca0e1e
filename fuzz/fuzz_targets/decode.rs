//! An arbitrary kind code and payload through check_header, decode and check_run (see
//! `wire_checks::check_decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::wire_checks::check_decode(data));
