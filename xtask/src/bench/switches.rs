//! What watching idle servers costs the rest of the host: the scheduler programs run on every
//! context switch of every process. A pipe ping-pong between two processes pinned to CPU 1
//! (`xtask ping-pong`, two switches per round trip, nothing to do with Redis) is timed with
//! nothing watching, then with one profiler watching 1, 4 and 16 idle servers, and with one
//! profiler per server (the way to watch several before issue 14); each side by side with a
//! fresh "nothing" figure, the machine's speed drifting. Also the poll loop's added cost with
//! 16 other servers watched by the same profiler.
use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use stallprof_testkit::{Profiler, RedisServer};

use super::{POLL_ROUNDS, PollLoop};

/// Round trips per ping-pong run, and runs per figure (the fastest is kept).
pub const ROUND_TRIPS: u64 = 100_000;
pub const PING_PONG_RUNS: usize = 7;
/// Idle servers started for the measurements.
const SERVERS: usize = 16;

/// How the servers are watched.
#[derive(Debug, Clone, Copy)]
pub struct Watchers {
    pub instances: usize,
    /// One profiler for all, or one per instance.
    pub one_per_instance: bool,
}

impl Watchers {
    const MEASURED: [Watchers; 5] = [
        Watchers::shared(1),
        Watchers::shared(4),
        Watchers::shared(16),
        Watchers::each(4),
        Watchers::each(16),
    ];

    const fn shared(instances: usize) -> Self {
        Self {
            instances,
            one_per_instance: false,
        }
    }

    const fn each(instances: usize) -> Self {
        Self {
            instances,
            one_per_instance: true,
        }
    }

    pub fn label(self) -> String {
        match (self.one_per_instance, self.instances) {
            (false, 1) => {
                "one `attach` watching 1 idle server (a sole target: its ids compared)".to_owned()
            }
            (false, n) => format!("one `attach` watching {n} idle servers"),
            (true, n) => format!("{n} `attach`, one per idle server"),
        }
    }
}

/// The ping-pong's ns per round trip alone and with the watchers, side by side.
pub struct SwitchCost {
    pub watchers: Watchers,
    pub alone_ns: f64,
    pub with_ns: f64,
}

impl SwitchCost {
    /// Added ns per context switch (two per round trip).
    pub fn added_per_switch_ns(&self) -> f64 {
        (self.with_ns - self.alone_ns) / 2.0
    }
}

/// The poll loop alone and with one profiler watching it and 16 idle servers, and what that
/// profiler itself used while they stayed idle.
pub struct PollWithMany {
    pub others: usize,
    pub alone_ns: f64,
    pub with_ns: f64,
    /// The profiler's CPU time over [`IDLE_WINDOW`], as a share of one CPU.
    pub profiler_cpu_share: f64,
    /// Its resident memory then (KiB).
    pub profiler_rss_kib: u64,
}

/// How long the profiler's own use is measured with every server idle.
pub const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Every [`Watchers::MEASURED`] figure, and the poll loop with the servers watched too.
pub fn measure() -> anyhow::Result<(Vec<SwitchCost>, PollWithMany)> {
    let servers: Vec<RedisServer> = (0..SERVERS).map(|_| RedisServer::start(&[])).collect();
    let mut costs = Vec::new();
    for watchers in Watchers::MEASURED {
        let alone_ns = fastest_round_trip_ns()?;
        let watching = watch(
            &servers[..watchers.instances],
            watchers.one_per_instance,
            None,
        )?;
        let with_ns = fastest_round_trip_ns()?;
        stop(watching);
        eprintln!(
            "bench: ping-pong {alone_ns:.1} ns alone, {with_ns:.1} ns with {}",
            watchers.label()
        );
        costs.push(SwitchCost {
            watchers,
            alone_ns,
            with_ns,
        });
    }
    let mut poll_loop = PollLoop::start()?;
    let alone_ns = poll_loop.fastest_ns_per_poll()?;
    let watching = watch(&servers, false, Some(poll_loop.child.id()))?;
    let with_ns = poll_loop.fastest_ns_per_poll()?;
    let profiler = watching[0].pid();
    let before_s = super::process_cpu_s(profiler)?;
    thread::sleep(IDLE_WINDOW);
    let profiler_cpu_share =
        (super::process_cpu_s(profiler)? - before_s) / IDLE_WINDOW.as_secs_f64();
    let profiler_rss_kib = rss_kib(profiler)?;
    stop(watching);
    eprintln!(
        "bench: poll loop {alone_ns:.1} ns alone, {with_ns:.1} ns watched with {SERVERS} servers \
         ({POLL_ROUNDS} rounds)"
    );
    Ok((
        costs,
        PollWithMany {
            others: SERVERS,
            alone_ns,
            with_ns,
            profiler_cpu_share,
            profiler_rss_kib,
        },
    ))
}

/// Profilers watching `servers` (and the poll loop `extra`, with `--force`): one for all, or
/// one per server; each attached to all its targets when this returns.
fn watch(
    servers: &[RedisServer],
    one_per_instance: bool,
    extra: Option<u32>,
) -> anyhow::Result<Vec<Profiler>> {
    let ports: Vec<String> = servers
        .iter()
        .map(|server| server.port.to_string())
        .collect();
    let groups: Vec<Vec<&String>> = if one_per_instance {
        ports.iter().map(|port| vec![port]).collect()
    } else {
        vec![ports.iter().collect()]
    };
    let extra = extra.map(|pid| pid.to_string());
    let mut profilers = Vec::new();
    for group in groups {
        let mut args = vec!["--interval", "600s"];
        for port in &group {
            args.extend(["--port", port.as_str()]);
        }
        if let Some(pid) = &extra {
            args.extend(["--pid", pid.as_str(), "--force"]);
        }
        let targets = group.len() + usize::from(extra.is_some());
        let profiler = Profiler::attach(&args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while profiler
            .records()
            .iter()
            .filter(|record| record["type"] == "attached")
            .count()
            < targets
        {
            if Instant::now() > deadline {
                bail!("a profiler did not attach to its {targets} targets");
            }
            thread::sleep(Duration::from_millis(20));
        }
        profilers.push(profiler);
    }
    Ok(profilers)
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn stop(profilers: Vec<Profiler>) {
    for profiler in profilers {
        profiler.stop();
    }
}

/// The least ns per ping-pong round trip over [`PING_PONG_RUNS`] runs on CPU 1.
fn fastest_round_trip_ns() -> anyhow::Result<f64> {
    let mut fastest = f64::MAX;
    for _ in 0..PING_PONG_RUNS {
        let output = Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::current_exe()?)
            .args(["ping-pong", &ROUND_TRIPS.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the ping-pong")?;
        if !output.status.success() {
            bail!("the ping-pong failed: {:?}", output.status);
        }
        let ns: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("ping-pong output")?;
        fastest = fastest.min(ns);
    }
    Ok(fastest)
}
