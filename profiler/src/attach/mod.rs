//! An `attach` run: checked flags -> configuration -> targets found -> outputs opened ->
//! programs loaded and attached once -> each target given its slot -> the driver feeds the
//! consumers until a stop condition -> summaries. With `--follow`, the next process on the
//! port is attached to and the run goes on; with `--all`, every Redis server that starts is.
mod attachment;
mod binding;
mod consumer;
mod discovery;
mod driver;
mod reports;
mod run;
mod target_life;

use std::{cell::RefCell, rc::Rc, sync::Arc};

use anyhow::Context as _;
use tokio::time::Instant;

use run::Run;

use crate::{
    cli::AttachArgs,
    config::{OutputPaths, RunConfig, RunMode},
    kernel,
    metrics::{self, Metrics},
    output::{
        ConsoleSink, FoldedStacks, HtmlSink, JsonSink, MemoryStacksSink, SharedSinks, Sink,
        record::StopReason,
    },
    privileges,
    probes::Probes,
};

/// Runs `attach` until `--duration`, a signal or the targets' exit.
pub fn run_attach(args: &AttachArgs) -> anyhow::Result<StopReason> {
    let tracepoints = kernel::preflight()?;
    let config = RunConfig::from_args(args)?;
    let targets = discovery::initial_targets(&config.selection, config.force)?;
    let sinks: SharedSinks = Rc::new(RefCell::new(open_sinks(
        &config.outputs,
        config.mode.names_instances(),
    )?));
    // Bound now, so a busy address is reported before attaching (the run goes on without).
    let metrics_listener = config.metrics.and_then(bind_metrics);
    let metrics = metrics_listener.as_ref().map(|_| Arc::new(Metrics::new()));
    warn_if_no_stack_fits(config.probes.ring_buffer_bytes);
    // One process for the whole run: the programs compare with its ids instead of looking it up.
    let sole_target = match (config.mode, targets.as_slice()) {
        (RunMode::Sole, [only]) => Some((only.pid, only.main_tid)),
        _ => None,
    };
    let mut probes = Probes::load(config.probes.probe_settings(sole_target))?;
    // The scheduler programs before the poll entries: an iteration the poll timer starts
    // must not miss the switch-out that tells it the loop went idle.
    probes.attach_scheduler()?;
    probes.attach_poll_tracepoints(&tracepoints)?;
    probes.attach_madvise()?;
    probes.attach_connections()?;
    if config.probes.exact_clients {
        probes.attach_read_tracker()?;
    }
    if config.probes.fault_sample_interval_ns.is_some() {
        probes.attach_memory()?;
    }
    let events = probes.take_events()?;
    let mut run = Run::new(probes, sinks, metrics, &config)?;
    for target in targets {
        if let Err(error) = run.watch(target) {
            run.finish_after_error();
            return Err(error);
        }
    }
    // Before the run starts threads of its own: they inherit what is left. Attaching later
    // (--follow, --all) needs the capabilities kept.
    match privileges::drop_after_attach(config.mode.attaches_later()) {
        Ok(dropped) => log::debug!("capabilities dropped after attaching: {dropped:?}"),
        Err(error) => {
            log::warn!("cannot drop capabilities after attaching ({error}); going on with them")
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let (Some(listener), Some(metrics)) = (metrics_listener, &run.metrics) {
        metrics::spawn_server(listener, Arc::clone(metrics)).context("cannot serve metrics")?;
    }
    runtime.block_on(async {
        let events = driver::register(events)?;
        watch(run, &config, events).await
    })
}

/// Watches until the run stops (with `--follow`, process after process on the port) and ends
/// with the summaries.
async fn watch(
    mut run: Run,
    config: &RunConfig,
    mut events: driver::Events,
) -> anyhow::Result<StopReason> {
    let started = Instant::now();
    loop {
        let remaining = driver::remaining(config, started);
        let stopped = driver::watch(&mut run, config, &mut events, started, remaining).await?;
        let (StopReason::TargetExited, Some(port)) = (stopped, config.mode.followed_port()) else {
            return run.end(stopped);
        };
        run.release_followed()?;
        log::warn!("the target exited; waiting for the next process on port {port} (--follow)");
        let remaining = driver::remaining(config, started);
        let target = match target_life::wait_for_listener(port, config.force, remaining).await {
            Ok(Ok(target)) => target,
            Ok(Err(stopped)) => return run.end(stopped),
            Err(error) => {
                run.end(StopReason::Error)?;
                return Err(error);
            }
        };
        if let Err(error) = run.follow(target) {
            run.end(StopReason::Error)?;
            return Err(error);
        }
    }
}

/// The outputs every target writes to, opened (files created) before attaching. Stack files
/// whose paths name the instance (`{pid}`, `{port}`) are each target's own instead; shared
/// ones root each stack at its instance when the run `names_instances`.
fn open_sinks(paths: &OutputPaths, names_instances: bool) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let console = if names_instances {
        ConsoleSink::naming_instances()
    } else {
        ConsoleSink::default()
    };
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(console)];
    if let Some(path) = &paths.json {
        let sink = JsonSink::create(path)
            .with_context(|| format!("cannot write the JSON output {path}"))?;
        sinks.push(Box::new(sink));
    }
    let shared =
        |path: &Option<std::path::PathBuf>| path.clone().filter(|path| !run::names_instance(path));
    let stacks = FoldedStacks::new(paths.stack_root);
    let stacks = if names_instances {
        stacks.with_instance_root()
    } else {
        stacks
    };
    sinks.extend(run::stack_sinks(
        run::StackPaths {
            folded: shared(&paths.folded),
            flamegraph: shared(&paths.flamegraph),
            pprof: shared(&paths.pprof),
        },
        "redis-stallprof: where the stalls spent their time".to_owned(),
        stacks,
    )?);
    if paths.memory_folded.is_some() || paths.memory_flamegraph.is_some() {
        let sink = MemoryStacksSink::create(
            paths.memory_folded.as_deref(),
            paths.memory_flamegraph.as_deref(),
            names_instances,
        )
        .context("cannot write the memory stack files")?;
        sinks.push(Box::new(sink));
    }
    if let Some(path) = &paths.html {
        let sink = HtmlSink::create(path)
            .with_context(|| format!("cannot write the HTML report `{}`", path.display()))?;
        sinks.push(Box::new(sink));
    }
    Ok(sinks)
}

/// A ring buffer smaller than one stack event loses every sample: said before attaching.
fn warn_if_no_stack_fits(ring_buffer_bytes: u32) {
    let stack_event = size_of::<profiler_common::StackEvent>();
    if (ring_buffer_bytes as usize) < stack_event + 8 {
        log::warn!(
            "--ring-buffer-kib {} holds no stack event ({stack_event} bytes each): every stack \
             sample will be lost",
            ring_buffer_bytes / 1024,
        );
    }
}

/// A listener for the metrics on `address`; a busy address is reported and the run goes on.
fn bind_metrics(address: std::net::SocketAddr) -> Option<std::net::TcpListener> {
    std::net::TcpListener::bind(address)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|error| {
            log::warn!("cannot serve metrics on {address}: {error}; profiling goes on without them")
        })
        .ok()
}
