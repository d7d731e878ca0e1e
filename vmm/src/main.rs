//! The `vmm` command: launch a VM, probe the host, and (with the migration subcommands) send or
//! receive a running VM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use std::net::ToSocketAddrs;
use std::sync::Arc;

use migration::types::{Granularity, Mode};
use migration::MigrationSummary;
use vmm::api::model::{SendMigration, Tunables};
use vmm::api::Client;
use vmm::events::{EventMonitor, EventTarget};
use vmm::launcher::{self, RunConfig, SerialTarget};
use vmm::live_migration::destination::{self, ReceiveConfig};
use vmm::live_migration::source::Migrator;
use vmm::memory::Backing;
use vmm::size::parse_size;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM VMM with huge-page guest RAM and 4 KiB postcopy live migration"
)]
struct Cli {
    #[command(flatten)]
    log: vmm_logging::LogArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch a VM and run it until the guest exits (the process exits with the guest's exit code),
    /// SIGINT/SIGTERM arrives (exit code 128 + signal number), or it is shut down (exit code 0)
    /// or migrated away through its API socket.
    Run(RunArgs),
    /// Print what this host offers the VMM: KVM flavour, userfaultfd features, huge page pools,
    /// guest_memfd flags, dirty ring.
    Probe {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Migration destination: wait for one incoming VM on ADDR, receive it, run it (serial
    /// output as with `run`) and exit with the guest's exit code.
    Receive(ReceiveArgs),
    /// Migrate the VM behind an API socket to a waiting `vmm receive` (API vm.send-migration);
    /// shows a progress bar on stderr (from vm.migration) and prints a summary at the end.
    /// Exits 0 only once the destination confirmed every page.
    Migrate(MigrateArgs),
    /// Show the VM behind an API socket: its state, configuration and the live statistics of
    /// its migration (API vm.info and vm.migration).
    Status(StatusArgs),
    /// Pause the VM behind an API socket (API vm.pause).
    Pause(SocketArgs),
    /// Stop the VM behind an API socket; its VMM exits with status 0 (API vm.shutdown).
    Shutdown(SocketArgs),
    /// Cancel the outgoing migration of the VM behind an API socket; allowed only before the
    /// switchover (the VM runs on here). After it, the destination runs the VM and a cancel is
    /// refused with the reason (API vm.migration-cancel).
    Cancel(SocketArgs),
    /// Point a running migration's recovery at another destination address (e.g. another
    /// network path to the same `vmm receive`): the source reconnects there from its next
    /// attempt on.
    MigrateRetarget(RetargetArgs),
    /// Resume a paused VM behind an API socket. After a migration whose switchover outcome is
    /// unknown (the destination may run the VM) this is refused unless --force is given.
    Resume(ResumeArgs),
    /// Measure the raw vCPU userfault round trip with the page already local (the floor under a
    /// postcopy fault): boot the workload guest with every page behind a minimal userfault
    /// handler and print the latency the guest and the VMM saw.
    FaultLimit(FaultLimitArgs),
    /// Write a CA and server and client certificates for migration TLS into DIR (QEMU's file
    /// names: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem,
    /// plus ca-key.pem; keys mode 0600). Copy DIR to both hosts (the destination needs the
    /// server files, the source the client files, both ca-cert.pem).
    TlsInit(TlsInitArgs),
}

#[derive(clap::Args)]
struct FaultLimitArgs {
    /// The workload guest ELF (guest-images/out/workload.elf).
    #[arg(long)]
    kernel: PathBuf,
    /// The backing whose faults to measure. The 4k-staged strategy stages every fault of
    /// hugetlb and guest-memfd RAM in shmem, so those are measured on shmem of the same size.
    #[arg(long)]
    backing: Backing,
    /// Guest RAM size, e.g. 256M (a bare number is MiB).
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Workload guest command line (default: "passes=1 pattern=sequential", one write of every
    /// page of usable RAM).
    #[arg(long)]
    cmdline: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ReceiveArgs {
    /// Address to listen on, e.g. 127.0.0.1:7000. Without --secret-file only loopback
    /// addresses are accepted.
    #[arg(long)]
    listen: String,
    /// What backs the received guest's RAM (may differ from the source's).
    #[arg(long)]
    backing: Backing,
    /// Postcopy fault granularity on huge and guest_memfd backings: 4k (stage at 4 KiB,
    /// collapse later), huge (continue a huge page only once all of it arrived), or native
    /// (use the kernel's own 4 KiB faults where a probe finds them: 4 KiB UFFDIO_CONTINUE inside
    /// hugetlb pages (HGM), userfaultfd on guest_memfd; where the kernel lacks them it falls
    /// back to 4k and says why on stderr and in --stats-json `native_fallback`).
    #[arg(long, default_value_t = Granularity::FourK)]
    granularity: Granularity,
    /// File holding the shared secret (at least 16 bytes) both sides prove they know.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run both channels over TLS 1.3 with mutual certificate authentication: DIR holds
    /// ca-cert.pem, server-cert.pem and server-key.pem (`vmm tls-init` makes them); only
    /// sources with a client certificate of that CA are accepted.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// With --secret-file and without --tls-dir, accept listening on a non-loopback address
    /// in plaintext (pages and state travel in the clear).
    #[arg(long)]
    allow_plaintext: bool,
    /// Write the destination's migration statistics (faults, collapses, latencies) to this
    /// file as JSON once every page has arrived.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Once the source's state arrived, a lost link pauses the migration (postcopy-paused:
    /// vCPUs that touch a missing page wait, the others run) and the destination waits this
    /// many seconds for the source to reconnect; then the VM is lost and it exits non-zero.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    recover_timeout: u64,
    /// Create a control socket (mode 0600) at this path. It answers from the start (vm.info,
    /// vm.migration while the VM arrives) and, once every page arrived, every request a booted
    /// VM answers: pause, resume, shutdown, and migrating it on.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    #[command(flatten)]
    vm_process: VmProcessArgs,
}

/// What `run` and `receive` share: where the guest's serial output and the events go, and the
/// system call filter of the VMM process.
#[derive(clap::Args)]
struct VmProcessArgs {
    /// Where guest serial output goes: "stdout" or a file path (appended).
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Write events (one JSON object per line) to path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N", value_parser = parse_event_target)]
    event_monitor: Option<EventTarget>,
    /// System call filtering (seccomp): on (each thread may make only the system calls of its
    /// role; any other stops the VMM with a message naming it, exit status 159), log (allowed,
    /// and logged by the kernel to the audit log: for finding what a new code path needs), off.
    #[arg(long, default_value = "on", value_parser = ["on", "log", "off"])]
    seccomp: String,
    /// While a migration runs, keep its bulk threads (the source's push; the destination's bulk
    /// receive and collapse) on these CPUs, e.g. "1" or "2-3", and the fault path (fault
    /// service, urgent channel) and, during postcopy, the destination's vCPUs on the others, so
    /// that a faulting vCPU does not wait for a CPU behind bulk copying. Bulk transfer then has
    /// only these CPUs; LIST must leave at least one. Default: no pinning.
    #[arg(long, value_name = "LIST")]
    migration_cpus: Option<String>,
}

#[derive(clap::Args)]
struct TlsInitArgs {
    /// Where to write the files (created if missing).
    dir: PathBuf,
    /// The destination's names and addresses its certificate covers (IP addresses become IP
    /// SANs, other names DNS names), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The source VM's control socket (`vmm run --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination address (where `vmm receive --listen` waits).
    #[arg(long)]
    to: String,
    /// precopy: copy RAM while the guest runs, then stop and copy the rest; postcopy: move
    /// the guest first and fetch RAM on demand; hybrid: a few precopy rounds, then postcopy.
    #[arg(long)]
    mode: Mode,
    /// File holding the shared secret (at least 16 bytes).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run both channels over TLS 1.3 with mutual certificate authentication: DIR holds
    /// ca-cert.pem, client-cert.pem and client-key.pem (`vmm tls-init` makes them).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of --to).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    tls_server_name: Option<String>,
    /// With --secret-file and without --tls-dir, allow a non-loopback destination in
    /// plaintext (pages and state travel in the clear).
    #[arg(long)]
    allow_plaintext: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// After the switchover, a lost link pauses the migration (postcopy-paused) and the source
    /// reconnects with backoff for up to this many seconds; then the VM is lost (if the
    /// destination runs it) or stays paused here (if that is unknown).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    recover_timeout: u64,
    /// Precopy stops iterating once the rest would take this long to send (QEMU's
    /// downtime-limit).
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    downtime_limit: u64,
    /// Cap precopy rounds at this many bytes per second (e.g. 100M; QEMU's max-bandwidth).
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    max_bandwidth: Option<u64>,
    /// Cap postcopy's background push at this many bytes per second (QEMU's
    /// max-postcopy-bandwidth); pages a vCPU waits for are never capped.
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    max_postcopy_bandwidth: Option<u64>,
    /// Most precopy rounds, the full pass included.
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    max_rounds: u32,
    /// Give up if the migration has not switched over within this many seconds (the VM runs
    /// on here).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
}

#[derive(clap::Args)]
struct SocketArgs {
    /// The VM's control socket (`vmm run|receive --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The VM's control socket (`vmm run|receive --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    /// Print {"vm": vm.info, "migration": vm.migration} as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ResumeArgs {
    /// The VM's control socket (`vmm run --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    /// Resume even though the last migration's outcome is unknown: only when the destination
    /// surely does not run the VM (else two copies run).
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct RetargetArgs {
    /// The source VM's control socket (`vmm run --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    /// The destination address to reconnect to.
    #[arg(long)]
    to: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot: a Linux bzImage or vmlinux ELF, or the workload guest ELF.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default for Linux: "console=ttyS0 earlyprintk=serial,ttyS0,115200
    /// reboot=k panic=1 nomodules"; the workload guest: see guest-images/workload/README.md).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM size, e.g. 512M or 2G (a bare number is MiB). Must be a multiple of the
    /// backing's page size.
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// What backs guest RAM.
    #[arg(long, default_value_t = Backing::Anon)]
    backing: Backing,
    /// Create a control socket (mode 0600) at this path: an HTTP API (docs/api.md) for `vmm
    /// status|pause|resume|shutdown|migrate|cancel` and curl.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    #[command(flatten)]
    vm_process: VmProcessArgs,
}

/// Why a `--max-bandwidth` / `--max-postcopy-bandwidth` value is refused.
#[derive(Debug, thiserror::Error)]
enum RateError {
    #[error("'{text}' is too large for a number of bytes per second: {source}")]
    Bytes {
        text: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error(transparent)]
    Size(#[from] vmm::size::SizeError),
    #[error("a bandwidth cap must be above 0 (leave the option out for no cap)")]
    Zero,
}

fn parse_rate(s: &str) -> Result<u64, RateError> {
    // A rate is bytes per second: a bare number is bytes here, not MiB.
    let v = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>().map_err(|source| RateError::Bytes {
            text: s.to_owned(),
            source,
        })?
    } else {
        parse_size(s)?
    };
    if v == 0 {
        return Err(RateError::Zero);
    }
    Ok(v)
}

fn parse_event_target(s: &str) -> Result<EventTarget, vmm::events::EventError> {
    s.parse()
}

fn open_events(t: &Option<EventTarget>) -> Result<Option<Arc<EventMonitor>>> {
    match t {
        Some(t) => Ok(Some(Arc::new(
            EventMonitor::open(t).context("opening the event monitor")?,
        ))),
        None => Ok(None),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = vmm_logging::init(&cli.log, "vmm") {
        eprintln!("vmm: error: {e}");
        return ExitCode::from(1);
    }
    let logs_to_file = cli.log.log_file.is_some();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!("{msg}");
            if logs_to_file {
                // The log goes to a file: the user still sees why the command failed.
                eprintln!("vmm: error: {msg}");
            }
            ExitCode::from(1)
        }
    }
}

/// Joins an error and its causes with ": ", leaving out a cause whose text the message before
/// it already contains (typed errors often quote their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Command::Run(a) => cmd_run(a),
        Command::Receive(a) => cmd_receive(a),
        Command::TlsInit(a) => {
            let files = migration::tls::generate(&a.dir, &a.hosts, a.force)
                .with_context(|| format!("writing TLS files into {}", a.dir.display()))?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(0)
        }
        Command::Migrate(a) => cmd_migrate(a),
        Command::Status(a) => cmd_status(a),
        Command::Pause(a) => api_action(&a.api_socket, "pausing the VM", "the VM is paused", |c| {
            c.pause()
        }),
        Command::Shutdown(a) => api_action(
            &a.api_socket,
            "shutting down the VM",
            "the VM was shut down",
            Client::shutdown,
        ),
        Command::Cancel(a) => api_action(
            &a.api_socket,
            "cancelling the migration of the VM",
            "the migration was cancelled; the VM runs here",
            Client::cancel,
        ),
        Command::Resume(a) => api_action(&a.api_socket, "resuming the VM", "the VM runs", |c| {
            c.resume(a.force)
        }),
        Command::MigrateRetarget(a) => {
            let reply = Client::new(&a.api_socket)
                .retarget(&a.to)
                .with_context(|| format!("retargeting the migration to {}", a.to))?;
            println!(
                "the migration reconnects to {} from its next attempt on",
                reply.destination
            );
            Ok(0)
        }
        Command::FaultLimit(a) => cmd_fault_limit(a),
        Command::Probe { json } => {
            let report = vmm::probe::probe();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("encoding the probe report")?
                );
            } else {
                print!("{report}");
            }
            Ok(0)
        }
    }
}

/// Sets up seccomp for this process (before any thread starts).
/// What `run` and `receive` set up for the whole process first: the migration CPU placement,
/// then the system call filter.
fn init_vm_process(a: &VmProcessArgs) -> Result<()> {
    if let Some(list) = &a.migration_cpus {
        let p = migration::cpu_placement::configure(list)
            .with_context(|| format!("--migration-cpus {list}"))?;
        tracing::info!(
            "migrations keep bulk threads on CPUs {}, vCPUs and the fault path on {}",
            p.bulk,
            p.rest
        );
    }
    let mode = a.seccomp.parse::<vmm::seccomp::Mode>()?;
    vmm::seccomp::init(mode).context("setting up seccomp (--seccomp off runs without it)")?;
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<i32> {
    init_vm_process(&a.vm_process)?;
    let serial = serial_target(&a.vm_process.serial);
    let cfg = RunConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        memory: a.memory,
        vcpus: a.vcpus,
        backing: a.backing,
        serial,
        api_socket: a.api_socket,
    };
    let events = open_events(&a.vm_process.event_monitor)?;
    let outcome =
        launcher::run(&cfg, Some(Arc::new(Migrator)), events).context("running the VM")?;
    Ok(outcome.exit_code())
}

fn cmd_fault_limit(a: FaultLimitArgs) -> Result<i32> {
    let cfg = vmm::fault_limit::FaultLimitConfig {
        kernel: a.kernel,
        cmdline: a.cmdline,
        memory: a.memory,
        vcpus: a.vcpus,
        backing: a.backing,
    };
    let report = vmm::fault_limit::measure(&cfg).context("measuring the vCPU userfault limit")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("encoding the fault-limit report")?
        );
    } else {
        println!("{report}");
    }
    Ok(0)
}

