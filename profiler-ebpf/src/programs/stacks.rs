//! Stacks of the event-loop thread once its iteration is older than the gate: on-CPU samples
//! (a CPU-clock perf event), and the time it spent off the CPU (blocked, then waiting for a
//! CPU) with the stacks it left with, sent when it runs again.
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task,
        generated::{
            bpf_get_current_task_btf, bpf_get_stack, bpf_get_task_stack, bpf_probe_read_kernel,
            bpf_probe_read_user, bpf_task_pt_regs,
        },
    },
    macros::perf_event,
    maps::ring_buf::RingBufEntry,
    programs::{BtfTracePointContext, PerfEventContext},
};
use profiler_common::{
    Counter, EVENT_KIND_OFF_CPU, EVENT_KIND_ON_CPU, KERNEL_STACK_DEPTH, LoopState, PAGE_BYTES,
    POLL_SYSCALLS, REQUEST_BYTES, StackEvent, USER_STACK_BYTES,
};

use super::{
    OFF_CPU_STACKS, Target, count, current_loop_thread, entry, loop_state, loops_off_cpu_add,
    now_ns,
};

/// The user registers an unwinder starts from, and the system call the thread is in.
#[derive(Clone, Copy)]
pub(super) struct UserRegs {
    ip: u64,
    sp: u64,
    bp: u64,
    /// The system call the thread is in (`orig_ax`; not a system call number outside one).
    syscall: u64,
}

impl UserRegs {
    #[inline(always)]
    fn from(regs: &pt_regs) -> Self {
        UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
            syscall: regs.orig_rax,
        }
    }

    /// The current task's user registers as saved on kernel entry: loads from the kernel's
    /// `pt_regs` through its BTF-typed pointer, which the verifier checks, rather than a copy
    /// of the whole struct with a helper (several times slower, on the scheduler's hot path).
    /// The loads are volatile so the compiler cannot merge them with the loads of a context's
    /// registers (the verifier refuses one instruction used with two kinds of pointer).
    #[inline(always)]
    pub(super) fn of_current_task() -> Self {
        // SAFETY: bpf_task_pt_regs returns a trusted pointer to the current task's saved
        // registers; the verifier turns the field loads into fault-safe ones.
        unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
            UserRegs {
                ip: core::ptr::read_volatile(&raw const (*regs).rip),
                sp: core::ptr::read_volatile(&raw const (*regs).rsp),
                bp: core::ptr::read_volatile(&raw const (*regs).rbp),
                syscall: core::ptr::read_volatile(&raw const (*regs).orig_rax),
            }
        }
    }

    /// True inside a poll system call.
    #[inline(always)]
    fn in_poll(&self) -> bool {
        POLL_SYSCALLS[0].1 == self.syscall
            || POLL_SYSCALLS[1].1 == self.syscall
            || POLL_SYSCALLS[2].1 == self.syscall
    }
}

/// CPU-clock perf event on the event-loop thread: a stack sample once the iteration is older
/// than the gate.
#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    let Some(target) = current_loop_thread() else {
        return 0;
    };
    let Some(state) = loop_state(target.slot) else {
        return 0;
    };
    resume(&target, state);
    let iteration_start_ns = state.iteration_start_ns;
    let now_ns = now_ns();
    if iteration_start_ns == 0
        || now_ns.saturating_sub(iteration_start_ns) < target.settings.gate_ns
    {
        return 0;
    }
    // A sample in user mode has the user registers in its context; one in the kernel has
    // them where the kernel saved them on entry.
    // SAFETY: the context of a perf_event program is a bpf_perf_event_data.
    let sampled_regs = unsafe { &(*ctx.ctx).regs };
    let user_regs = if sampled_regs.cs & 3 == 3 {
        UserRegs::from(sampled_regs)
    } else {
        UserRegs::of_current_task()
    };
    let Some(mut reserved) = super::reserve::<StackEvent>(target.slot, Counter::StackEventsLost)
    else {
        return 0;
    };
    // SAFETY: the reservation is a StackEvent-sized record; every field read by userspace is
    // written below (stack arrays up to their recorded lengths).
    let event = unsafe { &mut *reserved.as_mut_ptr() };
    event.kind = EVENT_KIND_ON_CPU;
    event.tid = bpf_get_current_pid_tgid() as u32;
    event.time_ns = now_ns;
    event.iteration_start_ns = iteration_start_ns;
    event.off_cpu_ns = 0;
    event.runqueue_ns = 0;
    event.preempted = 0;
    event.pid = target.settings.pid;
    event.fault_address = 0;
    event.faults = 0;
    event.fault_kind = 0;
    note_request(event, state);
    capture_stacks(ctx.as_ptr(), event, &user_regs, target.slot);
    reserved.submit(0);
    0
}

