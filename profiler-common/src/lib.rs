//! The types and constants that redis-stallprof's eBPF programs and its userspace share: event
//! payloads sent through the ring buffer, the iteration histogram's bucket layout, map and
//! global names, and counter indices.
//!
//! Every payload is `#[repr(C)]` with fixed-width fields and explicit padding, and has a size
//! assertion beside it, because both sides read the same bytes.
#![no_std]

/// Name of the ring buffer carrying events to userspace.
pub const MAP_EVENTS: &str = "EVENTS";
/// Every per-target map has one slot per target: a target's slot is its index in the arrays
/// below (userspace gives it out), so one set of programs serves every target at the same cost.
///
/// Name of the `HashMap<u32, u32>`: target pid -> slot (set by userspace).
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the `Array<TargetSettings>`, by slot (set by userspace before the slot is in
/// [`MAP_TARGETS`]).
pub const MAP_TARGET_SETTINGS: &str = "TARGET_SETTINGS";
/// Name of the `HashMap<u64, u32>`: event-loop thread's `task_struct` address -> slot (kept
/// by the kernel programs; userspace removes a slot's entry when its target goes).
pub const MAP_LOOP_TASKS: &str = "LOOP_TASKS";
/// Name of the `PerCpuArray<RunningLoop>` (one entry): the event-loop thread on each CPU now.
pub const MAP_RUNNING_LOOP: &str = "RUNNING_LOOP";
/// Name of the `Array<u64>` holding the event-loop iteration histograms, [`ITERATION_BUCKETS`]
/// per slot (see [`iteration_bucket`]).
pub const MAP_ITERATION_HISTOGRAM: &str = "ITERATION_HISTOGRAM";
/// Name of the `Array<u64>` holding, by slot, the longest iteration seen since userspace last
/// reset it.
pub const MAP_ITERATION_MAX: &str = "ITERATION_MAX";
/// Name of the `Array<LoopState>` describing each event loop now, by slot.
pub const MAP_LOOP_STATE: &str = "LOOP_STATE";
/// Name of the `Array<StackEvent>` holding, by slot, the stacks the event-loop thread left the
/// CPU with, while it is off the CPU inside an iteration.
pub const MAP_OFF_CPU_STACKS: &str = "OFF_CPU_STACKS";
/// Name of the `Array<FaultSampling>`: by slot, the page faults counted since each kind's last
/// sample and when the next sample may be taken.
pub const MAP_FAULT_SAMPLING: &str = "FAULT_SAMPLING";
/// Name of the `HashMap<ListenKey, u32>` of the targets' listening ports, by network
/// namespace -> slot (set by userspace).
pub const MAP_LISTEN_PORTS: &str = "LISTEN_PORTS";
/// Name of the `Array<u64>` (one entry) userspace sets to 1 while the fault programs that
/// classify and sample page faults (host-wide BTF tracepoints) are attached.
pub const MAP_FAULT_PROGRAMS_ON: &str = "FAULT_PROGRAMS_ON";
/// Name of the `PerCpuArray<u64>` of counters, [`COUNTERS`] per slot, indexed by [`Counter`]
/// (summed over CPUs).
pub const MAP_COUNTERS: &str = "COUNTERS_MAP";
/// The per-target maps, sized with the number of slots: (name, entries per slot).
pub const PER_TARGET_MAPS: [(&str, u32); 9] = [
    (MAP_TARGETS, 1),
    (MAP_TARGET_SETTINGS, 1),
    (MAP_LOOP_TASKS, 1),
    (MAP_ITERATION_MAX, 1),
    (MAP_LOOP_STATE, 1),
    (MAP_OFF_CPU_STACKS, 1),
    (MAP_FAULT_SAMPLING, 1),
    (MAP_ITERATION_HISTOGRAM, ITERATION_BUCKETS),
    (MAP_COUNTERS, COUNTERS),
];
/// Slots the object is built with (userspace may change it before load).
pub const DEFAULT_MAX_TARGETS: u32 = 64;

/// What the kernel programs need to know of one target, by slot in [`MAP_TARGET_SETTINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetSettings {
    /// Thread-group id (pid) of the target; 0 for a free slot.
    pub pid: u32,
    /// Thread id of its event-loop thread (the main thread: tid == pid).
    pub loop_tid: u32,
    /// An iteration at least this long (ns) is sent to userspace as a stall.
    pub threshold_ns: u64,
    /// Stacks are captured only in an iteration at least this old (ns), so a healthy loop
    /// sends none.
    pub gate_ns: u64,
    /// Time off the CPU (ns) below which a block is only counted.
    pub min_block_ns: u64,
    /// At most one page-fault stack sample per this long (ns) per target: each sample stands
    /// for the faults of its kind counted since the last one. 0: no fault samples.
    pub fault_sample_interval_ns: u64,
}
const _: () = assert!(core::mem::size_of::<TargetSettings>() == 40);

