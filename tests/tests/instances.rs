//! One profiler for several Redis servers: repeated `--pid`/`--port`, `--all`, and every
//! output naming its instance.
use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, number, profiler_bin, run_profiler};

/// The records of `kind` whose instance is `redis`.
fn of_instance<'a>(records: &'a [Value], kind: &str, redis: &RedisServer) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|record| {
            record["type"] == kind && number(&record["instance"]["pid"]) == u64::from(redis.pid())
        })
        .collect()
}

/// Asserts the only stall of `redis` is its `DEBUG SLEEP` of `slept_ms`, named by instance.
fn assert_one_sleep(records: &[Value], redis: &RedisServer, slept_ms: u64) {
    let stalls = of_instance(records, "stall", redis);
    assert_eq!(stalls.len(), 1, "one stall of {}: {stalls:?}", redis.port);
    let stall = stalls[0];
    assert_eq!(
        stall["instance"],
        serde_json::json!({"pid": redis.pid(), "port": redis.port, "name": "redis-server"})
    );
    assert_eq!(stall["origin"], "command:debug", "{stall}");
    assert_eq!(stall["mechanism"], "syscall.sleep", "{stall}");
    let duration_ms = number(&stall["duration_us"]) / 1_000;
    assert!(
        (slept_ms..slept_ms + 15).contains(&duration_ms),
        "{duration_ms} ms for a {slept_ms} ms sleep"
    );
}

#[test]
fn one_profiler_names_the_stalls_of_two_servers_apart() {
    let first = RedisServer::start(&[]);
    let second = RedisServer::start(&[]);
    let folded = tempfile::tempdir().unwrap();
    let folded_path = folded.path().join("stalls-{port}.folded");
    let profiler = Profiler::attach(&[
        "--port",
        &first.port.to_string(),
        "--pid",
        &second.pid().to_string(),
        "--folded",
        folded_path.to_str().unwrap(),
    ]);
    // Both attached before the first stall.
    let deadline = Instant::now() + Duration::from_secs(5);
    while of_instance(&profiler.records(), "attached", &second).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the second server was not attached"
        );
        thread::sleep(Duration::from_millis(20));
    }
    first.cli(&["DEBUG", "SLEEP", "0.05"]);
    second.cli(&["DEBUG", "SLEEP", "0.08"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    assert_one_sleep(&run.records, &first, 50);
    assert_one_sleep(&run.records, &second, 80);
    for redis in [&first, &second] {
        let summaries = of_instance(&run.records, "summary", redis);
        assert_eq!(summaries.len(), 1, "{}", run.stderr);
        assert_eq!(summaries[0]["stalls"], 1);
        assert_eq!(summaries[0]["stopped"], "signal");
        // Console lines start with their instance.
        let prefix = format!("[redis-server:{} pid {}] ", redis.port, redis.pid());
        assert!(
            run.stderr
                .lines()
                .any(|line| line.starts_with(&prefix) && line.contains("STALL")),
            "{prefix} expected:\n{}",
            run.stderr
        );
        // Folded stacks per instance: its own sleep only.
        let file = folded.path().join(format!("stalls-{}.folded", redis.port));
        let text = fs::read_to_string(&file).unwrap_or_else(|_| panic!("{file:?}"));
        assert!(text.contains("debugCommand"), "{text}");
        let weight: u64 = text
            .lines()
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum();
        let slept_us = if redis.port == first.port {
            50_000
        } else {
            80_000
        };
        assert!(
            (slept_us..slept_us + 15_000).contains(&weight),
            "{weight} us in {file:?}"
        );
    }
}

#[test]
fn all_watches_servers_that_start_and_ends_each_that_exits() {
    let mut early = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--all", "--threshold", "20ms"]);
    let late = RedisServer::start(&[]);
    let started = Instant::now();
    while of_instance(&profiler.records(), "attached", &late).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a server started after the profiler was not picked up"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let picked_up = started.elapsed();
    late.cli(&["DEBUG", "SLEEP", "0.05"]);
    early.cli(&["SHUTDOWN", "NOSAVE"]);
    early.wait_exit();
    // The early one's end is written while the run goes on.
    let deadline = Instant::now() + Duration::from_secs(3);
    while of_instance(&profiler.records(), "summary", &early).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no summary for the server that exited"
        );
        thread::sleep(Duration::from_millis(20));
    }
    late.cli(&["DEBUG", "SLEEP", "0.06"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    eprintln!("the late server was attached {picked_up:?} after it started");
    assert!(picked_up < Duration::from_millis(1500), "{picked_up:?}");
    assert_eq!(
        of_instance(&run.records, "summary", &early)[0]["stopped"],
        "target_exited"
    );
    let late_stalls = of_instance(&run.records, "stall", &late);
    assert_eq!(late_stalls.len(), 2, "{late_stalls:?}");
    assert!(
        late_stalls
            .iter()
            .all(|stall| stall["origin"] == "command:debug")
    );
    assert_eq!(
        of_instance(&run.records, "summary", &late)[0]["stopped"],
        "signal"
    );
}

#[test]
fn a_target_killed_in_the_middle_of_a_stall_ends_alone() {
    let mut doomed = RedisServer::start(&[]);
    let other = RedisServer::start(&[]);
    let profiler = Profiler::attach(&[
        "--port",
        &doomed.port.to_string(),
        "--port",
        &other.port.to_string(),
    ]);
    let mut sleeper = doomed
        .command("redis-cli")
        .args(["DEBUG", "SLEEP", "5"])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    // SAFETY: kills the test's own Redis.
    unsafe { libc::kill(doomed.pid() as i32, libc::SIGKILL) };
    doomed.wait_exit();
    let _ = sleeper.wait();
    other.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(500));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);

    let doomed_summary = of_instance(&run.records, "summary", &doomed);
    assert_eq!(doomed_summary.len(), 1, "{}", run.stderr);
    assert_eq!(doomed_summary[0]["stopped"], "target_exited");
    assert!(of_instance(&run.records, "stall", &doomed).is_empty());
    assert_one_sleep(&run.records, &other, 50);
}

