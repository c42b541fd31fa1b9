//! `redis-stallprof doctor`: one line per check of what `attach` needs, with what a failure
//! means for the user; the checks load and attach the real programs (aimed at no process).
use std::path::Path;

use crate::{
    error_chain::error_chain,
    kernel,
    probes::{HostTax, ProbeSettings, Probes},
};

/// Outcome of one check.
enum Verdict {
    Ok(String),
    /// Attach still works, with less.
    Warn(String),
    /// Attach cannot work.
    Fail(String),
}

fn print(check: &str, verdict: &Verdict) {
    let (tag, detail) = match verdict {
        Verdict::Ok(detail) => ("ok  ", detail),
        Verdict::Warn(detail) => ("warn", detail),
        Verdict::Fail(detail) => ("FAIL", detail),
    };
    println!("{tag}  {check}: {detail}");
}

/// Runs every check and prints a line each; true when `attach` can work.
pub fn run_doctor() -> bool {
    let mut verdicts = Vec::new();
    let mut check = |name: &str, verdict: Verdict| {
        print(name, &verdict);
        verdicts.push(verdict);
    };

    check(
        "privileges",
        match kernel::effective_capabilities().and_then(kernel::check_privileges) {
            Ok(()) => {
                Verdict::Ok("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are effective".into())
            }
            Err(error) => Verdict::Fail(error_chain(&error)),
        },
    );
    check(
        "kernel BTF",
        match kernel::check_btf(Path::new(kernel::VMLINUX_BTF)) {
            Ok(()) => Verdict::Ok(format!("`{}` is present", kernel::VMLINUX_BTF)),
            Err(error) => Verdict::Fail(error_chain(&error)),
        },
    );
    let tracepoints = match kernel::find_tracefs(&kernel::TRACEFS_MOUNTS) {
        Ok(tracefs) => {
            check(
                "tracefs",
                Verdict::Ok(format!("mounted at `{}`", tracefs.display())),
            );
            check_tracepoints(&tracefs, &mut check)
        }
        Err(error) => {
            check("tracefs", Verdict::Fail(error_chain(&error)));
            None
        }
    };
    if let Some(tracepoints) = tracepoints {
        check_programs(&tracepoints, &mut check);
    }
    check(
        "accept queues",
        match crate::accept::QueueSampler::open(
            std::process::id(),
            &crate::accept::NamespaceSamplers::default(),
        )
        .and_then(|mut s| s.sample())
        {
            Ok(_) => Verdict::Ok(
                "netlink sock_diag answers (listening sockets' accept queues and drops)".into(),
            ),
            Err(error) => Verdict::Warn(format!(
                "{}; accept-queue overflows cannot be watched",
                error_chain(&error)
            )),
        },
    );
    !verdicts
        .iter()
        .any(|verdict| matches!(verdict, Verdict::Fail(_)))
}

fn check_tracepoints(tracefs: &Path, check: &mut impl FnMut(&str, Verdict)) -> Option<Vec<String>> {
    let mut all_present = true;
    for (syscall, _, required) in profiler_common::POLL_SYSCALLS {
        let name = kernel::poll_tracepoint_name(syscall);
        let present = kernel::check_tracepoints(tracefs, &[("syscalls", &name)]).is_ok();
        let verdict = match (present, required) {
            (true, _) => Verdict::Ok("present (times event-loop iterations)".into()),
            (false, true) => Verdict::Fail("absent: iterations cannot be timed".into()),
            (false, false) => Verdict::Warn("absent; optional, Redis does not call it".into()),
        };
        all_present &= present || !required;
        check(&format!("tracepoint syscalls:{name}"), verdict);
    }
    for (category, name) in kernel::OTHER_TRACEPOINTS {
        let present = kernel::check_tracepoints(tracefs, &[(category, name)]).is_ok();
        let verdict = if present {
            Verdict::Ok("present".into())
        } else {
            Verdict::Fail("absent".into())
        };
        all_present &= present;
        check(&format!("tracepoint {category}:{name}"), verdict);
    }
    all_present
        .then(|| kernel::poll_tracepoints(tracefs).ok())
        .flatten()
}

