//! A process's own memory over time, from `/proc/PID/status`: what the destination VMM holds
//! beside the guest RAM it receives.
//!
//! Guest RAM is shmem, hugetlb or guest_memfd, never anonymous memory, and on shmem the same
//! page can be mapped twice in the process (the receive alias and the memslot mapping), so
//! `VmRSS` counts guest RAM once or twice and says little about the rest. What the destination
//! allocates for itself (buffers, bitmaps, queues, the fault service's bookkeeping) is
//! anonymous: `RssAnon`. The kernel's page tables for the process's mappings (`VmPTE`) grow
//! with the guest RAM mapped and are memory the host pays too. Neither includes KVM's own
//! (shadow or EPT) page tables, nor 4 KiB staging (shmem; the destination reports its peak).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The fields of one `/proc/PID/status` read that matter here, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusMem {
    pub rss_anon_kb: u64,
    pub rss_shmem_kb: u64,
    pub rss_file_kb: u64,
    pub pte_kb: u64,
    pub hwm_kb: u64,
}

impl StatusMem {
    /// Parses the text of `/proc/PID/status`; a field it lacks stays 0 (a kernel without
    /// `RssAnon` predates 4.5). None when the text has no memory field at all (a process that
    /// has exited, a kernel thread).
    pub fn parse(text: &str) -> Option<Self> {
        let mut m = StatusMem::default();
        let mut seen = false;
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let slot = match key {
                "RssAnon" => &mut m.rss_anon_kb,
                "RssShmem" => &mut m.rss_shmem_kb,
                "RssFile" => &mut m.rss_file_kb,
                "VmPTE" => &mut m.pte_kb,
                "VmHWM" => &mut m.hwm_kb,
                _ => continue,
            };
            let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) else {
                continue;
            };
            *slot = v;
            seen = true;
        }
        seen.then_some(m)
    }

    /// Reads process `pid`'s status now.
    pub fn read(pid: u32) -> Option<Self> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|t| Self::parse(&t))
    }

    /// What the process holds beside the guest RAM and its own binary: anonymous memory plus
    /// page tables, KiB.
    pub fn own_kb(&self) -> u64 {
        self.rss_anon_kb + self.pte_kb
    }
}

/// The peaks a [`MemSampler`] saw, KiB (each field's own peak, and the peak of
/// [`StatusMem::own_kb`], which need not be the sum of the two peaks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemPeaks {
    pub samples: u64,
    pub rss_anon_kb: u64,
    pub pte_kb: u64,
    pub own_kb: u64,
    pub hwm_kb: u64,
}

impl MemPeaks {
    pub fn add(&mut self, m: &StatusMem) {
        self.samples += 1;
        self.rss_anon_kb = self.rss_anon_kb.max(m.rss_anon_kb);
        self.pte_kb = self.pte_kb.max(m.pte_kb);
        self.own_kb = self.own_kb.max(m.own_kb());
        self.hwm_kb = self.hwm_kb.max(m.hwm_kb);
    }
}

/// Reads a process's status every `every` on a thread until stopped (or the process is gone)
/// and keeps the peaks.
pub struct MemSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<MemPeaks>>,
}

impl MemSampler {
    pub fn start(pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("harness-memsampler".into())
            .spawn(move || {
                let mut peaks = MemPeaks::default();
                while !stop2.load(Ordering::Relaxed) {
                    match StatusMem::read(pid) {
                        Some(m) => peaks.add(&m),
                        // Gone (or a zombie, whose status has no memory fields).
                        None if peaks.samples > 0 => break,
                        None => {}
                    }
                    std::thread::sleep(every);
                }
                peaks
            })
            .ok();
        Self { stop, thread }
    }

    /// Stops the thread and returns the peaks (None if it could not start or saw nothing).
    pub fn finish(mut self) -> Option<MemPeaks> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .filter(|p| p.samples > 0)
    }
}

impl Drop for MemSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_memory_fields_of_a_status_file() {
        let text = "Name:\tvmm\nVmPeak:\t 9000 kB\nVmHWM:\t  5000 kB\nVmRSS:\t  4000 kB\n\
                    RssAnon:\t  1200 kB\nRssFile:\t  800 kB\nRssShmem:\t  2000 kB\n\
                    VmPTE:\t  64 kB\nThreads:\t4\n";
        let m = StatusMem::parse(text).unwrap();
        assert_eq!(
            m,
            StatusMem {
                rss_anon_kb: 1200,
                rss_shmem_kb: 2000,
                rss_file_kb: 800,
                pte_kb: 64,
                hwm_kb: 5000,
            }
        );
        assert_eq!(m.own_kb(), 1264);
        assert_eq!(StatusMem::parse("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(StatusMem::parse("RssAnon:\tlots kB\n"), None);
        let mut p = MemPeaks::default();
        p.add(&m);
        p.add(&StatusMem {
            rss_anon_kb: 100,
            pte_kb: 2000,
            ..m
        });
        assert_eq!((p.samples, p.rss_anon_kb, p.pte_kb), (2, 1200, 2000));
        assert_eq!(p.own_kb, 2100);
    }

    #[test]
    fn samples_a_live_process() {
        let own = StatusMem::read(std::process::id()).unwrap();
        assert!(own.rss_anon_kb > 0 && own.hwm_kb > 0, "{own:?}");
        let s = MemSampler::start(std::process::id(), Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        let p = s.finish().unwrap();
        assert!(p.samples >= 1 && p.own_kb >= p.rss_anon_kb, "{p:?}");
    }
}
