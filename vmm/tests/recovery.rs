//! Postcopy recovery end to end: a real `vmm run` source, a real `vmm receive` destination and a
//! real `vmm migrate`, over TCP on 127.0.0.1 through a fault-injecting [`Relay`] that the test
//! runs in-process between migrate's `--to` and the destination's listen port.
//!
//! Once the source's State reached the destination, a lost link must pause the migration
//! ("postcopy-paused") rather than end it: both sides notice within about the liveness bound,
//! the source reconnects into the same session, the destination tells it what it holds, and the
//! bulk push goes on. These tests break the link at the moments that matter (right after the
//! start, mid-push, late in the push while huge pages collapse, five times in a row, a silent
//! black-hole, in hybrid mode, into guest_memfd) and check what a user would: `vmm migrate`
//! exits 0 and reports the recoveries, the destination's statistics report them too, both logs
//! say "postcopy-paused" and "postcopy resumed", and the guest finishes on the destination with
//! every page intact. Then the cases where it must not recover: the link never comes back (both
//! sides give up after `--recover-timeout` and say "VM lost"), strangers connecting to a paused
//! destination (refused, and the real source still gets back in), SIGTERM to the destination
//! mid-postcopy, and a link lost during precopy (the migration fails, the source keeps running
//! and can migrate again). The State cut on its way is settled by asking: the destination says
//! it never started the VM and the source resumes it, or, if nobody can ask, the source stays
//! paused with the outcome unknown until a forced resume. Resets that hit a recovery handshake
//! or the push right after one, and `vmm migrate-retarget` moving a paused migration's
//! reconnects to another address, close the file.
//!
//! Every test prints, on failure, all processes' output and the relay's counters.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;
use migration::relay::Relay;
use migration::{Secret, Timeouts};
use serde_json::Value;
use vmm::memory::PAGE_SIZE_2M;

/// Longest a migration may take, recoveries included.
const MIGRATE_LIMIT: Duration = Duration::from_secs(90);
/// Longest the destination guest may run after the migration.
const FINISH_LIMIT: Duration = Duration::from_secs(90);
/// How long a side may take to notice a failed link (the liveness bound is about 1 s).
const DETECT_LIMIT: Duration = Duration::from_secs(5);

const MIB: u64 = 1 << 20;
/// Guest RAM of every test.
const MEMORY: &str = "256M";
const MEMORY_BYTES: u64 = 256 * MIB;
/// 4 KiB pages of guest RAM.
const TOTAL_PAGES: f64 = (MEMORY_BYTES / 4096) as f64;
/// Workload passes: a pass over the 64 MiB span takes ~15 ms here, so 400 passes keep the guest
/// busy ~6 s: it still runs on the source when the migration starts (about a second after
/// boot) and finishes a few seconds after the migration (recoveries included) on the
/// destination.
const PASSES: u32 = 400;

/// Destination-bound bytes a postcopy of this guest sends: about the 64 MiB span of non-zero
/// data (zero pages go as runs). The resets below are placed by this.
const STREAM_BYTES: u64 = 64 * MIB;

// ---- processes ----

/// Starts the source VM (1 vCPU, [`MEMORY`]) with its event stream in `events`, and waits until
/// its API socket is up and the guest finished a pass.
fn start_source(backing: &str, passes: u32, sock: &Path, events: &Path) -> Proc {
    let monitor = [
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ];
    start_workload_source_with(backing, MEMORY, 1, passes, sock, &monitor)
}

/// Starts `vmm migrate --json` to `to` in the background.
fn start_migrate(sock: &Path, to: &str, mode: &str, extra: &[&str]) -> Proc {
    Proc::vmm("migrate", &migrate_args(sock, to, mode, extra))
}

/// Everything the processes printed, and what the relay saw, for failure messages.
fn context(procs: &[&Proc], relay: Option<&Relay>) -> String {
    let mut s = String::new();
    if let Some(r) = relay {
        let (up, down) = r.forwarded();
        s.push_str(&format!(
            "--- relay: accepted {} connections, {} open, {} reset operations, forwarded {up} bytes to the destination and {down} back\n",
            r.accepted(),
            r.open_connections(),
            r.resets()
        ));
    }
    for p in procs {
        s.push_str(&p.describe());
        s.push('\n');
    }
    s
}

/// Waits for `p` to exit; kills it and panics (with everyone's output) after `limit`.
fn wait_exit(p: &mut Proc, limit: Duration, others: &[&Proc], relay: Option<&Relay>) -> ExitStatus {
    p.wait_or_explain(limit, |p| {
        let mut all = vec![p];
        all.extend_from_slice(others);
        context(&all, relay)
    })
}

