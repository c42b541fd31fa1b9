//! Throughput and latency under `redis-benchmark`, with each observer attached in turn: nothing,
//! redis-stallprof (defaults, and sampling at 999 Hz with a 1 ms threshold), and `perf record`
//! (DWARF and frame-pointer call graphs); on a healthy Redis and under a storm of stalls.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use stallprof_testkit::{Profiler, RedisServer};

/// Alternations of every comparison (the issue asks for at least 5; throughput here drifts by
/// several percent from run to run, so a few more).
pub const ROUNDS: usize = 7;
const CLIENTS: u32 = 50;
/// The storm: a stall this long ...
pub const STORM_STALL: Duration = Duration::from_millis(20);
/// ... every this often.
pub const STORM_PERIOD: Duration = Duration::from_millis(100);

/// The loads of the healthy-Redis comparison: no pipelining, and pipelines of 16.
pub const HEALTHY_LOADS: [Load; 2] = [
    Load {
        pipeline: 1,
        requests: 100_000,
    },
    Load {
        pipeline: 16,
        requests: 500_000,
    },
];
/// The load under the storm.
pub const STORM_LOAD: Load = Load {
    pipeline: 1,
    requests: 100_000,
};

/// The tests `redis-benchmark` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    Get,
    Set,
}

impl Test {
    pub const ALL: [Test; 2] = [Test::Get, Test::Set];

    /// Its name in `redis-benchmark`'s output.
    pub fn name(self) -> &'static str {
        match self {
            Test::Get => "GET",
            Test::Set => "SET",
        }
    }
}

/// One value per test.
#[derive(Debug, Clone, Default)]
pub struct ByTest<T> {
    pub get: T,
    pub set: T,
}

impl<T> ByTest<T> {
    pub fn of(&self, test: Test) -> &T {
        match test {
            Test::Get => &self.get,
            Test::Set => &self.set,
        }
    }

    fn of_mut(&mut self, test: Test) -> &mut T {
        match test {
            Test::Get => &mut self.get,
            Test::Set => &mut self.set,
        }
    }
}

/// What watches Redis during a load run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    Nothing,
    Defaults,
    Sampling,
    PerfDwarf,
    PerfFramePointers,
}

impl Observer {
    pub const ALL: [Observer; 5] = [
        Observer::Nothing,
        Observer::Defaults,
        Observer::Sampling,
        Observer::PerfDwarf,
        Observer::PerfFramePointers,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Observer::Nothing => "nothing",
            Observer::Defaults => "`attach`",
            Observer::Sampling => "`attach --threshold 1ms` (samples at 4 kHz)",
            Observer::PerfDwarf => "`perf record -F 999 --call-graph dwarf`",
            Observer::PerfFramePointers => "`perf record -F 999 -g`",
        }
    }

    /// Starts watching process `pid` (the profiler with `--force`, for the poll loop).
    pub fn start(self, pid: u32) -> anyhow::Result<Watching> {
        let pid = pid.to_string();
        let profiler = |extra: &[&str]| {
            let mut args = vec!["--pid", pid.as_str(), "--force", "--interval", "60s"];
            args.extend_from_slice(extra);
            Watching::Profiler(Profiler::attach(&args))
        };
        Ok(match self {
            Observer::Nothing => Watching::Nothing,
            Observer::Defaults => profiler(&[]),
            Observer::Sampling => profiler(&["--threshold", "1ms"]),
            Observer::PerfDwarf => perf_record(&pid, &["--call-graph", "dwarf"])?,
            Observer::PerfFramePointers => perf_record(&pid, &["-g"])?,
        })
    }
}

/// An observer at work.
pub enum Watching {
    Nothing,
    Profiler(Profiler),
    Perf(Child, PathBuf),
}

impl Watching {
    /// Stops it; for the profiler, returns its run's summary and the CPU time it used (s).
    pub fn stop(self) -> Option<(serde_json::Value, f64)> {
        match self {
            Watching::Nothing => None,
            Watching::Profiler(profiler) => {
                let cpu_s = super::process_cpu_s(profiler.pid()).unwrap_or(0.0);
                Some((profiler.stop().summary().clone(), cpu_s))
            }
            Watching::Perf(mut child, data) => {
                // SAFETY: signals our own child, perf, which then writes its file and exits.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let _ = child.wait();
                let _ = std::fs::remove_file(data);
                None
            }
        }
    }
}

/// `perf record -F 999 -e cpu-clock EXTRA -p PID` (cpu-clock: this VM has no hardware counters).
fn perf_record(pid: &str, extra: &[&str]) -> anyhow::Result<Watching> {
    let data = std::env::temp_dir().join(format!("stallprof-bench-{pid}.perf.data"));
    let child = Command::new("perf")
        // -B -N: no build-id pass over the data at exit (it takes longer than the run).
        .args(["record", "-q", "-B", "-N", "-F", "999", "-e", "cpu-clock"])
        .args(extra)
        .args(["-p", pid, "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run perf (package linux-perf)")?;
    // perf says nothing when it is ready; give it time to open its events.
    thread::sleep(Duration::from_secs(1));
    let mut child = child;
    if let Some(status) = child.try_wait()? {
        bail!("perf record ended at once ({status}): is perf allowed here?");
    }
    Ok(Watching::Perf(child, data))
}

/// One test's figures from one `redis-benchmark` run.
#[derive(Debug, Clone, Copy)]
pub struct LoadFigures {
    pub ops_per_second: f64,
    pub p99_ms: f64,
}

/// A `redis-benchmark` run: `-t get,set -P PIPELINE -n REQUESTS`, on CPU 1.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub pipeline: u32,
    pub requests: u32,
}