#[cfg(feature = "user")]
unsafe impl aya::Pod for TargetSettings {}

/// The event-loop thread running on a CPU (kernel-side; 0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunningLoop {
    /// Its `task_struct` address.
    pub task: u64,
    /// Its target's slot.
    pub slot: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for RunningLoop {}

/// Read-only global: the pid of the one process a run watches for its whole life (then found
/// by comparison, in slot 0, not through the maps); 0 when the run may watch several.
pub const GLOBAL_SOLE_PID: &str = "SOLE_PID";
/// Read-only global: with [`GLOBAL_SOLE_PID`], the thread id of its event loop.
pub const GLOBAL_SOLE_TID: &str = "SOLE_TID";
/// Read-only global: at most this many bytes of user stack are copied (<= [`USER_STACK_BYTES`]).
pub const GLOBAL_USER_STACK_LIMIT: &str = "USER_STACK_LIMIT";
/// Read-only global: the offset of a socket's `struct net *` in `struct sock`
/// (`__sk_common.skc_net`), read from the kernel's BTF; 0 when unknown (ports are then told
/// apart by number only).
pub const GLOBAL_SOCK_NET_OFFSET: &str = "SOCK_NET_OFFSET";
/// Read-only global: the offset of the namespace's inode number in `struct net` (`ns.inum`).
pub const GLOBAL_NET_INUM_OFFSET: &str = "NET_INUM_OFFSET";

/// Read-only global: where the scheduler's own accounting lies in this kernel's structures
/// ([`SchedLayout`]); all zero when the kernel's BTF lacks it.
pub const GLOBAL_SCHED_LAYOUT: &str = "SCHED_LAYOUT";

/// Offsets in the kernel's structures, from its BTF, that let the programs find when the
/// event-loop thread came back to the CPU without a host-wide `sched_switch` program: at its
/// next event, from `sched_info.last_arrival` (the scheduler's clock when it last arrived on a
/// CPU) against the run-queue clock when it left, and `sched_info.run_delay` (its time waiting
/// on a run queue, summed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedLayout {
    /// 1 when every offset below is known: the returns to the CPU are found this way (the
    /// programs are attached per thread); 0: host-wide `sched_switch` sees them.
    pub lazy_switch_in: u32,
    /// `task_struct.se.cfs_rq`: the CFS run queue the thread is on.
    pub task_cfs_rq: u32,
    /// `cfs_rq.rq`: that run queue's CPU run queue.
    pub cfs_rq_rq: u32,
    /// `rq.clock`: the run queue's clock, as of this switch.
    pub rq_clock: u32,
    /// `task_struct.sched_info.last_arrival`.
    pub last_arrival: u32,
    /// `task_struct.sched_info.run_delay`.
    pub run_delay: u32,
    /// `task_struct.__state`: 0 (`TASK_RUNNING`) when a thread leaves the CPU preempted, not
    /// blocked (a blocking thread may stay on its run queue a while: delayed dequeue).
    pub state: u32,
    pub _padding: u32,
}
const _: () = assert!(core::mem::size_of::<SchedLayout>() == 32);

