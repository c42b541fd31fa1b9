//! Stall assembly and resolution on recorded bytes: stack events whose user stack is a chain of
//! return addresses in a recorded memory map, named from a table.
use std::{cell::Cell, collections::HashMap, rc::Rc, time::Duration};

use profiler_common::{
    EVENT_KIND_MADVISE, EVENT_KIND_OFF_CPU, EVENT_KIND_ON_CPU, EVENT_KIND_STALL, MadviseEvent,
    StackEvent, StallEvent,
};

use super::*;
use crate::{
    clock::WallClock,
    memory_map::MemoryMap,
    output::record::MadviseTotals,
    stack::{Frame, StackKind},
    symbolize::tests::TableSymbols,
    unwind::{RecordedStack, UserStack},
};

/// The recorded process: Redis's executable mapped at 0x1000-0x9000.
const MAPS: &str = "1000-9000 r-xp 00000000 fe:01 7 /usr/bin/redis-server\n";

/// Unwinds a recorded stack that is a plain chain of return addresses (one per 8-byte word,
/// up to a zero word), as a frame-pointer-free walk would find them.
struct ReturnAddressChain {
    memory_map: MemoryMap,
}

impl StackUnwinder for ReturnAddressChain {
    fn unwind(&mut self, stack: &RecordedStack<'_>) -> UserStack {
        let returns = stack
            .bytes
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().unwrap()))
            .take_while(|&address| address != 0)
            .map(|address| address - 1);
        UserStack {
            lookup_addresses: std::iter::once(stack.ip).chain(returns).collect(),
            cut_short: false,
        }
    }

    fn memory_map(&self) -> &MemoryMap {
        &self.memory_map
    }
}

fn pipeline() -> StallPipeline {
    let names = HashMap::from([
        (0xffff_0010, "do_nanosleep"),
        (0xffff_0020, "schedule"),
        (0x1100, "__GI___nanosleep"),
        (0x1200, "debugCommand"),
        (0x1300, "call"),
        (0x1400, "main"),
    ]);
    let symbols = TableSymbols {
        names,
        lookups: Rc::new(Cell::new(0)),
    };
    let unwinder = ReturnAddressChain {
        memory_map: MemoryMap::parse(MAPS),
    };
    let settings = StallSettings {
        threshold: Duration::from_millis(10),
        frequency_hz: 1000,
        rules: Rules::builtin(),
    };
    StallPipeline::with_parts(
        9,
        Box::new(unwinder),
        Symbolizer::new(Box::new(symbols)),
        settings,
        WallClock::new(),
    )
}

/// A stack event of `kind`: kernel frames `kernel`, and a user stack at `user[0]` whose
/// recorded bytes hold the return addresses `user[1..]`.
fn stack_event(
    kind: u32,
    iteration_start_ns: u64,
    kernel: &[u64],
    user: &[u64],
) -> Box<StackEvent> {
    let (ip, returns) = user
        .split_first()
        .map_or((0, &[][..]), |(ip, rest)| (*ip, rest));
    // SAFETY: StackEvent is plain data; all zeroes is a valid value.
    let mut event: Box<StackEvent> = unsafe { Box::new_zeroed().assume_init() };
    event.kind = kind;
    event.iteration_start_ns = iteration_start_ns;
    event.kernel_stack[..kernel.len()].copy_from_slice(kernel);
    event.kernel_frames = kernel.len() as u32;
    event.user_ip = ip;
    for (index, address) in returns.iter().enumerate() {
        event.user_stack[index * 8..index * 8 + 8].copy_from_slice(&address.to_le_bytes());
    }
    event.user_stack_len = (returns.len() * 8) as u32;
    event
}

/// A sleep in DEBUG, with one return address in code no symbol covers.
const SLEEP: [u64; 5] = [0x1100, 0x1201, 0x1301, 0x5001, 0x1401];
/// DEBUG itself on the CPU.
const DEBUG_ON_CPU: [u64; 4] = [0x1200, 0x1301, 0x5001, 0x1401];

fn stall_event(start_ns: u64, end_ns: u64) -> StallEvent {
    StallEvent {
        kind: EVENT_KIND_STALL,
        tid: 9,
        start_ns,
        end_ns,
        poll_handed_off: 0,
        pid: 9,
    }
}

