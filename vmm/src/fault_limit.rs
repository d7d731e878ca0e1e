//! `vmm fault-limit`: the raw vCPU userfault round trip with the page already local, the floor
//! under every postcopy fault, measured on this host with the real workload guest.
//!
//! The workload guest boots with every page of its RAM behind a minimal userfaultfd handler
//! that already has the page, i.e. the cheapest service a fault of the postcopy strategy can get:
//! - **shmem** (and the huge backings and guest_memfd, whose 4 KiB faults the 4k-staged strategy
//!   serves from a shmem staging mapping whatever the final backing, so they are measured on
//!   shmem of the same size): every page is put in the page cache through the alias before the
//!   guest starts, the primary mapping (the memslot's) has no page table entry and is registered
//!   MINOR, and a fault is served by `UFFDIO_CONTINUE` of its 4 KiB.
//! - **anon**: the primary mapping is registered MISSING and a fault is served by `UFFDIO_COPY`
//!   of 4 KiB from a local page of zeros (fresh guest RAM is zero).
//!
//! The guest's first store to each page of its span is then one vCPU userfault; the guest times
//! each (its `first_touch` histogram: the round trip as the guest sees it) and the handler times
//! read -> ioctl done (the VMM side). The loader's own faults (the VMM thread writing the image
//! before the vCPUs start) are served but not counted: each fault event names its thread.

use migration::sync::MutexExt;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use migration::latency::LatencySummary;
use migration::postcopy::sys::{self, uffd_errno};
use serde::{Deserialize, Serialize};
use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::boot::BootConfig;
use crate::devices::Console;
use crate::launcher::{self, LaunchError, RunOutcome};
use crate::memory::{Backing, GuestRam, MemoryError, PAGE_SIZE_4K};
use crate::signals;
use crate::vm::{Vm, VmError};

/// Guest command line used when none is given: one pass that writes (and so first-touches)
/// every page of the usable RAM.
pub const DEFAULT_CMDLINE: &str = "passes=1 pattern=sequential";

/// Largest latency the histograms track (longer samples are clamped): 60 s in ns.
const MAX_TRACKED_NS: u64 = 60_000_000_000;
/// How long a `UFFDIO_CONTINUE`/`UFFDIO_COPY` that returns EAGAIN (the address space changing
/// under it) is retried before the fault counts as failed.
const EAGAIN_PATIENCE: Duration = Duration::from_secs(10);
/// Lines of guest output quoted in an error.
const TAIL_LINES: usize = 20;

/// What to measure.
#[derive(Debug, Clone)]
pub struct FaultLimitConfig {
    /// The workload guest ELF.
    pub kernel: PathBuf,
    /// Guest command line ([`DEFAULT_CMDLINE`] if `None`).
    pub cmdline: Option<String>,
    /// Guest RAM size in bytes.
    pub memory: u64,
    pub vcpus: u8,
    /// The backing the postcopy strategy would use; see [`measured_backing`].
    pub backing: Backing,
}

/// Errors of the fault-limit measurement.
#[derive(Debug, thiserror::Error)]
pub enum FaultLimitError {
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("userfaultfd {what} failed: {source}")]
    Uffd {
        what: String,
        source: userfaultfd::Error,
    },
    #[error("{ioctl} of the 4 KiB page at {addr:#x} failed: {source}")]
    Serve {
        ioctl: &'static str,
        addr: u64,
        source: userfaultfd::Error,
    },
    #[error("poll on the userfaultfd failed: {0}")]
    Poll(#[source] std::io::Error),
    #[error("cannot start the fault handler thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the fault handler thread panicked")]
    HandlerPanicked,
    #[error("cannot create a latency histogram: {0}")]
    Histogram(#[source] hdrhistogram::CreationError),
    #[error("the VM failed: {source}; last guest output:\n{tail}")]
    Run { source: LaunchError, tail: String },
    #[error("stopped by signal {0} before the guest finished")]
    Signalled(i32),
    #[error("the VM migrated away (nothing here migrates it)")]
    MigratedAway,
    #[error("the guest exited with code {code} (0 expected); last guest output:\n{tail}")]
    GuestFailed { code: i32, tail: String },
    #[error(
        "the guest printed no whole-run first_touch histogram (is {kernel} the workload \
         guest?); last guest output:\n{tail}"
    )]
    NoHistogram { kernel: PathBuf, tail: String },
    #[error("the guest's first_touch histogram is in {unit}, not ns (no TSC frequency?)")]
    Unit { unit: String },
    #[error("malformed first_touch histogram bucket '{0}'")]
    Bucket(String),
    #[error("the guest's first_touch histogram is empty: the guest touched no page")]
    NoSamples,
}