/// Waits (polling every 2 ms) until `pred(stdout, stderr)` holds for `p`; panics with
/// everyone's output after `limit` or if `p` exits first.
fn wait_output(
    p: &mut Proc,
    what: &str,
    limit: Duration,
    others: &[&Proc],
    relay: Option<&Relay>,
    pred: impl Fn(&str, &str) -> bool,
) {
    let start = Instant::now();
    loop {
        if pred(&p.stdout(), &p.stderr()) {
            return;
        }
        let exited = p.try_wait();
        if exited.is_some() {
            std::thread::sleep(Duration::from_millis(100));
            if pred(&p.stdout(), &p.stderr()) {
                return;
            }
        }
        if exited.is_some() || start.elapsed() > limit {
            let mut all = vec![&*p];
            all.extend_from_slice(others);
            panic!(
                "no {what} within {limit:?} (exited: {exited:?})\n{}",
                context(&all, relay)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Polls `cond` every 200 us; panics with `ctx()` after `limit`.
fn poll_until(
    what: &str,
    limit: Duration,
    ctx: impl Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            panic!("{what} did not happen within {limit:?}\n{}", ctx());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A number field of a JSON object, panicking with the object if it is missing.
fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number '{key}' in {v:#}"))
}

/// The destination statistics without the per-fault and per-collapse arrays.
fn brief_stats(stats: &Value) -> String {
    let mut s = stats.clone();
    if let Some(o) = s.as_object_mut() {
        for v in o.values_mut() {
            if let Some(a) = v.as_array() {
                *v = Value::String(format!("[{} values]", a.len()));
            }
        }
    }
    s.to_string()
}

/// The logs (stderr) of `procs`, for the record of a passing test.
fn logs(procs: &[&Proc]) -> String {
    let mut s = String::new();
    for p in procs {
        s.push_str(&format!("--- stderr of pid {}:\n{}\n", p.pid(), p.stderr()));
    }
    s
}

/// The source VMM's `status` reply.
fn api_status(sock: &Path, ctx: &str) -> Value {
    vmm::api::Client::new(sock)
        .info()
        .map(|i| serde_json::to_value(i).expect("vm.info encodes"))
        .unwrap_or_else(|e| panic!("status request: {e}\n{ctx}"))
}

/// The workload ran to its end on `p` (which exited 0) with every page intact.
fn assert_guest_finished_ok(p: &mut Proc, passes: u32, others: &[&Proc], relay: Option<&Relay>) {
    let status = wait_exit(p, FINISH_LIMIT, others, relay);
    let mut all = vec![&*p];
    all.extend_from_slice(others);
    let ctx = context(&all, relay);
    let out = p.stdout();
    let result = workload_result(&out).unwrap_or_else(|| panic!("no WORKLOAD RESULT\n{ctx}"));
    assert_workload_ok(&result, Some(passes), &ctx);
    assert!(clean(&out), "{ctx}");
    assert_eq!(status.code(), Some(0), "{ctx}");
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The guest printed nothing that says a page was wrong or the guest crashed.
fn clean(out: &str) -> bool {
    !out.contains("WORKLOAD MISMATCH") && !out.contains("WORKLOAD EXCEPTION")
}

fn pass_lines(out: &str) -> usize {
    out.lines()
        .filter(|l| l.starts_with("WORKLOAD pass "))
        .count()
}

// ---- one migration through the relay ----

/// A source, a destination and the relay between them.
struct Rig {
    dir: tempfile::TempDir,
    sock: PathBuf,
    stats_path: PathBuf,
    /// The source's event stream (`--event-monitor`).
    events: PathBuf,
    dst_addr: SocketAddr,
    dst: Proc,
    src: Proc,
    relay: Relay,
    passes: u32,
}

impl Rig {
    /// Starts the destination (with `--stats-json` and `dst_extra`), the source and the relay.
    fn start(src: &str, dst: &str, granularity: &str, passes: u32, dst_extra: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        Rig::start_in(dir, src, dst, granularity, passes, dst_extra)
    }

    fn start_in(
        dir: tempfile::TempDir,
        src: &str,
        dst: &str,
        granularity: &str,
        passes: u32,
        dst_extra: &[&str],
    ) -> Rig {
        let sock = dir.path().join("api.sock");
        let stats_path = dir.path().join("destination.json");
        let port = free_port();
        let mut extra = vec!["--stats-json", stats_path.to_str().unwrap()];
        extra.extend_from_slice(dst_extra);
        let dst = start_receive("destination", dst, granularity, port, &extra);
        let events = dir.path().join("source.events");
        let src = start_source(src, passes, &sock, &events);
        let dst_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let relay =
            Relay::start("127.0.0.1:0".parse().unwrap(), dst_addr).expect("start the relay");
        Rig {
            dir,
            sock,
            stats_path,
            events,
            dst_addr,
            dst,
            src,
            relay,
            passes,
        }
    }

    /// `vmm migrate` to the relay.
    fn migrate(&self, mode: &str, extra: &[&str]) -> Proc {
        start_migrate(&self.sock, &self.relay.addr().to_string(), mode, extra)
    }

    /// Waits for the migrate command `mig` to exit (see [`wait_exit`]).
    fn wait_migrate(&self, mig: &mut Proc, limit: Duration) -> ExitStatus {
        wait_exit(mig, limit, &[&self.src, &self.dst], Some(&self.relay))
    }

    /// Waits for the destination to exit (see [`wait_exit`]).
    fn wait_destination(&mut self, mig: &Proc, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.dst, limit, &[mig, &self.src], Some(&self.relay))
    }

    /// Waits for the source to exit (see [`wait_exit`]).
    fn wait_source(&mut self, mig: &Proc, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.src, limit, &[mig, &self.dst], Some(&self.relay))
    }

    /// Asserts that `vmm migrate` (which exited `mig_status`) and the source VMM (`src_status`)
    /// both failed saying the VM is lost, the source with `src_says` on stderr.
    fn assert_lost_on_the_source_side(
        &self,
        mig: &Proc,
        mig_status: ExitStatus,
        src_status: ExitStatus,
        src_says: &str,
        ctx: &str,
    ) {
        assert_eq!(mig_status.code(), Some(1), "vmm migrate should fail\n{ctx}");
        assert!(
            mig.stderr().contains("VM lost"),
            "vmm migrate does not say the VM is lost\n{ctx}"
        );
        assert!(
            !src_status.success(),
            "the source VMM must not exit 0 when the VM is lost\n{ctx}"
        );
        assert!(
            self.src.stderr().contains(src_says),
            "the source VMM does not say the VM is lost ({src_says})\n{ctx}"
        );
    }

    fn context(&self, mig: &Proc) -> String {
        context(&[mig, &self.src, &self.dst], Some(&self.relay))
    }

    /// Waits (see [`poll_until`], at most [`MIGRATE_LIMIT`]) until `cond` holds for the relay.
    fn wait_until(&self, mig: &Proc, what: &str, cond: impl Fn(&Relay) -> bool) {
        poll_until(
            what,
            MIGRATE_LIMIT,
            || self.context(mig),
            || cond(&self.relay),
        );
    }

    /// Waits until the destination set up postcopy (it prints each region's serve mode right
    /// before it starts the vCPUs).
    fn wait_postcopy_started(&mut self, mig: &Proc) {
        wait_output(
            &mut self.dst,
            "'serve mode' line (postcopy set up) from the destination",
            MIGRATE_LIMIT,
            &[mig, &self.src],
            Some(&self.relay),
            |_, err| err.contains("serve mode"),
        );
    }

    /// Waits until both the destination and the source VMM logged that they are
    /// postcopy-paused (`nth` times in all); returns how long that took.
    fn wait_paused(&mut self, mig: &Proc, nth: usize) -> Duration {
        let t = Instant::now();
        wait_output(
            &mut self.dst,
            "'postcopy-paused' from the destination",
            DETECT_LIMIT,
            &[mig, &self.src],
            Some(&self.relay),
            |_, err| count(err, "postcopy-paused") >= nth,
        );
        wait_output(
            &mut self.src,
            "'postcopy-paused' from the source",
            DETECT_LIMIT,
            &[mig, &self.dst],
            Some(&self.relay),
            |_, err| count(err, "postcopy-paused") >= nth,
        );
        t.elapsed()
    }

    /// Polls the relay until `bytes` went to the destination in all.
    fn wait_forwarded(&self, mig: &Proc, bytes: u64) {
        poll_until(
            &format!("forwarding {bytes} bytes to the destination"),
            MIGRATE_LIMIT,
            || self.context(mig),
            || self.relay.forwarded().0 >= bytes,
        );
    }

    /// The migration recovered by itself and completed: checks everything a user would, and
    /// returns the migrate summary and the destination statistics.
    fn finish_recovered(
        &mut self,
        mut mig: Proc,
        mode: &str,
        min_recoveries: u64,
    ) -> (Value, Value) {
        let t = Instant::now();
        let status = self.wait_migrate(&mut mig, MIGRATE_LIMIT);
        assert_eq!(
            status.code(),
            Some(0),
            "vmm migrate failed\n{}",
            self.context(&mig)
        );
        let summary: Value = mig
            .stdout()
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON summary from vmm migrate\n{}", self.context(&mig)));
        assert_eq!(
            summary["mode"].as_str().map(str::to_lowercase).as_deref(),
            Some(mode),
            "{summary:#}\n{}",
            self.context(&mig)
        );
        assert!(
            num(&summary, "recoveries") >= min_recoveries as f64,
            "migrate reports {} recoveries, want at least {min_recoveries}\n{}",
            summary["recoveries"],
            self.context(&mig)
        );
        assert!(
            num(&summary, "paused_ms") > 0.0,
            "migrate reports no time postcopy-paused\n{}",
            self.context(&mig)
        );
        assert_eq!(
            num(&summary["destination"], "pages_received"),
            TOTAL_PAGES,
            "the destination's Done does not account for every page\n{}",
            self.context(&mig)
        );

        // The source hands over and exits 0, without having finished the workload itself.
        let status = self.wait_source(&mig, Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(0),
            "the source VMM\n{}",
            self.context(&mig)
        );
        assert!(
            workload_result(&self.src.stdout()).is_none(),
            "the guest finished on the source before the migration ended (raise passes)\n{}",
            self.context(&mig)
        );

        let stats = self.wait_for_stats(&mig);
        let status = self.wait_destination(&mig, FINISH_LIMIT);
        let out = self.dst.stdout();
        let result = workload_result(&out).unwrap_or_else(|| {
            panic!(
                "no WORKLOAD RESULT on the destination\n{}",
                self.context(&mig)
            )
        });
        for (key, want) in [
            ("status", "ok"),
            ("mismatches", "0"),
            ("passes", &self.passes.to_string()),
        ] {
            assert_eq!(
                field(&result, key),
                Some(want),
                "WORKLOAD RESULT {key}\n{}",
                self.context(&mig)
            );
        }
        assert!(
            clean(&out),
            "the guest saw bad pages\n{}",
            self.context(&mig)
        );
        assert!(
            out.contains("WORKLOAD pass "),
            "the guest made no pass on the destination\n{}",
            self.context(&mig)
        );
        assert_eq!(
            status.code(),
            Some(0),
            "the destination VMM\n{}",
            self.context(&mig)
        );
        assert_eq!(
            stats["mode"],
            mode,
            "{}\n{}",
            brief_stats(&stats),
            self.context(&mig)
        );
        assert!(
            num(&stats, "recoveries") >= min_recoveries as f64,
            "the destination reports {} recoveries, want at least {min_recoveries}\n{}\n{}",
            stats["recoveries"],
            brief_stats(&stats),
            self.context(&mig)
        );
        assert!(
            num(&stats, "paused_ms") > 0.0,
            "the destination reports no time postcopy-paused\n{}\n{}",
            brief_stats(&stats),
            self.context(&mig)
        );
        assert_eq!(
            num(&stats, "pages_received"),
            TOTAL_PAGES,
            "{}",
            brief_stats(&stats)
        );

        // Both logs say what happened, once per recovery.
        for (side, log) in [
            ("destination", self.dst.stderr()),
            ("source", self.src.stderr()),
        ] {
            let paused = count(&log, "postcopy-paused");
            let resumed = count(&log, "postcopy resumed after");
            assert!(
                paused >= min_recoveries as usize && resumed >= min_recoveries as usize,
                "the {side} logged {paused} 'postcopy-paused' and {resumed} 'postcopy resumed after' lines, want at least {min_recoveries} each\n{}",
                self.context(&mig)
            );
            assert!(
                log.contains(&format!("(recovery #{min_recoveries})"))
                    || log.contains(&format!("recovery #{min_recoveries})")),
                "the {side} never logged recovery #{min_recoveries}\n{}",
                self.context(&mig)
            );
        }
        let (up, down) = self.relay.forwarded();
        eprintln!(
            "{mode}: {} recoveries, {:.0} ms paused (destination: {} recoveries, {:.0} ms); relay: {} resets, {} connections, {up} bytes up, {down} down; finished {:?} after the checks began\nsummary: {summary}\ndestination: {}",
            summary["recoveries"],
            num(&summary, "paused_ms"),
            stats["recoveries"],
            num(&stats, "paused_ms"),
            self.relay.resets(),
            self.relay.accepted(),
            t.elapsed(),
            brief_stats(&stats)
        );
        (summary, stats)
    }

    /// Waits until the destination's `--stats-json` holds a whole document (written once every
    /// page arrived, while the guest keeps running).
    fn wait_for_stats(&mut self, mig: &Proc) -> Value {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.stats_path) {
                if let Ok(v) = serde_json::from_str(&text) {
                    return v;
                }
            }
            if start.elapsed() > FINISH_LIMIT {
                panic!(
                    "{} never held the statistics\n{}",
                    self.stats_path.display(),
                    self.context(mig)
                );
            }
            if self.dst.try_wait().is_some() && !self.stats_path.exists() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the destination exited without writing {}\n{}",
                    self.stats_path.display(),
                    self.context(mig)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A huge destination filled at 4 KiB: every 2 MiB unit was collapsed, without failures.
fn assert_collapsed_2m(stats: &Value) {
    assert_eq!(
        num(stats, "collapses"),
        (MEMORY_BYTES / PAGE_SIZE_2M) as f64,
        "not every huge page was collapsed: {}",
        brief_stats(stats)
    );
    assert_eq!(
        num(stats, "collapse_failures"),
        0.0,
        "collapses failed: {}",
        brief_stats(stats)
    );
}

// ---- 1: one reset at the moments that matter, anon -> hugetlb-2m at 4 KiB ----

/// When the relay resets the link.
#[derive(Clone, Copy, Debug)]
enum ResetAt {
    /// As soon as the destination set up postcopy and starts the vCPUs.
    Start,
    /// Once this many bytes went to the destination (the bulk push is almost all of them).
    Bytes(u64),
}

/// A postcopy anon -> hugetlb-2m (4 KiB granularity) whose link is reset once at `at`; it must
/// recover by itself and end with every page intact and every huge page collapsed.
fn reset_once_anon_to_hugetlb_2m(at: ResetAt) {
    let _pages = reserve_hugepages(PAGE_SIZE_2M, 128).expect("reserve 128 x 2 MiB");
    let mut rig = Rig::start("anon", "hugetlb-2m", "4k", PASSES, &[]);
    if let ResetAt::Bytes(n) = at {
        rig.relay.reset_after_bytes(n);
    }
    let mig = rig.migrate("postcopy", &[]);
    if let ResetAt::Start = at {
        rig.wait_postcopy_started(&mig);
        let pairs = rig.relay.reset();
        assert_eq!(
            pairs,
            2,
            "both channels should have been open\n{}",
            rig.context(&mig)
        );
    }
    rig.wait_until(&mig, "the reset", |r| r.resets() >= 1);
    let detect = rig.wait_paused(&mig, 1);
    eprintln!("reset at {at:?}: both sides paused within {detect:?}");
    let (summary, stats) = rig.finish_recovered(mig, "postcopy", 1);
    assert_eq!(rig.relay.resets(), 1, "{summary}");
    assert_collapsed_2m(&stats);
}

#[test]
fn reset_right_after_the_destination_starts_the_vm() {
    reset_once_anon_to_hugetlb_2m(ResetAt::Start);
}

#[test]
fn reset_in_the_middle_of_the_bulk_push() {
    reset_once_anon_to_hugetlb_2m(ResetAt::Bytes(STREAM_BYTES / 2));
}

#[test]
fn reset_late_in_the_push_while_huge_pages_collapse() {
    // About 90% of the stream: most 2 MiB units are complete and collapsed or collapsing.
    reset_once_anon_to_hugetlb_2m(ResetAt::Bytes(STREAM_BYTES * 9 / 10));
}

// ---- 2: five resets in one migration ----

#[test]
fn five_resets_in_one_migration() {
    five_resets(&[]);
}

/// The same with the destination's bulk threads on a CPU of their own (`--migration-cpus`):
/// the placement lasts through every recovery (each new urgent channel's threads take the
/// fault path's CPUs again) and the guest's memory arrives intact.
#[test]
fn five_resets_with_the_destination_bulk_threads_on_a_cpu_of_their_own() {
    let allowed = migration::cpu_placement::CpuList::allowed().unwrap();
    if allowed.len() < 2 {
        eprintln!("one CPU: --migration-cpus would leave none (refusal: vmm::launch tests)");
        return;
    }
    let last = allowed.last().unwrap().to_string();
    let rest = migration::cpu_placement::Placement::new(&last, &allowed)
        .unwrap()
        .rest
        .to_string();
    let log = five_resets(&[
        "--migration-cpus",
        &last,
        "--log-level",
        "info,migration::cpu_placement=debug",
    ]);
    let count = |line: &str| log.matches(line).count();
    assert_eq!(
        count(&format!("1 Vcpu thread(s) on CPUs {rest}")),
        1,
        "{log}"
    );
    // The bulk receive loop and the collapse thread.
    assert!(count(&format!("Bulk thread on CPUs {last}")) >= 2, "{log}");
    // At least the four fault workers.
    assert!(
        count(&format!("Urgent thread on CPUs {rest}")) >= 4,
        "{log}"
    );
}

/// Five resets in one postcopy migration; `dst_extra` goes to `vmm receive`. Returns the
/// destination's log.
fn five_resets(dst_extra: &[&str]) -> String {
    let _pages = reserve_hugepages(PAGE_SIZE_2M, 128).expect("reserve 128 x 2 MiB");
    let mut rig = Rig::start("anon", "hugetlb-2m", "4k", PASSES, dst_extra);
    // The first reset 8 MiB into the stream (after the State, in the push), each next one
    // 6 MiB after the previous fired: 38 MiB of the ~64 MiB stream.
    rig.relay.reset_after_bytes(8 * MIB);
    let mig = rig.migrate("postcopy", &[]);
    for k in 1..=5u64 {
        rig.wait_until(&mig, &format!("reset #{k}"), |r| r.resets() >= k);
        if k < 5 {
            rig.relay.reset_after_bytes(6 * MIB);
        }
        let detect = rig.wait_paused(&mig, k as usize);
        eprintln!("reset #{k}: both sides paused within {detect:?}");
    }
    let (summary, stats) = rig.finish_recovered(mig, "postcopy", 5);
    assert_eq!(rig.relay.resets(), 5, "{summary}");
    assert_collapsed_2m(&stats);
    rig.dst.stderr()
}

// ---- 3: a black-hole: nothing arrives, nothing is reset ----

#[test]
fn three_second_black_hole_mid_postcopy() {
    let _pages = reserve_hugepages(PAGE_SIZE_2M, 128).expect("reserve 128 x 2 MiB");
    let mut rig = Rig::start("anon", "hugetlb-2m", "4k", PASSES, &[]);
    let mig = rig.migrate("postcopy", &[]);
    rig.wait_forwarded(&mig, STREAM_BYTES / 3);
    rig.relay.set_blackhole(true);
    let holed = Instant::now();
    // Silence is a dead link after the liveness bound (~1 s): both sides pause while the
    // black-hole lasts, without any reset.
    let detect = rig.wait_paused(&mig, 1);
    assert!(
        holed.elapsed() < Duration::from_millis(2800),
        "the black-hole was noticed only after {:?}, want about the 1 s liveness bound\n{}",
        holed.elapsed(),
        rig.context(&mig)
    );
    std::thread::sleep(Duration::from_secs(3).saturating_sub(holed.elapsed()));
    rig.relay.set_blackhole(false);
    eprintln!(
        "black-hole noticed within {detect:?}; lifted after {:?}",
        holed.elapsed()
    );
    let (summary, stats) = rig.finish_recovered(mig, "postcopy", 1);
    assert_eq!(
        rig.relay.resets(),
        0,
        "the relay never reset anything\n{summary}"
    );
    assert!(
        num(&stats, "paused_ms") >= 1000.0 && num(&summary, "paused_ms") >= 1000.0,
        "a 3 s black-hole should pause both sides for seconds\nsummary: {summary}\ndestination: {}",
        brief_stats(&stats)
    );
    assert_collapsed_2m(&stats);
}

// ---- 4, 5: other modes and backings ----

#[test]
fn hybrid_reset_in_the_postcopy_push() {
    let mut rig = Rig::start("shmem", "shmem", "4k", PASSES, &[]);
    // One precopy round slowed to 64 MB/s (about a second, while the guest rewrites its span),
    // then a push capped at 16 MB/s: the push has thousands of dirty pages to send and runs for
    // seconds after the test sees postcopy start. Fast rounds converge too well for this: two
    // uncapped rounds have left as few as 14 dirty pages (56 KiB, less than the trigger).
    let mig = rig.migrate(
        "hybrid",
        &[
            "--max-rounds",
            "1",
            "--max-bandwidth",
            "64M",
            "--max-postcopy-bandwidth",
            "16M",
        ],
    );
    rig.wait_postcopy_started(&mig);
    rig.relay.reset_after_bytes(256 * 1024);
    rig.wait_until(&mig, "the reset", |r| r.resets() >= 1);
    rig.wait_paused(&mig, 1);
    let (summary, _) = rig.finish_recovered(mig, "hybrid", 1);
    assert!(
        num(&summary, "rounds") >= 1.0,
        "no precopy round in hybrid mode: {summary}"
    );
    assert_eq!(rig.relay.resets(), 1, "{summary}");
}

#[test]
fn shmem_to_guest_memfd_reset_mid_push() {
    if !guest_memfd_or_refusal() {
        return;
    }
    let mut rig = Rig::start("shmem", "guest-memfd", "4k", PASSES, &[]);
    rig.relay.reset_after_bytes(STREAM_BYTES / 2);
    let mig = rig.migrate("postcopy", &[]);
    rig.wait_until(&mig, "the reset", |r| r.resets() >= 1);
    rig.wait_paused(&mig, 1);
    let (summary, _) = rig.finish_recovered(mig, "postcopy", 1);
    assert_eq!(rig.relay.resets(), 1, "{summary}");
}

// ---- 6: the link never comes back ----

#[test]
fn link_never_comes_back_both_sides_give_up_vm_lost() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &["--recover-timeout", "5"]);
    let mut mig = rig.migrate("postcopy", &["--recover-timeout", "5"]);
    rig.wait_postcopy_started(&mig);
    // The source must have seen Started (its event stream says postcopy-active, written the
    // moment it accepted Started): a cut before that leaves the outcome unknown at the source
    // (a case of its own, below), not "VM lost".
    let start = Instant::now();
    while !std::fs::read_to_string(&rig.events)
        .unwrap_or_default()
        .contains("\"event\":\"postcopy-active\"")
    {
        assert!(
            start.elapsed() < MIGRATE_LIMIT,
            "the source never saw Started\n{}",
            rig.context(&mig)
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    rig.relay.set_refuse(true);
    rig.relay.reset();
    let cut = Instant::now();
    rig.wait_paused(&mig, 1);

    let status = rig.wait_destination(&mig, Duration::from_secs(30));
    let dst_gave_up = cut.elapsed();
    let status_mig = rig.wait_migrate(&mut mig, Duration::from_secs(30));
    let status_src = rig.wait_source(&mig, Duration::from_secs(30));
    let ctx = rig.context(&mig);
    eprintln!("destination gave up {dst_gave_up:?} after the cut; migrate {status_mig}, source {status_src}");

    assert_eq!(status.code(), Some(1), "the destination should fail\n{ctx}");
    assert!(
        rig.dst
            .stderr()
            .contains("vmm: error: receiving the VM: VM lost"),
        "the destination does not say the VM is lost\n{ctx}"
    );
    assert!(
        dst_gave_up >= Duration::from_secs(4) && dst_gave_up < Duration::from_secs(15),
        "the destination gave up {dst_gave_up:?} after the cut, want about the 5 s recover timeout\n{ctx}"
    );
    let out = rig.dst.stdout();
    assert!(clean(&out), "the destination guest saw bad pages\n{ctx}");
    assert!(
        workload_result(&out).is_none(),
        "the destination guest finished without its pages\n{ctx}"
    );
    assert!(
        !rig.stats_path.exists(),
        "the destination wrote statistics of a lost VM\n{ctx}"
    );

    rig.assert_lost_on_the_source_side(
        &mig,
        status_mig,
        status_src,
        "vmm: error: running the VM: VM lost",
        &ctx,
    );
    assert!(workload_result(&rig.src.stdout()).is_none(), "{ctx}");
    eprintln!("{}", logs(&[&mig, &rig.src, &rig.dst]));
}

// ---- 7: strangers knock on a paused destination ----

#[test]
fn strangers_are_refused_by_a_paused_destination_and_the_source_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("secret");
    std::fs::write(&secret_path, "recovery-test-secret-0123456789\n").unwrap();
    let secret_arg = secret_path.to_str().unwrap().to_string();
    let mut rig = Rig::start_in(
        dir,
        "anon",
        "anon",
        "4k",
        PASSES,
        &["--secret-file", &secret_arg],
    );
    let mig = rig.migrate("postcopy", &["--secret-file", &secret_arg]);
    rig.wait_postcopy_started(&mig);
    rig.relay.set_refuse(true);
    rig.relay.reset();
    rig.wait_paused(&mig, 1);
    let status = api_status(&rig.sock, &rig.context(&mig));
    assert_eq!(
        status["migration_status"],
        "postcopy-paused",
        "the source's status during the outage: {status}\n{}",
        rig.context(&mig)
    );

    let err = rig.dst.stderr();
    let session = err
        .lines()
        .find_map(|l| l.split("incoming migration session 0x").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| {
            panic!(
                "no session id in the destination's log\n{}",
                rig.context(&mig)
            )
        });
    let secret = Secret::from_file(&secret_path).unwrap();
    let wrong = Secret::from_bytes(b"not-the-secret-at-all-0123456789".to_vec()).unwrap();
    let timeouts = Timeouts::default();
    let addr = rig.dst_addr;

    // 1. Garbage: the destination drops the connection and keeps waiting.
    {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let junk = junk_bytes();
        let _ = c.write_all(&junk);
        let mut buf = [0u8; 4096];
        let closed = loop {
            match c.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
            }
        };
        assert!(
            closed,
            "the destination kept a garbage connection open\n{}",
            rig.context(&mig)
        );
    }
    // 2. A new migration while one is paused: busy.
    match migration::transport::connect(addr, Some(&secret), &timeouts) {
        Ok(_) => panic!(
            "a new session was accepted by a paused destination\n{}",
            rig.context(&mig)
        ),
        Err(e) => assert!(
            e.to_string().contains("busy"),
            "a new session was refused without saying busy: {e}\n{}",
            rig.context(&mig)
        ),
    }
    // 3. A recovery into another session.
    let mut other = migration::auth::session_id();
    if other == session {
        other ^= 1;
    }
    match migration::transport::reconnect(addr, other, Some(&secret), &timeouts) {
        Ok(_) => panic!(
            "a recovery into session {other:#x} was accepted\n{}",
            rig.context(&mig)
        ),
        Err(e) => eprintln!("recovery into a random session refused (expected): {e}"),
    }
    // 4. The real session with a wrong secret.
    match migration::transport::reconnect(addr, session, Some(&wrong), &timeouts) {
        Ok(_) => panic!(
            "a recovery with a wrong secret was accepted\n{}",
            rig.context(&mig)
        ),
        Err(e) => assert!(
            e.to_string().contains("authentication failed"),
            "a wrong secret failed without saying so: {e}\n{}",
            rig.context(&mig)
        ),
    }
    // The destination refused each and still waits.
    wait_output(
        &mut rig.dst,
        "four refused connections in the destination's log",
        Duration::from_secs(10),
        &[&mig, &rig.src],
        Some(&rig.relay),
        |_, err| count(err, "refused a connection while waiting for recovery") >= 4,
    );
    assert!(rig.dst.try_wait().is_none(), "{}", rig.context(&mig));
    assert_eq!(
        count(&rig.dst.stderr(), "postcopy resumed after"),
        0,
        "a stranger was taken for the source\n{}",
        rig.context(&mig)
    );

    // The real source gets back in through the relay.
    rig.relay.set_refuse(false);
    rig.finish_recovered(mig, "postcopy", 1);
    eprintln!("{}", logs(&[&rig.src, &rig.dst]));
}

// ---- 8: SIGTERM to the destination mid-postcopy ----

#[test]
fn sigterm_to_the_destination_mid_postcopy_loses_the_vm() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &[]);
    let mut mig = rig.migrate("postcopy", &["--recover-timeout", "5"]);
    // Hold the link (nothing reset) a quarter into the push, so pages are surely missing.
    rig.wait_forwarded(&mig, STREAM_BYTES / 4);
    rig.relay.set_blackhole(true);
    assert!(
        !rig.stats_path.exists(),
        "every page arrived before the link was held: the test proves nothing\n{}",
        rig.context(&mig)
    );
    rig.dst.signal(libc::SIGTERM);
    let status = rig.wait_destination(&mig, Duration::from_secs(10));
    rig.relay.set_blackhole(false);
    let status_mig = rig.wait_migrate(&mut mig, Duration::from_secs(30));
    let status_src = rig.wait_source(&mig, Duration::from_secs(30));
    let ctx = rig.context(&mig);

    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "the destination\n{ctx}"
    );
    assert!(
        rig.dst.stderr().contains("VM lost"),
        "the destination does not say the VM is lost\n{ctx}"
    );
    let out = rig.dst.stdout();
    assert!(clean(&out), "the destination guest saw bad pages\n{ctx}");
    assert!(workload_result(&out).is_none(), "{ctx}");
    rig.assert_lost_on_the_source_side(&mig, status_mig, status_src, "VM lost", &ctx);
    eprintln!("{}", logs(&[&mig, &rig.src, &rig.dst]));
}

