//! TLS 1.3 with mutual certificate authentication on both migration channels (rustls, ring
//! provider, no session tickets or resumption).
//!
//! The handshake runs on the blocking socket; the connection is then split into a read half
//! and a write half ([`TlsReader`], [`TlsWriter`]) that two threads use at once, like the two
//! clones of a plain `TcpStream`. They share the rustls connection behind a mutex and a
//! separate socket-write lock. The reader reads raw bytes from the socket without holding the
//! connection lock (an idle read never blocks a writer), then decrypts under it. The writer
//! takes the write lock, then the connection lock, encrypts, releases the connection lock and
//! writes the records to the socket. Lock order everywhere: write lock, then connection lock,
//! so records reach the socket in the order they were encrypted.
//!
//! The socket's SO_RCVTIMEO/SO_SNDTIMEO stay the polling tick: a read that got no whole record
//! within one tick returns `WouldBlock` as a plain socket would, and a write that could not
//! send its records within one tick returns `WouldBlock` too (the records stay queued and go
//! out first on the next call, which then reports the plaintext as written). A TLS failure (a
//! record that fails authentication, an alert) is an `io::Error` of kind `InvalidData`, so the
//! frame layer reports it as an I/O error: a link failure, which postcopy recovers from over a
//! fresh TLS session.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
    ServerConfig, ServerConnection,
};
use rustls_pki_types::pem::PemObject;

/// The CA certificate (both sides), as QEMU names it.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate and key.
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate and key.
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
/// The CA's key (written by [`generate`], needed only to issue more certificates).
pub const CA_KEY: &str = "ca-key.pem";

/// The first bytes of a migration frame ("VMMG"): a plaintext peer.
const FRAME_MAGIC: &[u8; 4] = b"VMMG";

/// Why TLS could not be set up or the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    BadPem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(#[source] Box<rustls::Error>),
    #[error("TLS configuration: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("invalid TLS server name '{0}' (give a DNS name or an IP address)")]
    ServerName(String),
    /// `reason` says in plain words what rustls' `source` means for this peer.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        peer: SocketAddr,
        reason: String,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("TLS handshake with {peer}: {during}: {source}")]
    Io {
        peer: SocketAddr,
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {peer} timed out after {waited_ms} ms")]
    Timeout { peer: SocketAddr, waited_ms: u64 },
    #[error("TLS handshake with {peer} failed: {what}")]
    PlaintextPeer {
        peer: SocketAddr,
        what: &'static str,
    },
    #[error("refusing to overwrite existing {} (give --force)", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Exists(Vec<PathBuf>),
    #[error("generating certificates: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("generating certificates: give at least one host name or address (--hosts)")]
    NoHosts,
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl TlsError {
    /// Whether the handshake failed on the link (reset, closed, silent) rather than on a
    /// certificate or the peer's refusal.
    pub fn is_link_failure(&self) -> bool {
        matches!(self, TlsError::Io { .. } | TlsError::Timeout { .. })
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first. The default order puts AES-256-GCM first, and on
/// these hosts ring seals AES-256-GCM at about 1.0 GB/s against 4.4 GB/s for AES-128-GCM (one
/// core, 1 MiB writes, docs/security.md): the bulk channel's sender paid for the difference.
/// Both sides offer all three, so a peer that prefers another suite still connects.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Config(Box::new(e))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.to_owned(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadPem {
        path: path.to_owned(),
        what: format!("no usable private key: {e}"),
    })
}

fn roots(ca_pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem, path)? {
        roots.add(c).map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The source's TLS settings: trusts the CA, presents the client certificate, verifies the
/// destination's certificate against `server_name` (or, without one, the IP address it
/// connects to).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls(server_name: {:?})", self.server_name)
    }
}

/// Parse a server name: an IP address or a DNS name.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

