//! The consumer of one watched target: one `handle_*` per kind of kernel event, the periodic
//! work the driver asks for (interval lines with memory growth and the connection census,
//! histogram, in-progress alerts, accept queues), and `end` with the summary. The target's
//! life (exec, `--follow`) is in `target_life`.
use std::{cell::Cell, rc::Rc, sync::Arc, time::Duration};

use profiler_common::{
    AcceptEvent, ConnectionEvent, EVENT_KIND_OFF_CPU, MadviseEvent, StackEvent, StallEvent,
};
use tokio::time::Instant;

use super::{
    attachment::{Attachment, SharedMaps},
    binding::{Binding, Interval, LossLedger},
};
use crate::{
    accept::{AcceptWatch, clients},
    alert::Alerting,
    clock::monotonic_now_ns,
    events::Event,
    histogram::IterationHistogram,
    madvise::MadviseStats,
    memory::{FaultCounts, MemoryWatch},
    metrics::{InstanceMetrics, Metrics},
    output::{
        Outputs,
        record::{Alert, Instance, RunLosses, StallCauses},
    },
    probes::HostTax,
    stall::{RunningIteration, StallContext, StallPipeline},
    target::Target,
};

/// Drops this recent may still belong to a stall whose event is on its way.
const ACCEPT_ATTRIBUTION_DELAY_NS: u64 = 100_000_000;

/// What a run knows of one watched target.
pub struct Consumer {
    /// The process watched now, its name and slot.
    pub(super) binding: Binding,
    pub(super) outputs: Outputs,
    pub(super) histogram: IterationHistogram,
    pub(super) stalls: StallPipeline,
    pub(super) madvise: MadviseStats,
    /// Memory growth (`None` with `--no-memory`).
    pub(super) memory: Option<MemoryWatch>,
    pub(super) accept: AcceptWatch,
    pub(super) alerting: Option<Alerting>,
    pub(super) metrics: Option<InstanceMetrics>,
    pub(super) causes: StallCauses,
    pub(super) threshold: Duration,
    pub(super) started: Instant,
    pub(super) losses: LossLedger,
    /// The interval now running (memory growth and census are per interval).
    pub(super) interval: Interval,
    /// How the scheduler and fault programs are attached.
    pub(super) host_tax: HostTax,
    /// Iterations this old are watched for the clients of the stall they may become.
    pub(super) gate_ns: u64,
}

/// The parts a consumer starts with.
pub struct ConsumerParts {
    pub target: Target,
    pub maps: SharedMaps,
    pub attachment: Attachment,
    pub outputs: Outputs,
    pub stalls: StallPipeline,
    pub accept: AcceptWatch,
    pub alerting: Option<Alerting>,
    pub metrics: Option<Arc<Metrics>>,
    pub threshold: Duration,
    /// Whether page faults are traced.
    pub memory: bool,
    pub run_losses: Rc<Cell<RunLosses>>,
    pub host_tax: HostTax,
    pub gate_ns: u64,
}

impl Consumer {
    pub fn new(parts: ConsumerParts) -> Self {
        let binding = Binding::new(parts.target, parts.maps, parts.attachment);
        Self {
            madvise: MadviseStats::new(binding.target.pid),
            // The target's slot is new: its fault counts start at zero.
            memory: parts
                .memory
                .then(|| MemoryWatch::new(binding.target.pid, FaultCounts::default())),
            metrics: parts
                .metrics
                .map(|metrics| metrics.of(parts.outputs.instance())),
            binding,
            outputs: parts.outputs,
            histogram: IterationHistogram::default(),
            stalls: parts.stalls,
            accept: parts.accept,
            alerting: parts.alerting,
            causes: StallCauses::default(),
            threshold: parts.threshold,
            started: Instant::now(),
            losses: LossLedger::new(parts.run_losses),
            interval: Interval::new(),
            host_tax: parts.host_tax,
            gate_ns: parts.gate_ns,
        }
    }

