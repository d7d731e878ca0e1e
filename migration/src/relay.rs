//! A fault-injecting TCP relay for tests and the latency harness.
//!
//! [`Relay`] sits between a migration source and destination (normally both on 127.0.0.1) and
//! forwards every accepted connection to one upstream address, byte for byte, adding as little
//! latency as it can (TCP_NODELAY on both legs, every read forwarded at once). On command it
//! simulates network failures: it resets every open connection (an RST to both peers, as a
//! router dropping the flow would cause), resets after a given number of bytes, black-holes the
//! traffic (nothing read or forwarded while the connections stay open, so senders' buffers fill
//! and they block), or refuses new connections.
//!
//! Threads: one accept thread, and per connection pair one forwarding thread per direction. Each
//! socket is owned by exactly one `TcpStream` (never `try_clone`d) inside an `Arc<Pair>` shared
//! by the pair's two threads, so it is closed exactly when its last owner lets go; a reset first
//! sets `SO_LINGER {on, 0}` so that this close sends an RST.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Forwarding buffer per direction.
const BUF_SIZE: usize = 256 * 1024;
/// Read/write timeout of relayed sockets: how soon a blocked forwarding thread sees a flag.
const IO_TIMEOUT: Duration = Duration::from_millis(10);
/// How long the accept thread waits in `poll(2)` before re-checking `stop`.
const ACCEPT_POLL_MS: libc::c_int = 5;
/// Sleep between checks of the black-hole flag while traffic is held.
const HOLD_POLL: Duration = Duration::from_millis(2);
/// Bound on connecting upstream, so that `Drop` cannot hang on a dead upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on how long `reset` waits for the reset sockets to be closed.
const RESET_WAIT: Duration = Duration::from_secs(2);

/// Errors from starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The listening socket could not be bound.
    #[error("relay cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
    /// Configuring the listener or starting the accept thread failed.
    #[error("relay setup failed: {0}")]
    Setup(#[source] io::Error),
}

/// A running fault-injecting relay; dropping it stops it and resets every connection.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept thread and the forwarding threads.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    accepted: AtomicU64,
    /// Bytes forwarded client->upstream.
    up: AtomicU64,
    /// Bytes forwarded upstream->client.
    down: AtomicU64,
    resets: AtomicU64,
    /// The `up` total at which the armed reset fires; 0 when none is armed.
    reset_at: AtomicU64,
    /// Open pairs by id; the last of a pair's two threads to exit removes it.
    pairs: Mutex<HashMap<u64, Arc<Pair>>>,
    /// Every thread but the accept thread, for `Drop` to join.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// One relayed connection: the accepted client socket and its upstream socket.
struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    /// Set to end the pair with an RST; both direction threads exit on seeing it.
    aborted: AtomicBool,
    /// Direction threads still running.
    running: AtomicUsize,
}

