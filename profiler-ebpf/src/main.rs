//! redis-stallprof's kernel programs: they time every event-loop iteration of the target's main
//! thread (from a poll's return to the next poll's entry), count each into a histogram kept in a
//! map, and send only iterations at or above the threshold to userspace as stall events.
//!
//! Bounds: every map has a fixed size; a full ring buffer increments a drop counter.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
        macros::{map, tracepoint, uprobe, uretprobe},
        maps::{Array, RingBuf},
        programs::{ProbeContext, RetProbeContext, TracePointContext},
    };
    use profiler_common::{
        COUNTER_STALL_EVENTS_LOST, COUNTER_UNPAIRED_POLL_ENTRIES, COUNTERS, EVENT_KIND_STALL,
        ITERATION_BUCKETS, NO_TARGET, StallEvent, iteration_bucket,
    };

    /// Set by userspace before load (read-only globals).
    #[unsafe(no_mangle)]
    static TARGET_PID: u32 = NO_TARGET;
    #[unsafe(no_mangle)]
    static TARGET_TID: u32 = NO_TARGET;
    #[unsafe(no_mangle)]
    static THRESHOLD_NS: u64 = 10_000_000;

    /// 256 KiB: about 10,000 stall events, far more than a loop that stalls for at least the
    /// threshold each time can produce between two reads by userspace.
    const EVENTS_BYTES: u32 = 256 * 1024;

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
    #[map]
    static ITERATION_HISTOGRAM: Array<u64> = Array::with_max_entries(ITERATION_BUCKETS, 0);
    #[map]
    static ITERATION_MAX: Array<u64> = Array::with_max_entries(1, 0);
    #[map]
    static COUNTERS_MAP: Array<u64> = Array::with_max_entries(COUNTERS, 0);

    /// Slot of [`LOOP_STATE`]: when the event loop's last poll returned (0: inside a poll, or
    /// not seen yet).
    const STATE_POLL_RETURN_NS: u32 = 0;
    /// Slot of [`LOOP_STATE`]: depth of `processEventsWhileBlocked` calls in progress; polls made
    /// from inside them (during a long script or while loading) are not iteration boundaries.
    const STATE_NESTED_DEPTH: u32 = 1;
    #[map]
    static LOOP_STATE: Array<u64> = Array::with_max_entries(2, 0);

    #[inline(always)]
    fn is_event_loop_thread() -> bool {
        // SAFETY: read-only globals, written by the loader before the program runs.
        let (pid, tid) = unsafe {
            (core::ptr::read_volatile(&TARGET_PID), core::ptr::read_volatile(&TARGET_TID))
        };
        bpf_get_current_pid_tgid() == (u64::from(pid) << 32 | u64::from(tid))
    }

    #[inline(always)]
    fn slot(map: &Array<u64>, index: u32) -> Option<&mut u64> {
        // SAFETY: the map holds plain u64s and only the event-loop thread writes them, so no
        // two programs update a slot at the same time.
        map.get_ptr_mut(index).map(|pointer| unsafe { &mut *pointer })
    }

    #[inline(always)]
    fn count(counter: u32) {
        if let Some(value) = slot(&COUNTERS_MAP, counter) {
            *value += 1;
        }
    }

    #[inline(always)]
    fn nested() -> bool {
        slot(&LOOP_STATE, STATE_NESTED_DEPTH).is_some_and(|depth| *depth > 0)
    }

    /// `sys_exit_epoll_wait`, `_epoll_pwait`, `_epoll_pwait2`: an iteration begins.
    #[tracepoint]
    pub fn poll_return(_ctx: TracePointContext) -> u32 {
        if is_event_loop_thread()
            && !nested()
            && let Some(poll_return_ns) = slot(&LOOP_STATE, STATE_POLL_RETURN_NS)
        {
            // SAFETY: a helper without arguments.
            *poll_return_ns = unsafe { bpf_ktime_get_ns() };
        }
        0
    }

    /// `sys_enter_epoll_wait`, `_epoll_pwait`, `_epoll_pwait2`: the iteration ends.
    #[tracepoint]
    pub fn poll_entry(_ctx: TracePointContext) -> u32 {
        if !is_event_loop_thread() || nested() {
            return 0;
        }
        // SAFETY: a helper without arguments.
        let now_ns = unsafe { bpf_ktime_get_ns() };
        let Some(poll_return_ns) = slot(&LOOP_STATE, STATE_POLL_RETURN_NS) else {
            return 0;
        };
        let start_ns = core::mem::replace(poll_return_ns, 0);
        if start_ns == 0 {
            count(COUNTER_UNPAIRED_POLL_ENTRIES);
            return 0;
        }
        let duration_ns = now_ns.saturating_sub(start_ns);
        if let Some(bucket) = slot(&ITERATION_HISTOGRAM, iteration_bucket(duration_ns)) {
            *bucket += 1;
        }
        if let Some(max_ns) = slot(&ITERATION_MAX, 0)
            && duration_ns > *max_ns
        {
            *max_ns = duration_ns;
        }
        // SAFETY: read-only global, written by the loader.
        if duration_ns >= unsafe { core::ptr::read_volatile(&THRESHOLD_NS) } {
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
            && let Some(depth) = slot(&LOOP_STATE, STATE_NESTED_DEPTH)
        {
            *depth += 1;
        }
        0
    }

    /// Uretprobe on `processEventsWhileBlocked`: nested polling is over.
    #[uretprobe]
    pub fn nested_poll_end(_ctx: RetProbeContext) -> u32 {
        if is_event_loop_thread()
            && let Some(depth) = slot(&LOOP_STATE, STATE_NESTED_DEPTH)
        {
            *depth = depth.saturating_sub(1);
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
