//! Stall resolution: an [`UnresolvedStall`] and what the other stages know of its time (the
//! accept queues, whether samples were lost) -> the finished [`Stall`] record: its samples
//! symbolized, each distinct stack attributed, the breakdown by origin and mechanism, and the
//! heaviest stacks.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::assemble::UnresolvedStall;
use crate::{
    attribute::{Attribution, Rules, UNKNOWN},
    clock::WallClock,
    memory_map::MemoryMap,
    output::record::{BreakdownEntry, Instance, Stall, StallAccept, StallClient, WeightedStack},
    stack::{Frame, StackKind},
    symbolize::Symbolizer,
};

/// Distinct stacks listed per stall; the lighter rest is summed per kind and attribution into
/// one [`Frame::OtherStacks`] entry, so weights still add up.
pub const MAX_STACKS_PER_STALL: usize = 32;

/// What other stages know of a stall's time.
#[derive(Debug, Clone, Default)]
pub struct StallContext {
    /// The accept queues during the stall, when they are watched.
    pub accept: Option<StallAccept>,
    /// Samples may be missing (lost by the kernel, or not kept).
    pub incomplete: bool,
}

/// The resolver's own work, timed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SymbolizeWork {
    pub samples_symbolized: u64,
    pub symbolize: Duration,
}

/// Names and attributes the stalls of one process.
pub struct StallResolver {
    pid: u32,
    threshold_us: u64,
    clock: WallClock,
    symbolizer: Symbolizer,
    rules: Rules,
    pub work: SymbolizeWork,
}

/// A distinct stack of a stall with its attribution and weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct AttributedStack {
    kind: StackKind,
    frames: Vec<Frame>,
    attribution: Attribution,
    weight_ns: u64,
    samples: u64,
}

impl StallResolver {
    pub fn new(
        pid: u32,
        threshold: Duration,
        clock: WallClock,
        symbolizer: Symbolizer,
        rules: Rules,
    ) -> Self {
        Self {
            pid,
            threshold_us: threshold.as_micros() as u64,
            clock,
            symbolizer,
            rules,
            work: SymbolizeWork::default(),
        }
    }

    /// Names the stalls of process `pid` with `symbolizer` from now on; the work so far is
    /// kept.
    pub fn retarget(&mut self, pid: u32, symbolizer: Symbolizer) {
        self.pid = pid;
        self.symbolizer = symbolizer;
    }

    /// Loads the symbols of the files in `memory_map` and of the kernel now (see
    /// [`Symbolizer::warm_up`]).
    pub fn warm_up(&mut self, memory_map: &MemoryMap) {
        self.symbolizer.warm_up(memory_map);
    }

    /// The frames (leaf first) of a stack's kernel and user addresses, symbolized.
    pub fn frames(&mut self, kernel: &[u64], user: &[u64], memory_map: &MemoryMap) -> Vec<Frame> {
        let started = Instant::now();
        let mut frames = self.symbolizer.kernel_frames(kernel);
        frames.extend(self.symbolizer.user_frames(user, memory_map));
        self.work.samples_symbolized += 1;
        self.work.symbolize += started.elapsed();
        frames
    }

