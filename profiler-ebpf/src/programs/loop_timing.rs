//! Loop timing: where an event-loop iteration begins and ends, its histogram, and stall events.
//! Only poll *entries* are traced (a syscall tracepoint costs more than anything the program
//! does); `sched_switch` tells a poll that blocked from one that did not.
//!
//! Each target's loop state (`LoopState`, in its slot) moves with its event-loop thread:
//!
//! | what happens                                 | state before              | what the programs do                                            |
//! |----------------------------------------------|---------------------------|-----------------------------------------------------------------|
//! | outermost poll entered                       | iteration running         | time it (histogram, max, stall event); the next begins now      |
//! | the thread blocks inside an outermost poll   | iteration running         | `blocked_in_poll = 1`: the loop is idle                         |
//! | the thread runs again                        | `blocked_in_poll`         | `blocked_in_poll = 0`; the next iteration begins now            |
//! | the thread leaves the CPU inside an iteration| iteration running         | `switch_out_ns`, the stacks it left with (`stacks`)             |
//! | the thread is woken                          | `switch_out_ns != 0`      | `wakeup_ns`                                                     |
//! | the thread runs again                        | `switch_out_ns != 0`      | off-CPU record if long enough and past the gate (`stacks`)      |
//! | poll entered with a switch-in never seen     | off the CPU, or idle      | count `UnmatchedSwitchOuts`; an idle loop's iteration is not timed |
//! | `processEventsWhileBlocked` entered / left   | any                       | `nested_depth` +1 / -1: its polls are not boundaries           |
//! | another thread polls the loop's epoll fd     | iteration running         | time it: the loop's poll, handed off (Valkey's io threads)     |
use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_current_task,
    macros::{btf_tracepoint, perf_event, tracepoint, uprobe, uretprobe},
    programs::{
        BtfTracePointContext, PerfEventContext, ProbeContext, RetProbeContext, TracePointContext,
    },
};
use aya_log_ebpf::debug;
use profiler_common::{
    Counter, EVENT_KIND_EXEC, EVENT_KIND_STALL, ExecEvent, ITERATION_BUCKETS, LoopState,
    StallEvent, iteration_bucket,
};

use super::{
    ITERATION_HISTOGRAM, ITERATION_MAX, LOOP_TASKS, SOLE_LOOP_TASK, Target, any_loop_off_cpu,
    count, current_loop_thread, current_target, current_target_thread, entry, is_sole_loop_thread,
    loop_state, loop_task_slot, loops_off_cpu_add, now_ns, running_loop, send, settings,
    sole_target, stacks,
};

/// Task state of a thread that left the CPU still runnable (preempted, or rescheduled on its
/// way back to user mode), as opposed to blocked.
const TASK_RUNNING: u32 = 0;

/// Offset of the epoll descriptor (`int epfd`, the first argument) in the `sys_enter_epoll_wait`,
/// `_epoll_pwait` and `_epoll_pwait2` records (`/sys/kernel/tracing/events/syscalls/*/format`).
const POLL_FD_OFFSET: usize = 16;

