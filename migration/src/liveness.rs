//! Link liveness from the switchover on: each side sends a heartbeat on every channel it has
//! written nothing on for a while, and each reader treats silence longer than the liveness
//! bound as a dead link (see `FrameReader::set_liveness`). A link that silently drops packets
//! (no reset, no FIN) is so detected within about the liveness bound, in both directions.

use crate::sync::{CondvarExt, MutexExt};
use crate::transport::WriteHalf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wire::{FrameWriter, Message};

/// A frame writer several threads share (the thread that owns the channel's traffic and the
/// heartbeat thread).
pub type SharedWriter = Arc<Mutex<FrameWriter<WriteHalf>>>;

/// The heartbeat thread of one connected stretch of a session; stops when dropped.
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Sends a heartbeat on each of `writers` whenever it has been idle for `interval`. A
    /// writer busy with another frame is alive and skipped; a failed write is left to the
    /// channel's owner, whose next read or write fails too.
    pub fn start(writers: Vec<SharedWriter>, interval: Duration) -> std::io::Result<Heartbeat> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let tick = (interval / 4).max(Duration::from_millis(5));
        let thread = std::thread::Builder::new()
            .name("mig-heartbeat".into())
            .spawn(move || {
                crate::thread_hook::started(crate::thread_hook::ThreadKind::Channel);
                let (m, cv) = &*flag;
                let mut stopped = m.lock_unpoisoned();
                while !*stopped {
                    stopped = cv.wait_timeout_unpoisoned(stopped, tick).0;
                    if *stopped {
                        break;
                    }
                    for w in &writers {
                        let Ok(mut w) = w.try_lock() else { continue };
                        if w.idle_for() >= interval {
                            if let Err(e) = w.send(&Message::Heartbeat, "sending a heartbeat") {
                                tracing::debug!("heartbeat not sent: {e}");
                            }
                        }
                    }
                }
            })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock_unpoisoned() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
