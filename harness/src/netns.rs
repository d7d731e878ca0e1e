//! Two "hosts" made of network namespaces joined by a veth pair, with an optional bandwidth cap
//! (a TBF qdisc on both ends, pfifo_fast inside it). Names carry the harness PID so concurrent runs never collide;
//! the namespaces (and with them the veth pair and qdiscs) are deleted on drop, on panic
//! unwinding, and on SIGINT/SIGTERM through [`crate::cleanup`].
//!
//! Addresses come from 192.0.2.0/24 (TEST-NET-1, documentation only): the traffic never leaves
//! the two namespaces.

use crate::cleanup;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Source side address.
pub const SRC_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Destination side address.
pub const DST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Prefix of every namespace this harness creates: `harness-<pid>-<n>-{src,dst}`.
pub const NS_PREFIX: &str = "harness-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Errors from namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running `{cmd}` failed: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` exited with {status}: {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("entering namespace {ns}: {what}: {source}")]
    Enter {
        ns: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the thread running inside namespace {0} panicked")]
    Panicked(String),
}

/// Which end of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

fn run(args: &[&str]) -> Result<(), NetnsError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Failed {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// TBF burst for a rate: at least 10 ms worth of bytes at that rate (so the kernel's timer
/// granularity does not cap the rate), and at least 256 KiB (veth hands TSO/GSO segments of
/// up to 64 KiB).
pub fn tbf_burst_bytes(rate_mbit: u64) -> u64 {
    (rate_mbit * 1_000_000 / 8 / 100).max(256 * 1024)
}

/// Two namespaces joined by a veth pair.
#[derive(Debug)]
pub struct NetnsPair {
    src: String,
    dst: String,
    veth_src: String,
    veth_dst: String,
    rate_mbit: Option<u64>,
}

impl NetnsPair {
    /// Creates `harness-<pid>-<n>-src` and `-dst`, a veth pair between them with
    /// [`SRC_IP`]/[`DST_IP`] (/24), loopback up in both, and with `rate_mbit` a TBF qdisc
    /// capping each direction.
    pub fn create(rate_mbit: Option<u64>) -> Result<Self, NetnsError> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let src = format!("{NS_PREFIX}{pid}-{n}-src");
        let dst = format!("{NS_PREFIX}{pid}-{n}-dst");
        // Interface names are at most 15 characters; they live only inside the namespaces,
        // but are created in the root namespace first, so they must be unique there too.
        let vs = format!("hv{pid}x{n}s");
        let vd = format!("hv{pid}x{n}d");
        let pair = Self {
            src,
            dst,
            veth_src: vs.clone(),
            veth_dst: vd.clone(),
            rate_mbit,
        };
        for ns in [&pair.src, &pair.dst] {
            cleanup::register_namespace(ns);
        }
        // From here on Drop deletes whatever was made.
        run(&["ip", "netns", "add", &pair.src])?;
        run(&["ip", "netns", "add", &pair.dst])?;
        let made = run(&[
            "ip", "link", "add", &vs, "netns", &pair.src, "type", "veth", "peer", "name", &vd,
            "netns", &pair.dst,
        ]);
        if let Err(e) = made {
            // The pair may exist in the root namespace if moving it failed.
            let _ = run(&["ip", "link", "del", &vs]);
            return Err(e);
        }
        let (sip, dip) = (format!("{SRC_IP}/24"), format!("{DST_IP}/24"));
        for (ns, dev, ip) in [(&pair.src, &vs, &sip), (&pair.dst, &vd, &dip)] {
            run(&["ip", "-n", ns, "addr", "add", ip, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            if let Some(rate) = rate_mbit {
                let rate_s = format!("{rate}mbit");
                let burst = tbf_burst_bytes(rate).to_string();
                run(&[
                    "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                    "rate", &rate_s, "burst", &burst, "latency", "50ms",
                ])?;
                // Inside the shaper, this host's default qdisc (pfifo_fast, three priority
                // bands) instead of TBF's single FIFO: a socket that asks for interactive
                // priority (the urgent channel) is dequeued ahead of bulk traffic queued in
                // the shaper, as it is on an unshaped link here.
                run(&[
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "parent",
                    "1:1",
                    "handle",
                    "10:",
                    "pfifo_fast",
                ])?;
            }
        }
        Ok(pair)
    }

    /// The namespace name of one side.
    pub fn name(&self, side: Side) -> &str {
        match side {
            Side::Src => &self.src,
            Side::Dst => &self.dst,
        }
    }

    /// The veth device of one side (named inside that side's namespace).
    pub fn veth_name(&self, side: Side) -> &str {
        match side {
            Side::Src => &self.veth_src,
            Side::Dst => &self.veth_dst,
        }
    }

    /// The address of one side.
    pub fn ip(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::Src => SRC_IP,
            Side::Dst => DST_IP,
        }
    }

    /// The bandwidth cap, if any.
    pub fn rate_mbit(&self) -> Option<u64> {
        self.rate_mbit
    }

    /// A command that runs `program` inside one side (`ip netns exec NS program`).
    pub fn command(&self, side: Side, program: &std::ffi::OsStr) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name(side)]).arg(program);
        c
    }

    /// Runs `f` on a new thread that has entered one side's network namespace. Sockets `f`
    /// creates, and threads it spawns, stay in that namespace after `f` returns.
    pub fn run_in<T, F>(&self, side: Side, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        run_in_namespace(self.name(side), f)
    }
}

