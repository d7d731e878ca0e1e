//! TLS 1.3 with mutual certificate authentication on both migration channels (rustls, ring
//! provider, no session tickets or resumption).
//!
//! rustls runs the handshake on the blocking socket (this module: configurations, the
//! handshake, what each refusal means). It then hands the traffic keys over, and the records
//! after the handshake are sealed and opened in place by [`record`], in the buffers of the
//! connection's two halves ([`stream`]: [`TlsReader`], [`TlsWriter`]), as kTLS would do in the
//! kernel. [`certs`] makes a CA and certificates (`vmm tls-init`).

mod certs;
pub mod record;
mod stream;

pub use certs::{generate, generate_pems, Generated};

/// Unit tests: a client and a server configuration from one fresh CA, for 127.0.0.1.
#[cfg(test)]
fn test_configs() -> (ClientTls, ServerTls) {
    let g = generate_pems(&["127.0.0.1".into()], false).unwrap();
    let client = ClientTls::from_pem(
        g.ca_cert.as_bytes(),
        Some((g.client_cert.as_bytes(), g.client_key.as_bytes())),
        None,
    )
    .unwrap();
    let server = ServerTls::from_pem(
        g.ca_cert.as_bytes(),
        g.server_cert.as_bytes(),
        g.server_key.as_bytes(),
    )
    .unwrap();
    (client, server)
}
pub use stream::{TlsReader, TlsWriter};

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    #[error("TLS handshake with {peer}: cannot take the traffic keys over from rustls: {source}")]
    Keys {
        peer: SocketAddr,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("TLS handshake with {peer}: {source}")]
    RecordLayer {
        peer: SocketAddr,
        #[source]
        source: record::RecordError,
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
        // The record layer after the handshake is ours (record.rs).
        config.enable_secret_extraction = true;
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
        config.enable_secret_extraction = true;
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

/// The length of the handshake-phase record at the start of `buf` (header included), once its
/// header is there.
fn handshake_record_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..record::HEADER_LEN)?;
    Some(record::HEADER_LEN + u16::from_be_bytes([h[3], h[4]]) as usize)
}

/// Run the TLS handshake on `sock` (its read/write timeouts are the polling tick) within
/// `timeout`, then take the record layer over from rustls and split the connection into a
/// read and a write half.
///
/// The peer's records are given to rustls one whole record at a time, so that rustls never
/// holds a record that comes after the handshake: those are the first records of the peer's
/// data, and the read half opens them.
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
    // Room for the largest record a TLS 1.2-style header can announce.
    let mut raw = vec![0u8; 2 * (record::HEADER_LEN + usize::from(u16::MAX))];
    let (mut start, mut end) = (0, 0);
    let handshake_err = |conn: &mut Connection, sock: &mut TcpStream, e: rustls::Error| {
        // Tell the peer why (the alert rustls queued), best effort.
        let _ = flush_conn(conn, sock, deadline, peer, started);
        TlsError::Handshake {
            peer,
            reason: describe(&e, client),
            source: Box::new(e),
        }
    };
    while conn.is_handshaking() {
        flush_conn(&mut conn, &mut sock_rw, deadline, peer, started)?;
        if !conn.is_handshaking() {
            break;
        }
        if let Some(len) = handshake_record_len(&raw[start..end]) {
            // A length TLS does not allow: let rustls refuse what is there.
            let len = if len > record::MAX_RECORD + 2048 {
                end - start
            } else {
                len
            };
            if len <= end - start {
                let mut data = &raw[start..start + len];
                start += len;
                while !data.is_empty() {
                    if let Err(source) = conn.read_tls(&mut data) {
                        return Err(TlsError::Io {
                            peer,
                            during: "reading handshake records",
                            source,
                        });
                    }
                    if let Err(e) = conn.process_new_packets() {
                        return Err(handshake_err(&mut conn, &mut sock_rw, e));
                    }
                }
                continue;
            }
        }
        raw.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let n = match sock_rw.read(&mut raw[end..]) {
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
        let first = end == 0;
        end += n;
        if first && raw[..end].starts_with(&FRAME_MAGIC[..end.min(4)]) {
            return Err(TlsError::PlaintextPeer {
                peer,
                what: if client {
                    "the destination answered in plaintext: it does not use TLS (start `vmm receive` with --tls-dir)"
                } else {
                    "the source speaks plaintext, but this destination requires TLS (migrate with --tls-dir)"
                },
            });
        }
    }
    flush_conn(&mut conn, &mut sock_rw, deadline, peer, started)?;
    let suite = conn.negotiated_cipher_suite();
    if let Some(suite) = suite {
        tracing::debug!(%peer, suite = ?suite.suite(), "TLS handshake done");
    }
    let limit = suite
        .and_then(|s| s.tls13())
        .map_or(0, |s| s.common.confidentiality_limit);
    let keys = conn
        .dangerous_extract_secrets()
        .map_err(|e| TlsError::Keys {
            peer,
            source: Box::new(e),
        })?;
    let record_err = |source| TlsError::RecordLayer { peer, source };
    let seal = record::Sealer::new(keys.tx.0, keys.tx.1, limit).map_err(record_err)?;
    let open = record::Opener::new(keys.rx.0, keys.rx.1).map_err(record_err)?;
    Ok(stream::split(
        sock_rw,
        dup(sock)?,
        &raw[start..end],
        seal,
        open,
        client,
    ))
}
