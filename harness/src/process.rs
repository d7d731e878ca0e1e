//! Child processes under test: spawned with stdout captured line by line (and copied to a log
//! file), stderr sent to a second log file, killed and reaped on drop, registered with
//! [`crate::cleanup`] while alive.

use crate::cleanup;
use migration::sync::MutexExt;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors from child process handling.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("creating log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {name} ({cmd}): {source}")]
    Spawn {
        name: String,
        cmd: String,
        source: std::io::Error,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
}

/// One captured stdout line with the time it was read.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A running child process.
pub struct Proc {
    name: String,
    child: Child,
    pid: u32,
    status: Option<ExitStatus>,
    lines: Arc<Mutex<Vec<Line>>>,
    reader: Option<JoinHandle<()>>,
    /// Where its stderr goes.
    err_path: PathBuf,
}

/// Renders a command for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Proc {
    /// Starts `cmd`; stdout goes to memory and `<log>.out`, stderr to `<log>.err`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, ProcessError> {
        let with_suffix = |suffix: &str| {
            let mut p = log.as_os_str().to_os_string();
            p.push(suffix);
            PathBuf::from(p)
        };
        let out_path = with_suffix(".out");
        let err_path = with_suffix(".err");
        let mut out_file =
            std::fs::File::create(&out_path).map_err(|source| ProcessError::Log {
                path: out_path.clone(),
                source,
            })?;
        let err_file = std::fs::File::create(&err_path).map_err(|source| ProcessError::Log {
            path: err_path.clone(),
            source,
        })?;
        let _ = writeln!(out_file, "# {}", describe(&cmd));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_file));
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_string(),
            cmd: describe(&cmd),
            source,
        })?;
        let pid = child.id();
        cleanup::register_child(pid);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stdout.take().map(|stdout| {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for text in BufReader::new(stdout).lines() {
                    let Ok(text) = text else { break };
                    let _ = writeln!(out_file, "{text}");
                    lines.lock_unpoisoned().push(Line {
                        at: Instant::now(),
                        text,
                    });
                }
            })
        });
        Ok(Self {
            name: name.to_string(),
            child,
            pid,
            status: None,
            lines,
            reader,
            err_path,
        })
    }

    /// The last non-empty line it wrote to stderr so far (for a VMM that stopped: its error).
    pub fn last_stderr_line(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.err_path).ok()?;
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A copy of every stdout line read so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock_unpoisoned().clone()
    }

    /// Stdout so far as one text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in self.lines() {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// Exit status if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
            if self.status.is_some() {
                cleanup::unregister_child(self.pid);
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
            }
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` stdout lines satisfy `pred` (returns true), the process exits, or
    /// `timeout` passes (both false).
    pub fn wait_for_lines(
        &mut self,
        pred: impl Fn(&str) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Result<bool, ProcessError> {
        let end = Instant::now() + timeout;
        loop {
            let n = self
                .lines
                .lock_unpoisoned()
                .iter()
                .filter(|l| pred(&l.text))
                .count();
            if n >= count {
                return Ok(true);
            }
            if self.try_wait()?.is_some() || Instant::now() >= end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal if it has not been reaped.
    pub fn signal(&mut self, sig: libc::c_int) -> Result<(), ProcessError> {
        if self.try_wait()?.is_none() {
            // SAFETY: the child is not reaped yet, so the pid still names it.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        self.signal(libc::SIGTERM)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(Some(s));
        }
        self.signal(libc::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            cleanup::unregister_child(self.pid);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
