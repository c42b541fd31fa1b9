//! Outputs: the records a run produces and the sinks that write them (console lines on stderr,
//! JSON lines to a file or stdout). Every sink sees every record, in order.
use std::{io, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
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
    /// samples it could not keep.
    pub lost_events: u64,
    pub duration_s: f64,
    pub stopped: StopReason,
    /// Every thread's madvise calls, per thread role and advice.
    #[serde(default)]
    pub madvise: Vec<MadviseSummary>,
    /// Stalls per origin and mechanism, most total time first.
    #[serde(default)]
    pub causes: Vec<CauseSummary>,
    /// With `--alert`: alerts given and `--alert-exec` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertCounts>,
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
        let cause = self.causes.entry((stall.origin.clone(), stall.mechanism.clone())).or_insert_with(|| {
            CauseSummary { origin: stall.origin.clone(), mechanism: stall.mechanism.clone(), ..Default::default() }
        });
        cause.stalls += 1;
        cause.total_us += stall.duration_us;
        cause.max_us = cause.max_us.max(stall.duration_us);
    }

    /// Most total time first.
    pub fn summary(&self) -> Vec<CauseSummary> {
        let mut causes: Vec<CauseSummary> = self.causes.values().cloned().collect();
        causes.sort_by(|a, b| b.total_us.cmp(&a.total_us).then_with(|| (&a.origin, &a.mechanism).cmp(&(&b.origin, &b.mechanism))));
        causes
    }
}

/// What a run counted, for its [`Summary`].
#[derive(Debug, Clone, Default)]
pub struct RunCounts {
    pub stalls: u64,
    pub stack_samples: u64,
    pub lost_events: u64,
    pub duration_s: f64,
}

impl Summary {
    pub fn new(
        stats: &IterationStats,
        counts: RunCounts,
        madvise: Vec<MadviseSummary>,
        causes: Vec<CauseSummary>,
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
            lost_events: counts.lost_events,
            duration_s: counts.duration_s,
            stopped,
            madvise,
            causes,
            alerts,
        }
    }
}

/// A destination for a run's records.
pub trait Sink {
    fn attached(&mut self, attached: &Attached) -> io::Result<()>;
    fn stall(&mut self, stall: &Stall) -> io::Result<()>;
    fn alert(&mut self, alert: &Alert) -> io::Result<()>;
    fn interval(&mut self, report: &IntervalReport) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// What to call this sink in an error message.
    fn describe(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to {output}: {source}")]
pub struct OutputError {
    pub output: String,
    pub source: io::Error,
}

/// Every sink of the run.
pub struct Outputs {
    sinks: Vec<Box<dyn Sink>>,
}

impl Outputs {
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> Self {
        Self { sinks }
    }

    fn each(&mut self, mut write: impl FnMut(&mut dyn Sink) -> io::Result<()>) -> Result<(), OutputError> {
        for sink in &mut self.sinks {
            write(sink.as_mut()).map_err(|source| OutputError { output: sink.describe(), source })?;
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

    pub fn interval(&mut self, report: &IntervalReport) -> Result<(), OutputError> {
        self.each(|sink| sink.interval(report))
    }

    /// Writes the summary to every sink that still works; reports the first failure.
    pub fn summary(&mut self, summary: &Summary) -> Result<(), OutputError> {
        let mut first_error = None;
        for sink in &mut self.sinks {
            if let Err(source) = sink.summary(summary) {
                first_error.get_or_insert(OutputError { output: sink.describe(), source });
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
        let stall = |origin: &str, mechanism: &str, duration_us| Stall {
            start: SystemTime::UNIX_EPOCH,
            pid: 1,
            tid: 1,
            duration_us,
            threshold_us: 10_000,
            origin: origin.into(),
            mechanism: mechanism.into(),
            breakdown: Vec::new(),
            on_cpu_us: 0,
            off_cpu_us: 0,
            runqueue_us: 0,
            samples: 0,
            stacks: Vec::new(),
            madvise: Default::default(),
        };
        let mut causes = StallCauses::default();
        causes.add(&stall("cron.querybuf_resize", "allocator.purge", 17_000));
        causes.add(&stall("command:debug", "syscall.sleep", 250_000));
        causes.add(&stall("cron.querybuf_resize", "allocator.purge", 12_000));
        let summary = causes.summary();
        assert_eq!(summary[0].origin, "command:debug");
        assert_eq!((summary[1].stalls, summary[1].total_us, summary[1].max_us), (2, 29_000, 17_000));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration_ns(812_400), "812us");
        assert_eq!(human_duration_ns(12_345_678), "12.3ms");
        assert_eq!(human_duration_ns(1_430_000_000), "1.43s");
        assert_eq!(human_duration_ns(999), "999ns");
    }
}
