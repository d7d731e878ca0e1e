//! Huge page pools: their state in sysfs, growing them for a while, and the lock that serializes
//! tests and CI jobs that take huge pages.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where the kernel publishes the huge page pools.
pub const SYSFS_HUGEPAGES: &str = "/sys/kernel/mm/hugepages";
/// The file every test, CI job and harness run that takes huge pages locks exclusively.
pub const LOCK_PATH: &str = "/run/lock/vmm-tests-hugepages.lock";

/// Errors of reading or resizing a huge page pool.
#[derive(Debug, thiserror::Error)]
pub enum HugepageError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds '{value}', not a page count")]
    Parse { path: PathBuf, value: String },
    #[error("writing {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: u64,
        source: io::Error,
    },
    #[error(
        "the {page_kib} kB huge page pool has only {got} free pages after asking for \
         nr_hugepages={asked}, {wanted} wanted; nr_hugepages was put back to {original}"
    )]
    GrowShort {
        page_kib: u64,
        wanted: u64,
        got: u64,
        asked: u64,
        original: u64,
    },
}

/// The state of one huge page pool, from `/sys/kernel/mm/hugepages/hugepages-<N>kB/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    /// Huge page size in bytes.
    pub page_size: u64,
    /// `nr_hugepages`: persistent pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages not backing any mapping (some may be reserved).
    pub free: u64,
    /// `resv_hugepages`: free pages already promised to existing mappings.
    pub reserved: u64,
    /// `surplus_hugepages`: overcommitted pages above `nr_hugepages`.
    pub surplus: u64,
}

impl PoolStatus {
    /// Pages a new mapping can still get: free and not reserved.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// The sysfs directory of the pool of `page_size`-byte pages.
pub fn pool_dir(page_size: u64) -> PathBuf {
    Path::new(SYSFS_HUGEPAGES).join(format!("hugepages-{}kB", page_size / 1024))
}

/// The `nr_hugepages` file of the pool of `page_size`-byte pages.
pub fn nr_hugepages_path(page_size: u64) -> PathBuf {
    pool_dir(page_size).join("nr_hugepages")
}

/// The shell command that sets the pool of `page_size`-byte pages to `nr` persistent pages.
pub fn reserve_command(page_size: u64, nr: u64) -> String {
    format!("echo {nr} > {}", nr_hugepages_path(page_size).display())
}

fn read_count(path: &Path) -> Result<u64, HugepageError> {
    let text = fs::read_to_string(path).map_err(|source| HugepageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| HugepageError::Parse {
        path: path.to_path_buf(),
        value: text.trim().to_string(),
    })
}

fn write_count(path: &Path, value: u64) -> Result<(), HugepageError> {
    fs::write(path, format!("{value}\n")).map_err(|source| HugepageError::Write {
        path: path.to_path_buf(),
        value,
        source,
    })
}

/// Reads the state of the pool of `page_size`-byte pages.
pub fn pool_status(page_size: u64) -> Result<PoolStatus, HugepageError> {
    let dir = pool_dir(page_size);
    Ok(PoolStatus {
        page_size,
        total: read_count(&dir.join("nr_hugepages"))?,
        free: read_count(&dir.join("free_hugepages"))?,
        reserved: read_count(&dir.join("resv_hugepages"))?,
        surplus: read_count(&dir.join("surplus_hugepages"))?,
    })
}

/// Grows a huge page pool until it has a number of available pages, and puts `nr_hugepages`
/// back to what it was when dropped.
///
/// Pages still in use at drop time are not lost: the kernel turns them into surplus pages and
/// frees them when their last user goes. Hold a [`HugepageLock`] around a reservation when other
/// processes may resize the same pool.
#[derive(Debug)]
pub struct PoolReservation {
    page_size: u64,
    original: u64,
    set_to: u64,
}

impl PoolReservation {
    /// Makes sure the pool of `page_size`-byte pages has at least `pages` available (free and
    /// unreserved) pages, writing `nr_hugepages` if it has fewer. Fails with
    /// [`HugepageError::GrowShort`] (and leaves the pool as it was) if the kernel could not find
    /// enough memory, which is common for 1 GiB pages.
    pub fn ensure_available(page_size: u64, pages: u64) -> Result<PoolReservation, HugepageError> {
        let path = nr_hugepages_path(page_size);
        let status = pool_status(page_size)?;
        let original = status.total;
        let mut me = PoolReservation {
            page_size,
            original,
            set_to: original,
        };
        if status.available() >= pages {
            return Ok(me);
        }
        let asked = original + (pages - status.available());
        me.set_to = asked;
        write_count(&path, asked)?;
        let got = pool_status(page_size)?.available();
        if got < pages {
            // Dropping `me` restores nr_hugepages.
            drop(me);
            return Err(HugepageError::GrowShort {
                page_kib: page_size / 1024,
                wanted: pages,
                got,
                asked,
                original,
            });
        }
        Ok(me)
    }

