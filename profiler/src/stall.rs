//! Stall assembly: the stack events of an iteration (unwound as they arrive, while the
//! process's mappings are those they were taken in) and the iteration's stall event -> a
//! [`Stall`] with its on-CPU, off-CPU and run-queue time and its heaviest stacks, symbolized.
use std::{
    collections::HashMap,
    rc::Rc,
    time::{Duration, Instant, SystemTime},
};

use profiler_common::{EVENT_KIND_ON_CPU, MadviseEvent, StackEvent, StallEvent};
use serde::{Deserialize, Serialize};

use crate::{
    attribute::{Attribution, Rules, UNKNOWN},
    clock::{WallClock, deserialize_rfc3339, serialize_rfc3339},
    symbolize::Symbolizer,
    unwind::{RecordedStack, Unwinder},
};

/// Distinct stacks listed per stall; the lighter rest is summed per kind into one
/// [`OTHER_STACKS`] entry, so weights still add up.
pub const MAX_STACKS_PER_STALL: usize = 32;
/// Frame of the entry that sums the stacks beyond [`MAX_STACKS_PER_STALL`].
pub const OTHER_STACKS: &str = "[other stacks]";
/// Stack samples held for iterations still in progress (a 200 s stall at 999 Hz); more are
/// dropped and counted.
const MAX_PENDING_SAMPLES: usize = 200_000;

/// Where the event-loop thread was when a stack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackKind {
    /// Running on a CPU (a perf-event sample).
    OnCpu,
    /// Blocked off the CPU (sleep, I/O, lock, page fault...).
    OffCpu,
    /// Runnable but waiting for a CPU (preempted, or woken and not yet running).
    Runqueue,
}

impl StackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnCpu => "on_cpu",
            Self::OffCpu => "off_cpu",
            Self::Runqueue => "runqueue",
        }
    }
}

/// One distinct stack of a stall and the time spent in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedStack {
    pub weight_us: u64,
    pub kind: StackKind,
    /// What Redis was doing (see [`crate::attribute`]).
    #[serde(default = "unknown")]
    pub origin: String,
    /// Where the time went.
    #[serde(default = "unknown")]
    pub mechanism: String,
    /// Stack samples behind it (on-CPU ticks, off-CPU records).
    pub samples: u64,
    /// Leaf first: kernel frames (ending in `_[k]`), then user frames down to `main`.
    pub frames: Vec<String>,
}

fn unknown() -> String {
    UNKNOWN.to_owned()
}

/// The time of one (origin, mechanism) pair in a stall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakdownEntry {
    pub origin: String,
    pub mechanism: String,
    pub us: u64,
    /// Fraction of the stall's sampled time.
    pub share: f64,
}

/// One event-loop iteration at or above the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    /// When the iteration began (the poll before it returned).
    #[serde(
        rename = "time",
        serialize_with = "serialize_rfc3339",
        deserialize_with = "deserialize_rfc3339"
    )]
    pub start: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub duration_us: u64,
    pub threshold_us: u64,
    /// What Redis was doing: the origin carrying the most time.
    #[serde(default = "unknown")]
    pub origin: String,
    /// Where the time went: the mechanism carrying the most time.
    #[serde(default = "unknown")]
    pub mechanism: String,
    /// Every (origin, mechanism) pair with its time, heaviest first.
    #[serde(default)]
    pub breakdown: Vec<BreakdownEntry>,
    /// On-CPU samples times the sampling period (sampling starts at the gate).
    #[serde(default)]
    pub on_cpu_us: u64,
    /// Time blocked off the CPU, in blocks of at least `--min-block`.
    #[serde(default)]
    pub off_cpu_us: u64,
    /// Time runnable, waiting for a CPU.
    #[serde(default)]
    pub runqueue_us: u64,
    /// Stack samples taken in the stall (on-CPU ticks and off-CPU records).
    #[serde(default)]
    pub samples: u64,
    /// The heaviest distinct stacks, heaviest first.
    #[serde(default)]
    pub stacks: Vec<WeightedStack>,
    /// The event-loop thread's madvise calls inside the stall.
    #[serde(default)]
    pub madvise: MadviseTotals,
    /// The listening sockets' accept queues during the stall (when they are watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<crate::accept::StallAccept>,
    /// True when stack samples may be missing from this stall (the ring buffer was full, or too
    /// many were pending): its times and stacks are then lower bounds.
    #[serde(default)]
    pub incomplete: bool,
}

