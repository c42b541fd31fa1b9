//! Stall detection against a real redis-server: durations, idle silence, iteration counts, and
//! agreement with Redis's own latency monitor.
use std::{process::Command, thread, time::Duration};

use stallprof_testkit::{Profiler, RedisServer};

fn us(value: &serde_json::Value) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("not an integer: {value}"))
}

#[test]
fn debug_sleep_is_one_stall_of_its_length_matching_latency_latest() {
    let redis = RedisServer::start(&["--latency-monitor-threshold", "1"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["DEBUG", "SLEEP", "0.25"]);
    thread::sleep(Duration::from_millis(300));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    let stalls = run.of_type("stall");
    assert_eq!(
        stalls.len(),
        1,
        "exactly one stall expected: {stalls:?}\n{}",
        run.stderr
    );
    let duration_us = us(&stalls[0]["duration_us"]);
    assert!(
        (240_000..=260_000).contains(&duration_us),
        "250 ms +/- 10 ms expected, got {duration_us} us"
    );
    assert_eq!(stalls[0]["pid"], redis.pid());
    assert_eq!(stalls[0]["threshold_us"], 10_000);

    // LATENCY LATEST: event name, time, latest ms, max ms.
    let latest = redis.cli(&["LATENCY", "LATEST"]);
    let fields: Vec<&str> = latest.lines().collect();
    let command = fields
        .iter()
        .position(|field| *field == "command")
        .expect("a `command` latency event");
    let redis_ms: i64 = fields[command + 2].parse().expect("latest latency in ms");
    let ours_ms = duration_us as f64 / 1000.0;
    assert!(
        (ours_ms - redis_ms as f64).abs() <= 5.0,
        "Redis saw {redis_ms} ms, we saw {ours_ms} ms"
    );

    let summary = run.summary();
    assert_eq!(summary["stalls"], 1);
    assert_eq!(us(&summary["max_us"]), duration_us);
    assert_eq!(summary["lost_events"], 0);
    assert_eq!(summary["stopped"], "signal");
    let console_line = format!("STALL {:.1}ms", duration_us as f64 / 1000.0);
    assert!(
        run.stderr.contains(&console_line),
        "{console_line:?} expected on the console:\n{}",
        run.stderr
    );
}

#[test]
fn an_idle_server_has_no_stall() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    thread::sleep(Duration::from_secs(3));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.of_type("stall").is_empty(),
        "no stall expected: {:?}",
        run.records
    );
    // Idle Redis still wakes for serverCron (hz 10): about 10 iterations a second.
    let iterations = us(&run.summary()["iterations"]);
    assert!(
        (20..=100).contains(&iterations),
        "about 30 idle iterations expected, got {iterations}"
    );
}

#[test]
fn a_benchmark_gives_an_iteration_count_that_fits_the_requests() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--port", &redis.port.to_string(), "--interval", "100ms"]);
    // One client, no pipelining: every request is a round trip, so each needs its own iteration.
    let requests = 20_000;
    let status = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port.to_string(),
            "-c",
            "1",
            "-P",
            "1",
            "-t",
            "set",
            "-q",
        ])
        .args(["-n", &requests.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run redis-benchmark");
    assert!(status.success());
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    let summary = run.summary();
    let iterations = us(&summary["iterations"]);
    // Each request takes one iteration (plus connection set-up and ~10 cron wake-ups a second),
    // timed unless the kernel lost the loop's return from its idle poll (counted, rare).
    let not_timed = us(&summary["lost"]["iterations_not_timed"]);
    assert!(
        (requests..=requests + requests / 5 + 200).contains(&(iterations + not_timed)),
        "{iterations} iterations timed and {not_timed} not for {requests} requests: {summary}"
    );
    assert!(
        not_timed <= requests / 100,
        "at most 1% of the iterations untimed: {summary}"
    );
    assert!(
        us(&summary["p50_us"]) < 1_000,
        "a healthy iteration is well under a millisecond: {summary}"
    );
    assert!(
        run.stderr.contains("iterations/s"),
        "interval lines expected:\n{}",
        run.stderr
    );
}

#[test]
fn the_run_ends_with_its_summary_when_the_target_exits() {
    let mut redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    let _ = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "SHUTDOWN", "NOSAVE"])
        .output();
    redis.wait_exit();
    let run = profiler.wait();
    assert!(
        run.status.success(),
        "exit 0 expected when the target exits: {:?}\n{}",
        run.status,
        run.stderr
    );
    assert_eq!(run.summary()["stopped"], "target_exited");
    assert!(run.stderr.contains("target exited"), "{}", run.stderr);
}

#[test]
fn duration_stops_the_run_by_itself() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--port", &redis.port.to_string(), "--duration", "1s"]);
    let run = profiler.wait();
    assert!(run.status.success(), "{}", run.stderr);
    let summary = run.summary();
    assert_eq!(summary["stopped"], "duration");
    let seconds = summary["duration_s"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&seconds), "{seconds}");
}

#[test]
fn sigterm_flushes_every_output() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--threshold", "50ms"]);
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.terminate();
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.of_type("stall").len(), 1);
    assert_eq!(run.summary()["stalls"], 1);
}

#[test]
fn a_long_script_is_one_stall_although_redis_polls_from_inside_it() {
    // After lua-time-limit, Redis polls from inside the script (processEventsWhileBlocked) to
    // answer other clients with BUSY; those polls must not split the iteration.
    let redis = RedisServer::start(&["--lua-time-limit", "100"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    assert_eq!(profiler.records()[0]["nested_poll_tracking"], true);
    let busy_loop = "local s = redis.call('TIME') repeat local n = redis.call('TIME') \
                     until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) >= 600000 return 1";
    let port = redis.port.to_string();
    let other_client = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let output = Command::new("redis-cli")
            .args(["-p", &port, "PING"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    });
    redis.cli(&["EVAL", busy_loop, "0"]);
    assert!(
        other_client.join().unwrap().starts_with("BUSY"),
        "Redis answered from inside the script"
    );
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 1, "one stall expected: {stalls:?}");
    let duration_us = us(&stalls[0]["duration_us"]);
    assert!(
        (595_000..=650_000).contains(&duration_us),
        "about 600 ms expected, got {duration_us} us"
    );
}
