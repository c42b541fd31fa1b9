//! The attribution matrix: the latency sources of Redis's own latency guide, each provoked on
//! every build (Debian's Redis 7.0 and the builds `cargo xtask setup` fetches), at the default
//! threshold and at 1 ms. In each scenario, at least 95% of the stalls that begin while it runs
//! carry its expected origin and mechanism, and at most 10% read `unknown`; work done off the
//! loop (`UNLINK`, `FLUSHALL ASYNC`) stalls it for no 10 ms under a name of its own.
//!
//! One test runs them all in turn (scenarios in parallel would stall each other at 1 ms) and
//! prints the whole matrix. With `REDIS_STALLPROF_CORPUS=DIR`, every run's stalls are written
//! to `DIR/SCENARIO.BUILD.THRESHOLD.json`: the recorded corpus of the attribution unit tests.
//! `REDIS_STALLPROF_SCENARIOS=keys,eval` runs only those scenarios, and
//! `REDIS_STALLPROF_BUILDS_ONLY=valkey-8.1` only on those builds.
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
    /// While profiled: what stalls the loop (on the server of that build).
    provoke: fn(&RedisServer, &Build),
    /// Origins that are right: the ambiguity group the frames may give, or a build's more
    /// precise name (the command itself, where it does not tail-call its implementation).
    origins: &'static [&'static str],
    /// Mechanisms that are right (the allocator's own frames decide between `cpu` and
    /// `allocator` for work that frees or allocates).
    mechanisms: &'static [&'static str],
    /// Whether a build can run it.
    runs_on: fn(&Build) -> bool,
    /// At which thresholds it must stall the loop.
    stalls: Stalls,
}

/// What a command leaves to the iterations after it, stalls of their own under their own
/// names: sending a big reply, or the allocator consolidating what the command freed when the
/// next query is read (`client.io`); the loop's own return to its poll (`event_loop`). They
/// neither count for a scenario nor against it.
const AFTERMATH: [&str; 2] = ["client.io", "event_loop"];

/// The longest stall a scenario whose work is off the loop may cause under its own name.
const NEVER_LONGER_US: u64 = 10_000;

/// Which runs of a scenario must stall the loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stalls {
    /// At every threshold.
    Always,
    /// At 1 ms; at the default threshold its stalls may all be shorter.
    AtOneMillisecond,
    /// Never for long: the work happens off the loop, and no stall of [`NEVER_LONGER_US`] or
    /// more may carry its `origins` (the same work on the loop takes hundreds of ms; with
    /// libc's malloc, the command's own allocations can wait about a millisecond for the
    /// lazy-free thread's).
    Never,
    /// When the machine makes it slow enough: its stalls, if any, carry its names.
    Maybe,
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

/// 300 writes of 100 bytes, one at a time.
fn set_keys(redis: &RedisServer, _: &Build) {
    let mut client = redis.client();
    for index in 0..300 {
        let _: () = redis::cmd("SET")
            .arg(format!("key:{index}"))
            .arg("x".repeat(100))
            .query(&mut client)
            .expect("SET");
    }
}

const NO_LAZY_FREE: &[&str] = &["--lazyfree-lazy-user-del", "no"];

