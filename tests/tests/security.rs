//! Safe to run as root on a production host: alert commands hold no privilege, outputs are
//! never written through a planted link, a second Ctrl-C ends a run whose outputs block, and
//! what local users and remote clients control (process names, the metrics port, ports in
//! other network namespaces) cannot mislead, hang or grow the profiler.
use std::{
    fs,
    io::{BufRead, BufReader, Write as _},
    net::TcpStream,
    os::unix::fs::FileTypeExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{
    NetworkNamespace, Profiler, RedisServer, connect_from, number, profiler_bin, scrape_metrics,
};

/// The hexadecimal value of a `/proc/PID/status` line such as `CapEff:`.
fn status_hex(status: &str, name: &str) -> u64 {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"));
    u64::from_str_radix(value.trim(), 16).unwrap()
}

/// A field of a `/proc/PID/status` line as text (`Uid:`, `NoNewPrivs:`).
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

/// Waits up to 10 s for `path` to exist, then reads it.
fn wait_for_file(path: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    fs::read_to_string(path).unwrap()
}

/// The process group of process `pid` (field 5 of `/proc/PID/stat`).
fn process_group(stat: &str) -> u32 {
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    rest.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn an_alert_command_holds_no_capability_and_runs_in_a_process_group_of_its_own() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Writable by `nobody` too.
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let as_root = dir.path().join("as-root");
    let as_nobody = dir.path().join("as-nobody");
    // The command's own status and stat, written whole then renamed: seen complete or not at all.
    let command = |out: &std::path::Path| {
        format!(
            "sh -c 'cat /proc/self/status /proc/self/stat > {0}.tmp; mv {0}.tmp {0}; cat > /dev/null'",
            out.display()
        )
    };
    let pid = redis.pid().to_string();
    let root_exec = command(&as_root);
    let nobody_exec = command(&as_nobody);
    let profilers = [
        Profiler::attach(&["--pid", &pid, "--alert", "20ms", "--alert-exec", &root_exec]),
        Profiler::attach(&[
            "--pid",
            &pid,
            "--alert",
            "20ms",
            "--alert-exec",
            &nobody_exec,
            "--alert-user",
            "nobody",
        ]),
    ];
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    let seen_as_root = wait_for_file(&as_root);
    let seen_as_nobody = wait_for_file(&as_nobody);
    let profiler_group = process_group(&fs::read_to_string("/proc/self/stat").unwrap());
    for profiler in profilers {
        let run = profiler.stop();
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(run.summary()["alerts"]["exec_failed"], 0, "{}", run.stderr);
    }
    for (status, uid) in [(&seen_as_root, "0"), (&seen_as_nobody, "65534")] {
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                status_hex(status, set),
                0,
                "{set} of the command:\n{status}"
            );
        }
        assert_eq!(status_field(status, "NoNewPrivs:"), "1", "{status}");
        assert!(
            status_field(status, "Uid:").starts_with(&format!("{uid}\t")),
            "{status}"
        );
        let stat = status.lines().last().unwrap();
        assert_ne!(
            process_group(stat),
            profiler_group,
            "its own process group: {stat}"
        );
    }
}

#[test]
fn outputs_are_not_written_through_a_symbolic_link_planted_in_their_place() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    for flag in ["--json", "--folded", "--flamegraph", "--pprof"] {
        let planted = dir.path().join(format!("planted{flag}"));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let output = Command::new(profiler_bin())
            .args([
                "attach",
                "--pid",
                &redis.pid().to_string(),
                "--duration",
                "1s",
            ])
            .arg(flag)
            .arg(&planted)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains("is a symbolic link") && !stderr.contains("panicked"),
            "{flag}: {stderr}"
        );
    }
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
}

