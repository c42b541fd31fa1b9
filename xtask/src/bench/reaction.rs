//! How fast the profiler's userspace turns samples into stacks, and how soon an alert follows a
//! stall.
use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use stallprof_testkit::{Profiler, RedisServer};

/// Keys scanned by each CPU-bound stall (`KEYS` with a pattern that matches none).
pub const KEYS: u32 = 1_000_000;
/// CPU-bound stalls sampled for the userspace figures.
pub const SCANS: usize = 30;
/// Stalls timed for the alert figures.
pub const ALERTS: usize = 5;
pub const ALERT_THRESHOLD: Duration = Duration::from_millis(100);
pub const ALERT_STALL: Duration = Duration::from_millis(300);

/// The profiler's own account of its work on stacks (the `profiler` object of its summary).
pub struct UserspaceSpeed {
    pub stacks_unwound: u64,
    pub unwind_us: u64,
    pub samples_symbolized: u64,
    pub symbolize_us: u64,
    pub peak_rss_kib: u64,
}

impl UserspaceSpeed {
    pub fn unwind_us_each(&self) -> f64 {
        self.unwind_us as f64 / self.stacks_unwound.max(1) as f64
    }

    pub fn symbolize_us_each(&self) -> f64 {
        self.symbolize_us as f64 / self.samples_symbolized.max(1) as f64
    }

    /// Stacks unwound and symbolized per second on one core.
    pub fn stacks_per_second(&self) -> f64 {
        1e6 / (self.unwind_us_each() + self.symbolize_us_each()).max(f64::MIN_POSITIVE)
    }
}

/// How long after the fact each alert line appeared, in ms.
pub struct AlertTimes {
    pub in_progress_ms: Vec<f64>,
    pub final_ms: Vec<f64>,
}

/// Unwinding and symbolizing speed on real samples: CPU-bound stalls sampled at 999 Hz, and
/// the profiler's own account of the time it spent on them (`profiler` in its summary).
pub fn userspace_speed(redis: &RedisServer) -> anyhow::Result<UserspaceSpeed> {
    redis.cli(&["DEBUG", "POPULATE", &KEYS.to_string()]);
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--freq",
        "999",
        "--interval",
        "60s",
    ]);
    let mut client = redis.client();
    for _ in 0..SCANS {
        let _: Vec<String> = redis::cmd("KEYS")
            .arg("no-such-key-*")
            .query(&mut client)
            .context("KEYS")?;
    }
    let run = profiler.stop();
    redis.cli(&["FLUSHALL"]);
    let summary = run.summary();
    let field = |name: &str| {
        summary
            .pointer(&format!("/profiler/{name}"))
            .and_then(|value| value.as_u64())
            .unwrap_or(0)
    };
    let speed = UserspaceSpeed {
        stacks_unwound: field("stacks_unwound"),
        unwind_us: field("unwind_us"),
        samples_symbolized: field("samples_symbolized"),
        symbolize_us: field("symbolize_us"),
        peak_rss_kib: field("peak_rss_kib"),
    };
    eprintln!("bench: userspace {:.0} stacks/s", speed.stacks_per_second());
    Ok(speed)
}

/// New JSON lines of a file, as they are written.
struct Tail {
    reader: BufReader<File>,
    partial: String,
}

impl Tail {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let mut tail = Self {
            reader: BufReader::new(File::open(path)?),
            partial: String::new(),
        };
        while tail.next_line()?.is_some() {}
        Ok(tail)
    }

    /// The next complete line, if one was written.
    fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        self.reader.read_line(&mut self.partial)?;
        if self.partial.ends_with('\n') {
            return Ok(Some(std::mem::take(&mut self.partial)));
        }
        Ok(None)
    }
}

/// From a stall's end to its `final` alert line, and from the iteration passing `--alert` to
/// its `in_progress` alert line, as a reader of the JSON file sees them.
pub fn time_to_alert(redis: &RedisServer) -> anyhow::Result<AlertTimes> {
    let directory = tempfile::tempdir()?;
    let json = directory.path().join("alerts.jsonl");
    let profiler = Profiler::attach_writing(
        &[
            "--pid",
            &redis.pid().to_string(),
            "--alert",
            &format!("{}ms", ALERT_THRESHOLD.as_millis()),
            "--interval",
            "60s",
        ],
        &json,
    );
    let mut tail = Tail::open(&json)?;
    let (mut in_progress_ms, mut final_ms) = (Vec::new(), Vec::new());
    for _ in 0..ALERTS {
        let mut client = redis.client();
        let sent = Instant::now();
        let stall = thread::spawn(move || {
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(ALERT_STALL.as_secs_f64())
                .query(&mut client);
            Instant::now()
        });
        let (mut in_progress_at, mut final_at) = (None, None);
        let deadline = sent + ALERT_STALL + Duration::from_secs(3);
        while final_at.is_none() && Instant::now() < deadline {
            match tail.next_line()? {
                Some(line) if line.contains(r#""state":"in_progress""#) => {
                    in_progress_at.get_or_insert(Instant::now());
                }
                Some(line) if line.contains(r#""state":"final""#) => {
                    final_at = Some(Instant::now())
                }
                Some(_) => {}
                None => thread::sleep(Duration::from_micros(200)),
            }
        }
        let replied = stall.join().expect("the stalling client");
        let since = |seen: Option<Instant>, from: Instant| {
            seen.map(|seen| seen.saturating_duration_since(from).as_secs_f64() * 1e3)
        };
        in_progress_ms.extend(since(in_progress_at, sent + ALERT_THRESHOLD));
        final_ms.extend(since(final_at, replied));
        thread::sleep(Duration::from_millis(200));
    }
    profiler.stop();
    Ok(AlertTimes {
        in_progress_ms,
        final_ms,
    })
}
