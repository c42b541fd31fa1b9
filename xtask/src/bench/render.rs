//! The benchmark's figures as BENCHMARKS.md: the commands, the tables, and the history of
//! earlier designs.
use std::fmt::Write as _;

use super::{
    Figures, KERNEL_SIDE_LOAD, KernelSide, POLL_ROUNDS, POLLS_PER_ROUND, PollCost,
    load::{LoadComparison, Observer, ROUNDS, STORM_LOAD, STORM_PERIOD, STORM_STALL, Storm, Test},
    memory::{MemoryCost, SETS},
    reaction::{ALERT_STALL, ALERT_THRESHOLD, ALERTS, AlertTimes, KEYS, SCANS, UserspaceSpeed},
    switches::{IDLE_WINDOW, PING_PONG_RUNS, PollWithMany, ROUND_TRIPS, SwitchCost},
};

/// Figures of earlier designs, measured by this benchmark at the commits they name.
const HISTORY: &str = include_str!("history.md");

/// The whole report.
pub fn markdown(figures: &Figures) -> String {
    let mut report = String::new();
    // Writing into a String cannot fail.
    let _ = write_all(&mut report, figures);
    report
}

fn write_all(report: &mut String, figures: &Figures) -> std::fmt::Result {
    writeln!(report, "# Benchmarks\n")?;
    writeln!(
        report,
        "Written by `cargo xtask bench` on {} ({}).",
        figures.date, figures.machine
    )?;
    writeln!(
        report,
        "Redis: Debian's redis-server 7.0.15, pinned to CPU 0; every load generator (`redis-benchmark`) pinned to \
         CPU 1. The machine is a shared VM: back-to-back throughput runs vary by several percent.\n"
    )?;
    poll_cost(report, &figures.poll)?;
    several_servers(report, &figures.switches, &figures.poll_with_many)?;
    kernel_side(report, &figures.kernel)?;
    throughput(report, &figures.throughput)?;
    storm(report, &figures.storm)?;
    userspace(report, &figures.userspace)?;
    alerts(report, &figures.alerts)?;
    memory(report, &figures.memory)?;
    writeln!(report, "The measurements took {:.0} s.\n", figures.seconds)?;
    report.push_str(HISTORY);
    Ok(())
}

fn poll_cost(report: &mut String, costs: &[PollCost]) -> std::fmt::Result {
    writeln!(report, "## Added cost per poll\n")?;
    writeln!(
        report,
        "A loop of zero-timeout `epoll_wait` calls (`xtask poll-loop`, pinned to CPU 0), {POLLS_PER_ROUND} calls \
         per round; for each observer, the fastest of {POLL_ROUNDS} rounds with nothing watching, then the fastest \
         of {POLL_ROUNDS} with it (the machine's speed drifts, so each comparison is made side by side). The \
         profiler runs with `--force` (the loop is not Redis). Each call is one event-loop iteration to the \
         profiler; `perf record` pays per sample (999 a second), not per call.\n"
    )?;
    writeln!(report, "| observer | ns per poll alone | with it | added |")?;
    writeln!(report, "|---|---|---|---|")?;
    for cost in costs {
        writeln!(
            report,
            "| {} | {:.1} | {:.1} | {:+.1} |",
            cost.observer.label(),
            cost.alone_ns,
            cost.with_ns,
            cost.with_ns - cost.alone_ns
        )?;
    }
    writeln!(report)
}