#[test]
fn the_same_process_selected_twice_is_refused() {
    let redis = RedisServer::start(&[]);
    let pid = redis.pid().to_string();
    let port = redis.port.to_string();
    let output = run_profiler(&["attach", "--pid", &pid, "--port", &port]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: process {pid} is selected twice (--pid {pid} and --port {port})"
        )),
        "{stderr}"
    );
}

#[test]
fn more_targets_than_the_maps_hold_name_the_limit_and_its_flag() {
    let first = RedisServer::start(&[]);
    let second = RedisServer::start(&[]);
    let output = run_profiler(&[
        "attach",
        "--max-targets",
        "1",
        "--port",
        &first.port.to_string(),
        "--port",
        &second.port.to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let error = format!(
        "error: cannot watch redis-server pid {} (port {}): the kernel's maps hold 1 targets and \
         all are in use; raise --max-targets",
        second.pid(),
        second.port
    );
    assert!(stderr.contains(&error), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn all_with_no_server_waits_for_one_unless_told_not_to() {
    // A pid namespace of our own has no Redis.
    let in_own_namespace = |args: &[&str]| {
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(profiler_bin())
            .arg("attach")
            .args(args)
            .output()
            .expect("run unshare")
    };
    let waited = in_own_namespace(&["--all", "--duration", "700ms"]);
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(waited.status.success(), "{stderr}");
    assert!(
        stderr.contains("no redis-server or valkey-server runs yet; waiting for one"),
        "{stderr}"
    );
    let refused = in_own_namespace(&["--all", "--no-wait"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: no running redis-server or valkey-server found"),
        "{stderr}"
    );
}
