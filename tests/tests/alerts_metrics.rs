//! Alerts on stall duration (final and in progress, with `--alert-exec`) and the Prometheus
//! metrics endpoint, against a real redis-server.
use std::{
    collections::HashMap,
    fs,
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, free_port, scrape_metrics};

fn alerts<'a>(records: &'a [Value], state: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["type"] == "alert" && r["state"] == state)
        .collect()
}

#[test]
fn a_stall_past_the_alert_threshold_gives_one_final_alert_and_runs_the_command() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let received = dir.path().join("received.jsonl");
    let exec = format!("sh -c 'cat >> {}'", received.display());
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--alert",
        "100ms",
        "--alert-exec",
        &exec,
    ]);
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    redis.cli(&["DEBUG", "SLEEP", "0.2"]);
    thread::sleep(Duration::from_millis(300));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    let finals = alerts(&run.records, "final");
    assert_eq!(
        finals.len(),
        1,
        "one final alert, for the 0.2 s sleep only: {finals:?}"
    );
    let duration_us = finals[0]["duration_us"].as_u64().unwrap();
    assert!((190_000..=230_000).contains(&duration_us), "{duration_us}");
    assert_eq!(finals[0]["origin"], "command:debug");
    assert_eq!(finals[0]["mechanism"], "syscall.sleep");
    assert_eq!(run.of_type("stall").len(), 2, "both sleeps are stalls");
    assert!(run.stderr.contains("ALERT"), "{}", run.stderr);

    let text = fs::read_to_string(&received).expect("the command ran");
    let received: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("valid JSON on stdin"))
        .collect();
    let final_received = received
        .iter()
        .find(|alert| alert["state"] == "final")
        .expect("the final alert was run");
    assert_eq!(final_received["origin"], "command:debug");
    assert_eq!(final_received["duration_us"], finals[0]["duration_us"]);
    let counts = &run.summary()["alerts"];
    assert_eq!(counts["final"], 1);
    assert_eq!(counts["exec_failed"], 0);
}

#[test]
fn a_long_stall_alerts_while_it_is_still_going_on() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--alert", "100ms"]);
    let port = redis.port.to_string();
    let sleeping = thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "2"])
            .output()
            .unwrap();
        Instant::now()
    });
    let started = Instant::now();
    let mut seen_at = None;
    while started.elapsed() < Duration::from_secs(3) && seen_at.is_none() {
        if !alerts(&profiler.records(), "in_progress").is_empty() {
            seen_at = Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(5));
    }
    let sleep_ended = sleeping.join().unwrap();
    let seen_at = seen_at.expect("an in-progress alert");
    assert!(
        seen_at + Duration::from_millis(1500) < sleep_ended,
        "the alert came {:?} before the sleep ended",
        sleep_ended - seen_at
    );
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    let in_progress = alerts(&run.records, "in_progress");
    assert_eq!(in_progress.len(), 1, "{in_progress:?}");
    let elapsed_us = in_progress[0]["elapsed_us"].as_u64().unwrap();
    assert!(
        (100_000..=150_000).contains(&elapsed_us),
        "given within 50 ms of crossing 100 ms: {elapsed_us} us"
    );
    // The thread is blocked: the stacks it blocked with already say where.
    assert_eq!(in_progress[0]["origin"], "command:debug");
    assert_eq!(in_progress[0]["mechanism"], "syscall.sleep");
    assert_eq!(alerts(&run.records, "final").len(), 1);
}

