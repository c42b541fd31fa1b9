//! Memory growth by origin and the census of client connections, against real servers.
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{
    NetworkNamespace, Profiler, RedisServer, add_small_sets, connect_from, number,
};

/// The stacks of a `memory` growth object with the given origin and mechanism.
fn stacks_of<'a>(growth: &'a Value, origin: &str, mechanism: &str) -> Vec<&'a Value> {
    growth["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|stack| stack["origin"] == origin && stack["mechanism"] == mechanism)
        .collect()
}

fn frames(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn many_sets_of_one_member_grow_memory_named_by_sadd_and_its_encoding() {
    let redis = RedisServer::start(&[]);
    let folded = tempfile::NamedTempFile::new().unwrap();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--interval",
        "1s",
        "--memory-folded",
        folded.path().to_str().unwrap(),
    ]);
    let resident_before = redis.resident_bytes();
    // 300,000 sets of one short member that is not an integer: each is a hash table, four
    // times the memory its member needs.
    add_small_sets(&mut redis.client(), 300_000);
    // The keyspace's table doubled on the way: the cron finishes moving keys into it (touching
    // its pages) after the last SADD. Both sides are read once it is done, at the same moment.
    thread::sleep(Duration::from_millis(500));
    let grown = redis.resident_bytes() - resident_before;
    let run = profiler.stop();

    let memory = &run.summary()["memory"];
    let attributed: u64 = memory["growth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| number(&entry["bytes"]))
        .sum();
    assert!(
        attributed.abs_diff(grown) * 10 <= grown,
        "attributed {attributed} bytes, VmRSS grew {grown}: {memory}"
    );
    let top = &memory["growth"][0];
    assert_eq!(
        (top["origin"].as_str(), top["mechanism"].as_str()),
        (Some("command:sadd"), Some("allocation")),
        "{memory}"
    );
    assert!(top["share"].as_f64().unwrap() > 0.9, "{memory}");
    // The path that made the memory: SADD creating a set as a hash table.
    let sadd_stacks = stacks_of(memory, "command:sadd", "allocation");
    assert!(
        sadd_stacks.iter().any(|stack| {
            let frames = frames(stack);
            frames.contains(&"saddCommand") && frames.contains(&"createSetObject")
        }),
        "no stack through createSetObject: {sadd_stacks:?}"
    );
    // Interval records say the same, and nothing was copied on write (no child).
    let records = run.of_type("memory");
    assert!(!records.is_empty(), "{}", run.stderr);
    assert!(
        records
            .iter()
            .all(|record| number(&record["copied_bytes"]) == 0)
    );
    assert!(
        records
            .iter()
            .any(|record| record["growth"][0]["origin"] == "command:sadd")
    );
    assert!(
        run.stderr.contains("MEMORY resident +")
            && run.stderr.contains("command:sadd (allocation)"),
        "{}",
        run.stderr
    );
    let folded = std::fs::read_to_string(folded.path()).unwrap();
    assert!(
        folded
            .lines()
            .any(|line| line.starts_with("command:sadd;allocation;")
                && line.contains(";saddCommand;")),
        "{folded}"
    );
}