/// The backing a `backing` fault is measured on: the 4k-staged strategy serves every fault of
/// a file-backed, huge or guest_memfd region from a shmem staging mapping (MINOR +
/// `UFFDIO_CONTINUE`), and anon faults with `UFFDIO_COPY`.
pub fn measured_backing(backing: Backing) -> Backing {
    match backing {
        Backing::Anon => Backing::Anon,
        _ => Backing::Shmem,
    }
}

/// The userfault service used on `measured` (a [`measured_backing`] result).
fn service_name(measured: Backing) -> &'static str {
    match measured {
        Backing::Anon => "anon MISSING + UFFDIO_COPY 4 KiB",
        _ => "shmem MINOR + UFFDIO_CONTINUE 4 KiB",
    }
}

/// The bucket scheme of guests that do not state theirs (8 sub-buckets per power of two).
fn legacy_guest_sub_buckets() -> u64 {
    8
}

/// What `vmm fault-limit` prints (one JSON object with `--json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultLimitReport {
    /// The backing asked for.
    pub requested_backing: Backing,
    /// The backing the faults were taken on (see [`measured_backing`]).
    pub measured_backing: Backing,
    /// How each fault was served.
    pub service: String,
    /// Why the measured backing differs from the requested one, if it does.
    pub note: Option<String>,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub cmdline: String,
    /// The vCPU userfault round trip as the guest saw it (its first store to each page), us.
    pub guest_us: LatencySummary,
    /// The handler's time from reading a fault to its ioctl returning, us (vCPU faults only).
    pub vmm_us: LatencySummary,
    /// Faults the VMM's loader thread took while writing the guest image (served, not counted).
    pub loader_faults: u64,
    /// The guest's histogram as printed: (bucket lower bound ns, count), non-empty buckets.
    /// Buckets are log-linear: one per value below `guest_sub_buckets`, then
    /// `guest_sub_buckets` per power of two.
    pub guest_buckets_ns: Vec<(u64, u64)>,
    /// The guest's bucket scheme, as its line states it (`sub=`; 8 for guests that do not).
    /// Absent from the reports of VMMs older than the scheme (their guests used 8).
    #[serde(default = "legacy_guest_sub_buckets")]
    pub guest_sub_buckets: u64,
    /// The VMM-side histogram: (value ns, count), 3 significant digits.
    pub vmm_histogram_ns: Vec<(u64, u64)>,
}

impl fmt::Display for FaultLimitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "vCPU userfault round trip, page already local ({})",
            self.service
        )?;
        writeln!(
            f,
            "  measured on {} ({} MiB, {} vCPU{}), guest cmdline \"{}\"",
            self.measured_backing,
            self.memory_bytes >> 20,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.cmdline
        )?;
        if let Some(n) = &self.note {
            writeln!(f, "  note: {n}")?;
        }
        writeln!(
            f,
            "  {:<11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "us", "count", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, s) in [("guest-seen", &self.guest_us), ("VMM-side", &self.vmm_us)] {
            writeln!(
                f,
                "  {:<11} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, s.count, s.p50, s.p90, s.p99, s.p999, s.max
            )?;
        }
        writeln!(
            f,
            "  guest-seen = the guest's first store to each page (its first_touch histogram); \
             VMM-side = fault read -> ioctl done"
        )?;
        write!(
            f,
            "  {} loader faults (the VMM writing the image) served, not counted",
            self.loader_faults
        )
    }
}