// ---- 9: precopy: a lost link before the switchover is a failed migration, not a pause ----

#[test]
fn precopy_reset_before_switchover_fails_and_the_source_migrates_again() {
    let passes = PASSES;
    let mut rig = Rig::start("anon", "anon", "4k", passes, &[]);
    // 16 MiB into the first precopy round (the span alone is 64 MiB of data).
    rig.relay.reset_after_bytes(16 * MIB);
    let mut mig = rig.migrate("precopy", &[]);
    let status = rig.wait_migrate(&mut mig, MIGRATE_LIMIT);
    let ctx = rig.context(&mig);
    assert_eq!(rig.relay.resets(), 1, "the link was not reset\n{ctx}");
    assert_eq!(status.code(), Some(1), "vmm migrate should fail\n{ctx}");
    assert!(!mig.stderr().contains("VM lost"), "{ctx}");
    assert!(
        !rig.src.stderr().contains("postcopy-paused"),
        "a precopy round is no postcopy: nothing to recover\n{ctx}"
    );
    let status = rig.wait_destination(&mig, Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(1),
        "the first destination should fail\n{}",
        rig.context(&mig)
    );
    assert!(clean(&rig.dst.stdout()) && workload_result(&rig.dst.stdout()).is_none());

    // The source still runs the VM.
    let reply = vmm::api::Client::new(&rig.sock)
        .info()
        .map(|i| serde_json::to_value(i).expect("vm.info encodes"))
        .unwrap_or_else(|e| {
            panic!(
                "status after the failed migration: {e}\n{}",
                rig.context(&mig)
            )
        });
    assert_eq!(reply["state"], "running", "{reply}\n{}", rig.context(&mig));
    let before = pass_lines(&rig.src.stdout());
    wait_output(
        &mut rig.src,
        "new WORKLOAD pass lines on the source",
        Duration::from_secs(30),
        &[&mig, &rig.dst],
        Some(&rig.relay),
        |out, _| pass_lines(out) >= before + 3,
    );
    assert!(clean(&rig.src.stdout()), "{}", rig.context(&mig));

    // A second migration, to a fresh destination without the relay, succeeds.
    let port = free_port();
    let stats2 = rig.dir.path().join("destination2.json");
    let mut dst2 = start_receive(
        "destination 2",
        "anon",
        "4k",
        port,
        &["--stats-json", stats2.to_str().unwrap()],
    );
    let mut mig2 = start_migrate(&rig.sock, &format!("127.0.0.1:{port}"), "precopy", &[]);
    let t = Instant::now();
    let status = wait_exit(&mut mig2, MIGRATE_LIMIT, &[&rig.src, &dst2], None);
    eprintln!(
        "second migration took {:?}; the source had made {} passes",
        t.elapsed(),
        pass_lines(&rig.src.stdout())
    );
    let ctx = context(&[&mig2, &rig.src, &dst2, &mig, &rig.dst], Some(&rig.relay));
    assert_eq!(
        status.code(),
        Some(0),
        "the second vmm migrate failed\n{ctx}"
    );
    let status = wait_exit(&mut rig.src, Duration::from_secs(30), &[&mig2, &dst2], None);
    assert_eq!(
        status.code(),
        Some(0),
        "the source after the handover\n{ctx}"
    );
    assert!(
        workload_result(&rig.src.stdout()).is_none(),
        "the guest finished on the source before the second migration ended (raise passes)\n{ctx}"
    );
    let status = wait_exit(&mut dst2, FINISH_LIMIT, &[&mig2, &rig.src], None);
    let ctx = context(&[&mig2, &rig.src, &dst2], None);
    let out = dst2.stdout();
    let result = workload_result(&out)
        .unwrap_or_else(|| panic!("no WORKLOAD RESULT on the second destination\n{ctx}"));
    assert_workload_ok(&result, Some(passes), &ctx);
    assert!(clean(&out), "{ctx}");
    assert_eq!(status.code(), Some(0), "the second destination\n{ctx}");
}