/// madvise calls summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadviseTotals {
    pub calls: u64,
    pub bytes: u64,
    pub us: u64,
}

#[cfg(test)]
impl Stall {
    /// A stall for tests: `duration_us` long, with this diagnosis and nothing sampled.
    pub(crate) fn example(origin: &str, mechanism: &str, duration_us: u64) -> Self {
        Self {
            start: SystemTime::UNIX_EPOCH,
            pid: 42,
            tid: 42,
            duration_us,
            threshold_us: 10_000,
            origin: origin.into(),
            mechanism: mechanism.into(),
            breakdown: Vec::new(),
            on_cpu_us: 0,
            off_cpu_us: 0,
            runqueue_us: 0,
            samples: 0,
            stacks: Vec::new(),
            madvise: MadviseTotals::default(),
            accept: None,
            incomplete: false,
        }
    }
}

/// A stack as it is told apart from others: its kind and its frames, leaf first.
type DistinctStack = (StackKind, Vec<Rc<str>>);

/// A stack sample waiting for its iteration to end: unwound, not yet named.
struct PendingSample {
    iteration_start_ns: u64,
    kind: StackKind,
    weight_ns: u64,
    kernel: Vec<u64>,
    user: Vec<u64>,
}

/// Collects the stack samples of iterations in progress and turns a stall event into a
/// [`Stall`].
pub struct StallAssembler {
    pid: u32,
    threshold: Duration,
    sample_period_ns: u64,
    clock: WallClock,
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    rules: Rules,
    pending: Vec<PendingSample>,
    /// The event-loop thread's madvise calls in iterations in progress: (iteration, bytes, ns).
    pending_madvise: Vec<(u64, u64, u64)>,
    /// Stack samples dropped because too many were pending.
    pub dropped_samples: u64,
    /// Stack samples received in all.
    pub received_samples: u64,
    /// The time spent unwinding and symbolizing.
    pub work: StackWork,
}

/// The assembler's own work on stacks, timed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StackWork {
    pub stacks_unwound: u64,
    pub unwind: Duration,
    pub samples_symbolized: u64,
    pub symbolize: Duration,
}

impl StallAssembler {
    pub fn new(
        pid: u32,
        threshold: Duration,
        frequency_hz: u64,
        clock: WallClock,
        unwinder: Unwinder,
        symbolizer: Symbolizer,
        rules: Rules,
    ) -> Self {
        Self {
            pid,
            threshold,
            sample_period_ns: 1_000_000_000 / frequency_hz.max(1),
            clock,
            unwinder,
            symbolizer,
            rules,
            pending: Vec::new(),
            pending_madvise: Vec::new(),
            dropped_samples: 0,
            received_samples: 0,
            work: StackWork::default(),
        }
    }

    /// Assembles the stalls of process `pid` from now on (after a restart or an exec), with
    /// its own unwinder and symbolizer; the counts so far are kept.
    pub fn follow(&mut self, pid: u32, unwinder: Unwinder, symbolizer: Symbolizer) {
        self.pid = pid;
        self.unwinder = unwinder;
        self.symbolizer = symbolizer;
        self.pending.clear();
        self.pending_madvise.clear();
    }

    /// Loads the symbols of the target's files and of the kernel now (see
    /// [`Symbolizer::warm_up`]).
    pub fn warm_up(&mut self) {
        self.symbolizer.warm_up(self.unwinder.memory_map());
    }

