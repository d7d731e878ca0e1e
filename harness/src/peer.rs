//! A QEMU scenario: the same workload guest, backing, link and limits as one of ours, migrated
//! by QEMU's own postcopy (source and destination QEMU started by the harness, driven over QMP).
//!
//! 1. hugetlb backings: the pool is grown as for ours, and one hugetlbfs mount of the page
//!    size holds both guests' RAM files (`memory-backend-file,share=on`); shmem uses
//!    `memory-backend-memfd,share=on`.
//! 2. destination: `-incoming defer`; capabilities `postcopy-ram`, `postcopy-blocktime` and
//!    `postcopy-preempt` (each where this QEMU has it); `migrate-incoming tcp:IP:PORT`.
//! 3. source: the guest with `passes=N pattern=P tsc_khz=K` (K measured by the harness), the
//!    same capabilities but blocktime; once the guest printed its first pass line, `migrate`
//!    then at once `migrate-start-postcopy` (QEMU switches over after its first round, as
//!    ours does in postcopy mode).
//! 4. `query-migrate` on the source until `completed` (downtime, total-time, setup-time,
//!    ram.transferred, ram.postcopy-requests), then on the destination (postcopy-blocktime,
//!    postcopy-vcpu-blocktime); the source is told to `quit`, the destination guest runs its
//!    remaining passes and ends through isa-debug-exit (its exit code is checked).
//! 5. The guest's lines are parsed as for ours ([`crate::scenario::fill`]): postcopy-requests
//!    stands in for the destination's userfault count when picking the guest's fault samples.

use crate::guest_output::{DestinationStats, GuestOutput, MigrateSummary};
use crate::histogram::LatencyHistogram;
use crate::limits::VcpuFaultLimit;
use crate::netns::Side;
use crate::process::Proc;
use crate::qemu::{self, GuestConfig, HugetlbMount, Memory, Qmp};
use crate::results::{kind, ScenarioResult, Status};
use crate::scenario::{
    self, passes_begun_before, pick_port, LinkEnv, Progress, RateSampler, RunConfig, RunError,
    Scenario,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often `query-migrate` is polled while the migration runs.
const POLL: Duration = Duration::from_millis(10);

/// Runs QEMU scenario `s` (see the module doc) and fills `r`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_qemu_one(
    cfg: &RunConfig,
    qemu_bin: &Path,
    env: &LinkEnv,
    uffd: &LatencyHistogram,
    vcpu: Result<&VcpuFaultLimit, &crate::limits::LimitError>,
    s: &Scenario,
    index: usize,
    r: &mut ScenarioResult,
    progress: &mut dyn Progress,
) -> Result<(), RunError> {
    let dir = &cfg.out;
    let raw = dir.join("raw");
    r.peer = Some("qemu".into());
    r.peer_version_line = Some(qemu::version(qemu_bin)?);
    let _pool = scenario::prepare(cfg, env, uffd, vcpu, s, r, progress)?;
    // Declared after the pool: dropped (unmounted, pages back to the pool) before it.
    let mount = match scenario::huge_kib(s.backing) {
        Some(kib) => Some(HugetlbMount::new(kib, &index.to_string())?),
        None => None,
    };
    let memory = |side: &str| match &mount {
        Some(m) => Memory::HugetlbFile(m.file(&format!("{side}.ram"))),
        None => Memory::Memfd,
    };
    let tag = format!("{}-{index}", std::process::id());
    let qmp_path = |side: &str| std::env::temp_dir().join(format!("harness-qemu-{tag}-{side}.qmp"));
    let (src_qmp, dst_qmp) = (qmp_path("src"), qmp_path("dst"));
    let _ = std::fs::remove_file(&src_qmp);
    let _ = std::fs::remove_file(&dst_qmp);

    progress.phase("measuring the TSC rate for the guest");
    let tsc_khz = qemu::measure_tsc_khz(Duration::from_millis(200));
    let cmdline = format!(
        "passes={} pattern={} tsc_khz={tsc_khz}",
        s.pattern.passes_for(cfg.passes),
        s.pattern.guest_name()
    );
    let guest = |side: &str, qmp: &Path, incoming: bool| GuestConfig {
        kernel: cfg.kernel.clone(),
        cmdline: cmdline.clone(),
        memory_mib: s.memory_mib,
        vcpus: cfg.vcpus,
        memory: memory(side),
        qmp: qmp.to_path_buf(),
        incoming,
    };

    // Destination.
    progress.phase("starting the destination QEMU");
    let port = pick_port(env.dst_ip(), env.link.netns, index)?;
    let listen = SocketAddr::new(env.dst_ip(), port);
    let mut dcmd = env.command(Side::Dst, qemu_bin);
    dcmd.args(qemu::args(&guest("dst", &dst_qmp, true)));
    let mut dst = Proc::spawn(
        "destination qemu",
        dcmd,
        &raw.join(format!("{}.dst", s.name)),
    )?;
    let mut dq = Qmp::connect(&dst_qmp, cfg.phase_timeout)?;
    r.peer_version = qemu::version_of(&dq.execute("query-version", None)?);
    let have = dq.capabilities()?;
    let wanted: Vec<&str> = ["postcopy-ram", "postcopy-preempt"]
        .into_iter()
        .filter(|c| have.iter().any(|h| h == c))
        .collect();
    if !wanted.contains(&"postcopy-ram") {
        return Err(RunError::Scenario(format!(
            "this QEMU has no postcopy-ram capability (it has {have:?})"
        )));
    }
    let mut dst_caps = wanted.clone();
    if have.iter().any(|h| h == "postcopy-blocktime") {
        dst_caps.push("postcopy-blocktime");
    }
    dq.set_capabilities(&dst_caps)?;
    r.peer_capabilities = dst_caps.iter().map(|c| c.to_string()).collect();
    let uri = format!("tcp:{listen}");
    dq.execute("migrate-incoming", Some(json!({ "uri": uri })))?;

    // Source.
    progress.phase("starting the source QEMU guest");
    let mut scmd = env.command(Side::Src, qemu_bin);
    scmd.args(qemu::args(&guest("src", &src_qmp, false)));
    let mut src = Proc::spawn("source qemu", scmd, &raw.join(format!("{}.src", s.name)))?;
    let mut sq = Qmp::connect(&src_qmp, cfg.phase_timeout)?;
    sq.set_capabilities(&wanted)?;
    scenario::source_first_pass(&mut src, cfg, s, r)?;

    progress.phase("migrating (QEMU postcopy)");
    let t0 = Instant::now();
    let sampler = RateSampler::start(src.pid(), env.src_device(), t0, 1);
    sq.execute("migrate", Some(json!({ "uri": uri })))?;
    sq.execute("migrate-start-postcopy", None)?;
    let done = sq.wait_migrate(&["completed"], POLL, cfg.phase_timeout)?;
    let migrated_at = Instant::now();
    r.throughput_series = sampler.finish();
    if done["status"] != "completed" {
        return Err(RunError::Scenario(format!(
            "QEMU migration ended {}: {}",
            done["status"],
            done["error-desc"].as_str().unwrap_or("(no error-desc)")
        )));
    }
    let incoming = dq.wait_migrate(&["completed"], POLL, cfg.phase_timeout)?;
    let _ = std::fs::write(
        raw.join(format!("{}.query-migrate.json", s.name)),
        json!({ "source": done, "destination": incoming }).to_string(),
    );
    let _ = sq.execute("quit", None);
    drop(sq);
    drop(dq);

    progress.phase("waiting for the destination guest");
    let dstatus = dst.wait_timeout(cfg.phase_timeout)?;
    if dstatus.is_none() {
        dst.stop(Duration::from_secs(10))?;
    }
    src.stop(Duration::from_secs(10))?;
    let dst_out = GuestOutput::parse(&dst.text());
    let postcopy_passes = passes_begun_before(&dst.lines(), migrated_at);
    let (summary, stats) = figures(&done, &incoming, r);
    scenario::fill(dir, r, &summary, &dst_out, &postcopy_passes, Some(&stats))?;
    // QEMU serves no fault samples of its own: nothing VMM-side to keep.
    r.histograms.remove(kind::VMM_FAULT);
    r.histograms.remove(kind::COLLAPSE_STALL);
    r.status = Status::Ok;
    let code = dstatus
        .and_then(|st| st.code())
        .and_then(qemu::guest_exit_code);
    let mismatches = r.guest_mismatches.unwrap_or(0);
    if mismatches > 0 || r.guest_ok != Some(true) || code != Some(0) {
        r.status = Status::Failed;
        r.error = Some(format!(
            "destination guest: {mismatches} mismatches, result ok={:?}, exit code {code:?} \
             (QEMU status {dstatus:?}; figures kept)",
            r.guest_ok
        ));
    }
    let _ = std::fs::remove_file(&src_qmp);
    let _ = std::fs::remove_file(&dst_qmp);
    Ok(())
}