/// Runs `f` on a new thread inside the named network namespace (`/run/netns/NAME`).
pub fn run_in_namespace<T, F>(ns: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || -> Result<T, NetnsError> {
            let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
                ns: name.clone(),
                what: "opening the namespace file",
                source,
            })?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetnsError::Enter {
                    ns: name.clone(),
                    what: "setns(CLONE_NEWNET)",
                    source: e.into(),
                }
            })?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Enter {
            ns: ns.to_string(),
            what: "spawning a thread",
            source,
        })?;
    handle
        .join()
        .map_err(|_| NetnsError::Panicked(ns.to_string()))?
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            if let Err(e) = cleanup::delete_namespace(ns) {
                // Already gone (creation failed half-way) is fine; say anything else.
                if std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
                    tracing::error!("{e}");
                }
            }
            cleanup::unregister_namespace(ns);
        }
    }
}

/// Deletes namespaces left behind by harness processes that no longer exist (e.g. killed with
/// SIGKILL). Returns the names deleted.
pub fn delete_stale() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && cleanup::delete_namespace(&name).is_ok()
        {
            deleted.push(name);
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{self, EchoServer};
    use std::net::SocketAddr;

    #[test]
    fn burst_is_large_enough() {
        assert_eq!(tbf_burst_bytes(10_000), 12_500_000);
        assert_eq!(tbf_burst_bytes(10), 256 * 1024);
    }

    #[test]
    fn pair_carries_traffic_under_the_cap_and_is_removed() {
        let pair = NetnsPair::create(Some(200)).unwrap();
        let (src, dst) = (
            pair.name(Side::Src).to_string(),
            pair.name(Side::Dst).to_string(),
        );
        assert!(std::path::Path::new(&format!("/run/netns/{dst}")).exists());
        let server = pair
            .run_in(Side::Dst, || {
                EchoServer::start(SocketAddr::new(DST_IP.into(), 0))
            })
            .unwrap()
            .unwrap();
        let addr = server.addr();
        let gbps = pair
            .run_in(Side::Src, move || {
                limits::tcp_throughput(addr, std::time::Duration::from_millis(700))
            })
            .unwrap()
            .unwrap();
        // 200 Mbit/s cap: well below loopback speed, and not far below the cap.
        assert!(
            gbps < 0.3 && gbps > 0.1,
            "{gbps} Gbit/s under a 200 Mbit/s cap"
        );
        // The root namespace cannot reach it.
        assert!(
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300))
                .is_err()
        );
        drop(server);
        drop(pair);
        assert!(!std::path::Path::new(&format!("/run/netns/{src}")).exists());
        assert!(!std::path::Path::new(&format!("/run/netns/{dst}")).exists());
    }
}
