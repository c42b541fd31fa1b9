//! Loop timing: where an event-loop iteration begins and ends, its histogram, and stall events.
//! Only poll *entries* are traced (a syscall tracepoint costs more than anything the program
//! does); `sched_switch` tells a poll that blocked from one that did not.
//!
//! The loop state (`LoopState`, one entry) moves with the event-loop thread:
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
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, tracepoint, uprobe, uretprobe},
    programs::{BtfTracePointContext, ProbeContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::debug;
use profiler_common::{
    Counter, EVENT_KIND_EXEC, EVENT_KIND_STALL, ExecEvent, StallEvent, iteration_bucket,
};

use super::{
    ITERATION_HISTOGRAM, ITERATION_MAX, entry, is_event_loop_thread, loop_state, loop_task, now_ns,
    send, stacks, target_thread,
};

/// Task state of a thread that left the CPU still runnable (preempted, or rescheduled on its
/// way back to user mode), as opposed to blocked.
const TASK_RUNNING: u32 = 0;

/// `sys_enter_epoll_wait`, `_epoll_pwait`, `_epoll_pwait2`: the iteration in progress ends,
/// and the next one begins now unless the thread blocks in this poll (see sched_switch).
#[tracepoint]
pub fn poll_entry(ctx: TracePointContext) -> u32 {
    if !is_event_loop_thread() {
        return 0;
    }
    let Some(state) = loop_state() else { return 0 };
    if state.nested_depth > 0 {
        return 0;
    }
    let now_ns = now_ns();
    let start_ns = core::mem::replace(&mut state.iteration_start_ns, now_ns);
    // Running here means any time off the CPU has ended. If the return to the CPU was not
    // seen, that off-CPU time is not reported; and if the thread had gone idle in a poll, the
    // iteration's start is unknown, so it is not timed.
    let missed_switch_in = core::mem::replace(&mut state.switch_out_ns, 0) != 0;
    let missed_wake_up = core::mem::replace(&mut state.blocked_in_poll, 0) != 0;
    if missed_switch_in || missed_wake_up {
        super::count(Counter::UnmatchedSwitchOuts);
        debug!(
            &ctx,
            "poll entered without the switch-in after a switch-out (in an iteration: {}, idle: {})",
            u8::from(missed_switch_in),
            u8::from(missed_wake_up)
        );
    }
    // The first entry after attaching has no iteration before it.
    if start_ns == 0 || missed_wake_up {
        return 0;
    }
    let duration_ns = now_ns.saturating_sub(start_ns);
    if let Some(bucket) = entry(&ITERATION_HISTOGRAM, iteration_bucket(duration_ns)) {
        *bucket += 1;
    }
    if let Some(max_ns) = entry(&ITERATION_MAX, 0)
        && duration_ns > *max_ns
    {
        *max_ns = duration_ns;
    }
    if duration_ns >= global!(THRESHOLD_NS) {
        let event = StallEvent {
            kind: EVENT_KIND_STALL,
            tid: bpf_get_current_pid_tgid() as u32,
            start_ns,
            end_ns: now_ns,
        };
        send(&event, Counter::StallEventsLost);
    }
    0
}

/// Uprobe on `processEventsWhileBlocked`: polls from here on are nested in one iteration.
#[uprobe]
pub fn nested_poll_begin(_ctx: ProbeContext) -> u32 {
    if is_event_loop_thread()
        && let Some(state) = loop_state()
    {
        state.nested_depth += 1;
    }
    0
}

/// Uretprobe on `processEventsWhileBlocked`: nested polling is over.
#[uretprobe]
pub fn nested_poll_end(_ctx: RetProbeContext) -> u32 {
    if is_event_loop_thread()
        && let Some(state) = loop_state()
    {
        state.nested_depth = state.nested_depth.saturating_sub(1);
    }
    0
}

/// `sched_switch(preempt, prev, next, prev_state)`: the event-loop thread leaves or regains a
/// CPU.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    let Some(state) = loop_state() else { return 0 };
    if is_event_loop_thread() {
        let preempt = ctx.arg::<u64>(0) & 1 != 0;
        let prev_state = ctx.arg::<u64>(3) as u32;
        stacks::switched_out(&ctx, state, preempt || prev_state == TASK_RUNNING);
        return 0;
    }
    let next: u64 = ctx.arg(2);
    if loop_task().is_none_or(|task| next != *task) {
        return 0;
    }
    if state.blocked_in_poll != 0 {
        // Back from a poll it blocked in: the loop has its events, an iteration begins.
        state.blocked_in_poll = 0;
        state.iteration_start_ns = now_ns();
        super::count(Counter::BlockingPolls);
    } else if state.switch_out_ns != 0 {
        stacks::switched_in(&ctx, state);
    }
    0
}

/// `sched_wakeup(p)`: note when the event-loop thread, blocked inside an iteration, is woken.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    let task: u64 = ctx.arg(0);
    if loop_task().is_some_and(|loop_task| task == *loop_task)
        && let Some(state) = loop_state()
        && state.switch_out_ns != 0
        && state.wakeup_ns == 0
    {
        state.wakeup_ns = now_ns();
    }
    0
}

/// `sched_process_exec`: the target runs a new program (fires only on exec, anywhere).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn target_exec(ctx: BtfTracePointContext) -> u32 {
    if let Some(tid) = target_thread() {
        debug!(&ctx, "thread {} of the target executed a new program", tid);
        let event = ExecEvent {
            kind: EVENT_KIND_EXEC,
            tid,
            time_ns: now_ns(),
        };
        send(&event, Counter::ExecEventsLost);
    }
    0
}