fn new_histogram() -> Result<Histogram<u64>, FaultLimitError> {
    Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3).map_err(FaultLimitError::Histogram)
}

/// Guest console output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("captured console lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock_unpoisoned();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// How the handler serves a fault.
enum Service {
    /// `UFFDIO_CONTINUE` of the 4 KiB (the page cache holds the page).
    Continue,
    /// `UFFDIO_COPY` of 4 KiB from this local page of zeros.
    Copy(Box<[u8; 4096]>),
}

/// What the handler thread measured.
struct Served {
    vcpu: Histogram<u64>,
    loader_faults: u64,
}

/// The fault handler thread: polls the (non-blocking) userfaultfd and serves every fault.
struct Handler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Served, FaultLimitError>>>,
}

impl Handler {
    fn start(uffd: Arc<Uffd>, service: Service, loader: i32) -> Result<Self, FaultLimitError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("fault-limit-uffd".into())
            .spawn(move || serve_loop(&uffd, &service, &stop2, loader))
            .map_err(FaultLimitError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<Served, FaultLimitError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| FaultLimitError::HandlerPanicked)?,
            None => Err(FaultLimitError::HandlerPanicked),
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_loop(
    uffd: &Uffd,
    service: &Service,
    stop: &AtomicBool,
    loader: i32,
) -> Result<Served, FaultLimitError> {
    let mut vcpu = new_histogram()?;
    let mut loader_faults = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(uffd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, a bounded timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FaultLimitError::Poll(e));
        }
        if n == 0 {
            continue;
        }
        while let Some(ev) = uffd.read_event().map_err(|source| FaultLimitError::Uffd {
            what: "read".into(),
            source,
        })? {
            let t0 = Instant::now();
            let Event::Pagefault {
                addr, thread_id, ..
            } = ev
            else {
                continue;
            };
            let page = (addr as u64) & !(PAGE_SIZE_4K - 1);
            serve_one(uffd, service, page)?;
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if thread_id.as_raw() == loader {
                loader_faults += 1;
            } else {
                vcpu.saturating_record(ns.max(1));
            }
        }
    }
    Ok(Served {
        vcpu,
        loader_faults,
    })
}

/// Maps the 4 KiB page at `page` (a page of a registered range) and wakes its waiters. EAGAIN
/// (the address space changing under the ioctl) is retried by the engine's own helpers, for at
/// most [`EAGAIN_PATIENCE`].
fn serve_one(uffd: &Uffd, service: &Service, page: u64) -> Result<(), FaultLimitError> {
    let len = PAGE_SIZE_4K as usize;
    let deadline = Instant::now() + EAGAIN_PATIENCE;
    let give_up = || Instant::now() >= deadline;
    let (ioctl, served) = match service {
        Service::Continue => (
            "UFFDIO_CONTINUE",
            sys::uffd_ioctl(
                || uffd.r#continue(page as *mut libc::c_void, len, true),
                give_up,
            )
            .0
            .map(|_| sys::Copied::Done { eagain: 0 }),
        ),
        Service::Copy(zero) => (
            "UFFDIO_COPY",
            // SAFETY: `page` is a 4 KiB page of a range registered in MISSING mode with `uffd`
            // (anon guest RAM, which only the guest uses); UFFDIO_COPY never replaces a page
            // that is there (EEXIST).
            unsafe { sys::uffd_copy(uffd, &zero[..], page as usize, true, give_up) },
        ),
    };
    let exists = match served {
        Ok(sys::Copied::Done { .. }) => false,
        Ok(sys::Copied::Exists) => true,
        // Two vCPUs faulted on the same page and the first ioctl mapped it: wake the rest.
        Err(ref e) if uffd_errno(e) == Some(libc::EEXIST) => true,
        Err(source) => {
            return Err(FaultLimitError::Serve {
                ioctl,
                addr: page,
                source,
            })
        }
    };
    if exists {
        uffd.wake(page as *mut libc::c_void, len)
            .map_err(|source| FaultLimitError::Serve {
                ioctl: "UFFDIO_WAKE",
                addr: page,
                source,
            })?;
    }
    Ok(())
}

