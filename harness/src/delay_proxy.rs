//! A userspace TCP proxy that adds a fixed one-way delay in each direction (netem is not
//! available here). Every accepted connection is forwarded to one upstream address; per
//! direction a reader thread timestamps each chunk it reads and a writer thread sends the
//! chunk once `delay` has passed since it was read, so throughput is not limited by the delay
//! (chunks pipeline), only latency grows.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors from starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the delay proxy on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("configuring the delay proxy listener: {0}")]
    Setup(std::io::Error),
}

/// A running proxy; stops accepting when dropped (open connections end when either side
/// closes).
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream` with `delay` added to
    /// each direction. The threads inherit the caller thread's network namespace.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        delay: Duration,
    ) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind(listen).map_err(|source| ProxyError::Bind {
            addr: listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(ProxyError::Setup)?;
        listener.set_nonblocking(true).map_err(ProxyError::Setup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = std::thread::Builder::new().name("delay-conn".into()).spawn(
                                move || {
                                    if let Err(e) = forward(client, upstream, delay) {
                                        tracing::debug!("delay proxy connection: {e}");
                                    }
                                },
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .map_err(ProxyError::Setup)?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn forward(client: TcpStream, upstream: SocketAddr, delay: Duration) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect(upstream)?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let up = pipe(client.try_clone()?, server.try_clone()?, delay)?;
    let down = pipe(server, client, delay)?;
    for h in up.into_iter().chain(down) {
        let _ = h.join();
    }
    Ok(())
}

/// One direction: reader thread -> channel of (read time, bytes) -> writer thread.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
) -> std::io::Result<[JoinHandle<()>; 2]> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = std::thread::Builder::new()
        .name("delay-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
            // Dropping tx tells the writer to finish and half-close.
        })?;
    let writer = std::thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || {
            for (t, chunk) in rx {
                let due = t + delay;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok([reader, writer])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Percentiles;
    use crate::limits::{self, EchoServer};

    #[test]
    fn adds_delay_each_way_and_passes_bulk_data() {
        let server = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let direct = Percentiles::us(&limits::tcp_round_trip(server.addr(), 100).unwrap());
        let proxy = DelayProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server.addr(),
            Duration::from_millis(2),
        )
        .unwrap();
        let delayed = Percentiles::us(&limits::tcp_round_trip(proxy.addr(), 100).unwrap());
        // Two one-way delays of 2 ms: the round trip grows by at least 4 ms.
        assert!(
            delayed.p50 >= direct.p50 + 4000.0,
            "direct {} us, delayed {} us",
            direct.p50,
            delayed.p50
        );
        assert!(delayed.p50 < 50_000.0, "delayed p50 {} us", delayed.p50);
        let gbps = limits::tcp_throughput(proxy.addr(), Duration::from_millis(300)).unwrap();
        assert!(gbps > 0.05, "{gbps} Gbit/s through the proxy");
    }
}