/// The thread leaves the CPU. Inside an outermost poll, the loop is idle: its next iteration
/// begins when it is back. Inside an iteration, remember when, and the stacks it left with
/// (only the thread itself can read its user memory). A runnable thread's kernel stack is read
/// only if its wait is reported (see [`switched_in`]): unwinding a kernel stack costs tens of
/// microseconds here, and such switches are the frequent ones. With the lazy switch-in
/// ([`SchedLayout`]), also the run-queue clock and run delay it left with, for [`resume`].
#[inline(always)]
pub(super) fn switched_out(
    ctx: *mut core::ffi::c_void,
    target: &Target,
    state: &mut LoopState,
    runnable: bool,
) {
    if state.iteration_start_ns == 0 {
        return;
    }
    let layout = global!(SCHED_LAYOUT);
    if layout.lazy_switch_in != 0 {
        // SAFETY: a helper without arguments.
        let task = unsafe { bpf_get_current_task() };
        let rq = read_kernel::<u64>(task + u64::from(layout.task_cfs_rq))
            .and_then(|cfs_rq| read_kernel::<u64>(cfs_rq + u64::from(layout.cfs_rq_rq)));
        state.out_clock = rq
            .and_then(|rq| read_kernel::<u64>(rq + u64::from(layout.rq_clock)))
            .unwrap_or(0);
        state.out_run_delay = read_kernel::<u64>(task + u64::from(layout.run_delay)).unwrap_or(0);
        state.out_ns = now_ns();
    }
    let user_regs = UserRegs::of_current_task();
    // Blocked in an outermost poll: the loop is idle. A thread that is still runnable is not
    // idle even inside a poll system call: it may have been preempted on its way in, before
    // the poll's entry tracepoint ran, with its iteration still going on.
    if !runnable && state.nested_depth == 0 && user_regs.in_poll() {
        state.blocked_in_poll = 1;
        return;
    }
    let Some(stacks) = entry(&OFF_CPU_STACKS, target.slot, 1, 0) else {
        return;
    };
    if runnable {
        stacks.kernel_frames = 0;
        capture_user_stack(stacks, &user_regs);
    } else {
        capture_stacks(ctx, stacks, &user_regs, target.slot);
    }
    note_request(stacks, state);
    if state.switch_out_ns == 0 {
        loops_off_cpu_add(1);
    }
    state.switch_out_ns = now_ns();
    state.wakeup_ns = 0;
    state.preempted = u64::from(runnable);
}

/// The thread runs again (`sched_switch` shows it): send its off-CPU and run-queue time with
/// the stacks it left with (see [`off_cpu_record`]). A preempted thread's kernel stack is read
/// now: it has not run since, so it is unchanged.
#[inline(always)]
pub(super) fn switched_in(ctx: &BtfTracePointContext, target: &Target, state: &mut LoopState) {
    let now_ns = now_ns();
    let out_ns = state.switch_out_ns;
    let (off_cpu_ns, runqueue_ns) = match (state.preempted != 0, state.wakeup_ns) {
        (true, _) => (0, now_ns.saturating_sub(out_ns)),
        // No wake-up seen: count it all as blocked.
        (false, 0) => (now_ns.saturating_sub(out_ns), 0),
        (false, woken_ns) => (
            woken_ns.saturating_sub(out_ns),
            now_ns.saturating_sub(woken_ns),
        ),
    };
    let Some(mut reserved) = off_cpu_record(target, state, now_ns, off_cpu_ns, runqueue_ns) else {
        return;
    };
    // SAFETY: the reservation holds an initialised StackEvent.
    let event = unsafe { &mut *reserved.as_mut_ptr() };
    if event.preempted != 0 {
        // SAFETY: `next` of sched_switch is a trusted task pointer; the buffer is the event's
        // kernel_stack array and the size is its size.
        event.kernel_frames = frames(
            unsafe {
                bpf_get_task_stack(
                    ctx.arg::<*mut core::ffi::c_void>(2).cast(),
                    event.kernel_stack.as_mut_ptr().cast(),
                    (KERNEL_STACK_DEPTH * 8) as u32,
                    0,
                )
            },
            target.slot,
        );
    }
    reserved.submit(0);
}