// ---- migrate-retarget: a paused migration reconnects elsewhere ----

#[test]
fn retarget_moves_the_reconnects_of_a_paused_migration() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &[]);
    let mig = rig.migrate("postcopy", &[]);
    rig.wait_postcopy_started(&mig);
    // The path through the relay is gone for good; the destination is still reachable
    // directly.
    rig.relay.set_refuse(true);
    rig.relay.reset();
    rig.wait_paused(&mig, 1);
    let out = run_vmm(
        &[
            "migrate-retarget",
            "--api-socket",
            rig.sock.to_str().unwrap(),
            "--to",
            &rig.dst_addr.to_string(),
        ],
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "migrate-retarget failed\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        rig.context(&mig)
    );
    assert!(
        stdout.contains(&rig.dst_addr.to_string()),
        "migrate-retarget does not name the new address:\n{stdout}"
    );
    let accepted = rig.relay.accepted();
    rig.finish_recovered(mig, "postcopy", 1);
    // At most an attempt under way when the retarget arrived still went to the relay.
    let later = rig.relay.accepted() - accepted;
    assert!(
        later <= 2,
        "the source kept connecting to the relay after the retarget ({later} more connections)"
    );
    eprintln!(
        "relay accepted {} connections in all, {accepted} when retargeted",
        rig.relay.accepted()
    );
}

