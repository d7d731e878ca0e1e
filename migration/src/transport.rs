//! TCP transport: connecting and accepting the two channels of a migration session (main = control
//! and bulk pages, urgent = page requests and replies), each authenticated and bound to one
//! session id by the handshake; with TLS configured, each runs over TLS 1.3 with mutual
//! certificate authentication first (see [`crate::tls`]).

use crate::sync::MutexExt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{self, AuthError, Role, Secret, Transcript};
use crate::liveness::SharedWriter;
use crate::tls::{self, ClientTls, ServerTls, TlsError, TlsReader, TlsWriter};
use crate::wire::{ChannelKind, ErrorCode, FrameReader, FrameWriter, Message, WireError};

/// Timeouts of a migration connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting and each handshake step.
    pub handshake: Duration,
    /// Longest silence of a peer in the middle of the protocol (a stalled peer fails after this).
    pub io: Duration,
    /// Longest wait for steps that legitimately take long: the destination building guest memory
    /// before Ready, and finishing postcopy (collapses) before Done.
    pub setup: Duration,
    /// Socket read/write timeout used as the polling tick.
    pub tick: Duration,
    /// From the switchover on, each side sends a heartbeat on a channel it wrote nothing on
    /// for this long.
    pub heartbeat: Duration,
    /// From the switchover on, a channel on which nothing arrived (not even a heartbeat) for
    /// this long, or a write that made no progress for this long, is a dead link. Also the
    /// sockets' `TCP_USER_TIMEOUT`, so a link that silently drops packets fails in the kernel
    /// as well.
    pub liveness: Duration,
    /// How long a side waits in `postcopy-paused` for the link to come back before it gives
    /// up (the source reconnects with backoff meanwhile, the destination listens).
    pub recover: Duration,
    /// Connecting and each handshake step of a recovery attempt (short: a black-holed path
    /// must not hold up the next attempt).
    pub recover_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            io: Duration::from_secs(10),
            setup: Duration::from_secs(300),
            tick: Duration::from_millis(50),
            heartbeat: Duration::from_millis(200),
            liveness: Duration::from_millis(1000),
            recover: Duration::from_secs(600),
            recover_handshake: Duration::from_secs(2),
        }
    }
}

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] io::Error),
    #[error("no {channel:?} connection arrived within {waited_ms} ms")]
    AcceptTimeout {
        channel: ChannelKind,
        waited_ms: u64,
    },
    #[error("cannot configure socket ({what}): {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("peer opened a {got:?} channel where a {expected:?} channel was expected")]
    WrongChannel {
        expected: ChannelKind,
        got: ChannelKind,
    },
    #[error("the connection names session {got:#x}, but the session is {expected:#x}")]
    SessionMismatch { expected: u64, got: u64 },
    /// A main-channel Hello naming a session (a recovery) where a new migration must start.
    #[error("the main channel's Hello names session {got:#x}, a recovery, but this destination waits for a new migration (Hello with session 0) and has no session to recover")]
    NotRecovering { got: u64 },
    #[error("connection from non-loopback peer {peer} refused: no shared secret configured")]
    PeerNotLoopback { peer: SocketAddr },
    #[error(
        "a new migration from {peer} refused: this destination is recovering session {session:#x}"
    )]
    Busy { peer: SocketAddr, session: u64 },
    #[error("no recovery connection arrived within {waited_ms} ms")]
    RecoverTimeout { waited_ms: u64 },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the source {peer} speaks TLS, but this destination does not use TLS (start `vmm receive` with --tls-dir, or migrate without it)")]
    NotTls { peer: SocketAddr },
}

/// The read half of a connection: the socket itself, or TLS over it.
pub enum ReadHalf {
    Plain(TcpStream),
    Tls(TlsReader),
}

impl Read for ReadHalf {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(s) => s.read(buf),
            ReadHalf::Tls(t) => t.read(buf),
        }
    }
}

impl ReadHalf {
    /// Whether bytes already read from the socket wait in this half (TLS: records not yet
    /// decrypted, or plaintext not yet taken). A poll on the socket does not see them, so a
    /// wait for readability must ask this first.
    pub fn buffered(&self) -> bool {
        match self {
            ReadHalf::Plain(_) => false,
            ReadHalf::Tls(t) => t.buffered(),
        }
    }
}