fn several_servers(
    report: &mut String,
    costs: &[SwitchCost],
    poll: &PollWithMany,
) -> std::fmt::Result {
    writeln!(
        report,
        "## Several servers: the cost to the rest of the host
"
    )?;
    writeln!(
        report,
        "The scheduler programs run on every context switch of every process. `xtask ping-pong`: two \
         processes pinned to CPU 1 pass a byte through two pipes {ROUND_TRIPS} times (two context switches and \
         two wake-ups per round trip, nothing to do with Redis); the fastest of {PING_PONG_RUNS} runs with \
         nothing watching, then with the watchers of idle servers (Debian's redis-server, one `attach` \
         for all of them or one per server, as before issue 14), side by side.\n"
    )?;
    writeln!(
        report,
        "| watchers | ns per round trip alone | with them | added per context switch |"
    )?;
    writeln!(report, "|---|---|---|---|")?;
    for cost in costs {
        writeln!(
            report,
            "| {} | {:.1} | {:.1} | {:+.1} |",
            cost.watchers.label(),
            cost.alone_ns,
            cost.with_ns,
            cost.added_per_switch_ns()
        )?;
    }
    writeln!(
        report,
        "\nThe poll loop above, watched by one `attach` that also watches {} idle servers: {:.1} ns per poll \
         alone, {:.1} with it ({:+.1}). That profiler, over {} s with every server idle: {:.1}% of one CPU, \
         {:.0} MiB resident.\n",
        poll.others,
        poll.alone_ns,
        poll.with_ns,
        poll.with_ns - poll.alone_ns,
        IDLE_WINDOW.as_secs(),
        poll.profiler_cpu_share * 100.0,
        poll.profiler_rss_kib as f64 / 1024.0,
    )
}