/// The direction a forwarding thread copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Relay {
    /// Listen on `listen` (port 0 picks one) and forward every accepted connection to `upstream`.
    /// A connection whose upstream cannot be connected (within 1 s) is reset.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<Relay, RelayError> {
        let bind_err = |source| RelayError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(RelayError::Setup)?;
        let addr = listener.local_addr().map_err(RelayError::Setup)?;
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(&s, &listener, upstream))
            .map_err(RelayError::Setup)?;
        let accept = Some(accept);
        Ok(Relay {
            addr,
            shared,
            accept,
        })
    }

    /// The address the relay listens on (with the port actually bound).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reset every open connection now: both the client side and the upstream side get a TCP
    /// RST (SO_LINGER {on, 0} then close), as a router dropping the flow would cause. Returns
    /// how many connection pairs were reset; their sockets are closed by the time it returns
    /// (bounded wait). New connections are still accepted afterwards.
    pub fn reset(&self) -> usize {
        self.shared.reset_all(true)
    }

    /// Arm a one-shot reset: once `bytes` more bytes have been forwarded client->upstream
    /// (counting from this call, over all connections), reset every open connection (as
    /// `reset`). Forwarding stops exactly at the limit; `0` resets at once; arming again
    /// replaces a pending limit.
    pub fn reset_after_bytes(&self, bytes: u64) {
        if bytes == 0 {
            self.shared.reset_at.store(0, SeqCst);
            self.reset();
        } else {
            let at = self.shared.up.load(SeqCst).saturating_add(bytes);
            self.shared.reset_at.store(at, SeqCst);
        }
    }

    /// Black-hole on/off: while on, nothing is forwarded in either direction and nothing is
    /// read from any socket (so senders' buffers fill and they block, like packets silently
    /// dropped); connections stay open; new connections are accepted (and connected upstream)
    /// but nothing is forwarded on them either. Turning it off resumes forwarding of whatever
    /// is still open.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, SeqCst);
    }

    /// Refuse on/off: while on, every newly accepted connection is reset at once (never
    /// connected upstream). Existing connections are untouched.
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, SeqCst);
    }

    /// Connection pairs open now.
    pub fn open_connections(&self) -> usize {
        self.shared.pairs.lock_unpoisoned().len()
    }

    /// Connections accepted since start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(SeqCst)
    }

    /// Bytes forwarded client->upstream and upstream->client since start.
    pub fn forwarded(&self) -> (u64, u64) {
        let s = &self.shared;
        (s.up.load(SeqCst), s.down.load(SeqCst))
    }

    /// Reset operations performed so far (by `reset` or an armed `reset_after_bytes`); one
    /// operation may reset several pairs, or none if nothing was open.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Every thread checks `stop` at least every ~10 ms (upstream connects are bounded by
        // CONNECT_TIMEOUT), and forwarding threads reset their pair on seeing it.
        self.shared.stop.store(true, SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // A pair thread pushes its partner's handle before it exits, so joining in rounds
        // until the list stays empty joins every thread.
        loop {
            let handles = std::mem::take(&mut *self.shared.threads.lock_unpoisoned());
            if handles.is_empty() {
                break;
            }
            for handle in handles {
                let _ = handle.join();
            }
        }
    }
}

impl Shared {
    /// Reset every open pair and, if `wait`, wait (bounded) until their sockets are closed.
    /// Forwarding threads call it with `wait == false`: they hold a pair themselves.
    fn reset_all(&self, wait: bool) -> usize {
        let pairs: Vec<Arc<Pair>> = self.pairs.lock_unpoisoned().values().cloned().collect();
        pairs.iter().for_each(|p| p.abort());
        self.resets.fetch_add(1, SeqCst);
        // Once only our clones are left the pairs' threads are gone, and dropping the clones
        // when we return closes the sockets, sending the RSTs.
        let deadline = Instant::now() + RESET_WAIT;
        while wait && pairs.iter().any(|p| Arc::strong_count(p) > 1) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        pairs.len()
    }

    /// Fire the armed reset if its limit has been reached (only one caller wins).
    fn fire_if_due(&self) {
        let at = self.reset_at.load(SeqCst);
        let due = at != 0 && self.up.load(SeqCst) >= at;
        if due
            && self
                .reset_at
                .compare_exchange(at, 0, SeqCst, SeqCst)
                .is_ok()
        {
            tracing::debug!("relay: armed reset fires");
            self.reset_all(false);
        }
    }

    /// Wait while the black-hole is on; false once `pair` must end (relay stopping or reset).
    fn wait_flowing(&self, pair: &Pair) -> bool {
        loop {
            if self.stop.load(SeqCst) {
                pair.abort();
            }
            if pair.aborted.load(SeqCst) {
                return false;
            }
            if !self.blackhole.load(SeqCst) {
                return true;
            }
            thread::sleep(HOLD_POLL);
        }
    }
}

