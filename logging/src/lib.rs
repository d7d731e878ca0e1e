//! Logging for the `vmm` and `harness` binaries: every message goes through `tracing`, set up
//! here once, the same way for both (docs/api.md lists the flags).
//!
//! - Level: `--log-level LEVEL|DIRECTIVES` (e.g. `debug`, `warn,migration=trace`), else one
//!   `-v` per step above the default (`-v` debug, `-vv` trace), else the environment variable
//!   [`ENV_VAR`] (`VMM_LOG`, same syntax), else `info`.
//! - Where: stderr, or `--log-file PATH` (appended).
//! - Format: `--log-format text` (default: `vmm: message`, `vmm: warning: ...`,
//!   `vmm: error: ...`; debug and trace lines name their module) or `json` (one object per line
//!   with timestamp, level, target and fields).

use std::fmt;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable both binaries read their log filter from.
pub const ENV_VAR: &str = "VMM_LOG";

/// The default filter: notices, warnings and errors.
pub const DEFAULT: &str = "info";

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `vmm: message` lines for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging options of a binary (flatten into its clap `Parser`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// More log output: -v debug, -vv trace (ignored with --log-level).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log level or filter directives (error, warn, info, debug, trace, or e.g.
    /// "info,migration=debug"); overrides -v and the VMM_LOG environment variable
    /// (default: info).
    #[arg(long, value_name = "LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Append log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH", global = true)]
    pub log_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("bad log filter '{filter}': {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot open log file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging was set up twice")]
    Twice,
}

/// The filter `args` and the environment ask for.
pub fn filter_spec(args: &LogArgs) -> String {
    if let Some(l) = &args.log_level {
        return l.clone();
    }
    match args.verbose {
        0 => {}
        1 => return "debug".into(),
        _ => return "trace".into(),
    }
    match std::env::var(ENV_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => DEFAULT.into(),
    }
}

/// Installs the global logger for binary `bin` (its name prefixes text lines).
pub fn init(args: &LogArgs, bin: &'static str) -> Result<(), LogError> {
    let spec = filter_spec(args);
    let filter = EnvFilter::try_new(&spec).map_err(|source| LogError::Filter {
        filter: spec.clone(),
        source,
    })?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (&args.log_file, args.log_format) {
        (Some(path), format) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LogError::File {
                    path: path.clone(),
                    source,
                })?;
            let b = builder.with_writer(Mutex::new(file)).with_ansi(false);
            match format {
                LogFormat::Json => b.json().try_init(),
                LogFormat::Text => b.event_format(Plain { bin }).try_init(),
            }
        }
        (None, LogFormat::Json) => builder
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .json()
            .try_init(),
        (None, LogFormat::Text) => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Plain { bin })
            .try_init(),
    };
    result.map_err(|_| LogError::Twice)
}

/// The text format: `bin: [level: ]message fields`.
struct Plain {
    bin: &'static str,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "{}: ", self.bin)?;
        match *meta.level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(writer, "debug: {}: ", meta.target())?,
            Level::TRACE => write!(writer, "trace: {}: ", meta.target())?,
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_beats_verbose_which_beats_the_default() {
        let mut a = LogArgs::default();
        assert_eq!(
            filter_spec(&LogArgs {
                verbose: 1,
                ..a.clone()
            }),
            "debug"
        );
        assert_eq!(
            filter_spec(&LogArgs {
                verbose: 3,
                ..a.clone()
            }),
            "trace"
        );
        a.log_level = Some("warn,migration=trace".into());
        a.verbose = 2;
        assert_eq!(filter_spec(&a), "warn,migration=trace");
    }
}
