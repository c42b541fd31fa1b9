//! Outputs: the records a run produces and the sinks that write them (console lines on stderr,
//! JSON lines to a file or stdout). Every sink sees every record, in order.
use std::{io, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    accept::{AcceptOverflow, AcceptSummary},
    alert::{Alert, AlertCounts},
    clock::serialize_rfc3339,
    histogram::IterationStats,
    madvise::MadviseSummary,
    stall::Stall,
};

mod console;
mod json;
mod stacks;

pub use console::ConsoleSink;
pub use json::JsonSink;
pub use stacks::{FoldedStacks, StackFilesSink, flamegraph_title};

/// Sent once every probe is live.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    #[serde(serialize_with = "serialize_rfc3339")]
    pub time: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub threshold_us: u64,
    /// `comm` of the target.
    pub name: String,
    /// TCP ports the target listens on.
    pub ports: Vec<u16>,
    /// Whether polls from inside long commands (`processEventsWhileBlocked`) are recognised.
    pub nested_poll_tracking: bool,
}

/// One `--interval` period.
#[derive(Debug, Clone)]
pub struct IntervalReport {
    pub seconds: f64,
    pub stats: IterationStats,
    pub stalls: u64,
    pub lost_events: u64,
}

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
    causes: std::collections::BTreeMap<(String, String), CauseSummary>,
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

/// What a run counted, for its [`Summary`].
#[derive(Debug, Clone, Default)]
pub struct RunCounts {
    pub stalls: u64,
    pub stack_samples: u64,
    pub lost: LostEvents,
    pub duration_s: f64,
    pub profiler: ProfilerCost,
}

/// Events lost, by kind and reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostEvents {
    /// Stall events the kernel could not send (ring buffer full).
    pub stall_events: u64,
    /// Stack events (on- and off-CPU) the kernel could not send.
    pub stack_events: u64,
    /// madvise events the kernel could not send.
    pub madvise_events: u64,
    /// madvise calls not timed (too many in flight).
    pub madvise_untracked: u64,
    /// Connection and accept events the kernel could not send.
    #[serde(default)]
    pub connection_events: u64,
    /// Exec events of the target the kernel could not send.
    #[serde(default)]
    pub exec_events: u64,
    /// Records userspace could not decode.
    pub undecodable: u64,
    /// Stack samples userspace could not keep (too many pending).
    pub samples_not_kept: u64,
}

impl LostEvents {
    pub fn total(&self) -> u64 {
        self.stall_events
            + self.stack_events
            + self.madvise_events
            + self.madvise_untracked
            + self.connection_events
            + self.exec_events
            + self.undecodable
            + self.samples_not_kept
    }
}

impl Summary {
    pub fn new(
        stats: &IterationStats,
        counts: RunCounts,
        madvise: Vec<MadviseSummary>,
        causes: Vec<CauseSummary>,
        accept: Option<AcceptSummary>,
        alerts: Option<AlertCounts>,
        stopped: StopReason,
    ) -> Self {
        Self {
            iterations: stats.iterations,
            stalls: counts.stalls,
            stack_samples: counts.stack_samples,
            p50_us: stats.p50_ns / 1_000,
            p99_us: stats.p99_ns / 1_000,
            p999_us: stats.p999_ns / 1_000,
            max_us: stats.max_ns / 1_000,
            lost_events: counts.lost.total(),
            lost: counts.lost,
            duration_s: counts.duration_s,
            stopped,
            madvise,
            causes,
            accept,
            alerts,
            profiler: counts.profiler,
        }
    }
}

/// A destination for a run's records.
pub trait Sink {
    fn attached(&mut self, attached: &Attached) -> io::Result<()>;
    fn stall(&mut self, stall: &Stall) -> io::Result<()>;
    fn alert(&mut self, alert: &Alert) -> io::Result<()>;
    /// Connections dropped with a full accept queue outside any stall.
    fn accept_overflow(&mut self, overflow: &AcceptOverflow) -> io::Result<()>;
    fn interval(&mut self, report: &IntervalReport) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// What to call this sink in an error message.
    fn describe(&self) -> String;
    /// Reopens files by their paths (SIGHUP, after log rotation).
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to {output}: {cause}")]
pub struct OutputError {
    pub output: String,
    pub cause: io::Error,
}

/// Every sink of the run.
pub struct Outputs {
    sinks: Vec<Box<dyn Sink>>,
}

impl Outputs {
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> Self {
        Self { sinks }
    }

    fn each(
        &mut self,
        mut write: impl FnMut(&mut dyn Sink) -> io::Result<()>,
    ) -> Result<(), OutputError> {
        for sink in &mut self.sinks {
            write(sink.as_mut()).map_err(|cause| OutputError {
                output: sink.describe(),
                cause,
            })?;
        }
        Ok(())
    }

    pub fn attached(&mut self, attached: &Attached) -> Result<(), OutputError> {
        self.each(|sink| sink.attached(attached))
    }

    pub fn stall(&mut self, stall: &Stall) -> Result<(), OutputError> {
        self.each(|sink| sink.stall(stall))
    }

    pub fn alert(&mut self, alert: &Alert) -> Result<(), OutputError> {
        self.each(|sink| sink.alert(alert))
    }

    pub fn accept_overflow(&mut self, overflow: &AcceptOverflow) -> Result<(), OutputError> {
        self.each(|sink| sink.accept_overflow(overflow))
    }

    pub fn interval(&mut self, report: &IntervalReport) -> Result<(), OutputError> {
        self.each(|sink| sink.interval(report))
    }

    /// Reopens every sink's files (SIGHUP).
    pub fn reopen(&mut self) -> Result<(), OutputError> {
        self.each(|sink| sink.reopen())
    }

    /// Writes the summary to every sink that still works; reports the first failure.
    pub fn summary(&mut self, summary: &Summary) -> Result<(), OutputError> {
        let mut first_error = None;
        for sink in &mut self.sinks {
            if let Err(cause) = sink.summary(summary) {
                first_error.get_or_insert(OutputError {
                    output: sink.describe(),
                    cause,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// `812us`, `12.3ms`, `1.43s`: a duration for people.
pub fn human_duration_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}us", ns / 1_000),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
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
    fn durations_read_naturally() {
        assert_eq!(human_duration_ns(812_400), "812us");
        assert_eq!(human_duration_ns(12_345_678), "12.3ms");
        assert_eq!(human_duration_ns(1_430_000_000), "1.43s");
        assert_eq!(human_duration_ns(999), "999ns");
    }
}
