//! Scheduling priority of migration threads: the urgent page path (the destination's fault
//! service and urgent-reply reader, the source's urgent page server) runs ahead of bulk work
//! (the bulk sender and the bulk receive loop), so a faulting vCPU does not wait behind a bulk
//! frame for a CPU. On a machine with few cores the urgent threads otherwise lose whole
//! scheduler slices (milliseconds) to bulk copying.
//!
//! Each role sets the calling thread's nice value and its EEVDF slice (`sched_attr.sched_runtime`
//! for SCHED_OTHER, Linux 6.12+): a short slice lets a woken urgent thread preempt a running bulk
//! thread at once. Raising priority (a negative nice) needs CAP_SYS_NICE; without it the role
//! keeps the thread's nice value and applies the rest, logging at debug level. Every change is
//! undone when the returned [`PriorityGuard`] is dropped (as far as the privilege allows).

use std::io;
use std::time::Duration;

/// What a thread does in a migration, for its scheduling priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// On a faulting vCPU's critical path: fault service, urgent page requests and replies.
    /// (SCHED_FIFO for this role was measured worse than nice -10 with a short slice: see
    /// docs/measuring.md.)
    Urgent,
    /// Background page transfer that may wait for the urgent path.
    Bulk,
    /// A collapse's final section, which every vCPU touching the unit (or, for guest_memfd,
    /// every vCPU) waits for: real-time (SCHED_FIFO, priority 1) so nothing preempts it. Needs
    /// CAP_SYS_NICE; without it the thread keeps its priority.
    Freeze,
    /// A vCPU thread, placed from outside (`cpu_placement::place_threads`), never through
    /// [`enter`]: with a CPU placement it runs beside the urgent threads while postcopy runs.
    Vcpu,
}

impl ThreadRole {
    /// Nice value of the role.
    pub fn nice(self) -> i32 {
        match self {
            ThreadRole::Urgent => -10,
            // +10 was tried: on two cores it starved the background transfer behind the
            // spinning vCPUs (postcopy ran longer, so more faults went remote) without a
            // latency gain that stood out of the noise. Bulk keeps the default.
            ThreadRole::Bulk | ThreadRole::Freeze | ThreadRole::Vcpu => 0,
        }
    }

    /// EEVDF slice of the role (None: the kernel's default).
    pub fn slice(self) -> Option<Duration> {
        match self {
            ThreadRole::Urgent => Some(Duration::from_micros(100)),
            ThreadRole::Bulk | ThreadRole::Freeze | ThreadRole::Vcpu => None,
        }
    }
}

/// Why a thread's scheduling attributes could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PriorityError {
    #[error("sched_getattr of thread {tid} failed: {source}")]
    Get {
        tid: i32,
        #[source]
        source: io::Error,
    },
    #[error(
        "sched_setattr of thread {tid} (policy {policy}, nice {nice}, slice {slice_ns} ns) failed: {source}"
    )]
    Set {
        tid: i32,
        policy: u32,
        nice: i32,
        slice_ns: u64,
        #[source]
        source: io::Error,
    },
    #[error("thread {tid} runs policy {policy}, not SCHED_OTHER: its priority is left alone")]
    NotNormal { tid: i32, policy: u32 },
}

impl PriorityError {
    /// The change needs a privilege the process does not have.
    pub fn is_permission(&self) -> bool {
        match self {
            PriorityError::Get { source, .. } | PriorityError::Set { source, .. } => {
                source.raw_os_error() == Some(libc::EPERM)
            }
            PriorityError::NotNormal { .. } => false,
        }
    }
}

fn current_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The calling thread's scheduling attributes.
fn get_attr(tid: i32) -> Result<libc::sched_attr, PriorityError> {
    kernel_abi::sched::sched_getattr(tid).map_err(|source| PriorityError::Get { tid, source })
}

fn set_attr(tid: i32, attr: &libc::sched_attr) -> Result<(), PriorityError> {
    kernel_abi::sched::sched_setattr(tid, attr).map_err(|source| PriorityError::Set {
        tid,
        policy: attr.sched_policy,
        nice: attr.sched_nice,
        slice_ns: attr.sched_runtime,
        source,
    })
}

/// Set the calling thread's nice value and EEVDF slice (None: the default slice). The thread
/// must run SCHED_OTHER or SCHED_BATCH. Returns the attributes it had before.
pub fn set_current(nice: i32, slice: Option<Duration>) -> Result<libc::sched_attr, PriorityError> {
    let tid = current_tid();
    let before = get_attr(tid)?;
    let policy = before.sched_policy;
    if policy != libc::SCHED_OTHER as u32 && policy != libc::SCHED_BATCH as u32 {
        return Err(PriorityError::NotNormal { tid, policy });
    }
    let mut attr = before;
    attr.size = kernel_abi::sched::SCHED_ATTR_SIZE_VER0;
    attr.sched_flags = 0;
    attr.sched_nice = nice;
    attr.sched_runtime = slice.map_or(0, |s| s.as_nanos().min(u64::MAX as u128) as u64);
    set_attr(tid, &attr)?;
    Ok(before)
}

