//! The `summary` record, written once at the end of a run, and its parts.
use std::collections::BTreeMap;

use profiler_common::Counter;
use serde::{Deserialize, Serialize};

use super::Stall;
use crate::histogram::IterationStats;

/// Why the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `--duration` elapsed.
    Duration,
    /// SIGINT or SIGTERM.
    Signal,
    /// The target process exited.
    TargetExited,
    /// An error ended the run (the error is printed).
    Error,
}

/// The whole run, at exit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The instance the summary is of (named by the run).
    #[serde(default)]
    pub instance: super::Instance,
    pub iterations: u64,
    pub stalls: u64,
    /// Stack samples (on-CPU ticks and off-CPU records) that reached userspace.
    #[serde(default)]
    pub stack_samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Events the kernel could not send, records userspace could not decode, and stack
    /// samples it could not keep: the total of `lost`.
    pub lost_events: u64,
    /// `lost_events` by kind and reason.
    #[serde(default)]
    pub lost: LostEvents,
    pub duration_s: f64,
    pub stopped: StopReason,
    /// Every thread's madvise calls, per thread role and advice.
    #[serde(default)]
    pub madvise: Vec<MadviseSummary>,
    /// Stalls per origin and mechanism, most total time first.
    #[serde(default)]
    pub causes: Vec<CauseSummary>,
    /// Accept-queue overflows per port and in the namespace (when a TCP listener was watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<AcceptSummary>,
    /// With `--alert`: alerts given and `--alert-exec` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertCounts>,
    /// What the run cost the profiler itself.
    #[serde(default)]
    pub profiler: ProfilerCost,
    /// Resident-memory growth over the run by origin (unless `--no-memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<super::MemoryGrowth>,
    /// The client connections over the run (when a TCP listener was watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<super::ConnectionTotals>,
    /// What the run lost that belongs to no watched instance (the same in every summary of
    /// the run).
    #[serde(default)]
    pub run_lost: RunLosses,
}

/// Records of the ring buffer no instance can be charged with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLosses {
    /// Records that did not decode (they name no target).
    pub undecodable: u64,
    /// Events of a target whose watch had ended (sent as it exited).
    pub of_ended_targets: u64,
}

impl Summary {
    /// A summary of `stats` (the run's iterations) that stopped for `stopped`; the other
    /// parts are filled in by the caller.
    pub fn new(stats: &IterationStats, lost: LostEvents, stopped: StopReason) -> Self {
        Self {
            instance: super::Instance::default(),
            iterations: stats.iterations,
            stalls: 0,
            stack_samples: 0,
            p50_us: stats.p50_ns / 1_000,
            p99_us: stats.p99_ns / 1_000,
            p999_us: stats.p999_ns / 1_000,
            max_us: stats.max_ns / 1_000,
            lost_events: lost.total(),
            lost,
            duration_s: 0.0,
            stopped,
            madvise: Vec::new(),
            causes: Vec::new(),
            accept: None,
            alerts: None,
            profiler: ProfilerCost::default(),
            memory: None,
            connections: None,
            run_lost: RunLosses::default(),
        }
    }
}

/// What a run cost the profiler itself: its work on stacks, and its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfilerCost {
    /// Stack events whose user stack was unwound.
    pub stacks_unwound: u64,
    /// Time spent unwinding them, in microseconds.
    pub unwind_us: u64,
    /// Samples whose frames were symbolized (when their stall was assembled).
    pub samples_symbolized: u64,
    /// Time spent symbolizing them, in microseconds.
    pub symbolize_us: u64,
    /// The profiler's peak resident memory (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
}

/// The stalls of one origin and mechanism.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseSummary {
    pub origin: String,
    pub mechanism: String,
    pub stalls: u64,
    pub total_us: u64,
    pub max_us: u64,
}

/// Counts stalls per origin and mechanism.
#[derive(Debug, Default)]
pub struct StallCauses {
    causes: BTreeMap<(String, String), CauseSummary>,
}

impl StallCauses {
    pub fn add(&mut self, stall: &Stall) {
        let cause = self
            .causes
            .entry((stall.origin.clone(), stall.mechanism.clone()))
            .or_insert_with(|| CauseSummary {
                origin: stall.origin.clone(),
                mechanism: stall.mechanism.clone(),
                ..Default::default()
            });
        cause.stalls += 1;
        cause.total_us += stall.duration_us;
        cause.max_us = cause.max_us.max(stall.duration_us);
    }

    /// Stalls counted, whatever their cause.
    pub fn stalls(&self) -> u64 {
        self.causes.values().map(|cause| cause.stalls).sum()
    }

    /// Most total time first.
    pub fn summary(&self) -> Vec<CauseSummary> {
        let mut causes: Vec<CauseSummary> = self.causes.values().cloned().collect();
        causes.sort_by(|a, b| {
            b.total_us
                .cmp(&a.total_us)
                .then_with(|| (&a.origin, &a.mechanism).cmp(&(&b.origin, &b.mechanism)))
        });
        causes
    }
}

/// Data userspace itself could not keep (the kernel's losses are [`Counter`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserLoss {
    /// User stacks whose walk needed bytes the copy did not hold.
    StacksCutShort,
    /// Stack samples beyond the pending limit.
    SamplesNotKept,
    /// Event-loop madvise calls beyond the pending limit.
    MadviseNotKept,
}

impl UserLoss {
    pub const ALL: [UserLoss; 3] = [
        UserLoss::StacksCutShort,
        UserLoss::SamplesNotKept,
        UserLoss::MadviseNotKept,
    ];

