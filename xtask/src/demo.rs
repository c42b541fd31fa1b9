//! `cargo xtask demo`: a throwaway redis-server is made to stall in the ways the profiler
//! explains, while `redis-stallprof attach` watches it; the outputs stay in a folder.
use std::{fs, path::Path, thread, time::Duration};

use anyhow::Context as _;
use stallprof_testkit::{
    Profiler, RedisServer, add_small_sets, connect_from, connection_storm,
    leave_big_idle_query_buffers,
};

/// One way to make Redis stall, as `redis-cli` arguments, with what it shows.
struct Scenario {
    what: &'static str,
    commands: &'static [&'static [&'static str]],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        what: "a command that sleeps for 250 ms (DEBUG SLEEP 0.25): an off-CPU stall",
        commands: &[&["DEBUG", "SLEEP", "0.25"]],
    },
    Scenario {
        what: "a CPU-bound command: KEYS over a million keys (DEBUG POPULATE first)",
        commands: &[
            &["DEBUG", "POPULATE", "1000000"],
            &["KEYS", "no-such-key-*"],
            &["FLUSHALL"],
        ],
    },
    Scenario {
        what: "an allocator purge: MEMORY PURGE after a data set was freed by the lazy-free thread",
        commands: &[
            &["DEBUG", "POPULATE", "1000000", "key", "200"],
            &["FLUSHALL", "ASYNC"],
            &["DEBUG", "SLEEP", "0"],
        ],
    },
];

pub fn run(out_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let json = out_dir.join("stalls.jsonl");
    let folded = out_dir.join("stalls.folded");
    let flamegraph = out_dir.join("stalls.svg");
    let memory_flamegraph = out_dir.join("memory.svg");
    let html = out_dir.join("report.html");
    let redis = RedisServer::start(&[
        // Clients from 127.0.0.2 (the pool below) are not 127.0.0.1.
        "--protected-mode",
        "no",
        "--latency-monitor-threshold",
        "1",
        "--jemalloc-bg-thread",
        "no",
        "--tcp-backlog",
        "16",
    ]);
    eprintln!(
        "demo: redis-server pid {} on port {}; attaching",
        redis.pid(),
        redis.port
    );
    let pid = redis.pid().to_string();
    let (folded_arg, flamegraph_arg) = (folded.to_string_lossy(), flamegraph.to_string_lossy());
    let memory_flamegraph_arg = memory_flamegraph.to_string_lossy();
    let html_arg = html.to_string_lossy();
    let args = [
        "--html",
        &html_arg,
        "--memory-flamegraph",
        &memory_flamegraph_arg,
        "--pid",
        &pid,
        "--interval",
        "2s",
        "--folded",
        &folded_arg,
        "--flamegraph",
        &flamegraph_arg,
    ];
    let console = out_dir.join("console.txt");
    let profiler = Profiler::attach_writing(&args, &json);

    for scenario in SCENARIOS {
        eprintln!("demo: now {}", scenario.what);
        for command in scenario.commands {
            redis.cli(command);
        }
        thread::sleep(Duration::from_millis(500));
    }
    while !redis
        .cli(&["INFO", "memory"])
        .contains("lazyfree_pending_objects:0")
    {
        thread::sleep(Duration::from_millis(50));
    }
    redis.cli(&["MEMORY", "PURGE"]);
    eprintln!(
        "demo: now 300 clients connect during a 1 s stall: the 16-connection accept queue overflows"
    );
    let mut sleep = redis.command("redis-cli");
    sleep.args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "1"]);
    let sleeping = thread::spawn(move || sleep.output());
    thread::sleep(Duration::from_millis(100));
    let storm = connection_storm(redis.port, 300, None);
    let _ = sleeping.join();
    thread::sleep(Duration::from_millis(1500));
    drop(storm);
    eprintln!(
        "demo: now the incident: 20 clients leave 32 MiB query buffers and go idle; after 2 s clientsCron shrinks them"
    );
    let clients = leave_big_idle_query_buffers(redis.port, 20, 32 << 20);
    thread::sleep(Duration::from_secs(5));
    drop(clients);
    eprintln!(
        "demo: now memory that grows with no big key: 200,000 sets of one member each (SADD), while a pool of 100 connections from 127.0.0.2 sits nearly idle"
    );
    let pool = connect_from([127, 0, 0, 2], redis.port, 100, None);
    add_small_sets(&mut redis.client(), 200_000);
    thread::sleep(Duration::from_millis(2_500));
    drop(pool);
    let latest = redis.cli(&["LATENCY", "LATEST"]);
    let fields: Vec<&str> = latest.lines().collect();
    let events: Vec<String> = fields
        .chunks(4)
        .filter_map(|event| match event {
            [name, _, latest, max, ..] => {
                Some(format!("{name} (latest {latest} ms, max {max} ms)"))
            }
            _ => None,
        })
        .collect();
    eprintln!(
        "demo: Redis's own view, LATENCY LATEST: {} (no origin, no stack, no cron)",
        events.join(", ")
    );
    eprintln!("demo: stopping the profiler with Ctrl-C (SIGINT)");
    let run = profiler.stop();
    anyhow::ensure!(
        run.status.success(),
        "the profiler failed: {}\n{}",
        run.status,
        run.stderr
    );
    fs::write(&console, &run.stderr)?;
    eprintln!(
        "demo: the profiler's console is in {}; its summary, then one stall of each cause:",
        console.display()
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    let summary_at = lines
        .iter()
        .position(|line| line.starts_with("summary"))
        .unwrap_or(lines.len());
    for line in &lines[summary_at..] {
        eprintln!("{line}");
    }
    for cause in lines[summary_at..]
        .iter()
        .filter_map(|line| line.strip_prefix("  stalls in "))
    {
        let Some((diagnosis, _)) = cause.split_once(": ") else {
            continue;
        };
        if let Some(at) = lines.iter().position(|line| {
            line.contains(" STALL ") && line.contains(&format!(" in {diagnosis} ("))
        }) {
            eprintln!("{}", lines[at]);
            if let Some(stack) = lines.get(at + 1).filter(|line| line.starts_with("    ")) {
                eprintln!("{stack}");
            }
        }
    }

    for (record, needle) in [
        (" MEMORY ", "command:sadd"),
        (" CONNECTIONS ", "127.0.0.2: 100 established"),
    ] {
        if let Some(line) = lines
            .iter()
            .find(|line| line.contains(record) && line.contains(needle))
        {
            eprintln!("{line}");
        }
    }
    eprintln!(
        "demo: {} JSON records in {}; the stall records hold their stacks",
        run.records.len(),
        json.display()
    );
    let folded_text = fs::read_to_string(&folded)?;
    let mut heaviest: Vec<(u64, &str)> = folded_text
        .lines()
        .filter_map(|line| Some((line.rsplit_once(' ')?.1.parse().ok()?, line)))
        .collect();
    heaviest.sort_by(|a, b| b.cmp(a));
    eprintln!(
        "demo: the 5 heaviest of {} folded stacks (root first, microseconds) in {}:",
        heaviest.len(),
        folded.display()
    );
    for (_, line) in heaviest.iter().take(5) {
        eprintln!("{line}");
    }
    eprintln!(
        "demo: flamegraph in {} (off-CPU stacks aqua, on-CPU red)",
        flamegraph.display()
    );
    eprintln!(
        "demo: memory growth's flamegraph in {} (origin, mechanism, then the stack)",
        memory_flamegraph.display()
    );
    eprintln!("demo: outputs are in {}", out_dir.display());
    eprintln!(
        "demo: the HTML report (one page, opens from disk): {}",
        html.display()
    );
    Ok(())
}
