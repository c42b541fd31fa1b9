//! Stall assembly: the stack and madvise events of iterations in progress, kept until their
//! iteration ends -> an [`UnresolvedStall`] when a stall event names the iteration. Stacks are
//! unwound as they arrive, while the process's mappings are those they were taken in (a stack
//! event is 20 KiB of raw bytes; its unwound addresses are a few hundred).
use std::time::{Duration, Instant};

use profiler_common::{EVENT_KIND_ON_CPU, MadviseEvent, StackEvent, StallEvent};

use crate::{
    memory_map::MemoryMap,
    output::record::MadviseTotals,
    stack::StackKind,
    unwind::{RecordedStack, StackUnwinder},
};

/// Stack samples held for iterations still in progress (a 200 s stall at 999 Hz); more are
/// dropped and counted.
const MAX_PENDING_SAMPLES: usize = 200_000;
/// Event-loop madvise calls held for iterations still in progress; more are dropped and
/// counted.
const MAX_PENDING_MADVISE: usize = 200_000;

/// A stack sample waiting for its iteration to end: unwound, not yet named.
#[derive(Debug, Clone)]
pub struct PendingSample {
    pub iteration_start_ns: u64,
    pub kind: StackKind,
    pub weight_ns: u64,
    /// Kernel instruction pointers, leaf first.
    pub kernel: Vec<u64>,
    /// User lookup addresses, leaf first.
    pub user: Vec<u64>,
    /// With `--clients exact`: the event-loop thread's last read before the sample.
    pub last_read: Option<LastRead>,
}

/// The event-loop thread's last `read` before a sample: the descriptor, and the first bytes
/// it received (the request of the command running now begins there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRead {
    pub fd: u32,
    pub request: Vec<u8>,
}

impl LastRead {
    /// The last read `event` carries, if any.
    fn of(event: &StackEvent) -> Option<Self> {
        let fd = event.read_fd.checked_sub(1)?;
        let length = (event.request_len as usize).min(event.request.len());
        Some(Self {
            fd,
            request: event.request[..length].to_vec(),
        })
    }

    /// The read that most of `samples`' time carries (the command's client was read before
    /// the command's samples; a cron's file read before the cron's few).
    pub fn weightiest(samples: &[PendingSample]) -> Option<Self> {
        let mut weights: Vec<(&LastRead, u64)> = Vec::new();
        for sample in samples {
            let Some(read) = sample.last_read.as_ref() else {
                continue;
            };
            match weights.iter_mut().find(|(seen, _)| seen.fd == read.fd) {
                Some((seen, weight)) => {
                    *weight += sample.weight_ns;
                    // The request as one sample could copy it, if the first could not.
                    if seen.request.is_empty() {
                        *seen = read;
                    }
                }
                None => weights.push((read, sample.weight_ns)),
            }
        }
        weights
            .into_iter()
            .max_by_key(|(_, weight)| *weight)
            .map(|(read, _)| read.clone())
    }
}

/// An event-loop madvise call waiting for its iteration to end.
#[derive(Debug, Clone, Copy)]
struct PendingMadvise {
    iteration_start_ns: u64,
    bytes: u64,
    duration_ns: u64,
}

/// An iteration at or above the threshold with what was sampled in it, not yet named.
#[derive(Debug)]
pub struct UnresolvedStall {
    pub start_ns: u64,
    pub end_ns: u64,
    pub tid: u32,
    pub samples: Vec<PendingSample>,
    pub madvise: MadviseTotals,
    /// An io thread made the poll the iteration began or ended with.
    pub poll_handed_off: bool,
}

/// An iteration still running: when it began, now, its thread, and whether an io thread made
/// the poll it began with.
#[derive(Debug, Clone, Copy)]
pub struct RunningIteration {
    pub start_ns: u64,
    pub now_ns: u64,
    pub tid: u32,
    pub poll_handed_off: bool,
}

/// What the assembler received, kept and did, for the summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct AssemblyCounts {
    /// Stack samples received in all.
    pub received_samples: u64,
    /// Stack samples dropped because too many were pending.
    pub samples_not_kept: u64,
    /// Event-loop madvise calls dropped because too many were pending.
    pub madvise_not_kept: u64,
    pub stacks_unwound: u64,
    /// User stacks whose walk needed bytes beyond their copy.
    pub stacks_cut_short: u64,
    /// Time spent unwinding.
    pub unwind: Duration,
}

/// Collects the samples of iterations in progress and hands over those of a stall.
pub struct StallAssembler {
    unwinder: Box<dyn StackUnwinder>,
    sample_period_ns: u64,
    pending: Vec<PendingSample>,
    pending_madvise: Vec<PendingMadvise>,
    pub counts: AssemblyCounts,
}

impl StallAssembler {
    /// An assembler unwinding with `unwinder`, for on-CPU samples taken at `frequency_hz`.
    pub fn new(unwinder: Box<dyn StackUnwinder>, frequency_hz: u64) -> Self {
        Self {
            unwinder,
            sample_period_ns: 1_000_000_000 / frequency_hz.max(1),
            pending: Vec::new(),
            pending_madvise: Vec::new(),
            counts: AssemblyCounts::default(),
        }
    }

    /// Unwinds with `unwinder` from now on (another process, or a new program in the same
    /// one); what is pending is forgotten, the counts are kept.
    pub fn retarget(&mut self, unwinder: Box<dyn StackUnwinder>) {
        self.unwinder = unwinder;
        self.pending.clear();
        self.pending_madvise.clear();
    }