// ---- the State lost on its way: settled as "not started", or "unknown" if nobody can ask ----

/// Bytes to the destination after which a reset cuts a postcopy's State frame: both handshakes
/// and the Config are ~290 bytes, the State (vCPU registers, XSAVE area, LAPIC as JSON) is
/// over 10 KiB.
const STATE_CUT: u64 = 400;

#[test]
fn state_cut_on_its_way_the_source_learns_not_started_and_resumes() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &[]);
    rig.relay.reset_after_bytes(STATE_CUT);
    let mut mig = rig.migrate("postcopy", &[]);
    let status = rig.wait_migrate(&mut mig, MIGRATE_LIMIT);
    let ctx = rig.context(&mig);
    assert_eq!(rig.relay.resets(), 1, "the link was not reset\n{ctx}");
    assert_eq!(status.code(), Some(1), "vmm migrate should fail\n{ctx}");
    let err = mig.stderr();
    assert!(
        err.contains("did not start the VM")
            && !err.contains("VM lost")
            && !err.contains("unknown"),
        "vmm migrate should say the destination did not start the VM\n{ctx}"
    );
    // The destination never ran the guest and gives up once the source said so.
    let status = rig.wait_destination(&mig, Duration::from_secs(30));
    let ctx = rig.context(&mig);
    assert_eq!(status.code(), Some(1), "the destination should fail\n{ctx}");
    assert!(
        !rig.dst.stdout().contains("WORKLOAD"),
        "the guest ran on the destination\n{ctx}"
    );
    assert!(!rig.dst.stderr().contains("VM lost"), "{ctx}");
    // The source runs the VM again, and the outcome is known.
    let reply = api_status(&rig.sock, &ctx);
    assert_eq!(reply["state"], "running", "{reply}\n{ctx}");
    assert_eq!(reply["migration_outcome_unknown"], false, "{reply}\n{ctx}");
    let before = pass_lines(&rig.src.stdout());
    wait_output(
        &mut rig.src,
        "new WORKLOAD pass lines on the source",
        Duration::from_secs(30),
        &[&mig, &rig.dst],
        Some(&rig.relay),
        |out, _| pass_lines(out) >= before + 3,
    );
    // And its guest runs to the end intact.
    assert_guest_finished_ok(&mut rig.src, PASSES, &[&mig, &rig.dst], Some(&rig.relay));
    eprintln!("{}", logs(&[&mig, &rig.src, &rig.dst]));
}