    /// Unwinds a stack event now and keeps it until its iteration ends.
    pub fn add_stack(&mut self, event: &StackEvent) {
        self.received_samples += 1;
        // Events arrive in order: samples of an earlier iteration belong to one that ended
        // below the threshold.
        self.pending
            .retain(|sample| sample.iteration_start_ns >= event.iteration_start_ns);
        if self.pending.len() >= MAX_PENDING_SAMPLES {
            self.dropped_samples += 1;
            return;
        }
        let samples = self.unwind(event);
        self.pending.extend(samples);
    }

    /// The weighted samples of a stack event, unwound.
    fn unwind(&mut self, event: &StackEvent) -> Vec<PendingSample> {
        let user_stack =
            &event.user_stack[..(event.user_stack_len as usize).min(event.user_stack.len())];
        let recorded = RecordedStack {
            ip: event.user_ip,
            sp: event.user_sp,
            bp: event.user_bp,
            bytes: user_stack,
        };
        let started = Instant::now();
        let user = self.unwinder.unwind(&recorded).lookup_addresses;
        self.work.stacks_unwound += 1;
        self.work.unwind += started.elapsed();
        let kernel = event.kernel_stack
            [..(event.kernel_frames as usize).min(event.kernel_stack.len())]
            .to_vec();
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
            })
            .collect()
    }

    /// Keeps an event-loop madvise call until its iteration ends.
    pub fn add_madvise(&mut self, event: &MadviseEvent) {
        if event.iteration_start_ns == 0 {
            return; // another thread, or the event loop inside its poll
        }
        self.pending_madvise
            .retain(|&(iteration, _, _)| iteration >= event.iteration_start_ns);
        if self.pending_madvise.len() < MAX_PENDING_SAMPLES {
            self.pending_madvise
                .push((event.iteration_start_ns, event.len, event.duration_ns));
        }
    }

    /// The stall of a stall event, with the samples taken during its iteration.
    pub fn stall(&mut self, event: &StallEvent) -> Stall {
        let stall = self.assemble(event.start_ns, event.end_ns, event.tid);
        self.pending
            .retain(|sample| sample.iteration_start_ns > event.start_ns);
        self.pending_madvise
            .retain(|&(iteration, _, _)| iteration > event.start_ns);
        stall
    }

    /// The iteration that began at `start_ns` and still runs at `now_ns`, from what was
    /// sampled so far (kept for its final stall) and, when the thread is blocked now, the stacks
    /// it blocked with (`blocked`, whose `off_cpu_ns` says for how long so far).
    pub fn in_progress(
        &mut self,
        start_ns: u64,
        now_ns: u64,
        tid: u32,
        blocked: Option<&StackEvent>,
    ) -> Stall {
        let blocked_samples = blocked.map(|event| self.unwind(event)).unwrap_or_default();
        let kept = self.pending.len();
        self.pending.extend(blocked_samples);
        let stall = self.assemble(start_ns, now_ns, tid);
        self.pending.truncate(kept);
        stall
    }

    fn assemble(&mut self, start_ns: u64, end_ns: u64, tid: u32) -> Stall {
        let mut madvise = MadviseTotals::default();
        let mut madvise_ns = 0;
        for &(iteration, bytes, duration_ns) in &self.pending_madvise {
            if iteration == start_ns {
                madvise.calls += 1;
                madvise.bytes += bytes;
                madvise_ns += duration_ns;
            }
        }
        madvise.us = madvise_ns / 1_000;

        let Self {
            pending,
            symbolizer,
            unwinder,
            rules,
            work,
            ..
        } = self;
        let symbolizing = Instant::now();
        let samples: Vec<&PendingSample> = pending
            .iter()
            .filter(|s| s.iteration_start_ns == start_ns)
            .collect();
        let mut totals_ns: HashMap<StackKind, u64> = HashMap::new();
        // (kind, frames) -> (weight, samples)
        let mut stacks: HashMap<DistinctStack, (u64, u64)> = HashMap::new();
        for sample in &samples {
            let mut frames = symbolizer.kernel_frames(&sample.kernel);
            frames.extend(symbolizer.user_frames(&sample.user, unwinder.memory_map()));
            *totals_ns.entry(sample.kind).or_default() += sample.weight_ns;
            let (weight_ns, count) = stacks.entry((sample.kind, frames)).or_default();
            *weight_ns += sample.weight_ns;
            *count += 1;
        }
        work.samples_symbolized += samples.len() as u64;
        work.symbolize += symbolizing.elapsed();
        let total_us = |kind| totals_ns.get(&kind).copied().unwrap_or(0) / 1_000;
        let stacks: Vec<AttributedStack> = stacks
            .into_iter()
            .map(|((kind, frames), (weight_ns, samples))| {
                let attribution = rules.attribute(kind, &frames);
                AttributedStack {
                    kind,
                    frames,
                    attribution,
                    weight_ns,
                    samples,
                }
            })
            .collect();
        let (origin, mechanism, breakdown) = breakdown(&stacks);
        Stall {
            start: self.clock.at(start_ns),
            pid: self.pid,
            tid,
            duration_us: end_ns.saturating_sub(start_ns) / 1_000,
            threshold_us: self.threshold.as_micros() as u64,
            origin,
            mechanism,
            breakdown,
            on_cpu_us: total_us(StackKind::OnCpu),
            off_cpu_us: total_us(StackKind::OffCpu),
            runqueue_us: total_us(StackKind::Runqueue),
            samples: samples.len() as u64,
            stacks: heaviest_stacks(stacks),
            madvise,
            accept: None,
            incomplete: false,
        }
    }
}