#[cfg(feature = "user")]
unsafe impl aya::Pod for SchedLayout {}

/// A listening port as the connection tracer knows it: its number within a network namespace
/// (many pods listen on 6379, each in its own namespace), by [`MAP_LISTEN_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// The network namespace's inode number (that of `/proc/PID/ns/net`); 0 when the
    /// kernel's layout is unknown.
    pub netns: u32,
    pub port: u16,
    pub _padding: u16,
}
const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);

#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenKey {}

/// The poll system calls of an event loop: (name, x86_64 syscall number, required). The entry
/// tracepoint of each (`syscalls:sys_enter_<name>`) ends an iteration; the number tells the
/// scheduler program that a thread leaving the CPU is blocked inside one. Redis calls
/// `epoll_wait` (glibc may issue it as `epoll_pwait`); `epoll_pwait2` is newer and optional.
pub const POLL_SYSCALLS: [(&str, u64, bool); 3] = [
    ("epoll_wait", 232, true),
    ("epoll_pwait", 281, true),
    ("epoll_pwait2", 441, false),
];

/// Slots in the counters map (room for counters added later).
pub const COUNTERS: u32 = 24;

/// The counters the kernel programs keep, one slot each in [`MAP_COUNTERS`] (a per-CPU array:
/// userspace sums the CPUs). Some count data lost on its way to userspace ([`Counter::loss_key`]);
/// the others describe how the loop was seen.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    StallEventsLost = 0,
    BlockingPolls = 1,
    StackEventsLost = 2,
    ShortBlocks = 3,
    BlocksBeforeGate = 4,
    UnmatchedSwitchOuts = 5,
    MadviseEventsLost = 6,
    MadviseUntracked = 7,
    ConnectionEventsLost = 8,
    ExecEventsLost = 9,
    AcceptsUntracked = 10,
    OffCpuRecordsUnread = 11,
    IterationsNotTimed = 12,
    NewPageFaults = 13,
    WriteProtectFaults = 14,
    FaultEventsLost = 15,
    KernelStacksUnread = 16,
    LoopTasksUntracked = 17,
    FaultsUnclassified = 18,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 19] = [
        Counter::StallEventsLost,
        Counter::BlockingPolls,
        Counter::StackEventsLost,
        Counter::ShortBlocks,
        Counter::BlocksBeforeGate,
        Counter::UnmatchedSwitchOuts,
        Counter::MadviseEventsLost,
        Counter::MadviseUntracked,
        Counter::ConnectionEventsLost,
        Counter::ExecEventsLost,
        Counter::AcceptsUntracked,
        Counter::OffCpuRecordsUnread,
        Counter::IterationsNotTimed,
        Counter::NewPageFaults,
        Counter::WriteProtectFaults,
        Counter::FaultEventsLost,
        Counter::KernelStacksUnread,
        Counter::LoopTasksUntracked,
        Counter::FaultsUnclassified,
    ];

    /// The counter's slot in [`MAP_COUNTERS`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// For a counter of lost data, its key in the summary's `lost` object.
    pub const fn loss_key(self) -> Option<&'static str> {
        match self {
            Counter::StallEventsLost => Some("stall_events"),
            Counter::StackEventsLost => Some("stack_events"),
            Counter::MadviseEventsLost => Some("madvise_events"),
            Counter::MadviseUntracked => Some("madvise_untracked"),
            Counter::ConnectionEventsLost => Some("connection_events"),
            Counter::ExecEventsLost => Some("exec_events"),
            Counter::AcceptsUntracked => Some("accepts_untracked"),
            Counter::OffCpuRecordsUnread => Some("off_cpu_records_unread"),
            Counter::IterationsNotTimed => Some("iterations_not_timed"),
            Counter::FaultEventsLost => Some("fault_events"),
            Counter::KernelStacksUnread => Some("kernel_stacks_unread"),
            Counter::LoopTasksUntracked => Some("loop_tasks_untracked"),
            Counter::NewPageFaults | Counter::WriteProtectFaults | Counter::FaultsUnclassified => {
                None
            }
            Counter::BlockingPolls
            | Counter::ShortBlocks
            | Counter::BlocksBeforeGate
            | Counter::UnmatchedSwitchOuts => None,
        }
    }

    /// What the counter counts, for people.
    pub const fn description(self) -> &'static str {
        match self {
            Counter::StallEventsLost => "stall events the kernel could not send (ring buffer full)",
            Counter::BlockingPolls => {
                "polls the event-loop thread blocked in (its next iteration began when it was \
                 back on the CPU)"
            }
            Counter::StackEventsLost => {
                "stack events (on- and off-CPU) the kernel could not send (ring buffer full)"
            }
            Counter::ShortBlocks => {
                "times off the CPU inside an iteration shorter than --min-block"
            }
            Counter::BlocksBeforeGate => {
                "times off the CPU of at least --min-block in an iteration younger than the gate"
            }
            Counter::UnmatchedSwitchOuts => {
                "times off the CPU whose return to the CPU was not seen (not reported)"
            }
            Counter::MadviseEventsLost => {
                "madvise events the kernel could not send (ring buffer full)"
            }
            Counter::MadviseUntracked => {
                "madvise calls not timed (the table of calls in flight was full)"
            }
            Counter::ConnectionEventsLost => {
                "connection and accept events the kernel could not send (ring buffer full)"
            }
            Counter::ExecEventsLost => "exec events the kernel could not send (ring buffer full)",
            Counter::AcceptsUntracked => {
                "accept calls not followed (the table of calls in flight was full)"
            }
            Counter::OffCpuRecordsUnread => {
                "off-CPU records the kernel could not copy into the ring buffer"
            }
            Counter::IterationsNotTimed => {
                "iterations not timed: the loop's return from an idle poll was not seen (an \
                 unmatched switch-out), so their start is unknown"
            }
            Counter::NewPageFaults => {
                "page faults of the target's threads writing to a page not present (a new \
                 resident page)"
            }
            Counter::WriteProtectFaults => {
                "page faults of the target's threads writing to a present, write-protected page \
                 (a page read before, or copy on write)"
            }
            Counter::KernelStacksUnread => {
                "samples whose kernel stack the kernel could not read (sent without it)"
            }
            Counter::LoopTasksUntracked => {
                "event-loop threads the scheduler programs could not note (their table was \
                 full): their times off the CPU go unseen"
            }
            Counter::FaultsUnclassified => {
                "page faults of the target's threads before the fault programs, attached on \
                 demand, were on (counted as new pages, without a stack)"
            }
            Counter::FaultEventsLost => {
                "page-fault stack samples the kernel could not send (ring buffer full)"
            }
        }
    }
}
const _: () = assert!(Counter::ALL.len() <= COUNTERS as usize);

