//! Where pages arrive: a fetched or background page is stored into its final place (through
//! the [`Installer`]), its arrival bit set, and a unit it completes is sent to the collapse
//! thread as a [`UnitDone`] message. The fault service and the bulk path share this; neither
//! knows how a unit is finished.

use crate::sync::MutexExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::installer::{Installer, Stored};
use super::region::{Regions, UnitDone};
use super::supervisor::Supervisor;
use super::PostcopyError;

/// Stores arrived pages and reports completed units.
pub(crate) struct Arrivals {
    pub regions: Arc<Regions>,
    pub installer: Arc<dyn Installer>,
    units: Mutex<Option<mpsc::Sender<UnitDone>>>,
    pub sup: Arc<Supervisor>,
}

impl Arrivals {
    pub fn new(
        regions: Arc<Regions>,
        installer: Arc<dyn Installer>,
        units: mpsc::Sender<UnitDone>,
        sup: Arc<Supervisor>,
    ) -> Self {
        Arrivals {
            regions,
            installer,
            units: Mutex::new(Some(units)),
            sup,
        }
    }

    /// Write page `page` of region `ri` into its final place unless it already arrived.
    /// Returns what was done (None: it had arrived). The caller holds the page lock.
    pub fn store_locked(
        &self,
        ri: usize,
        page: u64,
        data: &[u8; 4096],
    ) -> Result<Option<Stored>, PostcopyError> {
        let r = &self.regions[ri];
        if r.tracker.arrived(page) {
            return Ok(None);
        }
        let stored = self.installer.store(r, page, data)?;
        self.mark_arrived(ri, page);
        Ok(Some(stored))
    }

    /// Page `page` of region `ri` is in its final place (written by the caller): set its
    /// arrival bit and report a unit it completes.
    pub fn mark_arrived(&self, ri: usize, page: u64) {
        let r = &self.regions[ri];
        if let Some(unit) = r.tracker.mark_arrived(page) {
            self.unit_arrived(ri, unit);
        } else if r.tracker.complete() {
            self.sup.notify_progress();
        }
    }

    /// Pages `[first, end)` of region `ri` are in place: set their arrival bits without a page
    /// lock and report the units completed. Returns how many were newly marked.
    pub fn mark_run(&self, ri: usize, first: u64, end: u64) -> u64 {
        let r = &self.regions[ri];
        let (newly, completed) = r.tracker.mark_arrived_run(first, end);
        for unit in &completed {
            self.unit_arrived(ri, *unit);
        }
        if completed.is_empty() && r.tracker.complete() {
            self.sup.notify_progress();
        }
        newly
    }

    /// Unit `unit` of region `ri` has every page: tell the collapse thread (every mode; the
    /// collapse thread knows which need work).
    fn unit_arrived(&self, ri: usize, unit: u64) {
        let sent = self
            .units
            .lock_unpoisoned()
            .as_ref()
            .map(|tx| tx.send(UnitDone { region: ri, unit }).is_ok());
        if sent == Some(false) && !self.sup.stopping() {
            self.sup.fail(PostcopyError::CollapseThreadGone {
                slot: self.regions[ri].region.slot,
                unit,
            });
        }
        self.sup.notify_progress();
    }

    /// No more unit messages (the collapse thread ends when it drained them).
    pub fn close(&self) {
        self.units.lock_unpoisoned().take();
    }
}
