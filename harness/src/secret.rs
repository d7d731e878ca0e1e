//! The shared secret `vmm receive` and `vmm migrate` need on non-loopback links
//! (`--secret-file`): 32 random bytes, hex, in a mode-0600 file removed on drop.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Errors creating the secret file.
#[derive(Debug, thiserror::Error)]
#[error("creating the migration secret file {path}: {source}")]
pub struct SecretError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A secret file that exists while this value lives.
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    /// Writes a fresh secret to `path` (replacing any file there).
    pub fn create(path: PathBuf) -> Result<Self, SecretError> {
        // Wiped when dropped: only the file keeps the secret.
        let bytes = Zeroizing::new(rand::random::<[u8; 32]>());
        let hex = Zeroizing::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let _ = std::fs::remove_file(&path);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(hex.as_bytes()));
        match written {
            Ok(()) => Ok(Self { path }),
            Err(source) => Err(SecretError { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_is_private_random_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let a = SecretFile::create(p.clone()).unwrap();
        let text = std::fs::read_to_string(a.path()).unwrap();
        assert_eq!(text.len(), 64);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(a);
        assert!(!p.exists());
        let b = SecretFile::create(p.clone()).unwrap();
        assert_ne!(std::fs::read_to_string(b.path()).unwrap(), text);
    }
}
