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
    Attach(Box<AttachArgs>),
    /// Check that this machine and these privileges let `attach` work.
    Doctor,
    /// Render a recorded JSON-lines file again: stalls, summary, folded stacks, flamegraph.
    Report(ReportArgs),
}

/// What the folded stacks and the flamegraph are rooted at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StackRoot {
    /// The stack's kind: `[on-cpu]`, `[off-cpu]` or `[runqueue]`.
    #[default]
    Kind,
    /// The stall's origin, then the kind.
    Origin,
    /// The stall's origin and mechanism, then the kind.
    Cause,
}

/// How a command stall's client is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientsMode {
    /// From the server's connections seen during the stall: the one whose request arrived
    /// just before it (several listed when several are possible); costs nothing until a stall.
    #[default]
    Census,
    /// From the event-loop thread's last read before the command (and the command's name as
    /// typed): a program on every `read` system call of the host (see Cost in docs/guide.md).
    Exact,
}

/// How the scheduler and page-fault programs are attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// Perf events on the watched threads alone: other processes pay nothing per context
    /// switch, and per page fault only while a watched server takes faults (falls back to
    /// host-wide, saying so, where the kernel's BTF lacks the scheduler's accounting).
    #[default]
    PerThread,
    /// BTF tracepoints on every context switch, wake-up and page fault of the host.
    HostWide,
}

/// Flags of `redis-stallprof report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A file written by `attach --json`.
    pub file: PathBuf,
    /// Write the folded stacks to PATH (default: stdout).
    #[arg(long, value_name = "PATH")]
    pub folded: Option<PathBuf>,
    /// Write a flamegraph SVG to PATH.
    #[arg(long, value_name = "PATH")]
    pub flamegraph: Option<PathBuf>,
    /// Write a gzipped pprof profile to PATH.
    #[arg(long, value_name = "PATH")]
    pub pprof: Option<PathBuf>,
    /// Write the HTML report to PATH: one self-contained page (timeline, causes with advice,
    /// the heaviest stalls' flamegraphs, memory, connections, overflows, lost events).
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,
    /// Root the folded stacks and the flamegraph at the stack's kind, or at its stall's origin
    /// (and mechanism) first.
    #[arg(long, value_enum, default_value_t)]
    pub stack_root: StackRoot,
}

/// Flags of `redis-stallprof attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Profile the process with this pid (repeat for several).
    #[arg(long)]
    pub pid: Vec<u32>,
    /// Profile the process listening on this TCP port (repeat for several).
    #[arg(long)]
    pub port: Vec<u16>,
    /// Profile every redis-server and valkey-server on the host, and each that starts later.
    #[arg(long, conflicts_with_all = ["pid", "port", "follow"])]
    pub all: bool,
    /// With --all: exit with an error when no Redis runs, instead of waiting for one.
    #[arg(long, requires = "all")]
    pub no_wait: bool,
    /// Profile the selected process even if it is not a redis-server or valkey-server.
    #[arg(long)]
    pub force: bool,
    /// With one --port: when the target exits, wait for the next process listening on the
    /// port (Redis restarting) and profile it too, into the same outputs.
    #[arg(long, requires = "port", conflicts_with = "pid")]
    pub follow: bool,
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
    /// Write the stalls' stacks as folded lines (flamegraph input, weights in us) at exit.
    #[arg(long, value_name = "PATH")]
    pub folded: Option<PathBuf>,
    /// Write the stalls' stacks as a flamegraph SVG at exit.
    #[arg(long, value_name = "PATH")]
    pub flamegraph: Option<PathBuf>,
    /// Write the stalls' stacks as a gzipped pprof profile at exit (go tool pprof, Pyroscope,
    /// Parca).
    #[arg(long, value_name = "PATH")]
    pub pprof: Option<PathBuf>,
    /// Write the HTML report to PATH at exit (see `report --html`).
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,
    /// Root the folded stacks and the flamegraph at the stack's kind, or at its stall's origin
    /// (and mechanism) first.
    #[arg(long, value_enum, default_value_t)]
    pub stack_root: StackRoot,
    /// On-CPU sampling frequency of the event-loop thread, in Hz (default: 999, more for a short
    /// threshold so that a stall just past it is sampled).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub freq: Option<u64>,
    /// Capture stacks only once the current iteration is this old (default: half the threshold).
    #[arg(long, value_parser = parse_positive_duration)]
    pub gate: Option<Duration>,
    /// Times off the CPU shorter than this are only counted, not recorded with their stacks
    /// (default: 1ms, or a tenth of a shorter threshold).
    #[arg(long, value_parser = parse_positive_duration)]
    pub min_block: Option<Duration>,
    /// Bytes of user stack copied per sample (the unwinder walks only what was copied).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(512..=16384))]
    pub stack_bytes: u32,
    /// Alert on every stall at least this long, and on an iteration still running past it.
    #[arg(long, value_parser = parse_positive_duration)]
    pub alert: Option<Duration>,
    /// With --alert: run this command for each alert, the alert JSON on its stdin (split into
    /// words like a shell would, never run by a shell).
    #[arg(long, value_name = "CMD", requires = "alert")]
    pub alert_exec: Option<CommandLine>,
    /// Kill an --alert-exec command still running after this long.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub alert_timeout: Duration,
    /// Run --alert-exec commands as this user: a name (with its primary group), UID or UID:GID
    /// (default: the profiler's user, without any capability).
    #[arg(long, value_name = "USER", requires = "alert_exec")]
    pub alert_user: Option<crate::alert::AlertUser>,
    /// Run --alert-exec at most this many times a minute, all targets together; further
    /// alerts are counted.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub alert_max_per_minute: u32,
    /// How often to sample the listening sockets' accept queues.
    #[arg(long, default_value = "10ms", value_parser = parse_positive_duration)]
    pub queue_interval: Duration,
    /// At most one page-fault stack sample per this long per target (each stands for the
    /// faults since the previous one): bounds the cost when memory grows fast.
    #[arg(long, default_value = "10ms", value_parser = parse_positive_duration)]
    pub fault_sample_interval: Duration,
    /// Do not trace page faults (no `memory` records).
    #[arg(long)]
    pub no_memory: bool,
    /// Write the memory growth's stacks as folded lines (weights in KiB) at exit.
    #[arg(long, value_name = "PATH")]
    pub memory_folded: Option<PathBuf>,
    /// Write the memory growth's stacks as a flamegraph SVG at exit.
    #[arg(long, value_name = "PATH")]
    pub memory_flamegraph: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Attribution rules (TOML) to use instead of the built-in ones.
    #[arg(long, value_name = "PATH")]
    pub rules: Option<PathBuf>,
    /// Size of the kernel-to-userspace ring buffer in KiB (a power of two).
    #[arg(long, default_value_t = 16384, value_parser = parse_ring_buffer_kib)]
    pub ring_buffer_kib: u32,
    /// How a command stall's client is found: `census` (costs nothing until a stall; several
    /// candidates when several are possible) or `exact` (a program on every `read` system
    /// call of the host).
    #[arg(long, value_enum, default_value_t)]
    pub clients: ClientsMode,
    /// How the scheduler and page-fault programs are attached (see Cost in docs/guide.md).
    #[arg(long, value_enum, default_value_t)]
    pub probes: ProbeMode,
    /// Targets the kernel's maps have room for (each costs about 22 KiB of kernel memory).
    #[arg(long, default_value_t = profiler_common::DEFAULT_MAX_TARGETS,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_targets: u32,
}