fn serial_target(s: &str) -> SerialTarget {
    match s {
        "stdout" => SerialTarget::Stdout,
        p => SerialTarget::File(PathBuf::from(p)),
    }
}

fn cmd_receive(a: ReceiveArgs) -> Result<i32> {
    if a.backing == Backing::GuestMemfd {
        vmm::memory::guest_memfd::check_host().context("--backing guest-memfd")?;
    }
    init_vm_process(&a.vm_process)?;
    let listen = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve listen address '{}'", a.listen))?
        .next()
        .with_context(|| format!("listen address '{}' has no address", a.listen))?;
    let cfg = ReceiveConfig {
        listen,
        backing: a.backing,
        granularity: a.granularity,
        secret_file: a.secret_file,
        tls_dir: a.tls_dir,
        allow_plaintext: a.allow_plaintext,
        serial: serial_target(&a.vm_process.serial),
        stats_json: a.stats_json,
        recover_timeout: std::time::Duration::from_secs(a.recover_timeout),
        api_socket: a.api_socket,
    };
    let events = open_events(&a.vm_process.event_monitor)?;
    if cfg.tls_dir.is_none() && cfg.allow_plaintext && !cfg.listen.ip().is_loopback() {
        tracing::warn!(
            "--allow-plaintext: the migration on {} is not encrypted (pages and state can be read and altered on the way)",
            cfg.listen
        );
    }
    let outcome = destination::receive(&cfg, events).context("receiving the VM")?;
    Ok(outcome.exit_code())
}

