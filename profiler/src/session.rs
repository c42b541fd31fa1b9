//! An `attach` run: checked flags -> target found -> outputs opened -> probes attached -> events
//! and histogram drained until a stop condition -> summary.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use profiler_common::{
    COUNTER_BLOCKING_POLLS, COUNTER_BLOCKS_BEFORE_GATE, COUNTER_CONNECTION_EVENTS_LOST,
    COUNTER_EXEC_EVENTS_LOST, COUNTER_MADVISE_EVENTS_LOST, COUNTER_MADVISE_UNTRACKED,
    COUNTER_SHORT_BLOCKS, COUNTER_STACK_EVENTS_LOST, COUNTER_STALL_EVENTS_LOST,
    COUNTER_UNMATCHED_SWITCH_OUTS, COUNTERS, EVENT_KIND_OFF_CPU, StallEvent,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, interval_at},
};

use crate::{
    accept::{
        AcceptSummary, AcceptTracker, ConnectionTracker, QueueSampler, namespace_listen_counters,
    },
    alert::{Alert, AlertCounts, AlertExec, AlertState, ExecSettings, IN_PROGRESS_CHECK_PERIOD},
    attribute::Rules,
    cli::AttachArgs,
    clock::{WallClock, monotonic_now_ns},
    events::{self, Event},
    histogram::IterationHistogram,
    kernel,
    madvise::MadviseStats,
    metrics::{self, Metrics},
    output::{
        Attached, ConsoleSink, IntervalReport, JsonSink, LostEvents, Outputs, ProfilerCost,
        RunCounts, Sink, StackFilesSink, StallCauses, StopReason, Summary, flamegraph_title,
    },
    privileges,
    probes::{KernelMaps, NESTED_POLL_FUNCTION, ProbeSettings, Probes},
    stall::StallAssembler,
    symbolize::{BlazeSymbols, Symbolizer},
    target::{Target, TargetError, TargetSelector},
    unwind::Unwinder,
};

/// How often we check that the target still runs.
const LIVENESS_PERIOD: Duration = Duration::from_millis(200);
/// How long to wait after attaching for the loop's first poll entry: the iteration in progress
/// when the probes attach has no known start, the ones after that entry are timed. An idle
/// Redis polls at least `hz` (10) times a second.
const FIRST_POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// With `--follow`, how often to look for the next process on the port.
const FOLLOW_POLL_PERIOD: Duration = Duration::from_millis(100);

/// How often the accept-queue watch re-reads the target's listeners and reports the drops that
/// belong to no stall.
const ACCEPT_HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// Drops this recent may still belong to a stall whose event is on its way.
const ACCEPT_ATTRIBUTION_DELAY_NS: u64 = 100_000_000;

