//! Arbitrary bytes as a migration stream, read frame by frame (see `wire_checks::check_frame_reader`).
#![no_main]

use vmm_fuzz::wire_checks::{check_frame_reader, TrackingAlloc};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_frame_reader(data));
