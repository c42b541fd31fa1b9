//! redis-stallprof's kernel programs. They
//! - time every event-loop iteration of the target's main thread (from the moment a poll gave
//!   the loop its events to the next poll's entry), count each into a histogram, and send only
//!   iterations at or above the threshold to userspace as stall events. Only poll *entries* are
//!   traced: a syscall tracepoint costs more than anything the program does, and sched_switch
//!   tells a poll that blocked (its iteration begins when the thread is back on the CPU) from
//!   one that did not (its iteration begins at its entry);
//! - once an iteration is older than a gate, send on-CPU stack samples (perf event) and, when
//!   the thread ran again after leaving the CPU, its off-CPU and run-queue time with the stacks
//!   it left with (sched_switch / sched_wakeup).
//!
//! Stacks are raw: user registers, user-stack bytes and kernel instruction pointers; userspace
//! unwinds and symbolizes them. Bounds: every map has a fixed size, the stack copy a fixed
//! number of page-sized chunks; a full ring buffer increments a drop counter.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext,
        bindings::pt_regs,
        helpers::{
            bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
            generated::{
                bpf_get_current_task_btf, bpf_get_stack, bpf_get_task_stack, bpf_probe_read_kernel,
                bpf_probe_read_user, bpf_task_pt_regs,
            },
        },
        macros::{btf_tracepoint, map, perf_event, tracepoint, uprobe, uretprobe},
        maps::{Array, HashMap, PerCpuArray, RingBuf},
        programs::{
            BtfTracePointContext, PerfEventContext, ProbeContext, RetProbeContext,
            TracePointContext,
        },
    };
    use profiler_common::{
        AcceptEvent, COUNTER_BLOCKING_POLLS, COUNTER_BLOCKS_BEFORE_GATE,
        COUNTER_CONNECTION_EVENTS_LOST, COUNTER_EXEC_EVENTS_LOST, COUNTER_MADVISE_EVENTS_LOST,
        COUNTER_MADVISE_UNTRACKED, COUNTER_SHORT_BLOCKS, COUNTER_STACK_EVENTS_LOST,
        COUNTER_STALL_EVENTS_LOST, COUNTER_UNMATCHED_SWITCH_OUTS, COUNTERS, ConnectionEvent,
        EVENT_KIND_ACCEPT, EVENT_KIND_CONNECTION, EVENT_KIND_EXEC, EVENT_KIND_MADVISE,
        EVENT_KIND_OFF_CPU, EVENT_KIND_ON_CPU, EVENT_KIND_STALL, ExecEvent, ITERATION_BUCKETS,
        KERNEL_STACK_DEPTH, LoopState, MadviseEvent, NO_TARGET, PAGE_BYTES, POLL_SYSCALLS,
        StackEvent, StallEvent, USER_STACK_BYTES, iteration_bucket,
    };

    /// GPL-compatible: the stack and memory-read helpers are GPL-only.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "license")]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    // Read-only globals, set by userspace before load.
    #[unsafe(no_mangle)]
    static TARGET_PID: u32 = NO_TARGET;
    #[unsafe(no_mangle)]
    static TARGET_TID: u32 = NO_TARGET;
    #[unsafe(no_mangle)]
    static THRESHOLD_NS: u64 = 10_000_000;
    #[unsafe(no_mangle)]
    static GATE_NS: u64 = 5_000_000;
    #[unsafe(no_mangle)]
    static MIN_BLOCK_NS: u64 = 1_000_000;
    #[unsafe(no_mangle)]
    static USER_STACK_LIMIT: u32 = USER_STACK_BYTES as u32;

    /// Default ring-buffer size (userspace may change it before load): 16 MiB holds about 780
    /// stack events, most of a second of samples at 999 Hz with userspace stalled.
    const EVENTS_BYTES: u32 = 16 * 1024 * 1024;

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
    #[map]
    static ITERATION_HISTOGRAM: Array<u64> = Array::with_max_entries(ITERATION_BUCKETS, 0);
    #[map]
    static ITERATION_MAX: Array<u64> = Array::with_max_entries(1, 0);
    #[map]
    static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);
    /// The event-loop thread's state (one entry: only that thread is followed).
    #[map]
    static LOOP_STATE: Array<LoopState> = Array::with_max_entries(1, 0);
    /// The event-loop thread's `task_struct` address, to recognise it as `next` in
    /// sched_switch and in sched_wakeup. Every context switch and wake-up on every CPU reads
    /// it, so it lives apart from LOOP_STATE, which the thread writes every iteration, and is
    /// written only when it changes.
    #[map]
    static LOOP_TASK: Array<u64> = Array::with_max_entries(1, 0);
    /// The registers and user stack the thread left the CPU with, kept until it runs again
    /// (its kernel stack is read then, only if the time off the CPU is reported).
    #[map]
    static OFF_CPU_STACKS: Array<StackEvent> = Array::with_max_entries(1, 0);

    /// Threads of one Redis process that can be inside madvise at once: far more than Redis
    /// runs (main, 3 bio, io threads, jemalloc's background threads).
    const MAX_THREADS: u32 = 1024;
    /// madvise calls in flight, by thread id: (entry time, length, advice).
    #[map]
    static MADVISE_IN_FLIGHT: HashMap<u32, [u64; 3]> = HashMap::with_max_entries(MAX_THREADS, 0);

    /// Reads a read-only global.
    macro_rules! global {
        ($name:ident) => {
            // SAFETY: a read-only global, written by the loader before any program runs.
            unsafe { core::ptr::read_volatile(&$name) }
        };
    }

    #[inline(always)]
    fn now_ns() -> u64 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn is_event_loop_thread() -> bool {
        let (pid, tid) = (global!(TARGET_PID), global!(TARGET_TID));
        bpf_get_current_pid_tgid() == (u64::from(pid) << 32 | u64::from(tid))
    }

    /// A map entry as a mutable reference.
    #[inline(always)]
    fn entry<T>(map: &Array<T>, index: u32) -> Option<&mut T> {
        // SAFETY: array entries are plain data. LOOP_STATE, OFF_CPU_STACKS and the iteration
        // maps change only with the event-loop thread's own transitions (its polls while it
        // runs; its switch-out, wake-up and switch-in while it does not), which follow one
        // another, so no two programs write them at once.
        map.get_ptr_mut(index)
            .map(|pointer| unsafe { &mut *pointer })
    }

    /// Adds one to a counter. Counters are bumped from any CPU (handshakes in softirq, any
    /// thread's madvise), so each CPU has its own (userspace sums them).
    #[inline(always)]
    fn count(counter: u32) {
        if let Some(pointer) = COUNTERS_MAP.get_ptr_mut(counter) {
            // SAFETY: this CPU's slot; programs do not migrate while they run.
            unsafe { *pointer += 1 };
        }
    }

    #[inline(always)]
    fn loop_state() -> Option<&'static mut LoopState> {
        entry(&LOOP_STATE, 0)
    }

    #[inline(always)]
    fn loop_task() -> Option<&'static mut u64> {
        entry(&LOOP_TASK, 0)
    }

    /// `sys_enter_epoll_wait`, `_epoll_pwait`, `_epoll_pwait2`: the iteration in progress ends,
    /// and the next one begins now unless the thread blocks in this poll (see sched_switch).
    #[tracepoint]
    pub fn poll_entry(_ctx: TracePointContext) -> u32 {
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
        // seen, that off-CPU time is not reported; and if the thread had gone idle in a poll,
        // the iteration's start is unknown, so it is not timed.
        let missed_switch_in = core::mem::replace(&mut state.switch_out_ns, 0) != 0;
        let missed_wake_up = core::mem::replace(&mut state.blocked_in_poll, 0) != 0;
        if missed_switch_in || missed_wake_up {
            count(COUNTER_UNMATCHED_SWITCH_OUTS);
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
            if EVENTS.output::<StallEvent>(&event, 0).is_err() {
                count(COUNTER_STALL_EVENTS_LOST);
            }
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

    /// Fills the stack fields of `event`: kernel instruction pointers from the program's
    /// context, user registers from `user_regs`, and the user stack above the stack pointer.
    #[inline(always)]
    fn capture_stacks(ctx: *mut core::ffi::c_void, event: &mut StackEvent, user_regs: &UserRegs) {
        // SAFETY: the buffer is the event's own kernel_stack array and the size is its size.
        let kernel_bytes = unsafe {
            bpf_get_stack(
                ctx,
                event.kernel_stack.as_mut_ptr().cast(),
                (KERNEL_STACK_DEPTH * 8) as u32,
                0,
            )
        };
        event.kernel_frames = frames(kernel_bytes);
        capture_user_stack(event, user_regs);
    }

    /// Kernel frames in a stack helper's result (bytes written, or a negative error).
    #[inline(always)]
    fn frames(kernel_bytes: i64) -> u32 {
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

    /// Copies the user stack from `sp` upwards in chunks that never cross a page: the first up
    /// to the end of `sp`'s page, then whole pages, until the limit or the first chunk that
    /// cannot be read. Returns the bytes copied.
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

    /// The user registers an unwinder starts from, and the system call the thread is in.
    #[derive(Clone, Copy)]
    struct UserRegs {
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

        /// True inside a poll system call.
        #[inline(always)]
        fn in_poll(&self) -> bool {
            POLL_SYSCALLS[0].1 == self.syscall
                || POLL_SYSCALLS[1].1 == self.syscall
                || POLL_SYSCALLS[2].1 == self.syscall
        }
    }

    /// The current task's user registers as saved on kernel entry: loads from the kernel's
    /// `pt_regs` through its BTF-typed pointer, which the verifier checks, rather than a copy
    /// of the whole struct with a helper (several times slower, on the scheduler's hot path).
    /// The loads are volatile so the compiler cannot merge them with the loads of a context's
    /// registers (the verifier refuses one instruction used with two kinds of pointer).
    #[inline(always)]
    fn current_user_regs() -> UserRegs {
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

    /// CPU-clock perf event on the event-loop thread: a stack sample once the iteration is
    /// older than the gate.
    #[perf_event]
    pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
        if !is_event_loop_thread() {
            return 0;
        }
        let Some(state) = loop_state() else { return 0 };
        let iteration_start_ns = state.iteration_start_ns;
        let now_ns = now_ns();
        if iteration_start_ns == 0 || now_ns.saturating_sub(iteration_start_ns) < global!(GATE_NS) {
            return 0;
        }
        // A sample in user mode has the user registers in its context; one in the kernel has
        // them where the kernel saved them on entry.
        // SAFETY: the context of a perf_event program is a bpf_perf_event_data.
        let sampled_regs = unsafe { &(*ctx.ctx).regs };
        let user_regs = if sampled_regs.cs & 3 == 3 {
            UserRegs::from(sampled_regs)
        } else {
            current_user_regs()
        };
        let Some(mut reserved) = EVENTS.reserve::<StackEvent>(0) else {
            count(COUNTER_STACK_EVENTS_LOST);
            return 0;
        };
        // SAFETY: the reservation is a StackEvent-sized record; every field read by userspace
        // is written below (stack arrays up to their recorded lengths).
        let event = unsafe { &mut *reserved.as_mut_ptr() };
        event.kind = EVENT_KIND_ON_CPU;
        event.tid = bpf_get_current_pid_tgid() as u32;
        event.time_ns = now_ns;
        event.iteration_start_ns = iteration_start_ns;
        event.off_cpu_ns = 0;
        event.runqueue_ns = 0;
        event.preempted = 0;
        event._padding = 0;
        capture_stacks(ctx.as_ptr(), event, &user_regs);
        reserved.submit(0);
        0
    }

    /// Task state of a thread that left the CPU still runnable (preempted, or rescheduled on
    /// its way back to user mode), as opposed to blocked.
    const TASK_RUNNING: u32 = 0;

    /// `sched_switch(preempt, prev, next, prev_state)`: the event-loop thread leaves or regains
    /// a CPU.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
        let Some(state) = loop_state() else { return 0 };
        if is_event_loop_thread() {
            let preempt = ctx.arg::<u64>(0) & 1 != 0;
            let prev_state = ctx.arg::<u64>(3) as u32;
            switched_out(&ctx, state, preempt || prev_state == TASK_RUNNING);
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
            count(COUNTER_BLOCKING_POLLS);
        } else if state.switch_out_ns != 0 {
            switched_in(&ctx, state);
        }
        0
    }

    /// The thread leaves the CPU. Inside an outermost poll, the loop is idle: its next
    /// iteration begins when it is back. Inside an iteration, remember when, and the stacks it
    /// left with (only the thread itself can read its user memory). A runnable thread's kernel
    /// stack is read only if its wait is reported (see `switched_in`): unwinding a kernel
    /// stack costs tens of microseconds here, and such switches are the frequent ones.
    #[inline(always)]
    fn switched_out(ctx: &BtfTracePointContext, state: &mut LoopState, runnable: bool) {
        // SAFETY: a helper without arguments.
        let current = unsafe { bpf_get_current_task() };
        if let Some(task) = loop_task()
            && *task != current
        {
            *task = current;
        }
        if state.iteration_start_ns == 0 {
            return;
        }
        let user_regs = current_user_regs();
        // Blocked in an outermost poll: the loop is idle. A thread that is still runnable is
        // not idle even inside a poll system call: it may have been preempted on its way in,
        // before the poll's entry tracepoint ran, with its iteration still going on.
        if !runnable && state.nested_depth == 0 && user_regs.in_poll() {
            state.blocked_in_poll = 1;
            return;
        }
        let Some(stacks) = entry(&OFF_CPU_STACKS, 0) else {
            return;
        };
        if runnable {
            stacks.kernel_frames = 0;
            capture_user_stack(stacks, &user_regs);
        } else {
            capture_stacks(ctx.as_ptr(), stacks, &user_regs);
        }
        state.switch_out_ns = now_ns();
        state.wakeup_ns = 0;
        state.preempted = u64::from(runnable);
    }

    /// The thread runs again: send its off-CPU and run-queue time with the stacks it left with,
    /// if the time is worth a record and the iteration is old enough to become a stall. A
    /// preempted thread's kernel stack is read now: it has not run since, so it is unchanged.
    #[inline(always)]
    fn switched_in(ctx: &BtfTracePointContext, state: &mut LoopState) {
        let now_ns = now_ns();
        let out_ns = core::mem::replace(&mut state.switch_out_ns, 0);
        if state.iteration_start_ns == 0 {
            count(COUNTER_UNMATCHED_SWITCH_OUTS);
            return;
        }
        let (off_cpu_ns, runqueue_ns) = match (state.preempted != 0, state.wakeup_ns) {
            (true, _) => (0, now_ns.saturating_sub(out_ns)),
            // No wake-up seen: count it all as blocked.
            (false, 0) => (now_ns.saturating_sub(out_ns), 0),
            (false, woken_ns) => (
                woken_ns.saturating_sub(out_ns),
                now_ns.saturating_sub(woken_ns),
            ),
        };
        if off_cpu_ns + runqueue_ns < global!(MIN_BLOCK_NS) {
            count(COUNTER_SHORT_BLOCKS);
            return;
        }
        if now_ns.saturating_sub(state.iteration_start_ns) < global!(GATE_NS) {
            count(COUNTER_BLOCKS_BEFORE_GATE);
            return;
        }
        let Some(stacks) = entry(&OFF_CPU_STACKS, 0) else {
            return;
        };
        let Some(mut reserved) = EVENTS.reserve::<StackEvent>(0) else {
            count(COUNTER_STACK_EVENTS_LOST);
            return;
        };
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
            return;
        }
        // SAFETY: the reservation now holds an initialised StackEvent.
        let event = unsafe { &mut *reserved.as_mut_ptr() };
        if state.preempted != 0 {
            // SAFETY: `next` of sched_switch is a trusted task pointer; the buffer is the
            // event's kernel_stack array and the size is its size.
            event.kernel_frames = frames(unsafe {
                bpf_get_task_stack(
                    ctx.arg::<*mut core::ffi::c_void>(2).cast(),
                    event.kernel_stack.as_mut_ptr().cast(),
                    (KERNEL_STACK_DEPTH * 8) as u32,
                    0,
                )
            });
        }
        event.kind = EVENT_KIND_OFF_CPU;
        event.tid = global!(TARGET_TID);
        event.time_ns = now_ns;
        event.iteration_start_ns = state.iteration_start_ns;
        event.off_cpu_ns = off_cpu_ns;
        event.runqueue_ns = runqueue_ns;
        event.preempted = state.preempted as u32;
        reserved.submit(0);
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
    pub fn target_exec(_ctx: BtfTracePointContext) -> u32 {
        if let Some(tid) = target_thread() {
            let event = ExecEvent {
                kind: EVENT_KIND_EXEC,
                tid,
                time_ns: now_ns(),
            };
            if EVENTS.output::<ExecEvent>(&event, 0).is_err() {
                count(COUNTER_EXEC_EVENTS_LOST);
            }
        }
        0
    }

    /// Thread id of the current thread when it belongs to the target process.
    #[inline(always)]
    fn target_thread() -> Option<u32> {
        let pid_tgid = bpf_get_current_pid_tgid();
        ((pid_tgid >> 32) as u32 == global!(TARGET_PID)).then_some(pid_tgid as u32)
    }

    /// `sys_enter_madvise(start, len_in, behavior)`: remember when and what.
    #[tracepoint]
    pub fn madvise_entry(ctx: TracePointContext) -> u32 {
        let Some(tid) = target_thread() else { return 0 };
        // SAFETY: offsets of `len_in` and `behavior` in the syscall tracepoint's record.
        let (len, advice) = unsafe {
            (
                ctx.read_at::<u64>(24).unwrap_or(0),
                ctx.read_at::<u64>(32).unwrap_or(0),
            )
        };
        if MADVISE_IN_FLIGHT
            .insert(&tid, &[now_ns(), len, advice], 0)
            .is_err()
        {
            count(COUNTER_MADVISE_UNTRACKED);
        }
        0
    }

    /// `sys_exit_madvise(ret)`: send the call with its duration.
    #[tracepoint]
    pub fn madvise_return(ctx: TracePointContext) -> u32 {
        let Some(tid) = target_thread() else { return 0 };
        // SAFETY: a plain-data value copied out of the map before the entry is removed.
        let Some([start_ns, len, advice]) = (unsafe { MADVISE_IN_FLIGHT.get(&tid) }).copied()
        else {
            return 0;
        };
        let _ = MADVISE_IN_FLIGHT.remove(&tid);
        // SAFETY: offset of `ret` in the syscall tracepoint's record.
        let result = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0);
        let iteration_start_ns = match loop_state() {
            Some(state) if tid == global!(TARGET_TID) => state.iteration_start_ns,
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
        };
        if EVENTS.output::<MadviseEvent>(&event, 0).is_err() {
            count(COUNTER_MADVISE_EVENTS_LOST);
        }
        0
    }

    /// Listening ports of one Redis (its port, TLS port, cluster bus, ...), with room to spare.
    const MAX_LISTEN_PORTS: u32 = 64;
    /// The target's listening ports, written by userspace.
    #[map]
    static LISTEN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);
    /// `accept`/`accept4` calls in flight, by thread id: the listening socket's fd.
    #[map]
    static ACCEPT_IN_FLIGHT: HashMap<u32, i64> = HashMap::with_max_entries(MAX_THREADS, 0);

    const IPPROTO_TCP: u16 = 6;
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_SYN_RECV: i32 = 3;
    const AF_INET: u16 = 2;

    /// `sock:inet_sock_set_state`: a connection to one of the target's ports completed its
    /// handshake (SYN_RECV -> ESTABLISHED) and entered the accept queue. Fires in softirq
    /// context, so it filters on the port, not the process.
    #[tracepoint]
    pub fn handshake_done(ctx: TracePointContext) -> u32 {
        // SAFETY: offsets of the tracepoint's record (events/sock/inet_sock_set_state/format).
        let (old_state, new_state, port, family, protocol) = unsafe {
            (
                ctx.read_at::<i32>(16).unwrap_or(0),
                ctx.read_at::<i32>(20).unwrap_or(0),
                ctx.read_at::<u16>(24).unwrap_or(0),
                ctx.read_at::<u16>(28).unwrap_or(0),
                ctx.read_at::<u16>(30).unwrap_or(0),
            )
        };
        // SAFETY: a lookup by value in a map of plain bytes.
        if protocol != IPPROTO_TCP
            || old_state != TCP_SYN_RECV
            || new_state != TCP_ESTABLISHED
            || unsafe { LISTEN_PORTS.get(&port) }.is_none()
        {
            return 0;
        }
        let mut client_addr = [0u8; 16];
        // SAFETY: offsets of daddr (4 bytes) and daddr_v6 (16 bytes) in the record.
        unsafe {
            if family == AF_INET {
                client_addr[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(36).unwrap_or([0; 4]));
            } else {
                client_addr = ctx.read_at::<[u8; 16]>(56).unwrap_or([0; 16]);
            }
        }
        let event = ConnectionEvent {
            kind: EVENT_KIND_CONNECTION,
            port,
            family,
            time_ns: now_ns(),
            // SAFETY: offset of dport in the record.
            client_port: unsafe { ctx.read_at::<u16>(26) }.unwrap_or(0),
            _padding: [0; 6],
            client_addr,
        };
        if EVENTS.output::<ConnectionEvent>(&event, 0).is_err() {
            count(COUNTER_CONNECTION_EVENTS_LOST);
        }
        0
    }

    /// `sys_enter_accept4` / `sys_enter_accept`: remember the listening socket.
    #[tracepoint]
    pub fn accept_entry(ctx: TracePointContext) -> u32 {
        let Some(tid) = target_thread() else { return 0 };
        // SAFETY: offset of `fd` in the syscall tracepoint's record.
        let listen_fd = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
        let _ = ACCEPT_IN_FLIGHT.insert(&tid, &listen_fd, 0);
        0
    }

    /// `sys_exit_accept4` / `sys_exit_accept`: the target took a connection off the queue.
    #[tracepoint]
    pub fn accept_return(ctx: TracePointContext) -> u32 {
        let Some(tid) = target_thread() else { return 0 };
        // SAFETY: a plain value copied out before the entry is removed.
        let Some(listen_fd) = (unsafe { ACCEPT_IN_FLIGHT.get(&tid) }).copied() else {
            return 0;
        };
        let _ = ACCEPT_IN_FLIGHT.remove(&tid);
        // SAFETY: offset of `ret` in the syscall tracepoint's record.
        let result = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
        if result < 0 {
            return 0;
        }
        let event = AcceptEvent {
            kind: EVENT_KIND_ACCEPT,
            tid,
            time_ns: now_ns(),
            listen_fd,
            result,
        };
        if EVENTS.output::<AcceptEvent>(&event, 0).is_err() {
            count(COUNTER_CONNECTION_EVENTS_LOST);
        }
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
