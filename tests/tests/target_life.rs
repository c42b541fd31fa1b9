//! The target's life: Redis restarting on its port (`--follow`), a BGSAVE child, and Redis in a
//! container (its own pid and network namespaces), selected by its host pid.
use std::{
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{
    NetworkNamespace, Profiler, RedisServer, free_port, number, scrape_metrics,
};

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

#[test]
fn redis_executing_itself_again_is_still_profiled_and_named() {
    let redis = RedisServer::start(&[]);
    // -vv: the kernel programs' own messages (aya-log) reach the log too.
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "-vv"]);
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    // DEBUG RESTART: Redis closes its descriptors and executes itself again, same pid.
    let mut client = redis.client();
    let _: redis::RedisResult<()> = redis::cmd("DEBUG").arg("RESTART").query(&mut client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis
        .try_cli(&["PING"])
        .is_none_or(|reply| reply.trim() != "PONG")
    {
        assert!(Instant::now() < deadline, "Redis did not come back");
        thread::sleep(Duration::from_millis(50));
    }
    redis.cli(&["DEBUG", "SLEEP", "0.15"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();

    assert!(
        run.stderr.contains("executed a new program"),
        "{}",
        run.stderr
    );
    let kernel_message = format!(
        "redis-stallprof: debug: thread {0} of target {0} executed a new program",
        redis.pid()
    );
    assert!(run.stderr.contains(&kernel_message), "{}", run.stderr);
    let attached = run.of_type("attached");
    assert_eq!(attached.len(), 2, "{}", run.stderr);
    assert!(
        attached
            .iter()
            .all(|record| number(&record["pid"]) == u64::from(redis.pid()))
    );
    let sleeps: Vec<&Value> = run
        .of_type("stall")
        .into_iter()
        .filter(|stall| stall["mechanism"] == "syscall.sleep")
        .collect();
    assert_eq!(sleeps.len(), 2, "{}", run.stderr);
    assert_debug_sleep(sleeps[0], redis.pid(), 100);
    assert_debug_sleep(sleeps[1], redis.pid(), 150);
    assert_eq!(run.summary()["stopped"], "signal");
}

#[test]
fn a_thread_started_after_attaching_is_covered() {
    let redis = RedisServer::start(&["--jemalloc-bg-thread", "no"]);
    let metrics = free_port();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
    ]);
    let threads_before = fs_threads(redis.pid());
    // jemalloc starts its background purging thread now; freeing a data set on the lazy-free
    // thread leaves dirty pages for it to purge as they decay (over about 10 s).
    redis.cli(&["CONFIG", "SET", "jemalloc-bg-thread", "yes"]);
    assert!(
        fs_threads(redis.pid()) > threads_before,
        "jemalloc started its thread"
    );
    redis.cli(&["DEBUG", "POPULATE", "500000", "key", "200"]);
    redis.cli(&["FLUSHALL", "ASYNC"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scrape_metrics(metrics).contains(r#"thread_role="jemalloc_bg_thd""#) {
        assert!(Instant::now() < deadline, "no purge by the new thread seen");
        thread::sleep(Duration::from_millis(250));
    }
    let run = profiler.stop();
    let madvise = run.summary()["madvise"].as_array().unwrap().clone();
    assert!(
        madvise
            .iter()
            .any(|entry| entry["thread_role"] == "jemalloc_bg_thd"
                && number(&entry["calls"]) > 0
                && number(&entry["bytes"]) > 0),
        "the new thread's purges are counted: {madvise:?}"
    );
}

/// Threads of process `pid` now.
fn fs_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |tasks| tasks.count())
}

#[test]
fn a_module_loaded_after_attaching_has_its_frames_named() {
    let directory = tempfile::tempdir().unwrap();
    let module = directory.path().join("stall_module.so");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stall_module.c");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-g", "-o"])
        .arg(&module)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(built.success(), "cc {}", source.display());
    let redis = RedisServer::start(&["--enable-module-command", "yes"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    assert_eq!(
        redis
            .cli(&["MODULE", "LOAD", module.to_str().unwrap()])
            .trim(),
        "OK"
    );
    redis.cli(&["STALLPROFTEST.SLEEP"]);
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();

    let stalls = run.of_type("stall");
    assert_eq!(stalls.len(), 1, "{}", run.stderr);
    let stall = stalls[0];
    let duration_ms = number(&stall["duration_us"]) / 1_000;
    assert!((150..170).contains(&duration_ms), "{stall}");
    assert_eq!(stall["mechanism"], "syscall.sleep", "{stall}");
    assert_eq!(
        stall["origin"], "command:module:stallproftestsleepcommand",
        "{stall}"
    );
    for frame in [
        "stallprofTestSleep",
        "StallproftestSleepCommand",
        "call",
        "main",
    ] {
        assert!(has_frame(stall, frame), "{frame} in {stall}");
    }
}