#[test]
fn a_client_that_never_reads_its_replies_grows_memory_named_as_reply_building() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["SET", "big", &"x".repeat(100_000)]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "1s"]);
    let resident_before = redis.resident_bytes();
    // 1,000 GETs of 100 kB, and not one reply read: Redis keeps about 100 MB of replies in
    // the client's output buffer (the socket takes a few MB).
    let mut deaf = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    deaf.write_all(&b"GET big\r\n".repeat(1_000)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.resident_bytes() < resident_before + (80 << 20) {
        assert!(Instant::now() < deadline, "the output buffer did not grow");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    let run = profiler.stop();
    drop(deaf);

    let memory = &run.summary()["memory"];
    let top = &memory["growth"][0];
    assert_eq!(
        (top["origin"].as_str(), top["mechanism"].as_str()),
        (Some("command:get"), Some("allocation.reply_buffer")),
        "{memory}"
    );
    assert!(number(&top["bytes"]) > 60 << 20, "{memory}");
}

/// The census records' figures for one client address: (established, opened, closed,
/// received bytes, idle p50 ms) per record.
fn census_of(run: &stallprof_testkit::Run, addr: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    run.of_type("connections")
        .iter()
        .filter_map(|census| {
            census["clients"]
                .as_array()?
                .iter()
                .find(|client| client["addr"] == addr)
        })
        .map(|client| {
            (
                number(&client["established"]),
                number(&client["opened"]),
                number(&client["closed"]),
                number(&client["received_bytes"]),
                number(&client["idle_ms"]["p50"]),
            )
        })
        .collect()
}

#[test]
fn a_pool_of_two_hundred_idle_connections_and_a_reconnecting_client_are_told_apart() {
    let namespace = NetworkNamespace::create("census");
    // Protected mode serves 127.0.0.1 alone among the loopback addresses.
    let redis = RedisServer::start_in(&namespace, &["--protected-mode", "no"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--interval", "1s"]);
    // A pool of 200 connections from 127.0.0.2 used in turn, 100 commands a second: each
    // connection is idle about two seconds out of two.
    let mut pool = connect_from([127, 0, 0, 2], redis.port, 200, Some(&namespace));
    const RECONNECTS: u64 = 30;
    let port = redis.port;
    let reconnecting = thread::scope(|scope| {
        let churn = scope.spawn(|| {
            for _ in 0..RECONNECTS {
                let mut client = connect_from([127, 0, 0, 3], port, 1, Some(&namespace)).remove(0);
                client.write_all(b"PING\r\n").unwrap();
                let mut reply = [0; 7];
                client.read_exact(&mut reply).unwrap();
                thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let mut turn = 0;
        while started.elapsed() < Duration::from_secs(5) {
            let connection = &mut pool[turn % 200];
            connection.write_all(b"PING\r\n").unwrap();
            let mut reply = [0; 7];
            connection.read_exact(&mut reply).unwrap();
            turn += 1;
            thread::sleep(Duration::from_millis(10));
        }
        churn.join()
    });
    reconnecting.expect("the reconnecting client");
    thread::sleep(Duration::from_millis(1_500));
    let run = profiler.stop();
    drop(pool);

    let pool_census = census_of(&run, "127.0.0.2");
    // While the pool is used, each connection sends a command about every two seconds.
    let in_use: Vec<_> = pool_census
        .iter()
        .filter(|(established, _, _, received, _)| *established == 200 && *received > 0)
        .collect();
    assert!(
        in_use.len() >= 3,
        "the pool's 200 in several censuses: {pool_census:?}\n{}",
        run.stderr
    );
    for &&(_, _, _, _, idle_p50_ms) in &in_use {
        assert!((300..=3_000).contains(&idle_p50_ms), "{pool_census:?}");
    }
    let opened_by_pool: u64 = pool_census.iter().map(|(_, opened, ..)| opened).sum();
    assert_eq!(opened_by_pool, 200, "{pool_census:?}");
    // Every connection of the reconnecting client, opened and closed, as the kernel saw them.
    let churn_census = census_of(&run, "127.0.0.3");
    let opened: u64 = churn_census.iter().map(|(_, opened, ..)| opened).sum();
    let closed: u64 = churn_census.iter().map(|(_, _, closed, ..)| closed).sum();
    assert_eq!(
        (opened, closed),
        (RECONNECTS, RECONNECTS),
        "{churn_census:?}"
    );
    // One open at a time, and a few closed ones Redis had not closed yet at a census: never
    // anything like the pool.
    assert!(
        churn_census
            .iter()
            .all(|(established, ..)| *established < 10),
        "{churn_census:?}"
    );

    let totals = &run.summary()["connections"];
    assert!(number(&totals["max_established"]) >= 200, "{totals}");
    let by_addr: HashMap<&str, &Value> = totals["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|client| (client["addr"].as_str().unwrap(), client))
        .collect();
    assert_eq!(by_addr["127.0.0.3"]["opened"], RECONNECTS);
    assert_eq!(by_addr["127.0.0.3"]["closed"], RECONNECTS);
    assert_eq!(by_addr["127.0.0.2"]["established"], 200);
    assert!(run.stderr.contains("CONNECTIONS 20"), "{}", run.stderr);
}