impl Pair {
    /// Make both sockets send an RST when closed and tell both direction threads to exit.
    fn abort(&self) {
        linger_zero(&self.client);
        linger_zero(&self.upstream);
        self.aborted.store(true, SeqCst);
    }
}

/// Timeouts and interruptions mean "nothing happened yet, check the flags and retry".
fn is_transient(e: &io::Error) -> bool {
    use ErrorKind::{Interrupted, TimedOut, WouldBlock};
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// Set `SO_LINGER {on, 0}`: closing the socket then sends an RST and discards unsent data.
fn linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    let value = (&linger as *const libc::linger).cast();
    // SAFETY: the fd is an open socket, kept alive by the `stream` borrow for the whole call;
    // `value` points to an initialised `linger` on our stack and `len` is exactly its size, so
    // the kernel reads only valid memory and keeps no pointer after returning.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            value,
            len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        tracing::debug!("relay: SO_LINGER failed, the close may send a FIN: {e}");
    }
}

/// Wait up to `timeout_ms` for a connection to accept on `listener`.
fn wait_acceptable(listener: &TcpListener, timeout_ms: libc::c_int) -> bool {
    let fd = listener.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one initialised pollfd (nfds == 1) that outlives the call, and its fd
    // stays open because `listener` is borrowed; poll only writes `pfd.revents`.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

/// Blocking I/O with short timeouts (to see flags soon) and no Nagle delay.
fn configure(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// Accept thread: accept (or refuse) connections until `stop`, one pair thread for each.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener, upstream: SocketAddr) {
    let mut next_id = 0u64;
    while !shared.stop.load(SeqCst) {
        if !wait_acceptable(listener, ACCEPT_POLL_MS) {
            continue;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if is_transient(&e) || e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                tracing::warn!("relay: accept failed: {e}");
                thread::sleep(Duration::from_millis(10)); // e.g. out of fds: do not spin
                continue;
            }
        };
        shared.accepted.fetch_add(1, SeqCst);
        if shared.refuse.load(SeqCst) {
            linger_zero(&client); // and dropping it sends the RST
            continue;
        }
        next_id += 1;
        let (id, s) = (next_id, Arc::clone(shared));
        let spawned = thread::Builder::new()
            .name("relay-up".into())
            .spawn(move || run_pair(&s, id, client, upstream));
        let mut threads = shared.threads.lock_unpoisoned();
        threads.retain(|h| !h.is_finished());
        match spawned {
            Ok(handle) => threads.push(handle),
            // The client socket went down with the closure: the client sees it closed.
            Err(e) => tracing::warn!("relay: cannot spawn a connection thread: {e}"),
        }
    }
}

/// Pair thread: connect upstream, start the upstream->client thread, forward client->upstream.
fn run_pair(shared: &Arc<Shared>, id: u64, client: TcpStream, upstream: SocketAddr) {
    let connected = TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT).and_then(|up| {
        configure(&client)
            .and_then(|()| configure(&up))
            .map(|()| up)
    });
    let upstream = match connected {
        Ok(up) => up,
        Err(e) => {
            tracing::debug!("relay: cannot set up the upstream leg to {upstream}: {e}");
            return linger_zero(&client);
        }
    };
    let aborted = AtomicBool::new(false);
    let running = AtomicUsize::new(2);
    let pair = Arc::new(Pair {
        client,
        upstream,
        aborted,
        running,
    });
    shared.pairs.lock_unpoisoned().insert(id, Arc::clone(&pair));
    let (s, p) = (Arc::clone(shared), Arc::clone(&pair));
    let spawned = thread::Builder::new()
        .name("relay-down".into())
        .spawn(move || {
            forward(&s, &p, Dir::Down);
            finish(&s, id, &p);
        });
    match spawned {
        Ok(handle) => shared.threads.lock_unpoisoned().push(handle),
        Err(e) => {
            tracing::warn!("relay: cannot spawn a forwarding thread: {e}");
            pair.abort();
            finish(shared, id, &pair);
        }
    }
    forward(shared, &pair, Dir::Up);
    finish(shared, id, &pair);
}