/// A distinct stack of a stall with its attribution and weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct AttributedStack {
    kind: StackKind,
    frames: Vec<Rc<str>>,
    attribution: Attribution,
    weight_ns: u64,
    samples: u64,
}

/// The stall's origin and mechanism (each the one with the most time) and every pair's time.
fn breakdown(stacks: &[AttributedStack]) -> (String, String, Vec<BreakdownEntry>) {
    let total_ns: u64 = stacks.iter().map(|stack| stack.weight_ns).sum();
    let mut pairs: HashMap<&Attribution, u64> = HashMap::new();
    let mut origins: HashMap<&str, u64> = HashMap::new();
    let mut mechanisms: HashMap<&str, u64> = HashMap::new();
    for stack in stacks {
        *pairs.entry(&stack.attribution).or_default() += stack.weight_ns;
        *origins.entry(&stack.attribution.origin).or_default() += stack.weight_ns;
        *mechanisms.entry(&stack.attribution.mechanism).or_default() += stack.weight_ns;
    }
    let heaviest = |weights: HashMap<&str, u64>| {
        weights
            .into_iter()
            .max_by(|(a_name, a_ns), (b_name, b_ns)| {
                a_ns.cmp(b_ns).then_with(|| b_name.cmp(a_name))
            })
            .map_or_else(|| UNKNOWN.to_owned(), |(name, _)| name.to_owned())
    };
    let mut entries: Vec<BreakdownEntry> = pairs
        .into_iter()
        .map(|(attribution, weight_ns)| BreakdownEntry {
            origin: attribution.origin.clone(),
            mechanism: attribution.mechanism.clone(),
            us: weight_ns / 1_000,
            share: if total_ns == 0 {
                0.0
            } else {
                (weight_ns as f64 / total_ns as f64 * 1000.0).round() / 1000.0
            },
        })
        .collect();
    entries.sort_by(|a, b| {
        b.us.cmp(&a.us)
            .then_with(|| (&a.origin, &a.mechanism).cmp(&(&b.origin, &b.mechanism)))
    });
    (heaviest(origins), heaviest(mechanisms), entries)
}

