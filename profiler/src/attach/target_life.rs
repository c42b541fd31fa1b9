//! A target's life: a new program in the same process (exec), and with `--follow` the next
//! process on the port after the target exited. Either way the same stall pipeline, madvise
//! and accept-queue state are bound to the process anew (`retarget`), the totals kept.
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{attachment::Attachment, binding::instance_of, consumer::Consumer, run::Run};
use crate::{
    accept::QueueSampler,
    output::record::StopReason,
    target::{Target, TargetError, TargetSelector},
};

/// With `--follow`, how often to look for the next process on the port.
const FOLLOW_POLL_PERIOD: Duration = Duration::from_millis(100);

impl Consumer {
    /// Binds every per-process part to `target`; `sampler` is the accept-queue sampler of a
    /// new process, `None` after an exec (same process, same sockets).
    fn retarget(&mut self, target: Target, sampler: Option<QueueSampler>) {
        self.stalls.retarget(target.pid);
        self.madvise.follow(target.pid);
        if let Some(memory) = &mut self.memory {
            memory.retarget(target.pid);
        }
        self.accept.retarget(target.pid, sampler);
        let instance = instance_of(&target);
        if let Some(metrics) = &mut self.metrics {
            metrics.relabel(&instance);
        }
        self.outputs.rename(instance);
        self.binding.target = target;
    }

    /// The target ran a new program (same pid): its mappings are new, and so are the addresses
    /// to unwind and name. The outputs get a new `attached` record (its name may differ).
    pub(super) fn handle_exec(&mut self) -> anyhow::Result<()> {
        let Ok(target) = Target::from_pid(self.binding.target.pid) else {
            return Ok(()); // gone already: the liveness check ends the run
        };
        log::warn!(
            "{} executed a new program ({}); its modules and symbols are reloaded",
            self.binding.target,
            target.name
        );
        self.retarget(target, None);
        let mut attached = self.attached_record();
        self.outputs.attached(&mut attached)?;
        Ok(())
    }
}

impl Run {
    /// `--follow`: the followed target exited; after its last figures, its slot and programs
    /// go back (its counters stay in the run's totals).
    pub fn release_followed(&mut self) -> anyhow::Result<()> {
        let Some(consumer) = self.consumers.first_mut() else {
            return Ok(());
        };
        consumer.flush_target()?;
        consumer.binding.keep_counters()?;
        if let Some(attachment) = consumer.binding.attachment.take() {
            attachment.detach(&mut self.probes, &self.maps, consumer.binding.target.pid);
        }
        Ok(())
    }

    /// `--follow`: attaches to `target`, the process that took over the port after the
    /// followed one exited, and goes on into the same outputs and totals.
    pub fn follow(&mut self, target: Target) -> anyhow::Result<()> {
        let sampler = QueueSampler::open(target.pid, &self.samplers)?;
        let attachment = Attachment::attach(
            &mut self.probes,
            &self.maps,
            &self.config.probes,
            &target,
            &[],
        )?;
        let Some(consumer) = self.consumers.first_mut() else {
            attachment.detach(&mut self.probes, &self.maps, target.pid);
            return Ok(());
        };
        consumer.binding.attachment = Some(attachment);
        consumer.histogram.restart_kernel_counts();
        if let Some(alerting) = &mut consumer.alerting {
            alerting.forget_iteration();
        }
        consumer.retarget(target, Some(sampler));
        let mut attached = consumer.attached_record();
        consumer.outputs.attached(&mut attached)?;
        Ok(())
    }
}

/// After the target exited: the next process listening on `port`, as soon as one does; or why
/// the run stops instead (a signal, or the end of `--duration` after `remaining`).
pub(super) async fn wait_for_listener(
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