fn ms(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Our summary and stats types filled from QEMU's `query-migrate` (source `done`,
/// destination `incoming`), plus the QEMU-only fields of `r`.
fn figures(
    done: &Value,
    incoming: &Value,
    r: &mut ScenarioResult,
) -> (MigrateSummary, DestinationStats) {
    let ram = &done["ram"];
    let total_ms = ms(&done["total-time"]);
    let setup_ms = ms(&done["setup-time"]).unwrap_or(0.0);
    let transferred = ram["transferred"].as_u64();
    let requests = ram["postcopy-requests"].as_u64();
    r.postcopy_requests = requests;
    r.peer_blocktime_ms = ms(&incoming["postcopy-blocktime"]);
    r.peer_vcpu_blocktime_ms = incoming["postcopy-vcpu-blocktime"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let summary = MigrateSummary {
        blackout_ms: ms(&done["downtime"]),
        total_ms,
        bytes_sent: transferred,
        pages_sent: ram["normal"].as_u64(),
        faults_served: requests,
        transfer_ms: total_ms.map(|t| (t - setup_ms).max(0.0)),
        transfer_bytes: transferred,
        ..Default::default()
    };
    let stats = DestinationStats {
        faults_served: requests,
        ..Default::default()
    };
    (summary, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_maps_onto_our_figures() {
        let mut r = ScenarioResult::new("s", "shmem", "qemu", "loopback", "random");
        let done = json!({
            "status": "completed", "total-time": 2000, "setup-time": 100, "downtime": 12,
            "ram": {"transferred": 1_000_000_000u64, "normal": 240_000, "postcopy-requests": 77}
        });
        let incoming = json!({
            "status": "completed", "postcopy-blocktime": 40, "postcopy-vcpu-blocktime": [41]
        });
        let (summary, stats) = figures(&done, &incoming, &mut r);
        assert_eq!(summary.blackout_ms, Some(12.0));
        assert_eq!(summary.total_ms, Some(2000.0));
        assert_eq!(summary.transfer_ms, Some(1900.0));
        assert_eq!(summary.bytes_sent, Some(1_000_000_000));
        assert_eq!(stats.faults_served, Some(77));
        assert_eq!(r.postcopy_requests, Some(77));
        assert_eq!(r.peer_blocktime_ms, Some(40.0));
        assert_eq!(r.peer_vcpu_blocktime_ms, vec![41.0]);
    }
}