/// Puts every 4 KiB page of every region in the page cache (a store through the alias, which
/// nothing has registered), so that the guest's first touch of any page through the primary
/// mapping is a MINOR fault and `UFFDIO_CONTINUE` has nothing to allocate or zero.
fn populate_page_cache(ram: &GuestRam) {
    for r in ram.regions() {
        let Some(alias) = &r.alias else { continue };
        for off in (0..alias.len()).step_by(PAGE_SIZE_4K as usize) {
            // SAFETY: `off` is inside the live read/write alias mapping; writing 0 over fresh
            // (zero) guest RAM leaves its contents unchanged.
            unsafe { alias.as_ptr().add(off).write_volatile(0) };
        }
    }
}

/// Registers the primary mapping of every region with `uffd` (MINOR for shmem, MISSING for
/// anon).
fn register(uffd: &Uffd, ram: &GuestRam, mode: RegisterMode) -> Result<(), FaultLimitError> {
    for r in ram.regions() {
        uffd.register_with_mode(r.primary.as_ptr().cast(), r.primary.len(), mode)
            .map_err(|source| FaultLimitError::Uffd {
                what: format!(
                    "registration of guest RAM {:#x}+{:#x} ({} bytes at host {:#x})",
                    r.guest_addr,
                    r.size,
                    r.primary.len(),
                    r.primary.addr()
                ),
                source,
            })?;
    }
    Ok(())
}

/// Sub-buckets per power of two of guests whose `WORKLOAD HIST` lines state no `sub=`.
pub const LEGACY_GUEST_SUB_BUCKETS: u64 = 8;

/// The guest's bucketed histogram as printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestBuckets {
    /// Sub-buckets per power of two (`sub=`, a power of two; [`LEGACY_GUEST_SUB_BUCKETS`]
    /// when the line states none).
    pub sub: u64,
    /// (lower bound ns, count), non-empty buckets.
    pub buckets: Vec<(u64, u64)>,
}

/// Parses the guest's whole-run `first_touch` histogram (the last `WORKLOAD HIST
/// name=first_touch` line without `pass=`) into (lower bound ns, count) buckets and the
/// bucket scheme it states.
pub fn parse_first_touch(text: &str) -> Result<Option<GuestBuckets>, FaultLimitError> {
    let Some(line) = text
        .lines()
        .rev()
        .filter(|l| l.starts_with("WORKLOAD HIST ") && !l.contains(" pass="))
        .find(|l| l.split_whitespace().any(|w| w == "name=first_touch"))
    else {
        return Ok(None);
    };
    let mut buckets = Vec::new();
    let mut sub = LEGACY_GUEST_SUB_BUCKETS;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("sub=") {
            sub = v
                .parse::<u64>()
                .ok()
                .filter(|n| n.is_power_of_two())
                .ok_or_else(|| FaultLimitError::Bucket(word.into()))?;
        } else if let Some(unit) = word.strip_prefix("unit=") {
            if unit != "ns" {
                return Err(FaultLimitError::Unit { unit: unit.into() });
            }
        } else if let Some(list) = word.strip_prefix("buckets=") {
            for b in list.split(',').filter(|b| !b.is_empty()) {
                let (lo, n) = b
                    .split_once(':')
                    .ok_or_else(|| FaultLimitError::Bucket(b.into()))?;
                let lo = lo
                    .parse::<u64>()
                    .map_err(|_| FaultLimitError::Bucket(b.into()))?;
                let n = n
                    .parse::<u64>()
                    .map_err(|_| FaultLimitError::Bucket(b.into()))?;
                buckets.push((lo, n));
            }
        }
    }
    Ok(Some(GuestBuckets { sub, buckets }))
}