fn kernel_side(report: &mut String, kernel: &KernelSide) -> std::fmt::Result {
    writeln!(report, "## Kernel side under load\n")?;
    writeln!(
        report,
        "`kernel.bpf_stats_enabled=1`; run time of each program (its own, not the tracepoint dispatch around it) \
         over one `{}`: {} event-loop iterations, Redis main thread CPU {:.2} s.\n",
        KERNEL_SIDE_LOAD.command(),
        kernel.iterations,
        kernel.redis_cpu_ns as f64 / 1e9
    )?;
    writeln!(
        report,
        "| program | runs | ns per run | ns per iteration | share of Redis CPU |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    let per_iteration = |ns: u64| ns as f64 / kernel.iterations as f64;
    let share = |ns: u64| ns as f64 * 100.0 / kernel.redis_cpu_ns as f64;
    for program in &kernel.programs {
        writeln!(
            report,
            "| `{}` | {} | {:.0} | {:.1} | {:.3}% |",
            program.name,
            program.runs,
            program.ns as f64 / program.runs as f64,
            per_iteration(program.ns),
            share(program.ns)
        )?;
    }
    let total_ns = kernel.total_ns();
    writeln!(
        report,
        "| all | | | {:.1} | {:.3}% |\n",
        per_iteration(total_ns),
        share(total_ns)
    )?;
    writeln!(
        report,
        "The page-fault programs run for every fault on the host (here the load generator's) and \
         return at once for other processes. Redis itself, healthy under this load, took {} page \
         faults: {} `memory` records.\n",
        kernel.redis_faults, kernel.memory_records
    )
}

fn memory(report: &mut String, memory: &MemoryCost) -> std::fmt::Result {
    writeln!(report, "## Memory growth\n")?;
    writeln!(
        report,
        "A client adds {SETS} sets of one member each (`SADD set:N mN`, pipelined 10,000 at a time) \
         to a fresh server with `attach` watching (`--fault-sample-interval 10ms`, the default), \
         `kernel.bpf_stats_enabled=1`.\n"
    )?;
    writeln!(report, "| figure | value |")?;
    writeln!(report, "|---|---|")?;
    let per_second = |count: u64| count as f64 / memory.seconds.max(1e-9);
    writeln!(
        report,
        "| write faults of Redis handled | {} in {:.2} s: {:.0} a second |",
        memory.faults,
        memory.seconds,
        per_second(memory.faults)
    )?;
    writeln!(
        report,
        "| fault samples sent with their stacks | {} ({:.0} a second) |",
        memory.samples,
        per_second(memory.samples)
    )?;
    writeln!(
        report,
        "| fault programs (every fault on the host) | {} runs, {:.0} ns per run |",
        memory.program_runs,
        memory.program_ns as f64 / memory.program_runs.max(1) as f64
    )?;
    writeln!(
        report,
        "| their share of Redis's main-thread CPU ({:.2} s) | {:.2}% |",
        memory.redis_cpu_ns as f64 / 1e9,
        memory.program_ns as f64 * 100.0 / memory.redis_cpu_ns as f64
    )?;
    writeln!(
        report,
        "| resident growth; share attributed to `command:sadd` | {} MiB; {:.1}% |",
        memory.resident_growth_bytes >> 20,
        memory.sadd_share * 100.0
    )?;
    writeln!(
        report,
        "| a page fault of another process (writing fresh pages), alone / with `attach` | {:.0} ns / {:.0} ns (+{:.0}) |\n",
        memory.unrelated_alone_ns,
        memory.unrelated_with_ns,
        memory.unrelated_with_ns - memory.unrelated_alone_ns
    )
}

fn throughput(report: &mut String, comparisons: &[LoadComparison]) -> std::fmt::Result {
    writeln!(report, "## Throughput and latency, healthy Redis\n")?;
    writeln!(
        report,
        "{ROUNDS} alternations of each observer; medians. Each cell: ops/s relative to no observer (p99 ms). \
         `perf record` is given `-e cpu-clock -p PID` (this VM has no hardware counters).\n"
    )?;
    write!(report, "| load | test | nothing: ops/s (p99 ms) |")?;
    for observer in &Observer::ALL[1..] {
        write!(report, " {} |", observer.label())?;
    }
    writeln!(report, "\n|---|---|---|---|---|---|---|")?;
    let (mut losses, mut cpu_costs) = (Vec::new(), Vec::new());
    for comparison in comparisons {
        let Some((baseline, observed)) = comparison.runs.split_first() else {
            continue;
        };
        let command = comparison.load.command();
        for test in Test::ALL {
            let ops = baseline.median_ops(test);
            write!(
                report,
                "| `{command}` | {} | {ops:.0} ({:.3}) |",
                test.name(),
                baseline.median_p99_ms(test)
            )?;
            for (observer, runs) in Observer::ALL[1..].iter().zip(observed) {
                let ratio = runs.median_ops(test) / ops;
                losses.push((*observer, 1.0 - ratio));
                write!(report, " {ratio:.3} ({:.3}) |", runs.median_p99_ms(test))?;
            }
            writeln!(report)?;
        }
        let cpu_ns = baseline.median_cpu_ns_per_request();
        write!(
            report,
            "| `{command}` | Redis CPU per request | {cpu_ns:.0} ns |"
        )?;
        for (observer, runs) in Observer::ALL[1..].iter().zip(observed) {
            let ratio = runs.median_cpu_ns_per_request() / cpu_ns;
            cpu_costs.push((*observer, ratio - 1.0));
            write!(report, " {ratio:.3} |")?;
        }
        writeln!(report)?;
    }
    writeln!(report)?;
    for (what, figures, note) in [
        (
            "Mean ops/s loss over the four load rows",
            &losses,
            "run-to-run noise of throughput here is several %",
        ),
        (
            "Mean increase of Redis's CPU time per request over the two loads",
            &cpu_costs,
            "the cost to Redis itself, whoever else competes for the CPUs",
        ),
    ] {
        let means: Vec<String> = Observer::ALL[1..]
            .iter()
            .map(|&observer| format!("{} {:.1}%", observer.label(), mean(figures, observer)))
            .collect();
        writeln!(report, "{what}: {} ({note}).\n", means.join(", "))?;
    }
    Ok(())
}

/// The mean of `observer`'s figures, in percent.
fn mean(figures: &[(Observer, f64)], observer: Observer) -> f64 {
    let values: Vec<f64> = figures
        .iter()
        .filter(|(o, _)| *o == observer)
        .map(|(_, value)| *value)
        .collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64 * 100.0
}

fn storm(report: &mut String, storm: &Storm) -> std::fmt::Result {
    let Storm { without, with } = storm;
    writeln!(report, "## Under a storm of stalls\n")?;
    writeln!(
        report,
        "`{}` while another client sends `DEBUG SLEEP {}` every {} ms (a {} ms stall every {} ms); \
         {ROUNDS} alternations, medians.\n",
        STORM_LOAD.command(),
        STORM_STALL.as_secs_f64(),
        STORM_PERIOD.as_millis(),
        STORM_STALL.as_millis(),
        STORM_PERIOD.as_millis()
    )?;
    writeln!(
        report,
        "| test | ops/s without | ops/s with `attach` | ratio | p99 ms without | p99 ms with |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for test in Test::ALL {
        writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
            test.name(),
            without.median_ops(test),
            with.median_ops(test),
            with.median_ops(test) / without.median_ops(test),
            without.median_p99_ms(test),
            with.median_p99_ms(test)
        )?;
    }
    let (cpu_without, cpu_with) = (
        without.median_cpu_ns_per_request(),
        with.median_cpu_ns_per_request(),
    );
    let profiler_cpu_s: f64 = with.profiler_cpu_s.iter().sum::<f64>() / ROUNDS as f64;
    writeln!(
        report,
        "\nRedis's main-thread CPU time per request: {cpu_without:.0} ns without, {cpu_with:.0} ns with ({:.3}). \
         The profiler itself used {profiler_cpu_s:.2} s of CPU per run (its process, all threads).",
        cpu_with / cpu_without
    )?;
    let field = |summary: &serde_json::Value, path: &str| {
        summary.pointer(path).and_then(|v| v.as_u64()).unwrap_or(0)
    };
    let stalls: u64 = with.summaries.iter().map(|s| field(s, "/stalls")).sum();
    let lost: u64 = with
        .summaries
        .iter()
        .map(|s| field(s, "/lost_events"))
        .sum();
    let peak_kib = with
        .summaries
        .iter()
        .map(|s| field(s, "/profiler/peak_rss_kib"))
        .max()
        .unwrap_or(0);
    writeln!(
        report,
        "\nThe profiler reported {stalls} stalls over the {ROUNDS} runs, lost {lost} events; its peak resident memory \
         was {:.1} MiB.\n",
        peak_kib as f64 / 1024.0
    )
}

