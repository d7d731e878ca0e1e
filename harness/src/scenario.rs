//! Scenarios (backing x strategy x access pattern x link), the `--all` and `--quick` lists, and
//! the runner that drives real source and destination VMM processes through the `vmm` CLI:
//!
//! - destination: `vmm receive --listen ADDR --backing B --granularity G --stats-json PATH`
//! - source: `vmm run --kernel K --memory SIZE --vcpus N --backing B --cmdline "..."
//!   --api-socket SOCK`, then `vmm migrate --api-socket SOCK --to ADDR --mode postcopy --json`.
//!
//! For namespace links the source runs in the `src` namespace and the destination in `dst`
//! (`ip netns exec`); with a delay, `migrate --to` points at a [`DelayProxy`] in `src` that
//! forwards to the destination. A link with a [`LinkFault`] puts a fault-injecting
//! [`Relay`] (run inside the harness process) in front of that, armed right before `vmm
//! migrate` starts.

use crate::delay_proxy::{DelayProxy, ProxyError};
use crate::guest_output::{self, DestinationStats, GuestLine, GuestOutput, MigrateSummary};
use crate::histogram::{self, LatencyHistogram, Percentiles, ShortSummary};
use crate::hugepool::HugePool;
use crate::limits::{self, EchoServer, LinkLimits, VcpuFaultLimit};
use crate::netns::{NetnsPair, Side};
use crate::probe;
use crate::process::{Line, Proc};
use crate::procmem::{MemPeaks, MemSampler};
use crate::results::{self, kind, Results, ScenarioResult, Status, RESULTS_VERSION};
use crate::secret::SecretFile;
use migration::relay::{Relay, RelayError};
use migration::types::{Backing, Granularity, Mode};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The backings the scenarios cover (anon cannot be postcopied into shared staging): the
/// VMM's own [`Backing`], the `--backing` value.
pub const BACKINGS: [Backing; 4] = [
    Backing::Shmem,
    Backing::Hugetlb2m,
    Backing::Hugetlb1g,
    Backing::GuestMemfd,
];

/// The hugetlb page size of `backing` in KiB, if it is a hugetlb backing.
pub fn huge_kib(backing: Backing) -> Option<u64> {
    backing.is_hugetlb().then(|| backing.page_size() / 1024)
}

/// Postcopy fault strategy on the destination (`vmm receive --granularity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// 4 KiB faults through a shmem staging mapping, collapsed afterwards.
    FourKStaged,
    /// Whole huge page per fault.
    Huge,
    /// The kernel's own 4 KiB faults on huge pages (HGM) / guest_memfd (userfaultfd) where the
    /// destination's probe finds them; otherwise the destination falls back to 4k-staged and
    /// says why (results.json `native_fallback`).
    Native,
    /// Not ours: QEMU's postcopy (the peer, [`crate::peer`]), which requests whole host pages
    /// (4 KiB on shmem, the huge page on hugetlb).
    Qemu,
}

impl Strategy {
    /// The strategies of the full cross product (`--all`); native scenarios are added only
    /// where native can differ from 4k-staged (see [`all`]).
    pub const ALL: [Strategy; 2] = [Strategy::FourKStaged, Strategy::Huge];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::FourKStaged => "4k-staged",
            Strategy::Huge => "huge",
            Strategy::Native => "native",
            Strategy::Qemu => "qemu",
        }
    }

    /// The destination's `--granularity` (None for QEMU, which is not ours).
    pub fn granularity(self) -> Option<Granularity> {
        match self {
            Strategy::FourKStaged => Some(Granularity::FourK),
            Strategy::Huge => Some(Granularity::Huge),
            Strategy::Native => Some(Granularity::Native),
            Strategy::Qemu => None,
        }
    }

    /// What results.json records as the granularity: the `--granularity` value, or for QEMU
    /// what it requests (a host page).
    pub fn granularity_name(self) -> &'static str {
        self.granularity().map_or("host-page", Granularity::name)
    }
}

/// The workload guest's access pattern (`pattern=` on its command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Sequential,
    Random,
    HotSet,
}

impl Pattern {
    pub const ALL: [Pattern; 3] = [Pattern::Sequential, Pattern::Random, Pattern::HotSet];

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::HotSet => "hot-set",
        }
    }

    /// Guest passes to run for `passes` random-pattern passes' worth of time: a sequential or
    /// hot-set pass is several times faster than a random one (about 40 ms against 200-300 ms
    /// for 256 MiB here), and the source must still be running when the destination, which
    /// faults in hugetlb memory before it answers, is ready. 0 stays 0 (forever).
    pub fn passes_for(self, passes: u32) -> u32 {
        match self {
            Pattern::Random => passes,
            Pattern::Sequential | Pattern::HotSet => passes.saturating_mul(6),
        }
    }

    /// The value of the guest's `pattern=` option.
    pub fn guest_name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::HotSet => "hotset",
        }
    }
}

/// A fault a link injects into the migration, through a [`Relay`] the harness runs between
/// `vmm migrate --to` and the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFault {
    /// Reset every connection (an RST to both ends) once, in the middle of the postcopy push:
    /// when [`RESET_AT_FRACTION`] of the guest RAM size has gone source->destination through
    /// the relay since `vmm migrate` started.
    ResetOnce,
    /// Forward nothing, in either direction, for [`BLACKHOLE_FOR`] once, from the same point:
    /// no reset, no FIN, as a path that silently drops packets. Both sides must notice through
    /// their heartbeats (liveness bound 1 s).
    BlackholeOnce,
}

/// How long [`LinkFault::BlackholeOnce`] forwards nothing: longer than the liveness bound, so
/// both sides detect the dead link and pause.
pub const BLACKHOLE_FOR: Duration = Duration::from_millis(1500);

/// [`LinkFault::ResetOnce`] fires after this fraction of the guest RAM size went
/// source->destination: past the switchover (the device state is small), well before the end
/// of the push.
pub const RESET_AT_FRACTION: f64 = 1.0 / 3.0;

impl LinkFault {
    /// The suffix of the link's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkFault::ResetOnce => "reset1",
            LinkFault::BlackholeOnce => "blackhole1",
        }
    }

    /// Bytes source->destination after which the fault fires, for `memory_mib` of guest RAM.
    pub fn fires_after_bytes(self, memory_mib: u64) -> u64 {
        ((memory_mib << 20) as f64 * RESET_AT_FRACTION) as u64
    }

    /// What the fault does, in words (results.json `link_fault`).
    pub fn describe(self, memory_mib: u64) -> String {
        match self {
            LinkFault::ResetOnce => format!(
                "reset every connection once, after {} bytes source->destination ({:.0}% of the \
                 guest RAM size) since vmm migrate started",
                self.fires_after_bytes(memory_mib),
                RESET_AT_FRACTION * 100.0
            ),
            LinkFault::BlackholeOnce => format!(
                "forward nothing (no reset) for {} ms once, after {} bytes source->destination \
                 ({:.0}% of the guest RAM size) since vmm migrate started",
                BLACKHOLE_FOR.as_millis(),
                self.fires_after_bytes(memory_mib),
                RESET_AT_FRACTION * 100.0
            ),
        }
    }
}

/// The link between source and destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// Two namespaces joined by veth (else loopback in the harness's own namespace).
    pub netns: bool,
    /// TBF cap per direction.
    pub rate_mbit: Option<u64>,
    /// Added one-way delay per direction (userspace proxy).
    pub delay: Duration,
    /// A fault injected by a relay in front of the destination (postcopy only).
    pub fault: Option<LinkFault>,
    /// Both channels over TLS 1.3 with mutual certificates (`vmm tls-init`, `--tls-dir`).
    pub tls: bool,
}

impl Link {
    pub fn loopback() -> Self {
        Self {
            name: "loopback".into(),
            netns: false,
            rate_mbit: None,
            delay: Duration::ZERO,
            fault: None,
            tls: false,
        }
    }

    /// This link with `fault` injected (its name gets the fault's suffix, e.g.
    /// `loopback-reset1`).
    pub fn with_fault(mut self, fault: LinkFault) -> Self {
        self.name = format!("{}-{}", self.name, fault.as_str());
        self.fault = Some(fault);
        self
    }

    /// This link with both migration channels over TLS (its name gets `-tls`).
    pub fn with_tls(mut self) -> Self {
        self.name = format!("{}-tls", self.name);
        self.tls = true;
        self
    }

    /// veth between namespaces, capped at `gbit` Gbit/s, with `delay_us` one-way delay.
    pub fn veth(gbit: u64, delay_us: u64) -> Self {
        let mut name = format!("veth-{gbit}g");
        if delay_us > 0 {
            name.push_str(&format!("-{delay_us}us"));
        }
        Self {
            name,
            netns: true,
            rate_mbit: Some(gbit * 1000),
            delay: Duration::from_micros(delay_us),
            fault: None,
            tls: false,
        }
    }

    /// Every link of `--all`.
    pub fn all() -> Vec<Link> {
        vec![
            Link::loopback(),
            Link::veth(10, 0),
            Link::veth(1, 0),
            Link::veth(10, 500),
        ]
    }
}

/// One measured configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub backing: Backing,
    pub strategy: Strategy,
    pub pattern: Pattern,
    pub link: Link,
    pub memory_mib: u64,
    /// vCPUs of the guest when this scenario sets them (a sweep point), else `--vcpus`.
    pub vcpus: Option<u32>,
    /// Guest passes (random pattern) when this scenario sets them (a sweep point), else
    /// `--passes`.
    pub passes: Option<u32>,
    /// The scenario a sweep point was expanded from (its name without the point's suffix);
    /// `None` for an ordinary scenario. See [`crate::sweep`].
    pub sweep_of: Option<String>,
    /// Both VMMs run with `--migration-cpus` (the host's last CPU): bulk threads there, the
    /// vCPUs and the fault path on the others. Name suffix `-pinned`.
    pub pinned: bool,
}

