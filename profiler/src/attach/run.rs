//! A run's shared parts (the programs, loaded once; the maps; the sinks and metrics every
//! instance writes to) and one [`Consumer`] per watched target, to which the ring buffer's
//! events go by the pid they carry.
use std::{
    cell::{Cell, RefCell},
    collections::HashSet,
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use profiler_common::Counter;

use super::{
    attachment::{Attachment, SharedMaps},
    binding::instance_of,
    consumer::{Consumer, ConsumerParts},
};
use crate::{
    accept::{AcceptWatch, NamespaceSamplers},
    alert::{AlertRunner, Alerting},
    clock::WallClock,
    config::RunConfig,
    events::{self, Event},
    metrics::Metrics,
    output::{
        ConsoleSink, FoldedStacks, Outputs, PprofSink, SharedSinks, Sink, StackFilesSink,
        flamegraph_title,
        record::{Instance, RunLosses, StopReason},
    },
    probes::{FaultPrograms, KernelLog, Probes, Slot},
    stall::StallPipeline,
    symbolize::SharedBlazesym,
    target::Target,
};

/// What a path of the stack files may hold to be one file per instance.
const INSTANCE_PLACEHOLDERS: [&str; 2] = ["{pid}", "{port}"];

/// Everything one run watches, and the parts its targets share.
pub struct Run {
    pub(super) probes: Probes,
    pub(super) maps: SharedMaps,
    kernel_log: Option<KernelLog>,
    /// One per watched target, in the order they were attached.
    pub consumers: Vec<Consumer>,
    sinks: SharedSinks,
    pub metrics: Option<Arc<Metrics>>,
    clock: WallClock,
    pub(super) config: RunConfig,
    /// What the run lost that belongs to no target: records that did not decode, and events
    /// of a target whose watch had ended.
    losses: Rc<Cell<RunLosses>>,
    /// With `--all`: the servers that could not be attached to (said once).
    pub refused: HashSet<u32>,
    /// With `--all`: the servers waiting for a free slot (said once; tried at each look).
    pub waiting_for_slot: HashSet<u32>,
    /// The accept-queue samplers, one per network namespace.
    pub(super) samplers: NamespaceSamplers,
    /// The symbolizer every target's pipeline shares (the kernel's symbols are read once).
    symbols: SharedBlazesym,
    /// The `--alert-exec` runner every target's alerts go to.
    alert_runner: Option<Rc<AlertRunner>>,
    /// The page-fault programs, attached while a target takes faults.
    fault_programs: FaultPrograms,
}

impl Run {
    pub fn new(
        mut probes: Probes,
        sinks: SharedSinks,
        metrics: Option<Arc<Metrics>>,
        config: &RunConfig,
    ) -> anyhow::Result<Self> {
        let kernel_log = probes.take_kernel_log();
        let maps = probes.take_maps()?;
        let alert_runner = config
            .alert
            .as_ref()
            .and_then(|alert| alert.exec.clone())
            .map(AlertRunner::start)
            .transpose()
            .context("cannot start the --alert-exec runner")?
            .map(Rc::new);
        Ok(Self {
            probes,
            maps: Rc::new(RefCell::new(maps)),
            kernel_log,
            consumers: Vec::new(),
            sinks,
            metrics,
            clock: WallClock::new(),
            config: config.clone(),
            losses: Rc::default(),
            refused: HashSet::new(),
            waiting_for_slot: HashSet::new(),
            samplers: NamespaceSamplers::default(),
            symbols: SharedBlazesym::default(),
            alert_runner,
            fault_programs: FaultPrograms::default(),
        })
    }

    /// Whether `pid` is watched already.
    pub fn watches(&self, pid: u32) -> bool {
        self.consumers
            .iter()
            .any(|consumer| consumer.binding.target.pid == pid)
    }

    /// Attaches to `target` and starts its consumer (its `attached` record goes out; if that
    /// write fails, the consumer is kept for its summary and the error returned).
    pub fn watch(&mut self, target: Target) -> anyhow::Result<()> {
        let used = self.used_slots();
        let attachment = Attachment::attach(
            &mut self.probes,
            &self.maps,
            &self.config.probes,
            &target,
            &used,
        )?;
        let instance = instance_of(&target);
        let parts = AcceptWatch::open(target.pid, self.clock, &self.samplers)
            .map_err(anyhow::Error::from)
            .and_then(|accept| Ok((accept, self.own_sinks(&instance)?)));
        let (accept, own_sinks) = match parts {
            Ok(parts) => parts,
            Err(error) => {
                attachment.detach(&mut self.probes, &self.maps, target.pid);
                return Err(error);
            }
        };
        let consumer = Consumer::new(ConsumerParts {
            stalls: StallPipeline::new(
                target.pid,
                self.config.stall.clone(),
                self.clock,
                self.symbols.clone(),
            ),
            target,
            maps: self.maps.clone(),
            attachment,
            outputs: Outputs::new(self.sinks.clone(), own_sinks, instance),
            accept,
            alerting: self
                .config
                .alert
                .as_ref()
                .map(|alert| Alerting::new(alert.threshold, self.alert_runner.clone())),
            metrics: self.metrics.clone(),
            threshold: self.config.stall.threshold,
            memory: self.config.probes.fault_sample_interval_ns.is_some(),
            run_losses: Rc::clone(&self.losses),
            host_tax: self.probes.host_tax,
            gate_ns: self.config.probes.gate_ns,
        });
        let mut attached = consumer.attached_record();
        self.consumers.push(consumer);
        let consumer = self.consumers.last_mut().expect("pushed above");
        consumer.outputs.attached(&mut attached)?;
        Ok(())
    }

    /// The slots the watched targets hold.
    fn used_slots(&self) -> Vec<Slot> {
        self.consumers
            .iter()
            .filter_map(|consumer| consumer.binding.attachment.as_ref())
            .map(|attachment| attachment.slot)
            .collect()
    }

    /// The stack files of `instance` alone: those whose paths name the instance.
    fn own_sinks(&self, instance: &Instance) -> anyhow::Result<Vec<Box<dyn Sink>>> {
        let paths = &self.config.outputs;
        let own = |path: &Option<std::path::PathBuf>| {
            path.as_deref()
                .filter(|path| names_instance(path))
                .map(|path| instance_path(path, instance))
        };
        stack_sinks(
            StackPaths {
                folded: own(&paths.folded),
                flamegraph: own(&paths.flamegraph),
                pprof: own(&paths.pprof),
            },
            flamegraph_title(&instance.name, instance.pid),
            FoldedStacks::new(paths.stack_root),
        )
    }

    /// Handles every event waiting in the ring buffer, each by its target's consumer.
    pub fn drain(&mut self, events: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        while let Some(record) = events.next() {
            match events::decode(&record) {
                Ok(Event::Faulting(_)) => self
                    .fault_programs
                    .wanted(&mut self.probes, &mut self.maps.borrow_mut()),
                Ok(event) => {
                    let pid = event.pid();
                    match self
                        .consumers
                        .iter_mut()
                        .find(|consumer| consumer.binding.target.pid == pid)
                    {
                        Some(consumer) => consumer.handle(event)?,
                        None => self.add_loss(|losses| losses.of_ended_targets += 1),
                    }
                }
                Err(error) => {
                    if self.losses.get().undecodable == 0 {
                        log::warn!("dropped a malformed event: {error} (counted in run_lost)");
                    }
                    self.add_loss(|losses| losses.undecodable += 1);
                }
            }
        }
        Ok(())
    }

    fn add_loss(&self, add: impl FnOnce(&mut RunLosses)) {
        let mut losses = self.losses.get();
        add(&mut losses);
        self.losses.set(losses);
    }

    /// Re-reads every target's listeners, then reports the drops no stall can claim any more
    /// (the stalls still in the ring buffer taken in first).
    pub fn accept_housekeeping(&mut self, events: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let mut before_ns = Vec::with_capacity(self.consumers.len());
        for consumer in &mut self.consumers {
            before_ns.push(consumer.refresh_listeners()?);
        }
        self.drain(events)?;
        for (consumer, before_ns) in self.consumers.iter_mut().zip(before_ns) {
            consumer.report_overflows_before(before_ns)?;
        }
        Ok(())
    }

    /// Detaches the page-fault programs once no target has taken a fault for a while.
    pub fn release_quiet_fault_programs(&mut self) -> anyhow::Result<()> {
        let mut faults = 0;
        for consumer in &self.consumers {
            for counter in [
                Counter::NewPageFaults,
                Counter::WriteProtectFaults,
                Counter::FaultsUnclassified,
            ] {
                faults += consumer.binding.counter(counter)?;
            }
        }
        self.fault_programs
            .release_if_quiet(faults, &mut self.probes, &mut self.maps.borrow_mut());
        Ok(())
    }

    /// Moves the kernel programs' messages into our log.
    pub fn flush_kernel_log(&mut self) {
        if let Some(kernel_log) = &mut self.kernel_log {
            kernel_log.flush();
        }
    }

    /// The consumers whose target is gone, by index (last first, to be removed in order).
    pub fn exited(&self) -> Vec<usize> {
        (0..self.consumers.len())
            .rev()
            .filter(|&index| !self.consumers[index].binding.target.is_alive())
            .collect()
    }

    /// After its last events were drained: the consumer at `index` writes its last figures
    /// and its summary (`target_exited`), and its target is detached.
    pub fn end_exited(&mut self, index: usize) -> anyhow::Result<()> {
        let mut consumer = self.consumers.remove(index);
        log::warn!("{} exited", consumer.binding.target);
        let ended = consumer
            .flush_target()
            .and_then(|()| consumer.report_last_interval());
        self.detach(&mut consumer);
        // Its series go before its summary: the metrics show the servers that run.
        if let Some(metrics) = &consumer.metrics {
            metrics.forget();
        }
        ended.and_then(|()| consumer.write_summary(StopReason::TargetExited))
    }

    /// Gives back `consumer`'s slot and own programs.
    pub fn detach(&mut self, consumer: &mut Consumer) {
        if let Some(attachment) = consumer.binding.attachment.take() {
            attachment.detach(&mut self.probes, &self.maps, consumer.binding.target.pid);
        }
    }

    /// Ends the run: every consumer's last figures and summary (`stopped`).
    pub fn end(&mut self, stopped: StopReason) -> anyhow::Result<StopReason> {
        self.finish_alerts();
        let mut first_error = None;
        for consumer in &mut self.consumers {
            if let Err(error) = consumer.flush_target().and_then(|()| consumer.end(stopped)) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(stopped), Err)
    }

    /// Lets the queued `--alert-exec` commands run (for one `--alert-timeout`) and counts
    /// the rest, before the summaries count them.
    fn finish_alerts(&self) {
        if let Some(runner) = &self.alert_runner {
            runner.finish();
        }
    }

    /// Best effort after a failure: every consumer's summary on the console alone.
    pub fn finish_after_error(&mut self) {
        self.finish_alerts();
        let mut console = if self.config.mode.names_instances() {
            ConsoleSink::naming_instances()
        } else {
            ConsoleSink::default()
        };
        for consumer in &mut self.consumers {
            consumer.finish_after_error(&mut console);
        }
    }
}

/// The stack files of some instances (all, or one).
pub struct StackPaths {
    pub folded: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    pub pprof: Option<PathBuf>,
}

/// The sinks writing `paths` (created now): the folded lines and the flamegraph (`title`) of
/// `stacks`, and the pprof profile.
pub fn stack_sinks(
    paths: StackPaths,
    title: String,
    stacks: FoldedStacks,
) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if paths.folded.is_some() || paths.flamegraph.is_some() {
        let sink = StackFilesSink::create(
            paths.folded.as_deref(),
            paths.flamegraph.as_deref(),
            title,
            stacks,
        )
        .context("cannot write the stack files")?;
        sinks.push(Box::new(sink));
    }
    if let Some(path) = paths.pprof {
        let sink = PprofSink::create(&path)
            .with_context(|| format!("cannot write the pprof file `{}`", path.display()))?;
        sinks.push(Box::new(sink));
    }
    Ok(sinks)
}

