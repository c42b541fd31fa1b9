//! `cargo xtask bench`: what the profiler costs Redis and how fast it reacts, measured on this
//! machine and written to docs/BENCHMARKS.md with the commands and the figures:
//! 0. the full added cost per poll (a zero-timeout `epoll_wait` loop with and without the
//!    probes), what watching idle servers adds to every context switch of the host (module
//!    `switches`), and the kernel programs' own run time under load
//!    (`kernel.bpf_stats_enabled`), per event-loop iteration and as a share of the Redis main
//!    thread's CPU time;
//! 1. throughput and p99 under `redis-benchmark` with nothing, redis-stallprof or `perf record`
//!    attached, alternating (module `load`);
//! 2. the same under a storm of stalls, with the profiler's peak memory;
//! 3. userspace unwinding and symbolizing speed, and time to alert (module `reaction`);
//! 4. page faults handled while Redis's memory grows fast, and what a fault of any other
//!    process pays (module `memory`).
//!
//! Redis runs on CPU 0, the load generator on CPU 1. [`measure`] takes the figures, `render`
//! writes them as Markdown.
pub mod compare;
pub mod host_tax;
mod load;
pub mod memory;
mod reaction;
mod render;
pub mod switches;

use load::{LoadComparison, Observer, Storm};
use reaction::{AlertTimes, UserspaceSpeed};

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use stallprof_testkit::{Profiler, RedisServer};

pub fn run(root: &Path) -> anyhow::Result<()> {
    let report = render::markdown(&measure()?);
    // The host-tax section is `cargo xtask host-tax`'s: kept as it is.
    let path = root.join("docs/BENCHMARKS.md");
    let existing = fs::read_to_string(&path).unwrap_or_default();
    let report = match existing.find(host_tax::SECTION) {
        Some(start) => {
            let section = &existing[start..];
            let end = section[host_tax::SECTION.len()..]
                .find("\n## ")
                .map_or(section.len(), |end| end + host_tax::SECTION.len() + 1);
            host_tax::with_section(&report, section[..end].trim_end())
        }
        None => report,
    };
    fs::write(&path, &report)?;
    eprintln!("{report}");
    eprintln!(
        "bench: written to {}",
        root.join("docs/BENCHMARKS.md").display()
    );
    Ok(())
}

/// Everything the benchmark measured.
pub struct Figures {
    pub date: String,
    pub machine: String,
    pub poll: Vec<PollCost>,
    /// What watching idle servers adds per context switch, and the poll loop among them.
    pub switches: Vec<switches::SwitchCost>,
    pub poll_with_many: switches::PollWithMany,
    pub kernel: KernelSide,
    pub throughput: Vec<LoadComparison>,
    pub storm: Storm,
    pub userspace: UserspaceSpeed,
    pub alerts: AlertTimes,
    pub memory: memory::MemoryCost,
    /// How long the measurements took.
    pub seconds: f64,
}