/// Event kind: an event-loop iteration at or above the threshold ([`StallEvent`]).
pub const EVENT_KIND_STALL: u32 = 1;
/// Event kind: an on-CPU stack sample of the event-loop thread ([`StackEvent`]).
pub const EVENT_KIND_ON_CPU: u32 = 2;
/// Event kind: a time off the CPU of the event-loop thread, with its stacks ([`StackEvent`]).
pub const EVENT_KIND_OFF_CPU: u32 = 3;

/// Event kind: a `madvise` call by any thread of the target ([`MadviseEvent`]).
pub const EVENT_KIND_MADVISE: u32 = 4;

/// Event kind: a connection to a listening port of the target completed its handshake and
/// entered the accept queue ([`ConnectionEvent`]).
pub const EVENT_KIND_CONNECTION: u32 = 5;
/// Event kind: the target accepted a connection ([`AcceptEvent`]).
pub const EVENT_KIND_ACCEPT: u32 = 6;
/// Event kind: the target executed a new program ([`ExecEvent`]).
pub const EVENT_KIND_EXEC: u32 = 7;
/// Event kind: a page fault of a thread of the target, with its stacks ([`StackEvent`]).
pub const EVENT_KIND_PAGE_FAULT: u32 = 8;
/// Event kind: a connection to a listening port of the target closed ([`ConnectionEvent`]).
pub const EVENT_KIND_CONNECTION_CLOSED: u32 = 9;
/// Event kind: a thread of the target took page faults while the fault programs were not
/// attached ([`FaultingEvent`]; at most one per target per [`FAULTING_EVENT_PERIOD_NS`]).
pub const EVENT_KIND_FAULTING: u32 = 10;
/// The least time between two [`FaultingEvent`]s of one target.
pub const FAULTING_EVENT_PERIOD_NS: u64 = 50_000_000;

