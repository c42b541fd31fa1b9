//! `cargo xtask bench`: what the profiler costs a healthy Redis, measured on this machine, and
//! written to BENCHMARKS.md with the commands and the figures.
//!
//! 1. Kernel side: with `kernel.bpf_stats_enabled=1`, each of the profiler's programs' own run
//!    time and run count (from `/proc/PID/fdinfo` of its program fds), per event-loop
//!    iteration and as a share of the Redis main thread's CPU time, under `redis-benchmark`.
//! 2. Throughput and latency: `redis-benchmark` GET and SET, 50 clients, runs alternating
//!    without and with `redis-stallprof attach` (defaults), Redis and the load pinned to
//!    different CPUs; the median ops/s ratio and the p99 change.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use stallprof_testkit::{Profiler, RedisServer};

/// Alternations of the throughput comparison (the issue asks for at least 5).
const ROUNDS: usize = 5;
/// Requests per `redis-benchmark` run: a few seconds each here.
const REQUESTS: u32 = 200_000;
const CLIENTS: u32 = 50;

/// One `redis-benchmark` run's figures.
#[derive(Debug, Clone, Copy)]
struct LoadFigures {
    ops_per_second: f64,
    p99_ms: f64,
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("cannot enable kernel.bpf_stats_enabled")?;
    let result = measure();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    let report = result?;
    fs::write(root.join("BENCHMARKS.md"), &report)?;
    eprintln!("{report}");
    eprintln!("bench: written to {}", root.join("BENCHMARKS.md").display());
    Ok(())
}

fn measure() -> anyhow::Result<String> {
    // Redis on CPU 0, the load generator on CPU 1.
    let redis = RedisServer::start(&[]);
    pin(redis.pid(), 0)?;
    let mut report = String::new();
    writeln!(report, "# Benchmarks\n")?;
    writeln!(
        report,
        "Written by `cargo xtask bench` on {} ({}).",
        today(),
        machine()
    )?;
    writeln!(
        report,
        "Redis: Debian's redis-server 7.0.15, pinned to CPU 0; load: `redis-benchmark -c {CLIENTS} -n {REQUESTS} -t get,set`, pinned to CPU 1.\n"
    )?;

    kernel_side(&redis, &mut report)?;
    throughput(&redis, &mut report)?;
    writeln!(report, "## Not measured yet\n")?;
    writeln!(
        report,
        "Comparisons with `perf record`, a storm of stalls, userspace unwind and symbolize speed, peak RSS and \
         time to alert (the rest of the benchmarks issue)."
    )?;
    Ok(report)
}

/// The profiler's programs' own cost per iteration under load, and as a share of Redis's CPU.
fn kernel_side(redis: &RedisServer, report: &mut String) -> anyhow::Result<()> {
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "60s"]);
    let before_programs = program_stats(profiler.pid())?;
    let before_cpu = main_thread_cpu_ns(redis.pid())?;
    load(redis.port, "get,set")?;
    let after_programs = program_stats(profiler.pid())?;
    let after_cpu = main_thread_cpu_ns(redis.pid())?;
    let run = profiler.stop();
    let iterations = run.summary()["iterations"].as_u64().unwrap_or(0).max(1);
    let redis_cpu_ns = after_cpu.saturating_sub(before_cpu).max(1);

    writeln!(report, "## Kernel side under load\n")?;
    writeln!(
        report,
        "`kernel.bpf_stats_enabled=1`; run time of each program (its own, not the tracepoint dispatch around it) \
         over one `redis-benchmark -c {CLIENTS} -n {REQUESTS} -t get,set`: {iterations} event-loop iterations, \
         Redis main thread CPU {:.2} s.\n",
        redis_cpu_ns as f64 / 1e9
    )?;
    writeln!(
        report,
        "| program | runs | ns per run | ns per iteration | share of Redis CPU |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    let mut total_ns = 0;
    for (name, (after_ns, after_runs)) in &after_programs {
        let (before_ns, before_runs) = before_programs
            .iter()
            .find(|(n, _)| n == name)
            .map_or((0, 0), |(_, v)| *v);
        let (ns, runs) = (after_ns - before_ns, after_runs - before_runs);
        if runs == 0 {
            continue;
        }
        total_ns += ns;
        writeln!(
            report,
            "| `{name}` | {runs} | {:.0} | {:.1} | {:.3}% |",
            ns as f64 / runs as f64,
            ns as f64 / iterations as f64,
            ns as f64 * 100.0 / redis_cpu_ns as f64
        )?;
    }
    writeln!(
        report,
        "| all | | | {:.1} | {:.3}% |\n",
        total_ns as f64 / iterations as f64,
        total_ns as f64 * 100.0 / redis_cpu_ns as f64
    )?;
    Ok(())
}