fn cmd_migrate(a: MigrateArgs) -> Result<i32> {
    // Check the secret file here for a quick, clear error; the VMM reads it itself, so the
    // secret never crosses the API socket.
    let secret_file = match &a.secret_file {
        Some(p) => {
            migration::auth::Secret::from_file(p)
                .with_context(|| format!("reading secret file {}", p.display()))?;
            let abs = std::fs::canonicalize(p)
                .with_context(|| format!("resolving secret file {}", p.display()))?;
            Some(abs.to_string_lossy().into_owned())
        }
        None => None,
    };
    // The VMM reads the TLS files itself: give it an absolute path.
    let tls_dir = match &a.tls_dir {
        Some(d) => Some(
            std::fs::canonicalize(d)
                .with_context(|| format!("resolving TLS directory {}", d.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let loopback =
        a.to.parse::<std::net::SocketAddr>()
            .is_ok_and(|s| s.ip().is_loopback());
    if tls_dir.is_none() && a.allow_plaintext && !loopback {
        tracing::warn!(
            "--allow-plaintext: a migration to a non-loopback address is not encrypted (pages and state can be read and altered on the way)"
        );
    }
    let req = SendMigration {
        destination_url: a.to.clone(),
        mode: a.mode,
        secret_file,
        tls_dir,
        tls_server_name: a.tls_server_name.clone(),
        allow_plaintext: a.allow_plaintext,
        recover_timeout_s: Some(a.recover_timeout),
        tunables: Tunables {
            downtime_limit_ms: Some(a.downtime_limit),
            max_bandwidth: a.max_bandwidth,
            max_postcopy_bandwidth: a.max_postcopy_bandwidth,
            max_rounds: Some(a.max_rounds),
            timeout_s: a.timeout,
        },
    };
    let client = Client::new(&a.api_socket);
    let summary = vmm::progress::migrate_with_progress(&client, &req)
        .with_context(|| format!("migrating to {}", a.to))?;
    if a.json {
        println!("{summary}");
    } else {
        let summary: MigrationSummary =
            serde_json::from_value(summary).context("reading the migration summary")?;
        print_summary(&summary);
    }
    Ok(0)
}

/// One API request without a reply body: says `done` on success, else fails with `doing` and
/// the socket as context.
fn api_action(
    socket: &std::path::Path,
    doing: &str,
    done: &str,
    f: impl FnOnce(&Client) -> Result<(), vmm::api::ApiError>,
) -> Result<i32> {
    f(&Client::new(socket)).with_context(|| format!("{doing} behind {}", socket.display()))?;
    println!("{done}");
    Ok(0)
}

fn cmd_status(a: StatusArgs) -> Result<i32> {
    let client = Client::new(&a.api_socket);
    let ctx = || format!("asking the VM behind {}", a.api_socket.display());
    let info = client.info().with_context(ctx)?;
    let migration = client.migration().with_context(ctx)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "vm": info, "migration": migration })
        );
        return Ok(0);
    }
    println!(
        "state      {}",
        serde_json::to_value(info.state)?.as_str().unwrap_or("?")
    );
    if let Some(c) = &info.config {
        println!(
            "config     {} vCPU(s), {} MiB on {} ({}, {})",
            c.vcpus,
            c.memory_bytes >> 20,
            c.backing,
            c.origin,
            c.kernel.as_deref().unwrap_or("no kernel file")
        );
    }
    for r in &info.memory {
        println!(
            "memslot {}  {:#x}..{:#x}",
            r.slot,
            r.guest_addr,
            r.guest_addr + r.size
        );
    }
    println!(
        "migration  {}",
        migration["status"].as_str().unwrap_or("none")
    );
    if info.migration_outcome_unknown {
        println!("           the last migration's outcome is unknown: `vmm resume --force` only if the destination surely does not run the VM");
    }
    Ok(0)
}

fn print_summary(s: &MigrationSummary) {
    println!("migration complete ({})", s.mode);
    println!("  blackout       {:.3} ms", s.blackout_ms);
    println!("  total time     {:.1} ms", s.total_ms);
    println!(
        "  bytes sent     {} ({:.1} MiB)",
        s.bytes_sent,
        s.bytes_sent as f64 / 1048576.0
    );
    println!("  pages sent     {} (+{} zero)", s.pages_sent, s.zero_pages);
    println!("  faults served  {}", s.faults_served);
    println!("  pages pushed   {}", s.pages_pushed);
    println!("  collapses      {}", s.collapses);
    println!("  precopy rounds {}", s.rounds);
    println!(
        "  recoveries     {} ({:.1} ms postcopy-paused)",
        s.recoveries, s.paused_ms
    );
    if s.transfer_ms > 0.0 {
        println!(
            "  streaming      {:.1} ms, {:.2} Gbit/s (precopy rounds + postcopy bulk push)",
            s.transfer_ms,
            s.transfer_bytes as f64 * 8.0 / (s.transfer_ms / 1e3) / 1e9
        );
    }
}
