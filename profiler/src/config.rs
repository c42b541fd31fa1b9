//! The one conversion from `attach`'s checked flags to a run's configuration: which target,
//! the attribution rules, the kernel programs' settings, the outputs, the metrics address and
//! the alerts. Everything that can be refused before attaching (a rules file, an alert
//! program) is refused here.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use profiler_common::TargetSettings;

use crate::{
    alert::{AlertSettings, ExecSettings, find_program},
    attribute::{Rules, RulesError},
    cli::{AttachArgs, ClientsMode, OutputPath, ProbeMode, StackRoot},
    probes::ProbeSettings,
    stall::StallSettings,
    target::TargetSelector,
};

/// On-CPU sampling frequency when the threshold leaves room for it.
const DEFAULT_FREQUENCY_HZ: u64 = 999;
/// Highest sampling frequency chosen for a short threshold (each sample costs the event loop a
/// program run while it runs).
const MAX_DERIVED_FREQUENCY_HZ: u64 = 10_000;
/// Sampling periods in the part of a stall just past the threshold that is sampled (from the
/// gate to the threshold): any span of one period holds a tick of the thread's CPU clock, so
/// two leave room for the clock's jitter and every stall on the CPU carries a stack.
const SAMPLES_PER_SAMPLED_SPAN: u64 = 2;
/// The shortest time off the CPU recorded with its stacks, by default ...
const DEFAULT_MIN_BLOCK: Duration = Duration::from_millis(1);
/// ... or this fraction of a threshold shorter than ten times that.
const MIN_BLOCK_PER_THRESHOLD: u32 = 10;

/// The sampling frequency for a run with this threshold and gate: 999 Hz, or enough for
/// [`SAMPLES_PER_SAMPLED_SPAN`] samples between the gate and the threshold.
fn derived_frequency_hz(threshold_ns: u64, gate_ns: u64) -> u64 {
    let sampled_ns = threshold_ns.saturating_sub(gate_ns).max(1);
    let wanted = (SAMPLES_PER_SAMPLED_SPAN * 1_000_000_000).div_ceil(sampled_ns);
    wanted.clamp(DEFAULT_FREQUENCY_HZ, MAX_DERIVED_FREQUENCY_HZ)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error("--follow follows one port: give a single --port")]
    FollowOnePort,
    #[error("--alert-exec: program `{program}` not found")]
    AlertProgramNotFound { program: String },
}

/// How the kernel programs are tuned, whatever the target (see [`ProbeSettings`]).
#[derive(Debug, Clone, Copy)]
pub struct ProbeTuning {
    pub threshold_ns: u64,
    pub gate_ns: u64,
    pub min_block_ns: u64,
    pub user_stack_bytes: u32,
    pub ring_buffer_bytes: u32,
    /// On-CPU sampling frequency.
    pub frequency_hz: u64,
    /// Targets the kernel's maps have room for.
    pub max_targets: u32,
    /// At most one page-fault sample per this long per target; `None`: page faults are not
    /// traced.
    pub fault_sample_interval_ns: Option<u64>,
    /// Host-wide scheduler and fault programs even where per-thread events would do.
    pub host_wide: bool,
    /// `--clients exact`: the event-loop thread's reads are followed.
    pub exact_clients: bool,
}

impl ProbeTuning {
    /// The settings of the programs; `sole_target`: the (pid, loop tid) of the one process
    /// the run watches for its whole life, if so.
    pub fn probe_settings(&self, sole_target: Option<(u32, u32)>) -> ProbeSettings {
        ProbeSettings {
            user_stack_bytes: self.user_stack_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            max_targets: self.max_targets,
            sole_target,
            host_wide: self.host_wide,
        }
    }

    /// The settings for the process `pid` whose event loop runs on thread `tid`.
    pub fn for_target(&self, pid: u32, tid: u32) -> TargetSettings {
        TargetSettings {
            pid,
            loop_tid: tid,
            threshold_ns: self.threshold_ns,
            gate_ns: self.gate_ns,
            min_block_ns: self.min_block_ns,
            fault_sample_interval_ns: self.fault_sample_interval_ns.unwrap_or(0),
        }
    }
}

/// Where the run's records go, besides the console.
#[derive(Debug, Clone, Default)]
pub struct OutputPaths {
    pub json: Option<OutputPath>,
    pub folded: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    pub pprof: Option<PathBuf>,
    /// The HTML report, written at each summary.
    pub html: Option<PathBuf>,
    pub stack_root: StackRoot,
    /// The memory growth's stacks: folded lines and a flamegraph.
    pub memory_folded: Option<PathBuf>,
    pub memory_flamegraph: Option<PathBuf>,
}

