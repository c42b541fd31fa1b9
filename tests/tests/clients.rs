//! Who sent a stall's command and who felt the stall, against a real redis-server with clients
//! bound to distinct 127.0.0.x addresses: the sender as Redis's own SLOWLOG names it, one
//! sender per stall in turn, the clients a sleep held up, and no sender for a cron stall.
use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, connect_from, number, run_profiler};

/// A RESP request of `args`.
fn request(args: &[&str]) -> Vec<u8> {
    let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        bytes.extend(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    bytes
}

/// Sends `args` on `stream` and reads until the reply's first line has come.
fn call(stream: &mut TcpStream, args: &[&str]) {
    stream.write_all(&request(args)).unwrap();
    let mut reply = [0u8; 4096];
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let read = stream.read(&mut reply).unwrap();
    assert!(read > 0, "{args:?}: no reply");
}

/// One client connection from `source`.
fn client_from(source: [u8; 4], redis: &RedisServer) -> TcpStream {
    connect_from(source, redis.port, 1, None).remove(0)
}

/// `ip:port` of `stream`'s own end, as the server sees its client.
fn address(stream: &TcpStream) -> String {
    stream.local_addr().unwrap().to_string()
}

fn senders(stall: &Value) -> Vec<&str> {
    stall["client"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["addr"].as_str().unwrap())
        .collect()
}

/// The client address of the newest entry of Redis's SLOWLOG.
fn slowlog_client(redis: &RedisServer) -> String {
    let mut client = redis.client();
    let entries: Vec<Vec<redis::Value>> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1)
        .query(&mut client)
        .unwrap();
    match &entries[0][4] {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).unwrap(),
        other => panic!("SLOWLOG client field: {other:?}"),
    }
}

#[test]
fn a_keys_stall_names_its_sender_as_slowlog_does_and_not_the_client_sending_gets() {
    let redis = RedisServer::start(&[
        "--protected-mode",
        "no",
        "--slowlog-log-slower-than",
        "10000",
    ]);
    redis.cli(&["DEBUG", "POPULATE", "1000000"]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--clients", "exact"]);
    let getter = client_from([127, 0, 0, 3], &redis);
    let getter_address = address(&getter);
    let stop = Arc::new(AtomicBool::new(false));
    let gets = thread::spawn({
        let stop = Arc::clone(&stop);
        let mut getter = getter;
        move || {
            while !stop.load(Ordering::Relaxed) {
                call(&mut getter, &["GET", "key:1"]);
            }
        }
    });
    thread::sleep(Duration::from_millis(200));
    let mut keys = client_from([127, 0, 0, 2], &redis);
    let keys_address = address(&keys);
    call(&mut keys, &["KEYS", "no-such-key-*"]);
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    gets.join().unwrap();
    let run = profiler.stop();
    let stalls = run.of_type("stall");
    let stall = stalls
        .iter()
        .find(|stall| stall["origin"] == "command:keys")
        .unwrap_or_else(|| panic!("a KEYS stall: {stalls:?}"));
    assert_eq!(stall["client"]["source"], "exact", "{stall}");
    assert_eq!(senders(stall), [keys_address.as_str()], "{stall}");
    assert_eq!(slowlog_client(&redis), keys_address);
    assert_eq!(stall["client"]["command"], "keys");
    assert!(!senders(stall).contains(&getter_address.as_str()));
    let console_line = format!("from {keys_address} (keys)");
    assert!(run.stderr.contains(&console_line), "{}", run.stderr);
    // `report` tells it from the recording as the live run did.
    let recording = std::env::temp_dir().join(format!("stallprof-clients-{}.jsonl", redis.port));
    let lines: Vec<String> = run.records.iter().map(Value::to_string).collect();
    std::fs::write(&recording, lines.join("\n") + "\n").unwrap();
    let report = run_profiler(&["report", recording.to_str().unwrap()]);
    std::fs::remove_file(&recording).unwrap();
    let reported = String::from_utf8_lossy(&report.stderr);
    assert!(reported.contains(&console_line), "{reported}");
}

#[test]
fn four_clients_running_a_slow_script_in_turn_and_leaving_are_each_named_in_both_modes() {
    let redis = RedisServer::start(&["--protected-mode", "no"]);
    let script = "local i = 0 while i < 3000000 do i = i + 1 end return i";
    for mode in ["census", "exact"] {
        let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--clients", mode]);
        let mut expected = Vec::new();
        for last_octet in 2..6 {
            let mut client = client_from([127, 0, 0, last_octet], &redis);
            expected.push(address(&client));
            call(&mut client, &["EVAL", script, "0"]);
            // Gone before the stall is reported: it is named all the same.
            drop(client);
            thread::sleep(Duration::from_millis(150));
        }
        let run = profiler.stop();
        let stalls: Vec<&Value> = run
            .of_type("stall")
            .into_iter()
            .filter(|stall| {
                stall["origin"]
                    .as_str()
                    .unwrap()
                    .starts_with("command:eval")
            })
            .collect();
        assert_eq!(stalls.len(), 4, "{mode}: {stalls:?}\n{}", run.stderr);
        for (stall, address) in stalls.iter().zip(&expected) {
            assert_eq!(stall["client"]["source"], mode, "{stall}");
            assert_eq!(senders(stall), [address.as_str()], "{mode}: {stall}");
        }
    }
}

#[test]
fn the_clients_a_sleep_held_up_are_counted_with_their_address() {
    let redis = RedisServer::start(&["--protected-mode", "no"]);
    let dir = tempfile::tempdir().unwrap();
    let received = dir.path().join("alert.json");
    let exec = format!(
        "sh -c 'cat > {0}; echo \"$REDIS_STALLPROF_CLIENT\" > {0}.client'",
        received.display()
    );
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--alert",
        "300ms",
        "--alert-exec",
        &exec,
    ]);
    let mut waiting = connect_from([127, 0, 0, 7], redis.port, 60, None);
    // Sent from this thread, so that the requests below cannot overtake it.
    let mut sleeper = client_from([127, 0, 0, 2], &redis);
    let sleeper_address = address(&sleeper);
    sleeper
        .write_all(&request(&["DEBUG", "SLEEP", "0.5"]))
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    for connection in &mut waiting {
        connection.write_all(&request(&["PING"])).unwrap();
    }
    let mut reply = [0u8; 64];
    sleeper
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(sleeper.read(&mut reply).unwrap() > 0);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let stall = run.only_stall();
    let waiters = &stall["waiting"];
    let connections = number(&waiters["connections"]);
    assert!((55..=65).contains(&connections), "{waiters}");
    assert_eq!(waiters["top"][0]["addr"], "127.0.0.7", "{waiters}");
    assert!(number(&waiters["bytes"]) >= 60 * 14, "{waiters}");
    // The requests were sent 100 ms into the sleep (the kernel's idle clock counts in 4 ms
    // jiffies; this thread may wake late on a loaded machine).
    let longest_ms = number(&waiters["longest_wait_us"]) / 1_000;
    assert!((300..=420).contains(&longest_ms), "{waiters}");
    assert!(
        run.stderr
            .contains(&format!("{connections} clients waiting")),
        "{}",
        run.stderr
    );
    assert_eq!(senders(stall), [sleeper_address.as_str()], "{stall}");
    // The alert's command is told both.
    let alert: Value = serde_json::from_slice(&std::fs::read(&received).unwrap()).unwrap();
    assert_eq!(alert["state"], "final");
    assert_eq!(alert["client"], stall["client"], "{alert}");
    assert_eq!(alert["waiting"], stall["waiting"], "{alert}");
    let client_variable = std::fs::read_to_string(dir.path().join("alert.json.client")).unwrap();
    assert_eq!(client_variable.trim(), sleeper_address);
}

