//! The event-loop thread on and off the CPU, followed by per-thread events (no host-wide
//! scheduler program; the default) and by the host-wide programs (`--probes host-wide`, what
//! a kernel without the scheduler's accounting in its BTF falls back to): time blocked and
//! time waiting for a CPU, against the kernel's own accounting of the thread
//! (`/proc/PID/task/TID/schedstat`).
use std::{
    fs,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, number};

/// The thread's time waiting on a run queue so far (`schedstat`'s second field), in ns.
fn run_delay_ns(pid: u32) -> u64 {
    let schedstat = fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat")).unwrap();
    schedstat
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Pins thread `tid` (all of its process's threads with `all`) to `cpu`.
fn pin(tid: u32, cpu: u32, all: bool) {
    let status = Command::new("taskset")
        .args(if all { &["-a"][..] } else { &[] })
        .args(["-p", "-c", &cpu.to_string(), &tid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset");
    assert!(status.success(), "taskset {tid}");
}

/// A process that spins on `cpu` until dropped.
struct Spinner(Child);

impl Spinner {
    fn on(cpu: u32) -> Self {
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("spin");
        Self(child)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Both ways of attaching the scheduler programs, as `--probes` names them and as the
/// `attached` record does.
const MODES: [(&str, &str); 2] = [("per-thread", "per_thread"), ("host-wide", "host_wide")];

/// Attaches to `redis` with `--probes mode`, checking the mode the run reports. Waits for a
/// CPU as short as 100 us are recorded (shorter than `--min-block` they are only counted, and
/// the scheduler hands out slices of about a millisecond here).
fn attach(redis: &RedisServer, mode: (&str, &str)) -> Profiler {
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--probes",
        mode.0,
        "--min-block",
        "100us",
    ]);
    let records = profiler.records();
    let attached = records
        .iter()
        .find(|record| record["type"] == "attached")
        .unwrap();
    assert_eq!(attached["probes"], mode.1, "{attached}");
    profiler
}

fn the_stall(run: &stallprof_testkit::Run) -> Value {
    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 1, "one stall: {stalls:?}\n{}", run.stderr);
    stalls[0].clone()
}

#[test]
fn a_loop_thread_sharing_its_cpu_is_shown_waiting_for_it_as_long_as_the_kernel_counts() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "2000000"]);
    pin(redis.pid(), 1, true);
    for mode in MODES {
        waiting_for_the_cpu_is_counted(&redis, mode);
    }
}

fn waiting_for_the_cpu_is_counted(redis: &RedisServer, mode: (&str, &str)) {
    let profiler = attach(redis, mode);
    // Another process spinning on the loop's CPU: the KEYS below runs about half the time
    // and waits for the CPU the other half, in slices the scheduler hands out.
    let spinner = Spinner::on(1);
    thread::sleep(Duration::from_millis(100));
    let waited_before = run_delay_ns(redis.pid());
    redis.cli(&["KEYS", "no-such-key-*"]);
    let waited_ns = run_delay_ns(redis.pid()) - waited_before;
    drop(spinner);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let stall = the_stall(&run);
    let runqueue_us = number(&stall["runqueue_us"]);
    let waited_us = waited_ns / 1_000;
    assert!(
        waited_us > 100_000,
        "the spinner made the loop wait: {waited_us} us"
    );
    // The kernel's count covers the whole command (and a little more: the reply, the poll);
    // the stall's, the iteration: within 10% of each other.
    assert!(
        runqueue_us * 10 >= waited_us * 9 && runqueue_us * 10 <= waited_us * 11,
        "{}: run queue {runqueue_us} us in the stall, {waited_us} us by the kernel's count\n{stall}",
        mode.0
    );
    let on_cpu_us = number(&stall["on_cpu_us"]);
    let duration_us = number(&stall["duration_us"]);
    assert!(
        (on_cpu_us + runqueue_us) * 10 >= duration_us * 9,
        "on-CPU {on_cpu_us} + run queue {runqueue_us} of {duration_us} us"
    );
    assert!(
        stall["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|stack| stack["kind"] == "runqueue"),
        "{stall}"
    );
}

#[test]
fn a_sleep_is_off_cpu_within_one_percent_with_its_kernel_frames() {
    let redis = RedisServer::start(&[]);
    for mode in MODES {
        a_sleep_is_timed(&redis, mode);
    }
}

fn a_sleep_is_timed(redis: &RedisServer, mode: (&str, &str)) {
    let profiler = attach(redis, mode);
    redis.cli(&["DEBUG", "SLEEP", "0.5"]);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let stall = the_stall(&run);
    let off_cpu_us = number(&stall["off_cpu_us"]) + number(&stall["runqueue_us"]);
    // nanosleep(0.5 s) sleeps at least 0.5 s, and no more than its timer's slack after.
    assert!(
        (500_000..=505_000).contains(&off_cpu_us),
        "{}: off the CPU {off_cpu_us} us for a 0.5 s sleep\n{stall}",
        mode.0
    );
    let frames = stall["stacks"][0]["frames"].to_string();
    for frame in ["do_nanosleep_[k]", "debugCommand", "main"] {
        assert!(
            frames.contains(&format!("\"{frame}\"")),
            "{frame} in {frames}"
        );
    }
}
