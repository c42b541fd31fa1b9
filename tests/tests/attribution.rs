//! Attribution against the real Debian redis-server: each stall says what Redis was doing
//! (origin) and where the time went (mechanism), and madvise calls are counted.
use std::{fs, thread, time::Duration};

use serde_json::Value;
use stallprof_testkit::{
    Profiler, RedisServer, leave_big_idle_query_buffers, number, run_profiler,
};

fn only_stall(run: &stallprof_testkit::Run) -> Value {
    run.only_stall().clone()
}

fn diagnosis(stall: &Value) -> (&str, &str) {
    (
        stall["origin"].as_str().unwrap(),
        stall["mechanism"].as_str().unwrap(),
    )
}

/// The diagnosis of the time the loop ran or blocked, the time it waited for a CPU set aside:
/// this file's tests run beside one another and keep both CPUs busy, so that waiting
/// (`runqueue`) may be the larger share of a stall; the stall's own mechanism is then that.
fn running_diagnosis(stall: &Value) -> (&str, &str) {
    let running = stall["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["mechanism"] != "runqueue")
        .max_by_key(|entry| number(&entry["us"]))
        .unwrap_or_else(|| panic!("no time sampled on or off the CPU: {stall}"));
    let mechanism = stall["mechanism"].as_str().unwrap();
    assert!(
        [running["mechanism"].as_str().unwrap(), "runqueue"].contains(&mechanism),
        "{stall}"
    );
    (
        running["origin"].as_str().unwrap(),
        running["mechanism"].as_str().unwrap(),
    )
}

#[test]
fn a_sleep_is_command_debug_in_syscall_sleep() {
    let redis = RedisServer::start(&[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["DEBUG", "SLEEP", "0.2"]);
    thread::sleep(Duration::from_millis(100));
    let stall = only_stall(&profiler.stop());
    assert_eq!(
        diagnosis(&stall),
        ("command:debug", "syscall.sleep"),
        "{stall}"
    );
    let breakdown = stall["breakdown"].as_array().unwrap();
    let shares: f64 = breakdown
        .iter()
        .map(|entry| entry["share"].as_f64().unwrap())
        .sum();
    assert!(
        (shares - 1.0).abs() < 0.01,
        "shares add up to 1: {breakdown:?}"
    );
    assert_eq!(breakdown[0]["origin"], "command:debug");
}

#[test]
fn a_cpu_bound_command_is_its_command_on_the_cpu() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "2000000"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["KEYS", "no-such-key-*"]);
    thread::sleep(Duration::from_millis(100));
    let stall = only_stall(&profiler.stop());
    assert_eq!(
        running_diagnosis(&stall),
        ("command:keys", "cpu"),
        "{stall}"
    );
    let us = |field: &str| number(&stall[field]);
    assert!(
        (us("on_cpu_us") + us("runqueue_us")) * 10 >= us("duration_us") * 8,
        "running or waiting for a CPU, never blocked: {stall}"
    );
}

#[test]
fn memory_purge_after_deleting_a_data_set_is_an_allocator_purge_of_what_was_given_back() {
    let redis = RedisServer::start(&["--jemalloc-bg-thread", "no"]);
    redis.cli(&["DEBUG", "POPULATE", "1000000", "key", "200"]);
    // Freed on the lazy-free thread: the pages stay with the allocator (dirty) until purged.
    redis.cli(&["FLUSHALL", "ASYNC"]);
    while redis.info_number("memory", "lazyfree_pending_objects") > 0 {
        thread::sleep(Duration::from_millis(50));
    }
    // INFO's allocator figures are refreshed by serverCron.
    thread::sleep(Duration::from_millis(300));
    let resident_before = redis.info_number("memory", "allocator_resident");
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    redis.cli(&["MEMORY", "PURGE"]);
    thread::sleep(Duration::from_millis(300));
    let resident_after = redis.info_number("memory", "allocator_resident");
    let run = profiler.stop();
    let stall = only_stall(&run);
    assert_eq!(
        running_diagnosis(&stall),
        ("command:memory", "allocator.purge"),
        "{stall}"
    );

    let madvise_bytes = number(&stall["madvise"]["bytes"]);
    let given_back = resident_before.saturating_sub(resident_after);
    assert!(
        madvise_bytes >= 100 << 20,
        "at least 100 MiB purged on the main thread: {}",
        stall["madvise"]
    );
    assert!(
        madvise_bytes * 4 >= given_back * 3 && madvise_bytes * 3 <= given_back * 4,
        "madvise'd {} MiB, the allocator gave back {} MiB",
        madvise_bytes >> 20,
        given_back >> 20
    );
    let main_dontneed = run.summary()["madvise"]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line["thread_role"] == "main" && line["advice"] == "MADV_DONTNEED")
        .cloned()
        .expect("a main-thread MADV_DONTNEED line in the summary");
    assert!(
        number(&main_dontneed["bytes"]) >= madvise_bytes,
        "{main_dontneed}"
    );
    assert!(number(&main_dontneed["calls"]) >= number(&stall["madvise"]["calls"]));
}

