//! Which CPUs a migration's threads run on (`--migration-cpus LIST`).
//!
//! On a host with few cores, a woken vCPU or fault-path thread can wait for a CPU behind a bulk
//! system call (a 1 MiB socket read or write that this kernel, built without preemption, does
//! not interrupt). With a placement, the bulk threads (the source's push, the destination's bulk
//! receive and its collapse thread) run only on the chosen CPUs, and the vCPUs and the fault
//! path (fault service, the urgent channel's reader and page server) on all the others, while a
//! migration runs: a faulting vCPU's CPU is idle exactly while it waits, and the whole fault
//! round trip runs there. The trade: bulk transfer gets fewer CPUs. See docs/measuring.md,
//! *Bulk threads on a CPU of their own*.
//!
//! The placement is process-wide and set once ([`configure`]); without one nothing is pinned.
//! A thread takes its role's CPUs through [`crate::thread_priority::enter`] (its guard puts
//! the old affinity back), and other threads (the vCPUs) through [`place_threads`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::OnceLock;

use nix::sched::CpuSet;
use nix::unistd::Pid;

use crate::thread_priority::ThreadRole;

/// Why a CPU list was refused or a thread could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("{why} (expected a CPU list such as \"1\", \"2-3\" or \"1,3\")")]
    Parse { list: String, why: String },
    #[error("CPU {cpu} is not one this process may run on (allowed: {allowed})")]
    NotAllowed {
        list: String,
        cpu: usize,
        allowed: CpuList,
    },
    #[error(
        "it leaves no CPU for the vCPUs and the fault path (this process may run on \
         {allowed}; name fewer)"
    )]
    NothingLeft { list: String, allowed: CpuList },
    #[error("sched_getaffinity failed: {0}")]
    Get(#[source] nix::Error),
    #[error("the migration CPU placement was already set")]
    AlreadySet,
}

/// A set of CPU numbers, printed as a list ("0-1,3").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList(BTreeSet<usize>);

impl CpuList {
    /// Parses "1", "0-3", "1,3,5-6".
    pub fn parse(list: &str) -> Result<Self, PlacementError> {
        let bad = |why: String| PlacementError::Parse {
            list: list.to_string(),
            why,
        };
        let mut set = BTreeSet::new();
        for part in list.split(',') {
            let part = part.trim();
            let num = |s: &str| {
                s.parse::<usize>()
                    .ok()
                    .filter(|&n| n < CpuSet::count())
                    .ok_or_else(|| bad(format!("{s:?} is not a CPU number")))
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad(format!("range {part:?} runs backwards")));
                    }
                    set.extend(a..=b);
                }
                None => {
                    set.insert(num(part)?);
                }
            }
        }
        Ok(CpuList(set))
    }

    /// The CPUs the calling thread may run on now.
    pub fn allowed() -> Result<Self, PlacementError> {
        let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).map_err(PlacementError::Get)?;
        Ok(CpuList(
            (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect(),
        ))
    }

    /// The highest-numbered CPU in it.
    pub fn last(&self) -> Option<usize> {
        self.0.last().copied()
    }

    /// How many CPUs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn to_cpu_set(&self) -> CpuSet {
        let mut set = CpuSet::new();
        for &c in &self.0 {
            // In range: `parse` and `allowed` only take CPUs below CpuSet::count().
            let _ = set.set(c);
        }
        set
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpus: Vec<usize> = self.0.iter().copied().collect();
        let mut first = true;
        let mut i = 0;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", cpus[i], cpus[j])?;
            } else {
                write!(f, "{}", cpus[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// The bulk CPUs and the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub bulk: CpuList,
    pub rest: CpuList,
}

impl Placement {
    /// Bulk threads on `bulk`, the others on the rest of `allowed`.
    pub fn new(list: &str, allowed: &CpuList) -> Result<Self, PlacementError> {
        let bulk = CpuList::parse(list)?;
        if let Some(&cpu) = bulk.0.iter().find(|c| !allowed.0.contains(c)) {
            return Err(PlacementError::NotAllowed {
                list: list.to_string(),
                cpu,
                allowed: allowed.clone(),
            });
        }
        let rest = CpuList(allowed.0.difference(&bulk.0).copied().collect());
        if rest.is_empty() {
            return Err(PlacementError::NothingLeft {
                list: list.to_string(),
                allowed: allowed.clone(),
            });
        }
        Ok(Placement { bulk, rest })
    }

    /// The CPUs of a thread in `role` (None: the role is not placed).
    pub fn cpus_of(&self, role: ThreadRole) -> Option<&CpuList> {
        match role {
            ThreadRole::Bulk => Some(&self.bulk),
            // A collapse's freeze: the vCPUs that touch the unit wait for it, so it runs where
            // they run (their CPUs are idle while they wait), not behind the bulk transfer.
            ThreadRole::Urgent | ThreadRole::Vcpu | ThreadRole::Freeze => Some(&self.rest),
        }
    }
}

static PLACEMENT: OnceLock<Placement> = OnceLock::new();

/// Sets the process's placement from `--migration-cpus LIST` (the rest: every other CPU this
/// process may run on). Once per process.
pub fn configure(list: &str) -> Result<&'static Placement, PlacementError> {
    let placement = Placement::new(list, &CpuList::allowed()?)?;
    PLACEMENT
        .set(placement)
        .map_err(|_| PlacementError::AlreadySet)?;
    PLACEMENT.get().ok_or(PlacementError::AlreadySet)
}

/// The process's placement, if one was configured.
pub fn current() -> Option<&'static Placement> {
    PLACEMENT.get()
}

