//! The target's life: Redis restarting on its port (`--follow`), a BGSAVE child, and Redis in a
//! container (its own pid and network namespaces), selected by its host pid.
use std::{
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{NetworkNamespace, Profiler, RedisServer};

fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Whether any frame of any of the stall's stacks is `function`.
fn has_frame(stall: &Value, function: &str) -> bool {
    stall["stacks"].as_array().is_some_and(|stacks| {
        stacks.iter().any(|stack| {
            stack["frames"]
                .as_array()
                .is_some_and(|frames| frames.iter().any(|frame| frame == function))
        })
    })
}

/// Asserts `stall` is a `DEBUG SLEEP` of `expected_ms` in process `pid`.
fn assert_debug_sleep(stall: &Value, pid: u32, expected_ms: u64) {
    let duration_ms = number(&stall["duration_us"]) / 1_000;
    assert!(
        (expected_ms..expected_ms + 20).contains(&duration_ms),
        "a {expected_ms} ms sleep: {stall}"
    );
    assert_eq!(number(&stall["pid"]), u64::from(pid), "{stall}");
    assert_eq!(stall["origin"], "command:debug", "{stall}");
    assert_eq!(stall["mechanism"], "syscall.sleep", "{stall}");
    assert!(has_frame(stall, "debugCommand"), "{stall}");
}

#[test]
fn with_follow_redis_restarted_on_its_port_is_profiled_into_the_same_run() {
    let mut first = RedisServer::start(&[]);
    let port = first.port;
    let profiler = Profiler::attach(&["--port", &port.to_string(), "--follow"]);
    first.cli(&["DEBUG", "SLEEP", "0.1"]);
    first.cli(&["SHUTDOWN", "NOSAVE"]);
    first.wait_exit();

    let second = RedisServer::start_on(port, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while profiler
        .records()
        .iter()
        .filter(|record| record["type"] == "attached")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the restarted Redis was not followed"
        );
        thread::sleep(Duration::from_millis(50));
    }
    second.cli(&["DEBUG", "SLEEP", "0.15"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();

    let attached: Vec<u64> = run
        .of_type("attached")
        .iter()
        .map(|record| number(&record["pid"]))
        .collect();
    assert_eq!(
        attached,
        [u64::from(first.pid()), u64::from(second.pid())],
        "{}",
        run.stderr
    );
    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 2, "one sleep in each: {}", run.stderr);
    assert_debug_sleep(stalls[0], first.pid(), 100);
    assert_debug_sleep(stalls[1], second.pid(), 150);
    let summary = run.summary();
    assert_eq!(summary["stopped"], "signal");
    assert_eq!(number(&summary["stalls"]), 2);
    assert!(
        run.stderr.contains("waiting for the next process on port"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_bgsave_child_is_not_the_parent() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "1000000"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--threshold", "5ms"]);
    let started = Instant::now();
    assert!(redis.cli(&["BGSAVE"]).contains("Background saving started"));
    while redis.info_number("persistence", "rdb_bgsave_in_progress") == 1 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "BGSAVE did not end"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let save_time = started.elapsed();
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();

    assert!(
        redis
            .cli(&["INFO", "persistence"])
            .contains("rdb_last_bgsave_status:ok"),
        "the save worked"
    );
    let stalls = run.of_type("stall");
    // The child spent the save writing the data set (rdbSaveRio and below); that is not an
    // event-loop stall of the parent, which kept serving.
    for stall in &stalls {
        assert_eq!(number(&stall["pid"]), u64::from(redis.pid()), "{stall}");
        for child_function in ["rdbSaveRio", "rdbSaveDb", "rdbSaveKeyValuePair"] {
            assert!(!has_frame(stall, child_function), "{stall}");
        }
        assert!(
            number(&stall["duration_us"]) < save_time.as_micros() as u64 / 2,
            "no stall as long as the save ({save_time:?}): {stall}"
        );
    }
    let last = stalls.last().expect("the sleep after the save");
    assert_debug_sleep(last, redis.pid(), 50);
    assert_eq!(run.summary()["stopped"], "signal");
}

#[test]
fn redis_in_its_own_pid_and_network_namespace_is_profiled_by_its_host_pid() {
    let namespace = NetworkNamespace::create("container");
    let redis = RedisServer::start_contained(&namespace, &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", redis.pid())).unwrap();
    let namespace_pids = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .expect("NSpid");
    assert!(
        namespace_pids.trim().ends_with("\t1")
            && namespace_pids.trim().starts_with(&redis.pid().to_string()),
        "pid 1 in its own pid namespace: {namespace_pids:?}"
    );

    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["DEBUG", "SLEEP", "0.2"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();

    let attached = run.of_type("attached");
    assert_eq!(
        attached[0]["ports"].as_array().unwrap(),
        &[Value::from(redis.port)],
        "its listener is found in its network namespace"
    );
    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 1, "{}", run.stderr);
    assert_debug_sleep(stalls[0], redis.pid(), 200);
    assert!(
        has_frame(stalls[0], "main"),
        "symbolized to main: {}",
        stalls[0]
    );
    let accept = &run.summary()["accept"];
    assert_eq!(
        number(&accept["ports"][0]["port"]),
        u64::from(redis.port),
        "its accept queue is watched: {accept}"
    );
}
