//! Robustness: lost events are accounted for, outputs survive log rotation (SIGHUP), a closed
//! stdout ends the run with a clear message and the summary on stderr, and capabilities not
//! needed after attaching are dropped.
use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use stallprof_testkit::{Profiler, RedisServer, profiler_bin, record_types};

#[test]
fn a_ring_buffer_too_small_for_stacks_loses_them_and_says_so() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "500000"]);
    // 16 KiB holds stall events (24 bytes) but no stack event (about 21 KiB): every stack
    // sample is lost, deterministically.
    let profiler =
        Profiler::attach(&["--pid", &redis.pid().to_string(), "--ring-buffer-kib", "16"]);
    for _ in 0..3 {
        redis.cli(&["KEYS", "no-such-key-*"]);
        redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    }
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(
        run.stderr.contains("holds no stack event"),
        "{}",
        run.stderr
    );

    let stalls = run.of_type("stall");
    assert_eq!(
        stalls.len(),
        6,
        "every stall is still reported: {}",
        run.stderr
    );
    assert!(
        stalls
            .iter()
            .all(|stall| stall["incomplete"] == true && stall["samples"] == 0),
        "{stalls:?}"
    );
    let summary = run.summary();
    let lost = &summary["lost"];
    let by_kind: u64 = lost
        .as_object()
        .expect("lost is an object of counts")
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert!(
        lost["stack_events"].as_u64().unwrap() > 100,
        "KEYS and sleeps lose their samples: {lost}"
    );
    assert_eq!(
        summary["lost_events"].as_u64().unwrap(),
        by_kind,
        "the total is the sum of its parts"
    );
    assert_eq!(lost["stall_events"], 0);
    assert_eq!(summary["stack_samples"], 0);
    // Every loss has its key: the kernel's stacks it could not read, event-loop threads it
    // could not note, user stacks cut short; and what no server can be charged with.
    for key in [
        "kernel_stacks_unread",
        "loop_tasks_untracked",
        "stacks_cut_short",
    ] {
        assert!(lost[key].is_u64(), "{key} in {lost}");
    }
    let run_lost = &summary["run_lost"];
    assert!(
        run_lost["undecodable"] == 0 && run_lost["of_ended_targets"].is_u64(),
        "{run_lost}"
    );
    assert!(
        run.stderr.contains("[incomplete: samples were lost]")
            && run
                .stderr
                .contains("stack events (on- and off-CPU) the kernel could not send"),
        "{}",
        run.stderr
    );
}

#[test]
fn sighup_reopens_the_json_file_after_rotation() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (json, rotated) = (
        dir.path().join("stalls.jsonl"),
        dir.path().join("stalls.jsonl.1"),
    );
    let profiler = Profiler::attach_writing(&["--pid", &redis.pid().to_string()], &json);
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(100));
    fs::rename(&json, &rotated).unwrap();
    profiler.signal_only(libc::SIGHUP);
    thread::sleep(Duration::from_millis(200));
    redis.cli(&["DEBUG", "SLEEP", "0.06"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);

    // The records of the stalls and the run (at the end come the memory growth and the
    // census of the redis-cli connections too, when there was any).
    let types = |path: &std::path::Path| {
        let mut types = record_types(&fs::read_to_string(path).unwrap());
        types.retain(|kind| !["memory", "connections"].contains(&kind.as_str()));
        types
    };
    assert_eq!(types(&rotated), ["attached", "stall"]);
    assert_eq!(types(&json), ["stall", "summary"]);
}

#[test]
fn a_closed_stdout_ends_the_run_with_a_clear_message_and_the_summary_on_stderr() {
    let redis = RedisServer::start(&[]);
    let mut child = Command::new(profiler_bin())
        .args(["attach", "--pid", &redis.pid().to_string(), "--json", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, like `| head -1` that has had its line
    thread::sleep(Duration::from_millis(1500));
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot write to the JSON output stdout: Broken pipe"),
        "{stderr}"
    );
    assert!(stderr.contains("summary (stopped by an error)"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A capability set of `/proc/PID/status` (`CapEff:`, `CapBnd:`, ...).
fn capability_set(pid: u32, name: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

#[test]
fn after_attaching_only_the_capabilities_still_needed_remain() {
    const CAP_KILL: u64 = 1 << 5;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    let redis = RedisServer::start(&[]);
    let metrics_port = stallprof_testkit::free_port().to_string();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--alert",
        "1s",
        "--alert-exec",
        "true",
        "--metrics",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    // Once the page answers, the metrics thread has given up its capabilities.
    stallprof_testkit::scrape_metrics(metrics_port.parse().unwrap());
    // Capabilities are per thread: every thread holds only what it needs.
    let tasks: Vec<(String, u32)> = fs::read_dir(format!("/proc/{}/task", profiler.pid()))
        .unwrap()
        .flatten()
        .filter_map(|task| {
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let name = fs::read_to_string(task.path().join("comm")).ok()?;
            Some((name.trim().to_owned(), tid))
        })
        .collect();
    for (name, tid) in &tasks {
        let status = |set| {
            let text =
                fs::read_to_string(format!("/proc/{}/task/{tid}/status", profiler.pid())).unwrap();
            let hex = text
                .lines()
                .find_map(|line| line.strip_prefix(set))
                .unwrap()
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).unwrap()
        };
        let (effective, permitted) = (status("CapEff:"), status("CapPrm:"));
        assert_eq!(
            effective & (CAP_BPF | CAP_PERFMON | CAP_KILL | CAP_NET_ADMIN),
            0,
            "thread {name}: {effective:x}"
        );
        if name == "alert-exec" || name == "metrics" {
            assert_eq!((effective, permitted), (0, 0), "thread {name} needs none");
        }
        if name == "alert-exec" {
            assert_eq!(status("CapBnd:"), 0, "its commands can regain nothing");
        }
    }
    let names: Vec<&str> = tasks.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.contains(&"alert-exec") && names.contains(&"metrics"),
        "{names:?}"
    );
    let effective = capability_set(profiler.pid(), "CapEff:");
    let permitted = capability_set(profiler.pid(), "CapPrm:");
    let bounding = capability_set(profiler.pid(), "CapBnd:");
    assert_eq!(effective, permitted);
    assert_eq!(
        effective & (CAP_BPF | CAP_PERFMON),
        0,
        "loading is over: {effective:x}"
    );
    assert_ne!(
        effective & CAP_SYS_ADMIN,
        0,
        "map_files needs it: {effective:x}"
    );
    assert_eq!(
        bounding & (CAP_BPF | CAP_PERFMON | CAP_KILL | CAP_NET_ADMIN),
        0,
        "an --alert-exec command cannot regain them: {bounding:x}"
    );

    // Profiling goes on: a stall with its kernel and user frames named.
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 1, "{}", run.stderr);
    let frames = stalls[0]["stacks"][0]["frames"].to_string();
    for frame in ["do_nanosleep_[k]", "debugCommand", "main"] {
        assert!(
            frames.contains(&format!("\"{frame}\"")),
            "{frame} in {frames}"
        );
    }
}