impl Scenario {
    pub fn new(
        backing: Backing,
        strategy: Strategy,
        pattern: Pattern,
        link: Link,
        memory_mib: u64,
    ) -> Self {
        Self {
            name: format!(
                "{}-{}-{}-{}",
                backing.name(),
                strategy.as_str(),
                pattern.as_str(),
                link.name
            ),
            backing,
            strategy,
            pattern,
            link,
            memory_mib,
            vcpus: None,
            passes: None,
            sweep_of: None,
            pinned: false,
        }
    }

    /// The same scenario with the migration's bulk threads on a CPU of their own
    /// (`--migration-cpus`).
    pub fn pinned(mut self) -> Self {
        self.pinned = true;
        self.name.push_str("-pinned");
        self
    }

    /// The vCPUs this scenario runs with under `cfg` (its own, else `--vcpus`).
    pub fn vcpus_under(&self, cfg: &RunConfig) -> u32 {
        self.vcpus.unwrap_or(cfg.vcpus)
    }

    /// Free huge pages this scenario needs: (page KiB, pages) for source + destination.
    pub fn huge_pages_needed(&self) -> Vec<(u64, u64)> {
        match huge_kib(self.backing) {
            Some(kib) => vec![(kib, 2 * (self.memory_mib * 1024).div_ceil(kib))],
            None => Vec::new(),
        }
    }
}

/// Every combination: 4 backings x 2 strategies x 3 patterns x 4 links, 1 GiB of guest RAM;
/// plus the native strategy on loopback for the backings it can serve differently from
/// 4k-staged (hugetlb, guest_memfd; shmem is served by the kernel's own 4 KiB path anyway);
/// plus one postcopy-recovery scenario (a link reset mid-push, see [`reset_scenario`]).
pub fn all() -> Vec<Scenario> {
    let mut v = Vec::new();
    for link in Link::all() {
        for b in BACKINGS {
            for s in Strategy::ALL {
                for p in Pattern::ALL {
                    v.push(Scenario::new(b, s, p, link.clone(), 1024));
                }
            }
        }
    }
    for b in [Backing::Hugetlb2m, Backing::Hugetlb1g, Backing::GuestMemfd] {
        for p in Pattern::ALL {
            v.push(Scenario::new(
                b,
                Strategy::Native,
                p,
                Link::loopback(),
                1024,
            ));
        }
    }
    v.extend(recovery_scenarios());
    v.extend(tls_scenarios(1024));
    v.extend(pinned_scenarios([1024; 3]));
    let twins = peer_twins(&v);
    v.extend(twins);
    v
}

/// The QEMU scenario beside each of ours in `list` that QEMU can run the same way: same
/// backing (shmem, hugetlb 2 MiB or 1 GiB; QEMU has no guest_memfd postcopy), pattern, link
/// and memory size; no injected link fault and no TLS (QEMU's TLS and recovery are not what
/// these scenarios compare). Each once, in the order of `list`.
pub fn peer_twins(list: &[Scenario]) -> Vec<Scenario> {
    let mut out: Vec<Scenario> = Vec::new();
    for s in list {
        let comparable = s.strategy != Strategy::Qemu
            && matches!(
                s.backing,
                Backing::Shmem | Backing::Hugetlb2m | Backing::Hugetlb1g
            )
            && s.link.fault.is_none()
            && !s.link.tls;
        if !comparable {
            continue;
        }
        let twin = Scenario::new(
            s.backing,
            Strategy::Qemu,
            s.pattern,
            s.link.clone(),
            s.memory_mib,
        );
        if !out.iter().any(|t| t.name == twin.name) && !list.iter().any(|t| t.name == twin.name) {
            out.push(twin);
        }
    }
    out
}

/// The cost of TLS: hugetlb-2m 4k-staged random with both channels over TLS 1.3, on loopback
/// and on a 10 Gbit/s veth pair, each beside the same scenario in plaintext (the report pairs
/// `NAME-tls` with `NAME`: same backing, pattern, link and RAM size; `--quick` runs both
/// members of each pair at 256 MiB, `--all` at 1024 MiB like its other scenarios).
fn tls_scenarios(memory_mib: u64) -> Vec<Scenario> {
    [Link::loopback(), Link::veth(10, 0)]
        .into_iter()
        .map(|l| {
            Scenario::new(
                Backing::Hugetlb2m,
                Strategy::FourKStaged,
                Pattern::Random,
                l.with_tls(),
                memory_mib,
            )
        })
        .collect()
}

/// Postcopy recovery: the link is reset, or black-holed, once in the middle of the postcopy
/// push (256 MiB of guest RAM, in `--all` too: the figure of interest is the outage, not the
/// push).
fn recovery_scenarios() -> Vec<Scenario> {
    [LinkFault::ResetOnce, LinkFault::BlackholeOnce]
        .into_iter()
        .map(|f| {
            Scenario::new(
                Backing::Hugetlb2m,
                Strategy::FourKStaged,
                Pattern::Random,
                Link::loopback().with_fault(f),
                256,
            )
        })
        .collect()
}

/// The `--quick` subset (each scenario well under half a minute): the loopback latency target
/// on every backing at 4 KiB, 4k-staged vs huge on 2 MiB and 1 GiB pages, one capped
/// namespace link for throughput against raw TCP, postcopy recovery (a link reset, a
/// black-hole), and the TLS pairs on loopback and veth.
pub fn quick() -> Vec<Scenario> {
    use Backing::*;
    use Pattern::*;
    use Strategy::*;
    let lo = Link::loopback;
    vec![
        Scenario::new(Shmem, FourKStaged, Random, lo(), 256),
        Scenario::new(Hugetlb2m, FourKStaged, Random, lo(), 256),
        Scenario::new(Hugetlb2m, Huge, Random, lo(), 256),
        // Native: where the kernel lacks HGM it falls back to 4k-staged; the run records why.
        Scenario::new(Hugetlb2m, Native, Random, lo(), 256),
        Scenario::new(Hugetlb1g, FourKStaged, Random, lo(), 1024),
        Scenario::new(Hugetlb1g, Huge, Random, lo(), 1024),
        Scenario::new(GuestMemfd, FourKStaged, Random, lo(), 256),
        Scenario::new(Hugetlb2m, FourKStaged, Sequential, Link::veth(1, 0), 256),
        // The plaintext half of the veth TLS pair (the loopback half is above).
        Scenario::new(Hugetlb2m, FourKStaged, Random, Link::veth(10, 0), 256),
    ]
    .into_iter()
    .chain(recovery_scenarios())
    .chain(tls_scenarios(256))
    .chain(pinned_scenarios([256, 256, 1024]))
    .collect()
}

/// The 4k-staged loopback scenarios on shmem and hugetlb again, with the migration's bulk
/// threads on a CPU of their own (`--migration-cpus`): beside the unpinned ones, what pinning
/// gains on the fault path and costs the background transfer. `mib`: the guest RAM of each
/// (shmem, hugetlb-2m, hugetlb-1g), as their unpinned twins have it.
fn pinned_scenarios(mib: [u64; 3]) -> Vec<Scenario> {
    use Backing::*;
    [Shmem, Hugetlb2m, Hugetlb1g]
        .into_iter()
        .zip(mib)
        .map(|(b, mib)| {
            Scenario::new(
                b,
                Strategy::FourKStaged,
                Pattern::Random,
                Link::loopback(),
                mib,
            )
            .pinned()
        })
        .collect()
}

/// The `--migration-cpus` list of a pinned scenario: the last CPU this process may run on,
/// if that leaves one CPU per vCPU for the vCPUs and the fault path.
pub fn pinned_cpu_list(vcpus: u32) -> Result<String, String> {
    let allowed = migration::cpu_placement::CpuList::allowed().map_err(|e| e.to_string())?;
    let last = allowed.last().map(|c| c.to_string()).unwrap_or_default();
    if allowed.len() <= vcpus as usize {
        return Err(format!(
            "a CPU of its own for the bulk threads needs more CPUs than the {vcpus} vCPU(s) \
             (this process may run on {allowed})"
        ));
    }
    Ok(last)
}

/// Drives a [`LinkFault::BlackholeOnce`]: a thread that waits until enough bytes crossed the
/// relay, then black-holes it for [`BLACKHOLE_FOR`]. Dropping it stops the thread (and ends a
/// black-hole in progress).
struct BlackholeDriver {
    stop: Arc<AtomicBool>,
    fired: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackholeDriver {
    fn arm(relay: Arc<Relay>, after_bytes: u64) -> Result<Self, RunError> {
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, fired2) = (stop.clone(), fired.clone());
        let start = relay.forwarded().0;
        let thread = std::thread::Builder::new()
            .name("harness-blackhole".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if relay.forwarded().0.saturating_sub(start) >= after_bytes {
                        relay.set_blackhole(true);
                        fired2.fetch_add(1, Ordering::Relaxed);
                        let until = Instant::now() + BLACKHOLE_FOR;
                        while Instant::now() < until && !stop2.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        relay.set_blackhole(false);
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            })
            .map_err(io_err("starting the black-hole thread"))?;
        Ok(Self {
            stop,
            fired,
            thread: Some(thread),
        })
    }

    fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }
}

impl Drop for BlackholeDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A scenario name that no list has.
#[derive(Debug, thiserror::Error)]
#[error("no scenario named {name:?} (see `harness list`)")]
pub struct UnknownScenario {
    pub name: String,
}

/// Looks scenarios up by name in `--all` (and the quick list, whose memory sizes differ).
pub fn by_names(names: &[String]) -> Result<Vec<Scenario>, UnknownScenario> {
    let mut known = quick();
    known.extend(peer_twins(&quick()));
    known.extend(all());
    names
        .iter()
        .map(|n| {
            known
                .iter()
                .find(|s| &s.name == n)
                .cloned()
                .ok_or_else(|| UnknownScenario { name: n.clone() })
        })
        .collect()
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub out: PathBuf,
    pub vcpus: u32,
    /// Guest `passes=` (0 = forever: the harness stops the destination, and the guest never
    /// prints its histograms).
    pub passes: u32,
    /// With `passes = 0`: destination passes to wait for after the migration, then stop it.
    pub post_passes: usize,
    pub quick: bool,
    pub uffd_samples: usize,
    pub rtt_samples: usize,
    pub throughput_for: Duration,
    /// Longest wait for the guest to start, the migration, and the destination to finish.
    pub phase_timeout: Duration,
}