    /// The huge page size of the pool, in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// `nr_hugepages` before the reservation (restored on drop).
    pub fn original_nr_hugepages(&self) -> u64 {
        self.original
    }

    /// `nr_hugepages` written by the reservation (equal to the original if nothing was written).
    pub fn nr_hugepages(&self) -> u64 {
        self.set_to
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        if self.set_to == self.original {
            return;
        }
        if let Err(e) = write_count(&nr_hugepages_path(self.page_size), self.original) {
            tracing::warn!(error = %e, "could not give back reserved huge pages");
        }
    }
}

/// An exclusive lock on [`LOCK_PATH`], held until dropped.
#[derive(Debug)]
pub struct HugepageLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the exclusive lock that serializes everything that reserves huge pages (tests, CI,
/// the harness), waiting for it if someone else holds it. The lock file is created if missing.
///
/// The lock is an `flock` on its own open file description, so it also serializes threads of
/// one process.
pub fn lock_hugepages() -> io::Result<HugepageLock> {
    if let Some(dir) = Path::new(LOCK_PATH).parent() {
        fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(LOCK_PATH)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))?;
    Ok(HugepageLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{PAGE_SIZE_1G, PAGE_SIZE_2M};

    #[test]
    fn pool_status_reads_sysfs() {
        for size in [PAGE_SIZE_2M, PAGE_SIZE_1G] {
            let s = pool_status(size).unwrap();
            assert_eq!(s.page_size, size);
            assert!(s.free <= s.total + s.surplus, "{s:?}");
        }
        assert!(matches!(
            pool_status(12345 * 1024),
            Err(HugepageError::Read { .. })
        ));
    }

    #[test]
    fn reservation_grows_and_restores_the_2m_pool() {
        let _lock = lock_hugepages().unwrap();
        let before = pool_status(PAGE_SIZE_2M).unwrap();
        let want = before.available() + 3;
        {
            let r = PoolReservation::ensure_available(PAGE_SIZE_2M, want).unwrap();
            assert_eq!(r.original_nr_hugepages(), before.total);
            assert!(r.nr_hugepages() > before.total);
            assert!(pool_status(PAGE_SIZE_2M).unwrap().available() >= want);
        }
        assert_eq!(pool_status(PAGE_SIZE_2M).unwrap().total, before.total);
    }

    #[test]
    fn reservation_of_1g_pages_restores_or_reports_short() {
        let _lock = lock_hugepages().unwrap();
        let before = pool_status(PAGE_SIZE_1G).unwrap();
        // The 1 GiB pool grows to only ~2 pages on the CI machines: 4 more usually fail.
        let want = before.available() + 4;
        match PoolReservation::ensure_available(PAGE_SIZE_1G, want) {
            Ok(r) => {
                assert!(pool_status(PAGE_SIZE_1G).unwrap().available() >= want);
                drop(r);
            }
            Err(err) => {
                let msg = err.to_string();
                match err {
                    HugepageError::GrowShort {
                        page_kib,
                        wanted,
                        got,
                        original,
                        ..
                    } => {
                        assert_eq!(page_kib, 1 << 20);
                        assert_eq!(wanted, want);
                        assert!(got < want);
                        assert_eq!(original, before.total);
                    }
                    other => panic!("unexpected error {other}"),
                }
                assert!(msg.contains(&format!("{want} wanted")), "{msg}");
                assert!(msg.contains("1048576 kB"), "{msg}");
            }
        }
        assert_eq!(pool_status(PAGE_SIZE_1G).unwrap().total, before.total);
    }

    #[test]
    fn reserve_command_names_the_sysfs_file() {
        assert_eq!(
            reserve_command(PAGE_SIZE_1G, 4),
            "echo 4 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
        );
    }
}