    /// The key in the summary's `lost` object.
    pub fn key(self) -> &'static str {
        match self {
            Self::StacksCutShort => "stacks_cut_short",
            Self::SamplesNotKept => "samples_not_kept",
            Self::MadviseNotKept => "madvise_not_kept",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::StacksCutShort => {
                "user stacks unwound only part of the way: the walk needed bytes beyond the copy \
                 (an unreadable page, or more than --stack-bytes)"
            }
            Self::SamplesNotKept => "stack samples userspace could not keep (too many pending)",
            Self::MadviseNotKept => {
                "event-loop madvise calls userspace could not keep (too many pending)"
            }
        }
    }
}

/// Data lost, by kind and reason: every kernel [`Counter`] with a loss key and every
/// [`UserLoss`], each present (zero or not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LostEvents(BTreeMap<String, u64>);

impl LostEvents {
    /// The losses given the kernel's counters and userspace's own.
    pub fn new(kernel: impl Fn(Counter) -> u64, user: impl Fn(UserLoss) -> u64) -> Self {
        let kernel = Counter::ALL
            .into_iter()
            .filter_map(|counter| Some((counter.loss_key()?, kernel(counter))));
        let user = UserLoss::ALL
            .into_iter()
            .map(|loss| (loss.key(), user(loss)));
        Self(
            kernel
                .chain(user)
                .map(|(key, count)| (key.to_owned(), count))
                .collect(),
        )
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The non-zero losses: (count, what was lost).
    pub fn described(&self) -> Vec<(u64, &str)> {
        self.0
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(key, count)| (*count, describe_loss(key)))
            .collect()
    }
}

/// What the loss with `key` counts; the key itself when this version does not know it.
fn describe_loss(key: &str) -> &str {
    Counter::ALL
        .into_iter()
        .find(|counter| counter.loss_key() == Some(key))
        .map(Counter::description)
        .or_else(|| {
            UserLoss::ALL
                .into_iter()
                .find(|loss| loss.key() == key)
                .map(UserLoss::description)
        })
        .unwrap_or(key)
}

/// Accept-queue totals of a listening port, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOverflows {
    pub port: u16,
    pub overflows: u64,
    pub max_queue: u32,
    pub limit: u32,
}

/// How long accepted connections waited in the accept queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptWaits {
    /// Connections that entered an accept queue of the target.
    pub connections: u64,
    /// Connections accepted whose entry into the queue was seen.
    pub accepted: u64,
    /// Connections forgotten unaccepted: more waited on a port than any accept queue holds
    /// (their accepts were not seen).
    #[serde(default)]
    pub forgotten: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The accept-queue part of the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptSummary {
    /// Per listening port.
    pub ports: Vec<PortOverflows>,
    /// Change of the namespace's `TcpExtListenOverflows` over the run.
    pub namespace_listen_overflows: u64,
    /// Change of the namespace's `TcpExtListenDrops` over the run.
    pub namespace_listen_drops: u64,
    /// Time connections waited in the accept queues.
    #[serde(default)]
    pub waits: AcceptWaits,
}

/// Counts of alerts for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertCounts {
    #[serde(rename = "final")]
    pub finals: u64,
    pub in_progress: u64,
    /// `--alert-exec` runs started.
    pub exec_runs: u64,
    /// Alerts not given to `--alert-exec` because of `--alert-max-per-minute` (one cap for
    /// the run's targets together).
    pub exec_suppressed: u64,
    /// Alerts dropped because too many already waited for the command.
    #[serde(default)]
    pub exec_dropped: u64,
    /// Runs that could not start, failed, or were killed after the timeout.
    pub exec_failed: u64,
    /// Alerts still waiting for the command when the run ended.
    #[serde(default)]
    pub exec_not_run: u64,
}

/// One line of the madvise summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MadviseSummary {
    pub thread_role: String,
    pub advice: String,
    pub calls: u64,
    pub bytes: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_are_counted_per_cause_most_total_time_first() {
        let stall = Stall::example;
        let mut causes = StallCauses::default();
        causes.add(&stall("cron.querybuf_resize", "allocator.purge", 17_000));
        causes.add(&stall("command:debug", "syscall.sleep", 250_000));
        causes.add(&stall("cron.querybuf_resize", "allocator.purge", 12_000));
        let summary = causes.summary();
        assert_eq!(summary[0].origin, "command:debug");
        assert_eq!(
            (summary[1].stalls, summary[1].total_us, summary[1].max_us),
            (2, 29_000, 17_000)
        );
    }

    #[test]
    fn every_loss_is_listed_with_its_count_and_only_losses_are() {
        let lost = LostEvents::new(
            |counter| match counter {
                Counter::AcceptsUntracked => 3,
                Counter::OffCpuRecordsUnread => 2,
                Counter::BlockingPolls => 1_000,
                _ => 0,
            },
            |loss| u64::from(loss == UserLoss::MadviseNotKept) * 5,
        );
        assert_eq!(lost.total(), 10, "blocking polls are not a loss");
        let json = serde_json::to_value(&lost).unwrap();
        for key in [
            "stall_events",
            "stack_events",
            "madvise_events",
            "madvise_untracked",
            "connection_events",
            "exec_events",
            "kernel_stacks_unread",
            "loop_tasks_untracked",
            "samples_not_kept",
            "stacks_cut_short",
        ] {
            assert_eq!(json[key], 0, "the schema's {key} is still there: {json}");
        }
        assert_eq!(
            (
                json["accepts_untracked"].as_u64(),
                json["off_cpu_records_unread"].as_u64()
            ),
            (Some(3), Some(2))
        );
        let described = lost.described();
        assert_eq!(described.len(), 3);
        assert!(
            described.contains(&(
                2,
                "off-CPU records the kernel could not copy into the ring buffer"
            )),
            "{described:?}"
        );
        let read_back: LostEvents = serde_json::from_value(json).unwrap();
        assert_eq!(read_back, lost);
    }
}