impl std::os::fd::AsFd for ReadHalf {
    /// The socket (readable when bytes, maybe TLS records, arrived).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ReadHalf::Plain(s) => s.as_fd(),
            ReadHalf::Tls(t) => t.socket().as_fd(),
        }
    }
}

/// The write half of a connection: the socket itself, or TLS over it.
pub enum WriteHalf {
    Plain(TcpStream),
    Tls(TlsWriter),
}

impl WriteHalf {
    /// Another handle on the socket underneath (bytes written to it bypass TLS).
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        match self {
            WriteHalf::Plain(s) => s.try_clone(),
            WriteHalf::Tls(t) => t.socket_handle(),
        }
    }
}

impl Write for &WriteHalf {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => (&*s).write(buf),
            WriteHalf::Tls(t) => (&*t).write(buf),
        }
    }

    #[inline]
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => (&*s).write_vectored(bufs),
            WriteHalf::Tls(t) => (&*t).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => (&*s).flush(),
            WriteHalf::Tls(t) => (&*t).flush(),
        }
    }
}

impl Write for WriteHalf {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    #[inline]
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

impl TransportError {
    /// Whether setting up the session failed on the link (refused, reset, silent, timed out)
    /// rather than on authentication or the peer's answer: a recovering source tries again.
    pub fn is_link_failure(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Socket { .. }
            | TransportError::Accept(_)
            | TransportError::AcceptTimeout { .. } => true,
            TransportError::Wire(e) => e.is_link_failure(),
            TransportError::Tls(e) => e.is_link_failure(),
            _ => false,
        }
    }
}

/// One authenticated connection: a frame reader and writer over the same TCP stream.
pub struct Channel {
    pub reader: FrameReader<ReadHalf>,
    pub writer: FrameWriter<WriteHalf>,
    stream: TcpStream,
    peer: SocketAddr,
}

/// Largest frame payload accepted before the peer authenticated (and, on the destination,
/// sent its Config): every handshake frame and an Error fit, and so does a Config of the most
/// regions (24 + 512 x 24 bytes).
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 16 * 1024;

impl Channel {
    /// The peer is authenticated (and its Config read): accept frames up to each kind's own
    /// bound from now on.
    pub fn lift_size_limit(&mut self) {
        self.reader.set_max_payload(u32::MAX);
    }

