//! What tracing page faults costs: while Redis's memory grows fast (sets of one member added
//! by a pipelined client), the faults handled per second and the fault programs' run time
//! against Redis's CPU (`bpf_stats`); and what one page fault of an unrelated process pays
//! with the programs attached (they run for every fault on the host and return at once).
use std::time::{Duration, Instant};

use stallprof_testkit::{Profiler, RedisServer, add_small_sets, number};

use super::{BpfStats, main_thread_cpu_ns, program_stats};

/// Sets added while memory grows.
pub const SETS: usize = 500_000;
/// Pages an unrelated process faults in per round, and the rounds (the fastest is kept).
const UNRELATED_PAGES: usize = 32_768;
const UNRELATED_ROUNDS: usize = 10;
/// The fault programs.
const PROGRAMS: [&str; 2] = ["user_page_fault", "kernel_page_fault"];

/// The figures of memory growth.
pub struct MemoryCost {
    /// Write faults of Redis's threads counted by the kernel, and over how long.
    pub faults: u64,
    pub seconds: f64,
    /// Fault samples sent with their stacks.
    pub samples: u64,
    /// The fault programs' runs and run time (every fault on the host), and Redis's main
    /// thread CPU time, over the growth.
    pub program_runs: u64,
    pub program_ns: u64,
    pub redis_cpu_ns: u64,
    /// Resident growth, and the share of it attributed to `command:sadd`.
    pub resident_growth_bytes: i64,
    pub sadd_share: f64,
    /// ns per page fault of an unrelated process, alone and with the profiler attached (the
    /// medians of [`ALTERNATIONS`]).
    pub unrelated_alone_ns: f64,
    pub unrelated_with_ns: f64,
}

/// Measures growth on a fresh server (on CPU 0, like the others) and an unrelated process's
/// faults.
pub fn measure() -> anyhow::Result<MemoryCost> {
    let redis = RedisServer::start(&[]);
    super::pin(redis.pid(), 0)?;
    let (unrelated_alone_ns, unrelated_with_ns) = unrelated_faults(&redis)?;
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "60s"]);
    // Only now: the accounting adds clock reads to every run.
    let stats = BpfStats::enable()?;
    let before_programs = fault_programs(profiler.pid())?;
    let before_cpu = main_thread_cpu_ns(redis.pid())?;
    let started = Instant::now();
    add_small_sets(&mut redis.client(), SETS);
    let seconds = started.elapsed().as_secs_f64();
    let after_programs = fault_programs(profiler.pid())?;
    let redis_cpu_ns = main_thread_cpu_ns(redis.pid())?.saturating_sub(before_cpu);
    std::thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    drop(stats);
    let memory = &run.summary()["memory"];
    let page_bytes = 4096;
    let sadd_bytes: u64 = memory["growth"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["origin"] == "command:sadd")
        .map(|entry| number(&entry["bytes"]))
        .sum();
    let attributed: u64 = memory["growth"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| number(&entry["bytes"]))
        .sum();
    let cost = MemoryCost {
        faults: (number(&memory["new_page_bytes"]) + number(&memory["copied_bytes"])) / page_bytes,
        seconds,
        samples: number(&memory["samples"]),
        program_runs: after_programs.0 - before_programs.0,
        program_ns: after_programs.1 - before_programs.1,
        redis_cpu_ns: redis_cpu_ns.max(1),
        resident_growth_bytes: memory["resident_change_bytes"].as_i64().unwrap_or(0),
        sadd_share: sadd_bytes as f64 / attributed.max(1) as f64,
        unrelated_alone_ns,
        unrelated_with_ns,
    };
    eprintln!(
        "bench: memory growth: {} faults in {:.2} s, fault programs {} ns over {} runs; an unrelated fault {:.0} ns alone, {:.0} ns with the profiler",
        cost.faults,
        cost.seconds,
        cost.program_ns,
        cost.program_runs,
        cost.unrelated_alone_ns,
        cost.unrelated_with_ns
    );
    Ok(cost)
}

/// Alternations of the unrelated process's faults without and with the profiler.
const ALTERNATIONS: usize = 5;

/// ns per page fault of this process (not Redis) alone and with `attach` watching `redis`:
/// the medians of [`ALTERNATIONS`] side-by-side measurements (the machine drifts).
fn unrelated_faults(redis: &RedisServer) -> anyhow::Result<(f64, f64)> {
    let mut alone = Vec::new();
    let mut with = Vec::new();
    for _ in 0..ALTERNATIONS {
        alone.push(unrelated_fault_ns()?);
        let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
        with.push(unrelated_fault_ns()?);
        profiler.stop();
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Ok((median(&mut alone), median(&mut with)))
}

/// (runs, ns) of the fault programs of the profiler `pid`.
fn fault_programs(pid: u32) -> anyhow::Result<(u64, u64)> {
    Ok(program_stats(pid)?
        .into_iter()
        .filter(|(name, _)| PROGRAMS.contains(&name.as_str()))
        .fold((0, 0), |(runs, ns), (_, (program_ns, program_runs))| {
            (runs + program_runs, ns + program_ns)
        }))
}

/// The fastest ns per page fault of this process (not Redis) writing to fresh anonymous
/// pages, over [`UNRELATED_ROUNDS`] rounds of [`UNRELATED_PAGES`].
fn unrelated_fault_ns() -> anyhow::Result<f64> {
    (0..UNRELATED_ROUNDS).try_fold(f64::MAX, |fastest, _| {
        Ok(fastest.min(crate::unrelated::fault_ns(UNRELATED_PAGES)?))
    })
}