impl RunConfig {
    /// The phase timeout for `memory_mib` of guest RAM: `phase_timeout` per GiB, never less
    /// than `phase_timeout` (guest start, the push and the guest's passes all grow with the
    /// RAM size; 1 GiB and below keep the configured value).
    pub fn phase_timeout_for(&self, memory_mib: u64) -> Duration {
        let gib = u32::try_from(memory_mib.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        self.phase_timeout.saturating_mul(gib)
    }

    /// This configuration as scenario `s` runs under it: its vCPUs and passes (a sweep point
    /// sets them) and a phase timeout scaled to its RAM size.
    pub fn for_scenario(&self, s: &Scenario) -> RunConfig {
        RunConfig {
            vcpus: s.vcpus_under(self),
            passes: s.passes.unwrap_or(self.passes),
            phase_timeout: self.phase_timeout_for(s.memory_mib),
            ..self.clone()
        }
    }
}

/// Errors that end a scenario (recorded in its result) or a whole link.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Limit(#[from] limits::LimitError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    #[error(transparent)]
    Pool(#[from] crate::hugepool::PoolError),
    #[error(transparent)]
    Parse(#[from] crate::guest_output::ParseError),
    #[error(transparent)]
    Histogram(#[from] histogram::HistogramError),
    #[error(transparent)]
    Results(#[from] results::ResultsError),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Scenario(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// Everything set up once per link: namespaces, echo server (plus a delay proxy in front of it
/// for delayed links, and a relay, never armed, in front of that for links with a fault: the
/// limits are those of the relayed path) and the link's measured limits. Fields drop in order:
/// relay, proxy and server before the namespaces.
pub(crate) struct LinkEnv {
    _echo_relay: Option<Relay>,
    _echo_proxy: Option<DelayProxy>,
    _echo: EchoServer,
    pub(crate) limits: LinkLimits,
    pub(crate) pair: Option<NetnsPair>,
    pub(crate) link: Link,
}

impl LinkEnv {
    fn new(link: &Link, cfg: &RunConfig) -> Result<Self, RunError> {
        let pair = if link.netns {
            Some(NetnsPair::create(link.rate_mbit)?)
        } else {
            None
        };
        let delay = link.delay;
        let (echo, proxy, target) = match &pair {
            Some(p) => {
                let dst = SocketAddr::new(p.ip(Side::Dst).into(), 0);
                let echo = p.run_in(Side::Dst, move || EchoServer::start(dst))??;
                let (proxy, target) = if delay.is_zero() {
                    (None, echo.addr())
                } else {
                    let listen = SocketAddr::new(p.ip(Side::Src).into(), 0);
                    let up = echo.addr();
                    let proxy =
                        p.run_in(Side::Src, move || DelayProxy::start(listen, up, delay))??;
                    let a = proxy.addr();
                    (Some(proxy), a)
                };
                (echo, proxy, target)
            }
            None => {
                let echo = EchoServer::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))?;
                let (proxy, target) = if delay.is_zero() {
                    (None, echo.addr())
                } else {
                    let proxy = DelayProxy::start(
                        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
                        echo.addr(),
                        delay,
                    )?;
                    let a = proxy.addr();
                    (Some(proxy), a)
                };
                (echo, proxy, target)
            }
        };
        // The migration of a link with a fault goes through a relay: measure through one too.
        let relay = match link.fault {
            None => None,
            Some(_) => Some(start_relay(pair.as_ref(), target)?),
        };
        let target = relay.as_ref().map_or(target, Relay::addr);
        let (n, t, v) = (cfg.rtt_samples, cfg.throughput_for, cfg.vcpus);
        let limits = match &pair {
            Some(p) => p.run_in(Side::Src, move || limits::measure_link(target, n, t, v))??,
            None => limits::measure_link(target, n, t, v)?,
        };
        Ok(Self {
            _echo_relay: relay,
            _echo_proxy: proxy,
            _echo: echo,
            limits,
            pair,
            link: link.clone(),
        })
    }

    /// A command running `program` on one side.
    pub(crate) fn command(&self, side: Side, program: &Path) -> Command {
        match &self.pair {
            Some(p) => p.command(side, program.as_os_str()),
            None => Command::new(program),
        }
    }

    pub(crate) fn dst_ip(&self) -> IpAddr {
        match &self.pair {
            Some(p) => p.ip(Side::Dst).into(),
            None => Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// The network device the source transmits on, as named inside its namespace.
    pub(crate) fn src_device(&self) -> String {
        match &self.pair {
            Some(p) => p.veth_name(Side::Src).to_string(),
            None => "lo".into(),
        }
    }
}

/// A relay forwarding to `upstream`, listening on the source side: in the `src` namespace on
/// namespace links (its threads inherit it), else on 127.0.0.1.
fn start_relay(pair: Option<&NetnsPair>, upstream: SocketAddr) -> Result<Relay, RunError> {
    Ok(match pair {
        Some(p) => {
            let listen = SocketAddr::new(p.ip(Side::Src).into(), 0);
            p.run_in(Side::Src, move || Relay::start(listen, upstream))??
        }
        None => Relay::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0), upstream)?,
    })
}

/// Certificates for a TLS link: `vmm tls-init DIR --hosts IP --force` (a CA, a server
/// certificate for the destination's address `ip`, a client certificate).
fn tls_init(vmm: &Path, dir: &Path, ip: IpAddr) -> Result<(), RunError> {
    let out = Command::new(vmm)
        .arg("tls-init")
        .arg(dir)
        .args(["--hosts", &ip.to_string(), "--force"])
        .output()
        .map_err(io_err("running vmm tls-init"))?;
    if !out.status.success() {
        return Err(RunError::Scenario(format!(
            "vmm tls-init {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A free TCP port on `ip` in the harness's namespace, or a fixed one from a private range in
/// a fresh namespace (nothing else listens there).
pub(crate) fn pick_port(ip: IpAddr, netns: bool, n: usize) -> Result<u16, RunError> {
    if netns {
        return Ok(42_000 + (n % 10_000) as u16);
    }
    let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(io_err(format!("finding a free port on {ip}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_err(format!("finding a free port on {ip}")))
}

/// Whether process `pid`'s network namespace has a TCP socket listening on `port`
/// (`/proc/PID/net/tcp`, state 0A).
fn is_listening(pid: u32, port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let want = format!(":{port:04X}");
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Transmit byte counter of `dev` as seen by process `pid` (`/proc/PID/net/dev`).
fn tx_bytes(pid: u32, dev: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != dev {
            return None;
        }
        // receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes ...
        rest.split_whitespace().nth(8)?.parse().ok()
    })
}

/// Samples a device's transmit rate every 50 ms on a thread until stopped.
pub(crate) struct RateSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, f64)>>>,
}

impl RateSampler {
    /// `copies`: how many times the device carries each migration byte (2 on loopback through
    /// a relay in the harness: source->relay and relay->destination both go over `lo`); the
    /// rate is divided by it.
    pub(crate) fn start(pid: u32, dev: String, t0: Instant, copies: u32) -> Self {
        let copies = f64::from(copies.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut series = Vec::new();
            let mut last: Option<(Instant, u64)> = None;
            while !stop2.load(Ordering::Relaxed) {
                let now = Instant::now();
                if let Some(b) = tx_bytes(pid, &dev) {
                    if let Some((t, prev)) = last {
                        let dt = now.duration_since(t).as_secs_f64();
                        if dt > 0.0 {
                            let gbps = b.saturating_sub(prev) as f64 * 8.0 / dt / 1e9 / copies;
                            series.push((now.duration_since(t0).as_secs_f64(), gbps));
                        }
                    }
                    last = Some((now, b));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            series
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RateSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Progress reports from the runner.
pub trait Progress {
    /// Scenario `index` (0-based) of `total` starts.
    fn scenario(&mut self, index: usize, total: usize, name: &str);
    /// A phase inside the current scenario.
    fn phase(&mut self, msg: &str);
}

/// Runs every scenario and writes `cfg.out/results.json` plus the histogram files (not the
/// report: see [`crate::report::write_report`]). A failing scenario is recorded with its error
/// and the run goes on.
pub fn run(
    cfg: &RunConfig,
    scenarios: &[Scenario],
    progress: &mut dyn Progress,
) -> Result<Results, RunError> {
    std::fs::create_dir_all(cfg.out.join("raw")).map_err(io_err(format!(
        "creating {}",
        cfg.out.join("raw").display()
    )))?;
    progress.phase("probing the host");
    // Recorded, not required: a probe failure leaves `host_checks` empty (and the VMM then
    // says itself what it cannot do).
    let host = match probe::host(&cfg.vmm) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("{e}");
            Default::default()
        }
    };
    let host_checks = host.checks;
    let gmem_scenarios = scenarios
        .iter()
        .filter(|s| s.backing == Backing::GuestMemfd)
        .count();
    if let (Some(why), true) = (&host.no_guest_memfd, gmem_scenarios > 0) {
        tracing::warn!("SKIPPING {gmem_scenarios} guest_memfd scenario(s): {why}");
    }
    let secret = SecretFile::create(
        std::env::temp_dir().join(format!("harness-{}.secret", std::process::id())),
    )?;
    // QEMU scenarios need QEMU: without it they are left out, and the run says so.
    let qemu = crate::qemu::find();
    let skipped = scenarios
        .iter()
        .filter(|s| s.strategy == Strategy::Qemu)
        .count();
    let scenarios: Vec<Scenario> = if qemu.is_none() && skipped > 0 {
        tracing::warn!(
            "SKIPPING {skipped} QEMU scenario(s): {} not found on PATH (and \
             HARNESS_QEMU not set); install qemu-system-x86 (ci/install-deps.sh) to run them",
            crate::qemu::QEMU_BINARY
        );
        scenarios
            .iter()
            .filter(|s| s.strategy != Strategy::Qemu)
            .cloned()
            .collect()
    } else {
        scenarios.to_vec()
    };
    let scenarios = &scenarios[..];
    progress.phase("measuring the raw userfault round trip");
    let uffd = limits::uffd_round_trip(cfg.uffd_samples)?;
    // The vCPU userfault round trip, measured once per backing it is taken on (see
    // `limits::vcpu_limit_backing`), the first time a scenario needs it.
    let mut vcpu_limits: VcpuLimitCache = std::collections::BTreeMap::new();
    // One link set-up (and its limits, measured with as many spinning threads as the guest has
    // vCPUs) per (link, vCPUs): a sweep runs the same link with several vCPU counts.
    let mut links: Vec<(Link, u32)> = Vec::new();
    for s in scenarios {
        let key = (s.link.clone(), s.vcpus_under(cfg));
        if !links.contains(&key) {
            links.push(key);
        }
    }
    let mut out = Vec::new();
    let mut index = 0;
    for (link, vcpus) in links {
        progress.phase(&format!(
            "setting up link {} and measuring it ({vcpus} vCPU spinner(s))",
            link.name
        ));
        let link_cfg = RunConfig {
            vcpus,
            ..cfg.clone()
        };
        let env = LinkEnv::new(&link, &link_cfg);
        for s in scenarios
            .iter()
            .filter(|s| s.link == link && s.vcpus_under(cfg) == vcpus)
        {
            progress.scenario(index, scenarios.len(), &s.name);
            let scfg = cfg.for_scenario(s);
            let mut r = ScenarioResult::new(
                &s.name,
                s.backing.name(),
                s.strategy.as_str(),
                &s.link.name,
                s.pattern.as_str(),
            );
            r.vcpus = Some(scfg.vcpus);
            r.memory_mib = Some(s.memory_mib);
            r.sweep_of = s.sweep_of.clone();
            // A sweep point checks, right before it starts, that source and destination still
            // fit in the memory the host has now (other work may have taken some since the
            // list was made): a clear "not run" instead of an OOM kill half-way.
            let unfit = s
                .sweep_of
                .as_ref()
                .and_then(|_| crate::sweep::check_fits(s).err());
            let no_gmem = host
                .no_guest_memfd
                .as_ref()
                .filter(|_| s.backing == Backing::GuestMemfd);
            let no_cpu = if s.pinned {
                pinned_cpu_list(scfg.vcpus).err()
            } else {
                None
            };
            if let Some(why) = &no_cpu {
                tracing::warn!("SKIPPING {}: {why}", s.name);
            }
            let outcome = if let Some(why) = no_gmem.cloned().or(no_cpu) {
                r.status = Status::Skipped;
                r.error = Some(format!("not run: {why}"));
                Ok(())
            } else if let Some(why) = unfit {
                tracing::warn!("SKIPPING {}: {why}", s.name);
                Err(RunError::Scenario(format!("not run: {why}")))
            } else {
                let cfg = &scfg;
                let vcpu = vcpu_limit_for(cfg, s, &mut vcpu_limits, progress);
                match (&env, &qemu) {
                    (Ok(env), Some(qemu)) if s.strategy == Strategy::Qemu => {
                        crate::peer::run_qemu_one(
                            cfg, qemu, env, &uffd, vcpu, s, index, &mut r, progress,
                        )
                    }
                    (Ok(env), _) => run_one(
                        cfg,
                        env,
                        &uffd,
                        vcpu,
                        secret.path(),
                        s,
                        index,
                        &mut r,
                        progress,
                    ),
                    (Err(e), _) => Err(RunError::Scenario(format!("link {}: {e}", link.name))),
                }
            };
            if let Err(e) = outcome {
                r.status = Status::Failed;
                r.error = Some(e.to_string());
            }
            out.push(r);
            index += 1;
            // Keep what was measured so far even if a later scenario hangs the harness.
            Results {
                version: RESULTS_VERSION,
                quick: cfg.quick,
                host_checks: host_checks.clone(),
                scenarios: out.clone(),
            }
            .save(&cfg.out)?;
        }
    }
    Ok(Results {
        version: RESULTS_VERSION,
        quick: cfg.quick,
        host_checks,
        scenarios: out,
    })
}

/// The vCPU userfault round trip for scenario `s`'s backing, measured (`vmm fault-limit`) the
/// first time a backing needs it and cached in `cache`; an error is cached too.
fn vcpu_limit_for<'a>(
    cfg: &RunConfig,
    s: &Scenario,
    cache: &'a mut VcpuLimitCache,
    progress: &mut dyn Progress,
) -> Result<&'a VcpuFaultLimit, &'a limits::LimitError> {
    let on = limits::vcpu_limit_backing(s.backing.name());
    let entry = cache.entry((on, cfg.vcpus)).or_insert_with(|| {
        progress.phase(&format!(
            "measuring the raw vCPU userfault round trip on {on} with {} vCPU(s) (vmm \
             fault-limit)",
            cfg.vcpus
        ));
        // One vCPU count per run keeps the file name it always had; a sweep over vCPU counts
        // measures each and names the file by it.
        let file = match s.vcpus {
            None => format!("fault-limit-{on}.json"),
            Some(v) => format!("fault-limit-{on}-{v}vcpu.json"),
        };
        let save = cfg.out.join("raw").join(file);
        limits::vcpu_fault_limit(
            &cfg.vmm,
            &cfg.kernel,
            s.backing.name(),
            cfg.vcpus,
            cfg.phase_timeout,
            &save,
        )
        .inspect_err(|e| tracing::warn!("vCPU userfault limit on {on}: {e}"))
    });
    entry.as_ref()
}

/// The vCPU userfault round trip per backing it was measured on, or why it could not be.
type VcpuLimitCache =
    std::collections::BTreeMap<(&'static str, u32), Result<VcpuFaultLimit, limits::LimitError>>;

/// Records this run's limits on this link in `r` (and their histograms): the vCPU userfault
/// round trip as the guest sees it plus the TCP round trip (the thread one kept beside it).
pub(crate) fn record_limits(
    dir: &Path,
    env: &LinkEnv,
    uffd: &LatencyHistogram,
    vcpu: Result<&VcpuFaultLimit, &limits::LimitError>,
    r: &mut ScenarioResult,
) -> Result<(), RunError> {
    // Limits first: they are this run's, on this link. The limit is the vCPU userfault round
    // trip as the guest sees it plus the TCP round trip; the thread one is kept beside it.
    let thread_limit = histogram::convolve(uffd, &env.limits.tcp_rtt)?;
    r.uffd_rtt_us = Percentiles::us(uffd);
    r.tcp_rtt_us = Percentiles::us(&env.limits.tcp_rtt);
    r.thread_limit_us = Percentiles::us(&thread_limit);
    r.raw_throughput_gbps = Some(env.limits.throughput_gbps);
    r.raw_loaded_gbps = Some(env.limits.loaded_throughput_gbps);
    r.raw_memory_gbps = Some(env.limits.memory_throughput_gbps);
    results::save_histogram(dir, r, kind::UFFD, uffd)?;
    results::save_histogram(dir, r, kind::TCP_RTT, &env.limits.tcp_rtt)?;
    results::save_histogram(dir, r, kind::THREAD_LIMIT, &thread_limit)?;
    // The userfault round trip the limit is built on: the vCPU's, or the thread's if that
    // measurement failed.
    let (fault_rtt, limit) = match vcpu {
        Ok(v) => {
            r.limit_basis = "vcpu".into();
            r.vcpu_uffd_rtt_us = Percentiles::us(&v.guest);
            r.vcpu_uffd_vmm_us = Percentiles::us(&v.vmm);
            r.vcpu_uffd_backing = Some(v.backing.clone());
            r.vcpu_uffd_service = Some(v.service.clone());
            results::save_histogram(dir, r, kind::VCPU_UFFD, &v.guest)?;
            results::save_histogram(dir, r, kind::VCPU_UFFD_VMM, &v.vmm)?;
            (
                &v.guest,
                histogram::convolve(&v.guest, &env.limits.tcp_rtt)?,
            )
        }
        Err(e) => {
            r.limit_basis = "thread".into();
            r.vcpu_limit_error = Some(e.to_string());
            (uffd, thread_limit)
        }
    };
    r.limit_us = Percentiles::us(&limit);
    results::save_histogram(dir, r, kind::LIMIT, &limit)?;
    // The loaded limit: the same userfault round trip with the round trip beside a bulk stream.
    let loaded_limit = histogram::convolve(fault_rtt, &env.limits.tcp_rtt_loaded)?;
    r.tcp_rtt_loaded_us = Percentiles::us(&env.limits.tcp_rtt_loaded);
    r.loaded_limit_us = Percentiles::us(&loaded_limit);
    results::save_histogram(dir, r, kind::TCP_RTT_LOADED, &env.limits.tcp_rtt_loaded)?;
    results::save_histogram(dir, r, kind::LOADED_LIMIT, &loaded_limit)?;
    Ok(())
}

/// What every scenario (ours or the peer's) does first: records its granularity and limits in
/// `r` and reserves the huge pages it needs. The pool stays reserved while the result lives.
pub(crate) fn prepare(
    cfg: &RunConfig,
    env: &LinkEnv,
    uffd: &LatencyHistogram,
    vcpu: Result<&VcpuFaultLimit, &limits::LimitError>,
    s: &Scenario,
    r: &mut ScenarioResult,
    progress: &mut dyn Progress,
) -> Result<Option<HugePool>, RunError> {
    r.granularity = s.strategy.granularity_name().to_string();
    record_limits(&cfg.out, env, uffd, vcpu, r)?;
    // Only huge backings take the shared pool lock (other test runs hold it for minutes).
    let needs = s.huge_pages_needed();
    if needs.is_empty() {
        return Ok(None);
    }
    progress.phase("reserving huge pages");
    Ok(Some(HugePool::reserve(&needs)?))
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    cfg: &RunConfig,
    env: &LinkEnv,
    uffd: &LatencyHistogram,
    vcpu: Result<&VcpuFaultLimit, &limits::LimitError>,
    secret: &Path,
    s: &Scenario,
    index: usize,
    r: &mut ScenarioResult,
    progress: &mut dyn Progress,
) -> Result<(), RunError> {
    let dir = &cfg.out;
    let raw = dir.join("raw");
    let _pool = prepare(cfg, env, uffd, vcpu, s, r, progress)?;

    // Destination.
    let port = pick_port(env.dst_ip(), env.link.netns, index)?;
    let listen = SocketAddr::new(env.dst_ip(), port);
    let stats_path = raw.join(format!("{}.stats.json", s.name));
    let _ = std::fs::remove_file(&stats_path);
    let mut dcmd = env.command(Side::Dst, &cfg.vmm);
    dcmd.arg("receive")
        .arg("--listen")
        .arg(listen.to_string())
        .args(["--backing", s.backing.name()])
        .args(["--granularity", s.strategy.granularity_name()])
        .arg("--stats-json")
        .arg(&stats_path);
    let pinned = if s.pinned {
        Some(pinned_cpu_list(cfg.vcpus).map_err(RunError::Scenario)?)
    } else {
        None
    };
    if let Some(list) = &pinned {
        dcmd.args(["--migration-cpus", list]);
    }
    r.migration_cpus = pinned.clone();
    // `vmm` refuses non-loopback addresses without TLS; the netns link is the harness's own:
    // plaintext with a secret, allowed explicitly (with TLS: the secret on top of it).
    if env.link.netns {
        dcmd.arg("--secret-file").arg(secret);
        if !env.link.tls {
            dcmd.arg("--allow-plaintext");
        }
    }
    let tls_dir = raw.join("tls");
    if env.link.tls {
        tls_init(&cfg.vmm, &tls_dir, env.dst_ip())?;
        dcmd.arg("--tls-dir").arg(&tls_dir);
    }
    progress.phase("starting the destination");
    let mut dst = Proc::spawn(
        "destination vmm",
        dcmd,
        &raw.join(format!("{}.dst", s.name)),
    )?;
    // `ip netns exec` execs the vmm, so the pid is the VMM's on every link.
    let dst_mem = MemSampler::start(dst.pid(), Duration::from_millis(50));
    let t = Instant::now();
    while !is_listening(dst.pid(), port) {
        if dst.try_wait()?.is_some() || t.elapsed() > cfg.phase_timeout {
            return Err(RunError::Scenario(format!(
                "the destination never listened on {listen} (see raw/{}.dst.err)",
                s.name
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Delay proxy in front of the destination, on the source side.
    let _proxy;
    let to = if env.link.delay.is_zero() {
        listen
    } else {
        let delay = env.link.delay;
        let proxy = match &env.pair {
            Some(p) => {
                let l = SocketAddr::new(p.ip(Side::Src).into(), 0);
                p.run_in(Side::Src, move || DelayProxy::start(l, listen, delay))??
            }
            None => DelayProxy::start(
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
                listen,
                delay,
            )?,
        };
        let a = proxy.addr();
        _proxy = proxy;
        a
    };
    // The fault-injecting relay, in front of all that (armed right before `vmm migrate`).
    let relay = match env.link.fault {
        Some(fault) => {
            r.link_fault = Some(fault.describe(s.memory_mib));
            r.link_resets = Some(0);
            Some((fault, Arc::new(start_relay(env.pair.as_ref(), to)?)))
        }
        None => None,
    };
    let to = relay.as_ref().map_or(to, |(_, relay)| relay.addr());

    // Source.
    let sock = std::env::temp_dir().join(format!("harness-{}-{index}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let memory = format!("{}M", s.memory_mib);
    let cmdline = format!(
        "passes={} pattern={}",
        s.pattern.passes_for(cfg.passes),
        s.pattern.guest_name()
    );
    let mut scmd = env.command(Side::Src, &cfg.vmm);
    scmd.arg("run")
        .arg("--kernel")
        .arg(&cfg.kernel)
        .args(["--memory", &memory])
        .args(["--vcpus", &cfg.vcpus.to_string()])
        .args(["--backing", s.backing.name()])
        .args(["--cmdline", &cmdline])
        .arg("--api-socket")
        .arg(&sock);
    if let Some(list) = &pinned {
        scmd.args(["--migration-cpus", list]);
    }
    progress.phase(&format!(
        "starting the source guest ({} MiB, {} vCPU(s); its first pass writes all of it)",
        s.memory_mib, cfg.vcpus
    ));
    let mut src = Proc::spawn("source vmm", scmd, &raw.join(format!("{}.src", s.name)))?;
    // Migrate once the guest has written its memory once (first pass done).
    source_first_pass(&mut src, cfg, s, r)?;

    progress.phase(&format!(
        "migrating {} MiB (phase timeout {} s)",
        s.memory_mib,
        cfg.phase_timeout.as_secs()
    ));
    let t0 = Instant::now();
    let copies = if relay.is_some() && !env.link.netns {
        2
    } else {
        1
    };
    let sampler = RateSampler::start(src.pid(), env.src_device(), t0, copies);
    let mut blackhole = None;
    if let Some((fault, relay)) = &relay {
        let after = fault.fires_after_bytes(s.memory_mib);
        match fault {
            LinkFault::ResetOnce => relay.reset_after_bytes(after),
            LinkFault::BlackholeOnce => {
                blackhole = Some(BlackholeDriver::arm(relay.clone(), after)?);
            }
        }
    }
    let mut mcmd = env.command(Side::Src, &cfg.vmm);
    mcmd.arg("migrate")
        .arg("--api-socket")
        .arg(&sock)
        .arg("--to")
        .arg(to.to_string())
        .args(["--mode", Mode::Postcopy.name(), "--json"]);
    if env.link.netns {
        mcmd.arg("--secret-file").arg(secret);
        if !env.link.tls {
            mcmd.arg("--allow-plaintext");
        }
    }
    if env.link.tls {
        mcmd.arg("--tls-dir").arg(&tls_dir);
    }
    let mut mig = Proc::spawn(
        "vmm migrate",
        mcmd,
        &raw.join(format!("{}.migrate", s.name)),
    )?;
    let mstatus = mig.wait_timeout(cfg.phase_timeout)?;
    // `migrate` returns once the source has sent every page: postcopy is over.
    let migrated_at = Instant::now();
    // What the relay did, recorded before anything below can end the scenario; nothing
    // reconnects once `migrate` is done, so it stays armed harmlessly until it is dropped.
    let relay_seen = relay.as_ref().map(|(fault, relay)| {
        let fired = match fault {
            LinkFault::ResetOnce => relay.resets(),
            LinkFault::BlackholeOnce => blackhole.as_ref().map_or(0, BlackholeDriver::fired),
        };
        r.link_resets = Some(fired);
        (*fault, fired, relay.forwarded().0)
    });
    drop(blackhole);
    // The background push may continue after `migrate` returns; keep sampling until the
    // source exits or 2 s more.
    let _ = src.wait_timeout(Duration::from_secs(2))?;
    r.throughput_series = sampler.finish();
    match mstatus {
        Some(st) if st.success() => {}
        Some(st) => {
            return Err(RunError::Scenario(format!(
                "vmm migrate exited with {st} (see raw/{}.migrate.err)",
                s.name
            )))
        }
        None => {
            return Err(RunError::Scenario(format!(
                "vmm migrate did not finish within {:?}",
                cfg.phase_timeout
            )))
        }
    }
    let summary: migration::MigrationSummary =
        guest_output::json_object(&mig.text(), "the `vmm migrate --json` output")?;
    let summary = MigrateSummary::from(&summary);

    progress.phase(&format!(
        "waiting for the destination guest to finish its {} passes",
        s.pattern.passes_for(cfg.passes)
    ));
    if cfg.passes == 0 {
        // Count only passes reported by the destination (it prints what ran there).
        dst.wait_for_lines(
            |l| l.contains("WORKLOAD pass"),
            cfg.post_passes,
            cfg.phase_timeout,
        )?;
        dst.stop(Duration::from_secs(10))?;
    } else if dst.wait_timeout(cfg.phase_timeout)?.is_none() {
        dst.stop(Duration::from_secs(10))?;
    }
    src.stop(Duration::from_secs(5))?;
    let dst_lines = dst.lines();
    let dst_out = GuestOutput::parse(&dst.text());
    let postcopy_passes = passes_begun_before(&dst_lines, migrated_at);
    let stats = match std::fs::read_to_string(&stats_path) {
        Ok(text) => Some(DestinationStats::from(guest_output::json_object::<
            migration::stats::DestinationStats,
        >(
            &text,
            "the destination's --stats-json file",
        )?)),
        Err(_) => None,
    };
    fill(dir, r, &summary, &dst_out, &postcopy_passes, stats.as_ref())?;
    record_dst_memory(r, dst_mem.finish());
    r.status = Status::Ok;
    let mismatches =
        dst_out.mismatches.len() as u64 + dst_out.passes.iter().map(|p| p.mismatches).sum::<u64>();
    if mismatches > 0 || r.guest_ok == Some(false) {
        r.status = Status::Failed;
        r.error = Some(format!(
            "the guest saw {mismatches} memory mismatches after migration (figures kept)"
        ));
    }
    if let Some((fault, resets, forwarded)) = relay_seen {
        if let Some(why) = fault_not_exercised(r, fault, s.memory_mib, resets, forwarded) {
            r.status = Status::Failed;
            r.error = Some(match r.error.take() {
                Some(e) => format!("{e}; {why}"),
                None => why,
            });
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// Records the destination's own memory (see [`crate::procmem`]) in `r`: its peaks and the
/// destination extra memory (those plus the staging peak, which `r` already holds).
pub fn record_dst_memory(r: &mut ScenarioResult, peaks: Option<MemPeaks>) {
    let Some(p) = peaks else {
        return;
    };
    let mib = |kb: u64| kb as f64 / 1024.0;
    r.dst_rss_anon_peak_mib = Some(mib(p.rss_anon_kb));
    r.dst_pte_peak_mib = Some(mib(p.pte_kb));
    r.dst_extra_mib = Some(mib(p.own_kb) + r.staging_peak_mib.unwrap_or(0.0));
}

/// Why a scenario with a link fault did not measure what it is for, if it did not: the relay
/// never reset (`resets`; `forwarded` bytes went source->destination through it), or it reset
/// but neither side counted a recovery.
/// Waits until the source guest (ours or QEMU's) wrote its memory once (its first pass line),
/// checks it is still running, and records what it saw before the migration (slow accesses,
/// the first-touch histogram).
pub(crate) fn source_first_pass(
    src: &mut Proc,
    cfg: &RunConfig,
    s: &Scenario,
    r: &mut ScenarioResult,
) -> Result<(), RunError> {
    if !src.wait_for_lines(|l| l.contains("WORKLOAD pass"), 1, cfg.phase_timeout)? {
        if let Some(status) = src.try_wait()? {
            return Err(RunError::Scenario(format!(
                "the source VMM exited ({status}) before its guest finished a pass: {} (see \
                 raw/{}.src.err)",
                src.last_stderr_line()
                    .unwrap_or_else(|| "it printed no error".to_string()),
                s.name
            )));
        }
        return Err(RunError::Scenario(format!(
            "the source guest finished no pass within {:?} (see raw/{}.src.out/.err)",
            cfg.phase_timeout, s.name
        )));
    }
    if src.try_wait()?.is_some() {
        return Err(RunError::Scenario(format!(
            "the source guest finished all {} passes before the migration began: raise --passes",
            s.pattern.passes_for(cfg.passes)
        )));
    }
    let src_out = GuestOutput::parse(&src.text());
    r.guest_slow_before_migration = Some(src_out.passes.iter().map(|p| p.slow_accesses).sum());
    if let Some(ft) = src_out.hists_named("first_touch").last() {
        results::save_histogram(&cfg.out, r, kind::FIRST_TOUCH, &ft.histogram()?)?;
    }
    Ok(())
}

pub fn fault_not_exercised(
    r: &ScenarioResult,
    fault: LinkFault,
    memory_mib: u64,
    resets: u64,
    forwarded: u64,
) -> Option<String> {
    if resets == 0 {
        return Some(format!(
            "the link fault never fired: the relay forwarded {forwarded} bytes source->destination, \
             the fault was armed for {} (figures are those of a migration without a fault)",
            fault.fires_after_bytes(memory_mib)
        ));
    }
    let counted = r.recoveries.unwrap_or(0).max(r.dst_recoveries.unwrap_or(0));
    (counted == 0).then(|| {
        format!(
            "the relay reset the link {resets} time(s) but neither side counted a postcopy \
             recovery (source {:?}, destination {:?})",
            r.recoveries, r.dst_recoveries
        )
    })
}

/// The numbers of the passes in `lines` (one process's stdout) that began before `until`. A
/// pass begins when the previous pass line is printed; the first pass line of the destination
/// belongs to the pass the switchover interrupted, which began on the source.
pub fn passes_begun_before(lines: &[Line], until: Instant) -> Vec<u64> {
    let mut out = Vec::new();
    let mut began: Option<Instant> = None;
    for l in lines {
        if let Ok(Some(GuestLine::Pass(p))) = guest_output::parse_line(0, &l.text) {
            if began.is_none_or(|t| t < until) {
                out.push(p.n);
            }
            began = Some(l.at);
        }
    }
    out
}

/// The figures of `vmm migrate --json` (the VMM's own summary type) as the harness records them.
impl From<&migration::MigrationSummary> for MigrateSummary {
    fn from(s: &migration::MigrationSummary) -> Self {
        MigrateSummary {
            blackout_ms: Some(s.blackout_ms),
            total_ms: Some(s.total_ms),
            bytes_sent: Some(s.bytes_sent),
            pages_sent: Some(s.pages_sent),
            faults_served: Some(s.faults_served),
            pages_pushed: Some(s.pages_pushed),
            collapses: Some(s.collapses),
            transfer_ms: Some(s.transfer_ms),
            transfer_bytes: Some(s.transfer_bytes),
            recoveries: Some(s.recoveries),
            paused_ms: Some(s.paused_ms),
            extra: Default::default(),
        }
    }
}

/// The figures of `vmm receive --stats-json` (the VMM's own type) as the harness records them.
impl From<migration::stats::DestinationStats> for DestinationStats {
    fn from(s: migration::stats::DestinationStats) -> Self {
        DestinationStats {
            faults_served: Some(s.faults_served),
            pages_fetched: Some(s.pages_fetched),
            pages_fetched_local: Some(s.pages_fetched_local),
            collapses: Some(s.collapses),
            collapse_stall_ns: s.collapse_stall_ns,
            collapse_total_ns: s.collapse_total_ns,
            fault_ns: s.fault_ns,
            outage_fault_ns: s.outage_fault_ns,
            recoveries: Some(s.recoveries),
            paused_ms: Some(s.paused_ms),
            staging_peak_bytes: Some(s.staging_peak_bytes),
            postcopy_vcpu_blocktime_ms: s.postcopy_vcpu_blocktime_ms,
            postcopy_blocktime_ms: s.postcopy_blocktime_ms,
            native_fallback: s.native_fallback,
            regions: s.regions,
            fault_phase_us: guest_output::phase_map(&s.fault_phase_us),
            slow_faults: s
                .slow_faults
                .iter()
                .map(guest_output::SlowFault::from)
                .collect(),
            extra: Default::default(),
        }
    }
}

/// Fills the figures of `r` from what the processes reported (see docs/measuring.md).
/// `postcopy_passes`: the destination passes that overlapped postcopy; their per-pass
/// `access_slow` histograms are the guest-seen fault latency, later passes' go to
/// `guest_after_us`.
pub fn fill(
    dir: &Path,
    r: &mut ScenarioResult,
    summary: &MigrateSummary,
    dst_out: &GuestOutput,
    postcopy_passes: &[u64],
    stats: Option<&DestinationStats>,
) -> Result<(), RunError> {
    let hist_of = |hs: Vec<&guest_output::GuestHist>| -> Result<LatencyHistogram, RunError> {
        let parts: Vec<LatencyHistogram> =
            hs.iter().map(|h| h.histogram()).collect::<Result<_, _>>()?;
        Ok(histogram::merge(parts.iter())?)
    };
    let per_pass: Vec<_> = dst_out.pass_hists("access_slow").collect();
    let dst_slow: u64 = dst_out.passes.iter().map(|p| p.slow_accesses).sum();
    let (during, after): (Vec<_>, Vec<_>) = per_pass
        .iter()
        .copied()
        .partition(|h| h.pass.is_some_and(|k| postcopy_passes.contains(&k)));
    let guest = if per_pass.is_empty() && dst_slow > 0 {
        // A workload without per-pass lines: its whole-run histogram (source passes too).
        r.guest_fault_source = "whole-run access_slow (no per-pass histograms)".into();
        hist_of(dst_out.final_hist("access_slow").into_iter().collect())?
    } else {
        r.guest_fault_source =
            "per-pass access_slow of the destination passes that overlapped postcopy".into();
        r.guest_fault_passes = postcopy_passes.to_vec();
        let after_slow = dst_out
            .passes
            .iter()
            .filter(|p| !postcopy_passes.contains(&p.n))
            .map(|p| p.slow_accesses)
            .sum();
        r.guest_slow_after_migration = Some(after_slow);
        let later = hist_of(after)?;
        r.guest_after_us = Percentiles::us(&later);
        results::save_histogram(dir, r, kind::GUEST_AFTER, &later)?;
        hist_of(during)?
    };
    r.guest_slow_us = Percentiles::us(&guest);
    // The guest counts every access over 2 us; ordinary mapping faults (3-10 us) are among
    // them. The destination knows how many userfaults the guest took: keep that many of the
    // slowest.
    let guest = match stats {
        Some(DestinationStats {
            faults_served: Some(n),
            ..
        }) if *n > 0 && *n < guest.len() => {
            r.guest_fault_source = format!(
                "{}: the {} slowest of {} (the destination's userfault count)",
                r.guest_fault_source,
                n,
                guest.len()
            );
            histogram::top_n(&guest, *n)?
        }
        _ => guest,
    };
    // Faults that waited through a postcopy-paused outage (for the link to come back, then for
    // their page) are kept apart on the VMM side (`outage_fault_ns`); the guest cannot tell
    // them apart, but they should be its slowest: take that many of the slowest out of the
    // guest's distribution (an estimate, like the userfault count above).
    let outage_n = stats.map_or(0, |st| st.outage_fault_ns.len() as u64);
    let guest = if outage_n > 0 && !guest.is_empty() {
        let (normal, outage) = histogram::split_top_n(&guest, outage_n)?;
        r.guest_fault_source = format!(
            "{}; its {} slowest taken out as outage faults (the destination's outage fault count)",
            r.guest_fault_source,
            outage.len()
        );
        r.guest_outage_fault_us = Percentiles::us(&outage);
        results::save_histogram(dir, r, kind::GUEST_OUTAGE_FAULT, &outage)?;
        normal
    } else {
        guest
    };
    r.fault_us = Percentiles::us(&guest);
    r.guest_blocktime_ms = (!guest.is_empty())
        .then(|| guest.mean() * guest.len() as f64 / 1e6 / f64::from(r.vcpus.unwrap_or(1).max(1)));
    results::save_histogram(dir, r, kind::GUEST_FAULT, &guest)?;
    results::record_guest_stalls(dir, r, dst_out, postcopy_passes)?;

    r.blackout_ms = summary.blackout_ms;
    r.total_s = summary.total_ms.map(|ms| ms / 1e3);
    r.bytes_sent = summary.bytes_sent;
    r.pages_sent = summary.pages_sent;
    r.pages_pushed = summary.pages_pushed;
    r.faults_served = summary.faults_served;
    r.recoveries = summary.recoveries;
    r.paused_ms = summary.paused_ms;
    let gbps = |bytes: Option<u64>, ms: Option<f64>| match (bytes, ms) {
        (Some(b), Some(ms)) if ms > 0.0 && b > 0 => Some(b as f64 * 8.0 / (ms / 1e3) / 1e9),
        _ => None,
    };
    r.overall_gbps = gbps(summary.bytes_sent, summary.total_ms);
    r.throughput_gbps = gbps(summary.transfer_bytes, summary.transfer_ms).or(r.overall_gbps);
    r.peak_link_gbps = r
        .throughput_series
        .iter()
        .map(|p| p.1)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    r.guest_mismatches = Some(
        dst_out.mismatches.len() as u64 + dst_out.passes.iter().map(|p| p.mismatches).sum::<u64>(),
    );
    r.guest_ok = dst_out.result.as_ref().map(|res| res.ok);

    if let Some(st) = stats {
        let vmm = histogram::from_samples(&st.fault_ns)?;
        r.vmm_fault_us = Percentiles::us(&vmm);
        results::save_histogram(dir, r, kind::VMM_FAULT, &vmm)?;
        // Never merged into `vmm`: a fault that waited for the link to come back is not a
        // sample of the fault service's latency.
        let outage = histogram::from_samples(&st.outage_fault_ns)?;
        r.outage_fault_us = Percentiles::us(&outage);
        if !outage.is_empty() {
            results::save_histogram(dir, r, kind::OUTAGE_FAULT, &outage)?;
        }
        r.dst_recoveries = st.recoveries;
        r.dst_paused_ms = st.paused_ms;
        let stall = histogram::from_samples(&st.collapse_stall_ns)?;
        r.collapse_stall_us = ShortSummary::us(&stall);
        results::save_histogram(dir, r, kind::COLLAPSE_STALL, &stall)?;
        r.collapse_total_us = ShortSummary::us(&histogram::from_samples(&st.collapse_total_ns)?);
        r.uffd_faults = st.faults_served;
        r.pages_fetched = st.pages_fetched;
        r.staging_peak_mib = st.staging_peak_bytes.map(|b| b as f64 / (1024.0 * 1024.0));
        results::record_destination_timing(r, st);
        r.pages_fetched_local = st.pages_fetched_local;
        // The destination says why native was not used and how it served each region.
        r.native_fallback = st.native_fallback.clone();
        r.serve_modes = Vec::new();
        for m in st.regions.iter().map(|region| &region.serve_mode) {
            if !r.serve_modes.contains(m) {
                r.serve_modes.push(m.clone());
            }
        }
        if r.faults_served.is_none() {
            r.faults_served = st.faults_served;
        }
        r.fault_series = st
            .fault_ns
            .iter()
            .enumerate()
            .map(|(i, &ns)| (i as f64, ns as f64 / 1e3))
            .collect();
        r.fault_series_x = "fault number".into();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_have_unique_names_and_quick_is_a_useful_subset() {
        let all = all();
        // Ours, native, recovery, TLS, pinned, then a QEMU twin of each plain shmem/hugetlb
        // scenario (a pinned one shares its unpinned twin's).
        assert_eq!(all.len(), 4 * 2 * 3 * 4 + 3 * 3 + 2 + 2 + 3 + 3 * 3 * 4);
        // Each pinned scenario beside its unpinned twin of the same size, in both lists.
        for list in [all.clone(), quick()] {
            let pinned: Vec<_> = list.iter().filter(|s| s.pinned).collect();
            assert_eq!(pinned.len(), 3);
            for p in pinned {
                let plain = p.name.strip_suffix("-pinned").unwrap();
                let twin = list.iter().find(|s| s.name == plain);
                assert!(
                    twin.is_some_and(|t| t.memory_mib == p.memory_mib && !t.pinned),
                    "{plain}"
                );
            }
        }
        let qemu: Vec<_> = all
            .iter()
            .filter(|s| s.strategy == Strategy::Qemu)
            .collect();
        assert_eq!(qemu.len(), 3 * 3 * 4);
        assert!(qemu.iter().all(|s| s.link.fault.is_none() && !s.link.tls));
        assert!(all
            .iter()
            .any(|s| s.name == "hugetlb-1g-qemu-random-loopback"));
        let twins = peer_twins(&quick());
        let names: Vec<_> = twins.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shmem-qemu-random-loopback",
                "hugetlb-2m-qemu-random-loopback",
                "hugetlb-1g-qemu-random-loopback",
                "hugetlb-2m-qemu-sequential-veth-1g",
                "hugetlb-2m-qemu-random-veth-10g",
            ]
        );
        assert_eq!(twins[2].memory_mib, 1024);
        assert_eq!(by_names(&[names[0].into()]).unwrap()[0].memory_mib, 256);
        let tls: Vec<_> = all.iter().filter(|s| s.link.tls).collect();
        assert_eq!(tls.len(), 2);
        assert_eq!(tls[0].name, "hugetlb-2m-4k-staged-random-loopback-tls");
        assert_eq!(tls[1].name, "hugetlb-2m-4k-staged-random-veth-10g-tls");
        // Every TLS scenario has its plaintext twin, of the same size, in both lists.
        for list in [all.clone(), quick()] {
            for t in list.iter().filter(|s| s.link.tls) {
                let plain = t.name.strip_suffix("-tls").unwrap();
                let twin = list.iter().find(|s| s.name == plain);
                assert!(
                    twin.is_some_and(|p| p.memory_mib == t.memory_mib && !p.link.tls),
                    "{plain}"
                );
            }
        }
        assert_eq!(quick().iter().filter(|s| s.link.tls).count(), 2);
        assert!(all
            .iter()
            .any(|s| s.strategy == Strategy::Native && s.backing == Backing::Hugetlb1g));
        let mut names: Vec<_> = all.iter().map(|s| s.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        let q = quick();
        assert!(q
            .iter()
            .any(|s| s.strategy == Strategy::Huge && s.backing == Backing::Hugetlb1g));
        assert!(q.iter().any(|s| s.link.netns));
        assert_eq!(
            by_names(&[q[0].name.clone()]).unwrap()[0].memory_mib,
            q[0].memory_mib
        );
        assert!(by_names(&["nope".into()]).is_err());
        assert_eq!(q[4].huge_pages_needed(), vec![(1024 * 1024, 2)]);
        assert!(q
            .iter()
            .any(|s| s.strategy == Strategy::Native && s.backing == Backing::Hugetlb2m));
        assert_eq!(q[1].huge_pages_needed(), vec![(2048, 256)]);
        // Two postcopy-recovery scenarios in both lists, on loopback: a reset, a black-hole.
        let names = [
            "hugetlb-2m-4k-staged-random-loopback-reset1",
            "hugetlb-2m-4k-staged-random-loopback-blackhole1",
        ];
        for list in [&q, &all] {
            let faulty: Vec<_> = list.iter().filter(|s| s.link.fault.is_some()).collect();
            assert_eq!(faulty.len(), 2);
            for (f, name) in faulty.iter().zip(names) {
                assert_eq!(f.name, name);
                assert_eq!(f.memory_mib, 256);
                assert!(!f.link.netns);
            }
        }
        let found = by_names(&[names[0].into()]).unwrap();
        assert_eq!(found[0].link.fault, Some(LinkFault::ResetOnce));
        assert_ne!(found[0].link, Link::loopback());
        let found = by_names(&[names[1].into()]).unwrap();
        assert_eq!(found[0].link.fault, Some(LinkFault::BlackholeOnce));
    }

    #[test]
    fn a_scenario_runs_with_its_own_vcpus_passes_and_a_timeout_scaled_to_its_size() {
        let cfg = RunConfig {
            vmm: "vmm".into(),
            kernel: "workload.elf".into(),
            out: "out".into(),
            vcpus: 1,
            passes: 24,
            post_passes: 2,
            quick: true,
            uffd_samples: 1,
            rtt_samples: 1,
            throughput_for: Duration::from_secs(1),
            phase_timeout: Duration::from_secs(120),
        };
        let secs = |mib| cfg.phase_timeout_for(mib).as_secs();
        assert_eq!((secs(64), secs(256), secs(1024)), (120, 120, 120));
        assert_eq!((secs(1025), secs(4096), secs(8192)), (240, 480, 960));
        let mut s = quick()[0].clone();
        let plain = cfg.for_scenario(&s);
        assert_eq!((plain.vcpus, plain.passes), (1, 24));
        assert_eq!(plain.phase_timeout, cfg.phase_timeout);
        s.memory_mib = 8192;
        s.vcpus = Some(2);
        s.passes = Some(6);
        let point = cfg.for_scenario(&s);
        assert_eq!((point.vcpus, point.passes), (2, 6));
        assert_eq!(point.phase_timeout, Duration::from_secs(960));
        assert_eq!(s.vcpus_under(&cfg), 2);
    }

    #[test]
    fn reset_fault_fires_a_third_into_the_guest_ram() {
        let f = LinkFault::ResetOnce;
        assert_eq!(f.fires_after_bytes(256), (256u64 << 20) / 3);
        let b = LinkFault::BlackholeOnce;
        assert_eq!(b.fires_after_bytes(256), (256u64 << 20) / 3);
        assert!(b.describe(256).contains("1500 ms"), "{}", b.describe(256));
        assert!(f.describe(256).contains(&((256u64 << 20) / 3).to_string()));
        assert_eq!(
            Link::veth(1, 0).with_fault(f).name,
            "veth-1g-reset1".to_string()
        );
    }

    #[test]
    fn a_fault_that_never_fired_or_was_not_recovered_is_reported() {
        let mut r =
            ScenarioResult::new("s", "hugetlb-2m", "4k-staged", "loopback-reset1", "random");
        let f = LinkFault::ResetOnce;
        let why = fault_not_exercised(&r, f, 256, 0, 1234).unwrap();
        assert!(why.contains("never fired") && why.contains("1234"), "{why}");
        let why = fault_not_exercised(&r, f, 256, 1, 1 << 28).unwrap();
        assert!(why.contains("neither side counted"), "{why}");
        r.recoveries = Some(1);
        r.dst_recoveries = Some(1);
        assert_eq!(fault_not_exercised(&r, f, 256, 1, 1 << 28), None);
    }

    #[test]
    fn reads_the_vmm_json_through_its_own_types() {
        let summary = migration::MigrationSummary {
            mode: Mode::Postcopy,
            session_id: 1,
            blackout_ms: 2.5,
            total_ms: 100.0,
            bytes_sent: 10,
            pages_sent: 2,
            zero_pages: 0,
            faults_served: 3,
            pages_pushed: 4,
            collapses: 0,
            rounds: 0,
            final_dirty_pages: 0,
            bandwidth_bytes_per_s: 0.0,
            transfer_ms: 50.0,
            transfer_bytes: 8,
            recoveries: 1,
            paused_ms: 7.0,
            destination: Default::default(),
        };
        let json = serde_json::to_string(&summary).unwrap();
        assert!(json.contains(r#""mode":"postcopy""#), "{json}");
        let text = format!("connecting\n{json}\n");
        let back: migration::MigrationSummary = guest_output::json_object(&text, "test").unwrap();
        assert_eq!(back, summary);
        let m = MigrateSummary::from(&back);
        assert_eq!((m.blackout_ms, m.recoveries), (Some(2.5), Some(1)));
        assert_eq!((m.transfer_ms, m.transfer_bytes), (Some(50.0), Some(8)));
    }

    #[test]
    fn outage_faults_are_kept_apart_from_normal_faults() {
        let d = tempfile::tempdir().unwrap();
        let mut r =
            ScenarioResult::new("s", "hugetlb-2m", "4k-staged", "loopback-reset1", "random");
        let summary = MigrateSummary::parse(
            r#"{"blackout_ms":1,"total_ms":2000,"recoveries":1,"paused_ms":1010.5}"#,
        )
        .unwrap();
        // Four userfaults: two normal (50, 80 us), two that waited through the outage (~0.9 s).
        let out = GuestOutput::parse(
            "WORKLOAD pass n=2 pages=1 mismatches=0 elapsed_ms=1500 slow_accesses=5\n\
             WORKLOAD HIST name=access_slow pass=2 unit=ns buckets=2048:1,49152:1,81920:1,805306368:2\n",
        );
        let stats = DestinationStats::parse(
            r#"{"faults_served":4,"fault_ns":[45000,75000],"outage_fault_ns":[880000000,910000000],"recoveries":1,"paused_ms":990.0}"#,
        )
        .unwrap();
        fill(d.path(), &mut r, &summary, &out, &[2], Some(&stats)).unwrap();
        assert_eq!((r.recoveries, r.dst_recoveries), (Some(1), Some(1)));
        assert_eq!((r.paused_ms, r.dst_paused_ms), (Some(1010.5), Some(990.0)));
        // VMM side: the normal distribution keeps only `fault_ns`.
        assert_eq!(r.vmm_fault_us.count, 2);
        assert!(r.vmm_fault_us.max < 100.0, "{:?}", r.vmm_fault_us);
        assert_eq!(r.outage_fault_us.count, 2);
        assert!(r.outage_fault_us.p50 > 800_000.0, "{:?}", r.outage_fault_us);
        // Guest side: the 4 slowest are the userfaults, the 2 slowest of those the outage ones.
        assert_eq!(r.fault_us.count, 2);
        assert!(r.fault_us.max < 100.0, "{:?}", r.fault_us);
        assert_eq!(r.guest_outage_fault_us.count, 2);
        assert!(r.guest_outage_fault_us.p50 > 800_000.0);
        assert!(
            r.guest_fault_source.contains("2 slowest taken out"),
            "{}",
            r.guest_fault_source
        );
        let load = |k| {
            results::load_histogram(d.path(), &r, k)
                .unwrap()
                .unwrap()
                .len()
        };
        assert_eq!(load(kind::GUEST_FAULT), 2);
        assert_eq!(load(kind::VMM_FAULT), 2);
        assert_eq!(load(kind::OUTAGE_FAULT), 2);
        assert_eq!(load(kind::GUEST_OUTAGE_FAULT), 2);
        // The latency-over-time series is the normal faults only.
        assert_eq!(r.fault_series.len(), 2);
    }

    #[test]
    fn guest_fault_latency_keeps_as_many_samples_as_userfaults() {
        let d = tempfile::tempdir().unwrap();
        let mut r = ScenarioResult::new("s", "shmem", "4k-staged", "loopback", "random");
        let summary = MigrateSummary::parse(r#"{"blackout_ms":1,"total_ms":100}"#).unwrap();
        // Five slow accesses in the postcopy pass: three mapping faults (2-4 us), two
        // userfaults (60, 90 us); the destination served two userfaults.
        let out = GuestOutput::parse(
            "WORKLOAD pass n=2 pages=1 mismatches=0 elapsed_ms=5 slow_accesses=5\n\
             WORKLOAD HIST name=access_slow pass=2 unit=ns buckets=2048:2,4096:1,61440:1,90112:1\n",
        );
        let stats =
            DestinationStats::parse(r#"{"faults_served":2,"fault_ns":[50000,80000]}"#).unwrap();
        fill(d.path(), &mut r, &summary, &out, &[2], Some(&stats)).unwrap();
        assert_eq!(r.guest_slow_us.count, 5);
        assert_eq!(r.fault_us.count, 2);
        assert!(r.fault_us.p50 > 50.0, "{:?}", r.fault_us);
        assert!(
            r.guest_fault_source.contains("2 slowest of 5"),
            "{}",
            r.guest_fault_source
        );
    }

    #[test]
    fn fill_derives_figures_from_process_output() {
        let d = tempfile::tempdir().unwrap();
        let mut r = ScenarioResult::new("s", "hugetlb-2m", "4k-staged", "loopback", "random");
        let summary = MigrateSummary::parse(
            r#"{"blackout_ms":2.5,"total_ms":2000,"bytes_sent":1250000000,"pages_sent":1,"faults_served":7,"pages_pushed":300000,"collapses":2,"transfer_ms":500,"transfer_bytes":1000000000}"#,
        )
        .unwrap();
        let out = GuestOutput::parse(
            "WORKLOAD pass n=2 pages=1 mismatches=0 elapsed_ms=5 slow_accesses=3\n\
             WORKLOAD HIST name=access_slow pass=2 unit=ns buckets=16384:2,32768:1\n\
             WORKLOAD pass n=3 pages=1 mismatches=0 elapsed_ms=5 slow_accesses=1\n\
             WORKLOAD HIST name=access_slow pass=3 unit=ns buckets=16384:1\n\
             WORKLOAD pass n=4 pages=1 mismatches=0 elapsed_ms=5 slow_accesses=2\n\
             WORKLOAD HIST name=access_slow pass=4 unit=ns buckets=2048:2\n\
             WORKLOAD HIST name=access_slow unit=ns buckets=2048:2,16384:3,32768:1\n",
        );
        let stats = DestinationStats::parse(
            r#"{"faults_served":7,"pages_fetched_local":2,"collapses":2,"collapse_stall_ns":[150000,600000],"fault_ns":[20000,22000,90000],"staging_peak_bytes":2097152}"#,
        )
        .unwrap();
        r.throughput_series = vec![(0.1, 3.0), (0.2, 4.5)];
        fill(d.path(), &mut r, &summary, &out, &[2, 3], Some(&stats)).unwrap();
        assert_eq!(r.fault_us.count, 4);
        assert_eq!(r.guest_fault_passes, vec![2, 3]);
        assert_eq!(r.guest_slow_after_migration, Some(2));
        assert_eq!(r.guest_after_us.count, 2);
        // 16384 + half of its 2048-wide bucket.
        assert!((r.fault_us.p50 - 17.408).abs() < 0.02, "{:?}", r.fault_us);
        assert_eq!(r.vmm_fault_us.count, 3);
        assert_eq!(r.collapse_stall_us.count, 2);
        assert!((r.collapse_stall_us.max - 600.0).abs() < 1.0);
        assert_eq!(r.staging_peak_mib, Some(2.0));
        // Background throughput over the transfer window; overall over the whole migration.
        assert_eq!(r.throughput_gbps, Some(16.0));
        assert_eq!(r.overall_gbps, Some(5.0));
        assert_eq!(r.total_s, Some(2.0));
        assert_eq!(r.peak_link_gbps, Some(4.5));
        assert_eq!(r.fault_series.len(), 3);
        assert_eq!(r.fault_series_x, "fault number");
        assert!(r.histograms.contains_key(kind::GUEST_FAULT));
        assert!(r.histograms.contains_key(kind::VMM_FAULT));
        // No outage: nothing recorded for it.
        assert_eq!(r.outage_fault_us.count, 0);
        assert!(!r.histograms.contains_key(kind::OUTAGE_FAULT));
        assert!(!r.histograms.contains_key(kind::GUEST_OUTAGE_FAULT));
        assert_eq!((r.recoveries, r.dst_recoveries), (None, None));
    }

    #[test]
    fn passes_are_split_at_the_end_of_postcopy() {
        let t0 = Instant::now();
        let line = |ms: u64, text: &str| Line {
            at: t0 + Duration::from_millis(ms),
            text: text.into(),
        };
        let pass = |n: u64| {
            format!("WORKLOAD pass n={n} pages=1 mismatches=0 elapsed_ms=1 slow_accesses=0")
        };
        let lines = vec![
            line(10, &pass(3)),
            line(
                20,
                "WORKLOAD HIST name=access_slow pass=3 unit=ns buckets=4096:1",
            ),
            line(50, &pass(4)),
            line(90, &pass(5)),
            line(130, &pass(6)),
        ];
        // Postcopy ended at 60 ms: pass 3 (began on the source), 4 (began at 10) and 5 (began
        // at 50) overlapped it; pass 6 began at 90.
        assert_eq!(
            passes_begun_before(&lines, t0 + Duration::from_millis(60)),
            vec![3, 4, 5]
        );
        assert_eq!(passes_begun_before(&lines, t0), vec![3]);
    }

    #[test]
    fn listening_detection_sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(is_listening(std::process::id(), port));
        drop(l);
        assert!(!is_listening(std::process::id(), port));
        assert!(tx_bytes(std::process::id(), "lo").is_some());
    }
}
