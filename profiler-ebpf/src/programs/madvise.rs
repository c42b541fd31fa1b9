//! `madvise` calls of every thread of the target, timed from entry to return and sent with
//! their length and advice (jemalloc gives memory back to the kernel this way).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::debug;
use profiler_common::{Counter, EVENT_KIND_MADVISE, MadviseEvent};

use super::{MADVISE_IN_FLIGHT, count, current_target, loop_state, now_ns, send, stacks};

/// Offset of `size_t len_in` in `events/syscalls/sys_enter_madvise/format`.
const ENTER_LEN_OFFSET: usize = 24;
/// Offset of `int behavior` (8 bytes wide) in `events/syscalls/sys_enter_madvise/format`.
const ENTER_ADVICE_OFFSET: usize = 32;
/// Offset of `long ret` in `events/syscalls/sys_exit_madvise/format`.
const EXIT_RET_OFFSET: usize = 16;

/// `sys_enter_madvise(start, len_in, behavior)`: remember when and what.
#[tracepoint]
pub fn madvise_entry(ctx: TracePointContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    // SAFETY: offsets of fields of the tracepoint's record (see the constants).
    let (len, advice) = unsafe {
        (
            ctx.read_at::<u64>(ENTER_LEN_OFFSET).unwrap_or(0),
            ctx.read_at::<u64>(ENTER_ADVICE_OFFSET).unwrap_or(0),
        )
    };
    if MADVISE_IN_FLIGHT
        .insert(&tid, &[now_ns(), len, advice], 0)
        .is_err()
    {
        count(target.slot, Counter::MadviseUntracked);
        debug!(
            &ctx,
            "madvise of thread {} not timed: the calls in flight fill their table", tid
        );
    }
    0
}

/// `sys_exit_madvise(ret)`: send the call with its duration.
#[tracepoint]
pub fn madvise_return(ctx: TracePointContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    // SAFETY: a plain-data value copied out of the map before the entry is removed.
    let Some([start_ns, len, advice]) = (unsafe { MADVISE_IN_FLIGHT.get(&tid) }).copied() else {
        return 0;
    };
    let _ = MADVISE_IN_FLIGHT.remove(&tid);
    // SAFETY: offset of a field of the tracepoint's record (see the constant).
    let result = unsafe { ctx.read_at::<i64>(EXIT_RET_OFFSET) }.unwrap_or(0);
    let iteration_start_ns = match loop_state(target.slot) {
        Some(state) if tid == target.settings.loop_tid => {
            // Back from a wait inside the call: its return is accounted for first.
            stacks::resume(&target, state);
            state.iteration_start_ns
        }
        _ => 0,
    };
    let event = MadviseEvent {
        kind: EVENT_KIND_MADVISE,
        tid,
        start_ns,
        duration_ns: now_ns().saturating_sub(start_ns),
        len,
        iteration_start_ns,
        advice: advice as i32,
        result: result as i32,
        pid: target.settings.pid,
        _padding: 0,
    };
    send(&event, target.slot, Counter::MadviseEventsLost);
    0
}