/// Moves thread `tid` (0: the calling thread) onto `cpus`; returns its affinity before.
pub(crate) fn set_thread(tid: i32, cpus: &CpuList) -> nix::Result<CpuSet> {
    let pid = Pid::from_raw(tid);
    let before = nix::sched::sched_getaffinity(pid)?;
    nix::sched::sched_setaffinity(pid, &cpus.to_cpu_set())?;
    Ok(before)
}

/// Puts a thread's affinity back (best effort: the thread may have ended).
pub(crate) fn restore_thread(tid: i32, before: &CpuSet) {
    if let Err(e) = nix::sched::sched_setaffinity(Pid::from_raw(tid), before) {
        tracing::debug!("cannot restore the CPU affinity of thread {tid}: {e}");
    }
}

/// Other threads (by thread id) placed for `role`; their affinity is put back on drop.
#[must_use = "dropping the guard puts the threads back at once"]
pub struct PlacedThreads {
    previous: Vec<(i32, CpuSet)>,
}

impl Drop for PlacedThreads {
    fn drop(&mut self) {
        for (tid, before) in &self.previous {
            restore_thread(*tid, before);
        }
    }
}

/// Places threads `tids` for `role` under the process's placement (none: nothing changes).
pub fn place_threads(tids: &[i32], role: ThreadRole) -> PlacedThreads {
    let mut previous = Vec::new();
    if let Some(cpus) = current().and_then(|p| p.cpus_of(role)) {
        for &tid in tids {
            match set_thread(tid, cpus) {
                Ok(before) => previous.push((tid, before)),
                Err(e) => tracing::warn!("cannot place {role:?} thread {tid} on CPUs {cpus}: {e}"),
            }
        }
        tracing::debug!("{} {role:?} thread(s) on CPUs {cpus}", previous.len());
    }
    PlacedThreads { previous }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> CpuList {
        CpuList::parse(s).unwrap()
    }

    #[test]
    fn lists_parse_and_print() {
        assert_eq!(list("1").to_string(), "1");
        assert_eq!(list("0-3").to_string(), "0-3");
        assert_eq!(list("3,1,2,7").to_string(), "1-3,7");
        assert_eq!(list("3,1,2,7").last(), Some(7));
        assert_eq!(list(" 2 , 0 ").to_string(), "0,2");
        for bad in ["", "x", "1-", "3-1", "-1", "1,,2", "99999"] {
            let e = CpuList::parse(bad).unwrap_err();
            assert!(
                matches!(&e, PlacementError::Parse { list, .. } if list == bad)
                    && e.to_string()
                        .ends_with("(expected a CPU list such as \"1\", \"2-3\" or \"1,3\")"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_placement_needs_allowed_cpus_and_leaves_some() {
        let allowed = list("0-1");
        let p = Placement::new("1", &allowed).unwrap();
        assert_eq!(
            (p.bulk.to_string(), p.rest.to_string()),
            ("1".into(), "0".into())
        );
        assert_eq!(p.cpus_of(ThreadRole::Urgent), Some(&list("0")));
        assert_eq!(p.cpus_of(ThreadRole::Vcpu), Some(&list("0")));
        assert_eq!(p.cpus_of(ThreadRole::Bulk), Some(&list("1")));
        assert_eq!(p.cpus_of(ThreadRole::Freeze), Some(&list("0")));
        let e = Placement::new("0-1", &allowed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it leaves no CPU for the vCPUs and the fault path (this process may run on 0-1; \
             name fewer)"
        );
        let e = Placement::new("2", &allowed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CPU 2 is not one this process may run on (allowed: 0-1)"
        );
    }

    #[test]
    fn a_placed_thread_is_put_back() {
        let allowed = CpuList::allowed().unwrap();
        if allowed.len() < 2 {
            eprintln!("SKIPPED: one CPU");
            return;
        }
        let first = CpuList(allowed.0.iter().take(1).copied().collect());
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid().as_raw();
            let before = set_thread(tid, &first).unwrap();
            assert_eq!(CpuList::allowed().unwrap(), first);
            restore_thread(tid, &before);
            assert_eq!(CpuList::allowed().unwrap(), allowed);
        })
        .join()
        .unwrap();
    }
}
