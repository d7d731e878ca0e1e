//! Time stamp counter reads and conversion to nanoseconds.

use core::arch::x86_64::{_mm_lfence, _rdtsc};

/// Reads the TSC, fenced so that earlier loads/stores finished and later ones wait.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: lfence and rdtsc are available on every x86_64 CPU and allowed in ring 3
    // (the stub leaves CR4.TSD clear).
    unsafe {
        _mm_lfence();
        let t = _rdtsc();
        _mm_lfence();
        t
    }
}

/// Converts TSC cycles into the histogram unit: nanoseconds if the TSC rate is known,
/// else cycles.
#[derive(Clone, Copy)]
pub struct Clock {
    /// TSC kHz from the command line (0 = unknown).
    pub khz: u64,
    /// ns per cycle, as a 32.32 fixed-point factor (0 = unknown).
    ns_per_cycle_fp: u64,
}

/// The stall threshold, ns.
const STALL_NS: u64 = 20_000;

/// TSC rate assumed for wall-clock figures (elapsed_ms) when the VMM gave none.
const FALLBACK_KHZ: u64 = 3_000_000;

impl Clock {
    pub fn new(khz: u64) -> Self {
        let ns_per_cycle_fp = (1_000_000u64 << 32).checked_div(khz).unwrap_or(0);
        Clock {
            khz,
            ns_per_cycle_fp,
        }
    }

    /// True when intervals are reported in ns.
    pub fn has_ns(&self) -> bool {
        self.khz != 0
    }

    /// Histogram unit name.
    pub fn unit(&self) -> &'static str {
        if self.has_ns() {
            "ns"
        } else {
            "cycles"
        }
    }

    /// Converts a cycle count to the histogram unit.
    pub fn unit_of(&self, cycles: u64) -> u64 {
        if self.has_ns() {
            ((u128::from(cycles) * u128::from(self.ns_per_cycle_fp)) >> 32) as u64
        } else {
            cycles
        }
    }

    /// The threshold of a "slow" access (2000 ns), in the histogram unit.
    pub fn slow_threshold(&self) -> u64 {
        if self.has_ns() {
            2000
        } else {
            2000 * FALLBACK_KHZ / 1_000_000
        }
    }

    /// The threshold of a stall (20 us): an iteration of a pass's inner loop (one timed load,
    /// the page's verification and maybe its rewrite, ~1-5 us, plus an ordinary mapping fault
    /// of 3-10 us) that takes longer was held up. In the histogram unit.
    pub fn stall_threshold(&self) -> u64 {
        if self.has_ns() {
            STALL_NS
        } else {
            STALL_NS * FALLBACK_KHZ / 1_000_000
        }
    }

    /// Milliseconds for a cycle count (assumes 3 GHz when the rate is unknown).
    pub fn ms_of(&self, cycles: u64) -> u64 {
        let khz = if self.khz == 0 {
            FALLBACK_KHZ
        } else {
            self.khz
        };
        cycles / khz
    }
}
