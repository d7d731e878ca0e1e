//! The API client the `vmm` commands use: one HTTP/1.1 request per call over the Unix socket.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::{
    ErrorBody, Ping, ResumeRequest, RetargetReply, RetargetRequest, SendMigration, VmInfo,
};
use super::server::PREFIX;
use super::ApiError;

/// A client of the API socket at one path.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into() }
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET vmm.ping`.
    pub fn ping(&self) -> Result<Ping, ApiError> {
        self.get("vmm.ping")
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<VmInfo, ApiError> {
        self.get("vm.info")
    }

    /// `PUT vm.pause`.
    pub fn pause(&self) -> Result<(), ApiError> {
        self.put::<()>("vm.pause", None).map(drop)
    }

    /// `PUT vm.resume`.
    pub fn resume(&self, force: bool) -> Result<(), ApiError> {
        self.put("vm.resume", Some(&ResumeRequest { force }))
            .map(drop)
    }

    /// `PUT vm.shutdown`.
    pub fn shutdown(&self) -> Result<(), ApiError> {
        self.put::<()>("vm.shutdown", None).map(drop)
    }

    /// `PUT vm.send-migration`: returns once the migration ended, with its summary.
    pub fn send_migration(&self, req: &SendMigration) -> Result<serde_json::Value, ApiError> {
        let raw = self.put("vm.send-migration", Some(req))?;
        decode("vm.send-migration", &raw)
    }

    /// `GET vm.migration`: the live statistics (as JSON, QEMU's names; see
    /// [`migration::MigrationInfo`]).
    pub fn migration(&self) -> Result<serde_json::Value, ApiError> {
        self.get("vm.migration")
    }

    /// `PUT vm.migration-cancel`.
    pub fn cancel(&self) -> Result<(), ApiError> {
        self.put::<()>("vm.migration-cancel", None).map(drop)
    }

    /// `PUT vm.migration-retarget`.
    pub fn retarget(&self, to: &str) -> Result<RetargetReply, ApiError> {
        let raw = self.put(
            "vm.migration-retarget",
            Some(&RetargetRequest {
                destination_url: to.to_string(),
            }),
        )?;
        decode("vm.migration-retarget", &raw)
    }

    /// `GET endpoint`, decoding the JSON reply.
    pub fn get<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, ApiError> {
        let raw = self.call(Method::GET, endpoint, None)?;
        decode(endpoint, &raw)
    }

    /// `PUT endpoint` with an optional JSON body; returns the reply's body (empty for 204).
    pub fn put<B: Serialize>(&self, endpoint: &str, body: Option<&B>) -> Result<Bytes, ApiError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|source| ApiError::Encode {
                endpoint: endpoint.to_string(),
                source,
            })?),
            None => None,
        };
        self.call(Method::PUT, endpoint, body)
    }

    /// One request; a non-2xx status becomes [`ApiError::Refused`] with the server's message.
    pub fn call(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiError::Runtime)?;
        let http = |source| ApiError::Http {
            endpoint: endpoint.to_string(),
            source,
        };
        let (status, raw) = rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|source| ApiError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(format!("http://localhost{PREFIX}{endpoint}"))
                .header(hyper::header::HOST, "localhost");
            if body.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ApiError::Malformed {
                    endpoint: endpoint.to_string(),
                    detail: e.to_string(),
                })?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let raw = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok::<_, ApiError>((status, raw))
        })?;
        if (200..300).contains(&status) {
            return Ok(raw);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&raw) {
            Ok(b) => b.error,
            Err(_) => String::from_utf8_lossy(&raw).trim().to_string(),
        };
        Err(ApiError::Refused { status, message })
    }
}

fn decode<T: DeserializeOwned>(endpoint: &str, raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::Malformed {
        endpoint: endpoint.to_string(),
        detail: e.to_string(),
    })
}