/// Which processes a run watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These, found at the start (the only Redis running when none is named).
    Targets(Vec<TargetSelector>),
    /// Every Redis server, and each that starts later; with `wait`, none running yet is fine.
    All { wait: bool },
}

/// How a run watches, made once from the flags: what the kernel programs are given, whether
/// records name their instance, when the run attaches again and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// One process for the whole run: the programs compare with its ids (no map lookups).
    Sole,
    /// One port (`--follow`): when its process exits, the next one on it is watched.
    FollowedPort(u16),
    /// Several processes named at the start (`--pid`, `--port` repeated).
    Several,
    /// Every Redis server on the host, found again every half second (`--all`).
    All,
}

impl RunMode {
    /// Whether the run may watch several instances, so every record and stack names its own.
    pub fn names_instances(self) -> bool {
        matches!(self, Self::Several | Self::All)
    }

    /// Whether the run attaches to processes after its start (it keeps what that needs).
    pub fn attaches_later(self) -> bool {
        matches!(self, Self::FollowedPort(_) | Self::All)
    }

    /// Whether the run looks for new servers and goes on when every target has exited.
    pub fn discovers(self) -> bool {
        self == Self::All
    }

    /// The port whose next process the run follows.
    pub fn followed_port(self) -> Option<u16> {
        match self {
            Self::FollowedPort(port) => Some(port),
            _ => None,
        }
    }
}

/// An `attach` run, checked.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Which processes to watch at the start.
    pub selection: Selection,
    pub mode: RunMode,
    /// Profile a process that is not a Redis server.
    pub force: bool,
    pub probes: ProbeTuning,
    pub stall: StallSettings,
    pub outputs: OutputPaths,
    pub metrics: Option<SocketAddr>,
    pub alert: Option<AlertSettings>,
    /// How often the console gets an interval line.
    pub interval: Duration,
    /// How often the accept queues are sampled.
    pub queue_interval: Duration,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

impl RunConfig {
    /// The run `args` ask for; reads the rules file and looks the alert program up.
    pub fn from_args(args: &AttachArgs) -> Result<Self, ConfigError> {
        let rules = match &args.rules {
            Some(path) => Rules::load(path)?,
            None => Rules::builtin(),
        };
        let selection = if args.all {
            Selection::All {
                wait: !args.no_wait,
            }
        } else {
            let selectors: Vec<TargetSelector> =
                (args.pid.iter().copied().map(TargetSelector::Pid))
                    .chain(args.port.iter().copied().map(TargetSelector::Port))
                    .collect();
            if selectors.is_empty() {
                Selection::Targets(vec![TargetSelector::Only])
            } else {
                Selection::Targets(selectors)
            }
        };
        if args.follow && args.port.len() > 1 {
            return Err(ConfigError::FollowOnePort);
        }
        let mode = match (&selection, args.port.first()) {
            (Selection::All { .. }, _) => RunMode::All,
            (_, Some(&port)) if args.follow => RunMode::FollowedPort(port),
            (Selection::Targets(selectors), _) if selectors.len() > 1 => RunMode::Several,
            (Selection::Targets(_), _) => RunMode::Sole,
        };
        let nanos = |duration: Duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let gate_ns = nanos(args.gate.unwrap_or(args.threshold / 2));
        let frequency_hz = args
            .freq
            .unwrap_or_else(|| derived_frequency_hz(nanos(args.threshold), gate_ns));
        let min_block = args
            .min_block
            .unwrap_or(DEFAULT_MIN_BLOCK.min(args.threshold / MIN_BLOCK_PER_THRESHOLD));
        let alert = match args.alert {
            Some(threshold) => Some(AlertSettings {
                threshold,
                exec: args
                    .alert_exec
                    .as_ref()
                    .map(|command| alert_exec(args, &command.0))
                    .transpose()?,
            }),
            None => None,
        };
        Ok(Self {
            selection,
            mode,
            force: args.force,
            probes: ProbeTuning {
                threshold_ns: nanos(args.threshold),
                gate_ns,
                min_block_ns: nanos(min_block),
                user_stack_bytes: args.stack_bytes,
                ring_buffer_bytes: args.ring_buffer_kib * 1024,
                max_targets: args.max_targets,
                frequency_hz,
                fault_sample_interval_ns: (!args.no_memory)
                    .then(|| nanos(args.fault_sample_interval)),
                host_wide: args.probes == ProbeMode::HostWide,
                exact_clients: args.clients == ClientsMode::Exact,
            },
            stall: StallSettings {
                threshold: args.threshold,
                frequency_hz,
                rules,
            },
            outputs: OutputPaths {
                json: args.json.clone(),
                folded: args.folded.clone(),
                flamegraph: args.flamegraph.clone(),
                pprof: args.pprof.clone(),
                html: args.html.clone(),
                stack_root: args.stack_root,
                memory_folded: args.memory_folded.clone(),
                memory_flamegraph: args.memory_flamegraph.clone(),
            },
            metrics: args.metrics,
            alert,
            interval: args.interval,
            queue_interval: args.queue_interval,
            duration: args.duration,
        })
    }
}

