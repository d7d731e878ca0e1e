//! The control plane: an HTTP/1.1 API on a Unix socket (mode 0600), in Cloud Hypervisor's path
//! style under `/api/v1/`, with JSON bodies. `curl --unix-socket` talks to it; so does
//! [`Client`], which the `vmm status|pause|resume|shutdown|migrate|cancel` commands use.
//!
//! The server runs on a small tokio runtime of its own thread ([`ApiServer`]); what a request
//! does to the VM is [`VmControl`]'s business (the VMM's `control` module implements it), and
//! slow requests (a migration) run on tokio's blocking pool, never on the vCPU or fault-service
//! threads. The endpoints and bodies are described in docs/openapi.json (OpenAPI 3), which a test
//! checks against live replies.

mod client;
pub mod model;
mod server;

use std::path::PathBuf;

pub use client::Client;
pub use server::ApiServer;

use model::{Ping, RetargetReply, SendMigration, VmInfo};

/// Why the VMM refused or failed a request; each maps to one HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// The VM is not in a state that allows it (409), e.g. pause during an incoming migration.
    #[error("{0}")]
    Conflict(String),
    /// This VMM does not do that (501), e.g. migrate from a VMM built without a migrator.
    #[error("{0}")]
    Unsupported(String),
    /// It was tried and failed (500): a failed migration, a vCPU that would not pause.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::BadRequest(_) => 400,
            ControlError::Conflict(_) => 409,
            ControlError::Unsupported(_) => 501,
            ControlError::Failed(_) => 500,
        }
    }
}

/// What the API can ask of the VMM. Every method may block (the server calls them on tokio's
/// blocking pool).
pub trait VmControl: Send + Sync + 'static {
    /// Version and host capabilities.
    fn ping(&self) -> Ping;
    /// The VM's state, configuration, memory layout and vCPUs.
    fn info(&self) -> VmInfo;
    fn pause(&self) -> Result<(), ControlError>;
    fn resume(&self, force: bool) -> Result<(), ControlError>;
    /// Stops the VM; the VMM exits (status 0) once the reply is written.
    fn shutdown(&self) -> Result<(), ControlError>;
    /// Migrates the VM away; returns when the migration ended (the summary on success).
    fn send_migration(&self, req: SendMigration) -> Result<serde_json::Value, ControlError>;
    /// The live statistics of the migration in progress (or the last one).
    fn migration(&self) -> Result<migration::MigrationInfo, ControlError>;
    /// Cancels an outgoing migration before its switchover.
    fn cancel_migration(&self) -> Result<(), ControlError>;
    /// Points a running migration's recovery at another destination.
    fn retarget(&self, to: &str) -> Result<RetargetReply, ControlError>;
}

/// Errors of the API server and client.
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
    #[error("cannot start the API runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API request {endpoint}: {source}")]
    Http {
        endpoint: String,
        source: hyper::Error,
    },
    #[error("cannot encode the request to {endpoint}: {source}")]
    Encode {
        endpoint: String,
        source: serde_json::Error,
    },
    #[error("malformed reply from {endpoint}: {detail}")]
    Malformed { endpoint: String, detail: String },
    /// The VMM answered with an error status.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
}