/// Whether `path` holds a placeholder that names the instance.
pub fn names_instance(path: &Path) -> bool {
    let path = path.to_string_lossy();
    INSTANCE_PLACEHOLDERS
        .iter()
        .any(|placeholder| path.contains(placeholder))
}

/// `path` with its placeholders replaced by `instance`'s pid and port (`none` without one).
fn instance_path(path: &Path, instance: &Instance) -> std::path::PathBuf {
    let port = instance
        .port
        .map_or_else(|| "none".to_owned(), |port| port.to_string());
    path.to_string_lossy()
        .replace("{pid}", &instance.pid.to_string())
        .replace("{port}", &port)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_name_the_instance() {
        let instance = Instance {
            pid: 42,
            port: Some(6380),
            name: "redis-server".into(),
        };
        assert!(names_instance(Path::new("/tmp/stalls-{port}.svg")));
        assert!(!names_instance(Path::new("/tmp/stalls.svg")));
        assert_eq!(
            instance_path(Path::new("/tmp/{port}/stalls-{pid}.svg"), &instance),
            Path::new("/tmp/6380/stalls-42.svg")
        );
        let portless = Instance {
            port: None,
            ..instance
        };
        assert_eq!(
            instance_path(Path::new("/tmp/stalls-{port}.folded"), &portless),
            Path::new("/tmp/stalls-none.folded")
        );
    }
}
