//! The event monitor (`--event-monitor path=FILE` or `fd=N`): one JSON object per line,
//! `{"timestamp":{"seconds":S,"microseconds":US},"source":"vm"|"migration","event":NAME,
//! "properties":{...}}`, like Cloud Hypervisor's. Lines are written whole with one `write` on
//! an append-mode file, from the thread the event happened on (never a vCPU thread; a
//! unit-collapsed event comes from the collapse thread, or in native mode from the fault worker
//! that settled the unit), so none is lost when the VMM exits right after.

use migration::sync::MutexExt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventTarget {
    /// Appended to this file (created if missing).
    Path(PathBuf),
    /// Written to this inherited file descriptor.
    Fd(RawFd),
}

/// Errors of the event monitor.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event monitor '{0}': expected path=FILE or fd=N")]
    Syntax(String),
    #[error("cannot open event file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event fd {fd} is not open: {source}")]
    BadFd { fd: RawFd, source: std::io::Error },
}

impl FromStr for EventTarget {
    type Err = EventError;

    fn from_str(s: &str) -> Result<Self, EventError> {
        if let Some(p) = s.strip_prefix("path=") {
            if !p.is_empty() {
                return Ok(EventTarget::Path(PathBuf::from(p)));
            }
        }
        if let Some(n) = s.strip_prefix("fd=") {
            if let Ok(fd) = n.parse::<RawFd>() {
                if fd >= 0 {
                    return Ok(EventTarget::Fd(fd));
                }
            }
        }
        Err(EventError::Syntax(s.to_string()))
    }
}

/// Who an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventSource {
    Vm,
    Migration,
}

/// The open event stream.
pub struct EventMonitor {
    out: Mutex<File>,
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: Timestamp,
    source: EventSource,
    event: &'a str,
    properties: serde_json::Value,
}

impl EventMonitor {
    /// Opens the target.
    pub fn open(target: &EventTarget) -> Result<EventMonitor, EventError> {
        let file = match target {
            EventTarget::Path(p) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| EventError::Open {
                    path: p.clone(),
                    source,
                })?,
            EventTarget::Fd(fd) => {
                // SAFETY: F_GETFD only reads the descriptor's flags; it tells whether `fd` is
                // open in this process before anything takes ownership of it.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(EventError::BadFd {
                        fd: *fd,
                        source: std::io::Error::last_os_error(),
                    });
                }
                // SAFETY: the descriptor is open (checked above), was handed to this process
                // for events, and nothing else in it owns or closes it.
                unsafe { File::from_raw_fd(*fd) }
            }
        };
        Ok(EventMonitor {
            out: Mutex::new(file),
        })
    }

    /// Writes one event (a failed write is logged, never fatal).
    pub fn emit(&self, source: EventSource, event: &str, properties: serde_json::Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = Line {
            timestamp: Timestamp {
                seconds: now.as_secs(),
                microseconds: now.subsec_micros(),
            },
            source,
            event,
            properties,
        };
        let Ok(mut text) = serde_json::to_vec(&line) else {
            return;
        };
        text.push(b'\n');
        let mut out = self.out.lock_unpoisoned();
        if let Err(e) = out.write_all(&text) {
            tracing::warn!("cannot write event '{event}': {e}");
        }
    }
}

/// Emits through an optional monitor.
pub fn emit(
    monitor: Option<&EventMonitor>,
    source: EventSource,
    event: &str,
    properties: serde_json::Value,
) {
    if let Some(m) = monitor {
        m.emit(source, event, properties);
    }
}

/// Migration events (from the migration crate's threads) become `source: "migration"` lines:
/// the event's tag is the line's `event`, its other fields the `properties`.
impl migration::EventSink for EventMonitor {
    fn emit(&self, e: migration::MigrationEvent) {
        let mut v = match serde_json::to_value(&e) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return,
        };
        let name = match v.remove("event") {
            Some(serde_json::Value::String(n)) => n,
            _ => return,
        };
        EventMonitor::emit(
            self,
            EventSource::Migration,
            &name,
            serde_json::Value::Object(v),
        );
    }
}