/// Alternating runs without and with the profiler.
fn throughput(redis: &RedisServer, report: &mut String) -> anyhow::Result<()> {
    writeln!(report, "## Throughput and latency\n")?;
    writeln!(
        report,
        "{ROUNDS} alternations of `redis-benchmark -c {CLIENTS} -n {REQUESTS} -t TEST --csv` without, then with \
         `redis-stallprof attach --pid PID` (defaults); medians.\n"
    )?;
    writeln!(
        report,
        "| test | ops/s without | ops/s with | ratio | p99 ms without | p99 ms with |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for test in ["get", "set"] {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            without.push(load(redis.port, test)?);
            let profiler =
                Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "60s"]);
            with.push(load(redis.port, test)?);
            profiler.stop();
        }
        let median = |runs: &[LoadFigures], field: fn(&LoadFigures) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(field).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let (ops_without, ops_with) = (
            median(&without, |r| r.ops_per_second),
            median(&with, |r| r.ops_per_second),
        );
        writeln!(
            report,
            "| {test} | {ops_without:.0} | {ops_with:.0} | {:.3} | {:.3} | {:.3} |",
            ops_with / ops_without,
            median(&without, |r| r.p99_ms),
            median(&with, |r| r.p99_ms)
        )?;
    }
    writeln!(report)?;
    Ok(())
}

/// One `redis-benchmark` run on CPU 1.
fn load(port: u16, test: &str) -> anyhow::Result<LoadFigures> {
    let output = Command::new("taskset")
        .args([
            "-c",
            "1",
            "redis-benchmark",
            "-p",
            &port.to_string(),
            "-c",
            &CLIENTS.to_string(),
        ])
        .args(["-n", &REQUESTS.to_string(), "-t", test, "--csv"])
        .stderr(Stdio::null())
        .output()
        .context("cannot run redis-benchmark")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    let mut figures = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<f64> = line
            .split(',')
            .skip(1)
            .filter_map(|f| f.trim_matches('"').parse().ok())
            .collect();
        if let (Some(&ops_per_second), Some(&p99_ms)) = (fields.first(), fields.get(5)) {
            figures.push(LoadFigures {
                ops_per_second,
                p99_ms,
            });
        }
    }
    let count = figures.len() as f64;
    if figures.is_empty() {
        bail!("redis-benchmark printed no figures: {text}");
    }
    Ok(LoadFigures {
        ops_per_second: figures.iter().map(|f| f.ops_per_second).sum::<f64>() / count,
        p99_ms: figures.iter().map(|f| f.p99_ms).fold(0.0, f64::max),
    })
}

/// `(program name, (run_time_ns, run_cnt))` of every BPF program fd of process `pid`. Names
/// come from `/proc/kallsyms`, where a JIT-ed program is `bpf_prog_<tag>_<name>` and the
/// fdinfo gives the tag.
fn program_stats(pid: u32) -> anyhow::Result<Vec<(String, (u64, u64))>> {
    let kallsyms = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut programs: Vec<(String, (u64, u64))> = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| Some(line.strip_prefix(name)?.trim().to_owned()))
        };
        let number = |name: &str| field(name)?.parse::<u64>().ok();
        let (Some(tag), Some(run_ns), Some(runs)) = (
            field("prog_tag:"),
            number("run_time_ns:"),
            number("run_cnt:"),
        ) else {
            continue;
        };
        let prefix = format!("bpf_prog_{tag}_");
        let name = kallsyms
            .lines()
            .find_map(|line| {
                line.split_whitespace()
                    .nth(2)?
                    .strip_prefix(&prefix)
                    .map(str::to_owned)
            })
            .unwrap_or(tag);
        match programs.iter_mut().find(|(known, _)| *known == name) {
            // One program attached to several tracepoints has one fd per attachment's link only:
            // the same counters; keep one.
            Some(_) => {}
            None => programs.push((name, (run_ns, runs))),
        }
    }
    programs.sort();
    Ok(programs)
}

/// CPU time (user + system) of the process's main thread, in ns.
fn main_thread_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("unexpected stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the man page: 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / ticks_per_second)
}

fn pin(pid: u32, cpu: u32) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("taskset failed for pid {pid}");
    }
    thread::sleep(Duration::from_millis(50));
    Ok(())
}

fn today() -> String {
    String::from_utf8_lossy(
        &Command::new("date")
            .arg("+%Y-%m-%d")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_owned()
}

fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("Linux {}, {cpus} CPUs", kernel.trim())
}
