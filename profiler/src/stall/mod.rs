//! Stalls, from kernel events to records, in two stages: [`assemble`] keeps the unwound
//! samples of iterations in progress and hands over those of an iteration that turned out to
//! be a stall; [`resolve`] symbolizes, attributes and sums them into the [`Stall`] record.
//! [`StallPipeline`] is both, bound to one process; it names page-fault samples the same way
//! (for [`crate::memory`]).
pub mod assemble;
pub mod resolve;

use std::time::Duration;

use profiler_common::{MadviseEvent, StackEvent, StallEvent};

pub use assemble::{AssemblyCounts, LastRead, RunningIteration, StallAssembler, UnresolvedStall};
pub use resolve::{StallContext, StallResolver, SymbolizeWork};

use crate::{
    attribute::{Attribution, Rules},
    clock::WallClock,
    output::record::Stall,
    stack::Frame,
    symbolize::{BlazeSymbols, SharedBlazesym, Symbolizer},
    unwind::{DwarfUnwinder, StackUnwinder},
};

/// What stall assembly needs to know of the run.
#[derive(Debug, Clone)]
pub struct StallSettings {
    pub threshold: Duration,
    /// On-CPU sampling frequency: each on-CPU sample weighs one period.
    pub frequency_hz: u64,
    pub rules: Rules,
}

/// Assembly and resolution of the stalls of one process.
pub struct StallPipeline {
    assembler: StallAssembler,
    resolver: StallResolver,
    /// The run's symbolizer, for the next process (`retarget`).
    symbols: SharedBlazesym,
}

impl StallPipeline {
    /// The pipeline of process `pid`: its unwinder and its symbols (looked up by the run's
    /// `symbols`), loaded now.
    pub fn new(
        pid: u32,
        settings: StallSettings,
        clock: WallClock,
        symbols: SharedBlazesym,
    ) -> Self {
        let (unwinder, symbolizer) = process_parts(pid, &symbols);
        let mut pipeline = Self::with_parts(pid, unwinder, symbolizer, settings, clock);
        pipeline.symbols = symbols;
        pipeline.warm_up();
        pipeline
    }

    /// A pipeline with the given unwinder and symbolizer (tests give recorded ones).
    pub fn with_parts(
        pid: u32,
        unwinder: Box<dyn StackUnwinder>,
        symbolizer: Symbolizer,
        settings: StallSettings,
        clock: WallClock,
    ) -> Self {
        Self {
            symbols: SharedBlazesym::default(),
            assembler: StallAssembler::new(unwinder, settings.frequency_hz),
            resolver: StallResolver::new(
                pid,
                settings.threshold,
                clock,
                symbolizer,
                settings.rules,
            ),
        }
    }

    /// Binds the pipeline to process `pid` (after an exec, or the next process with
    /// `--follow`): a new unwinder and new symbols, the counts kept.
    pub fn retarget(&mut self, pid: u32) {
        let (unwinder, symbolizer) = process_parts(pid, &self.symbols);
        self.assembler.retarget(unwinder);
        self.resolver.retarget(pid, symbolizer);
        self.warm_up();
    }

    fn warm_up(&mut self) {
        self.resolver.warm_up(self.assembler.memory_map());
    }

    pub fn add_stack(&mut self, event: &StackEvent) {
        self.assembler.add_stack(event);
    }

    pub fn add_madvise(&mut self, event: &MadviseEvent) {
        self.assembler.add_madvise(event);
    }

    /// The finished stall of a stall event, and the event-loop thread's last read its samples
    /// carry (`--clients exact`).
    pub fn stall(
        &mut self,
        event: &StallEvent,
        context: StallContext,
    ) -> (Stall, Option<LastRead>) {
        let unresolved = self.assembler.take_stall(event);
        let last_read = LastRead::weightiest(&unresolved.samples);
        let stall = self
            .resolver
            .resolve(unresolved, self.assembler.memory_map(), context);
        (stall, last_read)
    }

    /// The stall still running (see [`StallAssembler::in_progress`]).
    pub fn in_progress(
        &mut self,
        iteration: RunningIteration,
        blocked: Option<&StackEvent>,
    ) -> Stall {
        let unresolved = self.assembler.in_progress(iteration, blocked);
        self.resolver.resolve(
            unresolved,
            self.assembler.memory_map(),
            StallContext::default(),
        )
    }

    /// A page-fault sample's frames (leaf first) and what its growth is attributed to
    /// (`copy_on_write`: it copied a page shared with a child).
    pub fn name_growth(
        &mut self,
        event: &StackEvent,
        copy_on_write: bool,
    ) -> (Vec<Frame>, Attribution) {
        let (kernel, user) = self.assembler.unwind_addresses(event);
        let frames = self
            .resolver
            .frames(&kernel, &user, self.assembler.memory_map());
        let attribution = self
            .resolver
            .rules()
            .attribute_growth(copy_on_write, &frames);
        (frames, attribution)
    }

    pub fn counts(&self) -> AssemblyCounts {
        self.assembler.counts
    }

    pub fn work(&self) -> SymbolizeWork {
        self.resolver.work
    }
}

/// The unwinder and the symbolizer of process `pid`.
fn process_parts(pid: u32, symbols: &SharedBlazesym) -> (Box<dyn StackUnwinder>, Symbolizer) {
    (
        Box::new(DwarfUnwinder::new(pid)),
        Symbolizer::new(Box::new(BlazeSymbols::new(pid, symbols.clone()))).with_tail_calls(pid),
    )
}

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod tests;
