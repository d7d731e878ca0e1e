//! Temporary growth of the hugetlb pools for a scenario: takes the shared huge-page lock
//! (`/run/lock/vmm-tests-hugepages.lock`, the same one the project's tests use), raises
//! `nr_hugepages` by what the scenario needs and restores the previous value on drop (and, through
//! [`crate::cleanup`], on a signal).

use std::fs::File;
use std::os::fd::AsRawFd;

/// The lock every user of the shared huge-page pools takes.
pub const LOCK_PATH: &str = "/run/lock/vmm-tests-hugepages.lock";

/// Errors from pool handling.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, not a page count")]
    Parse { path: String, text: String },
    #[error("asked for {wanted} free {size_kib} KiB huge pages, the pool could give only {got}")]
    Short {
        size_kib: u64,
        wanted: u64,
        got: u64,
    },
}

fn pool_file(size_kib: u64, name: &str) -> String {
    format!("/sys/kernel/mm/hugepages/hugepages-{size_kib}kB/{name}")
}

fn read_count(path: &str) -> Result<u64, PoolError> {
    let text = std::fs::read_to_string(path).map_err(|source| PoolError::Io {
        what: "reading",
        path: path.to_string(),
        source,
    })?;
    text.trim().parse().map_err(|_| PoolError::Parse {
        path: path.to_string(),
        text,
    })
}

fn write_count(path: &str, n: u64) -> Result<(), PoolError> {
    std::fs::write(path, n.to_string()).map_err(|source| PoolError::Io {
        what: "writing",
        path: path.to_string(),
        source,
    })
}

/// A reservation: the lock is held and the pool grown until drop.
pub struct HugePool {
    _lock: File,
    restore: Vec<(String, u64)>,
}

impl HugePool {
    /// Takes the lock and makes sure `(page size in KiB, free pages)` are available for each
    /// entry (entries with 0 pages are skipped). Blocks while another user holds the lock.
    pub fn reserve(needs: &[(u64, u64)]) -> Result<Self, PoolError> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|source| PoolError::Io {
                what: "opening the lock",
                path: LOCK_PATH.into(),
                source,
            })?;
        // SAFETY: flock on an fd we own; it blocks until the exclusive lock is granted.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(PoolError::Io {
                what: "flock(LOCK_EX) on",
                path: LOCK_PATH.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut pool = Self {
            _lock: lock,
            restore: Vec::new(),
        };
        for &(size_kib, pages) in needs.iter().filter(|n| n.1 > 0) {
            let nr = pool_file(size_kib, "nr_hugepages");
            let free = read_count(&pool_file(size_kib, "free_hugepages"))?;
            if free >= pages {
                continue;
            }
            let before = read_count(&nr)?;
            pool.restore.push((nr.clone(), before));
            crate::cleanup::register_pool(&nr, before);
            write_count(&nr, before + (pages - free))?;
            let got = read_count(&pool_file(size_kib, "free_hugepages"))?;
            if got < pages {
                return Err(PoolError::Short {
                    size_kib,
                    wanted: pages,
                    got,
                });
            }
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        for (path, n) in self.restore.drain(..).rev() {
            if let Err(e) = write_count(&path, n) {
                tracing::error!("restoring the huge page pool: {e}");
            }
            crate::cleanup::unregister_pool(&path);
        }
    }
}