/// `--alert-exec`'s settings, once its program is found.
fn alert_exec(args: &AttachArgs, argv: &[String]) -> Result<ExecSettings, ConfigError> {
    let program = argv.first().cloned().unwrap_or_default();
    if find_program(&program).is_none() {
        return Err(ConfigError::AlertProgramNotFound { program });
    }
    Ok(ExecSettings {
        argv: argv.to_vec(),
        timeout: args.alert_timeout,
        max_per_minute: args.alert_max_per_minute,
        user: args.alert_user,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(flags: &[&str]) -> Result<RunConfig, ConfigError> {
        let cli = Cli::try_parse_from(["redis-stallprof", "attach"].iter().chain(flags)).unwrap();
        let Command::Attach(args) = cli.command else {
            unreachable!("attach was parsed")
        };
        RunConfig::from_args(&args)
    }

    #[test]
    fn the_gate_defaults_to_half_the_threshold_and_follow_needs_its_port() {
        let run = config(&["--port", "6379", "--follow", "--threshold", "4ms"]).unwrap();
        assert_eq!(run.probes.gate_ns, 2_000_000);
        assert_eq!(run.mode, RunMode::FollowedPort(6379));
        assert_eq!(
            run.selection,
            Selection::Targets(vec![TargetSelector::Port(6379)])
        );
        assert_eq!(
            config(&[]).unwrap().selection,
            Selection::Targets(vec![TargetSelector::Only])
        );
        assert!(matches!(
            config(&["--port", "1", "--port", "2", "--follow"]),
            Err(ConfigError::FollowOnePort)
        ));
    }

    #[test]
    fn several_targets_or_all_of_them_can_be_selected() {
        assert_eq!(
            config(&["--pid", "7", "--port", "6380", "--pid", "8"])
                .unwrap()
                .selection,
            Selection::Targets(vec![
                TargetSelector::Pid(7),
                TargetSelector::Pid(8),
                TargetSelector::Port(6380)
            ])
        );
        assert_eq!(
            config(&["--all"]).unwrap().selection,
            Selection::All { wait: true }
        );
        assert_eq!(
            config(&["--all", "--no-wait"]).unwrap().selection,
            Selection::All { wait: false }
        );
        let modes = [
            (&["--pid", "7"][..], RunMode::Sole),
            (&[][..], RunMode::Sole),
            (&["--pid", "7", "--pid", "8"][..], RunMode::Several),
            (&["--all"][..], RunMode::All),
        ];
        for (flags, mode) in modes {
            assert_eq!(config(flags).unwrap().mode, mode, "{flags:?}");
        }
    }

    #[test]
    fn a_short_threshold_samples_faster_and_keeps_shorter_blocks() {
        let default = config(&[]).unwrap();
        assert_eq!(default.probes.frequency_hz, 999);
        assert_eq!(default.probes.min_block_ns, 1_000_000);
        let short = config(&["--threshold", "1ms"]).unwrap();
        // Two samples in the half millisecond between the gate and the threshold.
        assert_eq!(short.probes.frequency_hz, 4_000);
        assert_eq!(short.probes.min_block_ns, 100_000);
        assert_eq!(
            config(&["--threshold", "200us"])
                .unwrap()
                .probes
                .frequency_hz,
            10_000
        );
        let chosen = config(&["--threshold", "1ms", "--freq", "99", "--min-block", "2ms"]).unwrap();
        assert_eq!(
            (chosen.probes.frequency_hz, chosen.probes.min_block_ns),
            (99, 2_000_000)
        );
    }

    #[test]
    fn an_alert_program_that_does_not_exist_is_refused() {
        let error = config(&["--alert", "1s", "--alert-exec", "/nonexistent/notify --now"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "--alert-exec: program `/nonexistent/notify` not found"
        );
        let run = config(&["--alert", "1s", "--alert-exec", "sh -c true"]).unwrap();
        assert_eq!(
            run.alert
                .and_then(|alert| alert.exec)
                .map(|exec| exec.argv.len()),
            Some(3)
        );
    }
}