    /// The attribution rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The finished stall; `memory_map` places user code no symbol covers.
    pub fn resolve(
        &mut self,
        stall: UnresolvedStall,
        memory_map: &MemoryMap,
        context: StallContext,
    ) -> Stall {
        let mut totals_ns: HashMap<StackKind, u64> = HashMap::new();
        // (kind, frames) -> (weight, samples)
        let mut distinct: HashMap<(StackKind, Vec<Frame>), (u64, u64)> = HashMap::new();
        for sample in &stall.samples {
            let frames = self.frames(&sample.kernel, &sample.user, memory_map);
            *totals_ns.entry(sample.kind).or_default() += sample.weight_ns;
            let (weight_ns, count) = distinct.entry((sample.kind, frames)).or_default();
            *weight_ns += sample.weight_ns;
            *count += 1;
        }
        let mut stacks: Vec<AttributedStack> = distinct
            .into_iter()
            .map(|((kind, frames), (weight_ns, samples))| AttributedStack {
                attribution: self.rules.attribute(kind, &frames),
                kind,
                frames,
                weight_ns,
                samples,
            })
            .collect();
        name_the_unnamed_command(&mut stacks);
        if stall.poll_handed_off {
            name_the_wait_for_io_threads(&mut stacks);
        }
        let (origin, mechanism, breakdown) = breakdown(&stacks);
        let total_us = |kind| totals_ns.get(&kind).copied().unwrap_or(0) / 1_000;
        Stall {
            instance: Instance::default(),
            start: self.clock.at(stall.start_ns),
            pid: self.pid,
            tid: stall.tid,
            duration_us: stall.end_ns.saturating_sub(stall.start_ns) / 1_000,
            threshold_us: self.threshold_us,
            origin,
            mechanism,
            breakdown,
            on_cpu_us: total_us(StackKind::OnCpu),
            off_cpu_us: total_us(StackKind::OffCpu),
            runqueue_us: total_us(StackKind::Runqueue),
            samples: stall.samples.len() as u64,
            stacks: heaviest_stacks(stacks),
            madvise: stall.madvise,
            accept: context.accept,
            incomplete: context.incomplete,
            poll_handed_off: stall.poll_handed_off,
            client: StallClient::default(),
            waiting: None,
        }
    }
}

/// The origin and mechanism of a stall made of `stacks` (kind, frames, weight in ns), as
/// [`StallResolver::resolve`] names it.
#[cfg(test)]
pub(crate) fn diagnose(
    rules: &Rules,
    stacks: impl Iterator<Item = (StackKind, Vec<Frame>, u64)>,
    poll_handed_off: bool,
) -> (String, String) {
    let mut attributed: Vec<AttributedStack> = stacks
        .map(|(kind, frames, weight_ns)| AttributedStack {
            attribution: rules.attribute(kind, &frames),
            kind,
            frames,
            weight_ns,
            samples: 1,
        })
        .collect();
    name_the_unnamed_command(&mut attributed);
    if poll_handed_off {
        name_the_wait_for_io_threads(&mut attributed);
    }
    let (origin, mechanism, _) = breakdown(&attributed);
    (origin, mechanism)
}

/// An origin inside a command whose frames do not say which (work `call` does around it, a
/// frame without a name below it).
const UNNAMED_COMMAND: &str = "command:unknown";

/// Work inside `call` whose command the frames do not name belongs to the command the stall's
/// other stacks name, when they name exactly one: a stall's iteration runs one long command
/// (what `call` does after it, such as a first latency histogram's allocation, is its work).
fn name_the_unnamed_command(stacks: &mut [AttributedStack]) {
    let mut named = stacks
        .iter()
        .map(|stack| &stack.attribution.origin)
        .filter(|origin| origin.starts_with("command:") && origin.as_str() != UNNAMED_COMMAND);
    let Some(command) = named.next().cloned() else {
        return;
    };
    if named.any(|other| *other != command) {
        return;
    }
    for stack in stacks {
        if stack.attribution.origin == UNNAMED_COMMAND {
            stack.attribution.origin = command.clone();
        }
    }
}

/// The origins of the loop's own wrappers: where it turns between activities.
const LOOP_WRAPPERS: [&str; 3] = ["before_sleep", "after_sleep", "event_loop"];
/// The loop waiting for its io threads.
const IO_THREADS_WAIT: &str = "io_threads.wait";

