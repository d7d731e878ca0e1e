//! The physical limits a postcopy fault is compared against, measured by the harness itself in
//! the same run: (a) the raw userfaultfd round trip with the page already local (shmem MINOR +
//! `UFFDIO_CONTINUE` of 4 KiB, served by another thread), (b) the raw 4 KiB request/reply round
//! trip over TCP on the link, (c) raw TCP bulk throughput over the link, and (d) the raw **vCPU**
//! userfault round trip with the page already local (`vmm fault-limit`: the workload guest's
//! first touch of every page served by a minimal handler), which is what a postcopy fault really
//! pays on top of the network: a vCPU fault goes through KVM and costs more than a thread's (a).

use crate::histogram::{self, HistogramError, LatencyHistogram};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userfaultfd::{Event, RegisterMode, UffdBuilder};

/// Keeps every CPU out of idle while alive: one thread per CPU spins at nice 19.
///
/// On these machines (a VM on an outer hypervisor) waking a thread on an idle CPU costs about
/// 100 us, on a busy one about 10 us (measured: thread userfault round trip p50 134 us with
/// both cores idle, 11.9 us with one busy). A migration never runs on idle CPUs (the guest's
/// vCPUs spin), so the round-trip limits are measured with the CPUs kept awake like this; the
/// spinners yield to any real work (nice 19 against nice 0).
pub struct KeepAwake {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl KeepAwake {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cpus)
            .filter_map(|i| {
                let stop = Arc::clone(&stop);
                std::thread::Builder::new()
                    .name(format!("keep-awake-{i}"))
                    .spawn(move || {
                        // SAFETY: setpriority on the calling thread (PRIO_PROCESS with tid 0
                        // means the caller on Linux); it only lowers this thread's priority.
                        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                    .ok()
            })
            .collect();
        KeepAwake { stop, threads }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Size of a page request on the wire in the round-trip measurement (a header-sized message).
pub const REQUEST_BYTES: usize = 16;
/// Size of the reply: one 4 KiB page.
pub const REPLY_BYTES: usize = 4096;
const PAGE: usize = 4096;
const MODE_ECHO: u8 = b'E';
const MODE_SINK: u8 = b'S';
const MODE_SINK_MEMORY: u8 = b'M';
/// Buffer each side of the memory-to-memory throughput uses ((c'') below): far larger than
/// any cache here, as guest RAM is, and pre-touched, so no page is allocated while it runs.
pub const MEMORY_LIMIT_BYTES: usize = 256 << 20;
/// Size of each write of the throughput measurements.
const CHUNK: usize = 1 << 20;

/// Errors from limit measurements.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{what} failed: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
    #[error("userfaultfd {what} failed: {source}")]
    Uffd {
        what: &'static str,
        source: userfaultfd::Error,
    },
    #[error("the userfaultfd server thread panicked")]
    ServerPanicked,
    #[error("{0} panicked")]
    Thread(&'static str),
    #[error("UFFDIO_CONTINUE at {page:#x} failed: {source}")]
    Continue {
        page: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("the userfaultfd server served {served} faults for {samples} accesses: the accesses did not fault")]
    NoFaults { served: u64, samples: usize },
    #[error("{what} with {addr} failed: {source}")]
    Net {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Histogram(#[from] HistogramError),
    #[error("`{command}` failed: {source}")]
    FaultLimit {
        command: String,
        #[source]
        source: FaultLimitFailure,
    },
}

/// What went wrong running `vmm fault-limit`.
#[derive(Debug, thiserror::Error)]
pub enum FaultLimitFailure {
    #[error("creating {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start it: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("no result within {0:?}")]
    Timeout(Duration),
    #[error("waiting for it: {0}")]
    Wait(#[source] std::io::Error),
    #[error("{status}: {stderr}")]
    Exit {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("its JSON output does not parse: {0}")]
    Json(#[source] serde_json::Error),
    #[error("it reported {guest} guest and {vmm} VMM samples")]
    NoSamples { guest: u64, vmm: u64 },
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LimitError {
    let what = what.into();
    move |source| LimitError::Os { what, source }
}

/// A shared mapping of a memfd, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn shared(fd: &OwnedFd, len: usize) -> Result<Self, LimitError> {
        // SAFETY: a fresh shared mapping of `len` bytes of a memfd we own; the kernel picks the
        // address, nothing else refers to it, and it is unmapped exactly once in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(LimitError::Os {
                what: format!("mmap of a {len}-byte shmem memfd"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned; no reference into the mapping
        // outlives the Mapping.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// (a) Raw userfault round trip with the page already local: one thread reads a byte of a
/// MINOR-registered shmem page whose page cache is filled; another thread, blocked in poll() on
/// the userfaultfd, reads the fault and `UFFDIO_CONTINUE`s those 4 KiB. Each sample is the
/// reader's time from just before the access to just after it returns, in ns. Between samples
/// the page table entry is dropped with `MADV_DONTNEED` (shmem keeps the page cache), so every
/// access faults again.
pub fn uffd_round_trip(samples: usize) -> Result<LatencyHistogram, LimitError> {
    let _awake = KeepAwake::start();
    const PAGES: usize = 64;
    let len = PAGES * PAGE;
    let fd = nix::sys::memfd::memfd_create(
        c"harness-uffd-limit",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| os("memfd_create for the userfault limit")(e.into()))?;
    nix::unistd::ftruncate(&fd, len as libc::off_t)
        .map_err(|e| os(format!("ftruncate of the limit memfd to {len} bytes"))(e.into()))?;
    // Fill the page cache through an alias that is never registered.
    let alias = Mapping::shared(&fd, len)?;
    // SAFETY: the alias mapping is `len` bytes, writable, and only this thread touches it now.
    unsafe { std::ptr::write_bytes(alias.addr as *mut u8, 0x5a, len) };
    let target = Mapping::shared(&fd, len)?;

    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
        .map_err(|source| LimitError::Uffd {
            what: "creation",
            source,
        })?;
    uffd.register_with_mode(target.addr, len, RegisterMode::MINOR)
        .map_err(|source| LimitError::Uffd {
            what: "MINOR registration of a shmem mapping (needs UFFD_FEATURE_MINOR_SHMEM)",
            source,
        })?;
    let uffd = Arc::new(uffd);
    let stop = Arc::new(AtomicBool::new(false));

    let server = {
        let uffd = Arc::clone(&uffd);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("uffd-limit-server".into())
            .spawn(move || -> Result<u64, LimitError> {
                let mut served = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, count 1.
                    let n = unsafe { libc::poll(&mut pfd, 1, 50) };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(os("poll on the userfaultfd")(e));
                    }
                    if n == 0 {
                        continue;
                    }
                    while let Some(ev) = uffd.read_event().map_err(|source| LimitError::Uffd {
                        what: "read of a fault event",
                        source,
                    })? {
                        if let Event::Pagefault { addr, .. } = ev {
                            let page = (addr as usize) & !(PAGE - 1);
                            // EAGAIN-safe, as the VMM's own fault service.
                            migration::postcopy::sys::uffd_ioctl(
                                || uffd.r#continue(page as *mut libc::c_void, PAGE, true),
                                || stop.load(Ordering::Relaxed),
                            )
                            .0
                            .map_err(|source| LimitError::Continue { page, source })?;
                            served += 1;
                        }
                    }
                }
                Ok(served)
            })
            .map_err(os("spawning the userfault server thread"))?
    };

    let mut h = histogram::new_histogram()?;
    let base = target.addr as *mut u8;
    let mut result = Ok(());
    for i in 0..samples {
        let p = (i % PAGES) * PAGE;
        let t0 = Instant::now();
        // SAFETY: `p` is inside the `len`-byte target mapping; the read faults and is served by
        // the server thread (the page cache holds the page, so CONTINUE maps it).
        let v = unsafe { std::ptr::read_volatile(base.add(p)) };
        let dt = t0.elapsed();
        std::hint::black_box(v);
        h.saturating_record((dt.as_nanos() as u64).max(1));
        // SAFETY: MADV_DONTNEED of one page of our own shared mapping: it drops the PTE only;
        // the shmem page cache keeps the data, so the next access is a MINOR fault again.
        if unsafe { libc::madvise(base.add(p) as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) }
            != 0
        {
            result = Err(os("madvise(MADV_DONTNEED) of a limit page")(
                std::io::Error::last_os_error(),
            ));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let served = server.join().map_err(|_| LimitError::ServerPanicked)??;
    result?;
    if served < samples as u64 {
        return Err(LimitError::NoFaults { served, samples });
    }
    Ok(h)
}

/// A tiny TCP server for the link limits: on each connection the first byte selects echo
/// mode (read a [`REQUEST_BYTES`] request, reply [`REPLY_BYTES`], repeat) or sink mode (read to
/// EOF, then reply the byte count as a little-endian u64). Stops when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds `addr` (port 0 picks one) and serves in background threads. Threads inherit the
    /// caller thread's network namespace.
    pub fn start(addr: SocketAddr) -> Result<Self, LimitError> {
        let listener = TcpListener::bind(addr).map_err(|source| LimitError::Net {
            what: "binding the echo server",
            addr,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| LimitError::Net {
            what: "reading the echo server address",
            addr,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(os("set_nonblocking on the echo listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = std::thread::Builder::new()
                                .name("echo-conn".into())
                                .spawn(move || serve_conn(s));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(os("spawning the echo server thread"))?;
        Ok(Self {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        MODE_ECHO => {
            let mut req = [0u8; REQUEST_BYTES];
            let reply = [0xa5u8; REPLY_BYTES];
            while s.read_exact(&mut req).is_ok() {
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
        }
        MODE_SINK | MODE_SINK_MEMORY => {
            // Sink: into one 1 MiB buffer (cache-hot); memory sink: into a pre-touched
            // MEMORY_LIMIT_BYTES buffer at a cycling offset, as a destination writes guest RAM.
            let len = if mode[0] == MODE_SINK {
                CHUNK
            } else {
                MEMORY_LIMIT_BYTES
            };
            let mut buf = vec![1u8; len];
            let (mut total, mut off) = (0u64, 0usize);
            loop {
                let end = (off + CHUNK).min(len);
                match s.read(&mut buf[off..end]) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        off = if off + n >= len { 0 } else { off + n };
                    }
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&total.to_le_bytes());
        }
        _ => {}
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, LimitError> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|source| {
        LimitError::Net {
            what: "connecting to the echo server",
            addr,
            source,
        }
    })?;
    s.set_nodelay(true).map_err(os("TCP_NODELAY"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(os("SO_RCVTIMEO"))?;
    Ok(s)
}

/// (b) Raw request/reply round trip: `samples` times send a [`REQUEST_BYTES`] request and read
/// a [`REPLY_BYTES`] reply on one TCP connection (TCP_NODELAY), in ns. The first 10 exchanges
/// warm the connection up and are not recorded.
pub fn tcp_round_trip(addr: SocketAddr, samples: usize) -> Result<LatencyHistogram, LimitError> {
    let _awake = KeepAwake::start();
    let mut s = connect(addr)?;
    let net = |what: &'static str| move |source| LimitError::Net { what, addr, source };
    s.write_all(&[MODE_ECHO]).map_err(net("sending the mode"))?;
    let req = [0x11u8; REQUEST_BYTES];
    let mut reply = vec![0u8; REPLY_BYTES];
    let mut h = histogram::new_histogram()?;
    for i in 0..samples + 10 {
        let t0 = Instant::now();
        s.write_all(&req).map_err(net("sending a request"))?;
        s.read_exact(&mut reply).map_err(net("reading a reply"))?;
        if i >= 10 {
            h.saturating_record((t0.elapsed().as_nanos() as u64).max(1));
        }
    }
    Ok(h)
}

/// (c) Raw TCP throughput: send 1 MiB writes for `duration` on one connection, then half-close
/// and wait for the server's byte count. Returns Gbit/s (10^9 bit/s) over the whole exchange,
/// counting only bytes the server confirmed reading.
pub fn tcp_throughput(addr: SocketAddr, duration: Duration) -> Result<f64, LimitError> {
    stream_for(addr, duration, MODE_SINK, CHUNK)
}

/// Send `CHUNK` writes for `duration` from a `len`-byte buffer, at a cycling offset, to a
/// server in `mode`; Gbit/s the server confirmed.
fn stream_for(
    addr: SocketAddr,
    duration: Duration,
    mode: u8,
    len: usize,
) -> Result<f64, LimitError> {
    let t0 = Instant::now();
    stream_while(addr, &|| t0.elapsed() < duration, mode, len)
}

/// As [`stream_for`], for as long as `go` says.
fn stream_while(
    addr: SocketAddr,
    go: &dyn Fn() -> bool,
    mode: u8,
    len: usize,
) -> Result<f64, LimitError> {
    let mut s = connect(addr)?;
    let net = |what: &'static str| move |source| LimitError::Net { what, addr, source };
    s.write_all(&[mode]).map_err(net("sending the mode"))?;
    let buf = vec![0x3cu8; len];
    let t0 = Instant::now();
    let mut off = 0;
    // At least one chunk: a sender that got its CPU only after `go` turned false (a loaded
    // host) would otherwise send nothing and report 0 Gbit/s as if measured.
    loop {
        s.write_all(&buf[off..off + CHUNK])
            .map_err(net("bulk sending"))?;
        off = (off + CHUNK) % len;
        if !go() {
            break;
        }
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(net("half-closing"))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .map_err(net("reading the byte count"))?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(u64::from_le_bytes(count) as f64 * 8.0 / secs / 1e9)
}

/// Busy CPUs while alive: `n` threads that spin at normal priority (nice 0), as the guest's
/// vCPUs do during a migration (they never halt), so they compete with the sender for the
/// CPUs instead of yielding like [`KeepAwake`].
pub struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Spinners {
    /// Starts `n` spinning threads.
    pub fn start(n: u32) -> Result<Self, LimitError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut sp = Spinners {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for i in 0..n {
            let stop = Arc::clone(&stop);
            let t = std::thread::Builder::new()
                .name(format!("vcpu-spinner-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
                .map_err(os("spawning a vCPU spinner thread"))?;
            sp.threads.push(t);
        }
        Ok(sp)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// (c') Raw TCP throughput as in [`tcp_throughput`], with one spinning thread per guest vCPU
/// ([`Spinners`]) running beside it: the honest limit of the bulk push while the guest runs.
pub fn tcp_throughput_loaded(
    addr: SocketAddr,
    duration: Duration,
    vcpus: u32,
) -> Result<f64, LimitError> {
    let _spin = Spinners::start(vcpus)?;
    tcp_throughput(addr, duration)
}

/// (b') The round trip of [`tcp_round_trip`] on a link that is busy the way a postcopy's is:
/// a raw bulk stream ([`tcp_throughput`]'s 1 MiB writes) runs on a second connection to the
/// same server, and `vcpus` threads spin ([`Spinners`]). The request and the reply then wait
/// for CPUs behind the bulk stream's system calls, as a fault's do behind the push: the limit
/// of the fault tail on this link.
pub fn tcp_round_trip_beside_bulk(
    addr: SocketAddr,
    samples: usize,
    vcpus: u32,
) -> Result<LatencyHistogram, LimitError> {
    let _spin = Spinners::start(vcpus)?;
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("bulk-beside-rtt".into())
            .spawn(move || stream_while(addr, &|| !stop.load(Ordering::Relaxed), MODE_SINK, CHUNK))
            .map_err(os("spawning the bulk stream thread"))?
    };
    // Let the stream reach its rate before the first sample.
    std::thread::sleep(Duration::from_millis(50));
    let rtt = tcp_round_trip(addr, samples);
    stop.store(true, Ordering::Relaxed);
    bulk.join()
        .map_err(|_| LimitError::Thread("the bulk stream beside the round trips"))??;
    rtt
}

/// (c'') Raw TCP from memory to memory: as (c'), with `vcpus` spinning threads beside the
/// sender, but each side streams through a pre-touched [`MEMORY_LIMIT_BYTES`] buffer instead
/// of one cache-hot 1 MiB buffer, so every byte is read from and written to RAM, as a
/// migration's pages are. What is left between this and (c') is the memory traffic, not the
/// network.
pub fn tcp_throughput_memory(
    addr: SocketAddr,
    duration: Duration,
    vcpus: u32,
) -> Result<f64, LimitError> {
    let _spin = Spinners::start(vcpus)?;
    stream_for(addr, duration, MODE_SINK_MEMORY, MEMORY_LIMIT_BYTES)
}

/// The limits of one link.
#[derive(Clone, Debug)]
pub struct LinkLimits {
    pub tcp_rtt: LatencyHistogram,
    /// (b') the same round trip beside a bulk stream and the spinning threads.
    pub tcp_rtt_loaded: LatencyHistogram,
    pub throughput_gbps: f64,
    /// (c') with `vcpus` spinning threads beside the sender.
    pub loaded_throughput_gbps: f64,
    /// (c'') memory to memory, with `vcpus` spinning threads beside the sender.
    pub memory_throughput_gbps: f64,
}

/// (b), (c) and (c') against a running [`EchoServer`] at `addr`; `vcpus` is the guest's vCPU
/// count (the spinning threads of (c')).
pub fn measure_link(
    addr: SocketAddr,
    rtt_samples: usize,
    throughput_for: Duration,
    vcpus: u32,
) -> Result<LinkLimits, LimitError> {
    Ok(LinkLimits {
        tcp_rtt: tcp_round_trip(addr, rtt_samples)?,
        tcp_rtt_loaded: tcp_round_trip_beside_bulk(addr, rtt_samples, vcpus)?,
        throughput_gbps: tcp_throughput(addr, throughput_for)?,
        loaded_throughput_gbps: tcp_throughput_loaded(addr, throughput_for, vcpus)?,
        memory_throughput_gbps: tcp_throughput_memory(addr, throughput_for, vcpus)?,
    })
}

/// Guest RAM of the `vmm fault-limit` run: 256 MiB, about 64k first touches.
pub const VCPU_LIMIT_MEMORY_MIB: u64 = 256;

/// The backing `vmm fault-limit` takes the faults of `backing` on: the 4k-staged strategy serves
/// every fault of a hugetlb or guest_memfd region from a shmem staging mapping (MINOR + 4 KiB
/// `UFFDIO_CONTINUE`), so everything but anon is measured on shmem.
pub fn vcpu_limit_backing(backing: &str) -> &'static str {
    if backing == "anon" {
        "anon"
    } else {
        "shmem"
    }
}

/// (d) The raw vCPU userfault round trip with the page already local, from `vmm fault-limit`.
#[derive(Clone, Debug)]
pub struct VcpuFaultLimit {
    /// The backing the faults were taken on (see [`vcpu_limit_backing`]).
    pub backing: String,
    /// How each fault was served, as `vmm fault-limit` names it.
    pub service: String,
    /// The round trip as the guest saw it (its first store to each page), ns.
    pub guest: LatencyHistogram,
    /// The handler's fault read -> ioctl done, ns.
    pub vmm: LatencyHistogram,
}

/// (d) Runs `VMM fault-limit --kernel KERNEL --backing B --memory M --vcpus N --json` (killed
/// after `timeout`), keeps its stdout in `save_to`, and reads the two histograms.
pub fn vcpu_fault_limit(
    vmm: &Path,
    kernel: &Path,
    backing: &str,
    vcpus: u32,
    timeout: Duration,
    save_to: &Path,
) -> Result<VcpuFaultLimit, LimitError> {
    let _awake = KeepAwake::start();
    let backing = vcpu_limit_backing(backing);
    let memory = format!("{VCPU_LIMIT_MEMORY_MIB}M");
    let vcpus = vcpus.to_string();
    let args = [
        "fault-limit".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--backing".as_ref(),
        backing.as_ref(),
        "--memory".as_ref(),
        memory.as_ref(),
        "--vcpus".as_ref(),
        vcpus.as_ref(),
        "--json".as_ref(),
    ];
    let command = format!(
        "{} {}",
        vmm.display(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let fail = |source: FaultLimitFailure| LimitError::FaultLimit {
        command: command.clone(),
        source,
    };
    let out = std::fs::File::create(save_to).map_err(|source| {
        fail(FaultLimitFailure::Create {
            path: save_to.to_owned(),
            source,
        })
    })?;
    let err_path = save_to.with_extension("stderr");
    let err = std::fs::File::create(&err_path).map_err(|source| {
        fail(FaultLimitFailure::Create {
            path: err_path.clone(),
            source,
        })
    })?;
    let mut child = std::process::Command::new(vmm)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| fail(FaultLimitFailure::Spawn(e)))?;
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() > timeout => {
                // Ends only the child we started (by its pid).
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(FaultLimitFailure::Timeout(timeout)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(fail(FaultLimitFailure::Wait(e))),
        }
    };
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        return Err(fail(FaultLimitFailure::Exit {
            status,
            stderr: stderr.trim().to_owned(),
        }));
    }
    let text = std::fs::read_to_string(save_to).map_err(|source| {
        fail(FaultLimitFailure::Read {
            path: save_to.to_owned(),
            source,
        })
    })?;
    let j: vmm::fault_limit::FaultLimitReport =
        serde_json::from_str(text.trim()).map_err(|e| fail(FaultLimitFailure::Json(e)))?;
    let guest = histogram::from_guest_buckets(&j.guest_buckets_ns, j.guest_sub_buckets)?;
    let mut vmm_h = histogram::new_histogram()?;
    for (v, n) in j.vmm_histogram_ns {
        vmm_h.saturating_record_n(v.max(1), n);
    }
    if guest.is_empty() || vmm_h.is_empty() {
        return Err(fail(FaultLimitFailure::NoSamples {
            guest: guest.len(),
            vmm: vmm_h.len(),
        }));
    }
    Ok(VcpuFaultLimit {
        backing: j.measured_backing.to_string(),
        service: j.service,
        guest,
        vmm: vmm_h,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Percentiles;

    #[test]
    fn uffd_round_trip_is_plausible() {
        let h = uffd_round_trip(500).unwrap();
        let p = Percentiles::us(&h);
        assert_eq!(p.count, 500);
        // A real fault costs at least a microsecond; under a millisecond at the median.
        assert!(p.p50 > 0.5 && p.p50 < 1000.0, "p50 {} us", p.p50);
    }

    #[test]
    fn loopback_round_trip_and_throughput() {
        let server = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = measure_link(server.addr(), 200, Duration::from_millis(300), 1).unwrap();
        assert_eq!(l.tcp_rtt.len(), 200);
        assert_eq!(l.tcp_rtt_loaded.len(), 200);
        assert!(Percentiles::us(&l.tcp_rtt).p50 > 0.0);
        assert!(l.throughput_gbps > 0.05, "{} Gbit/s", l.throughput_gbps);
        assert!(
            l.loaded_throughput_gbps > 0.05,
            "{} Gbit/s",
            l.loaded_throughput_gbps
        );
    }
}
