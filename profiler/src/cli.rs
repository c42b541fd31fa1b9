//! Command-line flags (clap derive) for `attach`, `doctor` and their validation; the rest of the
//! program sees only checked values.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// An eBPF latency profiler for a live Redis: finds event-loop stalls and what caused them.
#[derive(Debug, Parser)]
#[command(name = "redis-stallprof", version, about, long_about = None)]
pub struct Cli {
    /// Log more (repeat for debug output); the same as RUST_LOG=info / debug.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a running Redis and report event-loop stalls until stopped.
    Attach(AttachArgs),
    /// Check that this machine and these privileges let `attach` work.
    Doctor,
}

/// Flags of `redis-stallprof attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Profile the process with this pid.
    #[arg(long, conflicts_with = "port")]
    pub pid: Option<u32>,
    /// Profile the process listening on this TCP port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Profile the selected process even if it is not a redis-server or valkey-server.
    #[arg(long)]
    pub force: bool,
    /// An event-loop iteration at least this long is a stall (e.g. 500us, 10ms, 2s).
    #[arg(long, default_value = "10ms", value_parser = parse_positive_duration)]
    pub threshold: Duration,
    /// How often to print a one-line summary of iterations on stderr.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub interval: Duration,
    /// Stop by itself after this long (default: run until Ctrl-C, SIGTERM or the target exits).
    #[arg(long, value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Write JSON lines (one object per event) to PATH; `-` writes them to stdout.
    #[arg(long, value_name = "PATH")]
    pub json: Option<OutputPath>,
}

/// Where an output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputPath {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for OutputPath {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "" => Err("an empty path".to_owned()),
            "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

impl std::fmt::Display for OutputPath {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => formatter.write_str("stdout"),
            Self::File(path) => write!(formatter, "`{}`", path.display()),
        }
    }
}

/// Parses `500us`, `10ms`, `2s`, `1m` (humantime syntax); zero is refused.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|error| format!("`{value}` is not a duration like 500us, 10ms or 2s ({error})"))?;
    if duration.is_zero() {
        return Err(format!("`{value}` must be longer than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_units() {
        assert_eq!(parse_positive_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_positive_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_positive_duration("2s"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn durations_refuse_zero_and_garbage() {
        assert!(parse_positive_duration("0ms").unwrap_err().contains("longer than zero"));
        assert!(parse_positive_duration("fast").unwrap_err().contains("not a duration"));
        assert!(parse_positive_duration("10").is_err());
    }

    #[test]
    fn dash_means_stdout() {
        assert_eq!("-".parse(), Ok(OutputPath::Stdout));
        assert_eq!("a.jsonl".parse(), Ok(OutputPath::File("a.jsonl".into())));
    }

    #[test]
    fn pid_and_port_are_exclusive() {
        let parsed = Cli::try_parse_from(["redis-stallprof", "attach", "--pid", "1", "--port", "2"]);
        assert!(parsed.is_err());
    }
}
