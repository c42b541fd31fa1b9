//! The attribution matrix: the latency sources of Redis's own latency guide, each provoked on
//! every build (Debian's Redis 7.0 and the builds `cargo xtask setup` fetches), at the default
//! threshold and at 1 ms. In each scenario, at least 95% of the stalls that end while it runs
//! carry its expected origin and mechanism, and at most 10% read `unknown`.
//!
//! One test runs them all in turn (scenarios in parallel would stall each other at 1 ms) and
//! prints the whole matrix. With `REDIS_STALLPROF_CORPUS=DIR`, every run's stalls are written
//! to `DIR/SCENARIO.BUILD.THRESHOLD.json`: the recorded corpus of the attribution unit tests.
use std::{
    fmt::Write as _,
    thread,
    time::{Duration, SystemTime},
};

use serde_json::Value;
use stallprof_testkit::{Build, Profiler, RedisServer};

/// Share of a scenario's stalls that must carry its expected names.
const EXPECTED_SHARE: f64 = 0.95;
/// Share of a scenario's stalls that may read `unknown`.
const UNKNOWN_SHARE: f64 = 0.10;
const THRESHOLDS: [&str; 2] = ["10ms", "1ms"];

/// A Lua loop filling `KEYS[1]` with `ARGV[1]` members by `ARGV[2]` (SADD, zadd, hset; RPUSH
/// pushes numbers, in descending order, for SORT).
const FILL: &str = "local n = tonumber(ARGV[1]) \
     for i = 1, n do \
       if ARGV[2] == 'zadd' then redis.call('ZADD', KEYS[1], i, 'm' .. i) \
       elseif ARGV[2] == 'hset' then redis.call('HSET', KEYS[1], 'f' .. i, i) \
       elseif ARGV[2] == 'RPUSH' then redis.call('RPUSH', KEYS[1], n - i) \
       else redis.call(ARGV[2], KEYS[1], 'm' .. i) end \
     end";

fn fill(redis: &RedisServer, key: &str, members: u32, command: &str) {
    let mut client = redis.client();
    let _: () = redis::cmd("EVAL")
        .arg(FILL)
        .arg(1)
        .arg(key)
        .arg(members)
        .arg(command)
        .query(&mut client)
        .unwrap_or_else(|error| panic!("fill {key}: {error}"));
}

fn run(redis: &RedisServer, args: &[&str]) {
    let mut client = redis.client();
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    let _: redis::Value = command
        .query(&mut client)
        .unwrap_or_else(|error| panic!("{args:?}: {error}"));
}

/// One latency source.
struct Scenario {
    name: &'static str,
    /// Configuration the server starts with.
    config: &'static [&'static str],
    /// Before attaching.
    setup: fn(&RedisServer),
    /// While profiled: what stalls the loop.
    provoke: fn(&RedisServer),
    /// Origins that are right: the ambiguity group the frames may give, or a build's more
    /// precise name (the command itself, where it does not tail-call its implementation).
    origins: &'static [&'static str],
    /// Mechanisms that are right (the allocator's own frames decide between `cpu` and
    /// `allocator` for work that frees or allocates).
    mechanisms: &'static [&'static str],
    /// Whether a build can run it.
    runs_on: fn(&Build) -> bool,
}

fn any_build(_: &Build) -> bool {
    true
}

fn with_functions(build: &Build) -> bool {
    build.functions
}

fn populate(redis: &RedisServer) {
    run(redis, &["DEBUG", "POPULATE", "1000000"]);
}

