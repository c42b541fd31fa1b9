//! Stall stacks against Debian's redis-server (no frame pointers): DWARF unwinding through to
//! `main`, off-CPU and on-CPU time, flamegraph files, and the `report` command.
use std::{fs, process::Command, thread, time::Duration};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, number, run_profiler};

fn frames(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|frame| frame.as_str().unwrap())
        .collect()
}

/// True when `expected` appear in `frames` in this order (leaf to root), not necessarily
/// next to each other.
fn in_order(frames: &[&str], expected: &[&str]) -> bool {
    let mut remaining = expected.iter().peekable();
    for frame in frames {
        if remaining
            .peek()
            .is_some_and(|wanted| frame.contains(*wanted))
        {
            remaining.next();
        }
    }
    remaining.peek().is_none()
}

fn the_stall(records: &[&Value]) -> Value {
    assert_eq!(records.len(), 1, "one stall expected: {records:?}");
    records[0].clone()
}

#[test]
fn a_sleep_is_off_cpu_with_its_whole_stack_down_to_main() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["DEBUG", "SLEEP", "0.3"]);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let stall = the_stall(&run.of_type("stall"));
    let duration_us = number(&stall["duration_us"]);
    let off_cpu_us = number(&stall["off_cpu_us"]);
    assert!(
        off_cpu_us * 10 >= duration_us * 9,
        "off-CPU {off_cpu_us} us of {duration_us} us"
    );

    let heaviest = &stall["stacks"][0];
    assert_eq!(heaviest["kind"], "off_cpu", "{stall}");
    let frames = frames(heaviest);
    let expected = [
        "nanosleep_[k]",
        "debugCommand",
        "call",
        "processCommand",
        "aeMain",
        "main",
    ];
    assert!(
        in_order(&frames, &expected),
        "{expected:?} expected in order in {frames:?}"
    );
    // Debian's build exports no name for static functions such as connSocketEventHandler:
    // the unwinder walks through them and they show as module+offset.
    let between = frames
        .iter()
        .skip_while(|f| **f != "processCommand")
        .take_while(|f| **f != "aeMain");
    assert!(
        between.clone().any(|f| f.starts_with("redis-server+0x")),
        "{frames:?}"
    );
}

#[test]
fn a_cpu_bound_command_is_sampled_on_cpu_and_unwinds_to_main() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "3000000"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["KEYS", "no-such-key-*"]);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let stall = the_stall(&run.of_type("stall"));
    let duration_us = number(&stall["duration_us"]);
    let on_cpu_us = number(&stall["on_cpu_us"]);
    // On a loaded machine part of it waits for a CPU: CPU-bound all the same.
    let runqueue_us = number(&stall["runqueue_us"]);
    assert!(
        duration_us >= 200_000,
        "KEYS over 3 million keys takes a while: {duration_us} us"
    );
    assert!(
        (on_cpu_us + runqueue_us) * 10 >= duration_us * 8,
        "on-CPU samples cover {on_cpu_us} us and the run queue {runqueue_us} us of \
         {duration_us} us"
    );

    let stacks: Vec<&Value> = stall["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "on_cpu")
        .collect();
    let samples: u64 = stacks.iter().map(|s| number(&s["samples"])).sum();
    let unwound: u64 = stacks
        .iter()
        .filter(|s| frames(s).contains(&"main"))
        .map(|s| number(&s["samples"]))
        .sum();
    assert!(
        unwound * 100 >= samples * 95,
        "{unwound} of {samples} samples unwound to main"
    );
    assert!(stacks.iter().any(|s| in_order(
        &frames(s),
        &["keysCommand", "call", "processCommand", "aeMain", "main"]
    )));
    let mut depths: Vec<(usize, u64)> = stacks
        .iter()
        .map(|s| (frames(s).len(), number(&s["samples"])))
        .collect();
    depths.sort();
    let mut seen = 0;
    let median_depth = depths.iter().find(|(_, count)| {
        seen += count;
        seen * 2 >= samples
    });
    assert!(
        median_depth.is_some_and(|(depth, _)| *depth >= 8),
        "median depth {median_depth:?} of {depths:?}"
    );
}