    /// Handles one event of this target.
    pub fn handle(&mut self, event: Event<'_>) -> anyhow::Result<()> {
        match event {
            Event::Stall(event) => self.handle_stall(&event)?,
            Event::Stack(event) => self.handle_stack(event),
            Event::PageFault(event) => self.handle_page_fault(event),
            Event::Madvise(event) => self.handle_madvise(&event),
            Event::Connection(event) => self.handle_connection(&event),
            Event::ConnectionClosed(event) => self.accept.connection_closed(&event),
            Event::Accept(event) => self.handle_accept(&event),
            Event::Exec(_) => self.handle_exec()?,
            // The run's, not the target's: see `Run::drain`.
            Event::Faulting(_) => {}
        }
        Ok(())
    }

    /// A stall event: the stall with its stacks, accept queues and completeness, to the
    /// outputs, the metrics and the alerts.
    fn handle_stall(&mut self, event: &StallEvent) -> anyhow::Result<()> {
        let accept = self
            .accept
            .stall(event.start_ns, event.end_ns, self.metrics.as_ref());
        let incomplete = self
            .losses
            .samples_lost_since_last_stall(&self.binding, &self.stalls.counts())?;
        let (mut stall, last_read) = self
            .stalls
            .stall(event, StallContext { accept, incomplete });
        let (client, waiting) = self.accept.stall_clients(
            event.start_ns,
            event.end_ns,
            &stall.origin,
            last_read.as_ref(),
        );
        if let Some(typed) = client
            .command
            .as_deref()
            .and_then(|command| clients::narrowed_origin(&stall.origin, command))
        {
            stall.rename_origin(&typed);
        }
        stall.client = client;
        stall.waiting = waiting;
        self.causes.add(&stall);
        self.interval.stalls += 1;
        self.outputs.stall(&mut stall)?;
        if let Some(metrics) = &self.metrics {
            metrics.observe_stall(&stall);
        }
        let alert = self
            .alerting
            .as_mut()
            .and_then(|alerting| alerting.final_alert(&stall));
        if let Some(mut alert) = alert {
            self.outputs.alert(&mut alert)?;
        }
        Ok(())
    }

    fn handle_stack(&mut self, event: &StackEvent) {
        self.stalls.add_stack(event);
    }

    /// A page-fault sample: its faults' bytes named and added to the growth.
    fn handle_page_fault(&mut self, event: &StackEvent) {
        let Some(memory) = &mut self.memory else {
            return;
        };
        let copy_on_write = memory.is_copy_on_write(event);
        let (frames, attribution) = self.stalls.name_growth(event, copy_on_write);
        memory.add_sample(event, &frames, &attribution);
    }

    fn handle_madvise(&mut self, event: &MadviseEvent) {
        if let Some(memory) = &mut self.memory {
            memory.add_madvise(event);
        }
        let (thread_role, advice) = self.madvise.add(event);
        self.stalls.add_madvise(event);
        if let Some(metrics) = &self.metrics {
            metrics.observe_madvise(
                &thread_role,
                &advice,
                event.len,
                event.duration_ns as f64 / 1e9,
            );
        }
    }

    fn handle_connection(&mut self, event: &ConnectionEvent) {
        self.accept.connection(event);
    }

    fn handle_accept(&mut self, event: &AcceptEvent) {
        self.accept.accepted(event);
    }

    /// Takes in the kernel's iteration histogram (and gives it to the metrics).
    pub fn refresh_histogram(&mut self) -> anyhow::Result<()> {
        let Some(slot) = self.binding.slot() else {
            return Ok(());
        };
        let buckets = self.binding.maps.borrow().histogram(slot)?;
        let max_ns = self.binding.maps.borrow_mut().take_iteration_max_ns(slot)?;
        let added = self.histogram.update(&buckets, max_ns);
        if let Some(metrics) = &self.metrics {
            for (midpoint_ns, count) in added {
                metrics.observe_iterations(midpoint_ns as f64 / 1e9, count);
            }
            metrics.set_lost_events(self.lost_events()?.total());
        }
        Ok(())
    }

