//! The `vmm` command: launch a VM, probe the host, and (with the migration subcommands) send or
//! receive a running VM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use vmm::launcher::{self, RunConfig, SerialTarget};
use vmm::memory::Backing;
use vmm::size::parse_size;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM VMM with huge-page guest RAM and 4 KiB postcopy live migration"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch a VM and run it until the guest exits (the process exits with the guest's exit code)
    /// or SIGINT/SIGTERM arrives (exit code 128 + signal number).
    Run(RunArgs),
    /// Print what this host offers the VMM: KVM flavour, userfaultfd features, huge page pools,
    /// guest_memfd flags, dirty ring.
    Probe {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
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
    #[arg(long, value_parser = parse_size_arg)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// What backs guest RAM.
    #[arg(long, value_parser = parse_backing, default_value = "anon",
          help = "What backs guest RAM: anon, shmem, hugetlb-2m, hugetlb-1g or guest-memfd")]
    backing: Backing,
    /// Where guest serial output goes: "stdout" or a file path (appended).
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Create a control socket (mode 0600) at this path, for `vmm migrate` and friends.
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_backing(s: &str) -> Result<Backing, String> {
    s.parse::<Backing>().map_err(|e| e.to_string())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
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

fn cmd_run(a: RunArgs) -> Result<i32> {
    let serial = match a.serial.as_str() {
        "stdout" => SerialTarget::Stdout,
        p => SerialTarget::File(PathBuf::from(p)),
    };
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
    let outcome = launcher::run(&cfg, None).context("running the VM")?;
    Ok(outcome.exit_code())
}