/// How often the metrics take in the kernel's iteration histogram.
const METRICS_REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// Runs `attach` until `--duration`, a signal or the target's exit.
pub fn run_attach(args: &AttachArgs) -> anyhow::Result<StopReason> {
    let tracepoints = kernel::preflight()?;
    let rules = match &args.rules {
        Some(path) => Rules::load(path)?,
        None => Rules::builtin(),
    };
    let selector = match (args.pid, args.port) {
        (Some(pid), _) => TargetSelector::Pid(pid),
        (None, Some(port)) => TargetSelector::Port(port),
        (None, None) => TargetSelector::Only,
    };
    let target = Target::find(selector, args.force)?;
    let accept_sampler = QueueSampler::open(target.pid)?;
    if !accept_sampler.has_listeners() {
        log::warn!(
            "{target} has no TCP listener (a unix socket only?); accept queues are watched if one appears"
        );
    }
    let sinks = open_sinks(args, &target)?;
    // Bound now, so a busy address is reported before attaching (the run goes on without).
    let metrics_listener = args.metrics.and_then(|address| {
        std::net::TcpListener::bind(address)
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .map_err(|error| {
                log::warn!(
                    "cannot serve metrics on {address}: {error}; profiling goes on without them"
                )
            })
            .ok()
    });

    let (probes, events, maps, nested_poll_tracking) = attach_probes(args, &target, &tracepoints)?;
    wait_for_first_poll(&maps)?;
    // Before the run starts threads of its own: they inherit what is left.
    match privileges::drop_after_attach(args.follow) {
        Ok(dropped) => log::debug!("capabilities dropped after attaching: {dropped:?}"),
        Err(error) => {
            log::warn!("cannot drop capabilities after attaching ({error}); going on with them")
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let clock = WallClock::new();
    let mut assembler = StallAssembler::new(
        target.pid,
        args.threshold,
        args.freq,
        clock,
        Unwinder::new(target.pid),
        Symbolizer::new(Box::new(BlazeSymbols::new(target.pid))),
        rules,
    );
    assembler.warm_up();
    let madvise = MadviseStats::new(target.pid);
    let metrics = metrics_listener
        .as_ref()
        .map(|_| Arc::new(Metrics::new(target.pid, target.ports.first().copied())));
    let alerting = args.alert.map(|threshold| Alerting {
        threshold,
        exec: args.alert_exec.clone().map(|command| {
            AlertExec::start(ExecSettings {
                argv: command.0,
                timeout: args.alert_timeout,
                max_per_minute: args.alert_max_per_minute,
            })
        }),
        counts: AlertCounts::default(),
        alerted_iteration_ns: 0,
    });
    let accept = AcceptWatch {
        sampler: accept_sampler,
        tracker: AcceptTracker::default(),
        connections: ConnectionTracker::new(target.pid),
        namespace_counters_at_start: namespace_listen_counters(target.pid),
        clock,
        sampling_failed: false,
    };
    let mut monitor = Monitor {
        target,
        maps,
        outputs: Outputs::new(sinks),
        histogram: IterationHistogram::default(),
        assembler,
        madvise,
        causes: StallCauses::default(),
        alerting,
        metrics,
        accept,
        interval_stalls: 0,
        decode_errors: 0,
        reported_lost: 0,
        samples_lost_at_last_stall: 0,
        earlier_counters: [0; COUNTERS as usize],
        threshold: args.threshold,
        nested_poll_tracking,
        started: Instant::now(),
    };
    runtime.block_on(async {
        if let (Some(listener), Some(metrics)) = (metrics_listener, &monitor.metrics) {
            let listener =
                tokio::net::TcpListener::from_std(listener).context("cannot serve metrics")?;
            tokio::spawn(metrics::serve(listener, Arc::clone(metrics)));
        }
        let (mut probes, mut events) = (probes, events);
        let started = monitor.started;
        let remaining = || {
            args.duration
                .map(|duration| duration.saturating_sub(started.elapsed()))
        };
        loop {
            let attached = monitor.attached_record();
            if let Err(error) = monitor.outputs.attached(&attached) {
                monitor.finish(StopReason::Error, &mut ConsoleSink);
                return Err(error.into());
            }
            let stopped = monitor
                .watch(events, args.interval, remaining(), args.queue_interval)
                .await?;
            let follow_port = args.port.filter(|_| args.follow);
            let (StopReason::TargetExited, Some(port)) = (stopped, follow_port) else {
                // The summary first: detaching takes a while, and is not part of the run.
                let ended = monitor.end(stopped);
                drop(probes);
                return ended;
            };
            // The probes stayed attached until the last events were drained.
            drop(probes);
            log::warn!(
                "{} exited; waiting for the next process on port {port} (--follow)",
                monitor.target
            );
            let target = match wait_for_listener(port, args.force, remaining()).await {
                Ok(Ok(target)) => target,
                Ok(Err(stopped)) => return monitor.end(stopped),
                Err(error) => {
                    monitor.end(StopReason::Error)?;
                    return Err(error);
                }
            };
            (probes, events) = match monitor.follow(args, target, &tracepoints) {
                Ok(attached) => attached,
                Err(error) => {
                    monitor.end(StopReason::Error)?;
                    return Err(error);
                }
            };
        }
    })
}

/// After the target exited: the next process listening on `port`, as soon as one does; or why
/// the run stops instead (a signal, or the end of `--duration` after `remaining`).
async fn wait_for_listener(
    port: u16,
    force: bool,
    remaining: Option<Duration>,
) -> anyhow::Result<Result<Target, StopReason>> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let deadline = async {
        match remaining {
            Some(remaining) => tokio::time::sleep(remaining).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(FOLLOW_POLL_PERIOD);
    loop {
        tokio::select! {
            _ = poll.tick() => match Target::find(TargetSelector::Port(port), force) {
                Ok(target) => {
                    log::warn!("following {target}");
                    return Ok(Ok(target));
                }
                Err(error @ TargetError::NotRedis { .. }) => return Err(error.into()),
                Err(_) => {}
            },
            () = &mut deadline => return Ok(Err(StopReason::Duration)),
            _ = sigint.recv() => return Ok(Err(StopReason::Signal)),
            _ = sigterm.recv() => return Ok(Err(StopReason::Signal)),
        }
    }
}

/// The run's outputs, opened (files created) before attaching.
fn open_sinks(args: &AttachArgs, target: &Target) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(ConsoleSink)];
    if let Some(path) = &args.json {
        let sink = JsonSink::create(path)
            .with_context(|| format!("cannot write the JSON output {path}"))?;
        sinks.push(Box::new(sink));
    }
    if args.folded.is_some() || args.flamegraph.is_some() {
        let title = flamegraph_title(&target.name, target.pid);
        let sink =
            StackFilesSink::create(args.folded.as_deref(), args.flamegraph.as_deref(), title)
                .context("cannot write the stack files")?;
        sinks.push(Box::new(sink));
    }
    Ok(sinks)
}

/// The kernel programs loaded with the run's settings and attached to the target; the ring
/// buffer, the maps, and whether polls nested in long commands are recognised.
fn attach_probes(
    args: &AttachArgs,
    target: &Target,
    tracepoints: &[String],
) -> anyhow::Result<(Probes, RingBuf<MapData>, KernelMaps, bool)> {
    if (args.ring_buffer_kib as usize) * 1024 < size_of::<profiler_common::StackEvent>() + 8 {
        log::warn!(
            "--ring-buffer-kib {} holds no stack event ({} bytes each): every stack sample will be lost",
            args.ring_buffer_kib,
            size_of::<profiler_common::StackEvent>()
        );
    }
    let nanos = |duration: Duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    let mut probes = Probes::load(ProbeSettings {
        pid: target.pid,
        tid: target.main_tid,
        threshold_ns: nanos(args.threshold),
        gate_ns: nanos(args.gate.unwrap_or(args.threshold / 2)),
        min_block_ns: nanos(args.min_block),
        user_stack_bytes: args.stack_bytes,
        ring_buffer_bytes: args.ring_buffer_kib * 1024,
    })?;
    // The scheduler programs before the poll entries: an iteration the poll timer starts must
    // not miss the switch-out that tells it the loop went idle.
    probes.attach_scheduler()?;
    probes.attach_poll_tracepoints(tracepoints)?;
    probes.attach_madvise()?;
    probes.attach_connections()?;
    probes.attach_sampler(target.main_tid, args.freq)?;
    let nested_poll_tracking =
        match probes.attach_nested_poll_markers(NESTED_POLL_FUNCTION, &target.exe, target.pid) {
            Ok(()) => true,
            Err(error) => {
                log::warn!(
                    "{error}; polls made during a long script or a load will end iterations early"
                );
                false
            }
        };
    let events = probes.take_events()?;
    let mut maps = probes.take_maps()?;
    maps.set_listen_ports(&target.ports)?;
    Ok((probes, events, maps, nested_poll_tracking))
}

/// Waits until the kernel has seen the event loop enter a poll, so that the iterations from
/// `attached` on are timed; a loop stalled right now gets a warning instead.
fn wait_for_first_poll(maps: &KernelMaps) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + FIRST_POLL_TIMEOUT;
    // The first poll entry sets the start of the iteration after it.
    while maps.loop_state()?.iteration_start_ns == 0 {
        if std::time::Instant::now() >= deadline {
            log::warn!(
                "the event loop has not entered a poll within {FIRST_POLL_TIMEOUT:?} of attaching (it may be \
                 stalled now); the iteration in progress is not timed"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The watch on the target's accept queues.
struct AcceptWatch {
    sampler: QueueSampler,
    tracker: AcceptTracker,
    connections: ConnectionTracker,
    /// The namespace's (ListenOverflows, ListenDrops) when the run began.
    namespace_counters_at_start: Option<(u64, u64)>,
    clock: WallClock,
    /// Whether a sampling failure was reported already.
    sampling_failed: bool,
}

/// `--alert` and its state.
struct Alerting {
    threshold: Duration,
    exec: Option<AlertExec>,
    counts: AlertCounts,
    /// Start of the iteration an in-progress alert was last given for.
    alerted_iteration_ns: u64,
}

/// Ticks every `period` when `enabled`, never otherwise.
fn optional_interval(enabled: bool, period: Duration) -> Option<tokio::time::Interval> {
    enabled.then(|| interval_at(Instant::now() + period, period))
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The state of a run while it watches the target.
struct Monitor {
    target: Target,
    maps: KernelMaps,
    outputs: Outputs,
    histogram: IterationHistogram,
    assembler: StallAssembler,
    madvise: MadviseStats,
    causes: StallCauses,
    alerting: Option<Alerting>,
    metrics: Option<Arc<Metrics>>,
    accept: AcceptWatch,
    interval_stalls: u64,
    decode_errors: u64,
    /// Lost events already shown in an interval line.
    reported_lost: u64,
    /// Stack samples lost (kernel and userspace) when the previous stall was assembled.
    samples_lost_at_last_stall: u64,
    /// Kernel-side counters of the targets followed before this one (`--follow`).
    earlier_counters: [u64; COUNTERS as usize],
    threshold: Duration,
    /// Whether polls nested in long commands are recognised in the current target.
    nested_poll_tracking: bool,
    started: Instant,
}

impl Monitor {
    async fn watch(
        &mut self,
        events: RingBuf<MapData>,
        interval: Duration,
        duration: Option<Duration>,
        queue_interval: Duration,
    ) -> anyhow::Result<StopReason> {
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
        let mut events = unsafe { AsyncFd::register(events) }
            .map_err(|error| error.into_parts().1)
            .context("cannot poll the events ring buffer")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let mut report = interval_at(self.started + interval, interval);
        let mut liveness = interval_at(self.started + LIVENESS_PERIOD, LIVENESS_PERIOD);
        let mut alert_check = optional_interval(self.alerting.is_some(), IN_PROGRESS_CHECK_PERIOD);
        let mut metrics_refresh = optional_interval(self.metrics.is_some(), METRICS_REFRESH_PERIOD);
        let mut queue_sample = interval_at(self.started, queue_interval);
        let mut accept_housekeeping = interval_at(
            self.started + ACCEPT_HOUSEKEEPING_PERIOD,
            ACCEPT_HOUSEKEEPING_PERIOD,
        );
        let deadline = async {
            match duration {
                Some(duration) => tokio::time::sleep(duration).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);

        let stopped = loop {
            let step: anyhow::Result<()> = tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard.context("cannot poll the events ring buffer")?;
                    let drained = self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                    drained
                }
                _ = report.tick() => self.report_interval(interval),
                () = tick(&mut alert_check) => self.check_in_progress(),
                () = tick(&mut metrics_refresh) => self.update_histogram(),
                _ = queue_sample.tick() => self.sample_accept_queues(),
                _ = accept_housekeeping.tick() => self.report_overflows_outside_stalls(),
                _ = liveness.tick() => {
                    if !self.target.is_alive() {
                        break StopReason::TargetExited;
                    }
                    Ok(())
                }
                () = &mut deadline => break StopReason::Duration,
                _ = sigint.recv() => break StopReason::Signal,
                _ = sigterm.recv() => break StopReason::Signal,
                _ = sighup.recv() => self.outputs.reopen().map_err(Into::into),
            };
            if let Err(error) = step {
                self.finish(StopReason::Error, &mut ConsoleSink);
                return Err(error);
            }
        };
        self.drain(events.get_mut())?;
        self.update_histogram()?;
        self.sample_accept_queues()?;
        for overflow in self
            .accept
            .tracker
            .take_outside_stalls(u64::MAX, &self.accept.clock)
        {
            self.outputs.accept_overflow(&overflow)?;
        }
        log::info!(
            "kernel counters: polls that blocked {}, short blocks {}, blocks before the gate {}, \
             unmatched switch-outs {}",
            self.counter(COUNTER_BLOCKING_POLLS)?,
            self.counter(COUNTER_SHORT_BLOCKS)?,
            self.counter(COUNTER_BLOCKS_BEFORE_GATE)?,
            self.counter(COUNTER_UNMATCHED_SWITCH_OUTS)?,
        );
        Ok(stopped)
    }

    /// Ends the run: the summary on every output.
    fn end(&mut self, stopped: StopReason) -> anyhow::Result<StopReason> {
        let summary = self.summary(stopped)?;
        self.outputs.summary(&summary)?;
        Ok(stopped)
    }

    /// The `attached` record of the current target.
    fn attached_record(&self) -> Attached {
        Attached {
            time: std::time::SystemTime::now(),
            pid: self.target.pid,
            tid: self.target.main_tid,
            threshold_us: self.threshold.as_micros() as u64,
            name: self.target.name.clone(),
            ports: self.target.ports.clone(),
            nested_poll_tracking: self.nested_poll_tracking,
        }
    }

    /// The target ran a new program (same pid): its mappings are new, and so are the addresses
    /// to unwind and name. The outputs get a new `attached` record (its name may differ).
    fn target_executed(&mut self) -> anyhow::Result<()> {
        let pid = self.target.pid;
        let Ok(target) = Target::from_pid(pid) else {
            return Ok(()); // gone already: the liveness check ends the run
        };
        log::warn!(
            "{} executed a new program ({}); its modules and symbols are reloaded",
            self.target,
            target.name
        );
        self.assembler.follow(
            pid,
            Unwinder::new(pid),
            Symbolizer::new(Box::new(BlazeSymbols::new(pid))),
        );
        self.assembler.warm_up();
        self.madvise.follow(pid);
        self.accept.connections.follow(pid);
        self.target = target;
        let attached = self.attached_record();
        self.outputs.attached(&attached)?;
        Ok(())
    }

    /// Attaches to `target`, the process that took over the port after the previous target
    /// exited, and goes on into the same outputs and totals.
    fn follow(
        &mut self,
        args: &AttachArgs,
        target: Target,
        tracepoints: &[String],
    ) -> anyhow::Result<(Probes, RingBuf<MapData>)> {
        let sampler = QueueSampler::open(target.pid)?;
        let (probes, events, maps, nested_poll_tracking) =
            attach_probes(args, &target, tracepoints)?;
        wait_for_first_poll(&maps)?;
        for (index, earlier) in self.earlier_counters.iter_mut().enumerate() {
            *earlier += self.maps.counter(index as u32)?;
        }
        self.maps = maps;
        self.histogram.restart_kernel_counts();
        self.assembler.follow(
            target.pid,
            Unwinder::new(target.pid),
            Symbolizer::new(Box::new(BlazeSymbols::new(target.pid))),
        );
        self.assembler.warm_up();
        self.madvise.follow(target.pid);
        self.accept.sampler = sampler;
        self.accept.connections.follow(target.pid);
        if let Some(alerting) = &mut self.alerting {
            alerting.alerted_iteration_ns = 0;
        }
        self.target = target;
        self.nested_poll_tracking = nested_poll_tracking;
        Ok((probes, events))
    }

    /// A kernel-side counter (`COUNTER_*`) over the whole run, earlier targets included.
    fn counter(&self, index: u32) -> anyhow::Result<u64> {
        Ok(self.maps.counter(index)? + self.earlier_counters[index as usize])
    }

    /// Handles every event waiting in the ring buffer.
    fn drain(&mut self, events: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        while let Some(record) = events.next() {
            match events::decode(&record) {
                Ok(Event::Stall(event)) => self.handle_stall(&event)?,
                Ok(Event::Stack(event)) => self.assembler.add_stack(event),
                Ok(Event::Connection(event)) => self.accept.connections.connection(&event),
                Ok(Event::Exec(_)) => self.target_executed()?,
                Ok(Event::Accept(event)) => {
                    self.accept
                        .connections
                        .accepted(&event, self.accept.sampler.listeners());
                }
                Ok(Event::Madvise(event)) => {
                    let (thread_role, advice) = self.madvise.add(&event);
                    self.assembler.add_madvise(&event);
                    if let Some(metrics) = &self.metrics {
                        metrics.observe_madvise(
                            &thread_role,
                            &advice,
                            event.len,
                            event.duration_ns as f64 / 1e9,
                        );
                    }
                }
                Err(error) => {
                    self.decode_errors += 1;
                    log::warn!("dropped a malformed event: {error}");
                }
            }
        }
        Ok(())
    }

    /// A stall event: the stall with its stacks, accept queues and completeness, to the outputs,
    /// the metrics and the alerts.
    fn handle_stall(&mut self, event: &StallEvent) -> anyhow::Result<()> {
        let mut stall = self.assembler.stall(event);
        if self.accept.sampler.has_listeners() {
            // A sample now covers the stall up to its end.
            self.sample_accept_queues()?;
            let mut accept = self.accept.tracker.stall(event.start_ns, event.end_ns);
            (accept.new_connections, accept.top_clients) =
                self.accept.connections.stall(event.start_ns, event.end_ns);
            stall.accept = Some(accept);
        }
        // Samples the kernel could not send or userspace could not keep, and times off the CPU
        // whose end the kernel did not see (their record was never made).
        let samples_lost = self.counter(COUNTER_STACK_EVENTS_LOST)?
            + self.assembler.dropped_samples
            + self.counter(COUNTER_UNMATCHED_SWITCH_OUTS)?;
        stall.incomplete = samples_lost > self.samples_lost_at_last_stall;
        self.samples_lost_at_last_stall = samples_lost;
        self.causes.add(&stall);
        self.interval_stalls += 1;
        self.outputs.stall(&stall)?;
        if let Some(metrics) = &self.metrics {
            metrics.observe_stall(&stall);
        }
        let alert_us = self
            .alerting
            .as_ref()
            .map(|alerting| alerting.threshold.as_micros() as u64);
        if alert_us.is_some_and(|alert_us| stall.duration_us >= alert_us) {
            self.alert(AlertState::Final, None, stall)?;
        }
        Ok(())
    }

    fn update_histogram(&mut self) -> anyhow::Result<()> {
        let buckets = self.maps.histogram()?;
        let max_ns = self.maps.take_iteration_max_ns()?;
        let added = self.histogram.update(&buckets, max_ns);
        if let Some(metrics) = &self.metrics {
            for (midpoint_ns, count) in added {
                metrics.observe_iterations(midpoint_ns as f64 / 1e9, count);
            }
            metrics.set_lost_events(self.lost_events()?.total());
        }
        Ok(())
    }

    /// Samples the accept queues; a failure is reported once and sampling goes on.
    fn sample_accept_queues(&mut self) -> anyhow::Result<()> {
        let samples = match self.accept.sampler.sample() {
            Ok(samples) => samples,
            Err(error) => {
                if !std::mem::replace(&mut self.accept.sampling_failed, true) {
                    log::warn!("{error}; accept-queue figures may be incomplete");
                }
                return Ok(());
            }
        };
        let added = self.accept.tracker.add(monotonic_now_ns(), &samples);
        if let Some(metrics) = &self.metrics {
            for (port, queue, overflows) in added {
                metrics.observe_accept_queue(port, queue, overflows);
            }
        }
        Ok(())
    }

    /// Re-reads the listeners, and reports drops that no stall can claim any more: older than
    /// the current iteration and than the events still on their way.
    fn report_overflows_outside_stalls(&mut self) -> anyhow::Result<()> {
        self.accept.sampler.refresh_listeners();
        let mut ports: Vec<u16> = self.accept.sampler.listeners().values().copied().collect();
        ports.sort_unstable();
        ports.dedup();
        self.maps.set_listen_ports(&ports)?;
        self.accept.connections.forget_listening_fds();
        let mut before_ns = monotonic_now_ns().saturating_sub(ACCEPT_ATTRIBUTION_DELAY_NS);
        if let Some(iteration_ns) = self.maps.loop_state()?.running_iteration_start_ns() {
            before_ns = before_ns.min(iteration_ns);
        }
        for overflow in self
            .accept
            .tracker
            .take_outside_stalls(before_ns, &self.accept.clock)
        {
            self.outputs.accept_overflow(&overflow)?;
        }
        Ok(())
    }

    fn accept_summary(&self) -> AcceptSummary {
        let now = namespace_listen_counters(self.target.pid);
        let (overflows, drops) = match (self.accept.namespace_counters_at_start, now) {
            (Some((overflows_then, drops_then)), Some((overflows_now, drops_now))) => (
                overflows_now.saturating_sub(overflows_then),
                drops_now.saturating_sub(drops_then),
            ),
            _ => (0, 0),
        };
        AcceptSummary {
            ports: self.accept.tracker.ports(),
            namespace_listen_overflows: overflows,
            namespace_listen_drops: drops,
            waits: self.accept.connections.waits(),
        }
    }

    /// Gives an in-progress alert once the current iteration has run past `--alert`.
    fn check_in_progress(&mut self) -> anyhow::Result<()> {
        let Some(alerting) = &self.alerting else {
            return Ok(());
        };
        let state = self.maps.loop_state()?;
        let Some(iteration_ns) = state.running_iteration_start_ns() else {
            return Ok(());
        };
        let now_ns = monotonic_now_ns();
        let elapsed_ns = now_ns.saturating_sub(iteration_ns);
        if iteration_ns == alerting.alerted_iteration_ns
            || elapsed_ns < u64::try_from(alerting.threshold.as_nanos()).unwrap_or(u64::MAX)
        {
            return Ok(());
        }
        let mut blocked = self.maps.pending_off_cpu_stacks(&state)?;
        if let Some(stacks) = &mut blocked {
            stacks.kind = EVENT_KIND_OFF_CPU;
            stacks.iteration_start_ns = iteration_ns;
            stacks.off_cpu_ns = now_ns.saturating_sub(state.switch_out_ns);
            stacks.runqueue_ns = 0;
        }
        let stall = self.assembler.in_progress(
            iteration_ns,
            now_ns,
            self.target.main_tid,
            blocked.as_deref(),
        );
        if let Some(alerting) = &mut self.alerting {
            alerting.alerted_iteration_ns = iteration_ns;
        }
        self.alert(AlertState::InProgress, Some(elapsed_ns / 1_000), stall)
    }

    fn alert(
        &mut self,
        state: AlertState,
        elapsed_us: Option<u64>,
        stall: crate::stall::Stall,
    ) -> anyhow::Result<()> {
        let Some(alerting) = &mut self.alerting else {
            return Ok(());
        };
        let alert = Alert {
            state,
            elapsed_us,
            alert_us: alerting.threshold.as_micros() as u64,
            stall,
        };
        match state {
            AlertState::Final => alerting.counts.finals += 1,
            AlertState::InProgress => alerting.counts.in_progress += 1,
        }
        if let Some(exec) = &mut alerting.exec {
            exec.submit(&alert);
        }
        self.outputs.alert(&alert)?;
        Ok(())
    }

    /// Events the kernel could not send, records that did not decode, samples not kept.
    fn lost_events(&self) -> anyhow::Result<LostEvents> {
        Ok(LostEvents {
            stall_events: self.counter(COUNTER_STALL_EVENTS_LOST)?,
            stack_events: self.counter(COUNTER_STACK_EVENTS_LOST)?,
            madvise_events: self.counter(COUNTER_MADVISE_EVENTS_LOST)?,
            madvise_untracked: self.counter(COUNTER_MADVISE_UNTRACKED)?,
            connection_events: self.counter(COUNTER_CONNECTION_EVENTS_LOST)?,
            exec_events: self.counter(COUNTER_EXEC_EVENTS_LOST)?,
            undecodable: self.decode_errors,
            samples_not_kept: self.assembler.dropped_samples,
        })
    }

    fn report_interval(&mut self, interval: Duration) -> anyhow::Result<()> {
        self.update_histogram()?;
        let lost = self.lost_events()?.total();
        let report = IntervalReport {
            seconds: interval.as_secs_f64(),
            stats: self.histogram.take_interval(),
            stalls: std::mem::take(&mut self.interval_stalls),
            lost_events: lost - self.reported_lost,
        };
        self.reported_lost = lost;
        self.outputs.interval(&report)?;
        Ok(())
    }

    fn summary(&self, stopped: StopReason) -> anyhow::Result<Summary> {
        let counts = RunCounts {
            stalls: self.causes.stalls(),
            stack_samples: self.assembler.received_samples,
            lost: self.lost_events()?,
            duration_s: self.started.elapsed().as_secs_f64(),
            profiler: self.profiler_cost(),
        };
        let alerts = self.alerting.as_ref().map(|alerting| {
            let mut counts = alerting.counts.clone();
            if let Some(exec) = &alerting.exec {
                exec.count_into(&mut counts);
            }
            counts
        });
        let accept = Some(self.accept_summary());
        Ok(Summary::new(
            &self.histogram.total(),
            counts,
            self.madvise.summary(),
            self.causes.summary(),
            accept,
            alerts,
            stopped,
        ))
    }

    /// The assembler's work on stacks so far, and the profiler's peak memory.
    fn profiler_cost(&self) -> ProfilerCost {
        let work = &self.assembler.work;
        ProfilerCost {
            stacks_unwound: work.stacks_unwound,
            unwind_us: work.unwind.as_micros() as u64,
            samples_symbolized: work.samples_symbolized,
            symbolize_us: work.symbolize.as_micros() as u64,
            peak_rss_kib: peak_rss_kib(),
        }
    }

    /// Best effort after a failure: the summary on `sink` alone.
    fn finish(&mut self, stopped: StopReason, sink: &mut dyn Sink) {
        let _ = self.update_histogram();
        if let Ok(summary) = self.summary(stopped) {
            let _ = sink.summary(&summary);
        }
    }
}

/// This process's peak resident memory, in KiB; 0 if unknown. The larger of `VmHWM` and
/// `VmRSS` in `/proc/self/status`: the kernel updates the high-water mark only when memory is
/// unmapped, so it can lag behind the current size.
fn peak_rss_kib() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    kib("VmHWM:").max(kib("VmRSS:"))
}
