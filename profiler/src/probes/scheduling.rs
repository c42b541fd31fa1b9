//! How the programs follow the event-loop thread on and off the CPU, and the targets' page
//! faults, without taxing the rest of the host ([`HostTax`]):
//! - per thread (the default): a context-switch perf event on each event-loop thread and a
//!   page-fault perf event on each thread of a target, which run for those threads alone; the
//!   return to the CPU is found at the thread's next event from the scheduler's own accounting
//!   ([`SchedLayout`]); the host-wide fault programs are attached only while a target takes
//!   faults ([`FaultPrograms`]);
//! - host-wide (where the kernel's BTF lacks that accounting): BTF tracepoints on
//!   `sched_switch` and `sched_wakeup`, and on page faults, for every thread of the host.
use std::time::{Duration, Instant};

use aya::programs::{
    PerfEvent,
    perf_event::{PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent},
    tp_btf::BtfTracePointLinkId,
};
use profiler_common::SchedLayout;

use super::{KernelMaps, MEMORY_PROGRAMS, ProbeError, Probes};
use crate::{error_chain::error_chain, kernel_layout::KernelLayout};

/// The per-thread context-switch program.
pub(super) const SWITCH_PROGRAM: &str = "loop_switch";
/// The per-thread page-fault program.
pub(super) const FAULT_TRIGGER_PROGRAM: &str = "thread_page_fault";
/// How long the targets must take no page fault before the fault programs are detached.
const FAULT_PROGRAMS_QUIET: Duration = Duration::from_secs(2);

/// What the rest of the host pays for the scheduler and fault programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostTax {
    /// Per-thread perf events: other threads pay nothing per context switch, and per page
    /// fault only while a target is taking faults.
    PerThread,
    /// Host-wide BTF tracepoints: every context switch, wake-up and page fault of the host
    /// runs a program.
    HostWide,
}

impl HostTax {
    /// Its name in records.
    pub fn name(self) -> &'static str {
        match self {
            Self::PerThread => "per_thread",
            Self::HostWide => "host_wide",
        }
    }

    /// For people: what this mode costs the rest of the host.
    pub fn describe(self) -> &'static str {
        match self {
            Self::PerThread => {
                "per-thread perf events: other processes pay nothing per context switch, and \
                 per page fault only while a watched server takes faults"
            }
            Self::HostWide => {
                "host-wide scheduler and page-fault tracepoints: every context switch, wake-up \
                 and page fault on the host runs a program"
            }
        }
    }
}

/// Where the scheduler's accounting lies in the running kernel (all zero, and host-wide
/// programs, when its BTF does not say), with why not, if not.
pub fn sched_layout() -> (SchedLayout, Option<String>) {
    let offsets = KernelLayout::of_running_kernel().and_then(|layout| {
        let offset = |structure, path| layout.offset_of(structure, path);
        Ok(SchedLayout {
            lazy_switch_in: 1,
            task_cfs_rq: offset("task_struct", "se.cfs_rq")?,
            cfs_rq_rq: offset("cfs_rq", "rq")?,
            rq_clock: offset("rq", "clock")?,
            last_arrival: offset("task_struct", "sched_info.last_arrival")?,
            run_delay: offset("task_struct", "sched_info.run_delay")?,
            state: offset("task_struct", "__state")?,
            _padding: 0,
        })
    });
    match offsets {
        Ok(layout) => (layout, None),
        Err(error) => (SchedLayout::default(), Some(error_chain(&error))),
    }
}

/// A target's own per-thread events.
pub struct ThreadLinks {
    /// The context-switch event of its event-loop thread.
    switches: Option<PerfEventLinkId>,
    /// The page-fault events of its threads (threads they start inherit them).
    faults: Vec<PerfEventLinkId>,
}

impl Probes {
    /// Attaches the per-thread events of the target `pid` whose event loop runs on `tid`:
    /// the context switches of `tid` and, with `faults`, the page faults of every thread.
    /// Nothing in host-wide mode.
    pub fn attach_threads(
        &mut self,
        pid: u32,
        tid: u32,
        faults: bool,
    ) -> Result<ThreadLinks, ProbeError> {
        let mut links = ThreadLinks {
            switches: None,
            faults: Vec::new(),
        };
        if self.host_tax != HostTax::PerThread {
            return Ok(links);
        }
        links.switches = Some(self.attach_per_thread(
            SWITCH_PROGRAM,
            SoftwareEvent::ContextSwitches,
            tid,
            false,
        )?);
        if faults {
            for thread in threads(pid) {
                match self.attach_per_thread(
                    FAULT_TRIGGER_PROGRAM,
                    SoftwareEvent::PageFaults,
                    thread,
                    true,
                ) {
                    Ok(link) => links.faults.push(link),
                    // A thread that ended meanwhile.
                    Err(error) if thread != tid => log::debug!("{}", error_chain(&error)),
                    Err(error) => {
                        self.detach_threads(links);
                        return Err(error);
                    }
                }
            }
        }
        Ok(links)
    }

