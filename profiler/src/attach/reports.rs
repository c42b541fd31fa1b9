//! The records a consumer writes on the driver's ticks and at its end: the interval line, the
//! memory growth and the connection census of each interval, the `attached` record, and the
//! summary with the losses and the profiler's own cost.
use std::time::Duration;

use profiler_common::{COUNTERS, Counter};
use tokio::time::Instant;

use super::consumer::Consumer;
use crate::{
    alert::Alerting,
    memory::{FaultCounts, status_kib},
    output::{
        Sink,
        record::{
            Attached, IntervalReport, LostEvents, ProfilerCost, StopReason, Summary, UserLoss,
        },
    },
    probes::ProbeError,
};

impl Consumer {
    /// The kernel's fault counts of the target over the run.
    fn fault_counts(&self) -> Result<FaultCounts, ProbeError> {
        FaultCounts::read(|counter| self.counter(counter))
    }

    /// The interval's memory growth and the connection census, when there is something to
    /// tell.
    fn report_memory_and_connections(&mut self, seconds: f64) -> anyhow::Result<()> {
        let faults = self.fault_counts()?;
        let memory = self
            .memory
            .as_mut()
            .and_then(|memory| memory.take_interval(faults, seconds));
        if let Some(mut report) = memory {
            report.instance = self.instance.clone();
            if let Some(metrics) = &self.metrics {
                metrics.observe_memory(&report.growth);
            }
            self.outputs.memory(&report)?;
        }
        if let Some(mut census) = self.accept.census(seconds) {
            census.instance = self.instance.clone();
            if let Some(metrics) = &self.metrics {
                metrics.observe_connections(&census);
            }
            self.outputs.connections(&census)?;
        }
        Ok(())
    }

    /// The interval line, memory growth and connection census.
    pub fn report_interval(&mut self, interval: Duration) -> anyhow::Result<()> {
        self.refresh_histogram()?;
        let lost = self.lost_events()?.total();
        let report = IntervalReport {
            instance: self.instance.clone(),
            seconds: interval.as_secs_f64(),
            stats: self.histogram.take_interval(),
            stalls: std::mem::take(&mut self.interval_stalls),
            lost_events: lost - self.reported_lost,
        };
        self.reported_lost = lost;
        self.outputs.interval(&report)?;
        self.interval_started = Instant::now();
        self.report_memory_and_connections(interval.as_secs_f64())
    }

    /// The `attached` record of the current target.
    pub fn attached_record(&self) -> Attached {
        Attached {
            instance: self.instance.clone(),
            time: std::time::SystemTime::now(),
            pid: self.target.pid,
            tid: self.target.main_tid,
            threshold_us: self.threshold.as_micros() as u64,
            name: self.target.name.clone(),
            ports: self.target.ports.clone(),
            nested_poll_tracking: self
                .attachment
                .as_ref()
                .is_some_and(|attachment| attachment.nested_poll_tracking),
        }
    }

    /// After the last events of the current target were drained: its last iterations and
    /// accept figures (before its maps go).
    pub fn flush_target(&mut self) -> anyhow::Result<()> {
        self.refresh_histogram()?;
        self.sample_accept_queues();
        self.report_overflows_before(u64::MAX)?;
        log::info!(
            "{}: kernel counters: {}",
            self.instance,
            Counter::ALL
                .iter()
                .filter(|counter| counter.loss_key().is_none())
                .map(|&counter| format!(
                    "{} {}",
                    counter.description(),
                    self.counter(counter).unwrap_or(0)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        Ok(())
    }

    /// Ends the run: the last interval's memory growth and census, then the summary on every
    /// output.
    pub fn end(&mut self, stopped: StopReason) -> anyhow::Result<StopReason> {
        self.report_last_interval()?;
        self.write_summary(stopped)?;
        Ok(stopped)
    }

    /// The memory growth and census of the interval that ends with the run.
    pub fn report_last_interval(&mut self) -> anyhow::Result<()> {
        let since_last_interval = self.interval_started.elapsed().as_secs_f64();
        self.report_memory_and_connections(since_last_interval)
    }

    /// The summary, on every output.
    pub fn write_summary(&mut self, stopped: StopReason) -> anyhow::Result<()> {
        let summary = self.summary(stopped)?;
        self.outputs.summary(&summary)?;
        Ok(())
    }

    /// Best effort after a failure: the summary on `sink` alone.
    pub fn finish_after_error(&mut self, sink: &mut dyn Sink) {
        let _ = self.refresh_histogram();
        if let Ok(summary) = self.summary(StopReason::Error) {
            let _ = sink.summary(&summary);
        }
    }

    /// Events the kernel could not send, records that did not decode, samples not kept.
    pub(super) fn lost_events(&self) -> Result<LostEvents, ProbeError> {
        let mut kernel = [0; COUNTERS as usize];
        for counter in Counter::ALL {
            kernel[counter.index() as usize] = self.counter(counter)?;
        }
        let counts = self.stalls.counts();
        Ok(LostEvents::new(
            |counter| kernel[counter.index() as usize],
            |loss| match loss {
                UserLoss::StacksCutShort => counts.stacks_cut_short,
                UserLoss::SamplesNotKept => counts.samples_not_kept,
                UserLoss::MadviseNotKept => counts.madvise_not_kept,
            },
        ))
    }

    fn summary(&mut self, stopped: StopReason) -> Result<Summary, ProbeError> {
        let mut summary = Summary::new(&self.histogram.total(), self.lost_events()?, stopped);
        summary.instance = self.instance.clone();
        summary.stalls = self.causes.stalls();
        summary.stack_samples = self.stalls.counts().received_samples;
        summary.duration_s = self.started.elapsed().as_secs_f64();
        summary.madvise = self.madvise.summary();
        summary.causes = self.causes.summary();
        summary.accept = Some(self.accept.summary());
        summary.alerts = self.alerting.as_ref().map(Alerting::counts);
        summary.profiler = self.profiler_cost();
        let faults = self.fault_counts()?;
        if let Some(memory) = &mut self.memory {
            summary.memory = Some(memory.run_growth(faults));
        }
        summary.connections = Some(self.accept.census_totals());
        summary.run_lost = self.run_losses.get();
        Ok(summary)
    }

    /// The work on stacks so far, and the profiler's peak memory.
    fn profiler_cost(&self) -> ProfilerCost {
        let (assembly, work) = (self.stalls.counts(), self.stalls.work());
        ProfilerCost {
            stacks_unwound: assembly.stacks_unwound,
            unwind_us: assembly.unwind.as_micros() as u64,
            samples_symbolized: work.samples_symbolized,
            symbolize_us: work.symbolize.as_micros() as u64,
            peak_rss_kib: peak_rss_kib(),
        }
    }
}

/// This process's peak resident memory, in KiB; 0 if unknown. The larger of `VmHWM` and
/// `VmRSS` in `/proc/self/status`: the kernel updates the high-water mark only when memory is
/// unmapped, so it can lag behind the current size.
fn peak_rss_kib() -> u64 {
    let kib = |field| status_kib("/proc/self/status", field).unwrap_or(0);
    kib("VmHWM:").max(kib("VmRSS:"))
}
