//! Page faults of every thread of the targets, from user code (`tp_btf/page_fault_user`) and
//! from the kernel touching user memory for them (`tp_btf/page_fault_kernel`, a `read` into a
//! new buffer): each write fault counted by kind (a new page, or a write to a write-protected
//! one), and at most one per `fault_sample_interval_ns` per target sent with its stacks,
//! standing for the faults of its kind since the previous sample. The cost is bounded whatever
//! the fault rate; a healthy server in steady state takes no fault and sends nothing.
//! BTF-typed tracepoints: every fault on the host runs them, and they skip the classic
//! tracepoint's record (about 100 ns a fault).
use aya_ebpf::{EbpfContext, macros::btf_tracepoint, programs::BtfTracePointContext};
use profiler_common::{
    Counter, EVENT_KIND_PAGE_FAULT, FAULT_KIND_NEW_PAGE, FAULT_KIND_WRITE_PROTECT, StackEvent,
};

use super::{
    FAULT_SAMPLING, count, current_target, entry, now_ns,
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
    capture_stacks(
        ctx.as_ptr(),
        event,
        &UserRegs::of_current_task(),
        target.slot,
    );
    reserved.submit(0);
}