impl Load {
    pub fn command(&self) -> String {
        format!(
            "redis-benchmark -c {CLIENTS} -P {} -n {} -t get,set",
            self.pipeline, self.requests
        )
    }

    /// Runs it; the figures of each test.
    pub fn run(&self, port: u16) -> anyhow::Result<ByTest<LoadFigures>> {
        let output = Command::new("taskset")
            .args(["-c", "1", "redis-benchmark", "-p", &port.to_string()])
            .args(["-c", &CLIENTS.to_string(), "-P", &self.pipeline.to_string()])
            .args(["-n", &self.requests.to_string(), "-t", "get,set", "--csv"])
            .stderr(Stdio::null())
            .output()
            .context("cannot run redis-benchmark")?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
        let figures = |test: Test| {
            text.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
                (fields.first() == Some(&test.name())).then_some(())?;
                Some(LoadFigures {
                    ops_per_second: fields.get(1)?.parse().ok()?,
                    p99_ms: fields.get(6)?.parse().ok()?,
                })
            })
        };
        match (figures(Test::Get), figures(Test::Set)) {
            (Some(get), Some(set)) => Ok(ByTest { get, set }),
            _ => bail!("redis-benchmark printed no GET and SET figures: {text}"),
        }
    }
}

/// The figures of many runs of one load with one observer.
#[derive(Debug, Default)]
pub struct Runs {
    /// Per test: every run's figures.
    pub tests: ByTest<Vec<LoadFigures>>,
    /// Every run's Redis main-thread CPU time per request, in ns: what the observer costs
    /// Redis itself, whatever the load generator's share of a noisy machine.
    pub cpu_ns_per_request: Vec<f64>,
    /// The profiler's summaries.
    pub summaries: Vec<serde_json::Value>,
    /// The profiler's CPU time per run, in seconds.
    pub profiler_cpu_s: Vec<f64>,
}

impl Runs {
    pub fn median_ops(&self, test: Test) -> f64 {
        median(
            self.tests
                .of(test)
                .iter()
                .map(|figures| figures.ops_per_second),
        )
    }

    pub fn median_p99_ms(&self, test: Test) -> f64 {
        median(self.tests.of(test).iter().map(|figures| figures.p99_ms))
    }

    pub fn median_cpu_ns_per_request(&self) -> f64 {
        median(self.cpu_ns_per_request.iter().copied())
    }
}

/// The median of `values` (0 for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// [`ROUNDS`] alternations of `load` under each of `observers`, in turn, in a rotating order.
pub fn alternate(
    redis: &RedisServer,
    load: Load,
    observers: &[Observer],
) -> anyhow::Result<Vec<Runs>> {
    let mut runs: Vec<Runs> = observers.iter().map(|_| Runs::default()).collect();
    for round in 0..ROUNDS {
        // Each round starts with the next observer, so none always runs first (or always
        // right after perf writes its file).
        for index in (0..observers.len()).map(|index| (index + round) % observers.len()) {
            let (observer, runs) = (&observers[index], &mut runs[index]);
            let started = std::time::Instant::now();
            let watching = observer.start(redis.pid())?;
            let cpu_before = super::main_thread_cpu_ns(redis.pid())?;
            let figures = load.run(redis.port)?;
            let cpu_ns = super::main_thread_cpu_ns(redis.pid())?.saturating_sub(cpu_before);
            runs.cpu_ns_per_request
                .push(cpu_ns as f64 / (Test::ALL.len() as u32 * load.requests) as f64);
            for test in Test::ALL {
                runs.tests.of_mut(test).push(*figures.of(test));
            }
            if let Some((summary, cpu_s)) = watching.stop() {
                runs.summaries.push(summary);
                runs.profiler_cpu_s.push(cpu_s);
            }
            eprintln!(
                "bench: round {}/{ROUNDS}, -P {}, {}: GET {:.0}/s SET {:.0}/s ({:.1} s)",
                round + 1,
                load.pipeline,
                observer.label(),
                figures.get.ops_per_second,
                figures.set.ops_per_second,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(runs)
}

/// One load's runs under each observer.
pub struct LoadComparison {
    pub load: Load,
    /// In the order of [`Observer::ALL`].
    pub runs: Vec<Runs>,
}

/// Throughput and p99 with each observer, healthy Redis, each of [`HEALTHY_LOADS`].
pub fn throughput(redis: &RedisServer) -> anyhow::Result<Vec<LoadComparison>> {
    HEALTHY_LOADS
        .into_iter()
        .map(|load| {
            Ok(LoadComparison {
                load,
                runs: alternate(redis, load, &Observer::ALL)?,
            })
        })
        .collect()
}

/// The storm's runs without and with the profiler.
pub struct Storm {
    pub without: Runs,
    pub with: Runs,
}

/// [`STORM_LOAD`] with a stall of [`STORM_STALL`] every [`STORM_PERIOD`] (`DEBUG SLEEP` from
/// another client), without and with the profiler.
pub fn storm(redis: &RedisServer) -> anyhow::Result<Storm> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = redis.client();
    let storm = thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(Ordering::Relaxed) {
                let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg(STORM_STALL.as_secs_f64())
                    .query(&mut client);
                thread::sleep(STORM_PERIOD - STORM_STALL);
            }
        }
    });
    let runs = alternate(redis, STORM_LOAD, &[Observer::Nothing, Observer::Defaults]);
    stop.store(true, Ordering::Relaxed);
    let _ = storm.join();
    let mut runs = runs?.into_iter();
    match (runs.next(), runs.next()) {
        (Some(without), Some(with)) => Ok(Storm { without, with }),
        _ => bail!("the storm ran without both observers"),
    }
}
