//! The kernel programs loaded for one target and attached to it, the maps userspace reads, and
//! the wait for the loop's first poll.
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use crate::{
    config::ProbeTuning,
    probes::{KernelLog, KernelMaps, NESTED_POLL_FUNCTION, ProbeError, Probes, Slot},
    target::Target,
};

/// How long to wait after attaching for the loop's first poll entry: the iteration in progress
/// when the probes attach has no known start, the ones after that entry are timed. An idle
/// Redis polls at least `hz` (10) times a second.
const FIRST_POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// The slot of the one target a run watches.
pub const TARGET_SLOT: Slot = 0;

/// Probes attached to one target; dropping `probes` detaches them.
pub struct Attachment {
    pub probes: Probes,
    pub events: RingBuf<MapData>,
    pub maps: KernelMaps,
    /// The programs' rare-path messages (`-vv`).
    pub kernel_log: Option<KernelLog>,
    /// Whether polls nested in long commands are recognised.
    pub nested_poll_tracking: bool,
}

impl Attachment {
    /// Loads the programs tuned by `tuning` for `target`, attaches them to the poll entry
    /// `tracepoints` and the rest, and waits for the loop's first poll.
    pub fn attach(
        tuning: &ProbeTuning,
        target: &Target,
        tracepoints: &[String],
    ) -> Result<Self, ProbeError> {
        if (tuning.ring_buffer_bytes as usize) < size_of::<profiler_common::StackEvent>() + 8 {
            log::warn!(
                "--ring-buffer-kib {} holds no stack event ({} bytes each): every stack sample will be lost",
                tuning.ring_buffer_bytes / 1024,
                size_of::<profiler_common::StackEvent>()
            );
        }
        let mut probes = Probes::load(tuning.probe_settings())?;
        // The scheduler programs before the poll entries: an iteration the poll timer starts
        // must not miss the switch-out that tells it the loop went idle.
        probes.attach_scheduler()?;
        probes.attach_poll_tracepoints(tracepoints)?;
        probes.attach_madvise()?;
        probes.attach_connections()?;
        probes.attach_sampler(target.main_tid, tuning.frequency_hz)?;
        let nested_poll_tracking = match probes.attach_nested_poll_markers(
            NESTED_POLL_FUNCTION,
            &target.exe,
            target.pid,
        ) {
            Ok(()) => true,
            Err(error) => {
                log::warn!(
                    "{}; polls made during a long script or a load will end iterations early",
                    crate::error_chain::error_chain(&error)
                );
                false
            }
        };
        let kernel_log = probes.take_kernel_log();
        let events = probes.take_events()?;
        let mut maps = probes.take_maps()?;
        maps.add_target(TARGET_SLOT, tuning.for_target(target.pid, target.main_tid))?;
        maps.set_listen_ports(TARGET_SLOT, &target.ports)?;
        wait_for_first_poll(&maps, TARGET_SLOT)?;
        Ok(Self {
            probes,
            events,
            maps,
            kernel_log,
            nested_poll_tracking,
        })
    }
}

/// Waits until the kernel has seen the event loop enter a poll, so that the iterations from
/// `attached` on are timed; a loop stalled right now gets a warning instead.
fn wait_for_first_poll(maps: &KernelMaps, slot: Slot) -> Result<(), ProbeError> {
    let deadline = Instant::now() + FIRST_POLL_TIMEOUT;
    // The first poll entry sets the start of the iteration after it.
    while maps.loop_state(slot)?.iteration_start_ns == 0 {
        if Instant::now() >= deadline {
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