/// Parses Prometheus/OpenMetrics text exposition into `name{labels}` -> value; panics on a
/// line that is neither a comment nor a sample.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                ["HELP ", "TYPE ", "UNIT ", "EOF"]
                    .iter()
                    .any(|kind| comment.starts_with(kind)),
                "{line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
            for label in series[name_end + 1..series.len() - 1]
                .split("\",")
                .filter(|l| !l.is_empty())
            {
                let (key, quoted) = label
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line}"));
                assert!(!key.is_empty() && quoted.starts_with('"'), "{line}");
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[test]
fn metrics_parse_and_agree_with_the_json_events() {
    let redis = RedisServer::start(&[]);
    let metrics_port = free_port();
    let address = format!("127.0.0.1:{metrics_port}");
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--metrics", &address]);
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    redis.cli(&["DEBUG", "SLEEP", "0.03"]);
    thread::sleep(Duration::from_millis(1500)); // the iteration histogram is refreshed every second
    let samples = parse_exposition(&scrape_metrics(metrics_port));
    let run = profiler.stop();

    let target = format!(
        "pid=\"{}\",port=\"{}\",server=\"redis-server\"",
        redis.pid(),
        redis.port
    );
    let stalls_total: f64 = samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("redis_stallprof_stalls_total{") && series.contains(&target)
        })
        .map(|(_, value)| value)
        .sum();
    assert_eq!(
        stalls_total as usize,
        run.of_type("stall").len(),
        "{samples:?}"
    );
    let debug_sleeps = format!(
        "redis_stallprof_stalls_total{{{target},origin=\"command:debug\",mechanism=\"syscall.sleep\"}}"
    );
    assert_eq!(samples.get(&debug_sleeps), Some(&2.0), "{samples:?}");
    assert_eq!(
        samples.get(&format!("redis_stallprof_stall_seconds_count{{{target}}}")),
        Some(&2.0)
    );
    let iterations =
        samples[&format!("redis_stallprof_eventloop_iteration_seconds_count{{{target}}}")];
    assert!(iterations >= 3.0, "{iterations}");
    // Nothing lost on its way (the kernel's rare unmatched switch-out leaves an iteration
    // untimed, counted too: the metric says what the summary says, up to the scrape).
    let lost = &run.summary()["lost"];
    let lost_total = stallprof_testkit::number(&run.summary()["lost_events"]);
    assert_eq!(
        lost_total - stallprof_testkit::number(&lost["iterations_not_timed"]),
        0,
        "{lost}"
    );
    let lost_metric = samples[&format!("redis_stallprof_lost_events_total{{{target}}}")];
    assert!(lost_metric as u64 <= lost_total, "{lost_metric} > {lost}");
    for family in [
        "redis_stallprof_eventloop_iteration_seconds_bucket",
        "redis_stallprof_madvise_seconds_count",
    ] {
        assert!(
            samples.keys().any(|series| series.starts_with(family)),
            "{family} missing"
        );
    }
}

#[test]
fn a_busy_metrics_address_a_failing_or_hanging_alert_command_do_not_stop_profiling() {
    let redis = RedisServer::start(&[]);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_address = busy.local_addr().unwrap().to_string();
    let pid = redis.pid().to_string();
    let failing = Profiler::attach(&[
        "--pid",
        &pid,
        "--metrics",
        &busy_address,
        "--alert",
        "20ms",
        "--alert-exec",
        "false",
    ]);
    let hanging = Profiler::attach(&[
        "--pid",
        &pid,
        "--alert",
        "20ms",
        "--alert-exec",
        "sleep 30",
        "--alert-timeout",
        "300ms",
    ]);
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(800));
    let (failing, hanging) = (failing.stop(), hanging.stop());

    assert!(failing.status.success());
    assert!(
        failing
            .stderr
            .contains(&format!("cannot serve metrics on {busy_address}")),
        "{}",
        failing.stderr
    );
    assert_eq!(
        failing.of_type("stall").len(),
        1,
        "still profiling: {}",
        failing.stderr
    );
    assert!(failing.summary()["alerts"]["exec_failed"].as_u64().unwrap() >= 1);

    assert!(hanging.status.success());
    assert!(
        hanging.stderr.contains("still ran after 300ms; killed it"),
        "{}",
        hanging.stderr
    );
    assert_eq!(hanging.of_type("stall").len(), 1);
    assert!(!failing.stderr.contains("panicked") && !hanging.stderr.contains("panicked"));
}

#[test]
fn an_alert_command_that_does_not_exist_is_refused_before_attaching() {
    let redis = RedisServer::start(&[]);
    let output = stallprof_testkit::run_profiler(&[
        "attach",
        "--pid",
        &redis.pid().to_string(),
        "--alert",
        "20ms",
        "--alert-exec",
        "/nonexistent/notify --now",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "redis-stallprof: error: --alert-exec: program `/nonexistent/notify` not found"
    );
}