    /// A channel over a connected `stream` (TLS handshake first, if `tls`).
    pub(crate) fn new(
        stream: TcpStream,
        timeouts: &Timeouts,
        nodelay: bool,
        tls: Option<tls::Side<'_>>,
    ) -> Result<Self, TransportError> {
        let sock = |what| move |source| TransportError::Socket { what, source };
        stream
            .set_read_timeout(Some(timeouts.tick))
            .map_err(sock("SO_RCVTIMEO"))?;
        stream
            .set_write_timeout(Some(timeouts.tick))
            .map_err(sock("SO_SNDTIMEO"))?;
        stream.set_nodelay(nodelay).map_err(sock("TCP_NODELAY"))?;
        let peer = stream.peer_addr().map_err(sock("getpeername"))?;
        let (r, w) = match tls {
            None => (
                ReadHalf::Plain(stream.try_clone().map_err(sock("dup"))?),
                WriteHalf::Plain(stream.try_clone().map_err(sock("dup"))?),
            ),
            Some(side) => {
                let server = matches!(side, tls::Side::Server(_));
                match tls::handshake(side, &stream, peer, timeouts.handshake) {
                    Ok((r, w)) => (ReadHalf::Tls(r), WriteHalf::Tls(w)),
                    Err(e) => {
                        if server && matches!(e, TlsError::PlaintextPeer { .. }) {
                            // Tell a plaintext source in its own language.
                            if let Ok(w) = stream.try_clone() {
                                let _ = FrameWriter::new(w, timeouts.handshake).send(
                                    &Message::Error {
                                        code: ErrorCode::Rejected,
                                        message:
                                            "this destination requires TLS (migrate with --tls-dir)"
                                                .into(),
                                    },
                                    "refusing a plaintext source",
                                );
                            }
                        }
                        let _ = stream.shutdown(Shutdown::Both);
                        return Err(e.into());
                    }
                }
            }
        };
        Ok(Channel {
            reader: {
                let mut r = FrameReader::new(r, timeouts.handshake);
                r.set_max_payload(HANDSHAKE_MAX_PAYLOAD);
                r
            },
            writer: FrameWriter::new(w, timeouts.handshake),
            stream,
            peer,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Send one message.
    pub fn send(&mut self, msg: &Message<'_>, during: &'static str) -> Result<(), WireError> {
        self.writer.send(msg, during)
    }

    /// Tell the peer why we give up (best effort: errors are ignored, the connection may be gone).
    pub fn send_error(&mut self, code: ErrorCode, message: &str) {
        let _ = self.writer.send(
            &Message::Error {
                code,
                message: message.to_owned(),
            },
            "sending an error report",
        );
    }

    /// Set the stall timeout of both directions.
    pub fn set_stall_timeout(&mut self, t: Duration) {
        self.reader.set_stall_timeout(t);
        self.writer.set_stall_timeout(t);
    }

    /// From the switchover on: the peer sends heartbeats, so silence longer than `t` in either
    /// direction is a dead link.
    pub fn set_liveness(&mut self, t: Duration) {
        self.reader.set_liveness(t);
        self.writer.set_stall_timeout(t);
    }

    /// Another handle on the connection (to shut it down from another thread).
    pub fn stream_handle(&self) -> Result<TcpStream, TransportError> {
        self.stream
            .try_clone()
            .map_err(|source| TransportError::Socket {
                what: "dup",
                source,
            })
    }

    /// Close both directions (wakes a thread blocked reading this channel).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A channel from the switchover on: its writer is shared with the heartbeat thread, and its
/// reader fails on silence longer than the liveness bound.
pub struct LiveChannel {
    pub reader: FrameReader<ReadHalf>,
    pub writer: SharedWriter,
    stream: TcpStream,
}

impl LiveChannel {
    /// Send one message.
    pub fn send(&self, msg: &Message<'_>, during: &'static str) -> Result<(), WireError> {
        self.writer.lock_unpoisoned().send(msg, during)
    }

    /// Tell the peer why we give up (best effort).
    pub fn send_error(&self, code: ErrorCode, message: &str) {
        let _ = self.send(
            &Message::Error {
                code,
                message: message.to_owned(),
            },
            "sending an error report",
        );
    }

    /// Close both directions (wakes a thread blocked reading or writing it).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// From now on the peer sends heartbeats: silence longer than `t` in either direction is
    /// a dead link. The socket's `TCP_USER_TIMEOUT` becomes twice that, so the kernel too
    /// fails a connection whose data stays unacknowledged (a path that drops packets) even
    /// where no read or write of ours is waiting.
    pub fn set_liveness(&mut self, t: Duration) {
        self.reader.set_liveness(t);
        self.writer.lock_unpoisoned().set_stall_timeout(t);
        let ms = u32::try_from(t.as_millis().saturating_mul(2)).unwrap_or(u32::MAX);
        if let Err(e) = nix::sys::socket::setsockopt(
            &self.stream,
            nix::sys::socket::sockopt::TcpUserTimeout,
            &ms,
        ) {
            tracing::debug!("TCP_USER_TIMEOUT not set: {e}");
        }
    }

    /// Another handle on the connection (to shut it down from another thread).
    pub fn stream_handle(&self) -> Result<TcpStream, TransportError> {
        self.stream
            .try_clone()
            .map_err(|source| TransportError::Socket {
                what: "dup",
                source,
            })
    }
}

impl Channel {
    /// The channel as used from the switchover on (see [`LiveChannel`]).
    pub fn into_live(self, liveness: Duration) -> LiveChannel {
        let mut live = self.into_shared();
        live.set_liveness(liveness);
        live
    }

    /// The channel with its writer shareable, before liveness is watched.
    pub fn into_shared(self) -> LiveChannel {
        LiveChannel {
            reader: self.reader,
            writer: Arc::new(Mutex::new(self.writer)),
            stream: self.stream,
        }
    }
}

/// An authenticated session: both channels, bound to one session id.
pub struct Session {
    pub id: u64,
    pub main: Channel,
    pub urgent: Channel,
}

fn auth_failed_remote(e: WireError) -> TransportError {
    match e {
        WireError::Remote {
            code: ErrorCode::AuthFailed,
            ..
        } => TransportError::Auth(AuthError::Failed("the peer rejected our proof")),
        other => TransportError::Wire(other),
    }
}

const AUTH_FAILED_TEXT: &str = "authentication failed";

fn source_handshake(
    ch: &mut Channel,
    channel: ChannelKind,
    session_id: u64,
    secret: Option<&Secret>,
) -> Result<u64, TransportError> {
    let source_nonce = auth::nonce();
    ch.send(
        &Message::Hello {
            channel,
            session_id,
            nonce: source_nonce,
        },
        "sending Hello",
    )?;
    let (sid, destination_nonce, proof) = match ch
        .reader
        .read("waiting for Challenge")
        .map_err(auth_failed_remote)?
    {
        Message::Challenge {
            session_id,
            nonce,
            proof,
        } => (session_id, nonce, proof),
        other => {
            return Err(auth_failed_remote(crate::wire::unexpected(
                other,
                "waiting for Challenge",
                "Challenge",
            )))
        }
    };
    if session_id != 0 && sid != session_id {
        ch.send_error(ErrorCode::Protocol, "channel bound to the wrong session");
        return Err(TransportError::SessionMismatch {
            expected: session_id,
            got: sid,
        });
    }
    let t = Transcript {
        channel,
        session_id: sid,
        source_nonce,
        destination_nonce,
    };
    if let Err(e) = auth::verify(secret, Role::Destination, &t, &proof) {
        ch.send_error(ErrorCode::AuthFailed, AUTH_FAILED_TEXT);
        return Err(e.into());
    }
    ch.send(
        &Message::Response {
            proof: auth::prove(secret, Role::Source, &t),
        },
        "sending Response",
    )?;
    match ch
        .reader
        .read("waiting for AuthOk")
        .map_err(auth_failed_remote)?
    {
        Message::AuthOk { session_id } if session_id == sid => Ok(sid),
        Message::AuthOk { session_id } => Err(TransportError::SessionMismatch {
            expected: sid,
            got: session_id,
        }),
        other => Err(auth_failed_remote(crate::wire::unexpected(
            other,
            "waiting for AuthOk",
            "AuthOk",
        ))),
    }
}

/// The socket priority (`SO_PRIORITY`) of the urgent channel: `TC_PRIO_INTERACTIVE`, which a
/// priority-aware qdisc (pfifo_fast, the default here, or prio) queues ahead of the main
/// channel's bulk pages, so a page reply does not wait behind a queue full of the push. 6 is
/// the highest priority an unprivileged socket may ask for.
const URGENT_SOCKET_PRIORITY: libc::c_int = 6;

/// Give a channel's socket the priority of its kind (the main channel keeps the default).
fn mark_channel(stream: &TcpStream, kind: ChannelKind) -> Result<(), TransportError> {
    if kind == ChannelKind::Urgent {
        nix::sys::socket::setsockopt(
            stream,
            nix::sys::socket::sockopt::Priority,
            &URGENT_SOCKET_PRIORITY,
        )
        .map_err(|e| TransportError::Socket {
            what: "SO_PRIORITY",
            source: e.into(),
        })?;
    }
    Ok(())
}

fn connect_channel(
    addr: SocketAddr,
    kind: ChannelKind,
    timeouts: &Timeouts,
    nodelay: bool,
    tls: Option<&ClientTls>,
) -> Result<Channel, TransportError> {
    let stream = TcpStream::connect_timeout(&addr, timeouts.handshake)
        .map_err(|source| TransportError::Connect { addr, source })?;
    mark_channel(&stream, kind)?;
    Channel::new(stream, timeouts, nodelay, tls.map(tls::Side::Client))
}

/// How the source protects a session.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientSecurity<'a> {
    /// Shared secret for the HMAC handshake (inside TLS when both are given).
    pub secret: Option<&'a Secret>,
    /// TLS settings; without them the connections are plaintext.
    pub tls: Option<&'a ClientTls>,
    /// Allow a plaintext session (with a secret) over a non-loopback address.
    pub allow_plaintext: bool,
}

impl ClientSecurity<'_> {
    fn check(&self, addr: &SocketAddr) -> Result<(), TransportError> {
        auth::check_policy(addr, self.secret, self.tls.is_some(), self.allow_plaintext)?;
        Ok(())
    }
}

/// Source side of a recovery: connect both channels to `addr` again and authenticate them
/// into the running session `session_id` (fresh nonces; the destination accepts only this
/// session). Connecting and each handshake step are bounded by `timeouts.recover_handshake`.
pub fn reconnect(
    addr: SocketAddr,
    session_id: u64,
    secret: Option<&Secret>,
    timeouts: &Timeouts,
) -> Result<Session, TransportError> {
    reconnect_with(
        addr,
        session_id,
        ClientSecurity {
            secret,
            ..Default::default()
        },
        timeouts,
    )
}

/// [`reconnect`] with the session's protection (TLS settings, as the session started).
pub fn reconnect_with(
    addr: SocketAddr,
    session_id: u64,
    security: ClientSecurity<'_>,
    timeouts: &Timeouts,
) -> Result<Session, TransportError> {
    security.check(&addr)?;
    let secret = security.secret;
    let tls = security.tls;
    let short = Timeouts {
        handshake: timeouts.recover_handshake,
        ..*timeouts
    };
    let mut main = connect_channel(addr, ChannelKind::Main, &short, true, tls)?;
    let run = |main: &mut Channel| -> Result<Channel, TransportError> {
        source_handshake(main, ChannelKind::Main, session_id, secret)?;
        let mut urgent = connect_channel(addr, ChannelKind::Urgent, &short, true, tls)?;
        if let Err(e) = source_handshake(&mut urgent, ChannelKind::Urgent, session_id, secret) {
            urgent.shutdown();
            return Err(e);
        }
        Ok(urgent)
    };
    let mut urgent = match run(&mut main) {
        Ok(u) => u,
        Err(e) => {
            main.shutdown();
            return Err(e);
        }
    };
    main.set_stall_timeout(timeouts.io);
    urgent.set_stall_timeout(timeouts.io);
    main.lift_size_limit();
    urgent.lift_size_limit();
    Ok(Session {
        id: session_id,
        main,
        urgent,
    })
}

/// Source side: connect both channels to `addr` in plaintext and authenticate them. Only a
/// loopback address is allowed (see [`connect_with`]).
pub fn connect(
    addr: SocketAddr,
    secret: Option<&Secret>,
    timeouts: &Timeouts,
) -> Result<Session, TransportError> {
    connect_with(
        addr,
        ClientSecurity {
            secret,
            ..Default::default()
        },
        timeouts,
    )
}

/// Source side: connect both channels to `addr` (over TLS if configured) and authenticate
/// them. A non-loopback address needs TLS, or a secret and `allow_plaintext`.
pub fn connect_with(
    addr: SocketAddr,
    security: ClientSecurity<'_>,
    timeouts: &Timeouts,
) -> Result<Session, TransportError> {
    security.check(&addr)?;
    let secret = security.secret;
    let mut main = connect_channel(addr, ChannelKind::Main, timeouts, true, security.tls)?;
    let id = match source_handshake(&mut main, ChannelKind::Main, 0, secret) {
        Ok(id) => id,
        Err(e) => {
            main.shutdown();
            return Err(e);
        }
    };
    let mut urgent = connect_channel(addr, ChannelKind::Urgent, timeouts, true, security.tls)?;
    source_handshake(&mut urgent, ChannelKind::Urgent, id, secret)?;
    main.set_stall_timeout(timeouts.io);
    urgent.set_stall_timeout(timeouts.io);
    main.lift_size_limit();
    urgent.lift_size_limit();
    Ok(Session { id, main, urgent })
}

/// Destination side: a listening socket that accepts authenticated sessions.
pub struct Acceptor {
    listener: TcpListener,
    secret: Option<Secret>,
    tls: Option<ServerTls>,
    timeouts: Timeouts,
}

impl Acceptor {
    /// Listen on `addr` in plaintext. Only a loopback address is allowed (see
    /// [`Acceptor::bind_with`]).
    pub fn bind(
        addr: SocketAddr,
        secret: Option<Secret>,
        timeouts: Timeouts,
    ) -> Result<Self, TransportError> {
        Self::bind_with(addr, secret, None, false, timeouts)
    }

    /// Listen on `addr`; with `tls` every connection (recoveries included) must run TLS with
    /// a client certificate of the CA. A non-loopback address needs TLS, or a secret and
    /// `allow_plaintext`.
    pub fn bind_with(
        addr: SocketAddr,
        secret: Option<Secret>,
        tls: Option<ServerTls>,
        allow_plaintext: bool,
        timeouts: Timeouts,
    ) -> Result<Self, TransportError> {
        auth::check_policy(&addr, secret.as_ref(), tls.is_some(), allow_plaintext)?;
        let listener =
            TcpListener::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Acceptor {
            listener,
            secret,
            tls,
            timeouts,
        })
    }

    fn channel(&self, stream: TcpStream, t: &Timeouts) -> Result<Channel, TransportError> {
        Channel::new(stream, t, true, self.tls.as_ref().map(tls::Side::Server))
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(|source| TransportError::Socket {
                what: "getsockname",
                source,
            })
    }

    /// The timeouts sessions use.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    fn accept_stream(
        &self,
        deadline: Option<Instant>,
        channel: ChannelKind,
    ) -> Result<TcpStream, TransportError> {
        let accept_err = |e| TransportError::Accept(e);
        self.listener
            .set_nonblocking(deadline.is_some())
            .map_err(accept_err)?;
        let started = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false).map_err(accept_err)?;
                    if self.secret.is_none() && self.tls.is_none() && !peer.ip().is_loopback() {
                        return Err(TransportError::PeerNotLoopback { peer });
                    }
                    // The kind expected here: a Hello naming another is refused by the
                    // handshake, before anything of the VM moves.
                    mark_channel(&stream, channel)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(TransportError::AcceptTimeout {
                            channel,
                            waited_ms: started.elapsed().as_millis() as u64,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(accept_err(e)),
            }
        }
    }

    /// `claim` is the session id the Hello must name: 0 for a new session on main, the
    /// session's id on urgent and on a recovery's main.
    fn destination_handshake(
        &self,
        ch: &mut Channel,
        expected: ChannelKind,
        session_id: u64,
        claim: u64,
    ) -> Result<(), TransportError> {
        let secret = self.secret.as_ref();
        let hello = match ch.reader.read("waiting for Hello") {
            Ok(m) => m,
            // A TLS record (handshake, version 3.x) where a frame was expected.
            Err(WireError::BadMagic { got }) if self.tls.is_none() && got & 0xffff == 0x0316 => {
                // Answer in plaintext: the source's TLS handshake reports a plaintext peer.
                ch.send_error(ErrorCode::Rejected, "this destination does not use TLS");
                return Err(TransportError::NotTls { peer: ch.peer() });
            }
            Err(e) => return Err(e.into()),
        };
        let (channel, claimed, source_nonce) = match hello {
            Message::Hello {
                channel,
                session_id,
                nonce,
            } => (channel, session_id, nonce),
            other => {
                let e = crate::wire::unexpected(other, "waiting for Hello", "Hello");
                ch.send_error(ErrorCode::Protocol, "expected Hello");
                return Err(e.into());
            }
        };
        if channel != expected {
            ch.send_error(ErrorCode::Protocol, "unexpected channel kind");
            return Err(TransportError::WrongChannel {
                expected,
                got: channel,
            });
        }
        // A new session starts with id 0; a recovering source names its session.
        if claimed != claim {
            if claimed == 0 {
                ch.send_error(
                    ErrorCode::Rejected,
                    "busy: this destination is recovering another migration",
                );
                return Err(TransportError::Busy {
                    peer: ch.peer(),
                    session: session_id,
                });
            }
            ch.send_error(ErrorCode::Protocol, "unknown session");
            if claim == 0 {
                return Err(TransportError::NotRecovering { got: claimed });
            }
            return Err(TransportError::SessionMismatch {
                expected: claim,
                got: claimed,
            });
        }
        let destination_nonce = auth::nonce();
        let t = Transcript {
            channel,
            session_id,
            source_nonce,
            destination_nonce,
        };
        ch.send(
            &Message::Challenge {
                session_id,
                nonce: destination_nonce,
                proof: auth::prove(secret, Role::Destination, &t),
            },
            "sending Challenge",
        )?;
        let proof = match ch
            .reader
            .read("waiting for Response")
            .map_err(auth_failed_remote)?
        {
            Message::Response { proof } => proof,
            other => {
                return Err(auth_failed_remote(crate::wire::unexpected(
                    other,
                    "waiting for Response",
                    "Response",
                )))
            }
        };
        if let Err(e) = auth::verify(secret, Role::Source, &t, &proof) {
            ch.send_error(ErrorCode::AuthFailed, AUTH_FAILED_TEXT);
            return Err(e.into());
        }
        ch.send(&Message::AuthOk { session_id }, "sending AuthOk")?;
        Ok(())
    }

    /// Wait for a source, then authenticate its main and urgent channels. The main channel
    /// still refuses frames over [`HANDSHAKE_MAX_PAYLOAD`]: read the Config, then call
    /// [`Channel::lift_size_limit`] (as `destination::Listener::accept` does).
    pub fn accept(&self) -> Result<Session, TransportError> {
        let t = &self.timeouts;
        let mut main = self.channel(self.accept_stream(None, ChannelKind::Main)?, t)?;
        let id = auth::session_id();
        if let Err(e) = self.destination_handshake(&mut main, ChannelKind::Main, id, 0) {
            main.shutdown();
            return Err(e);
        }
        let stream =
            match self.accept_stream(Some(Instant::now() + t.handshake), ChannelKind::Urgent) {
                Ok(s) => s,
                Err(e) => {
                    main.send_error(ErrorCode::Protocol, "urgent channel did not arrive");
                    main.shutdown();
                    return Err(e);
                }
            };
        let mut urgent = match self.channel(stream, t) {
            Ok(u) => u,
            Err(e) => {
                main.send_error(ErrorCode::AuthFailed, "urgent channel handshake failed");
                main.shutdown();
                return Err(e);
            }
        };
        if let Err(e) = self.destination_handshake(&mut urgent, ChannelKind::Urgent, id, id) {
            urgent.shutdown();
            main.send_error(ErrorCode::AuthFailed, "urgent channel handshake failed");
            main.shutdown();
            return Err(e);
        }
        main.set_stall_timeout(t.io);
        urgent.set_stall_timeout(t.io);
        // Main stays bounded until the Config is read (`Listener::accept`).
        urgent.lift_size_limit();
        Ok(Session { id, main, urgent })
    }

    /// Wait until `deadline` for the source of session `id` to come back, and authenticate
    /// its main and urgent channels into that session. Every other connection (a new
    /// migration, another session's id, a wrong secret, garbage, a replayed handshake: the
    /// nonces are fresh) is refused and logged, and the wait goes on; connections are handled
    /// one at a time, each step bounded by `recover_handshake`.
    pub fn accept_recovery(&self, id: u64, deadline: Instant) -> Result<Session, TransportError> {
        let t = Timeouts {
            handshake: self.timeouts.recover_handshake,
            ..self.timeouts
        };
        let started = Instant::now();
        loop {
            if Instant::now() >= deadline {
                return Err(TransportError::RecoverTimeout {
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            let attempt = (|| -> Result<Session, TransportError> {
                let stream = self.accept_stream(Some(deadline), ChannelKind::Main)?;
                let mut main = self.channel(stream, &t)?;
                if let Err(e) = self.destination_handshake(&mut main, ChannelKind::Main, id, id) {
                    main.shutdown();
                    return Err(e);
                }
                let urgent_by = (Instant::now() + t.handshake).min(deadline);
                let stream = match self.accept_stream(Some(urgent_by), ChannelKind::Urgent) {
                    Ok(s) => s,
                    Err(e) => {
                        main.shutdown();
                        return Err(e);
                    }
                };
                let mut urgent = match self.channel(stream, &t) {
                    Ok(u) => u,
                    Err(e) => {
                        main.shutdown();
                        return Err(e);
                    }
                };
                if let Err(e) = self.destination_handshake(&mut urgent, ChannelKind::Urgent, id, id)
                {
                    urgent.shutdown();
                    main.shutdown();
                    return Err(e);
                }
                main.set_stall_timeout(t.io);
                urgent.set_stall_timeout(t.io);
                main.lift_size_limit();
                urgent.lift_size_limit();
                Ok(Session { id, main, urgent })
            })();
            match attempt {
                Ok(s) => return Ok(s),
                Err(TransportError::AcceptTimeout { .. }) if Instant::now() >= deadline => {}
                Err(e) => tracing::warn!("refused a connection while waiting for recovery: {e}"),
            }
        }
    }
}
