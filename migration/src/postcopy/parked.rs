//! The engine's threads, started before the blackout and parked until `prepare` gives each its
//! work.
//!
//! Starting a thread is not free on these hosts: the clone and its stack, and above all the
//! seccomp filter of its role that the thread hook installs (the kernel checks, converts and
//! compiles the BPF program for every thread). Measured inside the blackout of a 1 GiB postcopy,
//! the seven threads the destination started there made its start 1.5-4 ms instead of about
//! 1 ms with the filters off. The engine is built before Ready, so its threads start then and
//! wait; `prepare` hands each one its loop. A parked thread whose work never comes (the
//! migration ended in precopy, or the engine was dropped) sees its channel close and ends.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::thread_hook::{self, ThreadKind};

/// The work a parked thread runs.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// One parked thread: its name, and the channel its work comes on.
struct Slot {
    name: String,
    work: mpsc::Sender<Job>,
    handle: JoinHandle<()>,
}

/// Threads started ahead of their work.
#[derive(Default)]
pub(crate) struct Parked {
    slots: Vec<Slot>,
}

impl Parked {
    /// Start a thread named `name` of `kind` (the thread hook runs in it now) that waits for
    /// its work.
    pub fn park(&mut self, name: &str, kind: ThreadKind) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                thread_hook::started(kind);
                if let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        self.slots.push(Slot {
            name: name.to_owned(),
            work: tx,
            handle,
        });
        Ok(())
    }

    /// Run `job` on the parked thread named `name` if there is one, else on a thread started
    /// now (named `name`, the hook run for `kind` first).
    pub fn launch(
        &mut self,
        name: &str,
        kind: ThreadKind,
        job: Job,
    ) -> std::io::Result<JoinHandle<()>> {
        let job = match self.slots.iter().position(|s| s.name == name) {
            Some(i) => {
                let slot = self.slots.swap_remove(i);
                match slot.work.send(job) {
                    Ok(()) => return Ok(slot.handle),
                    // The thread is gone (it could not start its hook?): start another.
                    Err(mpsc::SendError(job)) => job,
                }
            }
            None => job,
        };
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                thread_hook::started(kind);
                job()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_parked_thread_runs_its_job_and_an_unknown_name_gets_a_new_thread() {
        let mut p = Parked::default();
        p.park("test-parked", ThreadKind::Collapse).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for name in ["test-parked", "test-fresh"] {
            let (ran, names) = (Arc::clone(&ran), Arc::clone(&names));
            handles.push(
                p.launch(
                    name,
                    ThreadKind::Collapse,
                    Box::new(move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        let me = std::thread::current().name().map(str::to_owned);
                        names.lock().unwrap().push(me);
                    }),
                )
                .unwrap(),
            );
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        let mut names = names.lock().unwrap().clone();
        names.sort();
        assert_eq!(
            names,
            vec![
                Some("test-fresh".to_owned()),
                Some("test-parked".to_owned())
            ]
        );
        assert!(p.slots.is_empty());
    }

    #[test]
    fn a_parked_thread_without_work_ends_when_dropped() {
        let mut p = Parked::default();
        p.park("test-idle", ThreadKind::Collapse).unwrap();
        let handle = p.slots.pop().unwrap();
        drop(handle.work);
        handle.handle.join().unwrap();
    }
}
