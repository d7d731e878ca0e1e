//! The API server: axum on a current-thread tokio runtime on a thread of its own ("api"); the
//! VM work behind a request runs on the runtime's blocking pool ("api-blocking").

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::{ErrorBody, ResumeRequest, RetargetRequest, SendMigration};
use super::{ApiError, ControlError, VmControl};

/// Where every endpoint lives.
pub const PREFIX: &str = "/api/v1/";

/// How long [`ApiServer::shutdown`] lets replies in flight finish.
const DRAIN: Duration = Duration::from_secs(3);

type Ctl = Arc<dyn VmControl>;

/// The listening API; [`ApiServer::shutdown`] (or dropping it) finishes replies in flight, stops
/// the server and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<mpsc::Receiver<()>>,
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600) and serves the API on a thread of its own.
    pub fn start(path: &Path, control: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
        let listener = bind(path)?;
        listener.set_nonblocking(true).map_err(ApiError::Runtime)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("api-blocking")
            .max_blocking_threads(8)
            .on_thread_start(|| crate::seccomp::enter_or_exit(crate::seccomp::Role::Api))
            .build()
            .map_err(ApiError::Runtime)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Role::Api);
                rt.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("API socket cannot join the runtime: {e}");
                            return;
                        }
                    };
                    let served = axum::serve(listener, router(control))
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!("API server stopped: {e}");
                    }
                });
                // A request still running (a migration the VM's end overtook) is not waited for.
                rt.shutdown_timeout(Duration::from_millis(100));
                let _ = done_tx.send(());
            })
            .map_err(ApiError::Runtime)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop: Some(stop_tx),
            done: Some(done_rx),
        })
    }

    /// Stops accepting, lets replies in flight finish (up to a few seconds), removes the socket.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(DRAIN);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Binds the socket with no permissions for others from the start (no window where another
/// user could connect), then sets 0600 explicitly. A socket file nobody listens on is stale and
/// taken over; a live one is an error.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::SocketExists {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: umask only changes this process's file creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// The endpoints (docs/openapi.json describes each).
fn router(control: Ctl) -> Router {
    let routes: [(&str, MethodRouter<Ctl>); 9] = [
        ("vmm.ping", only_get(get(ping))),
        ("vm.info", only_get(get(info))),
        ("vm.pause", only_put(put(pause))),
        ("vm.resume", only_put(put(resume))),
        ("vm.shutdown", only_put(put(shutdown))),
        ("vm.send-migration", only_put(put(send_migration))),
        ("vm.migration", only_get(get(migration_info))),
        ("vm.migration-cancel", only_put(put(cancel))),
        ("vm.migration-retarget", only_put(put(retarget))),
    ];
    let mut r = Router::new();
    for (name, method) in routes {
        r = r.route(&format!("{PREFIX}{name}"), method);
    }
    r.fallback(not_found).with_state(control)
}

fn only_get(m: MethodRouter<Ctl>) -> MethodRouter<Ctl> {
    m.fallback(|| async { error(405, "this endpoint takes GET".into()) })
}

fn only_put(m: MethodRouter<Ctl>) -> MethodRouter<Ctl> {
    m.fallback(|| async { error(405, "this endpoint takes PUT".into()) })
}

async fn not_found(uri: Uri) -> Response {
    error(
        404,
        format!(
            "no endpoint {} (endpoints are {PREFIX}vmm.ping, {PREFIX}vm.info, ...; see docs/openapi.json)",
            uri.path()
        ),
    )
}

/// An error reply: the status and a JSON body saying what went wrong.
struct Reject {
    status: u16,
    message: String,
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            code,
            Json(ErrorBody {
                error: self.message,
                status: self.status,
            }),
        )
            .into_response()
    }
}

impl From<ControlError> for Reject {
    fn from(e: ControlError) -> Reject {
        Reject {
            status: e.status(),
            message: e.to_string(),
        }
    }
}

fn error(status: u16, message: String) -> Response {
    Reject { status, message }.into_response()
}

type Reply = Result<Response, Reject>;

/// Runs `f` on the blocking pool (VM work may block: a pause waits for vCPUs, a migration for
/// its end).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Reject> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Reject {
        status: 500,
        message: format!("the request's task failed: {e}"),
    })
}

/// Decodes a JSON body; an empty body is `empty` when that is given (an optional body).
fn body<T: DeserializeOwned>(
    raw: Result<Bytes, BytesRejection>,
    empty: Option<T>,
) -> Result<T, Reject> {
    let raw = raw.map_err(|e| Reject {
        status: e.status().as_u16(),
        message: format!("cannot read the body: {e}"),
    })?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return empty.ok_or_else(|| Reject {
            status: 400,
            message: "this request needs a JSON body".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(&raw);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!("{path}: ")
        };
        Reject {
            status: 400,
            message: format!("malformed request body: {at}{}", e.inner()),
        }
    })
}

fn ok_json<T: Serialize>(v: T) -> Response {
    Json(v).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn ping(State(c): State<Ctl>) -> Reply {
    Ok(ok_json(blocking(move || c.ping()).await?))
}

async fn info(State(c): State<Ctl>) -> Reply {
    Ok(ok_json(blocking(move || c.info()).await?))
}

async fn pause(State(c): State<Ctl>) -> Reply {
    blocking(move || c.pause()).await??;
    Ok(no_content())
}

async fn resume(State(c): State<Ctl>, raw: Result<Bytes, BytesRejection>) -> Reply {
    let req: ResumeRequest = body(raw, Some(ResumeRequest::default()))?;
    blocking(move || c.resume(req.force)).await??;
    Ok(no_content())
}

async fn shutdown(State(c): State<Ctl>) -> Reply {
    blocking(move || c.shutdown()).await??;
    Ok(no_content())
}

async fn send_migration(State(c): State<Ctl>, raw: Result<Bytes, BytesRejection>) -> Reply {
    let req: SendMigration = body(raw, None)?;
    Ok(ok_json(blocking(move || c.send_migration(req)).await??))
}

async fn migration_info(State(c): State<Ctl>) -> Reply {
    Ok(ok_json(blocking(move || c.migration()).await??))
}

async fn cancel(State(c): State<Ctl>) -> Reply {
    blocking(move || c.cancel_migration()).await??;
    Ok(no_content())
}

async fn retarget(State(c): State<Ctl>, raw: Result<Bytes, BytesRejection>) -> Reply {
    let req: RetargetRequest = body(raw, None)?;
    Ok(ok_json(
        blocking(move || c.retarget(&req.destination_url)).await??,
    ))
}
