//! redis-stallprof's kernel programs. They
//! - time every event-loop iteration of the target's main thread (from the moment a poll gave
//!   the loop its events to the next poll's entry), count each into a histogram, and send only
//!   iterations at or above the threshold to userspace as stall events (`loop_timing`);
//! - once an iteration is older than a gate, send on-CPU stack samples and, when the thread ran
//!   again after leaving the CPU, its off-CPU and run-queue time with the stacks it left with
//!   (`stacks`);
//! - time the target's `madvise` calls (`madvise`) and follow connections entering and leaving
//!   its listeners' accept queues, and closing (`connections`);
//! - count the page faults of the target's threads and send a few with their stacks, each
//!   standing for the faults since the previous one (`memory`).
//!
//! One set of programs serves every target: userspace gives each a slot, and each target's
//! state lives in its slot of the maps, found from the current thread's pid (one hash lookup)
//! or, for the event-loop threads on the scheduler's hot path, from the CPU they run on.
//!
//! This file holds what they share: the read-only global, the maps and the helpers that find
//! the target, send an event or count its loss. Stacks are raw (user registers, user-stack bytes, kernel
//! instruction pointers); userspace unwinds and symbolizes them. Bounds: every map has a fixed
//! size, the stack copy a fixed number of page-sized chunks; every event that cannot be sent
//! and every entry that cannot be stored increments a counter (`profiler_common::Counter`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
        macros::map,
        maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    };
    use profiler_common::{
        COUNTERS, Counter, DEFAULT_MAX_TARGETS, FaultSampling, ITERATION_BUCKETS, ListenKey,
        LoopState, RunningLoop, SchedLayout, StackEvent, TargetSettings, USER_STACK_BYTES,
    };

    /// GPL-compatible: the stack and memory-read helpers are GPL-only.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "license")]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    // Read-only globals, set by userspace before load (names in `profiler_common::GLOBAL_*`).
    #[unsafe(no_mangle)]
    static USER_STACK_LIMIT: u32 = USER_STACK_BYTES as u32;
    /// A run that watches one process for its whole life gives its pid and loop thread here:
    /// slot 0 is then found by comparing with them (constants to the verifier, whose branches
    /// on them are pruned) instead of through the maps. 0: several targets, in the maps.
    #[unsafe(no_mangle)]
    static SOLE_PID: u32 = 0;
    #[unsafe(no_mangle)]
    static SOLE_TID: u32 = 0;
    /// Where a socket's network namespace is, from the kernel's BTF (`GLOBAL_SOCK_NET_OFFSET`,
    /// `GLOBAL_NET_INUM_OFFSET`); 0: unknown, ports keyed by number only.
    #[unsafe(no_mangle)]
    static SOCK_NET_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static NET_INUM_OFFSET: u32 = 0;
    /// Where the scheduler's accounting lies (`GLOBAL_SCHED_LAYOUT`); all zero: `sched_switch`
    /// sees the event-loop threads come back to the CPU.
    #[unsafe(no_mangle)]
    static SCHED_LAYOUT: SchedLayout = SchedLayout {
        lazy_switch_in: 0,
        task_cfs_rq: 0,
        cfs_rq_rq: 0,
        rq_clock: 0,
        last_arrival: 0,
        run_delay: 0,
        state: 0,
        _padding: 0,
    };

    /// Reads a read-only global.
    macro_rules! global {
        ($name:ident) => {
            // SAFETY: a read-only global, written by the loader before any program runs.
            unsafe { core::ptr::read_volatile(&crate::programs::$name) }
        };
    }

    mod connections;
    mod loop_timing;
    mod madvise;
    mod memory;
    mod stacks;

    /// Default ring-buffer size (userspace may change it before load): 16 MiB holds about 780
    /// stack events, most of a second of samples at 999 Hz with userspace stalled.
    const EVENTS_BYTES: u32 = 16 * 1024 * 1024;
    /// Threads of the targets that can be inside one system call at once: far more than
    /// Redis runs (main, 3 bio, io threads, jemalloc's background threads) times the targets.
    const MAX_THREADS: u32 = 4096;
    /// Slots (targets) the per-target maps are built with; userspace sizes them before load.
    const SLOTS: u32 = DEFAULT_MAX_TARGETS;

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
    /// Target pid -> slot, written by userspace: the entry point of every program that sees
    /// a thread of any process.
    #[map]
    static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(SLOTS, 0);
    /// Each slot's settings, written by userspace before its pid enters TARGETS.
    #[map]
    static TARGET_SETTINGS: Array<TargetSettings> = Array::with_max_entries(SLOTS, 0);
    /// Event-loop threads' `task_struct` addresses -> slot, to recognise one as `next` in
    /// sched_switch and in sched_wakeup (written when the loop leaves a CPU with a task not yet noted).
    #[map]
    static LOOP_TASKS: HashMap<u64, u32> = HashMap::with_max_entries(SLOTS, 0);
    /// With a sole target: its event-loop thread's `task_struct` address (set when it leaves a
    /// CPU).
    #[map]
    static SOLE_LOOP_TASK: Array<u64> = Array::with_max_entries(1, 0);
    /// The event-loop thread running on this CPU (set when one is switched in or polls,
    /// cleared when it leaves): whether the thread leaving a CPU is one costs no lookup.
    #[map]
    static RUNNING_LOOP: PerCpuArray<RunningLoop> = PerCpuArray::with_max_entries(1, 0);
    /// Event-loop threads off the CPU inside an iteration now, all targets together: while
    /// none is, a wake-up needs no lookup.
    #[map]
    static LOOPS_OFF_CPU: Array<u64> = Array::with_max_entries(1, 0);
    #[map]
    static ITERATION_HISTOGRAM: Array<u64> = Array::with_max_entries(SLOTS * ITERATION_BUCKETS, 0);
    #[map]
    static ITERATION_MAX: Array<u64> = Array::with_max_entries(SLOTS, 0);
    #[map]
    static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(SLOTS * COUNTERS, 0);
    /// Each event-loop thread's state, by slot.
    #[map]
    static LOOP_STATE: Array<LoopState> = Array::with_max_entries(SLOTS, 0);
    /// The registers and user stack each loop thread left the CPU with, by slot, kept until it
    /// runs again (its kernel stack is read then, only if the time off the CPU is reported).
    #[map]
    static OFF_CPU_STACKS: Array<StackEvent> = Array::with_max_entries(SLOTS, 0);
    /// 1 while the fault programs (host-wide, attached on demand) are attached.
    #[map]
    static FAULT_PROGRAMS_ON: Array<u64> = Array::with_max_entries(1, 0);
    /// Page-fault sampling state, by slot.
    #[map]
    static FAULT_SAMPLING: Array<FaultSampling> = Array::with_max_entries(SLOTS, 0);
    /// madvise calls in flight, by thread id: (entry time, length, advice).
    #[map]
    static MADVISE_IN_FLIGHT: HashMap<u32, [u64; 3]> = HashMap::with_max_entries(MAX_THREADS, 0);
    /// Listening ports of the targets (their ports, TLS ports, cluster buses, ...), with room
    /// to spare.
    const MAX_LISTEN_PORTS: u32 = 1024;
    /// The targets' listening ports, by network namespace -> slot, written by userspace.
    #[map]
    static LISTEN_PORTS: HashMap<ListenKey, u32> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);
    /// `accept`/`accept4` calls in flight, by thread id: the listening socket's fd.
    #[map]
    static ACCEPT_IN_FLIGHT: HashMap<u32, i64> = HashMap::with_max_entries(MAX_THREADS, 0);

    /// A target as the programs see it: its slot and settings.
    #[derive(Clone, Copy)]
    pub(crate) struct Target {
        pub slot: u32,
        pub settings: &'static TargetSettings,
    }

    #[inline(always)]
    fn now_ns() -> u64 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    }

    /// The settings in `slot`, when a target holds it.
    #[inline(always)]
    fn settings(slot: u32) -> Option<&'static TargetSettings> {
        TARGET_SETTINGS
            .get(slot)
            .filter(|settings| settings.pid != 0)
    }

    /// Whether the run watches one process only (see `SOLE_PID`).
    #[inline(always)]
    fn sole_target() -> bool {
        global!(SOLE_PID) != 0
    }

    /// Whether the current thread is the sole target's event-loop thread.
    #[inline(always)]
    fn is_sole_loop_thread() -> bool {
        bpf_get_current_pid_tgid()
            == (u64::from(global!(SOLE_PID)) << 32 | u64::from(global!(SOLE_TID)))
    }

    /// The slot of the event-loop thread whose task is `task`, if it is one.
    #[inline(always)]
    fn loop_task_slot(task: u64) -> Option<u32> {
        if sole_target() {
            return SOLE_LOOP_TASK
                .get(0)
                .is_some_and(|sole| *sole == task)
                .then_some(0);
        }
        // SAFETY: plain data, written by sched_switch.
        unsafe { LOOP_TASKS.get(&task) }.copied()
    }

    /// The target the current thread belongs to, and its thread id.
    #[inline(always)]
    fn current_target() -> Option<(Target, u32)> {
        let pid_tgid = bpf_get_current_pid_tgid();
        let pid = (pid_tgid >> 32) as u32;
        let slot = if sole_target() {
            if pid != global!(SOLE_PID) {
                return None;
            }
            0
        } else {
            // SAFETY: plain data, written only by userspace.
            *unsafe { TARGETS.get(&pid) }?
        };
        let settings = settings(slot).filter(|settings| settings.pid == pid)?;
        Some((Target { slot, settings }, pid_tgid as u32))
    }

    /// The target the current thread belongs to, and whether it is its event-loop thread: an
    /// event-loop thread seen coming onto this CPU is known without a lookup; one looked up is
    /// noted as running here.
    #[inline(always)]
    fn current_target_thread() -> Option<(Target, bool)> {
        if sole_target() {
            let pid_tgid = bpf_get_current_pid_tgid();
            if (pid_tgid >> 32) as u32 != global!(SOLE_PID) {
                return None;
            }
            let settings = settings(0)?;
            return Some((
                Target { slot: 0, settings },
                pid_tgid as u32 == global!(SOLE_TID),
            ));
        }
        // SAFETY: a helper without arguments.
        let current = unsafe { bpf_get_current_task() };
        let running = running_loop()?;
        if running.task == current
            && let Some(settings) = settings(running.slot as u32)
        {
            let slot = running.slot as u32;
            return Some((Target { slot, settings }, true));
        }
        let (target, tid) = current_target()?;
        let on_loop_thread = tid == target.settings.loop_tid;
        if on_loop_thread {
            running.task = current;
            running.slot = u64::from(target.slot);
        }
        Some((target, on_loop_thread))
    }

    /// The target whose event-loop thread is the current thread.
    #[inline(always)]
    fn current_loop_thread() -> Option<Target> {
        current_target_thread()
            .and_then(|(target, on_loop_thread)| on_loop_thread.then_some(target))
    }

    /// The entry of `map` for `slot` (plus `offset` within the slot's `per_slot` entries).
    #[inline(always)]
    fn entry<T>(map: &Array<T>, slot: u32, per_slot: u32, offset: u32) -> Option<&'static mut T> {
        // SAFETY: array entries are plain data. A slot's LOOP_STATE, OFF_CPU_STACKS and
        // iteration entries change only with its event-loop thread's own transitions (its
        // polls while it runs; its switch-out, wake-up and switch-in while it does not), which
        // follow one another, so no two programs write them at once.
        map.get_ptr_mut(slot.wrapping_mul(per_slot).wrapping_add(offset))
            .map(|pointer| unsafe { &mut *pointer })
    }

    #[inline(always)]
    fn loop_state(slot: u32) -> Option<&'static mut LoopState> {
        entry(&LOOP_STATE, slot, 1, 0)
    }

    /// This CPU's running event-loop thread.
    #[inline(always)]
    fn running_loop() -> Option<&'static mut RunningLoop> {
        // SAFETY: this CPU's entry; programs do not migrate while they run.
        RUNNING_LOOP
            .get_ptr_mut(0)
            .map(|pointer| unsafe { &mut *pointer })
    }

    /// Adds `delta` to the count of loop threads off the CPU inside an iteration (with a sole
    /// target, wake-ups compare with its task instead).
    #[inline(always)]
    fn loops_off_cpu_add(delta: i64) {
        if sole_target() {
            return;
        }
        if let Some(pointer) = LOOPS_OFF_CPU.get_ptr_mut(0) {
            // SAFETY: a u64 map entry, updated atomically (loop threads on any CPU): a BPF
            // atomic add (the target has no `AtomicU64::fetch_add`).
            unsafe {
                core::intrinsics::atomic_xadd::<
                    u64,
                    u64,
                    { core::intrinsics::AtomicOrdering::Relaxed },
                >(pointer, delta as u64)
            };
        }
    }

    /// Whether any loop thread may be off the CPU inside an iteration.
    #[inline(always)]
    fn any_loop_off_cpu() -> bool {
        sole_target() || LOOPS_OFF_CPU.get(0).is_some_and(|count| *count as i64 > 0)
    }

    /// Adds one to a counter of `slot`. Counters are bumped from any CPU (handshakes in
    /// softirq, any thread's madvise), so each CPU has its own (userspace sums them).
    #[inline(always)]
    fn count(slot: u32, counter: Counter) {
        if let Some(pointer) =
            COUNTERS_MAP.get_ptr_mut(slot.wrapping_mul(COUNTERS).wrapping_add(counter.index()))
        {
            // SAFETY: this CPU's slot; programs do not migrate while they run.
            unsafe { *pointer += 1 };
        }
    }

    /// Sends `event` to userspace, or counts it under `lost` for `slot` when the ring buffer
    /// is full.
    #[inline(always)]
    fn send<T>(event: &T, slot: u32, lost: Counter) {
        if EVENTS.output::<T>(event, 0).is_err() {
            count(slot, lost);
        }
    }

    /// Room for a `T` in the ring buffer (filled in place, then submitted), or `None` after
    /// counting the loss under `lost` for `slot` when the ring buffer is full.
    #[inline(always)]
    fn reserve<T: 'static>(slot: u32, lost: Counter) -> Option<RingBufEntry<T>> {
        let reserved = EVENTS.reserve::<T>(0);
        if reserved.is_none() {
            count(slot, lost);
        }
        reserved
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