/// A target took page faults that the fault programs did not see (they are attached on
/// demand): userspace attaches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultingEvent {
    /// Always [`EVENT_KIND_FAULTING`].
    pub kind: u32,
    pub tid: u32,
    pub time_ns: u64,
    /// The target's pid.
    pub pid: u32,
    pub _padding: u32,
}
const _: () = assert!(core::mem::size_of::<FaultingEvent>() == 24);

#[cfg(feature = "user")]
unsafe impl aya::Pod for FaultingEvent {}

/// A write fault on a page not present: the kernel maps a new page (resident memory grows).
pub const FAULT_KIND_NEW_PAGE: u32 = 0;
/// A write to a present page mapped read-only: the first write to a page read before (the
/// zero page is replaced by a new one), or copy on write (after a fork, a page shared with the
/// child is copied).
pub const FAULT_KIND_WRITE_PROTECT: u32 = 1;

/// Page-fault sampling state of one target (kernel-side, by slot in [`MAP_FAULT_SAMPLING`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSampling {
    /// No sample before this time.
    pub next_sample_ns: u64,
    /// Faults of each kind ([`FAULT_KIND_NEW_PAGE`], [`FAULT_KIND_WRITE_PROTECT`]) since that
    /// kind's last sample.
    pub unsampled: [u64; 2],
    /// No [`EVENT_KIND_FAULTING`] before this time.
    pub next_faulting_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FaultSampling>() == 32);

#[cfg(feature = "user")]
unsafe impl aya::Pod for FaultSampling {}

/// The target called `execve` successfully: same pid, new program (Redis re-executes itself
/// on `DEBUG RESTART`; an in-place upgrade executes a new binary). Its mappings, and so every
/// address cached by userspace, are new.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    /// Always [`EVENT_KIND_EXEC`].
    pub kind: u32,
    pub tid: u32,
    pub time_ns: u64,
    /// The target's pid.
    pub pid: u32,
    pub _padding: u32,
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 24);

#[cfg(feature = "user")]
unsafe impl aya::Pod for ExecEvent {}

/// A connection entered a listener's accept queue (SYN_RECV -> ESTABLISHED), or one of a
/// listener's connections closed (-> CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionEvent {
    /// [`EVENT_KIND_CONNECTION`] (it entered the accept queue) or
    /// [`EVENT_KIND_CONNECTION_CLOSED`].
    pub kind: u32,
    /// The listening port.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub time_ns: u64,
    pub client_port: u16,
    pub _padding: u16,
    /// The pid of the target the port is a listener of.
    pub pid: u32,
    /// The client's address: 4 bytes for IPv4, 16 for IPv6.
    pub client_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectionEvent>() == 40);

#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnectionEvent {}

/// `accept` or `accept4` of the target returned a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptEvent {
    /// Always [`EVENT_KIND_ACCEPT`].
    pub kind: u32,
    pub tid: u32,
    pub time_ns: u64,
    /// The listening socket's file descriptor.
    pub listen_fd: i64,
    /// The new connection's file descriptor.
    pub result: i64,
    /// The target's pid.
    pub pid: u32,
    pub _padding: u32,
}
const _: () = assert!(core::mem::size_of::<AcceptEvent>() == 40);

#[cfg(feature = "user")]
unsafe impl aya::Pod for AcceptEvent {}