/// Ok with `ok` when attaching worked; a failure otherwise (`attach` needs every one of them).
fn attach_verdict(result: Result<(), crate::probes::ProbeError>, ok: &str) -> Verdict {
    match result {
        Ok(()) => Verdict::Ok(ok.to_owned()),
        Err(error) => Verdict::Fail(error_chain(&error)),
    }
}

fn check_programs(tracepoints: &[String], check: &mut impl FnMut(&str, Verdict)) {
    // No target: the programs match nothing.
    let settings = ProbeSettings {
        user_stack_bytes: 0,
        ring_buffer_bytes: 4096,
        max_targets: 1,
        sole_target: None,
        host_wide: false,
    };
    let mut probes = match Probes::load(settings) {
        Ok(probes) => probes,
        Err(error) => return check("eBPF programs", Verdict::Fail(error_chain(&error))),
    };
    check(
        "eBPF programs",
        attach_verdict(
            probes.attach_poll_tracepoints(tracepoints),
            "loaded, and attached to every poll tracepoint (aimed at no process)",
        ),
    );
    check(
        "madvise probes",
        attach_verdict(
            probes.attach_madvise(),
            "syscalls:sys_enter_madvise and sys_exit_madvise attach",
        ),
    );
    check(
        "page-fault probes",
        attach_verdict(
            probes.try_fault_programs(),
            "tp_btf/page_fault_user and page_fault_kernel attach",
        ),
    );
    check(
        "connection probes",
        attach_verdict(
            probes.attach_connections(),
            "sock:inet_sock_set_state and the accept tracepoints attach",
        ),
    );
    check(
        "scheduler probes",
        attach_verdict(
            probes.attach_scheduler(),
            match probes.host_tax {
                HostTax::PerThread => "tp_btf/sched_process_exec attaches",
                HostTax::HostWide => {
                    "tp_btf/sched_switch, sched_wakeup and sched_process_exec attach"
                }
            },
        ),
    );
    check("host tax", host_tax_verdict(&mut probes));
    check(
        "on-CPU sampler",
        attach_verdict(
            probes.attach_sampler(std::process::id(), 1).map(drop),
            "a CPU-clock perf event per thread attaches",
        ),
    );
    check("uprobes", uprobe_verdict(&mut probes));
}

/// What the rest of the host pays: per-thread events where they attach (tried on this very
/// thread), else host-wide programs; and the syscall tracepoints' toll, which no mode avoids
/// here.
fn host_tax_verdict(probes: &mut Probes) -> Verdict {
    let syscalls = "while attached, the syscall tracepoints put every thread of the host on the \
                    kernel's slower system-call path (about +50 ns a call here)";
    match probes.host_tax {
        HostTax::PerThread => {
            let pid = std::process::id();
            match probes.attach_threads(pid, pid, true) {
                Ok(links) => {
                    probes.detach_threads(links);
                    Verdict::Ok(format!("{}; {syscalls}", HostTax::PerThread.describe()))
                }
                Err(error) => Verdict::Fail(error_chain(&error)),
            }
        }
        HostTax::HostWide => Verdict::Warn(format!(
            "{} (the kernel's BTF lacks the scheduler's accounting); {syscalls}",
            HostTax::HostWide.describe()
        )),
    }
}

/// A uprobe on a libc function in this process stands in for the one on Redis's
/// processEventsWhileBlocked; with no target in the maps, the program matches no process.
fn uprobe_verdict(probes: &mut Probes) -> Verdict {
    match probes.attach_nested_poll_markers("getpid", Path::new("libc"), std::process::id()) {
        Ok(_) => Verdict::Ok(
            "attach (used to recognise polls made inside long scripts and loads)".into(),
        ),
        Err(error) => Verdict::Warn(format!(
            "{}; a long script or a load will read as many short iterations",
            error_chain(&error)
        )),
    }
}
