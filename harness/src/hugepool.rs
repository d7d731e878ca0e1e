//! Temporary growth of the hugetlb pools for a scenario, on the VMM's own pool handling
//! ([`vmm::memory::hugepages`]): takes the shared huge-page lock
//! (`/run/lock/vmm-tests-hugepages.lock`, the same one the project's tests use), grows each pool
//! to what the scenario needs and restores `nr_hugepages` on drop (and, through
//! [`crate::cleanup`], on a signal).

use vmm::memory::hugepages::{self, nr_hugepages_path, HugepageError, PoolReservation};
use vmm::memory::HugepageLock;

/// Errors from pool handling.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("taking the huge page lock {path}: {source}", path = hugepages::LOCK_PATH)]
    Lock { source: std::io::Error },
    #[error(transparent)]
    Pool(#[from] HugepageError),
}

/// A reservation: the lock is held and the pools grown until drop.
pub struct HugePool {
    /// Dropped in reverse order, before the lock.
    reservations: Vec<PoolReservation>,
    _lock: HugepageLock,
}

impl HugePool {
    /// Takes the lock and makes sure `(page size in KiB, free pages)` are available for each
    /// entry (entries with 0 pages are skipped). Blocks while another user holds the lock.
    pub fn reserve(needs: &[(u64, u64)]) -> Result<Self, PoolError> {
        let lock = vmm::memory::lock_hugepages().map_err(|source| PoolError::Lock { source })?;
        let mut pool = Self {
            reservations: Vec::new(),
            _lock: lock,
        };
        for &(size_kib, pages) in needs.iter().filter(|n| n.1 > 0) {
            let page_size = size_kib * 1024;
            // Registered before the pool may grow, so a signal in between still restores it.
            let nr = nr_hugepages_path(page_size);
            let before = hugepages::pool_status(page_size)?.total;
            crate::cleanup::register_pool(&nr.to_string_lossy(), before);
            match PoolReservation::ensure_available(page_size, pages) {
                Ok(r) => pool.reservations.push(r),
                Err(e) => {
                    crate::cleanup::unregister_pool(&nr.to_string_lossy());
                    return Err(e.into());
                }
            }
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        while let Some(r) = self.reservations.pop() {
            let nr = nr_hugepages_path(r.page_size());
            // Dropping the reservation writes nr_hugepages back.
            drop(r);
            crate::cleanup::unregister_pool(&nr.to_string_lossy());
        }
    }
}