/// Kernel frames kept per stack (`bpf_get_stack`).
pub const KERNEL_STACK_DEPTH: usize = 64;
/// Largest user-stack copy: 16 KiB holds Redis's deepest paths from `main` (a few KiB).
pub const USER_STACK_BYTES: usize = 16 * 1024;
/// Page size used to split the user-stack copy: a chunk never crosses a page, so an unmapped
/// or non-resident page ends the copy without losing what came before.
pub const PAGE_BYTES: usize = 4096;
/// One page of slack after the copy area: lets the verifier bound a page-sized copy at any
/// offset below [`USER_STACK_BYTES`].
const USER_STACK_BUFFER_BYTES: usize = USER_STACK_BYTES + PAGE_BYTES;
/// Bytes of a request kept with a sample (`--clients exact`): a command's name comes first.
pub const REQUEST_BYTES: usize = 64;

/// One event-loop iteration at or above the threshold: from the moment a poll gave the loop
/// its events (`start_ns`) to the next poll's entry (`end_ns`), both `CLOCK_MONOTONIC`
/// nanoseconds (`bpf_ktime_get_ns`). A poll that blocked gave them when the thread was back on
/// the CPU; one that did not, at its entry (so an iteration includes that poll's own short run).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallEvent {
    /// Always [`EVENT_KIND_STALL`]; first field of every event so userspace can dispatch.
    pub kind: u32,
    /// Thread id of the event loop that stalled.
    pub tid: u32,
    /// When the iteration began (see above).
    pub start_ns: u64,
    /// When the next poll was entered.
    pub end_ns: u64,
    /// 1 when another thread made the poll the iteration began or ended with: the loop handed
    /// its poll to an io thread (Valkey 8 and later, under load) and turned without blocking
    /// until it was made.
    pub poll_handed_off: u32,
    /// The target's pid.
    pub pid: u32,
}
const _: () = assert!(core::mem::size_of::<StallEvent>() == 32);

#[cfg(feature = "user")]
unsafe impl aya::Pod for StallEvent {}

/// An event-loop thread's state, kept by the kernel programs (one entry per target's slot).
/// Userspace reads it to know the loop has been seen and how old the current iteration is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopState {
    /// When the current iteration began (see [`StallEvent`]); 0 before the first poll entry.
    /// Only the entries of polls are traced (one syscall tracepoint per iteration): a poll
    /// that does not block starts the next iteration at its entry, one that blocks at the
    /// thread's return to the CPU.
    pub iteration_start_ns: u64,
    /// 1 while the thread is blocked inside a poll (the loop is idle, no iteration runs).
    pub blocked_in_poll: u64,
    /// Depth of `processEventsWhileBlocked` calls in progress: polls made there (during a long
    /// script or a load) are not iteration boundaries.
    pub nested_depth: u64,
    /// When it left the CPU during an iteration; 0 when it is not off the CPU.
    pub switch_out_ns: u64,
    /// When it was woken after that; 0 until then.
    pub wakeup_ns: u64,
    /// 1 when it left the CPU preempted rather than blocked.
    pub preempted: u64,
    /// The epoll descriptor the loop thread polls; 0 until its first poll. Another thread of
    /// the target polling it makes the loop's poll (Valkey's io threads do, under load).
    pub poll_fd: u64,
    /// 1 when the current iteration began at such a poll.
    pub poll_handed_off: u64,
    /// The loop thread's `task_struct` address as last seen leaving the CPU (0 before), the
    /// key of its [`MAP_LOOP_TASKS`] entry.
    pub task: u64,
    /// With [`SchedLayout::lazy_switch_in`]: when it last left the CPU (idle or not), 0 once
    /// its return was accounted for at one of its later events; the run-queue clock then; and
    /// its `sched_info.run_delay` then.
    pub out_ns: u64,
    pub out_clock: u64,
    pub out_run_delay: u64,
    /// With `--clients exact`: the descriptor of the loop thread's last `read`, plus one (0:
    /// none yet), and the buffer it read into.
    pub read_fd: u64,
    pub read_buffer: u64,
}
const _: () = assert!(core::mem::size_of::<LoopState>() == 112);

