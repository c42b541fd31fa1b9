//! `cargo xtask soak [MINUTES]`: a compressed long run of `attach --all`, as on a fleet's host.
//! One Redis serves `redis-benchmark` load while another client makes it stall in turn by
//! sleeping, by scanning keys on the CPU and by purging memory; clients connect to it from
//! ever new addresses; and short-lived servers start, stall and end all through the run (every
//! 5 s). Every output of the profiler is on (JSON, folded stacks, flamegraph, pprof, the HTML
//! report, metrics, alerts), kept in `target/soak/`. Every 30 s it prints the profiler's resident memory; at the end it checks that the
//! memory stayed bounded (no growth over the second half of the run beyond a small margin) and
//! that the metrics name only the servers still running.
use std::{
    fs,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use stallprof_testkit::{Profiler, RedisServer, free_port};

const DEFAULT_MINUTES: u64 = 10;
const REPORT_PERIOD: Duration = Duration::from_secs(30);
/// Growth of resident memory over the second half of the run still called bounded.
const GROWTH_MARGIN_KIB: u64 = 8 * 1024;

pub fn run(minutes: Option<u64>) -> anyhow::Result<()> {
    let length = Duration::from_secs(60 * minutes.unwrap_or(DEFAULT_MINUTES));
    let redis = RedisServer::start(&[]);
    let outputs = crate::workspace_root().join("target/soak");
    let _ = fs::remove_dir_all(&outputs);
    fs::create_dir_all(&outputs)?;
    let path = |name: &str| outputs.join(name).to_string_lossy().into_owned();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let pid = redis.pid().to_string();
    let profiler = Profiler::attach_writing(
        &[
            "--all",
            "--pprof",
            &path("stalls.pb.gz"),
            "--folded",
            &path("stalls.folded"),
            "--flamegraph",
            &path("stalls.svg"),
            "--html",
            &path("report.html"),
            "--metrics",
            &metrics,
            "--alert",
            "50ms",
            "--interval",
            "60s",
        ],
        &outputs.join("stalls.jsonl"),
    );
    eprintln!(
        "soak: {} minutes, redis-server pid {pid}, profiler pid {}",
        length.as_secs() / 60,
        profiler.pid()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = thread::spawn({
        let (stop, port) = (stop.clone(), redis.port.to_string());
        move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = Command::new("redis-benchmark")
                    .args([
                        "-p", &port, "-c", "20", "-n", "100000", "-r", "100000", "-q",
                    ])
                    .args(["-t", "set,get,lpush,lpop,incr"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    });
    let churn = thread::spawn({
        let stop = stop.clone();
        move || churn_servers(&stop)
    });
    let mut client = redis.client();
    let started = Instant::now();
    let mut next_report = started;
    let mut rss_kib: Vec<(Duration, u64)> = Vec::new();
    let mut round: u64 = 0;
    while started.elapsed() < length {
        let command = match round % 4 {
            0 => redis::cmd("DEBUG").arg("SLEEP").arg(0.03).clone(),
            1 => redis::cmd("DEBUG").arg("POPULATE").arg(300_000).clone(),
            2 => redis::cmd("KEYS").arg("no-such-key-*").clone(),
            _ => redis::cmd("FLUSHALL").clone(),
        };
        let _: redis::RedisResult<redis::Value> = command.query(&mut client);
        // A client from a new address each round: the census meets more than it keeps.
        let address = [
            127,
            1 + (round / 250 % 250) as u8,
            (round % 250) as u8 + 2,
            9,
        ];
        drop(stallprof_testkit::connect_from(
            address, redis.port, 1, None,
        ));
        round += 1;
        thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next_report {
            let resident = resident_kib(profiler.pid());
            rss_kib.push((started.elapsed(), resident));
            eprintln!(
                "soak: {:>4} s  profiler RSS {:.1} MiB  JSON {:.1} MiB  commands {round}",
                started.elapsed().as_secs(),
                resident as f64 / 1024.0,
                fs::metadata(outputs.join("stalls.jsonl")).map_or(0, |m| m.len()) as f64
                    / (1024.0 * 1024.0)
            );
            next_report += REPORT_PERIOD;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let churned = churn.join().unwrap_or(0);
    // The profiler notices an exit within its liveness period (200 ms).
    thread::sleep(Duration::from_secs(1));
    let page = stallprof_testkit::scrape_metrics(metrics_port);
    let run = profiler.stop();
    let named_pids: std::collections::HashSet<&str> = page
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            line.split_once("pid=\"")?
                .1
                .split_once('"')
                .map(|(pid, _)| pid)
        })
        .collect();
    eprintln!(
        "soak: {churned} short-lived servers came and went; the metrics name {} pid(s): {named_pids:?}",
        named_pids.len()
    );
    let exited: Vec<&&str> = named_pids
        .iter()
        .filter(|named| !std::path::Path::new(&format!("/proc/{named}")).exists())
        .collect();
    if !exited.is_empty() {
        bail!("the metrics still name servers that exited: {exited:?}");
    }
    let summary = run
        .of_type("summary")
        .into_iter()
        .find(|summary| summary["instance"]["pid"] == redis.pid())
        .ok_or_else(|| anyhow::anyhow!("no summary of the loaded server"))?;
    eprintln!(
        "soak: {} stalls, {} stack samples, {} lost events, {} iterations; profiler peak RSS {:.1} MiB",
        summary["stalls"],
        summary["stack_samples"],
        summary["lost_events"],
        summary["iterations"],
        summary["profiler"]["peak_rss_kib"].as_u64().unwrap_or(0) as f64 / 1024.0
    );
    let half = length / 2;
    let at_half = rss_kib
        .iter()
        .filter(|(at, _)| *at <= half)
        .map(|(_, kib)| *kib)
        .max()
        .unwrap_or(0);
    let at_end = rss_kib.last().map_or(0, |(_, kib)| *kib);
    eprintln!(
        "soak: RSS at most {:.1} MiB in the first half, {:.1} MiB at the end",
        at_half as f64 / 1024.0,
        at_end as f64 / 1024.0
    );
    if at_end > at_half + GROWTH_MARGIN_KIB {
        bail!("the profiler's memory grew over the second half of the soak");
    }
    eprintln!("soak: memory bounded");
    let size =
        |name: &str| fs::metadata(outputs.join(name)).map_or(0, |m| m.len()) as f64 / 1048576.0;
    eprintln!(
        "soak: outputs in {}: JSON {:.1} MiB, HTML report {:.1} MiB",
        outputs.display(),
        size("stalls.jsonl"),
        size("report.html")
    );
    Ok(())
}

/// Starts a server every 5 s until `stop`, makes it stall once, and ends it; returns how many.
fn churn_servers(stop: &AtomicBool) -> u64 {
    let mut churned = 0;
    while !stop.load(Ordering::Relaxed) {
        let server = RedisServer::start(&[]);
        thread::sleep(Duration::from_secs(2));
        server.cli(&["DEBUG", "SLEEP", "0.06"]);
        thread::sleep(Duration::from_secs(3));
        drop(server);
        churned += 1;
    }
    churned
}

/// `VmRSS` of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
