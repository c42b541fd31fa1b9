//! Page faults of every thread of the targets, from user code (`tp_btf/page_fault_user`) and
//! from the kernel touching user memory for them (`tp_btf/page_fault_kernel`, a `read` into a
//! new buffer): each write fault counted by kind (a new page, or a write to a write-protected
//! one), and at most one per `fault_sample_interval_ns` per target sent with its stacks,
//! standing for the faults of its kind since the previous sample. The cost is bounded whatever
//! the fault rate; a healthy server in steady state takes no fault and sends nothing.
//!
//! Those BTF-typed tracepoints run for every fault on the host, so they are attached only
//! while a target is taking faults: a per-thread page-fault perf event on each of its threads
//! (`thread_page_fault`, which no other thread pays for) asks for them, and userspace detaches
//! them once the targets have been quiet a while. Where per-thread events cannot be used, the
//! tracepoints stay attached.
use aya_ebpf::{
    EbpfContext,
    macros::{btf_tracepoint, perf_event},
    programs::{BtfTracePointContext, PerfEventContext},
};
use profiler_common::{
    Counter, EVENT_KIND_FAULTING, EVENT_KIND_PAGE_FAULT, FAULT_KIND_NEW_PAGE,
    FAULT_KIND_WRITE_PROTECT, FAULTING_EVENT_PERIOD_NS, FaultingEvent, StackEvent,
};

use super::{
    FAULT_PROGRAMS_ON, FAULT_SAMPLING, count, current_target, entry, now_ns, send,
    stacks::{UserRegs, capture_stacks},
};

/// Arguments of the `page_fault_user` / `page_fault_kernel` tracepoints
/// (`arch/x86/include/asm/trace/exceptions.h`): `(unsigned long address, struct pt_regs *regs,
/// unsigned long error_code)`.
const ADDRESS_ARG: usize = 0;
const ERROR_CODE_ARG: usize = 2;
/// x86 page-fault error code bits: the page was present; the access was a write.
const ERROR_PRESENT: u64 = 1;
const ERROR_WRITE: u64 = 2;
/// Addresses from here up are the kernel's (x86-64, 4-level and 5-level paging alike).
const KERNEL_SPACE: u64 = 0x8000_0000_0000_0000;

/// `page_fault_user`: a fault in the target's own code.
#[btf_tracepoint(function = "page_fault_user")]
pub fn user_page_fault(ctx: BtfTracePointContext) -> u32 {
    page_fault(&ctx);
    0
}

/// `page_fault_kernel`: a fault in the kernel on the target's memory (copying into a user
/// buffer).
#[btf_tracepoint(function = "page_fault_kernel")]
pub fn kernel_page_fault(ctx: BtfTracePointContext) -> u32 {
    page_fault(&ctx);
    0
}

/// A per-thread page-fault perf event on a thread of a target (inherited by the threads it
/// starts): fires in the faulting thread, for no other thread of the host. While the fault
/// programs are not attached, it counts the fault and asks userspace to attach them (one
/// event per target per `FAULTING_EVENT_PERIOD_NS`); while they are, it leaves the fault to
/// them. A forked child of the target inherits the event too, and is not a target.
#[perf_event]
pub fn thread_page_fault(_ctx: PerfEventContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    if FAULT_PROGRAMS_ON.get(0).is_some_and(|on| *on != 0) {
        return 0;
    }
    count(target.slot, Counter::FaultsUnclassified);
    let Some(sampling) = entry(&FAULT_SAMPLING, target.slot, 1, 0) else {
        return 0;
    };
    let now_ns = now_ns();
    if now_ns < sampling.next_faulting_ns {
        return 0;
    }
    sampling.next_faulting_ns = now_ns + FAULTING_EVENT_PERIOD_NS;
    let event = FaultingEvent {
        kind: EVENT_KIND_FAULTING,
        tid,
        time_ns: now_ns,
        pid: target.settings.pid,
        _padding: 0,
    };
    send(&event, target.slot, Counter::FaultEventsLost);
    0
}

#[inline(always)]
fn page_fault(ctx: &BtfTracePointContext) {
    let Some((target, tid)) = current_target() else {
        return;
    };
    let (address, error_code) = (ctx.arg::<u64>(ADDRESS_ARG), ctx.arg::<u64>(ERROR_CODE_ARG));
    if address >= KERNEL_SPACE {
        return;
    }
    // A read of a page not present maps the shared zero page (or a file's page): the write
    // that may follow faults again, as a write to a write-protected page. Only writes count.
    if error_code & ERROR_WRITE == 0 {
        return;
    }
    let kind = if error_code & ERROR_PRESENT == 0 {
        count(target.slot, Counter::NewPageFaults);
        FAULT_KIND_NEW_PAGE
    } else {
        count(target.slot, Counter::WriteProtectFaults);
        FAULT_KIND_WRITE_PROTECT
    };
    let interval_ns = target.settings.fault_sample_interval_ns;
    if interval_ns == 0 {
        return;
    }
    let Some(sampling) = entry(&FAULT_SAMPLING, target.slot, 1, 0) else {
        return;
    };
    let unsampled = &mut sampling.unsampled[(kind & 1) as usize];
    // SAFETY: a u64 map entry that threads on other CPUs update too: BPF atomic adds and
    // exchanges.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            unsampled, 1,
        )
    };
    let now_ns = now_ns();
    if now_ns < sampling.next_sample_ns {
        return;
    }
    // Two threads may both pass here at once: each takes its own faults out of the count.
    sampling.next_sample_ns = now_ns + interval_ns;
    // SAFETY: as above.
    let faults = unsafe {
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            unsampled, 0,
        )
    };
    if faults == 0 {
        return;
    }
    let Some(mut reserved) = super::reserve::<StackEvent>(target.slot, Counter::FaultEventsLost)
    else {
        return;
    };
    // SAFETY: the reservation is a StackEvent-sized record; every field read by userspace is
    // written below (stack arrays up to their recorded lengths).
    let event = unsafe { &mut *reserved.as_mut_ptr() };
    event.kind = EVENT_KIND_PAGE_FAULT;
    event.tid = tid;
    event.pid = target.settings.pid;
    event.time_ns = now_ns;
    event.iteration_start_ns = 0;
    event.off_cpu_ns = 0;
    event.runqueue_ns = 0;
    event.preempted = 0;
    event.fault_address = address;
    event.faults = faults;
    event.fault_kind = kind;
    event.read_fd = 0;
    event.request_len = 0;
    capture_stacks(
        ctx.as_ptr(),
        event,
        &UserRegs::of_current_task(),
        target.slot,
    );
    reserved.submit(0);
}
