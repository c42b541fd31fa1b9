//! One target's attachment to the shared programs: its slot in the maps (settings, listening
//! ports), its own program links (the loop thread's sampler, the nested-poll markers), and
//! the wait for its loop's first poll.
use std::{
    cell::RefCell,
    rc::Rc,
    time::{Duration, Instant},
};

use crate::{
    config::ProbeTuning,
    error_chain::error_chain,
    probes::{KernelMaps, ProbeError, Probes, Slot, TargetLinks, TargetProbes},
    target::Target,
};

/// How long to wait after attaching for the loop's first poll entry: the iteration in progress
/// when the probes attach has no known start, the ones after that entry are timed. An idle
/// Redis polls at least `hz` (10) times a second.
const FIRST_POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// The maps every target's consumer reads, in one place (one thread).
pub type SharedMaps = Rc<RefCell<KernelMaps>>;

/// A target attached: its slot and its own program links. [`Attachment::detach`] gives both
/// back.
pub struct Attachment {
    pub slot: Slot,
    links: TargetLinks,
    /// Whether polls nested in long commands are recognised.
    pub nested_poll_tracking: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "cannot watch {target}: the kernel's maps hold {max} targets and all are in use; raise \
         --max-targets"
    )]
    NoFreeSlot { target: String, max: u32 },
    #[error(transparent)]
    Probe(Box<ProbeError>),
}

impl From<ProbeError> for AttachError {
    fn from(error: ProbeError) -> Self {
        Self::Probe(Box::new(error))
    }
}

impl Attachment {
    /// Gives `target` a free slot tuned by `tuning`, attaches its own programs, and waits for
    /// its loop's first poll.
    pub fn attach(
        probes: &mut Probes,
        maps: &SharedMaps,
        tuning: &ProbeTuning,
        target: &Target,
        used_slots: &[Slot],
    ) -> Result<Self, AttachError> {
        let max = maps.borrow().max_targets();
        let slot = (0..max)
            .find(|slot| !used_slots.contains(slot))
            .ok_or_else(|| AttachError::NoFreeSlot {
                target: target.to_string(),
                max,
            })?;
        // The slot first: the sampler's first tick must find its target.
        {
            let mut maps = maps.borrow_mut();
            maps.add_target(slot, tuning.for_target(target.pid, target.main_tid))?;
            maps.set_listen_ports(slot, target.netns, &target.ports)?;
        }
        let links = match probes.attach_target(TargetProbes {
            pid: target.pid,
            tid: target.main_tid,
            exe: &target.exe,
            frequency_hz: tuning.frequency_hz,
            faults: tuning.fault_sample_interval_ns.is_some(),
        }) {
            Ok(links) => links,
            Err(error) => {
                let _ = maps.borrow_mut().remove_target(slot, target.pid);
                return Err(error.into());
            }
        };
        let nested_poll_tracking = match &links.nested_poll {
            Ok(_) => true,
            Err(error) => {
                log::warn!(
                    "{target}: {}; polls made during a long script or a load will end iterations early",
                    error_chain(error)
                );
                false
            }
        };
        wait_for_first_poll(&maps.borrow(), slot, target)?;
        Ok(Self {
            slot,
            links,
            nested_poll_tracking,
        })
    }

    /// Detaches the target's own programs and frees its slot (`pid`: the target's).
    pub fn detach(self, probes: &mut Probes, maps: &SharedMaps, pid: u32) {
        probes.detach_target(self.links);
        if let Err(error) = maps.borrow_mut().remove_target(self.slot, pid) {
            log::warn!("cannot free the slot of pid {pid}: {}", error_chain(&error));
        }
    }
}

/// Waits until the kernel has seen `target`'s event loop enter a poll, so that the iterations
/// from `attached` on are timed; a loop stalled right now gets a warning instead.
fn wait_for_first_poll(maps: &KernelMaps, slot: Slot, target: &Target) -> Result<(), ProbeError> {
    let deadline = Instant::now() + FIRST_POLL_TIMEOUT;
    // The first poll entry sets the start of the iteration after it.
    while maps.loop_state(slot)?.iteration_start_ns == 0 {
        if Instant::now() >= deadline {
            log::warn!(
                "{target}: the event loop has not entered a poll within {FIRST_POLL_TIMEOUT:?} of \
                 attaching (it may be stalled now); the iteration in progress is not timed"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