const NO_LAZY_FREE: &[&str] = &["--lazyfree-lazy-user-del", "no"];

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "keys",
        config: &[],
        setup: populate,
        provoke: |redis| run(redis, &["KEYS", "no-such-key-*"]),
        origins: &["command:keys"],
        mechanisms: &["cpu"],
        runs_on: any_build,
    },
    Scenario {
        name: "sort",
        config: &[],
        setup: |redis| fill(redis, "list", 300_000, "RPUSH"),
        provoke: |redis| run(redis, &["SORT", "list"]),
        origins: &["command:sort|sort_ro", "command:sort"],
        mechanisms: &["cpu", "allocator", "page_fault"],
        runs_on: any_build,
    },
    Scenario {
        name: "sunionstore",
        config: &[],
        setup: |redis| {
            fill(redis, "a", 300_000, "SADD");
            fill(redis, "b", 300_000, "SADD");
        },
        provoke: |redis| run(redis, &["SUNIONSTORE", "dest", "a", "b"]),
        origins: &["command:sdiff|sdiffstore|sunion|sunionstore"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "zunionstore",
        config: &[],
        setup: |redis| {
            fill(redis, "a", 200_000, "zadd");
            fill(redis, "b", 200_000, "zadd");
        },
        provoke: |redis| run(redis, &["ZUNIONSTORE", "dest", "2", "a", "b"]),
        origins: &["command:zdiff|zdiffstore|zinter|zintercard|zinterstore|zunion|zunionstore"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "lrange",
        config: &[],
        setup: |redis| fill(redis, "list", 1_000_000, "RPUSH"),
        provoke: |redis| run(redis, &["LRANGE", "list", "0", "-1"]),
        origins: &["command:lrange"],
        mechanisms: &["cpu", "allocator", "page_fault"],
        runs_on: any_build,
    },
    Scenario {
        name: "del-set",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "set", 800_000, "SADD"),
        provoke: |redis| run(redis, &["DEL", "set"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "del-hash",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "hash", 800_000, "hset"),
        provoke: |redis| run(redis, &["DEL", "hash"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "del-zset",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "zset", 500_000, "zadd"),
        provoke: |redis| run(redis, &["DEL", "zset"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "flushall-sync",
        config: &[],
        setup: populate,
        provoke: |redis| run(redis, &["FLUSHALL", "SYNC"]),
        origins: &["command:flushall"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
    Scenario {
        name: "eval",
        config: &[],
        setup: |_| {},
        provoke: |redis| {
            let mut client = redis.client();
            let _: i64 = redis::cmd("EVAL")
                .arg("local x = 0 for i = 1, 30000000 do x = x + i end return 1")
                .arg(0)
                .query(&mut client)
                .expect("EVAL");
        },
        origins: &[
            "command:eval|eval_ro|evalsha|evalsha_ro",
            "command:eval|eval_ro",
            "command:eval",
        ],
        mechanisms: &["cpu"],
        runs_on: any_build,
    },
    Scenario {
        name: "fcall",
        config: &[],
        setup: |redis| {
            let mut client = redis.client();
            let _: String = redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg(
                    "#!lua name=stallprof\n\
                     redis.register_function('spin', function() \
                       local x = 0 for i = 1, 30000000 do x = x + i end return 1 end)",
                )
                .query(&mut client)
                .expect("FUNCTION LOAD");
        },
        provoke: |redis| run(redis, &["FCALL", "spin", "0"]),
        origins: &["command:fcall|fcall_ro", "command:fcall"],
        mechanisms: &["cpu"],
        runs_on: with_functions,
    },
    Scenario {
        name: "debug-sleep",
        config: &[],
        setup: |_| {},
        provoke: |redis| run(redis, &["DEBUG", "SLEEP", "0.05"]),
        origins: &["command:debug"],
        mechanisms: &["syscall.sleep"],
        runs_on: any_build,
    },
    Scenario {
        name: "expire-slow-cycle",
        config: &[],
        setup: |redis| {
            populate(redis);
            let mut client = redis.client();
            let _: () = redis::cmd("EVAL")
                .arg("for i = 0, 999999 do redis.call('PEXPIRE', 'key:' .. i, 1500) end")
                .arg(0)
                .query(&mut client)
                .expect("PEXPIRE");
        },
        // The keys expire 1.5 s after the setup; the slow cycle takes them in serverCron.
        provoke: |_| thread::sleep(Duration::from_secs(3)),
        // At 1 ms the fast cycles before the loop sleeps are stalls too.
        origins: &["cron.expire", "before_sleep.expire"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
    },
];

/// What one scenario gave on one build at one threshold.
struct Outcome {
    stalls: Vec<Value>,
    expected: usize,
    unknown: usize,
}

impl Outcome {
    fn holds(&self) -> bool {
        let total = self.stalls.len() as f64;
        !self.stalls.is_empty()
            && self.expected as f64 >= EXPECTED_SHARE * total
            && self.unknown as f64 <= UNKNOWN_SHARE * total
    }
}

/// A time as the records write it (RFC 3339, microseconds, UTC), so that they compare as text.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

fn run_scenario(scenario: &Scenario, build: &Build, threshold: &str) -> Outcome {
    let redis = RedisServer::start_build(build, scenario.config);
    (scenario.setup)(&redis);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--threshold", threshold]);
    let from = rfc3339(SystemTime::now());
    (scenario.provoke)(&redis);
    let to = rfc3339(SystemTime::now());
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    // The stalls that began while the scenario ran.
    let stalls: Vec<Value> = run
        .of_type("stall")
        .into_iter()
        .filter(|stall| {
            let time = stall["time"].as_str().unwrap_or_default();
            from.as_str() <= time && time <= to.as_str()
        })
        .cloned()
        .collect();
    if let Some(dir) = std::env::var_os("REDIS_STALLPROF_CORPUS") {
        let path = std::path::Path::new(&dir)
            .join(format!("{}.{}.{threshold}.json", scenario.name, build.name));
        let corpus = serde_json::json!({
            "scenario": scenario.name,
            "build": build.name,
            "threshold": threshold,
            "origins": scenario.origins,
            "mechanisms": scenario.mechanisms,
            "stalls": stalls,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&corpus).unwrap()).unwrap();
    }
    let expected = stalls
        .iter()
        .filter(|stall| {
            scenario
                .origins
                .iter()
                .any(|origin| stall["origin"] == *origin)
                && scenario
                    .mechanisms
                    .iter()
                    .any(|mechanism| stall["mechanism"] == *mechanism)
        })
        .count();
    let unknown = stalls
        .iter()
        .filter(|stall| stall["origin"] == "unknown" || stall["mechanism"] == "unknown")
        .count();
    Outcome {
        stalls,
        expected,
        unknown,
    }
}

/// `origin / mechanism` counts of the stalls.
fn names(stalls: &[Value]) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for stall in stalls {
        *counts
            .entry(format!("{} / {}", stall["origin"], stall["mechanism"]))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(name, count)| format!("{count}x {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn every_latency_source_is_named_on_every_build() {
    let builds = Build::available();
    let mut table = String::new();
    let mut failures = Vec::new();
    for scenario in SCENARIOS {
        for build in builds.iter().filter(|build| (scenario.runs_on)(build)) {
            for threshold in THRESHOLDS {
                let outcome = run_scenario(scenario, build, threshold);
                let verdict = if outcome.holds() { "ok" } else { "FAILED" };
                let line = format!(
                    "{verdict:6} {:18} {:16} {threshold:>4}: {}/{} expected ({} {}), {} unknown; {}",
                    scenario.name,
                    build.name,
                    outcome.expected,
                    outcome.stalls.len(),
                    scenario.origins.join(" or "),
                    scenario.mechanisms.join("|"),
                    outcome.unknown,
                    names(&outcome.stalls),
                );
                eprintln!("{line}");
                let _ = writeln!(table, "{line}");
                if !outcome.holds() {
                    failures.push(line);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the matrix failed:\n{}\nthe whole matrix:\n{table}",
        failures.len(),
        failures.join("\n")
    );
}
