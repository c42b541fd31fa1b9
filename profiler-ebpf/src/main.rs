//! redis-stallprof's kernel programs. They
//! - time every event-loop iteration of the target's main thread (from the moment a poll gave
//!   the loop its events to the next poll's entry), count each into a histogram, and send only
//!   iterations at or above the threshold to userspace as stall events (`loop_timing`);
//! - once an iteration is older than a gate, send on-CPU stack samples and, when the thread ran
//!   again after leaving the CPU, its off-CPU and run-queue time with the stacks it left with
//!   (`stacks`);
//! - time the target's `madvise` calls (`madvise`) and follow connections entering and leaving
//!   its listeners' accept queues (`connections`).
//!
//! This file holds what they share: the read-only globals, the maps and the helpers that send
//! an event or count its loss. Stacks are raw (user registers, user-stack bytes, kernel
//! instruction pointers); userspace unwinds and symbolizes them. Bounds: every map has a fixed
//! size, the stack copy a fixed number of page-sized chunks; every event that cannot be sent
//! and every entry that cannot be stored increments a counter (`profiler_common::Counter`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
        macros::map,
        maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    };
    use profiler_common::{
        COUNTERS, Counter, ITERATION_BUCKETS, LoopState, NO_TARGET, StackEvent, USER_STACK_BYTES,
    };

    /// GPL-compatible: the stack and memory-read helpers are GPL-only.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "license")]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    // Read-only globals, set by userspace before load (names in `profiler_common::GLOBAL_*`).
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
    mod stacks;

    /// Default ring-buffer size (userspace may change it before load): 16 MiB holds about 780
    /// stack events, most of a second of samples at 999 Hz with userspace stalled.
    const EVENTS_BYTES: u32 = 16 * 1024 * 1024;
    /// Threads of one Redis process that can be inside one system call at once: far more than
    /// Redis runs (main, 3 bio, io threads, jemalloc's background threads).
    const MAX_THREADS: u32 = 1024;

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
    /// madvise calls in flight, by thread id: (entry time, length, advice).
    #[map]
    static MADVISE_IN_FLIGHT: HashMap<u32, [u64; 3]> = HashMap::with_max_entries(MAX_THREADS, 0);
    /// Listening ports of one Redis (its port, TLS port, cluster bus, ...), with room to spare.
    const MAX_LISTEN_PORTS: u32 = 64;
    /// The target's listening ports, written by userspace.
    #[map]
    static LISTEN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);
    /// `accept`/`accept4` calls in flight, by thread id: the listening socket's fd.
    #[map]
    static ACCEPT_IN_FLIGHT: HashMap<u32, i64> = HashMap::with_max_entries(MAX_THREADS, 0);

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

    /// Thread id of the current thread when it belongs to the target process.
    #[inline(always)]
    fn target_thread() -> Option<u32> {
        let pid_tgid = bpf_get_current_pid_tgid();
        ((pid_tgid >> 32) as u32 == global!(TARGET_PID)).then_some(pid_tgid as u32)
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

    #[inline(always)]
    fn loop_state() -> Option<&'static mut LoopState> {
        entry(&LOOP_STATE, 0)
    }

    #[inline(always)]
    fn loop_task() -> Option<&'static mut u64> {
        entry(&LOOP_TASK, 0)
    }

    /// Adds one to a counter. Counters are bumped from any CPU (handshakes in softirq, any
    /// thread's madvise), so each CPU has its own (userspace sums them).
    #[inline(always)]
    fn count(counter: Counter) {
        if let Some(pointer) = COUNTERS_MAP.get_ptr_mut(counter.index()) {
            // SAFETY: this CPU's slot; programs do not migrate while they run.
            unsafe { *pointer += 1 };
        }
    }

    /// Sends `event` to userspace, or counts it under `lost` when the ring buffer is full.
    #[inline(always)]
    fn send<T>(event: &T, lost: Counter) {
        if EVENTS.output::<T>(event, 0).is_err() {
            count(lost);
        }
    }

    /// Room for a `T` in the ring buffer (filled in place, then submitted), or `None` after
    /// counting the loss under `lost` when the ring buffer is full.
    #[inline(always)]
    fn reserve<T: 'static>(lost: Counter) -> Option<RingBufEntry<T>> {
        let reserved = EVENTS.reserve::<T>(0);
        if reserved.is_none() {
            count(lost);
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