    /// A perf event of `event` on thread `tid` alone (`inherit`: and the threads it starts),
    /// running `program` at each.
    fn attach_per_thread(
        &mut self,
        program: &'static str,
        event: SoftwareEvent,
        tid: u32,
        inherit: bool,
    ) -> Result<PerfEventLinkId, ProbeError> {
        self.program::<PerfEvent>(program)?
            .attach(
                PerfEventConfig::Software(event),
                PerfEventScope::OneProcess {
                    pid: tid,
                    cpu: None,
                },
                SamplePolicy::Period(1),
                inherit,
            )
            .map_err(|cause| ProbeError::Attach {
                program,
                what: format!("the {event:?} of thread {tid}"),
                cause,
            })
    }

    /// Detaches a target's per-thread events (its threads may be gone: best effort).
    pub fn detach_threads(&mut self, links: ThreadLinks) {
        let events = links
            .switches
            .into_iter()
            .map(|link| (SWITCH_PROGRAM, link))
            .chain(
                links
                    .faults
                    .into_iter()
                    .map(|link| (FAULT_TRIGGER_PROGRAM, link)),
            );
        for (name, link) in events {
            if let Ok(program) = self.program::<PerfEvent>(name)
                && let Err(error) = program.detach(link)
            {
                log::debug!("detaching {name}: {error}");
            }
        }
    }
}

impl Probes {
    /// Attaches the page-fault programs and detaches them again (they come on demand in
    /// per-thread mode): whether they can be.
    pub fn try_fault_programs(&mut self) -> Result<(), ProbeError> {
        let links = self.attach_btf_links(&MEMORY_PROGRAMS)?;
        self.detach_btf_links(&MEMORY_PROGRAMS, links);
        Ok(())
    }
}

/// The threads of process `pid` now.
fn threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

/// The host-wide page-fault programs, attached while a target takes faults: a target's
/// per-thread fault event asks for them ([`Self::wanted`]); they go once the targets' fault
/// counts have not moved for [`FAULT_PROGRAMS_QUIET`] ([`Self::release_if_quiet`]).
#[derive(Default)]
pub struct FaultPrograms {
    links: Option<Vec<BtfTracePointLinkId>>,
    /// The targets' fault counts at the last look, and when they last moved.
    last_counts: u64,
    moved: Option<Instant>,
}

impl FaultPrograms {
    /// A target took a fault they did not see: attach them (and tell the programs).
    pub fn wanted(&mut self, probes: &mut Probes, maps: &mut KernelMaps) {
        self.moved = Some(Instant::now());
        if self.links.is_some() {
            return;
        }
        match probes.attach_btf_links(&MEMORY_PROGRAMS) {
            Ok(links) => {
                self.links = Some(links);
                if let Err(error) = maps.set_fault_programs_on(true) {
                    log::warn!("{}", error_chain(&error));
                }
                log::debug!("page-fault programs attached");
            }
            Err(error) => log::warn!(
                "{}; page faults are counted but not classified",
                error_chain(&error)
            ),
        }
    }

    /// Detaches them once the targets' fault counts (`counts`, summed) have not moved for a
    /// while.
    pub fn release_if_quiet(&mut self, counts: u64, probes: &mut Probes, maps: &mut KernelMaps) {
        if counts != self.last_counts {
            self.last_counts = counts;
            self.moved = Some(Instant::now());
            return;
        }
        let quiet = self
            .moved
            .is_none_or(|moved| moved.elapsed() >= FAULT_PROGRAMS_QUIET);
        if !quiet {
            return;
        }
        let Some(links) = self.links.take() else {
            return;
        };
        if let Err(error) = maps.set_fault_programs_on(false) {
            log::warn!("{}", error_chain(&error));
        }
        probes.detach_btf_links(&MEMORY_PROGRAMS, links);
        log::debug!("page-fault programs detached: the targets took no fault for a while");
    }
}
