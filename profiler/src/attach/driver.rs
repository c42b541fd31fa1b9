//! The driver of a run: a select loop over the ring buffer, the timers, the signals and the
//! deadline, dispatching each to the run's consumers; it ends the targets that exit, watches
//! the ones `--all` finds, and says why the watch stopped.
use std::{
    io,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, Interval, interval_at},
};

use super::{discovery, run::Run};
use crate::{alert::IN_PROGRESS_CHECK_PERIOD, config::RunConfig, output::record::StopReason};

/// How often we check that the target still runs.
const LIVENESS_PERIOD: Duration = Duration::from_millis(200);
/// How often the accept-queue watch re-reads the target's listeners and reports the drops that
/// belong to no stall.
const ACCEPT_HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// How often the metrics take in the kernel's iteration histogram.
const METRICS_REFRESH_PERIOD: Duration = Duration::from_secs(1);
/// With `--all`, how often to look for Redis servers that started.
const DISCOVERY_PERIOD: Duration = Duration::from_millis(500);

/// SIGINT and SIGTERM received so far (see [`quit_on_second_signal`]).
static STOP_SIGNALS: AtomicU32 = AtomicU32::new(0);

/// Makes a second SIGINT or SIGTERM end the process at once (exit code 130). The first asks
/// the run to stop and write its summaries and files, which takes a while with many targets,
/// or for ever on an output that blocks (a full pipe, a hung file system): the second does not
/// wait for that. The kernel detaches the programs when the process ends. Installed once,
/// when the run's own handlers are (before them, a first signal would go unseen).
fn quit_on_second_signal() -> io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| result = install_second_signal_action());
    result
}

fn install_second_signal_action() -> io::Result<()> {
    const MESSAGE: &[u8] =
        b"redis-stallprof: second signal: quitting without finishing the outputs\n";
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only does what a signal handler may: an atomic add, write(2)
        // and _exit(2).
        unsafe {
            signal_hook_registry::register(signal, || {
                if STOP_SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
                    libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
                    libc::_exit(130);
                }
            })
        }?;
    }
    Ok(())
}

/// Says the run is stopping on a signal, and how to stop it sooner.
fn stopping_on_signal() -> StopReason {
    log::warn!("stopping: writing the summaries and files (a second Ctrl-C quits at once)");
    StopReason::Signal
}

/// The timers of a watch.
struct Timers {
    report: Interval,
    liveness: Interval,
    alert_check: Option<Interval>,
    metrics_refresh: Option<Interval>,
    queue_sample: Interval,
    accept_housekeeping: Interval,
    discovery: Option<Interval>,
}

impl Timers {
    fn new(config: &RunConfig, run: &Run, started: Instant) -> Self {
        let every = |period: Duration| interval_at(started + period, period);
        let optional = |enabled: bool, period: Duration| enabled.then(|| every(period));
        Self {
            report: every(config.interval),
            liveness: every(LIVENESS_PERIOD),
            alert_check: optional(config.alert.is_some(), IN_PROGRESS_CHECK_PERIOD),
            metrics_refresh: optional(run.metrics.is_some(), METRICS_REFRESH_PERIOD),
            queue_sample: interval_at(started, config.queue_interval),
            accept_housekeeping: every(ACCEPT_HOUSEKEEPING_PERIOD),
            discovery: optional(config.mode.discovers(), DISCOVERY_PERIOD),
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

/// The ring buffer, registered with the runtime.
pub type Events = AsyncFd<RingBuf<MapData>>;

/// Registers the ring buffer with the runtime.
pub fn register(events: RingBuf<MapData>) -> anyhow::Result<Events> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    unsafe { AsyncFd::register(events) }
        .map_err(|error| error.into_parts().1)
        .context("cannot poll the events ring buffer")
}

/// Drives the run's consumers on the events until the deadline (`remaining`), a signal, or
/// the exit of the last target (of the followed one with `--follow`; never with `--all`).
/// A target that exits otherwise is ended on the way. Drains what is left at the end, and
/// leaves the summaries to the caller (with `--follow` the run goes on).
pub async fn watch(
    run: &mut Run,
    config: &RunConfig,
    events: &mut Events,
    started: Instant,
    remaining: Option<Duration>,
) -> anyhow::Result<StopReason> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    quit_on_second_signal().context("cannot handle SIGINT and SIGTERM")?;
    let mut timers = Timers::new(config, run, started);
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
                let drained = run.drain(guard.get_inner_mut());
                guard.clear_ready();
                drained
            }
            _ = timers.report.tick() => each(run, |consumer| consumer.report_interval(config.interval)),
            () = tick(&mut timers.alert_check) => each(run, |consumer| consumer.check_in_progress()),
            () = tick(&mut timers.metrics_refresh) => each(run, |consumer| consumer.refresh_histogram()),
            _ = timers.queue_sample.tick() => each(run, |consumer| consumer.sample_accept_queues()),
            _ = timers.accept_housekeeping.tick() => run
                .accept_housekeeping(events.get_mut())
                .and_then(|()| run.release_quiet_fault_programs()),
            () = tick(&mut timers.discovery) => {
                discovery::watch_new_servers(run);
                Ok(())
            }
            _ = timers.liveness.tick() => {
                run.flush_kernel_log();
                match end_exited(run, config, events.get_mut()) {
                    Ok(Some(stopped)) => break stopped,
                    Ok(None) => Ok(()),
                    Err(error) => Err(error),
                }
            }
            () = &mut deadline => break StopReason::Duration,
            _ = sigint.recv() => break stopping_on_signal(),
            _ = sigterm.recv() => break stopping_on_signal(),
            _ = sighup.recv() => each(run, |consumer| consumer.outputs.reopen().map_err(Into::into)),
        };
        if let Err(error) = step {
            run.finish_after_error();
            return Err(error);
        }
    };
    run.drain(events.get_mut())?;
    Ok(stopped)
}

/// Runs `step` on every consumer of `run`; stops at the first error.
fn each(
    run: &mut Run,
    mut step: impl FnMut(&mut super::consumer::Consumer) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    run.consumers.iter_mut().try_for_each(&mut step)
}

/// Ends the targets that exited (after taking in their last events), and says whether the
/// watch stops: when the followed target exited (`--follow`: it is not ended, the next process
/// on its port takes its place), or the last target did (not with `--all`).
fn end_exited(
    run: &mut Run,
    config: &RunConfig,
    events: &mut RingBuf<MapData>,
) -> anyhow::Result<Option<StopReason>> {
    let exited = run.exited();
    if exited.is_empty() {
        return Ok(None);
    }
    run.drain(events)?;
    if config.mode.followed_port().is_some() {
        return Ok(Some(StopReason::TargetExited));
    }
    for index in exited {
        run.end_exited(index)?;
    }
    Ok((run.consumers.is_empty() && !config.mode.discovers()).then_some(StopReason::TargetExited))
}

/// What is left of `--duration` since `started`.
pub fn remaining(config: &RunConfig, started: Instant) -> Option<Duration> {
    config
        .duration
        .map(|duration| duration.saturating_sub(started.elapsed()))
}