impl LoopState {
    /// When the iteration running now began; `None` while the loop idles in a poll (or before
    /// the first poll entry was seen).
    pub fn running_iteration_start_ns(&self) -> Option<u64> {
        (self.iteration_start_ns != 0 && self.blocked_in_poll == 0)
            .then_some(self.iteration_start_ns)
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for LoopState {}

/// One `madvise` call of a thread of the target, sent when it returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadviseEvent {
    /// Always [`EVENT_KIND_MADVISE`].
    pub kind: u32,
    pub tid: u32,
    /// When the call was entered.
    pub start_ns: u64,
    pub duration_ns: u64,
    /// Length of the range advised, in bytes.
    pub len: u64,
    /// For the event-loop thread: `start_ns` of the iteration it ran in (0 otherwise).
    pub iteration_start_ns: u64,
    /// The advice (`MADV_*`).
    pub advice: i32,
    /// The return value (0, or a negative errno).
    pub result: i32,
    /// The target's pid.
    pub pid: u32,
    pub _padding: u32,
}
const _: () = assert!(core::mem::size_of::<MadviseEvent>() == 56);

#[cfg(feature = "user")]
unsafe impl aya::Pod for MadviseEvent {}

/// A stack sample of the event-loop thread: on the CPU (a perf-event tick) or off it (sent when
/// it runs again, with how long it was blocked and how long it then waited for a CPU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackEvent {
    /// [`EVENT_KIND_ON_CPU`], [`EVENT_KIND_OFF_CPU`] or [`EVENT_KIND_PAGE_FAULT`].
    pub kind: u32,
    pub tid: u32,
    /// When the sample was taken (on-CPU) or the thread ran again (off-CPU).
    pub time_ns: u64,
    /// `start_ns` of the iteration it belongs to (matches [`StallEvent::start_ns`]).
    pub iteration_start_ns: u64,
    /// Off-CPU: time blocked (0 when preempted).
    pub off_cpu_ns: u64,
    /// Off-CPU: time runnable, waiting for a CPU, before it ran again.
    pub runqueue_ns: u64,
    /// Off-CPU: 1 when it was preempted rather than blocked.
    pub preempted: u32,
    /// Valid entries in `kernel_stack`.
    pub kernel_frames: u32,
    /// User registers: instruction pointer, stack pointer, frame pointer.
    pub user_ip: u64,
    pub user_sp: u64,
    pub user_bp: u64,
    /// Valid bytes of `user_stack`, copied from `user_sp` upwards.
    pub user_stack_len: u32,
    /// The target's pid.
    pub pid: u32,
    /// Page fault: the address that faulted.
    pub fault_address: u64,
    /// Page fault: the faults of its kind this sample stands for (those since the last sample).
    pub faults: u64,
    /// Page fault: [`FAULT_KIND_NEW_PAGE`] or [`FAULT_KIND_WRITE_PROTECT`].
    pub fault_kind: u32,
    /// With `--clients exact`, a sample of the event-loop thread: the descriptor of its last
    /// `read` before it, plus one (0: none), ...
    pub read_fd: u32,
    /// ... and the first bytes of what that read received (valid: `request_len`).
    pub request_len: u32,
    pub _padding: u32,
    pub request: [u8; REQUEST_BYTES],
    /// Kernel instruction pointers, leaf first.
    pub kernel_stack: [u64; KERNEL_STACK_DEPTH],
    pub user_stack: [u8; USER_STACK_BUFFER_BYTES],
}
const _: () = assert!(
    core::mem::size_of::<StackEvent>()
        == 112 + REQUEST_BYTES + 8 * KERNEL_STACK_DEPTH + USER_STACK_BUFFER_BYTES
);

#[cfg(feature = "user")]
unsafe impl aya::Pod for StackEvent {}

