//! The records a consumer writes on the driver's ticks and at its end: the interval line, the
//! memory growth and the connection census of each interval, the `attached` record, and the
//! summary with the losses and the profiler's own cost.
use std::time::Duration;

use profiler_common::Counter;

use super::consumer::Consumer;
use crate::{
    alert::Alerting,
    memory::{FaultCounts, status_kib},
    output::{
        Sink,
        record::{Attached, IntervalReport, LostEvents, ProfilerCost, StopReason, Summary},
    },
    probes::ProbeError,
};

impl Consumer {
    /// The kernel's fault counts of the target over the run.
    fn fault_counts(&self) -> Result<FaultCounts, ProbeError> {
        FaultCounts::read(|counter| self.binding.counter(counter))
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
            if let Some(metrics) = &self.metrics {
                metrics.observe_memory(&report.growth);
            }
            self.outputs.memory(&mut report)?;
        }
        if let Some(mut census) = self.accept.census(seconds) {
            if let Some(metrics) = &self.metrics {
                metrics.observe_connections(&census);
            }
            self.outputs.connections(&mut census)?;
        }
        Ok(())
    }

    /// The interval line, memory growth and connection census.
    pub fn report_interval(&mut self, interval: Duration) -> anyhow::Result<()> {
        self.refresh_histogram()?;
        let lost = self.lost_events()?.total();
        let mut report = IntervalReport::new(
            interval.as_secs_f64(),
            self.histogram.take_interval(),
            self.interval.take(),
            self.losses.since_last_report(lost),
        );
        self.outputs.interval(&mut report)?;
        self.report_memory_and_connections(interval.as_secs_f64())
    }

    /// The `attached` record of the current target.
    pub fn attached_record(&self) -> Attached {
        Attached {
            instance: self.outputs.instance().clone(),
            time: std::time::SystemTime::now(),
            pid: self.binding.target.pid,
            tid: self.binding.target.main_tid,
            threshold_us: self.threshold.as_micros() as u64,
            name: self.binding.target.name.clone(),
            ports: self.binding.target.ports.clone(),
            nested_poll_tracking: self
                .binding
                .attachment
                .as_ref()
                .is_some_and(|attachment| attachment.nested_poll_tracking),
            probes: self.host_tax.name().to_owned(),
        }
    }

    /// After the last events of the current target were drained: its last iterations and
    /// accept figures (before its maps go).
    pub fn flush_target(&mut self) -> anyhow::Result<()> {
        self.refresh_histogram()?;
        self.sample_accept_queues()?;
        self.report_overflows_before(u64::MAX)?;
        log::info!(
            "{}: kernel counters: {}",
            self.outputs.instance(),
            Counter::ALL
                .iter()
                .filter(|counter| counter.loss_key().is_none())
                .map(|&counter| format!(
                    "{} {}",
                    counter.description(),
                    self.binding.counter(counter).unwrap_or(0)
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
        let since_last_interval = self.interval.started.elapsed().as_secs_f64();
        self.report_memory_and_connections(since_last_interval)
    }

    /// The summary, on every output.
    pub fn write_summary(&mut self, stopped: StopReason) -> anyhow::Result<()> {
        let mut summary = self.summary(stopped)?;
        self.outputs.summary(&mut summary)?;
        Ok(())
    }

    /// Best effort after a failure: the summary on `sink` alone.
    pub fn finish_after_error(&mut self, sink: &mut dyn Sink) {
        let _ = self.refresh_histogram();
        if let Ok(summary) = self.summary(StopReason::Error) {
            let _ = sink.summary(&summary);
        }
    }

    /// Events the kernel could not send and samples userspace could not keep.
    pub(super) fn lost_events(&self) -> Result<LostEvents, ProbeError> {
        self.losses
            .lost_events(&self.binding, &self.stalls.counts())
    }

    fn summary(&mut self, stopped: StopReason) -> Result<Summary, ProbeError> {
        let mut summary = Summary::new(&self.histogram.total(), self.lost_events()?, stopped);
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
        summary.run_lost = self.losses.of_the_run();
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