#[test]
fn state_cut_and_no_way_back_leaves_the_source_paused_with_the_outcome_unknown() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &[]);
    rig.relay.reset_after_bytes(STATE_CUT);
    let mut mig = rig.migrate("postcopy", &["--recover-timeout", "3"]);
    // Both channels are up (the destination still builds memory before Ready): from now on
    // nobody gets through the relay.
    rig.wait_until(&mig, "both channels through the relay", |r| {
        r.accepted() >= 2
    });
    rig.relay.set_refuse(true);
    let status = rig.wait_migrate(&mut mig, MIGRATE_LIMIT);
    let ctx = rig.context(&mig);
    assert_eq!(rig.relay.resets(), 1, "the link was not reset\n{ctx}");
    assert_eq!(status.code(), Some(1), "vmm migrate should fail\n{ctx}");
    let err = mig.stderr();
    assert!(
        err.contains("outcome is unknown") && !err.contains("VM lost"),
        "vmm migrate should say the outcome is unknown\n{ctx}"
    );
    // The VM stays paused here: no pass in a second.
    let reply = api_status(&rig.sock, &ctx);
    assert_eq!(reply["migration_outcome_unknown"], true, "{reply}\n{ctx}");
    let before = pass_lines(&rig.src.stdout());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pass_lines(&rig.src.stdout()),
        before,
        "the source ran its VM while the destination may run it\n{}",
        rig.context(&mig)
    );
    // Only a forced resume lets it run again.
    let refused = vmm::api::Client::new(&rig.sock).resume(false);
    assert!(
        refused.is_err(),
        "resume without force was accepted: {refused:?}\n{}",
        rig.context(&mig)
    );
    vmm::api::Client::new(&rig.sock)
        .resume(true)
        .unwrap_or_else(|e| panic!("forced resume: {e}\n{}", rig.context(&mig)));
    assert_guest_finished_ok(&mut rig.src, PASSES, &[&mig, &rig.dst], Some(&rig.relay));
    // The destination never ran the guest and gave up on its own.
    let status = rig.wait_destination(&mig, Duration::from_secs(30));
    let ctx = rig.context(&mig);
    assert_eq!(status.code(), Some(1), "the destination should fail\n{ctx}");
    assert!(
        !rig.dst.stdout().contains("WORKLOAD"),
        "the guest ran on the destination\n{ctx}"
    );
    eprintln!("{}", logs(&[&mig, &rig.src, &rig.dst]));
}

