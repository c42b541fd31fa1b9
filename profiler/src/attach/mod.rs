//! An `attach` run: checked flags -> configuration -> target found -> outputs opened ->
//! probes attached -> the driver feeds the consumer until a stop condition -> summary. With
//! `--follow`, the next process on the port is attached to and the run goes on.
mod attachment;
mod consumer;
mod driver;
mod target_life;

use std::sync::Arc;

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};

use attachment::Attachment;
use consumer::{Consumer, ConsumerParts};

use crate::{
    accept::AcceptWatch,
    alert::Alerting,
    cli::AttachArgs,
    clock::WallClock,
    config::{OutputPaths, RunConfig},
    kernel,
    metrics::{self, Metrics},
    output::{
        ConsoleSink, JsonSink, Outputs, Sink, StackFilesSink, flamegraph_title, record::StopReason,
    },
    privileges,
    probes::Probes,
    stall::StallPipeline,
    target::Target,
};

/// Runs `attach` until `--duration`, a signal or the target's exit.
pub fn run_attach(args: &AttachArgs) -> anyhow::Result<StopReason> {
    let tracepoints = kernel::preflight()?;
    let config = RunConfig::from_args(args)?;
    let target = Target::find(config.selector, config.force)?;
    let clock = WallClock::new();
    let accept = AcceptWatch::open(target.pid, clock)?;
    let outputs = Outputs::new(open_sinks(&config.outputs, &target)?);
    // Bound now, so a busy address is reported before attaching (the run goes on without).
    let metrics_listener = config.metrics.and_then(bind_metrics);
    let attachment = Attachment::attach(&config.probes, &target, &tracepoints)?;
    // Before the run starts threads of its own: they inherit what is left.
    match privileges::drop_after_attach(config.follow_port.is_some()) {
        Ok(dropped) => log::debug!("capabilities dropped after attaching: {dropped:?}"),
        Err(error) => {
            log::warn!("cannot drop capabilities after attaching ({error}); going on with them")
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let metrics = metrics_listener
        .as_ref()
        .map(|_| Arc::new(Metrics::new(target.pid, target.ports.first().copied())));
    let consumer = Consumer::new(ConsumerParts {
        stalls: StallPipeline::new(target.pid, config.stall.clone(), clock),
        target,
        maps: attachment.maps,
        kernel_log: attachment.kernel_log,
        nested_poll_tracking: attachment.nested_poll_tracking,
        outputs,
        accept,
        alerting: config.alert.clone().map(Alerting::new),
        metrics,
        threshold: config.stall.threshold,
    });
    runtime.block_on(async {
        if let (Some(listener), Some(metrics)) = (metrics_listener, &consumer.metrics) {
            let listener =
                tokio::net::TcpListener::from_std(listener).context("cannot serve metrics")?;
            tokio::spawn(metrics::serve(listener, Arc::clone(metrics)));
        }
        run(
            consumer,
            &config,
            attachment.probes,
            attachment.events,
            &tracepoints,
        )
        .await
    })
}

/// Watches target after target (one unless `--follow`) and ends with the summary.
async fn run(
    mut consumer: Consumer,
    config: &RunConfig,
    mut probes: Probes,
    mut events: RingBuf<MapData>,
    tracepoints: &[String],
) -> anyhow::Result<StopReason> {
    loop {
        let attached = consumer.attached_record();
        if let Err(error) = consumer.outputs.attached(&attached) {
            consumer.finish_after_error(&mut ConsoleSink);
            return Err(error.into());
        }
        let remaining = driver::remaining(config, consumer.started);
        let stopped = driver::watch(&mut consumer, config, events, remaining).await?;
        let (StopReason::TargetExited, Some(port)) = (stopped, config.follow_port) else {
            // The summary first: detaching takes a while, and is not part of the run.
            let ended = consumer.end(stopped);
            drop(probes);
            return ended;
        };
        // The probes stayed attached until the last events were drained.
        drop(probes);
        log::warn!(
            "{} exited; waiting for the next process on port {port} (--follow)",
            consumer.target
        );
        let remaining = driver::remaining(config, consumer.started);
        let target = match target_life::wait_for_listener(port, config.force, remaining).await {
            Ok(Ok(target)) => target,
            Ok(Err(stopped)) => return consumer.end(stopped),
            Err(error) => {
                consumer.end(StopReason::Error)?;
                return Err(error);
            }
        };
        (probes, events) = match consumer.follow(&config.probes, target, tracepoints) {
            Ok(attached) => attached,
            Err(error) => {
                consumer.end(StopReason::Error)?;
                return Err(error);
            }
        };
    }
}

/// The run's outputs, opened (files created) before attaching.
fn open_sinks(paths: &OutputPaths, target: &Target) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(ConsoleSink)];
    if let Some(path) = &paths.json {
        let sink = JsonSink::create(path)
            .with_context(|| format!("cannot write the JSON output {path}"))?;
        sinks.push(Box::new(sink));
    }
    if paths.folded.is_some() || paths.flamegraph.is_some() {
        let title = flamegraph_title(&target.name, target.pid);
        let sink = StackFilesSink::create(
            paths.folded.as_deref(),
            paths.flamegraph.as_deref(),
            title,
            paths.stack_root,
        )
        .context("cannot write the stack files")?;
        sinks.push(Box::new(sink));
    }
    Ok(sinks)
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