/// With the lazy switch-in ([`SchedLayout`]): at the thread's first event since it came back
/// to the CPU (a poll, a sample, its next switch-out, a madvise return), when that was and how
/// its time off the CPU split: it arrived at `sched_info.last_arrival` on the run-queue clock,
/// which ran `last_arrival - out_clock` since it left; of that, the growth of its run delay
/// was spent waiting for a CPU. Back from an idle poll, its iteration began then; back inside
/// an iteration, the time is reported as [`switched_in`] does (without the kernel stack of a
/// preempted thread, which has run since).
#[inline(always)]
pub(super) fn resume(target: &Target, state: &mut LoopState) {
    let layout = global!(SCHED_LAYOUT);
    let out_ns = core::mem::replace(&mut state.out_ns, 0);
    if layout.lazy_switch_in == 0 || out_ns == 0 {
        return;
    }
    let now_ns = now_ns();
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let arrived_clock = read_kernel::<u64>(task + u64::from(layout.last_arrival)).unwrap_or(0);
    let run_delay = read_kernel::<u64>(task + u64::from(layout.run_delay)).unwrap_or(0);
    // A clock that did not move forward (unreadable, or another CPU's behind): the return was
    // no later than now.
    let away_ns = match arrived_clock.checked_sub(state.out_clock) {
        Some(away) if state.out_clock != 0 && arrived_clock != 0 => away,
        _ => now_ns.saturating_sub(out_ns),
    };
    let back_ns = out_ns.saturating_add(away_ns).min(now_ns);
    let away_ns = back_ns - out_ns;
    if state.blocked_in_poll != 0 {
        // Back from a poll it blocked in: the loop had its events, an iteration began.
        state.blocked_in_poll = 0;
        state.iteration_start_ns = back_ns;
        count(target.slot, Counter::BlockingPolls);
        return;
    }
    if state.switch_out_ns == 0 {
        return;
    }
    let runqueue_ns = run_delay.saturating_sub(state.out_run_delay).min(away_ns);
    if let Some(reserved) =
        off_cpu_record(target, state, back_ns, away_ns - runqueue_ns, runqueue_ns)
    {
        reserved.submit(0);
    }
}

/// The record of the thread's time off the CPU, back at `back_ns` (`off_cpu_ns` blocked, then
/// `runqueue_ns` waiting for a CPU), with the stacks it left with, reserved and filled but
/// not submitted; `None` when it is not worth one (shorter than `min_block`, or in an iteration
/// younger than the gate) or cannot be sent (counted). The thread is on the CPU from now on.
#[inline(always)]
fn off_cpu_record(
    target: &Target,
    state: &mut LoopState,
    back_ns: u64,
    off_cpu_ns: u64,
    runqueue_ns: u64,
) -> Option<RingBufEntry<StackEvent>> {
    state.switch_out_ns = 0;
    loops_off_cpu_add(-1);
    let slot = target.slot;
    if state.iteration_start_ns == 0 {
        count(slot, Counter::UnmatchedSwitchOuts);
        return None;
    }
    if off_cpu_ns + runqueue_ns < target.settings.min_block_ns {
        count(slot, Counter::ShortBlocks);
        return None;
    }
    if back_ns.saturating_sub(state.iteration_start_ns) < target.settings.gate_ns {
        count(slot, Counter::BlocksBeforeGate);
        return None;
    }
    let stacks = entry(&OFF_CPU_STACKS, slot, 1, 0)?;
    let mut reserved = super::reserve::<StackEvent>(slot, Counter::StackEventsLost)?;
    // SAFETY: copies one StackEvent from the map entry into a StackEvent-sized reservation.
    let copied = unsafe {
        bpf_probe_read_kernel(
            reserved.as_mut_ptr().cast(),
            size_of::<StackEvent>() as u32,
            (stacks as *const StackEvent).cast(),
        )
    };
    if copied != 0 {
        reserved.discard(0);
        count(slot, Counter::OffCpuRecordsUnread);
        return None;
    }
    // SAFETY: the reservation now holds an initialised StackEvent.
    let event = unsafe { &mut *reserved.as_mut_ptr() };
    event.kind = EVENT_KIND_OFF_CPU;
    event.tid = target.settings.loop_tid;
    event.pid = target.settings.pid;
    event.time_ns = back_ns;
    event.iteration_start_ns = state.iteration_start_ns;
    event.off_cpu_ns = off_cpu_ns;
    event.runqueue_ns = runqueue_ns;
    event.preempted = state.preempted as u32;
    Some(reserved)
}