/// A direction thread is done; the last one unregisters the pair, whose sockets then close as
/// soon as the last `Arc` goes (normally right after this).
fn finish(shared: &Shared, id: u64, pair: &Pair) {
    if pair.running.fetch_sub(1, SeqCst) == 1 {
        shared.pairs.lock_unpoisoned().remove(&id);
    }
}

/// Copy one direction of `pair` until EOF (forwarded as a half-close), an error (the pair is
/// reset), a reset or `stop`.
fn forward(shared: &Shared, pair: &Pair, dir: Dir) {
    let (mut from, to) = match dir {
        Dir::Up => (&pair.client, &pair.upstream),
        Dir::Down => (&pair.upstream, &pair.client),
    };
    let mut buf = vec![0u8; BUF_SIZE];
    // While black-holed, do not even read: the sender's buffers must fill.
    while shared.wait_flowing(pair) {
        match from.read(&mut buf) {
            Ok(0) => {
                // If the other side is gone already, its reader thread sees the error.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) if send(shared, pair, dir, to, &buf[..n]) => {}
            Ok(_) => return,
            Err(e) if is_transient(&e) => {}
            Err(e) => {
                tracing::debug!("relay: read failed, resetting the pair: {e}");
                return pair.abort();
            }
        }
    }
}

/// Write all of `data` to `to`, holding it while black-holed; false if the pair must end.
fn send(shared: &Shared, pair: &Pair, dir: Dir, mut to: &TcpStream, mut data: &[u8]) -> bool {
    let counter = if dir == Dir::Up {
        &shared.up
    } else {
        &shared.down
    };
    while !data.is_empty() {
        if !shared.wait_flowing(pair) {
            return false;
        }
        let mut len = data.len();
        let at = shared.reset_at.load(SeqCst);
        if dir == Dir::Up && at != 0 {
            // Never forward past an armed reset's limit; fire it once the limit is reached.
            let room = at.saturating_sub(counter.load(SeqCst));
            if room == 0 {
                shared.fire_if_due();
                continue;
            }
            len = len.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
        match to.write(&data[..len]) {
            Ok(n) if n > 0 => {
                counter.fetch_add(n as u64, SeqCst);
                data = &data[n..];
                if dir == Dir::Up {
                    shared.fire_if_due();
                }
            }
            // Peer not reading yet (its buffers are full): keep the bytes and retry.
            Err(e) if is_transient(&e) => {}
            res => {
                tracing::debug!("relay: write failed ({res:?}), resetting the pair");
                pair.abort();
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// An upstream listener plus a relay in front of it.
    fn setup() -> (TcpListener, Relay) {
        let upstream = TcpListener::bind(localhost()).unwrap();
        let relay = Relay::start(localhost(), upstream.local_addr().unwrap()).unwrap();
        (upstream, relay)
    }

    /// Accept on `listener` within `timeout`, or None.
    fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                return Some(s);
            }
            thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Connect a client through the relay and accept its upstream leg.
    fn connect(upstream: &TcpListener, relay: &Relay) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(relay.addr()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let server = accept_within(upstream, WAIT).expect("upstream saw no connection");
        (client, server)
    }

    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// True if the next read sees the connection gone (RST or EOF), not a timeout or data.
    fn sees_reset(mut s: &TcpStream) -> bool {
        match s.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    fn round_trip(client: &mut TcpStream, server: &mut TcpStream) {
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }

    #[test]
    fn forwards_both_ways_unchanged() {
        let (upstream, relay) = setup();
        let (mut client, mut server) = connect(&upstream, &relay);
        let echo = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = server.read(&mut buf).unwrap();
                if n == 0 {
                    server.shutdown(Shutdown::Write).unwrap();
                    return;
                }
                server.write_all(&buf[..n]).unwrap();
            }
        });
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut writer = client.try_clone().unwrap();
        let sent = data.clone();
        let w = thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap(); // ends only if the half-closes were forwarded
        w.join().unwrap();
        echo.join().unwrap();
        assert!(back == data, "echoed data differs");
        eventually("byte counters", || relay.forwarded() == (1 << 20, 1 << 20));
        eventually("pair closed", || relay.open_connections() == 0);
    }

    #[test]
    fn reset_resets_both_sides() {
        let (upstream, relay) = setup();
        let (mut client, mut server) = connect(&upstream, &relay);
        round_trip(&mut client, &mut server);
        assert_eq!(relay.open_connections(), 1);
        assert_eq!(relay.reset(), 1);
        assert!(sees_reset(&client), "client did not see the reset");
        assert!(sees_reset(&server), "upstream did not see the reset");
        assert_eq!((relay.resets(), relay.open_connections()), (1, 0));
        let (mut client, mut server) = connect(&upstream, &relay);
        round_trip(&mut client, &mut server);
        assert_eq!(relay.accepted(), 2);
    }

    #[test]
    fn blackhole_holds_then_resumes() {
        let (upstream, relay) = setup();
        let (mut client, mut server) = connect(&upstream, &relay);
        eventually("pair registered", || relay.open_connections() == 1);
        relay.set_blackhole(true);
        let data: Vec<u8> = (0..64u8).collect();
        client.write_all(&data).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let err = server
            .read(&mut [0u8; 64])
            .expect_err("bytes crossed the black-hole");
        assert!(is_transient(&err), "unexpected error {err}");
        assert_eq!(relay.open_connections(), 1);
        relay.set_blackhole(false);
        server.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = [0u8; 64];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &data[..]);
        round_trip(&mut client, &mut server);
    }

    #[test]
    fn refuse_resets_new_connections() {
        let (upstream, relay) = setup();
        relay.set_refuse(true);
        let client = TcpStream::connect(relay.addr()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        assert!(sees_reset(&client), "refused client was not reset");
        assert!(accept_within(&upstream, Duration::from_millis(100)).is_none());
        assert_eq!((relay.accepted(), relay.open_connections()), (1, 0));
        relay.set_refuse(false);
        let (mut client, mut server) = connect(&upstream, &relay);
        round_trip(&mut client, &mut server);
    }

    #[test]
    fn reset_after_bytes_fires_at_the_limit() {
        let (upstream, relay) = setup();
        let (client, mut server) = connect(&upstream, &relay);
        eventually("pair registered", || relay.open_connections() == 1);
        relay.reset_after_bytes(100_000);
        let mut writer = client.try_clone().unwrap();
        // The write fails once the relay resets the connection; that is the point.
        let w = thread::spawn(move || writer.write_all(&vec![7u8; 300_000]).is_ok());
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0usize;
        while let Ok(n @ 1..) = server.read(&mut buf) {
            received += n;
        }
        w.join().unwrap();
        assert!(
            (100_000..300_000).contains(&received),
            "upstream received {received}"
        );
        assert!(sees_reset(&client), "client did not see the reset");
        assert_eq!(relay.resets(), 1);
        eventually("pair closed", || relay.open_connections() == 0);
    }

    #[test]
    fn drop_resets_connections_without_hanging() {
        let (upstream, relay) = setup();
        let (mut client, server) = connect(&upstream, &relay);
        eventually("pair registered", || relay.open_connections() == 1);
        relay.set_blackhole(true);
        client.write_all(&[1u8; 4096]).unwrap(); // held in the relay, never forwarded
        let started = Instant::now();
        drop(relay);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "drop took too long"
        );
        assert!(sees_reset(&client), "client did not see the reset");
        assert!(sees_reset(&server), "upstream did not see the reset");
    }
}
