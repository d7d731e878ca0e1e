//! `harness`: runs the postcopy latency scenarios and writes results.json, raw histograms,
//! report.md and plots. See docs/measuring.md.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use harness::histogram::Percentiles;
use harness::scenario::{self, Progress, RunConfig};
use harness::{cleanup, histogram, limits, netns, report, results, sweep};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "harness", about = "Postcopy latency-measurement harness")]
struct Cli {
    #[command(flatten)]
    log: vmm_logging::LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios against real VMM processes and write DIR/results.json, DIR/report.md,
    /// DIR/plots/, DIR/hist/ and DIR/raw/.
    Run {
        /// Scenario names (see `harness list`).
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// Every scenario.
        #[arg(long, conflicts_with = "scenarios")]
        all: bool,
        /// The quick subset (the default when no scenario is named).
        #[arg(long, conflicts_with = "all")]
        quick: bool,
        /// Also run the peer beside the chosen scenarios: `qemu` adds QEMU's postcopy on the
        /// same backing, pattern, link and memory size for each (shmem and hugetlb; `--all`
        /// includes them anyway). Needs qemu-system-x86_64; without it they are skipped, and
        /// the run says so.
        #[arg(long, value_enum, value_name = "PEER")]
        peer: Option<PeerArg>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The vmm binary (default: next to this binary, else `vmm` on PATH).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// The workload guest.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-images/out/workload.elf"))]
        kernel: PathBuf,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Guest passes of the random pattern (sequential and hot-set scenarios run 6 times as
        /// many: their passes are that much shorter). The migration starts after the first; the guest prints its histograms
        /// after the last, so there must be enough passes left to span the migration (a hugetlb
        /// destination faults in all guest RAM before it answers the source, seconds on a cold
        /// pool). 0 = until the harness stops it (then no guest histograms: VMM-side figures
        /// only). Default 24; a sweep point's default shrinks with its size (24 at 256 MiB,
        /// 6 from 1 GiB up).
        #[arg(long)]
        passes: Option<u32>,
        /// With --passes 0: destination passes to wait for after migrating.
        #[arg(long, default_value_t = 2)]
        post_passes: usize,
        /// Seconds to wait for each phase (guest start, migration, guest finish), per GiB of
        /// guest RAM above 1 GiB (a 4 GiB scenario waits 4 times as long).
        #[arg(long, default_value_t = 120)]
        phase_timeout: u64,
        /// Sweep the chosen scenarios (default: shmem-4k-staged-random-loopback) over guest
        /// RAM sizes (`--sizes`) and vCPU counts (`--sweep-vcpus`); the report plots blackout,
        /// total time, fault p50/p99 and destination extra memory against the size. Sizes
        /// that do not fit in the host's available memory are skipped, saying why.
        #[arg(long, value_enum, value_name = "WHAT", conflicts_with_all = ["all", "peer", "vcpus"])]
        sweep: Option<SweepArg>,
        /// Guest RAM sizes of the sweep, comma-separated (M or G suffix).
        #[arg(long, default_value = harness::sweep::DEFAULT_SIZES, requires = "sweep")]
        sizes: String,
        /// vCPU counts of the sweep, comma-separated (replaces --vcpus for the sweep).
        #[arg(long, default_value = harness::sweep::DEFAULT_VCPUS, requires = "sweep")]
        sweep_vcpus: String,
    },
    /// Measure and print the limits (userfault round trip, loopback TCP round trip, alone and
    /// beside a bulk stream, and throughput; with --rate-mbit, over a namespace pair with that
    /// cap).
    Limits {
        #[arg(long, default_value_t = 20_000)]
        samples: usize,
        #[arg(long)]
        rate_mbit: Option<u64>,
        /// One-way delay (us) through the userspace proxy.
        #[arg(long, default_value_t = 0)]
        delay_us: u64,
    },
    /// Regenerate report.md and plots from DIR/results.json.
    Report {
        #[arg(long = "in", value_name = "DIR")]
        dir: PathBuf,
    },
    /// Merge runs: histograms added, figures recomputed; writes results and report to --out.
    Merge {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
    },
    /// Compare two runs scenario by scenario (markdown table on stdout).
    Compare { a: PathBuf, b: PathBuf },
    /// List scenario names (quick subset first, then all).
    List,
    /// Delete network namespaces left by harness processes that no longer exist.
    Cleanup,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PeerArg {
    Qemu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SweepArg {
    /// Guest RAM size (and vCPU count).
    Size,
}

struct Bars {
    overall: ProgressBar,
    phase: ProgressBar,
}

impl Progress for Bars {
    fn scenario(&mut self, index: usize, total: usize, name: &str) {
        self.overall.set_length(total as u64);
        self.overall.set_position(index as u64);
        self.overall.set_message(name.to_string());
    }

    fn phase(&mut self, msg: &str) {
        self.phase.set_message(msg.to_string());
    }
}

fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

fn print_p(name: &str, p: &Percentiles) {
    println!(
        "{name:<28} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  p99.9 {:>9.1}  max {:>9.1}  (n={})",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
}

fn main() -> Result<()> {
    cleanup::install_signal_cleanup().context("installing the signal cleanup thread")?;
    let cli = Cli::parse();
    vmm_logging::init(&cli.log, "harness").context("setting up logging")?;
    match cli.cmd {
        Cmd::Run {
            scenarios,
            all,
            quick,
            peer,
            out,
            vmm,
            kernel,
            vcpus,
            passes,
            post_passes,
            phase_timeout,
            sweep,
            sizes,
            sweep_vcpus,
        } => {
            let mut list = if let Some(SweepArg::Size) = sweep {
                let sizes = sweep::parse_sizes(&sizes).context("--sizes")?;
                let counts = sweep::parse_vcpus(&sweep_vcpus).context("--sweep-vcpus")?;
                let bases = if scenarios.is_empty() {
                    scenario::by_names(&[sweep::DEFAULT_BASE.to_string()])?
                } else {
                    scenario::by_names(&scenarios)?
                };
                let points = sweep::expand(&bases, &sizes, &counts, passes)?;
                let (fit, skipped) = sweep::split_fitting(points);
                for (s, why) in &skipped {
                    eprintln!("harness: SKIPPING sweep point {}: {why}", s.name);
                }
                if fit.is_empty() {
                    bail!("no sweep point fits in this host's memory (see above)");
                }
                fit
            } else if all {
                scenario::all()
            } else if !scenarios.is_empty() {
                scenario::by_names(&scenarios)?
            } else {
                scenario::quick()
            };
            if let Some(PeerArg::Qemu) = peer {
                let twins = scenario::peer_twins(&list);
                list.extend(twins);
            }
            let is_quick = quick || (!all && scenarios.is_empty() && sweep.is_none());
            let cfg = RunConfig {
                vmm: vmm.unwrap_or_else(default_vmm),
                kernel,
                out: out.clone(),
                vcpus,
                passes: passes.unwrap_or(24),
                post_passes,
                quick: is_quick,
                uffd_samples: if is_quick { 5_000 } else { 20_000 },
                rtt_samples: if is_quick { 2_000 } else { 10_000 },
                throughput_for: Duration::from_secs(if is_quick { 1 } else { 3 }),
                phase_timeout: Duration::from_secs(phase_timeout),
            };
            if !cfg.kernel.exists() {
                bail!("the workload guest {} does not exist", cfg.kernel.display());
            }
            let mp = MultiProgress::new();
            let overall = mp.add(ProgressBar::new(list.len() as u64));
            overall.set_style(
                ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                    .context("progress bar template")?,
            );
            let phase = mp.add(ProgressBar::new_spinner());
            phase.enable_steady_tick(Duration::from_millis(200));
            let mut bars = Bars { overall, phase };
            let res = scenario::run(&cfg, &list, &mut bars)
                .with_context(|| format!("running scenarios into {}", out.display()))?;
            bars.overall.set_position(list.len() as u64);
            bars.overall.finish_with_message("done");
            bars.phase.finish_and_clear();
            res.save(&out).context("writing results.json")?;
            let path = report::write_report(&out, &res).context("writing the report")?;
            let failed = res
                .scenarios
                .iter()
                .filter(|s| s.status == results::Status::Failed)
                .count();
            let skipped = res
                .scenarios
                .iter()
                .filter(|s| s.status == results::Status::Skipped)
                .count();
            println!(
                "{} scenarios, {failed} failed{}; report: {}",
                res.scenarios.len(),
                if skipped > 0 {
                    format!(", {skipped} not run on this host (report.md says why)")
                } else {
                    String::new()
                },
                path.display()
            );
        }
        Cmd::Limits {
            samples,
            rate_mbit,
            delay_us,
        } => {
            let uffd = limits::uffd_round_trip(samples).context("userfault round trip")?;
            print_p("uffd round trip (us)", &Percentiles::us(&uffd));
            let delay = Duration::from_micros(delay_us);
            let n = samples.min(10_000);
            let t = Duration::from_secs(2);
            let link = match rate_mbit {
                None => {
                    let echo = limits::EchoServer::start("127.0.0.1:0".parse()?)?;
                    let proxy = (delay_us > 0)
                        .then(|| {
                            harness::delay_proxy::DelayProxy::start(
                                "127.0.0.1:0".parse()?,
                                echo.addr(),
                                delay,
                            )
                            .map_err(anyhow::Error::from)
                        })
                        .transpose()?;
                    let target = proxy.as_ref().map_or(echo.addr(), |p| p.addr());
                    limits::measure_link(target, n, t, 1)?
                }
                Some(rate) => {
                    use netns::Side;
                    let pair = netns::NetnsPair::create(Some(rate))?;
                    let dst = SocketAddr::new(pair.ip(Side::Dst).into(), 0);
                    let echo = pair.run_in(Side::Dst, move || limits::EchoServer::start(dst))??;
                    let up = echo.addr();
                    let src = SocketAddr::new(pair.ip(Side::Src).into(), 0);
                    let proxy = if delay_us > 0 {
                        Some(pair.run_in(Side::Src, move || {
                            harness::delay_proxy::DelayProxy::start(src, up, delay)
                        })??)
                    } else {
                        None
                    };
                    let target = proxy.as_ref().map_or(up, |p| p.addr());
                    let l =
                        pair.run_in(Side::Src, move || limits::measure_link(target, n, t, 1))??;
                    drop(proxy);
                    drop(echo);
                    l
                }
            };
            print_p("4 KiB TCP round trip (us)", &Percentiles::us(&link.tcp_rtt));
            let limit = histogram::convolve(&uffd, &link.tcp_rtt)?;
            print_p("limit = uffd + TCP (us)", &Percentiles::us(&limit));
            print_p(
                "TCP RTT beside bulk (us)",
                &Percentiles::us(&link.tcp_rtt_loaded),
            );
            let loaded = histogram::convolve(&uffd, &link.tcp_rtt_loaded)?;
            print_p("loaded limit (us)", &Percentiles::us(&loaded));
            println!(
                "raw TCP throughput           {:.2} Gbit/s",
                link.throughput_gbps
            );
            println!(
                "raw TCP, 1 vCPU spinner      {:.2} Gbit/s",
                link.loaded_throughput_gbps
            );
            println!(
                "raw TCP, memory to memory    {:.2} Gbit/s (1 vCPU spinner)",
                link.memory_throughput_gbps
            );
        }
        Cmd::Report { dir } => {
            let res = results::Results::load(&dir)?;
            let path = report::write_report(&dir, &res)?;
            println!("{}", path.display());
        }
        Cmd::Merge { out, inputs } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let res = results::merge_dirs(&inputs, &out)?;
            let path = report::write_report(&out, &res)?;
            println!("{}", path.display());
        }
        Cmd::Compare { a, b } => {
            let (ra, rb) = (results::Results::load(&a)?, results::Results::load(&b)?);
            print!("{}", report::compare(&ra, &rb));
        }
        Cmd::List => {
            for s in scenario::quick() {
                println!("{} (quick, {} MiB)", s.name, s.memory_mib);
            }
            for s in scenario::peer_twins(&scenario::quick()) {
                println!("{} (quick --peer qemu, {} MiB)", s.name, s.memory_mib);
            }
            for s in scenario::all() {
                println!("{}", s.name);
            }
        }
        Cmd::Cleanup => {
            for n in netns::delete_stale() {
                println!("deleted {n}");
            }
        }
    }
    Ok(())
}