/// Where a fork's time goes: copying the page tables, the faults after it, and the CPU the
/// child takes: it inherits the loop's (the matrix pins the loop to a CPU of its own), and the
/// loop waits for it (`runqueue`), as on a host with fewer CPUs than busy threads.
const FORK: &[&str] = &["fork", "page_fault", "runqueue"];

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "keys",
        config: &[],
        setup: populate,
        provoke: |redis, _| run(redis, &["KEYS", "no-such-key-*"]),
        origins: &["command:keys"],
        mechanisms: &["cpu"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "sort",
        config: &[],
        setup: |redis| fill(redis, "list", 300_000, "RPUSH"),
        provoke: |redis, _| run(redis, &["SORT", "list"]),
        origins: &["command:sort|sort_ro", "command:sort"],
        mechanisms: &["cpu", "allocator", "page_fault"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "sunionstore",
        config: &[],
        setup: |redis| {
            fill(redis, "a", 300_000, "SADD");
            fill(redis, "b", 300_000, "SADD");
        },
        provoke: |redis, _| run(redis, &["SUNIONSTORE", "dest", "a", "b"]),
        // Valkey 9.1's SDIFF does not end in the shared implementation: only two reach it.
        origins: &[
            "command:sdiff|sdiffstore|sunion|sunionstore",
            "command:sunion|sunionstore",
        ],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "zunionstore",
        config: &[],
        setup: |redis| {
            fill(redis, "a", 200_000, "zadd");
            fill(redis, "b", 200_000, "zadd");
        },
        provoke: |redis, _| run(redis, &["ZUNIONSTORE", "dest", "2", "a", "b"]),
        origins: &["command:zdiff|zdiffstore|zinter|zintercard|zinterstore|zunion|zunionstore"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "lrange",
        config: &[],
        setup: |redis| fill(redis, "list", 1_000_000, "RPUSH"),
        // The reply is left unread while Redis builds it: a client parsing 1 M elements at
        // the same time would compete with Redis for the CPUs.
        provoke: |redis, _| {
            let mut client =
                std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("connect");
            std::io::Write::write_all(
                &mut client,
                b"*4\r\n$6\r\nLRANGE\r\n$4\r\nlist\r\n$1\r\n0\r\n$2\r\n-1\r\n",
            )
            .expect("send LRANGE");
            thread::sleep(Duration::from_millis(500));
        },
        origins: &["command:lrange"],
        mechanisms: &["cpu", "allocator", "page_fault"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "del-set",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "set", 800_000, "SADD"),
        provoke: |redis, _| run(redis, &["DEL", "set"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "del-hash",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "hash", 800_000, "hset"),
        provoke: |redis, _| run(redis, &["DEL", "hash"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "del-zset",
        config: NO_LAZY_FREE,
        setup: |redis| fill(redis, "zset", 500_000, "zadd"),
        provoke: |redis, _| run(redis, &["DEL", "zset"]),
        origins: &["command:del|unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "flushall-sync",
        config: &[],
        setup: populate,
        provoke: |redis, _| run(redis, &["FLUSHALL", "SYNC"]),
        origins: &["command:flushall"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "eval",
        config: &[],
        setup: |_| {},
        provoke: |redis, _| {
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
        stalls: Stalls::Always,
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
        provoke: |redis, _| run(redis, &["FCALL", "spin", "0"]),
        origins: &["command:fcall|fcall_ro", "command:fcall"],
        mechanisms: &["cpu"],
        runs_on: with_functions,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "debug-sleep",
        config: &[],
        setup: |_| {},
        provoke: |redis, _| run(redis, &["DEBUG", "SLEEP", "0.05"]),
        origins: &["command:debug"],
        mechanisms: &["syscall.sleep"],
        runs_on: any_build,
        stalls: Stalls::Always,
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
        provoke: |_, _| thread::sleep(Duration::from_secs(3)),
        // At 1 ms the fast cycles before the loop sleeps are stalls too, and so is the cron's
        // work on the emptied key space (shrinking its tables, giving their memory back; in a
        // build without the resizing functions' names, under `databasesCron` itself).
        origins: &[
            "cron.expire",
            "before_sleep.expire",
            "cron.rehash",
            "cron.databases",
        ],
        mechanisms: &["cpu", "allocator", "allocator.purge"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "unlink",
        config: &[],
        setup: |redis| fill(redis, "set", 800_000, "SADD"),
        provoke: |redis, _| run(redis, &["UNLINK", "set"]),
        origins: &["command:del|unlink", "command:unlink"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Never,
    },
    Scenario {
        name: "flushall-async",
        config: &[],
        setup: populate,
        provoke: |redis, _| run(redis, &["FLUSHALL", "ASYNC"]),
        origins: &["command:flushall"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Never,
    },
    Scenario {
        name: "bgsave-fork",
        config: &[],
        // Enough memory that copying its page tables takes well over 1 ms.
        setup: |redis| run(redis, &["DEBUG", "POPULATE", "4000000"]),
        provoke: |redis, _| {
            run(redis, &["BGSAVE"]);
            thread::sleep(Duration::from_millis(200));
        },
        origins: &["command:bgsave"],
        mechanisms: FORK,
        runs_on: any_build,
        stalls: Stalls::AtOneMillisecond,
    },
    Scenario {
        name: "aof-always",
        config: &["--appendonly", "yes", "--appendfsync", "always"],
        setup: |_| {},
        provoke: set_keys,
        origins: &["aof"],
        mechanisms: &["disk"],
        runs_on: any_build,
        // An fdatasync on this kind of VM's disk takes well under 1 ms.
        stalls: Stalls::Maybe,
    },
    Scenario {
        name: "aof-everysec",
        config: &["--appendonly", "yes", "--appendfsync", "everysec"],
        setup: |_| {},
        provoke: set_keys,
        // The loop's write waits behind the background fsync of the same file.
        origins: &["aof"],
        mechanisms: &["disk", "off_cpu"],
        runs_on: any_build,
        // The background fsync takes well under 1 ms here: the loop's write rarely waits.
        stalls: Stalls::Maybe,
    },
    Scenario {
        name: "bgrewriteaof-fork",
        config: &[],
        setup: |redis| run(redis, &["DEBUG", "POPULATE", "4000000"]),
        provoke: |redis, _| {
            run(redis, &["BGREWRITEAOF"]);
            thread::sleep(Duration::from_millis(200));
        },
        origins: &["command:bgrewriteaof"],
        mechanisms: FORK,
        runs_on: any_build,
        stalls: Stalls::AtOneMillisecond,
    },
    Scenario {
        name: "replica-full-sync",
        // Diskless (Redis 7 and Valkey): the fork waits a second for more replicas, then
        // happens in the replication cron; on disk (Redis 6.2's default): in PSYNC itself.
        config: &["--repl-diskless-sync-delay", "1"],
        setup: |redis| run(redis, &["DEBUG", "POPULATE", "4000000"]),
        provoke: |redis, build| {
            let replica = RedisServer::start_build(build, &[]);
            pin(replica.pid(), 1, true);
            run(
                &replica,
                &["REPLICAOF", "127.0.0.1", &redis.port.to_string()],
            );
            // Asked of the replica: the master's own INFO would be an iteration of the loop
            // under test, one that may wait for the CPU its child took.
            wait_for(Duration::from_secs(30), "the replica's full sync", || {
                replica
                    .cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
            });
        },
        origins: &["replication.full_sync", "command:psync|sync"],
        // The fork, and sending the snapshot through the loop (diskless: read from the child's
        // pipe; on disk: read from the file), written to the replica.
        mechanisms: &["fork", "page_fault", "runqueue", "cpu", "disk"],
        runs_on: any_build,
        stalls: Stalls::AtOneMillisecond,
    },
    Scenario {
        name: "cow-page-faults",
        // The child saves slowly (50 us a key), so the script writes pages it still shares.
        config: &["--rdb-key-save-delay", "50", "--rdbcompression", "no"],
        setup: |redis| {
            run(redis, &["DEBUG", "POPULATE", "100000", "key", "4096"]);
            run(redis, &["BGSAVE"]);
        },
        // One byte in each 4 KiB value: one copy-on-write fault a key.
        provoke: |redis, _| {
            run(
                redis,
                &[
                    "EVAL",
                    "for i = 0, 99999 do redis.call('SETRANGE', 'key:' .. i, 0, 'x') end",
                    "0",
                ],
            );
        },
        origins: &[
            "command:eval|eval_ro|evalsha|evalsha_ro",
            "command:eval|eval_ro",
            "command:eval",
        ],
        mechanisms: &["page_fault"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "eviction",
        // No time limit on an eviction (tenacity 100) and no lazy free: all that one command
        // evicts is one stall.
        config: &[
            "--maxmemory-policy",
            "noeviction",
            "--maxmemory-eviction-tenacity",
            "100",
            "--lazyfree-lazy-eviction",
            "no",
        ],
        setup: |redis| {
            populate(redis);
            let used = redis.info_number("memory", "used_memory");
            run(
                redis,
                &["CONFIG", "SET", "maxmemory", &(used * 6 / 10).to_string()],
            );
        },
        // Evicting is allowed from now on: the next command first evicts 40% of the memory.
        // (`redis-cli`, which sends that command alone: a client library's handshake commands
        // would do the evicting, leaving the allocator's work on what they freed to the SET.)
        provoke: |redis, _| {
            redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]);
            redis.cli(&["SET", "one-more", "key"]);
        },
        origins: &["eviction"],
        mechanisms: &["cpu", "allocator"],
        runs_on: any_build,
        stalls: Stalls::Always,
    },
    Scenario {
        name: "rehash",
        // The cron (once a second here) shrinks the emptied key space's table, then moves its
        // keys a millisecond at a time. (Valkey's hashtable shrinks in the deletes themselves,
        // and is done before the profiler attaches.)
        config: &["--hz", "1"],
        setup: |redis| {
            populate(redis);
            run(
                redis,
                &[
                    "EVAL",
                    "for i = 0, 999999 do if i % 20 ~= 0 then redis.call('DEL', 'key:' .. i) end end",
                    "0",
                ],
            );
        },
        provoke: |_, _| thread::sleep(Duration::from_secs(3)),
        origins: &["cron.rehash"],
        mechanisms: &["cpu", "allocator", "allocator.purge"],
        runs_on: |build| build.dict_keyspace,
        stalls: Stalls::AtOneMillisecond,
    },
    Scenario {
        name: "active-defrag",
        config: &[],
        // Every other key freed: half-empty allocator pages for the defragmenter to move.
        setup: |redis| {
            populate(redis);
            run(
                redis,
                &[
                    "EVAL",
                    "for i = 0, 999999, 2 do redis.call('DEL', 'key:' .. i) end",
                    "0",
                ],
            );
            for (name, value) in [
                ("active-defrag-ignore-bytes", "1mb"),
                ("active-defrag-threshold-lower", "1"),
                ("activedefrag", "yes"),
            ] {
                run(redis, &["CONFIG", "SET", name, value]);
            }
        },
        provoke: |_, _| thread::sleep(Duration::from_secs(3)),
        origins: &["cron.defrag"],
        mechanisms: &["cpu", "allocator"],
        runs_on: with_active_defrag,
        // Each cron's defragmentation runs up to 25% of its 100 ms.
        stalls: Stalls::Always,
    },
    Scenario {
        name: "io-threads",
        // Valkey ignores the second option (its io threads always read).
        config: &["--io-threads", "2", "--io-threads-do-reads", "yes"],
        setup: |_| {},
        // Clients' load; the io thread shares its CPU with them.
        provoke: |redis, _| {
            let status = std::process::Command::new("taskset")
                .args(["-c", "1", "redis-benchmark", "-p", &redis.port.to_string()])
                .args(["-c", "50", "-n", "200000", "-P", "8", "-t", "get,set", "-q"])
                .stdout(std::process::Stdio::null())
                .status()
                .expect("redis-benchmark");
            assert!(status.success(), "redis-benchmark");
        },
        // The hand-offs, the waits for the io threads, and the commands themselves.
        origins: &[
            "io_threads.wait",
            "io_threads.reads",
            "io_threads.writes",
            "command:get",
            "command:set",
            "before_sleep.expire",
        ],
        // The clients' network processing (softirqs) takes the loop's CPU at times too.
        mechanisms: &["cpu", "allocator", "runqueue"],
        runs_on: any_build,
        stalls: Stalls::Maybe,
    },
];

/// Whether the build's allocator can defragment (Redis's own jemalloc, as in the build from the
/// source distribution): Debian's system jemalloc and libc's malloc cannot, and the server
/// refuses `activedefrag yes`.
fn with_active_defrag(build: &Build) -> bool {
    let redis = RedisServer::start_build(build, &[]);
    let reply = redis
        .try_cli(&["CONFIG", "SET", "activedefrag", "yes"])
        .unwrap_or_default();
    let supported = reply.trim() == "OK";
    if !supported {
        eprintln!("active defrag: not on {}: {}", build.name, reply.trim());
    }
    supported
}

/// Waits until `done` holds, at most `timeout`.
fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not end within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// What one scenario gave on one build at one threshold.
struct Outcome {
    stalls: Vec<Value>,
    expected: usize,
    unknown: usize,
    /// Stalls of [`NEVER_LONGER_US`] or more with one of the scenario's origins, whatever
    /// their mechanism.
    named_long: usize,
    /// Whether the run had to stall the loop (see [`Stalls`]).
    must_stall: bool,
    /// The work must not stall the loop.
    must_not_stall: bool,
    /// What else the run saw, for a failure: every stall's time, duration and names, the
    /// scenario's window, and the summary's losses.
    context: String,
}

impl Outcome {
    fn holds(&self) -> bool {
        if self.must_not_stall {
            return self.named_long == 0;
        }
        let total = self.stalls.len() as f64;
        (!self.must_stall || !self.stalls.is_empty())
            && self.expected as f64 >= EXPECTED_SHARE * total
            && self.unknown as f64 <= UNKNOWN_SHARE * total
    }
}

/// A time as the records write it (RFC 3339, microseconds, UTC), so that they compare as text.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// Pins thread `tid` to `cpu`; with `all`, every thread of its process.
fn pin(tid: u32, cpu: u32, all: bool) {
    let status = std::process::Command::new("taskset")
        .args(if all { &["-a"][..] } else { &[] })
        .args(["-p", "-c", &cpu.to_string(), &tid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset");
    assert!(status.success(), "taskset {tid}");
}

fn run_scenario(scenario: &Scenario, build: &Build, threshold: &str) -> Outcome {
    let redis = RedisServer::start_build(build, scenario.config);
    (scenario.setup)(&redis);
    // Redis's event loop alone on one CPU; its other threads (lazy free, AOF fsync) and the
    // profiler on the other: at 1 ms, CPU contention with them would be stalls of its own
    // (`runqueue`), and the background threads' work must not show as the loop's.
    pin(redis.pid(), 1, true);
    pin(redis.pid(), 0, false);
    let profiler = Profiler::attach(&["--pid", &redis.pid().to_string(), "--threshold", threshold]);
    pin(profiler.pid(), 1, true);
    let from = rfc3339(SystemTime::now());
    (scenario.provoke)(&redis, build);
    let to = rfc3339(SystemTime::now());
    thread::sleep(Duration::from_millis(100));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    let context = format!(
        "window {from} .. {to}; all stalls: {:?}; lost: {}",
        run.of_type("stall")
            .iter()
            .map(|stall| format!(
                "{} {}us {} / {}",
                stall["time"], stall["duration_us"], stall["origin"], stall["mechanism"]
            ))
            .collect::<Vec<_>>(),
        run.summary()["lost"]
    );
    // The stalls that began while the scenario ran, but for its aftermath.
    let stalls: Vec<Value> = run
        .of_type("stall")
        .into_iter()
        .filter(|stall| {
            let time = stall["time"].as_str().unwrap_or_default();
            from.as_str() <= time
                && time <= to.as_str()
                && !AFTERMATH.iter().any(|origin| stall["origin"] == *origin)
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
    let named_long = stalls
        .iter()
        .filter(|stall| {
            scenario
                .origins
                .iter()
                .any(|origin| stall["origin"] == *origin)
                && stall["duration_us"].as_u64().unwrap_or(0) >= NEVER_LONGER_US
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
        named_long,
        must_stall: scenario.stalls == Stalls::Always
            || (scenario.stalls == Stalls::AtOneMillisecond && threshold == "1ms"),
        must_not_stall: scenario.stalls == Stalls::Never,
        context,
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
    let only_builds = std::env::var("REDIS_STALLPROF_BUILDS_ONLY").ok();
    let builds: Vec<Build> = Build::available()
        .into_iter()
        .filter(|build| {
            only_builds
                .as_deref()
                .is_none_or(|only| only.split(',').any(|name| name == build.name))
        })
        .collect();
    let only = std::env::var("REDIS_STALLPROF_SCENARIOS").ok();
    let mut table = String::new();
    let mut failures = Vec::new();
    let mut retried = 0;
    for scenario in SCENARIOS.iter().filter(|scenario| {
        only.as_deref()
            .is_none_or(|only| only.split(',').any(|name| name == scenario.name))
    }) {
        for build in builds.iter().filter(|build| (scenario.runs_on)(build)) {
            for threshold in THRESHOLDS {
                let mut outcome = run_scenario(scenario, build, threshold);
                let mut verdict = if outcome.holds() { "ok" } else { "FAILED" };
                if !outcome.holds() {
                    // A provoked latency depends on a shared machine's timing; a run that fails
                    // is run once more and both lines are shown. Twice failed fails the test.
                    let first = format!(
                        "first try failed: {}/{} expected, {} unknown; {}\n       {}",
                        outcome.expected,
                        outcome.stalls.len(),
                        outcome.unknown,
                        names(&outcome.stalls),
                        outcome.context
                    );
                    eprintln!(
                        "retry  {} {} {threshold}: {first}",
                        scenario.name, build.name
                    );
                    let _ = writeln!(
                        table,
                        "retry  {} {} {threshold}: {first}",
                        scenario.name, build.name
                    );
                    retried += 1;
                    outcome = run_scenario(scenario, build, threshold);
                    verdict = if outcome.holds() { "ok" } else { "FAILED" };
                }
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
                    failures.push(format!("{line}\n       {}", outcome.context));
                }
            }
        }
    }
    eprintln!("{retried} run(s) of the matrix needed a second try");
    // The failures come last: a truncated log keeps its end.
    assert!(
        failures.is_empty(),
        "the whole matrix:\n{table}\n{} of the matrix failed twice:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