/// `sys_enter_epoll_wait`, `_epoll_pwait`, `_epoll_pwait2`: the iteration in progress ends,
/// and the next one begins now unless the thread blocks in this poll (see sched_switch).
/// Another thread of the target polling the loop's own epoll descriptor makes the loop's poll
/// for it (Valkey 8 and later hand it to an io thread under load): that ends the iteration too.
#[tracepoint]
pub fn poll_entry(ctx: TracePointContext) -> u32 {
    let Some((target, on_loop_thread)) = current_target_thread() else {
        return 0;
    };
    let slot = target.slot;
    let Some(state) = loop_state(slot) else {
        return 0;
    };
    // SAFETY: a tracepoint program may load its record directly; the descriptor is an int at
    // its documented offset.
    let poll_fd = unsafe {
        *(ctx.as_ptr() as *const u8)
            .add(POLL_FD_OFFSET)
            .cast::<u32>()
    };
    if on_loop_thread {
        state.poll_fd = u64::from(poll_fd);
        stacks::resume(&target, state);
    } else if state.poll_fd == 0
        || u64::from(poll_fd) != state.poll_fd
        || state.blocked_in_poll != 0
    {
        // Another descriptor (an io thread's own loop), or the loop is idle in its own poll.
        return 0;
    }
    if state.nested_depth > 0 {
        return 0;
    }
    let now_ns = now_ns();
    if !on_loop_thread {
        // The loop's trips off the CPU are the loop thread's programs' to follow.
        time_iteration(&target, state, now_ns, true);
        return 0;
    }
    // Running here means any time off the CPU has ended. If the return to the CPU was not
    // seen, that off-CPU time is not reported; and if the thread had gone idle in a poll, the
    // iteration's start is unknown, so it is not timed.
    let missed_switch_in = core::mem::replace(&mut state.switch_out_ns, 0) != 0;
    let missed_wake_up = core::mem::replace(&mut state.blocked_in_poll, 0) != 0;
    if missed_switch_in {
        loops_off_cpu_add(-1);
    }
    if missed_switch_in || missed_wake_up {
        count(slot, Counter::UnmatchedSwitchOuts);
        debug!(
            &ctx,
            "poll entered without the switch-in after a switch-out (in an iteration: {}, idle: {})",
            u8::from(missed_switch_in),
            u8::from(missed_wake_up)
        );
    }
    // The first entry after attaching has no iteration before it; after a poll it went idle
    // in, the iteration's start is unknown.
    if missed_wake_up {
        count(slot, Counter::IterationsNotTimed);
        state.iteration_start_ns = now_ns;
        state.poll_handed_off = 0;
        return 0;
    }
    time_iteration(&target, state, now_ns, false);
    0
}

/// Keeps the loop thread's task, `current`, where the scheduler programs look for it as
/// `next` (LOOP_TASKS, or SOLE_LOOP_TASK): noted when it leaves the CPU, if it changed (the
/// first time, and after an exec).
#[inline(always)]
fn remember_loop_task(state: &mut LoopState, slot: u32, current: u64) {
    if state.task == current {
        return;
    }
    if sole_target() {
        if let Some(task) = entry(&SOLE_LOOP_TASK, 0, 1, 0) {
            *task = current;
            state.task = current;
        }
        return;
    }
    if state.task != 0 {
        let _ = LOOP_TASKS.remove(&state.task);
    }
    if LOOP_TASKS.insert(&current, &slot, 0).is_ok() {
        state.task = current;
    } else {
        count(slot, Counter::LoopTasksUntracked);
    }
}

/// The iteration in progress ends at `now_ns` and the next begins, at a poll another thread
/// made for the loop when `handed_off`: it is counted in the histogram, and sent as a stall
/// when it reached the threshold.
#[inline(always)]
fn time_iteration(target: &Target, state: &mut LoopState, now_ns: u64, handed_off: bool) {
    let start_ns = core::mem::replace(&mut state.iteration_start_ns, now_ns);
    let began_handed_off = core::mem::replace(&mut state.poll_handed_off, u64::from(handed_off));
    if start_ns == 0 {
        return;
    }
    let duration_ns = now_ns.saturating_sub(start_ns);
    let slot = target.slot;
    if let Some(bucket) = entry(
        &ITERATION_HISTOGRAM,
        slot,
        ITERATION_BUCKETS,
        iteration_bucket(duration_ns),
    ) {
        *bucket += 1;
    }
    if let Some(max_ns) = entry(&ITERATION_MAX, slot, 1, 0)
        && duration_ns > *max_ns
    {
        *max_ns = duration_ns;
    }
    if duration_ns >= target.settings.threshold_ns {
        let event = StallEvent {
            kind: EVENT_KIND_STALL,
            tid: target.settings.loop_tid,
            start_ns,
            end_ns: now_ns,
            // The loop hands its poll off in before-sleep and turns until an io thread makes
            // it: an iteration that ends at that poll waited for it too.
            poll_handed_off: u32::from(began_handed_off != 0 || handed_off),
            pid: target.settings.pid,
        };
        send(&event, slot, Counter::StallEventsLost);
    }
}

/// Uprobe on `processEventsWhileBlocked`: polls from here on are nested in one iteration.
#[uprobe]
pub fn nested_poll_begin(_ctx: ProbeContext) -> u32 {
    if let Some(target) = current_loop_thread()
        && let Some(state) = loop_state(target.slot)
    {
        state.nested_depth += 1;
    }
    0
}

/// Uretprobe on `processEventsWhileBlocked`: nested polling is over.
#[uretprobe]
pub fn nested_poll_end(_ctx: RetProbeContext) -> u32 {
    if let Some(target) = current_loop_thread()
        && let Some(state) = loop_state(target.slot)
    {
        state.nested_depth = state.nested_depth.saturating_sub(1);
    }
    0
}