/// A loop that handed its poll to an io thread turns without blocking until the io threads
/// give back their results (the poll's, the reads' and writes'): in such an iteration, time in
/// the loop's wrappers alone is that wait, not work of theirs.
fn name_the_wait_for_io_threads(stacks: &mut [AttributedStack]) {
    for stack in stacks {
        if LOOP_WRAPPERS.contains(&stack.attribution.origin.as_str()) {
            stack.attribution.origin = IO_THREADS_WAIT.to_owned();
        }
    }
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
                frames: vec![Frame::OtherStacks],
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
            frames: stack.frames,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributed(origin: &str, weight_ns: u64) -> AttributedStack {
        AttributedStack {
            kind: StackKind::OnCpu,
            frames: vec![Frame::User(origin.into())],
            attribution: Attribution {
                origin: origin.into(),
                mechanism: "cpu".into(),
            },
            weight_ns,
            samples: 1,
        }
    }

    #[test]
    fn with_its_poll_handed_off_the_loop_s_turns_are_its_wait_for_the_io_threads() {
        let mut stacks = vec![
            attributed("before_sleep", 40),
            attributed("after_sleep", 20),
            attributed("command:get", 30),
            attributed("io_threads.reads", 10),
        ];
        name_the_wait_for_io_threads(&mut stacks);
        let origins: Vec<&str> = stacks
            .iter()
            .map(|s| s.attribution.origin.as_str())
            .collect();
        assert_eq!(
            origins,
            [
                IO_THREADS_WAIT,
                IO_THREADS_WAIT,
                "command:get",
                "io_threads.reads"
            ]
        );
        assert_eq!(breakdown(&stacks).0, IO_THREADS_WAIT);
    }

    /// The wrappers' names are the built-in rules' categories: a stall of the loop turning
    /// (its wrappers alone) is the wait when its poll was handed off, and the wrapper else.
    #[test]
    fn the_built_in_wrappers_are_the_ones_a_handed_off_iteration_renames() {
        let rules = Rules::builtin();
        for (function, wrapper) in [
            ("beforeSleep", "before_sleep"),
            ("afterSleep", "after_sleep"),
            ("aeProcessEvents", "event_loop"),
        ] {
            let stack = || {
                let frames = [function, "aeMain", "main"].map(|name| Frame::User(name.into()));
                std::iter::once((StackKind::OnCpu, frames.to_vec(), 1_000))
            };
            assert_eq!(diagnose(&rules, stack(), false).0, wrapper);
            assert_eq!(diagnose(&rules, stack(), true).0, IO_THREADS_WAIT);
        }
    }

    #[test]
    fn work_in_an_unnamed_command_goes_to_the_one_command_named_in_the_stall() {
        let mut one = vec![
            attributed("command:del|unlink", 10),
            attributed(UNNAMED_COMMAND, 30),
            attributed("cron.other", 5),
        ];
        name_the_unnamed_command(&mut one);
        let origins: Vec<&str> = one.iter().map(|s| s.attribution.origin.as_str()).collect();
        assert_eq!(
            origins,
            ["command:del|unlink", "command:del|unlink", "cron.other"]
        );

        let mut two = vec![
            attributed("command:keys", 10),
            attributed("command:get", 10),
            attributed(UNNAMED_COMMAND, 30),
        ];
        name_the_unnamed_command(&mut two);
        assert_eq!(
            two[2].attribution.origin, UNNAMED_COMMAND,
            "two commands: no guess"
        );

        let mut none = vec![attributed(UNNAMED_COMMAND, 30)];
        name_the_unnamed_command(&mut none);
        assert_eq!(none[0].attribution.origin, UNNAMED_COMMAND);
    }

    #[test]
    fn stacks_beyond_the_limit_are_summed_per_kind_and_attribution() {
        let stacks = (0..(MAX_STACKS_PER_STALL as u64 + 5))
            .map(|index| AttributedStack {
                kind: StackKind::OnCpu,
                frames: vec![Frame::User(format!("f{index}").into())],
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
        assert_eq!(listed[0].frames, [Frame::User("f36".into())]);
        let other = listed.last().unwrap();
        assert_eq!(other.frames, [Frame::OtherStacks]);
        assert_eq!((other.weight_us, other.samples), (1 + 2 + 3 + 4 + 5, 5));
    }
}