#[test]
fn flamegraph_and_folded_files_hold_the_frames_and_report_reproduces_them() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "1000000"]);
    let dir = tempfile::tempdir().unwrap();
    let (folded, svg) = (
        dir.path().join("stalls.folded"),
        dir.path().join("stalls.svg"),
    );
    let json = dir.path().join("stalls.jsonl");
    let profiler = Profiler::attach_writing(
        &[
            "--pid",
            &redis.pid().to_string(),
            "--folded",
            folded.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
        &json,
    );
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    redis.cli(&["KEYS", "no-such-key-*"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    let folded_text = fs::read_to_string(&folded).unwrap();
    for line in folded_text.lines() {
        let (stack, weight) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a folded line: {line:?}"));
        assert!(
            weight.parse::<u64>().is_ok() && stack.contains(';'),
            "not a folded line: {line:?}"
        );
    }
    assert!(
        folded_text
            .lines()
            .any(|l| l.starts_with("[off-cpu];") && l.contains(";debugCommand;")),
        "{folded_text}"
    );
    assert!(
        folded_text
            .lines()
            .any(|l| l.starts_with("[on-cpu];") && l.contains(";keysCommand")),
        "{folded_text}"
    );

    let svg_text = fs::read_to_string(&svg).unwrap();
    assert!(
        svg_text.starts_with("<?xml") && svg_text.trim_end().ends_with("</svg>"),
        "not an SVG document"
    );
    for frame in [
        "debugCommand",
        "keysCommand",
        "[off-cpu]",
        "[on-cpu]",
        "do_nanosleep",
    ] {
        assert!(
            svg_text.contains(&format!("<title>{frame} (")),
            "{frame} missing from the flamegraph"
        );
    }

    let (refolded, resvg) = (
        dir.path().join("again.folded"),
        dir.path().join("again.svg"),
    );
    let output = run_profiler(&[
        "report",
        json.to_str().unwrap(),
        "--folded",
        refolded.to_str().unwrap(),
        "--flamegraph",
        resvg.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::read_to_string(&refolded).unwrap(),
        folded_text,
        "report must reproduce the folded lines"
    );
    assert!(
        fs::read_to_string(&resvg)
            .unwrap()
            .contains("<title>keysCommand (")
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("STALL"),
        "report prints the stalls"
    );

    // Rooted at each stall's origin and mechanism, the picture shows the attribution.
    let by_cause = run_profiler(&["report", json.to_str().unwrap(), "--stack-root", "cause"]);
    let by_cause = String::from_utf8_lossy(&by_cause.stdout);
    assert!(
        by_cause
            .lines()
            .any(|l| l.starts_with("command:debug;syscall.sleep;[off-cpu];")
                && l.contains(";debugCommand;")),
        "{by_cause}"
    );
    assert!(
        by_cause
            .lines()
            .any(|l| l.starts_with("command:keys;cpu;[on-cpu];") && l.contains(";keysCommand")),
        "{by_cause}"
    );
}

#[test]
fn a_healthy_redis_under_load_sends_no_stack_sample() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    let status = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port.to_string(),
            "-c",
            "50",
            "-n",
            "100000",
            "-t",
            "get,set",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run redis-benchmark");
    assert!(status.success());
    // Let the iteration that handles the benchmark's disconnections end before stopping.
    thread::sleep(Duration::from_millis(300));
    let run = profiler.stop();
    let summary = run.summary();
    assert!(number(&summary["iterations"]) > 1_000, "{summary}");
    // Stacks are taken only in iterations older than the gate (5 ms by default). A healthy loop
    // has none; if this busy machine preempted Redis that long, the samples belong to that
    // iteration and are reported with it.
    let gate_us = 5_000;
    if number(&summary["max_us"]) < gate_us {
        assert_eq!(summary["stack_samples"], 0, "{summary}");
    } else {
        eprintln!(
            "an iteration passed the gate under load ({summary}); checking its samples are accounted"
        );
        let in_stalls: u64 = run
            .of_type("stall")
            .iter()
            .map(|s| number(&s["samples"]))
            .sum();
        assert!(
            number(&summary["stack_samples"]) <= in_stalls + 50,
            "{summary}"
        );
    }
}

#[test]
fn report_on_a_bad_file_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    fs::write(&file, "{\"type\":\"attached\",\"pid\":1}\nnot json\n").unwrap();
    let output = run_profiler(&["report", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2: not a JSON record"), "{stderr}");
    let missing = run_profiler(&["report", "/nonexistent.jsonl"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read `/nonexistent.jsonl`"));
}

/// `go tool pprof ARGS FILE`'s output (Debian's golang-go, installed by `cargo xtask setup`).
fn go_pprof(args: &[&str], file: &std::path::Path) -> String {
    let output = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .output()
        .expect("go (Debian's golang-go) is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// The `Total samples = N ms` of a `go tool pprof -top` output, in milliseconds.
fn pprof_total_ms(top: &str) -> f64 {
    let total = top
        .lines()
        .find_map(|line| line.split_once("Total samples = "))
        .map(|(_, rest)| rest.split_whitespace().next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no total in:\n{top}"));
    match total.strip_suffix("ms") {
        Some(ms) => ms.parse().unwrap(),
        None => total.trim_end_matches('s').parse::<f64>().unwrap() * 1_000.0,
    }
}

#[test]
fn a_pprof_profile_reads_back_with_go_tool_pprof() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "1000000"]);
    let dir = tempfile::tempdir().unwrap();
    let pprof = dir.path().join("stalls.pb.gz");
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--pprof",
        pprof.to_str().unwrap(),
    ]);
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    redis.cli(&["KEYS", "no-such-key-*"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    let stalls = run.of_type("stall");
    let sleep = stalls
        .iter()
        .find(|stall| stall["origin"] == "command:debug")
        .expect("the sleep's stall");
    let keys = stalls
        .iter()
        .find(|stall| stall["origin"] == "command:keys")
        .expect("the KEYS stall");

    // Off-CPU: the sleep, down to debugCommand, as long as the JSON says.
    let off_cpu = go_pprof(
        &[
            "-top",
            "-sample_index=off_cpu",
            "-tagfocus=origin=command:debug",
        ],
        &pprof,
    );
    assert!(off_cpu.contains("debugCommand"), "{off_cpu}");
    let off_cpu_ms = pprof_total_ms(&off_cpu);
    let json_ms = number(&sleep["off_cpu_us"]) as f64 / 1_000.0;
    assert!(
        (off_cpu_ms - json_ms).abs() < 0.1 && (95.0..115.0).contains(&off_cpu_ms),
        "{off_cpu_ms} ms in pprof, {json_ms} ms in the JSON:\n{off_cpu}"
    );
    // On-CPU: KEYS, its sampled time the JSON's.
    let on_cpu = go_pprof(
        &[
            "-top",
            "-sample_index=on_cpu",
            "-tagfocus=origin=command:keys",
        ],
        &pprof,
    );
    assert!(on_cpu.contains("keysCommand"), "{on_cpu}");
    let on_cpu_ms = pprof_total_ms(&on_cpu);
    let json_ms = number(&keys["on_cpu_us"]) as f64 / 1_000.0;
    assert!(
        (on_cpu_ms - json_ms).abs() < 0.1 && on_cpu_ms > 0.0,
        "{on_cpu_ms} ms in pprof, {json_ms} ms in the JSON:\n{on_cpu}"
    );
    // Labels: origin, mechanism, instance.
    let tags = go_pprof(&["-tags"], &pprof);
    let instance = format!("redis-server:{} pid {}", redis.port, redis.pid());
    for expected in [
        "command:debug",
        "command:keys",
        "syscall.sleep",
        "cpu",
        &instance,
    ] {
        assert!(tags.contains(expected), "{expected} missing:\n{tags}");
    }
}