/// Sub-buckets per power of two in the iteration histogram: each bucket is at most 1/16
/// (6.25%) of its lower bound wide.
pub const HISTOGRAM_SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: u64 = 1 << HISTOGRAM_SUB_BUCKET_BITS;
/// Largest power of two with its own buckets: 2^40 ns is about 18 minutes; longer iterations
/// land in the last bucket.
const MAX_EXPONENT: u32 = 40;
/// Number of buckets in the iteration histogram.
pub const ITERATION_BUCKETS: u32 =
    ((MAX_EXPONENT - HISTOGRAM_SUB_BUCKET_BITS + 2) as u64 * SUB_BUCKETS) as u32;

/// Index of the bit above which `value` has no set bit (floor(log2(value))), for `value > 0`.
/// Written as a fixed binary search so the eBPF verifier sees straight-line code.
#[inline(always)]
fn log2(mut value: u64) -> u32 {
    let mut exponent = 0;
    if value >= 1 << 32 {
        value >>= 32;
        exponent += 32;
    }
    if value >= 1 << 16 {
        value >>= 16;
        exponent += 16;
    }
    if value >= 1 << 8 {
        value >>= 8;
        exponent += 8;
    }
    if value >= 1 << 4 {
        value >>= 4;
        exponent += 4;
    }
    if value >= 1 << 2 {
        value >>= 2;
        exponent += 2;
    }
    if value >= 1 << 1 {
        exponent += 1;
    }
    exponent
}

/// Histogram bucket of an iteration lasting `duration_ns` (log-linear: exact below 16 ns, then
/// 16 buckets per power of two).
#[inline(always)]
pub fn iteration_bucket(duration_ns: u64) -> u32 {
    if duration_ns < SUB_BUCKETS {
        return duration_ns as u32;
    }
    let exponent = log2(duration_ns);
    if exponent > MAX_EXPONENT {
        return ITERATION_BUCKETS - 1;
    }
    let sub_bucket = (duration_ns >> (exponent - HISTOGRAM_SUB_BUCKET_BITS)) & (SUB_BUCKETS - 1);
    (exponent - HISTOGRAM_SUB_BUCKET_BITS + 1) * SUB_BUCKETS as u32 + sub_bucket as u32
}

/// The range `[low, high)` of durations (ns) that land in `bucket`.
pub fn iteration_bucket_range_ns(bucket: u32) -> (u64, u64) {
    let bucket = u64::from(bucket);
    if bucket < SUB_BUCKETS {
        return (bucket, bucket + 1);
    }
    let shift = bucket / SUB_BUCKETS - 1;
    let sub_bucket = bucket % SUB_BUCKETS;
    let low = (SUB_BUCKETS + sub_bucket) << shift;
    (low, low + (1 << shift))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_whose_range_holds_it() {
        let mut value = 0u64;
        while value < 1 << 41 {
            let bucket = iteration_bucket(value);
            assert!(bucket < ITERATION_BUCKETS, "{value} -> {bucket}");
            let (low, high) = iteration_bucket_range_ns(bucket);
            assert!(
                low <= value && value < high,
                "{value} -> {bucket} [{low}, {high})"
            );
            value = value * 9 / 8 + 1;
        }
    }

    #[test]
    fn buckets_are_contiguous_and_at_most_one_sixteenth_wide() {
        for bucket in 1..ITERATION_BUCKETS {
            let (previous_low, previous_high) = iteration_bucket_range_ns(bucket - 1);
            let (low, high) = iteration_bucket_range_ns(bucket);
            assert_eq!(previous_high, low, "gap before bucket {bucket}");
            assert!(previous_low < low);
            assert!((high - low) * 16 <= low.max(16), "bucket {bucket} too wide");
        }
    }

    #[test]
    fn every_counter_sits_in_its_own_slot() {
        for (slot, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.index() as usize, slot);
            assert!(!counter.description().is_empty());
        }
    }

    #[test]
    fn huge_values_land_in_the_last_bucket() {
        assert_eq!(iteration_bucket(u64::MAX), ITERATION_BUCKETS - 1);
        assert_eq!(iteration_bucket(1 << 41), ITERATION_BUCKETS - 1);
    }
}