impl ClientTls {
    /// Load `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn from_dir(dir: &Path, server_name: Option<&str>) -> Result<Self, TlsError> {
        let ca = dir.join(CA_CERT);
        let cert = dir.join(CLIENT_CERT);
        let key = dir.join(CLIENT_KEY);
        let ca_pem = read_file(&ca)?;
        let cert_pem = read_file(&cert)?;
        let key_pem = read_file(&key)?;
        let certs = certs_from_pem(&cert_pem, &cert)?;
        let key = key_from_pem(&key_pem, &key)?;
        Self::build(roots(&ca_pem, &ca)?, Some((certs, key)), server_name)
    }

    /// From PEM text: the CA, and the client certificate chain and key (None: present no
    /// client certificate, which a destination refuses).
    pub fn from_pem(
        ca_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
        server_name: Option<&str>,
    ) -> Result<Self, TlsError> {
        let p = Path::new("<pem>");
        let identity = match identity {
            Some((c, k)) => Some((certs_from_pem(c, p)?, key_from_pem(k, p)?)),
            None => None,
        };
        Self::build(roots(ca_pem, p)?, identity, server_name)
    }

    fn build(
        roots: Arc<RootCertStore>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        server_name: Option<&str>,
    ) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(config_err)?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        let server_name = server_name.map(self::server_name).transpose()?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the destination's certificate must carry when connecting to `addr`.
    pub fn name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

/// The destination's TLS settings: presents the server certificate, requires a client
/// certificate issued by the CA.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls")
    }
}

impl ServerTls {
    /// Load `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let ca = dir.join(CA_CERT);
        let cert = dir.join(SERVER_CERT);
        let key = dir.join(SERVER_KEY);
        let ca_pem = read_file(&ca)?;
        let cert_pem = read_file(&cert)?;
        let key_pem = read_file(&key)?;
        let certs = certs_from_pem(&cert_pem, &cert)?;
        let key = key_from_pem(&key_pem, &key)?;
        Self::build(roots(&ca_pem, &ca)?, certs, key)
    }

    /// From PEM text: the CA, the server certificate chain and its key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let p = Path::new("<pem>");
        Self::build(
            roots(ca_pem, p)?,
            certs_from_pem(cert_pem, p)?,
            key_from_pem(key_pem, p)?,
        )
    }

    fn build(
        roots: Arc<RootCertStore>,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(config_err)?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.max_early_data_size = 0;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }
}

/// Which end of the handshake we are, and with what settings.
pub enum Side<'a> {
    Client(&'a ClientTls),
    Server(&'a ServerTls),
}

fn alert_text(a: AlertDescription) -> String {
    let what = match a {
        AlertDescription::UnknownCA => "it does not trust our certificate (unknown CA)",
        AlertDescription::BadCertificate => "it rejected our certificate (bad certificate)",
        AlertDescription::CertificateExpired => "our certificate has expired",
        AlertDescription::CertificateRequired => {
            "it requires a client certificate and we presented none"
        }
        AlertDescription::CertificateUnknown => "it rejected our certificate",
        AlertDescription::DecryptError => {
            "it could not verify our certificate or handshake (decrypt error: signed by a CA it does not trust?)"
        }
        AlertDescription::BadRecordMac => {
            "a record failed to decrypt there (the stream was corrupted)"
        }
        AlertDescription::ProtocolVersion => "it does not speak TLS 1.3",
        _ => "",
    };
    if what.is_empty() {
        format!("the peer sent the TLS alert {a:?}")
    } else {
        format!("the peer refused the TLS session: {what} (alert {a:?})")
    }
}

/// A rustls error in words that say what failed.
pub fn describe(e: &rustls::Error, client: bool) -> String {
    let peer = if client {
        "the destination's"
    } else {
        "the source's"
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                format!("{peer} certificate is not signed by our CA (unknown CA)")
            }
            CertificateError::NotValidForName => {
                format!("{peer} certificate is not valid for the expected name (wrong name)")
            }
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "{peer} certificate is not valid for {} (wrong name; it names {})",
                name_text(expected),
                presented.join(", ")
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{peer} certificate has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{peer} certificate is not valid yet")
            }
            CertificateError::BadSignature => format!(
                "{peer} certificate has a bad signature (not signed by our CA: unknown CA, or tampered with)"
            ),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!("{peer} certificate is not issued for this use (extended key usage)")
            }
            other => format!("{peer} certificate was refused: {other:?}"),
        },
        rustls::Error::NoCertificatesPresented => {
            if client {
                "the destination presented no certificate".into()
            } else {
                "the source presented no client certificate (it needs client-cert.pem and client-key.pem in its --tls-dir)".into()
            }
        }
        rustls::Error::AlertReceived(a) => alert_text(*a),
        rustls::Error::DecryptError => {
            "a TLS record failed authentication (bad record MAC): the stream was corrupted or tampered with".into()
        }
        other => format!("TLS error: {other}"),
    }
}