fn measure() -> anyhow::Result<Figures> {
    // Redis on CPU 0, the load generator on CPU 1.
    let redis = RedisServer::start(&[]);
    pin(redis.pid(), 0)?;
    let started = Instant::now();
    let poll = poll_cost()?;
    let (switches, poll_with_many) = switches::measure()?;
    Ok(Figures {
        date: today(),
        machine: machine(),
        poll,
        switches,
        poll_with_many,
        kernel: kernel_side(&redis)?,
        throughput: load::throughput(&redis)?,
        storm: load::storm(&redis)?,
        userspace: reaction::userspace_speed(&redis)?,
        alerts: reaction::time_to_alert(&redis)?,
        memory: memory::measure()?,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Measures only the kernel side under load and prints it (`cargo xtask kernel-side`; with
/// `REDIS_STALLPROF_BIN` set, of another build, for a side-by-side comparison).
pub fn print_kernel_side() -> anyhow::Result<()> {
    let redis = RedisServer::start(&[]);
    pin(redis.pid(), 0)?;
    let kernel = kernel_side(&redis)?;
    for program in &kernel.programs {
        eprintln!(
            "kernel side: {} {} runs, {:.0} ns per run",
            program.name,
            program.runs,
            program.ns as f64 / program.runs as f64
        );
    }
    eprintln!(
        "kernel side: {:.1} ns per iteration, {:.3}% of Redis's main-thread CPU ({} iterations)",
        kernel.total_ns() as f64 / kernel.iterations as f64,
        kernel.total_ns() as f64 * 100.0 / kernel.redis_cpu_ns as f64,
        kernel.iterations
    );
    Ok(())
}

/// The load under which the kernel programs' run time is taken.
const KERNEL_SIDE_LOAD: load::Load = load::Load {
    pipeline: 1,
    requests: 200_000,
};

/// One kernel program's run time over the load.
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub ns: u64,
}

/// The kernel programs' own cost under [`KERNEL_SIDE_LOAD`].
pub struct KernelSide {
    pub iterations: u64,
    /// Redis's page faults under the load, and the memory records they made (a healthy
    /// server takes none).
    pub redis_faults: u64,
    pub memory_records: usize,
    pub redis_cpu_ns: u64,
    pub programs: Vec<ProgramCost>,
}

impl KernelSide {
    /// All programs' run time.
    pub fn total_ns(&self) -> u64 {
        self.programs.iter().map(|program| program.ns).sum()
    }
}

/// The profiler's programs' own cost per iteration under load, and as a share of Redis's CPU.
fn kernel_side(redis: &RedisServer) -> anyhow::Result<KernelSide> {
    // Only for this measurement: the accounting itself adds a clock read to every run.
    let _stats = BpfStats::enable()?;
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "60s"]);
    let before_programs = program_stats(profiler.pid())?;
    let before_cpu = main_thread_cpu_ns(redis.pid())?;
    KERNEL_SIDE_LOAD.run(redis.port)?;
    let after_programs = program_stats(profiler.pid())?;
    let after_cpu = main_thread_cpu_ns(redis.pid())?;
    let run = profiler.stop();
    let programs = after_programs
        .into_iter()
        .map(|(name, (after_ns, after_runs))| {
            let (before_ns, before_runs) = before_programs
                .iter()
                .find(|(n, _)| *n == name)
                .map_or((0, 0), |(_, v)| *v);
            ProgramCost {
                name,
                runs: after_runs - before_runs,
                ns: after_ns - before_ns,
            }
        })
        .filter(|program| program.runs > 0)
        .collect();
    let memory = &run.summary()["memory"];
    Ok(KernelSide {
        iterations: run.summary()["iterations"].as_u64().unwrap_or(0).max(1),
        redis_faults: (memory["new_page_bytes"].as_u64().unwrap_or(0)
            + memory["copied_bytes"].as_u64().unwrap_or(0))
            / 4096,
        memory_records: run.of_type("memory").len(),
        redis_cpu_ns: after_cpu.saturating_sub(before_cpu).max(1),
        programs,
    })
}

/// Rounds of the poll microbenchmark per setting; the minimum is kept (the least disturbed).
const POLL_ROUNDS: usize = 10;
/// Zero-timeout polls per round: about a tenth of a second.
const POLLS_PER_ROUND: u32 = 1_000_000;

/// The target of the poll microbenchmark (`xtask poll-loop`), pinned to CPU 0.
struct PollLoop {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl PollLoop {
    fn start() -> anyhow::Result<Self> {
        let mut child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(std::env::current_exe()?)
            .arg("poll-loop")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the poll loop")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self { child, stdout })
    }

    /// The least ns per zero-timeout `epoll_wait` over [`POLL_ROUNDS`] rounds.
    fn fastest_ns_per_poll(&mut self) -> anyhow::Result<f64> {
        let mut fastest = f64::MAX;
        for _ in 0..POLL_ROUNDS {
            let stdin = self.child.stdin.as_mut().context("no stdin")?;
            writeln!(stdin, "{POLLS_PER_ROUND}")?;
            let mut line = String::new();
            self.stdout.read_line(&mut line)?;
            fastest = fastest.min(line.trim().parse::<f64>().context("poll loop output")?);
        }
        Ok(fastest)
    }
}

impl Drop for PollLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The poll loop's ns per call alone and with one observer, side by side.
pub struct PollCost {
    pub observer: Observer,
    pub alone_ns: f64,
    pub with_ns: f64,
}

/// The full added cost per poll (tracepoint dispatch and program): zero-timeout `epoll_wait`
/// calls in a loop, with nothing watching, then with the profiler and with `perf record`
/// aimed at the looping thread.
fn poll_cost() -> anyhow::Result<Vec<PollCost>> {
    let mut poll_loop = PollLoop::start()?;
    let pid = poll_loop.child.id();
    let mut costs = Vec::new();
    for &observer in &Observer::ALL[1..] {
        let alone_ns = poll_loop.fastest_ns_per_poll()?;
        let watching = observer.start(pid)?;
        let with_ns = poll_loop.fastest_ns_per_poll()?;
        watching.stop();
        eprintln!(
            "bench: poll loop {alone_ns:.1} ns alone, {with_ns:.1} ns with {}",
            observer.label()
        );
        costs.push(PollCost {
            observer,
            alone_ns,
            with_ns,
        });
    }
    Ok(costs)
}

/// `kernel.bpf_stats_enabled=1` while it lives.
struct BpfStats;

impl BpfStats {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        fs::write(Self::SYSCTL, "1").context("cannot enable kernel.bpf_stats_enabled")?;
        Ok(Self)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(Self::SYSCTL, "0");
    }
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

/// CPU time of the process's main thread, in ns (`/proc/PID/task/PID/schedstat`: the
/// scheduler's own nanosecond count, finer than the clock ticks of `stat`).
fn main_thread_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let schedstat = fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))?;
    schedstat
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .context("unexpected schedstat")
}

/// CPU time (user + system) of a whole process so far, in seconds.
fn process_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("unexpected stat")?
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the man page: 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / ticks_per_second)
}

/// The middle value of `values` (0 for none).
fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
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