/// With `--clients exact`: the descriptor the event-loop thread last read from, and the first
/// bytes it read (the request of the command it runs now, whose name comes first).
#[inline(always)]
fn note_request(event: &mut StackEvent, state: &LoopState) {
    event.read_fd = state.read_fd as u32;
    event.request_len = 0;
    if state.read_fd == 0 || state.read_buffer == 0 {
        return;
    }
    // SAFETY: user memory read by a helper that fails instead of faulting, into the event's
    // own array of that size.
    let copied = unsafe {
        bpf_probe_read_user(
            event.request.as_mut_ptr().cast(),
            REQUEST_BYTES as u32,
            state.read_buffer as *const core::ffi::c_void,
        )
    };
    if copied == 0 {
        event.request_len = REQUEST_BYTES as u32;
    }
}

/// A `T` read from kernel memory at `address`, if it can be read.
#[inline(always)]
pub(super) fn read_kernel<T>(address: u64) -> Option<T> {
    // SAFETY: a helper that fails instead of faulting.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(address as *const T) }.ok()
}

/// Fills the stack fields of `event`: kernel instruction pointers from the program's context,
/// user registers from `user_regs`, and the user stack above the stack pointer (a kernel
/// stack that cannot be read is counted for `slot`).
#[inline(always)]
pub(super) fn capture_stacks(
    ctx: *mut core::ffi::c_void,
    event: &mut StackEvent,
    user_regs: &UserRegs,
    slot: u32,
) {
    // SAFETY: the buffer is the event's own kernel_stack array and the size is its size.
    let kernel_bytes = unsafe {
        bpf_get_stack(
            ctx,
            event.kernel_stack.as_mut_ptr().cast(),
            (KERNEL_STACK_DEPTH * 8) as u32,
            0,
        )
    };
    event.kernel_frames = frames(kernel_bytes, slot);
    capture_user_stack(event, user_regs);
}

/// Kernel frames in a stack helper's result (bytes written, or a negative error: counted for
/// `slot`).
#[inline(always)]
fn frames(kernel_bytes: i64, slot: u32) -> u32 {
    if kernel_bytes < 0 {
        count(slot, Counter::KernelStacksUnread);
    }
    if kernel_bytes > 0 {
        (kernel_bytes / 8) as u32
    } else {
        0
    }
}

/// Fills the user registers and the user stack above the stack pointer.
#[inline(always)]
fn capture_user_stack(event: &mut StackEvent, user_regs: &UserRegs) {
    event.user_ip = user_regs.ip;
    event.user_sp = user_regs.sp;
    event.user_bp = user_regs.bp;
    event.user_stack_len = copy_user_stack(event, user_regs.sp);
}

/// Copies the user stack from `sp` upwards in chunks that never cross a page: the first up to
/// the end of `sp`'s page, then whole pages, until the limit or the first chunk that cannot be
/// read (an unmapped or non-resident page: no fault can be taken here). Returns the bytes
/// copied.
#[inline(always)]
fn copy_user_stack(event: &mut StackEvent, sp: u64) -> u32 {
    const PAGE: u64 = PAGE_BYTES as u64;
    const MAX_CHUNKS: usize = USER_STACK_BYTES / PAGE_BYTES + 1;
    let limit = global!(USER_STACK_LIMIT) as usize;
    let mut copied = 0usize;
    let mut chunk_bytes = (PAGE - (sp & (PAGE - 1))) as usize;
    for _ in 0..MAX_CHUNKS {
        // `copied <= USER_STACK_BYTES` and a chunk is at most a page: within the buffer.
        if copied >= limit
            || copied > USER_STACK_BYTES
            || chunk_bytes == 0
            || chunk_bytes > PAGE_BYTES
        {
            break;
        }
        // SAFETY: destination bounded as above; the source is user memory read by a helper
        // that fails instead of faulting.
        let result = unsafe {
            bpf_probe_read_user(
                event.user_stack.as_mut_ptr().add(copied).cast(),
                chunk_bytes as u32,
                (sp + copied as u64) as *const core::ffi::c_void,
            )
        };
        if result != 0 {
            break;
        }
        copied += chunk_bytes;
        chunk_bytes = PAGE_BYTES;
    }
    copied.min(limit) as u32
}