    /// The target's mappings as last read.
    pub fn memory_map(&self) -> &MemoryMap {
        self.unwinder.memory_map()
    }

    /// Unwinds a stack event now and keeps it until its iteration ends.
    pub fn add_stack(&mut self, event: &StackEvent) {
        self.counts.received_samples += 1;
        // Events arrive in order: samples of an earlier iteration belong to one that ended
        // below the threshold.
        self.pending
            .retain(|sample| sample.iteration_start_ns >= event.iteration_start_ns);
        if self.pending.len() >= MAX_PENDING_SAMPLES {
            self.counts.samples_not_kept += 1;
            return;
        }
        let samples = self.unwind(event);
        self.pending.extend(samples);
    }

    /// Keeps an event-loop madvise call until its iteration ends.
    pub fn add_madvise(&mut self, event: &MadviseEvent) {
        if event.iteration_start_ns == 0 {
            return; // another thread, or the event loop inside its poll
        }
        self.pending_madvise
            .retain(|call| call.iteration_start_ns >= event.iteration_start_ns);
        if self.pending_madvise.len() >= MAX_PENDING_MADVISE {
            self.counts.madvise_not_kept += 1;
            return;
        }
        self.pending_madvise.push(PendingMadvise {
            iteration_start_ns: event.iteration_start_ns,
            bytes: event.len,
            duration_ns: event.duration_ns,
        });
    }

    /// The stall of a stall event, with the samples taken during its iteration (handed over:
    /// they are pending no more).
    pub fn take_stall(&mut self, event: &StallEvent) -> UnresolvedStall {
        let start_ns = event.start_ns;
        let (samples, later) = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|sample| sample.iteration_start_ns >= start_ns)
            .partition(|sample| sample.iteration_start_ns == start_ns);
        self.pending = later;
        let madvise = self.madvise_in(start_ns);
        self.pending_madvise
            .retain(|call| call.iteration_start_ns > start_ns);
        UnresolvedStall {
            start_ns,
            end_ns: event.end_ns,
            tid: event.tid,
            samples,
            madvise,
            poll_handed_off: event.poll_handed_off != 0,
        }
    }

    /// The iteration still running, from what was sampled so far (kept for its final stall)
    /// and, when the thread is blocked now, the stacks it blocked with (`blocked`, whose
    /// `off_cpu_ns` says for how long so far).
    pub fn in_progress(
        &mut self,
        iteration: RunningIteration,
        blocked: Option<&StackEvent>,
    ) -> UnresolvedStall {
        let RunningIteration {
            start_ns,
            now_ns,
            tid,
            poll_handed_off,
        } = iteration;
        let mut samples: Vec<PendingSample> = self
            .pending
            .iter()
            .filter(|sample| sample.iteration_start_ns == start_ns)
            .cloned()
            .collect();
        if let Some(event) = blocked {
            samples.extend(self.unwind(event));
        }
        UnresolvedStall {
            start_ns,
            end_ns: now_ns,
            tid,
            samples,
            madvise: self.madvise_in(start_ns),
            poll_handed_off,
        }
    }

    /// The event-loop madvise calls of the iteration that began at `start_ns`, summed.
    fn madvise_in(&self, start_ns: u64) -> MadviseTotals {
        let mut totals = MadviseTotals::default();
        let mut duration_ns = 0;
        for call in &self.pending_madvise {
            if call.iteration_start_ns == start_ns {
                totals.calls += 1;
                totals.bytes += call.bytes;
                duration_ns += call.duration_ns;
            }
        }
        totals.us = duration_ns / 1_000;
        totals
    }

    /// A stack event's addresses, leaf first: its kernel instruction pointers and its user
    /// stack unwound.
    pub fn unwind_addresses(&mut self, event: &StackEvent) -> (Vec<u64>, Vec<u64>) {
        let user_stack =
            &event.user_stack[..(event.user_stack_len as usize).min(event.user_stack.len())];
        let recorded = RecordedStack {
            ip: event.user_ip,
            sp: event.user_sp,
            bp: event.user_bp,
            bytes: user_stack,
        };
        let started = Instant::now();
        let unwound = self.unwinder.unwind(&recorded);
        let user = unwound.lookup_addresses;
        self.counts.stacks_unwound += 1;
        self.counts.stacks_cut_short += u64::from(unwound.cut_short);
        self.counts.unwind += started.elapsed();
        let kernel = event.kernel_stack
            [..(event.kernel_frames as usize).min(event.kernel_stack.len())]
            .to_vec();
        (kernel, user)
    }

    /// The weighted samples of a stack event, unwound.
    fn unwind(&mut self, event: &StackEvent) -> Vec<PendingSample> {
        let (kernel, user) = self.unwind_addresses(event);
        let weights = if event.kind == EVENT_KIND_ON_CPU {
            [
                (StackKind::OnCpu, self.sample_period_ns),
                (StackKind::Runqueue, 0),
            ]
        } else {
            [
                (StackKind::OffCpu, event.off_cpu_ns),
                (StackKind::Runqueue, event.runqueue_ns),
            ]
        };
        weights
            .into_iter()
            .filter(|&(_, weight_ns)| weight_ns > 0)
            .map(|(kind, weight_ns)| PendingSample {
                iteration_start_ns: event.iteration_start_ns,
                kind,
                weight_ns,
                kernel: kernel.clone(),
                user: user.clone(),
                last_read: LastRead::of(event),
            })
            .collect()
    }
}
