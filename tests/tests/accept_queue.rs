//! Accept-queue overflows against a real redis-server in a network namespace of the test's own,
//! so that no other traffic moves the namespace's counters.
use std::{thread, time::Duration};

use stallprof_testkit::{NetworkNamespace, Profiler, RedisServer, connection_storm, number};

#[test]
fn a_stall_overflows_a_small_backlog_and_every_drop_is_accounted_for() {
    let namespace = NetworkNamespace::create("overflow");
    let redis = RedisServer::start_in(&namespace, &["--tcp-backlog", "16"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    let before = namespace.listen_overflows();

    let mut sleep = redis.command("redis-cli");
    sleep.args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "1"]);
    let sleeping = thread::spawn(move || sleep.output().unwrap());
    thread::sleep(Duration::from_millis(100));
    let storm_started = std::time::Instant::now();
    let connections = connection_storm(redis.port, 300, Some(&namespace));
    sleeping.join().unwrap();
    let sleep_remaining_at_storm = storm_started.elapsed();
    thread::sleep(Duration::from_millis(1500)); // drops after the stall are reported within 1 s
    let run = profiler.stop();
    let namespace_overflows = namespace.listen_overflows() - before;
    // Closing connections the full queue never took in makes it drop more: only now.
    drop(connections);

    let stalls = run.of_type("stall");
    let sleep_stall = stalls
        .iter()
        .find(|stall| number(&stall["duration_us"]) > 900_000)
        .expect("the sleep's stall");
    let accept = &sleep_stall["accept"];
    assert!(
        number(&accept["overflows"]) > 0,
        "the stall overflowed the queue: {accept}"
    );
    assert_eq!(accept["limit"], 16);
    let in_stalls: u64 = stalls
        .iter()
        .map(|stall| stall["accept"]["overflows"].as_u64().unwrap_or(0))
        .sum();
    let outside: u64 = run
        .of_type("accept_overflow")
        .iter()
        .map(|event| number(&event["overflows"]))
        .sum();
    let reported = in_stalls + outside;
    assert!(namespace_overflows > 0);
    assert!(
        reported.abs_diff(namespace_overflows) * 20 <= namespace_overflows,
        "reported {reported} (stalls {in_stalls} + outside {outside}), namespace counted {namespace_overflows}"
    );
    let summary = &run.summary()["accept"];
    assert_eq!(
        number(&summary["namespace_listen_overflows"]),
        namespace_overflows
    );

    // The connections that got into the queue during the sleep, and who made them.
    assert!(
        number(&accept["new_connections"]) >= 16,
        "the queue filled: {accept}"
    );
    assert_eq!(accept["top_clients"][0]["addr"], "127.0.0.1");
    assert_eq!(
        accept["top_clients"][0]["connections"],
        accept["new_connections"]
    );
    // Those waited in the queue until the sleep ended: the longest wait is the sleep's remainder.
    let waits = &summary["waits"];
    let longest_wait = Duration::from_micros(number(&waits["max_us"]));
    assert!(
        longest_wait.abs_diff(sleep_remaining_at_storm) < Duration::from_millis(150),
        "longest wait {longest_wait:?}, the sleep had {sleep_remaining_at_storm:?} left: {waits}"
    );
    assert!(number(&waits["accepted"]) >= 16);
    assert!(
        run.stderr.contains("accept queue overflowed"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_same_connections_without_a_stall_overflow_nothing() {
    let namespace = NetworkNamespace::create("quiet");
    let redis = RedisServer::start_in(&namespace, &[]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string()]);
    let before = namespace.listen_overflows();
    let connections = connection_storm(redis.port, 300, Some(&namespace));
    thread::sleep(Duration::from_millis(500));
    drop(connections);
    let run = profiler.stop();
    assert_eq!(namespace.listen_overflows(), before);
    assert!(run.of_type("accept_overflow").is_empty());
    let ports = run.summary()["accept"]["ports"].as_array().unwrap().clone();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["port"], redis.port);
    assert_eq!(ports[0]["overflows"], 0);
}
