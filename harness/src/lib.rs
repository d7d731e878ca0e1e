//! The postcopy latency-measurement harness: it runs real source and destination VMM processes
//! over real links, measures the physical limits in the same run, and writes results.json, raw
//! histograms, a report and plots. See docs/measuring.md.

pub mod cleanup;
pub mod delay_proxy;
pub mod guest_output;
pub mod histogram;
pub mod hugepool;
pub mod limits;
pub mod netns;
pub mod peer;
pub mod peer_report;
pub mod probe;
pub mod process;
pub mod procmem;
pub mod qemu;
pub mod report;
pub mod results;
pub mod scenario;
pub mod secret;
pub mod sweep;
