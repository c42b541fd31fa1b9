//! A consumer's parts that are not about events: what binds it to its process (the target,
//! the name its records go out with, its slot in the kernel's maps), the ledger of what it
//! lost, and the interval now running.
use std::{cell::Cell, rc::Rc};

use profiler_common::{COUNTERS, Counter};
use tokio::time::Instant;

use super::attachment::{Attachment, SharedMaps};
use crate::{
    output::record::{Instance, LostEvents, RunLosses, UserLoss},
    probes::{ProbeError, Slot},
    stall::AssemblyCounts,
    target::Target,
};

/// What binds a consumer to the process it watches now.
pub struct Binding {
    pub target: Target,
    pub maps: SharedMaps,
    /// Its slot and own programs (`None` once detached: `--follow` waiting).
    pub attachment: Option<Attachment>,
    /// Kernel-side counters of the targets followed before this one (`--follow`).
    earlier_counters: [u64; COUNTERS as usize],
}

impl Binding {
    pub fn new(target: Target, maps: SharedMaps, attachment: Attachment) -> Self {
        Self {
            target,
            maps,
            attachment: Some(attachment),
            earlier_counters: [0; COUNTERS as usize],
        }
    }

    /// The slot of the target in the maps (`None` while detached).
    pub fn slot(&self) -> Option<Slot> {
        self.attachment.as_ref().map(|attachment| attachment.slot)
    }

    /// A kernel counter over the whole run, earlier targets included.
    pub fn counter(&self, counter: Counter) -> Result<u64, ProbeError> {
        let now = match self.slot() {
            Some(slot) => self.maps.borrow().counter(slot, counter)?,
            None => 0,
        };
        Ok(now + self.earlier_counters[counter.index() as usize])
    }

    /// Keeps the counters of the target bound now, before its slot is freed (`--follow`).
    pub fn keep_counters(&mut self) -> Result<(), ProbeError> {
        for counter in Counter::ALL {
            self.earlier_counters[counter.index() as usize] = self.counter(counter)?;
        }
        Ok(())
    }
}

/// The name `target`'s records go out with.
pub fn instance_of(target: &Target) -> Instance {
    Instance {
        pid: target.pid,
        port: target.ports.first().copied(),
        name: target.name.clone(),
    }
}

/// What a consumer lost (the kernel's counters and its own), and what it has said so far.
pub struct LossLedger {
    /// What the run lost that belongs to no target (shown in every summary).
    run: Rc<Cell<RunLosses>>,
    /// Lost events already shown in an interval line.
    reported: u64,
    /// Stack samples lost (kernel and userspace) when the previous stall was assembled.
    samples_at_last_stall: u64,
}

impl LossLedger {
    pub fn new(run: Rc<Cell<RunLosses>>) -> Self {
        Self {
            run,
            reported: 0,
            samples_at_last_stall: 0,
        }
    }

    /// Every loss of the target: the kernel's counters and userspace's `counts`.
    pub fn lost_events(
        &self,
        binding: &Binding,
        counts: &AssemblyCounts,
    ) -> Result<LostEvents, ProbeError> {
        let mut kernel = [0; COUNTERS as usize];
        for counter in Counter::ALL {
            kernel[counter.index() as usize] = binding.counter(counter)?;
        }
        Ok(LostEvents::new(
            |counter| kernel[counter.index() as usize],
            |loss| match loss {
                UserLoss::StacksCutShort => counts.stacks_cut_short,
                UserLoss::SamplesNotKept => counts.samples_not_kept,
                UserLoss::MadviseNotKept => counts.madvise_not_kept,
            },
        ))
    }

    /// The losses since the last interval line, `total` being the count now.
    pub fn since_last_report(&mut self, total: u64) -> u64 {
        total.saturating_sub(std::mem::replace(&mut self.reported, total))
    }

    /// Whether stack samples were lost since the previous stall (the kernel could not send
    /// them, userspace could not keep them, or a time off the CPU ended unseen): the stall
    /// that comes now may lack some.
    pub fn samples_lost_since_last_stall(
        &mut self,
        binding: &Binding,
        counts: &AssemblyCounts,
    ) -> Result<bool, ProbeError> {
        let lost = binding.counter(Counter::StackEventsLost)?
            + binding.counter(Counter::OffCpuRecordsUnread)?
            + binding.counter(Counter::UnmatchedSwitchOuts)?
            + counts.samples_not_kept;
        Ok(lost > std::mem::replace(&mut self.samples_at_last_stall, lost))
    }

    /// What the run lost that belongs to no target.
    pub fn of_the_run(&self) -> RunLosses {
        self.run.get()
    }
}

/// The interval now running: when it began, and its stalls.
pub struct Interval {
    pub started: Instant,
    pub stalls: u64,
}

impl Interval {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            stalls: 0,
        }
    }

    /// Ends the interval: its stalls, and a new one begins.
    pub fn take(&mut self) -> u64 {
        std::mem::replace(self, Self::new()).stalls
    }
}
