//! `vmm migrate`'s progress: the migration runs as one `vm.send-migration` request on a thread
//! of its own while this polls `vm.migration` and draws a progress bar (indicatif) on stderr,
//! or, when stderr is not a terminal, prints a line at each change of status and every second.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::model::SendMigration;
use crate::api::{ApiError, Client};

/// How often the statistics are polled.
const POLL: Duration = Duration::from_millis(200);

/// Runs the migration `req` through `client`, showing progress; returns the summary.
pub fn migrate_with_progress(
    client: &Client,
    req: &SendMigration,
) -> Result<serde_json::Value, ApiError> {
    let worker = {
        let client = client.clone();
        let req = req.clone();
        std::thread::Builder::new()
            .name("send-migration".into())
            .spawn(move || client.send_migration(&req))
            .map_err(ApiError::Runtime)?
    };
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "[{elapsed_precise}] {prefix:<16} [{bar:32}] {bytes}/{total_bytes} {msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        Some(b)
    } else {
        None
    };
    let start = Instant::now();
    let mut last_status = String::new();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    while !worker.is_finished() {
        // The source VMM may already be gone once the migration ended: a failed poll only
        // means no new figures.
        // "none": the request has not started the migration yet.
        if let Some(info) = client.migration().ok().filter(|i| i["status"] != "none") {
            let status = info["status"].as_str().unwrap_or("?").to_string();
            let ram = &info["ram"];
            let total = ram["total"].as_u64().unwrap_or(0);
            let transferred = ram["transferred"].as_u64().unwrap_or(0);
            let msg = format!(
                "{:.0} Mbit/s, {} dirty-sync, {} postcopy-requests",
                ram["mbps"].as_f64().unwrap_or(0.0),
                ram["dirty-sync-count"].as_u64().unwrap_or(0),
                ram["postcopy-requests"].as_u64().unwrap_or(0),
            );
            match &bar {
                Some(b) => {
                    b.set_length(total.max(transferred));
                    b.set_position(transferred);
                    b.set_prefix(status.clone());
                    b.set_message(msg);
                }
                None => {
                    if status != last_status || last_line.elapsed() >= Duration::from_secs(1) {
                        eprintln!(
                            "[{:6.1}s] {status:<16} {:.1}/{:.1} MiB  {msg}",
                            start.elapsed().as_secs_f64(),
                            transferred as f64 / 1048576.0,
                            total as f64 / 1048576.0,
                        );
                        last_line = Instant::now();
                    }
                }
            }
            last_status = status;
        }
        std::thread::sleep(POLL);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match worker.join() {
        Ok(r) => r,
        Err(_) => Err(ApiError::Malformed {
            endpoint: "vm.send-migration".into(),
            detail: "the request thread panicked".into(),
        }),
    }
}
