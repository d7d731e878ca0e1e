//! A CA and certificates in QEMU's layout, for `vmm tls-init` and the tests (rcgen).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{
    server_name, TlsError, CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY,
};

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
