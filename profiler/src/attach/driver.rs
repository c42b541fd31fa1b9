//! The driver of a run: a select loop over the ring buffer, the timers, the signals and the
//! deadline, dispatching each to the consumer; it says why the watch stopped.
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, Interval, interval_at},
};

use super::consumer::Consumer;
use crate::{
    alert::IN_PROGRESS_CHECK_PERIOD,
    config::RunConfig,
    output::{ConsoleSink, record::StopReason},
};

/// How often we check that the target still runs.
const LIVENESS_PERIOD: Duration = Duration::from_millis(200);
/// How often the accept-queue watch re-reads the target's listeners and reports the drops that
/// belong to no stall.
const ACCEPT_HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// How often the metrics take in the kernel's iteration histogram.
const METRICS_REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// The timers of a watch.
struct Timers {
    report: Interval,
    liveness: Interval,
    alert_check: Option<Interval>,
    metrics_refresh: Option<Interval>,
    queue_sample: Interval,
    accept_housekeeping: Interval,
}

impl Timers {
    fn new(config: &RunConfig, consumer: &Consumer) -> Self {
        let started = consumer.started;
        let every = |period: Duration| interval_at(started + period, period);
        let optional = |enabled: bool, period: Duration| enabled.then(|| every(period));
        Self {
            report: every(config.interval),
            liveness: every(LIVENESS_PERIOD),
            alert_check: optional(consumer.alerting.is_some(), IN_PROGRESS_CHECK_PERIOD),
            metrics_refresh: optional(consumer.metrics.is_some(), METRICS_REFRESH_PERIOD),
            queue_sample: interval_at(started, config.queue_interval),
            accept_housekeeping: every(ACCEPT_HOUSEKEEPING_PERIOD),
        }
    }
}

/// Ticks when `interval` is there, never otherwise.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Drives `consumer` on the events of the current target until the deadline (`remaining`), a
/// signal or the target's exit, then drains what is left and flushes the target's last
/// figures (not the summary: with `--follow` the run goes on).
pub async fn watch(
    consumer: &mut Consumer,
    config: &RunConfig,
    events: RingBuf<MapData>,
    remaining: Option<Duration>,
) -> anyhow::Result<StopReason> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|error| error.into_parts().1)
        .context("cannot poll the events ring buffer")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut timers = Timers::new(config, consumer);
    let deadline = async {
        match remaining {
            Some(remaining) => tokio::time::sleep(remaining).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let stopped = loop {
        let step: anyhow::Result<()> = tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("cannot poll the events ring buffer")?;
                let drained = consumer.drain(guard.get_inner_mut());
                guard.clear_ready();
                drained
            }
            _ = timers.report.tick() => consumer.report_interval(config.interval),
            () = tick(&mut timers.alert_check) => consumer.check_in_progress(),
            () = tick(&mut timers.metrics_refresh) => consumer.refresh_histogram(),
            _ = timers.queue_sample.tick() => {
                consumer.sample_accept_queues();
                Ok(())
            }
            _ = timers.accept_housekeeping.tick() => {
                consumer.report_overflows_outside_stalls(events.get_mut())
            }
            _ = timers.liveness.tick() => {
                consumer.flush_kernel_log();
                if !consumer.target.is_alive() {
                    break StopReason::TargetExited;
                }
                Ok(())
            }
            () = &mut deadline => break StopReason::Duration,
            _ = sigint.recv() => break StopReason::Signal,
            _ = sigterm.recv() => break StopReason::Signal,
            _ = sighup.recv() => consumer.outputs.reopen().map_err(Into::into),
        };
        if let Err(error) = step {
            consumer.finish_after_error(&mut ConsoleSink);
            return Err(error);
        }
    };
    consumer.drain(events.get_mut())?;
    consumer.flush_target()?;
    Ok(stopped)
}

/// What is left of `--duration` since `started`.
pub fn remaining(config: &RunConfig, started: Instant) -> Option<Duration> {
    config
        .duration
        .map(|duration| duration.saturating_sub(started.elapsed()))
}