fn userspace(report: &mut String, speed: &UserspaceSpeed) -> std::fmt::Result {
    writeln!(report, "## Userspace speed\n")?;
    writeln!(
        report,
        "{SCANS} CPU-bound stalls (`KEYS no-such-key-*` over {KEYS} keys) under `attach --freq 999`; the \
         profiler times its own unwinding and symbolizing (the `profiler` object of its summary), on one thread.\n"
    )?;
    writeln!(
        report,
        "| stacks unwound | µs each | samples symbolized | µs each | stacks per second on one core | peak RSS |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    writeln!(
        report,
        "| {} | {:.1} | {} | {:.1} | {:.0} | {:.1} MiB |\n",
        speed.stacks_unwound,
        speed.unwind_us_each(),
        speed.samples_symbolized,
        speed.symbolize_us_each(),
        speed.stacks_per_second(),
        speed.peak_rss_kib as f64 / 1024.0
    )
}

fn alerts(report: &mut String, times: &AlertTimes) -> std::fmt::Result {
    writeln!(report, "## Time to alert\n")?;
    writeln!(
        report,
        "`attach --alert {}ms --json FILE`, {ALERTS} stalls of `DEBUG SLEEP {}`; a reader polling the file every \
         0.2 ms notes when each alert line appears.\n",
        ALERT_THRESHOLD.as_millis(),
        ALERT_STALL.as_secs_f64()
    )?;
    writeln!(report, "| alert | from | median ms | max ms | seen |")?;
    writeln!(report, "|---|---|---|---|---|")?;
    writeln!(
        report,
        "| `in_progress` | the iteration passing {} ms (command sent + {} ms) | {} |",
        ALERT_THRESHOLD.as_millis(),
        ALERT_THRESHOLD.as_millis(),
        median_max_seen(&times.in_progress_ms)
    )?;
    writeln!(
        report,
        "| `final` | the stall's end (the client has its reply) | {} |\n",
        median_max_seen(&times.final_ms)
    )
}

/// `median | max | seen/ALERTS` of alert delays.
fn median_max_seen(values: &[f64]) -> String {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    match (values.get(values.len() / 2), values.last()) {
        (Some(median), Some(max)) => {
            format!("{median:.1} | {max:.1} | {}/{ALERTS}", values.len())
        }
        _ => format!("- | - | 0/{ALERTS}"),
    }
}