    /// Samples the accept queues, and the server's connections while an iteration runs past
    /// the gate (for the clients of the stall it may become).
    pub fn sample_accept_queues(&mut self) -> anyhow::Result<()> {
        self.accept.sample(self.metrics.as_ref());
        let Some(slot) = self.binding.slot() else {
            return Ok(());
        };
        let running = self.binding.maps.borrow().loop_state(slot)?;
        if let Some(start_ns) = running.running_iteration_start_ns()
            && monotonic_now_ns().saturating_sub(start_ns) >= self.gate_ns
        {
            let read_fd = running.read_fd.checked_sub(1).map(|fd| fd as u32);
            self.accept.see_running_iteration(start_ns, read_fd);
        }
        Ok(())
    }

    /// Re-reads the listeners (telling the kernel their ports), and says before when drops
    /// can no longer be claimed by a stall: older than the current iteration and than the
    /// events still on their way. A stall that ended before the loop's state was read may
    /// still wait in the ring buffer: the caller drains it before
    /// [`Self::report_overflows_before`] that time.
    pub fn refresh_listeners(&mut self) -> anyhow::Result<u64> {
        let mut before_ns = monotonic_now_ns().saturating_sub(ACCEPT_ATTRIBUTION_DELAY_NS);
        let Some(slot) = self.binding.slot() else {
            return Ok(before_ns);
        };
        let ports = self.accept.refresh_listeners();
        self.binding
            .maps
            .borrow_mut()
            .set_listen_ports(slot, self.binding.target.netns, &ports)?;
        if let (None, Some(&port)) = (self.outputs.instance().port, ports.first()) {
            let instance = Instance {
                port: Some(port),
                ..self.outputs.instance().clone()
            };
            if let Some(metrics) = &mut self.metrics {
                metrics.relabel(&instance);
            }
            self.outputs.rename(instance);
        }
        if let Some(iteration_ns) = self
            .binding
            .maps
            .borrow()
            .loop_state(slot)?
            .running_iteration_start_ns()
        {
            before_ns = before_ns.min(iteration_ns);
        }
        Ok(before_ns)
    }

    /// Reports the drops before `before_ns` that no stall claimed.
    pub fn report_overflows_before(&mut self, before_ns: u64) -> anyhow::Result<()> {
        for mut overflow in self.accept.overflows_outside_stalls(before_ns) {
            self.outputs.accept_overflow(&mut overflow)?;
        }
        Ok(())
    }

    /// Gives an in-progress alert once the current iteration has run past `--alert`.
    pub fn check_in_progress(&mut self) -> anyhow::Result<()> {
        let Some(alerting) = &self.alerting else {
            return Ok(());
        };
        let Some(slot) = self.binding.slot() else {
            return Ok(());
        };
        let state = self.binding.maps.borrow().loop_state(slot)?;
        let Some(iteration_ns) = state.running_iteration_start_ns() else {
            return Ok(());
        };
        let now_ns = monotonic_now_ns();
        if !alerting.in_progress_due(iteration_ns, now_ns) {
            return Ok(());
        }
        let mut blocked = self
            .binding
            .maps
            .borrow()
            .pending_off_cpu_stacks(slot, &state)?;
        if let Some(stacks) = &mut blocked {
            stacks.kind = EVENT_KIND_OFF_CPU;
            stacks.iteration_start_ns = iteration_ns;
            stacks.off_cpu_ns = now_ns.saturating_sub(state.switch_out_ns);
            stacks.runqueue_ns = 0;
        }
        let iteration = RunningIteration {
            start_ns: iteration_ns,
            now_ns,
            tid: self.binding.target.main_tid,
            poll_handed_off: state.poll_handed_off != 0,
        };
        let mut stall = self.stalls.in_progress(iteration, blocked.as_deref());
        // Named before the alert: its command is told the instance.
        self.outputs.name(&mut stall);
        let alert: Option<Alert> = self
            .alerting
            .as_mut()
            .map(|alerting| alerting.in_progress_alert(iteration_ns, now_ns, stall));
        if let Some(mut alert) = alert {
            self.outputs.alert(&mut alert)?;
        }
        Ok(())
    }
}
