//! The control API: a Unix socket (mode 0600) speaking one JSON object per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume","force":false}`,
//! `{"cmd":"migrate","to":ADDR,"mode":"precopy|postcopy|hybrid","secret_file":PATH?,
//! "recover_timeout_s":N?}` (the VMM reads the secret itself, so it never crosses the socket),
//! and `{"cmd":"migrate-retarget","to":ADDR}` (a running migration reconnects to ADDR from its
//! next recovery attempt on).
//! Every reply is one line `{"ok":true,...}` or `{"ok":false,"error":MSG}`; `migrate` first
//! streams `{"progress":{...}}` lines while it works.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path} already exists (another VMM running? remove it if stale)")]
    SocketExists { path: PathBuf },
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set permissions of API socket {path}: {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed API message: {0}")]
    Malformed(String),
    #[error("the VMM refused: {0}")]
    Refused(String),
}

/// A request to the VMM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume {
        /// Resume even though the last migration's outcome is unknown (the destination may
        /// run the VM: only an operator who knows it does not may say so).
        #[serde(default)]
        force: bool,
    },
    Migrate {
        to: String,
        mode: String,
        #[serde(default)]
        secret_file: Option<String>,
        /// Directory with ca-cert.pem, client-cert.pem and client-key.pem: run both channels
        /// over TLS 1.3 with mutual certificate authentication.
        #[serde(default)]
        tls_dir: Option<String>,
        /// The name the destination's certificate must carry (default: the host of `to`).
        #[serde(default)]
        tls_server_name: Option<String>,
        /// Allow plaintext (with a secret) to a non-loopback destination.
        #[serde(default)]
        allow_plaintext: bool,
        /// How long to keep reconnecting after the link fails past the switchover (default
        /// 600 s).
        #[serde(default)]
        recover_timeout_s: Option<u64>,
    },
    /// Point the running migration's recovery at another destination address.
    MigrateRetarget {
        to: String,
    },
}

/// What the VMM does with requests; the launcher implements it.
pub trait ApiHandler: Send + Sync {
    /// Answers a request. `progress` sends intermediate lines (migration progress).
    fn handle(
        &self,
        req: Request,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, String>;

    /// Called once the reply to a request has been written (a migrated VM stops only after
    /// its summary reached the client).
    fn after_reply(&self) {}
}

/// The listening API socket; removes the socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600) and serves requests on a thread of its own.
    pub fn start(path: &Path, handler: Arc<dyn ApiHandler>) -> Result<ApiServer, ApiError> {
        if path.exists() {
            // A socket nobody listens on is stale: take it over; a live one is an error.
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::SocketExists {
                    path: path.to_path_buf(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        // Create the socket with no permissions for others from the start (no window where
        // another user could connect), then set 0600 explicitly.
        // SAFETY: umask only changes this process's file creation mask; it cannot fail.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ApiError::Chmod {
                path: path.to_path_buf(),
                source,
            },
        )?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Role::Api);
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            let h = handler.clone();
                            let _ = std::thread::Builder::new()
                                .name("api-conn".into())
                                .spawn(move || serve(stream, h.as_ref()));
                        }
                        Err(e) => tracing::warn!("API accept failed: {e}"),
                    }
                }
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, handler: &dyn ApiHandler) {
    let out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => {
            let mut progress = |v: serde_json::Value| {
                let mut w = &out;
                let _ = writeln!(w, "{}", serde_json::json!({ "progress": v }));
            };
            match handler.handle(req, &mut progress) {
                Ok(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("ok".into(), true.into());
                    }
                    v
                }
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            }
        }
        Err(e) => serde_json::json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    let mut w = &out;
    let _ = writeln!(w, "{reply}");
    let _ = w.flush();
    handler.after_reply();
}

/// Client side: sends `req` to the VMM at `path`, calls `on_progress` for each progress line and
/// returns the final reply (an error if it says `ok: false`).
pub fn call(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ApiError> {
    let mut s = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let line = serde_json::to_string(req).map_err(|e| ApiError::Malformed(e.to_string()))?;
    writeln!(s, "{line}")?;
    let reader = BufReader::new(s);
    for l in reader.lines() {
        let l = l?;
        let v: serde_json::Value =
            serde_json::from_str(&l).map_err(|e| ApiError::Malformed(format!("{e}: {l}")))?;
        if let Some(p) = v.get("progress") {
            on_progress(p);
            continue;
        }
        return match v.get("ok").and_then(|o| o.as_bool()) {
            Some(true) => Ok(v),
            _ => Err(ApiError::Refused(
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given")
                    .to_string(),
            )),
        };
    }
    Err(ApiError::Malformed(
        "the VMM closed the connection without a reply".into(),
    ))
}