#[test]
fn a_second_ctrl_c_ends_a_run_whose_output_blocks() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stalls.fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a path we own.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let mut profiler = Command::new(profiler_bin())
        .args(["attach", "--pid", &redis.pid().to_string(), "--json"])
        .arg(&fifo)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A reader that takes the `attached` record, then reads no more: the pipe fills up and
    // the profiler's writes block, as on a hung output.
    let reader = fs::File::open(&fifo).unwrap();
    let mut first = String::new();
    BufReader::new(&reader).read_line(&mut first).unwrap();
    assert!(first.contains("\"attached\""), "{first}");
    for _ in 0..60 {
        redis.cli(&["DEBUG", "SLEEP", "0.02"]);
    }
    let profiler_pid = profiler.id() as i32;
    let signal = |signal| {
        // SAFETY: signals our own child, the profiler.
        unsafe { libc::kill(profiler_pid, signal) };
    };
    signal(libc::SIGINT);
    thread::sleep(Duration::from_millis(500));
    assert!(
        profiler.try_wait().unwrap().is_none(),
        "a blocked output holds the first Ctrl-C up"
    );
    signal(libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = profiler.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second Ctrl-C did not end the run"
        );
        thread::sleep(Duration::from_millis(20));
    };
    drop(reader);
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut profiler.stderr.take().unwrap(), &mut stderr);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("second signal"), "{stderr}");
}

/// Opens `count` connections to `port` that each send half a request and stay open.
fn half_sent_requests(port: u16, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .ok()?;
            Some(stream)
        })
        .collect()
}

/// Raises this process's open-file limit to its hard limit (the flood needs thousands).
fn raise_file_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[test]
fn a_flood_of_half_sent_requests_neither_exhausts_descriptors_nor_stops_the_profiling() {
    raise_file_limit();
    let redis = RedisServer::start(&[]);
    let metrics_port = stallprof_testkit::free_port();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--metrics",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    let flood = half_sent_requests(metrics_port, 3_000);
    assert!(flood.len() > 1_000, "{} connections opened", flood.len());
    thread::sleep(Duration::from_millis(500));
    let descriptors = fs::read_dir(format!("/proc/{}/fd", profiler.pid()))
        .unwrap()
        .count();
    // The metrics page still answers, and stalls are still reported.
    let page = scrape_metrics(metrics_port);
    assert!(
        page.contains("redis_stallprof_eventloop_iteration_seconds_count"),
        "{page}"
    );
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    drop(flood);
    assert!(
        descriptors < 500,
        "{descriptors} descriptors open with 3,000 connections waiting"
    );
    assert_eq!(run.of_type("stall").len(), 1, "{}", run.stderr);
    assert!(run.status.success(), "{}", run.stderr);
}

#[test]
fn one_port_number_in_three_network_namespaces_is_three_servers_apart() {
    let port = stallprof_testkit::free_port();
    let namespaces: Vec<NetworkNamespace> = ["ports-a", "ports-b", "ports-c"]
        .into_iter()
        .map(NetworkNamespace::create)
        .collect();
    let servers: Vec<RedisServer> = namespaces
        .iter()
        .map(|namespace| RedisServer::start_in_on(namespace, port, &["--protected-mode", "no"]))
        .collect();
    let mut args: Vec<String> = vec!["--interval".into(), "1s".into()];
    for server in &servers {
        args.extend(["--pid".into(), server.pid().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let profiler = Profiler::attach(&args);
    let clients = [30, 10, 3];
    for (namespace, &count) in namespaces.iter().zip(&clients) {
        let connections = connect_from([127, 0, 0, 2], port, count, Some(namespace));
        thread::sleep(Duration::from_millis(300));
        drop(connections);
    }
    thread::sleep(Duration::from_millis(1_500));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    let summaries = run.of_type("summary");
    assert_eq!(summaries.len(), 3, "{}", run.stderr);
    for (server, &count) in servers.iter().zip(&clients) {
        let summary: &Value = summaries
            .iter()
            .find(|summary| summary["instance"]["pid"] == server.pid())
            .unwrap_or_else(|| panic!("no summary of pid {}", server.pid()));
        let totals = &summary["connections"];
        assert_eq!(
            (number(&totals["opened"]), number(&totals["closed"])),
            (count as u64, count as u64),
            "pid {}: {totals}",
            server.pid()
        );
        let waits = &summary["accept"]["waits"];
        assert_eq!(
            (number(&waits["connections"]), number(&waits["accepted"])),
            (count as u64, count as u64),
            "pid {}: each connection entered and left its own server's queue: {waits}",
            server.pid()
        );
    }
}
