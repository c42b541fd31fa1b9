//! `cargo xtask demo`: a throwaway redis-server is made to stall in the ways the profiler
//! explains, while `redis-stallprof attach` watches it; the outputs stay in a folder.
use std::{fs, path::Path, thread, time::Duration};

use anyhow::Context as _;
use stallprof_testkit::{Profiler, RedisServer};

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
        commands: &[&["DEBUG", "POPULATE", "1000000"], &["KEYS", "no-such-key-*"]],
    },
];

pub fn run(out_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let json = out_dir.join("stalls.jsonl");
    let folded = out_dir.join("stalls.folded");
    let flamegraph = out_dir.join("stalls.svg");
    let redis = RedisServer::start(&["--latency-monitor-threshold", "1"]);
    eprintln!("demo: redis-server pid {} on port {}; attaching", redis.pid(), redis.port);
    let pid = redis.pid().to_string();
    let (folded_arg, flamegraph_arg) = (folded.to_string_lossy(), flamegraph.to_string_lossy());
    let args = ["--pid", &pid, "--interval", "2s", "--folded", &folded_arg, "--flamegraph", &flamegraph_arg];
    let profiler = Profiler::attach_showing_console(&args, &json);

    for scenario in SCENARIOS {
        eprintln!("demo: now {}", scenario.what);
        for command in scenario.commands {
            redis.cli(command);
        }
        thread::sleep(Duration::from_millis(500));
    }
    eprintln!("demo: Redis's own view (LATENCY LATEST: event, time, latest ms, max ms):");
    eprintln!("{}", redis.cli(&["LATENCY", "LATEST"]).trim_end());
    eprintln!("demo: stopping the profiler with Ctrl-C (SIGINT)");
    let run = profiler.stop();
    anyhow::ensure!(run.status.success(), "the profiler failed: {}", run.status);

    eprintln!("demo: {} JSON records in {}; the stall records hold their stacks", run.records.len(), json.display());
    let folded_text = fs::read_to_string(&folded)?;
    let mut heaviest: Vec<(u64, &str)> = folded_text
        .lines()
        .filter_map(|line| Some((line.rsplit_once(' ')?.1.parse().ok()?, line)))
        .collect();
    heaviest.sort_by(|a, b| b.cmp(a));
    eprintln!("demo: the 5 heaviest of {} folded stacks (root first, microseconds) in {}:", heaviest.len(), folded.display());
    for (_, line) in heaviest.iter().take(5) {
        eprintln!("{line}");
    }
    eprintln!("demo: flamegraph in {} (off-CPU stacks aqua, on-CPU red)", flamegraph.display());
    eprintln!("demo: outputs are in {}", out_dir.display());
    Ok(())
}