/// `sched_switch(preempt, prev, next, prev_state)`: an event-loop thread leaves or regains a
/// CPU. With a sole target, both are compared with its ids and task; otherwise whether `prev`
/// is one is known from this CPU's running loop (no lookup), and `next` is looked up by its
/// task.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    if let Some((slot, current)) = loop_leaving_cpu() {
        if let Some(settings) = settings(slot)
            && let Some(state) = loop_state(slot)
        {
            remember_loop_task(state, slot, current);
            let preempt = ctx.arg::<u64>(0) & 1 != 0;
            let prev_state = ctx.arg::<u64>(3) as u32;
            let target = Target { slot, settings };
            stacks::switched_out(
                ctx.as_ptr(),
                &target,
                state,
                preempt || prev_state == TASK_RUNNING,
            );
        }
        if sole_target() {
            return 0; // the next task is not the sole loop: it is the one leaving
        }
    }
    let next: u64 = ctx.arg(2);
    let Some(slot) = loop_task_slot(next) else {
        return 0;
    };
    let (Some(settings), Some(state)) = (settings(slot), loop_state(slot)) else {
        return 0;
    };
    if !sole_target()
        && let Some(running) = running_loop()
    {
        running.task = next;
        running.slot = u64::from(slot);
    }
    if state.blocked_in_poll != 0 {
        // Back from a poll it blocked in: the loop has its events, an iteration begins.
        state.blocked_in_poll = 0;
        state.iteration_start_ns = now_ns();
        count(slot, Counter::BlockingPolls);
    } else if state.switch_out_ns != 0 {
        stacks::switched_in(&ctx, &Target { slot, settings }, state);
    }
    0
}

/// A per-thread context-switch perf event on an event-loop thread (the lazy switch-in of
/// [`SchedLayout`]): it fires as the thread leaves the CPU, while it is still current, and for
/// no other thread of the host. Its return before this (it ran since its last switch-out) is
/// accounted for first.
#[perf_event]
pub fn loop_switch(ctx: PerfEventContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    if tid != target.settings.loop_tid {
        return 0;
    }
    let Some(state) = loop_state(target.slot) else {
        return 0;
    };
    stacks::resume(&target, state);
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let task_state = stacks::read_kernel::<u32>(task + u64::from(global!(SCHED_LAYOUT).state));
    stacks::switched_out(
        ctx.as_ptr(),
        &target,
        state,
        task_state.is_some_and(|task_state| task_state == TASK_RUNNING),
    );
    0
}

/// The slot and task of the event-loop thread leaving this CPU, if the current thread is one:
/// the sole target's by its ids, otherwise this CPU's running loop (no lookup), which it then
/// is no more.
#[inline(always)]
fn loop_leaving_cpu() -> Option<(u32, u64)> {
    if sole_target() {
        // SAFETY: a helper without arguments.
        return is_sole_loop_thread().then(|| (0, unsafe { bpf_get_current_task() }));
    }
    let running = running_loop()?;
    if running.task == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let current = unsafe { bpf_get_current_task() };
    if running.task != current {
        return None;
    }
    running.task = 0;
    Some((running.slot as u32, current))
}

/// `sched_wakeup(p)`: note when an event-loop thread, blocked inside an iteration, is woken.
/// While no loop thread is off the CPU inside an iteration (nearly always), nothing is looked up.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    if !any_loop_off_cpu() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    if let Some(slot) = loop_task_slot(task)
        && let Some(state) = loop_state(slot)
        && state.switch_out_ns != 0
        && state.wakeup_ns == 0
    {
        state.wakeup_ns = now_ns();
    }
    0
}

/// `sched_process_exec`: a target runs a new program (fires only on exec, anywhere).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn target_exec(ctx: BtfTracePointContext) -> u32 {
    if let Some((target, tid)) = current_target() {
        debug!(
            &ctx,
            "thread {} of target {} executed a new program", tid, target.settings.pid
        );
        let event = ExecEvent {
            kind: EVENT_KIND_EXEC,
            tid,
            time_ns: now_ns(),
            pid: target.settings.pid,
            _padding: 0,
        };
        send(&event, target.slot, Counter::ExecEventsLost);
    }
    0
}