/// A command line split into words like a shell would (quotes, escapes), never run by a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

impl std::str::FromStr for CommandLine {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let words = shell_words::split(value)
            .map_err(|error| format!("`{value}` is not a command line: {error}"))?;
        if words.is_empty() {
            return Err("an empty command".to_owned());
        }
        Ok(Self(words))
    }
}

/// A power of two from 4 KiB (one page) to 1 GiB.
fn parse_ring_buffer_kib(value: &str) -> Result<u32, String> {
    let kib: u32 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a whole number of KiB"))?;
    if !kib.is_power_of_two() || !(4..=1024 * 1024).contains(&kib) {
        return Err(format!(
            "`{value}` must be a power of two from 4 to 1048576"
        ));
    }
    Ok(kib)
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
        assert_eq!(
            parse_positive_duration("500us"),
            Ok(Duration::from_micros(500))
        );
        assert_eq!(
            parse_positive_duration("10ms"),
            Ok(Duration::from_millis(10))
        );
        assert_eq!(parse_positive_duration("2s"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn durations_refuse_zero_and_garbage() {
        assert!(
            parse_positive_duration("0ms")
                .unwrap_err()
                .contains("longer than zero")
        );
        assert!(
            parse_positive_duration("fast")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_positive_duration("10").is_err());
    }

    #[test]
    fn ring_buffer_sizes_are_powers_of_two_of_at_least_a_page() {
        assert_eq!(parse_ring_buffer_kib("64"), Ok(64));
        assert!(parse_ring_buffer_kib("3").is_err());
        assert!(parse_ring_buffer_kib("100").is_err());
        assert!(parse_ring_buffer_kib("many").is_err());
    }

    #[test]
    fn alert_commands_are_split_into_words_without_a_shell() {
        let words = |text: &str| text.parse::<CommandLine>().map(|command| command.0);
        assert_eq!(
            words("notify --to 'on call'"),
            Ok(vec!["notify".into(), "--to".into(), "on call".into()])
        );
        assert!(words("").is_err());
        assert!(words("unterminated 'quote").is_err());
        let needs_alert =
            Cli::try_parse_from(["redis-stallprof", "attach", "--alert-exec", "true"]);
        assert!(needs_alert.is_err(), "--alert-exec requires --alert");
        let parsed = Cli::try_parse_from([
            "redis-stallprof",
            "attach",
            "--alert",
            "100ms",
            "--alert-exec",
            "notify 'a b'",
        ]);
        let Ok(Cli {
            command: Command::Attach(args),
            ..
        }) = parsed
        else {
            panic!("{parsed:?}")
        };
        assert_eq!(
            args.alert_exec,
            Some(CommandLine(vec!["notify".into(), "a b".into()]))
        );
    }

    #[test]
    fn dash_means_stdout() {
        assert_eq!("-".parse(), Ok(OutputPath::Stdout));
        assert_eq!("a.jsonl".parse(), Ok(OutputPath::File("a.jsonl".into())));
    }

    #[test]
    fn all_excludes_naming_targets_and_follow_needs_a_port() {
        for flags in [
            &["--all", "--pid", "1"][..],
            &["--all", "--port", "2"],
            &["--no-wait"],
            &["--follow", "--pid", "1"],
        ] {
            let parsed = Cli::try_parse_from(["redis-stallprof", "attach"].iter().chain(flags));
            assert!(parsed.is_err(), "{flags:?}");
        }
        let several =
            Cli::try_parse_from(["redis-stallprof", "attach", "--pid", "1", "--port", "2"]);
        assert!(several.is_ok());
    }
}