#[test]
fn a_cron_stall_has_no_client_whatever_was_read_before_it() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "1000000"]);
    redis.cli(&[
        "EVAL",
        "for i = 0, 999999 do redis.call('PEXPIRE', 'key:' .. i, 1500) end",
        "0",
    ]);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--clients", "exact"]);
    // The keys expire 1.5 s after the script; the cron's slow cycle takes them.
    thread::sleep(Duration::from_secs(3));
    let run = profiler.stop();
    let stalls = run.of_type("stall");
    let cron: Vec<&&Value> = stalls
        .iter()
        .filter(|stall| !stall["origin"].as_str().unwrap().starts_with("command:"))
        .collect();
    assert!(!cron.is_empty(), "{stalls:?}\n{}", run.stderr);
    for stall in cron {
        assert_eq!(stall["client"]["source"], "none", "{stall}");
        assert!(senders(stall).is_empty(), "{stall}");
    }
}

#[test]
fn a_sender_over_ipv6_or_a_unix_socket_is_named_by_its_address_or_path() {
    let socket =
        std::env::temp_dir().join(format!("stallprof-clients-{}.sock", std::process::id()));
    let socket_path = socket.to_str().unwrap();
    let redis = RedisServer::start(&[
        "--protected-mode",
        "no",
        "--bind",
        "127.0.0.1 ::1",
        "--unixsocket",
        socket_path,
    ]);
    for mode in ["census", "exact"] {
        let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--clients", mode]);
        let mut ipv6 = TcpStream::connect(("::1", redis.port)).unwrap();
        call(&mut ipv6, &["DEBUG", "SLEEP", "0.2"]);
        let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        unix.write_all(&request(&["DEBUG", "SLEEP", "0.2"]))
            .unwrap();
        let mut reply = [0u8; 64];
        assert!(unix.read(&mut reply).unwrap() > 0);
        thread::sleep(Duration::from_millis(100));
        let run = profiler.stop();
        let stalls = run.of_type("stall");
        assert_eq!(stalls.len(), 2, "{mode}: {stalls:?}");
        assert_eq!(
            senders(stalls[0]),
            [address(&ipv6).as_str()],
            "{mode}: {}",
            stalls[0]
        );
        assert!(address(&ipv6).starts_with("[::1]:"));
        // The census dumps TCP connections only; the exact read names the socket's path.
        let expected_unix = match mode {
            "exact" => vec![format!("unix:{socket_path}")],
            _ => Vec::new(),
        };
        assert_eq!(senders(stalls[1]), expected_unix, "{mode}: {}", stalls[1]);
    }
}

#[test]
fn hvals_typed_names_the_stall_its_stacks_share_with_hgetall_and_hkeys() {
    let redis = RedisServer::start(&[]);
    redis.cli(&[
        "EVAL",
        "for i = 1, 300000 do redis.call('HSET', 'big', 'field:' .. i, i) end",
        "0",
    ]);
    for mode in ["census", "exact"] {
        let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--clients", mode]);
        let mut client = redis.client();
        let _: Vec<String> = redis::cmd("HVALS").arg("big").query(&mut client).unwrap();
        thread::sleep(Duration::from_millis(100));
        let run = profiler.stop();
        let stalls = run.of_type("stall");
        let hash_stalls: Vec<&&Value> = stalls
            .iter()
            .filter(|stall| stall["origin"].as_str().unwrap().starts_with("command:h"))
            .collect();
        assert!(!hash_stalls.is_empty(), "{mode}: {stalls:?}");
        let expected = match mode {
            "exact" => "command:hvals",
            _ => "command:hgetall|hkeys|hvals",
        };
        for stall in hash_stalls {
            assert_eq!(stall["origin"], expected, "{mode}: {stall}");
        }
    }
}