#[test]
fn samples_of_the_stalled_iteration_make_its_times_and_named_stacks() {
    let mut pipeline = pipeline();
    let mut blocked = stack_event(
        EVENT_KIND_OFF_CPU,
        1_000,
        &[0xffff_0020, 0xffff_0010],
        &SLEEP,
    );
    blocked.off_cpu_ns = 290_000_000;
    blocked.runqueue_ns = 2_000_000;
    pipeline.add_stack(&blocked);
    for _ in 0..5 {
        pipeline.add_stack(&stack_event(EVENT_KIND_ON_CPU, 1_000, &[], &DEBUG_ON_CPU));
    }
    let stall = pipeline
        .stall(&stall_event(1_000, 300_001_000), StallContext::default())
        .0;
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
        [
            Frame::Kernel("schedule".into()),
            Frame::Kernel("do_nanosleep".into()),
            Frame::User("__GI___nanosleep".into()),
            Frame::User("debugCommand".into()),
            Frame::User("call".into()),
            Frame::Unnamed {
                module: "redis-server".into(),
                offset: 0x4000
            },
            Frame::User("main".into()),
        ]
    );
    // A sleep in DEBUG: the off-CPU time carries the most weight.
    assert_eq!(
        (stall.origin.as_str(), stall.mechanism.as_str()),
        ("command:debug", "syscall.sleep")
    );
    let shares: Vec<(&str, u64)> = stall
        .breakdown
        .iter()
        .map(|entry| (entry.mechanism.as_str(), entry.us))
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
    assert!(!stall.incomplete && stall.accept.is_none());
}

#[test]
fn the_context_of_a_stall_is_part_of_its_record() {
    let mut pipeline = pipeline();
    let context = StallContext {
        accept: Some(crate::output::record::StallAccept {
            overflows: 12,
            ..Default::default()
        }),
        incomplete: true,
    };
    let stall = pipeline.stall(&stall_event(1_000, 20_000_000), context).0;
    assert!(stall.incomplete);
    assert_eq!(stall.accept.map(|accept| accept.overflows), Some(12));
    assert_eq!((stall.origin.as_str(), stall.samples), ("unknown", 0));
}

fn madvise_call(iteration_start_ns: u64, len: u64, duration_ns: u64) -> MadviseEvent {
    MadviseEvent {
        kind: EVENT_KIND_MADVISE,
        tid: 9,
        start_ns: iteration_start_ns + 1,
        duration_ns,
        len,
        iteration_start_ns,
        advice: 4,
        result: 0,
        pid: 9,
        _padding: 0,
    }
}

#[test]
fn event_loop_madvise_calls_inside_the_stall_are_summed() {
    let mut pipeline = pipeline();
    pipeline.add_madvise(&madvise_call(500, 1 << 20, 5_000)); // an earlier iteration
    pipeline.add_madvise(&madvise_call(1_000, 64 << 20, 40_000_000));
    pipeline.add_madvise(&madvise_call(1_000, 64 << 20, 30_000_000));
    pipeline.add_madvise(&madvise_call(0, 1 << 30, 1)); // another thread
    let stall = pipeline
        .stall(&stall_event(1_000, 100_000_000), StallContext::default())
        .0;
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
fn madvise_calls_beyond_the_pending_limit_are_counted_as_not_kept() {
    let mut pipeline = pipeline();
    let limit = 200_000;
    for _ in 0..limit + 3 {
        pipeline.add_madvise(&madvise_call(1_000, 4096, 1_000));
    }
    assert_eq!(pipeline.counts().madvise_not_kept, 3);
    let stall = pipeline
        .stall(&stall_event(1_000, 100_000_000), StallContext::default())
        .0;
    assert_eq!(stall.madvise.calls, limit);
}

#[test]
fn samples_of_iterations_that_ended_below_the_threshold_are_dropped() {
    let mut pipeline = pipeline();
    pipeline.add_stack(&stack_event(EVENT_KIND_ON_CPU, 1_000, &[], &[]));
    pipeline.add_stack(&stack_event(EVENT_KIND_ON_CPU, 2_000, &[], &[]));
    let stall = pipeline
        .stall(&stall_event(2_000, 20_000_000), StallContext::default())
        .0;
    assert_eq!(stall.samples, 1);
    let empty = pipeline
        .stall(&stall_event(3_000, 30_000_000), StallContext::default())
        .0;
    assert_eq!((empty.samples, empty.stacks.len()), (0, 0));
}

#[test]
fn a_stall_in_progress_keeps_its_samples_for_the_final_one() {
    let mut pipeline = pipeline();
    pipeline.add_stack(&stack_event(EVENT_KIND_ON_CPU, 1_000, &[], &SLEEP));
    let mut blocked = stack_event(EVENT_KIND_OFF_CPU, 1_000, &[0xffff_0010], &SLEEP);
    blocked.off_cpu_ns = 150_000_000;
    let running = RunningIteration {
        start_ns: 1_000,
        now_ns: 151_001_000,
        tid: 9,
        poll_handed_off: false,
    };
    let so_far = pipeline.in_progress(running, Some(&blocked));
    assert_eq!((so_far.samples, so_far.off_cpu_us), (2, 150_000));
    assert_eq!(so_far.origin, "command:debug");
    let last = pipeline
        .stall(&stall_event(1_000, 300_001_000), StallContext::default())
        .0;
    assert_eq!(
        last.samples, 1,
        "the blocked stacks were not kept: {last:?}"
    );
}