/// The heaviest [`MAX_STACKS_PER_STALL`] stacks, heaviest first, and the rest summed per kind
/// and attribution.
fn heaviest_stacks(mut stacks: Vec<AttributedStack>) -> Vec<WeightedStack> {
    stacks.sort_by(|a, b| b.weight_ns.cmp(&a.weight_ns).then_with(|| a.cmp(b)));
    let rest = stacks.split_off(stacks.len().min(MAX_STACKS_PER_STALL));
    let mut others: Vec<AttributedStack> = Vec::new();
    for stack in rest {
        match others
            .iter_mut()
            .find(|other| other.kind == stack.kind && other.attribution == stack.attribution)
        {
            Some(other) => {
                other.weight_ns += stack.weight_ns;
                other.samples += stack.samples;
            }
            None => others.push(AttributedStack {
                frames: vec![OTHER_STACKS.into()],
                ..stack
            }),
        }
    }
    others.sort_by(|a, b| b.weight_ns.cmp(&a.weight_ns).then_with(|| a.cmp(b)));
    stacks
        .into_iter()
        .chain(others)
        .map(|stack| WeightedStack {
            weight_us: stack.weight_ns / 1_000,
            kind: stack.kind,
            origin: stack.attribution.origin,
            mechanism: stack.attribution.mechanism,
            samples: stack.samples,
            frames: stack.frames.iter().map(|frame| frame.to_string()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use profiler_common::{EVENT_KIND_OFF_CPU, EVENT_KIND_STALL};

    use super::*;
    use crate::symbolize::tests::TableSymbols;

    fn assembler() -> StallAssembler {
        let names = HashMap::from([(0xffff_0010, "do_nanosleep"), (0xffff_0020, "schedule")]);
        let symbols = TableSymbols {
            names,
            lookups: Rc::new(Cell::new(0)),
        };
        // A process that does not exist: no module, user frames stay unknown.
        StallAssembler::new(
            u32::MAX - 1,
            Duration::from_millis(10),
            1000,
            WallClock::new(),
            Unwinder::new(u32::MAX - 1),
            Symbolizer::new(Box::new(symbols)),
            Rules::builtin(),
        )
    }

    fn stack_event(kind: u32, iteration_start_ns: u64, kernel: &[u64]) -> Box<StackEvent> {
        // SAFETY: StackEvent is plain data; all zeroes is a valid value.
        let mut event: Box<StackEvent> = unsafe { Box::new_zeroed().assume_init() };
        event.kind = kind;
        event.iteration_start_ns = iteration_start_ns;
        event.kernel_stack[..kernel.len()].copy_from_slice(kernel);
        event.kernel_frames = kernel.len() as u32;
        event.user_ip = 0x4242;
        event
    }

    fn stall_event(start_ns: u64, end_ns: u64) -> StallEvent {
        StallEvent {
            kind: EVENT_KIND_STALL,
            tid: 9,
            start_ns,
            end_ns,
        }
    }

    #[test]
    fn samples_of_the_stalled_iteration_make_its_times_and_stacks() {
        let mut assembler = assembler();
        let mut blocked = stack_event(EVENT_KIND_OFF_CPU, 1_000, &[0xffff_0020, 0xffff_0010]);
        blocked.off_cpu_ns = 290_000_000;
        blocked.runqueue_ns = 2_000_000;
        assembler.add_stack(&blocked);
        for _ in 0..5 {
            assembler.add_stack(&stack_event(EVENT_KIND_ON_CPU, 1_000, &[]));
        }
        let stall = assembler.stall(&stall_event(1_000, 300_001_000));
        assert_eq!(stall.duration_us, 300_000);
        assert_eq!(
            (stall.on_cpu_us, stall.off_cpu_us, stall.runqueue_us),
            (5_000, 290_000, 2_000)
        );
        assert_eq!(stall.samples, 7);
        let off_cpu = &stall.stacks[0];
        assert_eq!(
            (off_cpu.kind, off_cpu.weight_us, off_cpu.samples),
            (StackKind::OffCpu, 290_000, 1)
        );
        assert_eq!(
            off_cpu.frames,
            ["schedule_[k]", "do_nanosleep_[k]", "[unknown]"]
        );
        let on_cpu = stall
            .stacks
            .iter()
            .find(|stack| stack.kind == StackKind::OnCpu)
            .unwrap();
        assert_eq!((on_cpu.weight_us, on_cpu.samples), (5_000, 5));
        // do_nanosleep: a sleep; the off-CPU time carries the most weight.
        assert_eq!(
            (stall.origin.as_str(), stall.mechanism.as_str()),
            ("unknown", "syscall.sleep")
        );
        let shares: Vec<(&str, u64)> = stall
            .breakdown
            .iter()
            .map(|e| (e.mechanism.as_str(), e.us))
            .collect();
        assert_eq!(
            shares,
            [
                ("syscall.sleep", 290_000),
                ("cpu", 5_000),
                ("runqueue", 2_000)
            ]
        );
        assert!((stall.breakdown[0].share - 290.0 / 297.0).abs() < 0.001);
    }

    #[test]
    fn event_loop_madvise_calls_inside_the_stall_are_summed() {
        let mut assembler = assembler();
        let call = |iteration_start_ns, len, duration_ns| MadviseEvent {
            kind: profiler_common::EVENT_KIND_MADVISE,
            tid: 9,
            start_ns: iteration_start_ns + 1,
            duration_ns,
            len,
            iteration_start_ns,
            advice: 4,
            result: 0,
        };
        assembler.add_madvise(&call(500, 1 << 20, 5_000)); // an earlier iteration
        assembler.add_madvise(&call(1_000, 64 << 20, 40_000_000));
        assembler.add_madvise(&call(1_000, 64 << 20, 30_000_000));
        assembler.add_madvise(&call(0, 1 << 30, 1)); // another thread
        let stall = assembler.stall(&stall_event(1_000, 100_000_000));
        assert_eq!(
            stall.madvise,
            MadviseTotals {
                calls: 2,
                bytes: 128 << 20,
                us: 70_000
            }
        );
    }

    #[test]
    fn samples_of_iterations_that_ended_below_the_threshold_are_dropped() {
        let mut assembler = assembler();
        assembler.add_stack(&stack_event(EVENT_KIND_ON_CPU, 1_000, &[]));
        assembler.add_stack(&stack_event(EVENT_KIND_ON_CPU, 2_000, &[]));
        let stall = assembler.stall(&stall_event(2_000, 20_000_000));
        assert_eq!(stall.samples, 1);
        let empty = assembler.stall(&stall_event(3_000, 30_000_000));
        assert_eq!((empty.samples, empty.stacks.len()), (0, 0));
    }

    #[test]
    fn stacks_beyond_the_limit_are_summed_per_kind_and_attribution() {
        let stacks = (0..(MAX_STACKS_PER_STALL as u64 + 5))
            .map(|index| AttributedStack {
                kind: StackKind::OnCpu,
                frames: vec![format!("f{index}").into()],
                attribution: Attribution {
                    origin: "unknown".into(),
                    mechanism: "cpu".into(),
                },
                weight_ns: (index + 1) * 1_000,
                samples: 1,
            })
            .collect();
        let listed = heaviest_stacks(stacks);
        assert_eq!(listed.len(), MAX_STACKS_PER_STALL + 1);
        assert_eq!(listed[0].frames, ["f36"]);
        let other = listed.last().unwrap();
        assert_eq!(other.frames, [OTHER_STACKS]);
        assert_eq!((other.weight_us, other.samples), (1 + 2 + 3 + 4 + 5, 5));
    }
}
