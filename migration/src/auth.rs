//! Shared-secret authentication: HMAC-SHA256 challenge-response in both directions. The secret
//! never crosses the wire; each side proves it holds it by MACing both nonces, the session id,
//! the channel and its own role label.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::wire::{ChannelKind, NONCE_LEN};

/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why authentication could not be set up or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret{} is {len} bytes; at least {MIN_SECRET_LEN} are required", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    SecretTooShort { path: Option<PathBuf>, len: usize },
    #[error("refusing to migrate over non-loopback address {addr} without TLS (give --tls-dir) and without a shared secret (--secret-file)")]
    SecretRequired { addr: SocketAddr },
    #[error("refusing to migrate over non-loopback address {addr} in plaintext: the shared secret authenticates the handshake, but nothing encrypts or protects the pages (give --tls-dir, or --allow-plaintext to accept this)")]
    PlaintextRefused { addr: SocketAddr },
    #[error("authentication failed: {0}")]
    Failed(&'static str),
}

/// The shared secret. Its bytes are wiped when dropped (zeroize).
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from raw bytes (at least [`MIN_SECRET_LEN`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, AuthError> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AuthError::SecretTooShort {
                path: None,
                len: bytes.len(),
            });
        }
        Ok(Secret(bytes))
    }

    /// Read a secret file: its raw bytes, minus one trailing "\n" or "\r\n".
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let mut bytes =
            Zeroizing::new(std::fs::read(path).map_err(|source| AuthError::SecretFile {
                path: path.to_owned(),
                source,
            })?);
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AuthError::SecretTooShort {
                path: Some(path.to_owned()),
                len: bytes.len(),
            });
        }
        Ok(Secret(bytes))
    }

    fn key(&self) -> &[u8] {
        &self.0
    }
}

/// Without a secret, only loopback peers are allowed (the rule before TLS; see
/// [`check_policy`]).
pub fn check_address(addr: &SocketAddr, secret: Option<&Secret>) -> Result<(), AuthError> {
    if secret.is_none() && !addr.ip().is_loopback() {
        return Err(AuthError::SecretRequired { addr: *addr });
    }
    Ok(())
}

/// What may be used on `addr`: with TLS anything; without TLS a loopback address always, a
/// non-loopback one only with a shared secret and `allow_plaintext` (returns `true` then: the
/// caller warns that the traffic is in the clear).
pub fn check_policy(
    addr: &SocketAddr,
    secret: Option<&Secret>,
    tls: bool,
    allow_plaintext: bool,
) -> Result<bool, AuthError> {
    if tls || addr.ip().is_loopback() {
        return Ok(false);
    }
    if secret.is_none() {
        return Err(AuthError::SecretRequired { addr: *addr });
    }
    if !allow_plaintext {
        return Err(AuthError::PlaintextRefused { addr: *addr });
    }
    tracing::warn!(
        "migrating over non-loopback address {addr} in plaintext (--allow-plaintext): pages and state can be read and altered on the way"
    );
    Ok(true)
}

/// Which side computes a proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Source => b"vmm-migration/v1 source proof",
            Role::Destination => b"vmm-migration/v1 destination proof",
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// A fresh non-zero session id.
pub fn session_id() -> u64 {
    loop {
        let id = rand::rngs::OsRng.next_u64();
        if id != 0 {
            return id;
        }
    }
}

/// Everything a proof covers.
#[derive(Clone, Copy, Debug)]
pub struct Transcript {
    pub channel: ChannelKind,
    pub session_id: u64,
    pub source_nonce: [u8; NONCE_LEN],
    pub destination_nonce: [u8; NONCE_LEN],
}

fn mac(secret: Option<&Secret>, role: Role, t: &Transcript) -> HmacSha256 {
    // Without a secret (loopback only) the key is empty: the exchange still binds the session.
    let key = secret.map(Secret::key).unwrap_or(&[]);
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(role.label());
    m.update(&[t.channel as u8]);
    m.update(&t.session_id.to_le_bytes());
    m.update(&t.source_nonce);
    m.update(&t.destination_nonce);
    m
}

/// The proof `role` sends for transcript `t`.
pub fn prove(secret: Option<&Secret>, role: Role, t: &Transcript) -> [u8; NONCE_LEN] {
    mac(secret, role, t).finalize().into_bytes().into()
}

/// Check the peer's proof in constant time.
pub fn verify(
    secret: Option<&Secret>,
    role: Role,
    t: &Transcript,
    proof: &[u8; NONCE_LEN],
) -> Result<(), AuthError> {
    mac(secret, role, t).verify_slice(proof).map_err(|_| {
        AuthError::Failed(match role {
            Role::Source => "the source's proof does not match our secret",
            Role::Destination => "the destination's proof does not match our secret",
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transcript {
        Transcript {
            channel: ChannelKind::Main,
            session_id: 42,
            source_nonce: [1; 32],
            destination_nonce: [2; 32],
        }
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_role() {
        let a = Secret::from_bytes(b"0123456789abcdef".to_vec()).unwrap();
        let b = Secret::from_bytes(b"0123456789abcdeX".to_vec()).unwrap();
        let p = prove(Some(&a), Role::Source, &t());
        verify(Some(&a), Role::Source, &t(), &p).unwrap();
        assert!(verify(Some(&b), Role::Source, &t(), &p).is_err());
        assert!(
            verify(Some(&a), Role::Destination, &t(), &p).is_err(),
            "reflection"
        );
        let mut other = t();
        other.channel = ChannelKind::Urgent;
        assert!(verify(Some(&a), Role::Source, &other, &p).is_err());
        assert!(verify(None, Role::Source, &t(), &p).is_err());
    }

    #[test]
    fn secret_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"too short\n").unwrap();
        let e = Secret::from_file(&short).unwrap_err();
        assert!(e.to_string().contains("9 bytes"), "{e}");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"sixteen bytes!!!\n").unwrap();
        assert_eq!(Secret::from_file(&ok).unwrap().key(), b"sixteen bytes!!!");
        let e = Secret::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, AuthError::SecretFile { .. }));
    }

    #[test]
    fn no_secret_means_loopback_only() {
        assert!(check_address(&"127.0.0.1:1".parse().unwrap(), None).is_ok());
        assert!(check_address(&"[::1]:1".parse().unwrap(), None).is_ok());
        let e = check_address(&"10.0.0.1:1".parse().unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("without a shared secret"));
        let s = Secret::from_bytes(vec![7; 16]).unwrap();
        assert!(check_address(&"10.0.0.1:1".parse().unwrap(), Some(&s)).is_ok());
    }

    #[test]
    fn off_loopback_needs_tls_or_an_explicit_plaintext_opt_in() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let far: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let s = Secret::from_bytes(vec![7; 16]).unwrap();
        assert!(!check_policy(&lo, None, false, false).unwrap());
        assert!(!check_policy(&far, None, true, false).unwrap());
        let e = check_policy(&far, None, false, true).unwrap_err();
        assert!(e.to_string().contains("--tls-dir"), "{e}");
        let e = check_policy(&far, Some(&s), false, false).unwrap_err();
        assert!(e.to_string().contains("--allow-plaintext"), "{e}");
        assert!(check_policy(&far, Some(&s), false, true).unwrap());
    }
}