/// Make the calling thread SCHED_FIFO at priority 1. Returns the attributes it had before.
fn set_realtime() -> Result<libc::sched_attr, PriorityError> {
    let tid = current_tid();
    let before = get_attr(tid)?;
    let mut attr = before;
    attr.size = kernel_abi::sched::SCHED_ATTR_SIZE_VER0;
    attr.sched_flags = 0;
    attr.sched_policy = libc::SCHED_FIFO as u32;
    attr.sched_priority = 1;
    attr.sched_nice = 0;
    attr.sched_runtime = 0;
    set_attr(tid, &attr)?;
    Ok(before)
}

/// Restores the thread's scheduling attributes when dropped (on the thread that made it).
#[must_use = "dropping the guard restores the previous priority at once"]
pub struct PriorityGuard {
    previous: Option<libc::sched_attr>,
    /// The thread's CPU affinity before its role's placement (None: not placed).
    previous_cpus: Option<nix::sched::CpuSet>,
    /// Dropping on another thread would change that thread: a guard stays on its thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl PriorityGuard {
    /// Whether the role's priority was applied (fully or with the nice value kept).
    pub fn applied(&self) -> bool {
        self.previous.is_some()
    }
}

impl Drop for PriorityGuard {
    fn drop(&mut self) {
        if let Some(cpus) = self.previous_cpus.take() {
            crate::cpu_placement::restore_thread(current_tid(), &cpus);
        }
        let Some(mut previous) = self.previous.take() else {
            return;
        };
        previous.size = kernel_abi::sched::SCHED_ATTR_SIZE_VER0;
        previous.sched_flags = 0;
        if let Err(e) = set_attr(current_tid(), &previous) {
            if e.is_permission() {
                tracing::debug!("cannot restore the thread's scheduling priority: {e}");
            } else {
                tracing::warn!("cannot restore the thread's scheduling priority: {e}");
            }
        }
    }
}

/// Give the calling thread `role`'s priority, best effort: without the privilege for a negative
/// nice value the thread keeps its nice value and gets the rest; any other failure is logged and
/// leaves the thread as it was. Under a CPU placement ([`crate::cpu_placement`]) the thread
/// also moves to its role's CPUs. Both last until the guard is dropped.
pub fn enter(role: ThreadRole) -> PriorityGuard {
    let previous_cpus = crate::cpu_placement::current()
        .and_then(|p| p.cpus_of(role))
        .and_then(
            |cpus| match crate::cpu_placement::set_thread(current_tid(), cpus) {
                Ok(before) => {
                    tracing::debug!(target: "migration::cpu_placement", "{role:?} thread on CPUs {cpus}");
                    Some(before)
                }
                Err(e) => {
                    tracing::warn!("cannot place the {role:?} thread on CPUs {cpus}: {e}");
                    None
                }
            },
        );
    let slice = role.slice();
    let result = match role {
        ThreadRole::Freeze => set_realtime(),
        _ => match set_current(role.nice(), slice) {
            Err(e) if e.is_permission() => {
                tracing::debug!(
                    "no {role:?} thread priority ({e}); trying with the nice value kept"
                );
                get_attr(current_tid()).and_then(|a| set_current(a.sched_nice, slice))
            }
            other => other,
        },
    };
    let previous = match result {
        Ok(before) => Some(before),
        Err(e) if e.is_permission() => {
            tracing::debug!("no {role:?} thread priority: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("no {role:?} thread priority: {e}");
            None
        }
    };
    PriorityGuard {
        previous,
        previous_cpus,
        _not_send: std::marker::PhantomData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn freeze_role_is_real_time_and_guard_restores_it() {
        if !is_root() {
            eprintln!("SKIPPED: SCHED_FIFO needs CAP_SYS_NICE");
            return;
        }
        std::thread::spawn(|| {
            let tid = current_tid();
            let before = get_attr(tid).unwrap();
            {
                let g = enter(ThreadRole::Freeze);
                assert!(g.applied());
                let now = get_attr(tid).unwrap();
                assert_eq!(now.sched_policy, libc::SCHED_FIFO as u32);
                assert_eq!(now.sched_priority, 1);
            }
            let after = get_attr(tid).unwrap();
            assert_eq!(after.sched_policy, before.sched_policy);
            assert_eq!(after.sched_nice, before.sched_nice);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn bulk_role_lowers_priority_and_guard_restores_it() {
        std::thread::spawn(|| {
            let tid = current_tid();
            let before = get_attr(tid).unwrap();
            {
                let g = enter(ThreadRole::Bulk);
                assert!(g.applied());
                let now = get_attr(tid).unwrap();
                assert_eq!(now.sched_nice, ThreadRole::Bulk.nice());
            }
            let after = get_attr(tid).unwrap();
            // Lowering the nice value again needs the privilege; as root it is restored.
            if is_root() {
                assert_eq!(after.sched_nice, before.sched_nice);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn urgent_role_sets_short_slice() {
        std::thread::spawn(|| {
            let tid = current_tid();
            let g = enter(ThreadRole::Urgent);
            assert!(g.applied());
            let now = get_attr(tid).unwrap();
            let want = ThreadRole::Urgent.slice().unwrap().as_nanos() as u64;
            assert_eq!(now.sched_runtime, want);
            if is_root() {
                assert_eq!(now.sched_nice, ThreadRole::Urgent.nice());
            }
        })
        .join()
        .unwrap();
    }
}