fn name_text(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The error a read or write half returns for a TLS failure: `InvalidData`, an I/O error to
/// the frame layer (a link failure).
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsStreamError(pub String);

fn stream_err(e: &rustls::Error, client: bool) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        TlsStreamError(describe(e, client)),
    )
}

fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Send all of `buf` on a socket whose write timeout is the tick, until `deadline`.
fn write_all_until(
    sock: &mut TcpStream,
    mut buf: &[u8],
    deadline: Instant,
    peer: SocketAddr,
    started: Instant,
) -> Result<(), TlsError> {
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => {
                return Err(TlsError::Io {
                    peer,
                    during: "sending handshake records",
                    source: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_tick(&e) => {
                if Instant::now() >= deadline {
                    return Err(TlsError::Timeout {
                        peer,
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
            }
            Err(source) => {
                return Err(TlsError::Io {
                    peer,
                    during: "sending handshake records",
                    source,
                })
            }
        }
    }
    Ok(())
}

fn flush_conn(
    conn: &mut Connection,
    sock: &mut TcpStream,
    deadline: Instant,
    peer: SocketAddr,
    started: Instant,
) -> Result<(), TlsError> {
    let mut out = Vec::new();
    while conn.wants_write() {
        // Writing into a Vec cannot fail.
        let _ = conn.write_tls(&mut out);
    }
    write_all_until(sock, &out, deadline, peer, started)
}

/// Run the TLS handshake on `sock` (its read/write timeouts are the polling tick) within
/// `timeout`, then split the connection into a read and a write half.
pub fn handshake(
    side: Side<'_>,
    sock: &TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<(TlsReader, TlsWriter), TlsError> {
    let client = matches!(side, Side::Client(_));
    let mut conn: Connection = match side {
        Side::Client(c) => ClientConnection::new(Arc::clone(&c.config), c.name_for(peer))
            .map_err(config_err)?
            .into(),
        Side::Server(s) => ServerConnection::new(Arc::clone(&s.config))
            .map_err(config_err)?
            .into(),
    };
    let dup = |s: &TcpStream| {
        s.try_clone().map_err(|source| TlsError::Io {
            peer,
            during: "dup",
            source,
        })
    };
    let mut sock_rw = dup(sock)?;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut raw = vec![0u8; 64 * 1024];
    let mut first = true;
    while conn.is_handshaking() {
        flush_conn(&mut conn, &mut sock_rw, deadline, peer, started)?;
        if !conn.is_handshaking() {
            break;
        }
        let n = match sock_rw.read(&mut raw) {
            Ok(0) => {
                return Err(TlsError::Io {
                    peer,
                    during: "waiting for the peer's handshake",
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection (it may not use TLS, or it refused us)",
                    ),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_tick(&e) => {
                if Instant::now() >= deadline {
                    return Err(TlsError::Timeout {
                        peer,
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                continue;
            }
            Err(source) => {
                return Err(TlsError::Io {
                    peer,
                    during: "waiting for the peer's handshake",
                    source,
                })
            }
        };
        if first && raw[..n].starts_with(&FRAME_MAGIC[..n.min(4)]) {
            return Err(TlsError::PlaintextPeer {
                peer,
                what: if client {
                    "the destination answered in plaintext: it does not use TLS (start `vmm receive` with --tls-dir)"
                } else {
                    "the source speaks plaintext, but this destination requires TLS (migrate with --tls-dir)"
                },
            });
        }
        first = false;
        let mut data = &raw[..n];
        while !data.is_empty() {
            if let Err(source) = conn.read_tls(&mut data) {
                return Err(TlsError::Io {
                    peer,
                    during: "reading handshake records",
                    source,
                });
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), best effort.
                let _ = flush_conn(&mut conn, &mut sock_rw, deadline, peer, started);
                return Err(TlsError::Handshake {
                    peer,
                    reason: describe(&e, client),
                    source: Box::new(e),
                });
            }
        }
    }
    flush_conn(&mut conn, &mut sock_rw, deadline, peer, started)?;
    if let Some(suite) = conn.negotiated_cipher_suite() {
        tracing::debug!(%peer, suite = ?suite.suite(), "TLS handshake done");
    }
    conn.set_buffer_limit(None);
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(Outbox {
            sock: dup(sock)?,
            buf: Vec::new(),
            sent: 0,
            accepted: 0,
        }),
        client,
    });
    Ok((
        TlsReader {
            shared: Arc::clone(&shared),
            sock: sock_rw,
            raw,
            pending: 0..0,
            eof: false,
        },
        TlsWriter { shared },
    ))
}

/// Records encrypted but not yet (fully) on the socket.
struct Outbox {
    sock: TcpStream,
    buf: Vec<u8>,
    sent: usize,
    /// Plaintext bytes whose records are in `buf`, not yet reported as written.
    accepted: usize,
}

impl Outbox {
    /// Write queued records until done or one tick passes without progress.
    fn drain(&mut self) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match self.sock.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(())
    }
}

struct Shared {
    conn: Mutex<Connection>,
    out: Mutex<Outbox>,
    client: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Move what rustls has to send (alerts, key updates) into the outbox, and send it.
    /// Lock order: outbox, then connection.
    fn flush_pending(&self) -> io::Result<()> {
        let mut out = lock(&self.out);
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                let _ = c.write_tls(&mut out.buf);
            }
        }
        match out.drain() {
            Err(e) if is_tick(&e) => Ok(()),
            other => other,
        }
    }
}

/// The read half of a TLS connection.
pub struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    raw: Vec<u8>,
    /// Bytes of `raw` read from the socket and not yet given to rustls.
    pending: std::ops::Range<usize>,
    eof: bool,
}

impl TlsReader {
    /// The socket it reads from.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Whether bytes read from the socket are still here: records not yet given to rustls, or
    /// plaintext rustls decrypted and nobody took yet (an error rustls would report counts: a
    /// read returns it at once).
    pub fn buffered(&self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        let mut c = lock(&self.shared.conn);
        c.process_new_packets()
            .map(|s| s.plaintext_bytes_to_read() > 0)
            .unwrap_or(true)
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let mut c = lock(&self.shared.conn);
            match c.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify: the frame layer tells a clean end from a
                // truncated frame itself.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            // Feed what was read from the socket but not yet taken, until a record's
            // plaintext is ready.
            let mut fed = false;
            while !self.pending.is_empty() {
                let mut data = &self.raw[self.pending.clone()];
                let before = data.len();
                c.read_tls(&mut data)?;
                let took = before - data.len();
                self.pending.start += took;
                match c.process_new_packets() {
                    Ok(state) => {
                        fed = true;
                        if state.plaintext_bytes_to_read() > 0 || took == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        drop(c);
                        let _ = self.shared.flush_pending();
                        return Err(stream_err(&e, self.shared.client));
                    }
                }
            }
            let wants_write = c.wants_write();
            drop(c);
            if wants_write {
                self.shared.flush_pending()?;
            }
            if fed {
                continue;
            }
            // No whole record yet: read more from the socket, without the connection lock
            // (a writer must not wait for an idle read).
            match self.sock.read(&mut self.raw) {
                Ok(0) => {
                    self.eof = true;
                    let mut c = lock(&self.shared.conn);
                    let _ = c.read_tls(&mut &[][..]);
                    if let Err(e) = c.process_new_packets() {
                        return Err(stream_err(&e, self.shared.client));
                    }
                }
                Ok(n) => self.pending = 0..n,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The write half of a TLS connection.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

/// Most plaintext encrypted by one write call: four records. rustls encrypts each record into
/// a buffer of its own and frees them once written; kept this small, those buffers and the
/// outbox stay below glibc's trim and mmap thresholds and are reused from the heap. At 1 MiB
/// per call the heap was trimmed and grown again every frame, and faulting fresh zeroed pages
/// in took about a third of the sender's CPU (same-run A/B: background 4.5 -> 7.1 Gbit/s).
const WRITE_CHUNK: usize = 64 << 10;

impl TlsWriter {
    /// Another handle on the socket it writes to.
    pub fn socket_handle(&self) -> io::Result<TcpStream> {
        lock(&self.shared.out).sock.try_clone()
    }

    fn write_slices(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.shared.out);
        if out.accepted > 0 || out.sent < out.buf.len() {
            // Records of an earlier call that timed out: send them first; the plaintext they
            // carry is the start of what the caller retries with.
            out.drain()?;
            let n = std::mem::take(&mut out.accepted);
            if n > 0 {
                return Ok(n);
            }
        }
        let mut taken = 0;
        {
            let mut c = lock(&self.shared.conn);
            for b in bufs {
                if taken >= WRITE_CHUNK {
                    break;
                }
                let b = &b[..b.len().min(WRITE_CHUNK - taken)];
                if b.is_empty() {
                    continue;
                }
                c.writer().write_all(b)?;
                taken += b.len();
            }
            while c.wants_write() {
                let _ = c.write_tls(&mut out.buf);
            }
        }
        match out.drain() {
            Ok(()) => Ok(taken),
            Err(e) if is_tick(&e) => {
                out.accepted = taken;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

impl Write for &TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_slices(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_slices(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = lock(&self.shared.out);
        out.drain()?;
        out.accepted = 0;
        Ok(())
    }
}

/// The certificates and keys [`generate`] makes, as PEM text.
pub struct Generated {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e)
}

/// A CA, a server certificate for `hosts` (IP addresses become IP SANs, other names DNS
/// SANs) and a client certificate, all signed by that CA. `expired` makes the server and
/// client certificates expired (for tests).
pub fn generate_pems(hosts: &[String], expired: bool) -> Result<Generated, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a certificate of another CA made the same way is then an unknown
    // issuer, not a bad signature.
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("vmm migration CA {:016x}", rand::random::<u64>()),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = rcgen::date_time_ymd(2020, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;

    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).map_err(gen_err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            p.not_before = rcgen::date_time_ymd(2001, 1, 1);
            p.not_after = rcgen::date_time_ymd(2002, 1, 1);
        } else {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 12, 31);
        }
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(gen_err)?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        hosts.to_vec(),
        hosts
            .first()
            .map(String::as_str)
            .unwrap_or("vmm destination"),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "vmm migration source",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(Generated {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    })
}

/// `vmm tls-init`: write a CA and server and client certificates for `hosts` into `dir` in
/// QEMU's layout (keys mode 0600). Refuses to overwrite existing files unless `force`.
/// Returns the files written.
pub fn generate(dir: &Path, hosts: &[String], force: bool) -> Result<Vec<PathBuf>, TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    if hosts.is_empty() {
        return Err(TlsError::NoHosts);
    }
    for h in hosts {
        server_name(h)?;
    }
    let g = generate_pems(hosts, false)?;
    let files: [(&str, &str, bool); 6] = [
        (CA_CERT, &g.ca_cert, false),
        (CA_KEY, &g.ca_key, true),
        (SERVER_CERT, &g.server_cert, false),
        (SERVER_KEY, &g.server_key, true),
        (CLIENT_CERT, &g.client_cert, false),
        (CLIENT_KEY, &g.client_key, true),
    ];
    if !force {
        let existing: Vec<PathBuf> = files
            .iter()
            .map(|(n, _, _)| dir.join(n))
            .filter(|p| p.exists())
            .collect();
        if !existing.is_empty() {
            return Err(TlsError::Exists(existing));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::WriteFile {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, pem, secret) in files {
        let path = dir.join(name);
        let wf = |source| TlsError::WriteFile {
            path: path.clone(),
            source,
        };
        let mode = if secret { 0o600 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(wf)?;
        // An existing file (with --force) keeps its mode: set it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(wf)?;
        f.write_all(pem.as_bytes()).map_err(wf)?;
        written.push(path);
    }
    Ok(written)
}