// ---- resets that hit the recovery itself ----

/// Both recovery handshakes (main, then urgent: Hello 64 bytes and Response 48 bytes each) take
/// 224 bytes to the destination.
const RECOVERY_HANDSHAKE: u64 = 224;

#[test]
fn resets_during_a_recovery_handshake_and_right_after_one() {
    let mut rig = Rig::start("anon", "anon", "4k", PASSES, &[]);
    rig.relay.reset_after_bytes(16 * MIB);
    let mig = rig.migrate("postcopy", &[]);
    rig.wait_until(&mig, "reset #1", |r| r.resets() >= 1);
    // The next reconnect is cut in its urgent Hello: the main channel had authenticated.
    rig.relay.reset_after_bytes(150);
    rig.wait_until(&mig, "reset #2 (in the recovery handshake)", |r| {
        r.resets() >= 2
    });
    // The one after that completes, and the push it resumes is cut at once.
    rig.relay.reset_after_bytes(RECOVERY_HANDSHAKE + 100);
    rig.wait_until(&mig, "reset #3 (right after a recovery)", |r| {
        r.resets() >= 3
    });
    let (summary, stats) = rig.finish_recovered(mig, "postcopy", 2);
    assert_eq!(rig.relay.resets(), 3, "{summary}");
    assert_eq!(
        (num(&summary, "recoveries"), num(&stats, "recoveries")),
        (2.0, 2.0),
        "the cut handshake is no recovery, the cut push is one\n{}",
        logs(&[&rig.src, &rig.dst])
    );
    assert!(
        rig.dst
            .stderr()
            .contains("refused a connection while waiting for recovery"),
        "the destination did not log the cut handshake\n{}",
        logs(&[&rig.src, &rig.dst])
    );
    eprintln!("{}", logs(&[&rig.src, &rig.dst]));
}