/// Width of the workload guest's histogram bucket whose lower bound is `lo` in the scheme with
/// `sub` (a power of two) sub-buckets per power of two: one per value below `sub`, then `sub`
/// per power of two (the guest's `hist.rs`; the harness decodes it the same way).
fn guest_bucket_width(lo: u64, sub: u64) -> u64 {
    if lo < sub {
        1
    } else {
        1u64 << ((63 - lo.leading_zeros()) - sub.trailing_zeros())
    }
}

/// A histogram of the guest's buckets, each sample at its bucket's midpoint (so a percentile is
/// off by at most half a bucket: 1/64 of the value with 32 sub-buckets).
fn guest_histogram(g: &GuestBuckets) -> Result<Histogram<u64>, FaultLimitError> {
    let mut h = new_histogram()?;
    for &(lo, n) in g.buckets.iter().filter(|(_, n)| *n > 0) {
        h.saturating_record_n(
            lo.saturating_add(guest_bucket_width(lo, g.sub) / 2).max(1),
            n,
        );
    }
    Ok(h)
}

/// Boots the workload guest with every data page behind a raw userfault handler that has the
/// page already local, and reports the round trip as the guest and as the handler saw it.
pub fn measure(cfg: &FaultLimitConfig) -> Result<FaultLimitReport, FaultLimitError> {
    if !cfg.kernel.is_file() {
        return Err(FaultLimitError::KernelMissing(cfg.kernel.clone()));
    }
    let measured = measured_backing(cfg.backing);
    // Check the size against the requested backing too, so a size that backing would refuse
    // is refused here as well.
    GuestRam::validate(cfg.backing, cfg.memory)?;
    GuestRam::validate(measured, cfg.memory)?;
    signals::install().map_err(FaultLimitError::Signals)?;
    let cmdline = cfg
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());

    let captured = Captured::default();
    let console = Console::from_writer(Box::new(captured.clone()));
    let mut vm = Vm::new(measured, cfg.memory, cfg.vcpus, console)?;

    let (mode, service, features) = match measured {
        Backing::Anon => (
            RegisterMode::MISSING,
            Service::Copy(Box::new([0u8; 4096])),
            FeatureFlags::THREAD_ID,
        ),
        _ => {
            populate_page_cache(vm.ram());
            (
                RegisterMode::MINOR,
                Service::Continue,
                FeatureFlags::THREAD_ID
                    | FeatureFlags::from_bits_retain(userfaultfd_sys::UFFD_FEATURE_MINOR_SHMEM),
            )
        }
    };
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM faults guest RAM in from the kernel (get_user_pages), not from user mode.
        .user_mode_only(false)
        .require_features(features)
        .create()
        .map_err(|source| FaultLimitError::Uffd {
            what: format!("creation with features {features:?}"),
            source,
        })?;
    register(&uffd, vm.ram(), mode)?;
    let handler = Handler::start(Arc::new(uffd), service, nix::unistd::gettid().as_raw())?;

    let boot = vm.boot(&BootConfig {
        kernel: cfg.kernel.clone(),
        initrd: None,
        cmdline: Some(cmdline.clone()),
        vcpus: cfg.vcpus,
        tsc_khz: None,
    });
    let outcome = match boot {
        Ok(_) => launcher::wait(&vm),
        Err(e) => Err(LaunchError::Vm(e)),
    };
    // The handler keeps serving until every vCPU thread is gone: a vCPU waiting in a userfault
    // leaves only when its page is served.
    vm.shutdown();
    let served = handler.finish()?;
    drop(vm);

    let text = captured.text();
    match outcome {
        Ok(RunOutcome::GuestExit(0)) => {}
        Ok(RunOutcome::GuestExit(code)) => {
            return Err(FaultLimitError::GuestFailed {
                code,
                tail: tail(&text),
            })
        }
        Ok(RunOutcome::Signalled(s)) => return Err(FaultLimitError::Signalled(s)),
        Ok(RunOutcome::MigratedAway | RunOutcome::ShutDown) => {
            return Err(FaultLimitError::MigratedAway)
        }
        Err(source) => {
            return Err(FaultLimitError::Run {
                source,
                tail: tail(&text),
            })
        }
    }
    let buckets = parse_first_touch(&text)?.ok_or_else(|| FaultLimitError::NoHistogram {
        kernel: cfg.kernel.clone(),
        tail: tail(&text),
    })?;
    let guest = guest_histogram(&buckets)?;
    if guest.is_empty() {
        return Err(FaultLimitError::NoSamples);
    }
    let note = (measured != cfg.backing).then(|| {
        format!(
            "measured on shmem of the same size: the 4k-staged strategy serves every {} fault \
             from a shmem staging mapping (MINOR + 4 KiB UFFDIO_CONTINUE)",
            cfg.backing
        )
    });
    Ok(FaultLimitReport {
        requested_backing: cfg.backing,
        measured_backing: measured,
        service: service_name(measured).to_string(),
        note,
        memory_bytes: cfg.memory,
        vcpus: cfg.vcpus,
        cmdline,
        guest_us: LatencySummary::of_ns(&guest),
        vmm_us: LatencySummary::of_ns(&served.vcpu),
        loader_faults: served.loader_faults,
        guest_sub_buckets: buckets.sub,
        guest_buckets_ns: buckets.buckets,
        vmm_histogram_ns: served
            .vcpu
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_touch_line_is_parsed_and_pass_lines_skipped() {
        let text = "WORKLOAD start vcpus=1\n\
                    WORKLOAD HIST name=access_slow pass=1 unit=ns buckets=4096:3\n\
                    WORKLOAD HIST name=first_touch unit=ns buckets=16384:10,20480:5\n\
                    WORKLOAD HIST name=access_slow unit=ns buckets=\n";
        let b = parse_first_touch(text).unwrap().unwrap();
        assert_eq!(b.buckets, vec![(16384, 10), (20480, 5)]);
        assert_eq!(b.sub, LEGACY_GUEST_SUB_BUCKETS);
        let h = guest_histogram(&b).unwrap();
        assert_eq!(h.len(), 15);
        // Without `sub=`: 8 per power of two, 16384 is in a bucket 2048 wide: midpoint 17408.
        assert!(h.equivalent(h.value_at_quantile(0.5), 17408));
        // The current guest states 32: 16384 is in a bucket 512 wide, midpoint 16640.
        let b = parse_first_touch(
            "WORKLOAD HIST name=first_touch unit=ns sub=32 buckets=16384:10,20480:5\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(b.sub, 32);
        let h = guest_histogram(&b).unwrap();
        assert!(h.equivalent(h.value_at_quantile(0.5), 16640));
        assert!(matches!(
            parse_first_touch("WORKLOAD HIST name=first_touch unit=ns sub=3 buckets=8:1"),
            Err(FaultLimitError::Bucket(_))
        ));
        assert!(parse_first_touch("nothing").unwrap().is_none());
        assert!(matches!(
            parse_first_touch("WORKLOAD HIST name=first_touch unit=cycles buckets=8:1"),
            Err(FaultLimitError::Unit { .. })
        ));
        assert!(matches!(
            parse_first_touch("WORKLOAD HIST name=first_touch unit=ns buckets=8-1"),
            Err(FaultLimitError::Bucket(_))
        ));
    }

    #[test]
    fn huge_backings_are_measured_on_shmem() {
        assert_eq!(measured_backing(Backing::Hugetlb1g), Backing::Shmem);
        assert_eq!(measured_backing(Backing::GuestMemfd), Backing::Shmem);
        assert_eq!(measured_backing(Backing::Anon), Backing::Anon);
        assert_eq!(guest_bucket_width(7, 8), 1);
        assert_eq!(guest_bucket_width(8, 8), 1);
        assert_eq!(guest_bucket_width(16, 8), 2);
        assert_eq!(guest_bucket_width(31, 32), 1);
        assert_eq!(guest_bucket_width(64, 32), 2);
        assert_eq!(guest_bucket_width(1024, 32), 32);
    }
}
