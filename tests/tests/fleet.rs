//! `--all` on a host as a fleet runs it: processes named like Redis that are not, servers by
//! the hundred starting and ending. Every test here watches the whole host, so they run one at
//! a time (this file is its own test binary: the other files' servers are not running).
use std::{
    collections::HashSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, free_port, number, scrape_metrics};

/// One `--all` test at a time.
static HOST: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HOST.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Redis and Valkey servers running on the host now (not forks of one).
fn servers_running() -> usize {
    let comm = |pid: &str| fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let is_server = |comm: &str| matches!(comm.trim(), "redis-server" | "valkey-server");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .filter(|pid| pid.parse::<u32>().is_ok() && is_server(&comm(pid)))
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
                .unwrap_or_default();
            !is_server(&comm(&parent))
        })
        .count()
}

/// The records of `pid` of one type.
fn of_pid<'a>(records: &'a [Value], kind: &str, pid: u32) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|record| record["type"] == kind)
        .filter(|record| record["pid"] == pid || record["instance"]["pid"] == pid)
        .collect()
}

/// Waits up to 5 s for `done`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A fake server: a C program built as `DIR/redis-server`, mapping `file` executable.
struct FakeServer {
    child: Child,
}

impl FakeServer {
    fn start(dir: &Path, file: &Path) -> Self {
        let binary = dir.join("redis-server");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_server.c");
        let built = Command::new("cc")
            .args(["-O1", "-o"])
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("run cc");
        assert!(built.success(), "cc {}", source.display());
        let mut child = Command::new(&binary)
            .arg(file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "mapped");
        Self { child }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Watches `path` for opens and reads (inotify); `opened` says whether any came since.
struct FileWatch {
    fd: i32,
}

impl FileWatch {
    fn new(path: &Path) -> Self {
        let path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: inotify calls with a path we own; the descriptor is closed on drop.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0);
            assert!(
                libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) >= 0
            );
            Self { fd }
        }
    }

    fn opened(&self) -> bool {
        let mut buffer = [0u8; 4096];
        // SAFETY: reads into our own buffer of the size given.
        let read = unsafe { libc::read(self.fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        read > 0
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        // SAFETY: closes our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

#[test]
fn a_process_named_like_redis_takes_no_slot_and_none_of_its_files_is_read() {
    let _host = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // A large sparse file the fake maps: reading it whole would take the profiler minutes.
    let planted = dir.path().join("planted.so");
    fs::File::create(&planted)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let fake = FakeServer::start(dir.path(), &planted);
    let watch = FileWatch::new(&planted);
    // Room for the servers already running and one more: the fake must not take it.
    let max_targets = (servers_running() + 1).to_string();
    let json = dir.path().join("fake.jsonl");
    // Loaded, and two looks for servers.
    let profiler = Profiler::start_writing(
        &["--all", "--max-targets", &max_targets],
        &json,
        Duration::from_secs(3),
    );
    let redis = RedisServer::start(&[]);
    wait_until("the real server's attached record", || {
        !of_pid(&profiler.records(), "attached", redis.pid()).is_empty()
    });
    redis.cli(&["DEBUG", "SLEEP", "0.05"]);
    thread::sleep(Duration::from_millis(200));
    let run = profiler.stop();
    let fake_pid = fake.child.id();
    drop(fake);

    assert!(run.status.success(), "{}", run.stderr);
    // The sleep's stall, and no other but (a known limit, see the guide) the iteration a
    // server just picked up by --all was in before its `attached` record.
    let attached_at = of_pid(&run.records, "attached", redis.pid())[0]["time"]
        .as_str()
        .unwrap()
        .to_owned();
    let stalls: Vec<&Value> = of_pid(&run.records, "stall", redis.pid())
        .into_iter()
        .filter(|stall| stall["time"].as_str().unwrap() >= attached_at.as_str())
        .collect();
    assert_eq!(stalls.len(), 1, "{}", run.stderr);
    assert_eq!(stalls[0]["origin"], "command:debug", "{}", run.stderr);
    assert!(
        of_pid(&run.records, "attached", fake_pid).is_empty(),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "process {fake_pid} is named `redis-server` but its executable is not a Redis"
        )),
        "{}",
        run.stderr
    );
    assert!(
        !watch.opened(),
        "the profiler opened or read the file the fake maps"
    );
}

/// The profiler's resident memory, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The `pid` label values of every series on the metrics page.
fn pids_in_metrics(page: &str) -> HashSet<String> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (_, rest) = line.split_once("pid=\"")?;
            Some(rest.split_once('"')?.0.to_owned())
        })
        .collect()
}

#[test]
fn two_hundred_short_lived_servers_leave_memory_flat_and_only_live_series() {
    let _host = one_at_a_time();
    const BATCHES: usize = 20;
    const PER_BATCH: usize = 10;
    let metrics_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let json: PathBuf = dir.path().join("fleet.jsonl");
    let profiler = Profiler::start_writing(
        &[
            "--all",
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
            "--interval",
            "1s",
        ],
        &json,
        Duration::from_secs(3),
    );
    let keeper = RedisServer::start(&[]);
    let mut resident_after = Vec::new();
    let mut churned = Vec::new();
    for _ in 0..BATCHES {
        let batch: Vec<RedisServer> = (0..PER_BATCH).map(|_| RedisServer::start(&[])).collect();
        for server in &batch {
            wait_until("a churned server's attached record", || {
                !of_pid(&profiler.records(), "attached", server.pid()).is_empty()
            });
            // Something to remember: a client, a stall.
            server.cli(&["SET", "k", "v"]);
        }
        batch[0].cli(&["DEBUG", "SLEEP", "0.02"]);
        let pids: Vec<u32> = batch.iter().map(RedisServer::pid).collect();
        drop(batch);
        for &pid in &pids {
            wait_until("a churned server's summary", || {
                !of_pid(&profiler.records(), "summary", pid).is_empty()
            });
        }
        churned.extend(pids);
        resident_after.push(resident_kib(profiler.pid()));
    }
    let page = scrape_metrics(metrics_port);
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    eprintln!("profiler resident KiB after each batch of {PER_BATCH}: {resident_after:?}");

    // The second half: flat within 4 MiB (the allocator's slack), whatever was churned.
    let second_half = &resident_after[BATCHES / 2..];
    let (low, high) = (
        second_half.iter().min().unwrap(),
        second_half.iter().max().unwrap(),
    );
    assert!(high - low <= 4 * 1024, "resident KiB: {resident_after:?}");
    // The metrics name the live server only.
    let named = pids_in_metrics(&page);
    assert!(named.contains(&keeper.pid().to_string()), "{named:?}");
    let stale: Vec<&u32> = churned
        .iter()
        .filter(|pid| named.contains(&pid.to_string()))
        .collect();
    let stale_lines: Vec<&str> = page
        .lines()
        .filter(|line| {
            stale
                .iter()
                .any(|pid| line.contains(&format!("pid=\"{pid}\"")))
        })
        .collect();
    assert!(
        stale.is_empty(),
        "series of exited servers remain: {stale_lines:#?}"
    );
    let summaries: Vec<&Value> = run.of_type("summary");
    assert_eq!(summaries.len(), BATCHES * PER_BATCH + 1);
    assert_eq!(
        number(
            &run.records
                .iter()
                .filter(|r| r["type"] == "attached")
                .count()
                .into()
        ),
        (BATCHES * PER_BATCH + 1) as u64
    );
}