#[test]
fn idle_clients_with_big_query_buffers_stall_cron_in_an_allocator_purge() {
    // The incident: clientsCron shrinks the query buffers of clients idle for more than 2 s,
    // and jemalloc gives the large buffers back with madvise on the event loop.
    // These resizes measure 10 to 14 ms here: a threshold well below them, so that every one
    // is a stall whatever the machine's speed.
    let redis = RedisServer::start(&["--jemalloc-bg-thread", "no"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--threshold", "3ms"]);
    let clients = leave_big_idle_query_buffers(redis.port, 20, 32 << 20);
    thread::sleep(Duration::from_secs(5));
    let run = profiler.stop();

    let resizes: Vec<&Value> = run
        .of_type("stall")
        .into_iter()
        .filter(|stall| stall["origin"] == "cron.querybuf_resize")
        .collect();
    assert!(
        !resizes.is_empty(),
        "a cron query-buffer resize stall expected:\n{}",
        run.stderr
    );
    for stall in &resizes {
        // The purge is where the resize's time went.
        assert_eq!(
            running_diagnosis(stall),
            ("cron.querybuf_resize", "allocator.purge"),
            "{stall}"
        );
        assert!(number(&stall["duration_us"]) >= 3_000);
        assert!(
            number(&stall["madvise"]["bytes"]) >= 16 << 20,
            "a resize gives back at least one big buffer: {}",
            stall["madvise"]
        );
        let frames = stall["stacks"][0]["frames"].to_string();
        assert!(
            frames.contains("clientsCronResizeQueryBuffer") && frames.contains("serverCron"),
            "{frames}"
        );
    }
    drop(clients);
}

/// The one-line error of `attach --rules RULES`, which must exit with 1.
fn refused(redis: &RedisServer, rules: &std::path::Path) -> String {
    let output = run_profiler(&[
        "attach",
        "--pid",
        &redis.pid().to_string(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn custom_rules_replace_the_builtin_ones_and_a_bad_file_names_its_line() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    fs::write(
        &rules,
        "[[origin]]\ncategory = \"debugging\"\nfunctions = [\"debugCommand\"]\n\n\
         [[mechanism]]\ncategory = \"napping\"\nkernel_functions = [\"do_nanosleep\"]\n",
    )
    .unwrap();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        diagnosis(&only_stall(&profiler.stop())),
        ("debugging", "napping")
    );

    fs::write(
        &rules,
        "[[origin]]\ncategory = \"x\"\nfunctions = [\"a\"]\n\n[[mechanism]]\ncategory = \"y\"\n",
    )
    .unwrap();
    let stderr = refused(&redis, &rules);
    assert!(
        stderr.contains(&format!(
            "`{}` line 6: mechanism rule `y` has no functions",
            rules.display()
        )),
        "{stderr}"
    );

    // An empty file (a typo'd path to the wrong file, a truncated copy) is no rules at all.
    fs::write(&rules, "# nothing here\n").unwrap();
    let stderr = refused(&redis, &rules);
    assert_eq!(
        stderr.trim(),
        format!(
            "redis-stallprof: error: `{}` has no rules (no [[origin]] or [[mechanism]] table): every stall would read `unknown`",
            rules.display()
        )
    );
}
