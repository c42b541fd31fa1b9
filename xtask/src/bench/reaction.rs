//! How fast the profiler's userspace turns samples into stacks, and how soon an alert follows a
//! stall.
use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, BufReader},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use stallprof_testkit::{Profiler, RedisServer};

/// Keys scanned by each CPU-bound stall (`KEYS` with a pattern that matches none).
const KEYS: u32 = 1_000_000;
/// CPU-bound stalls sampled for the userspace figures.
const SCANS: usize = 30;
/// Stalls timed for the alert figures.
const ALERTS: usize = 5;
const ALERT_THRESHOLD: Duration = Duration::from_millis(100);
const ALERT_STALL: Duration = Duration::from_millis(300);

/// Unwinding and symbolizing speed on real samples: CPU-bound stalls sampled at 999 Hz, and
/// the profiler's own account of the time it spent on them (`profiler` in its summary).
pub fn userspace_speed(redis: &RedisServer, report: &mut String) -> anyhow::Result<()> {
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
    let (stacks, unwind_us) = (field("stacks_unwound"), field("unwind_us"));
    let (samples, symbolize_us) = (field("samples_symbolized"), field("symbolize_us"));
    let per_stack_us =
        unwind_us as f64 / stacks.max(1) as f64 + symbolize_us as f64 / samples.max(1) as f64;
    writeln!(report, "## Userspace speed\n")?;
    writeln!(
        report,
        "{SCANS} CPU-bound stalls (`KEYS no-such-key-*` over {KEYS} keys) under `attach --freq 999`; the \
         profiler times its own unwinding and symbolizing (the `profiler` object of its summary), on one thread.\n"
    )?;
    writeln!(
        report,
        "| stacks unwound | µs each | samples symbolized | µs each | stacks per second on one core | peak RSS |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    writeln!(
        report,
        "| {stacks} | {:.1} | {samples} | {:.1} | {:.0} | {:.1} MiB |\n",
        unwind_us as f64 / stacks.max(1) as f64,
        symbolize_us as f64 / samples.max(1) as f64,
        1e6 / per_stack_us.max(f64::MIN_POSITIVE),
        field("peak_rss_kib") as f64 / 1024.0
    )?;
    eprintln!(
        "bench: userspace {:.0} stacks/s",
        1e6 / per_stack_us.max(f64::MIN_POSITIVE)
    );
    Ok(())
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
pub fn time_to_alert(redis: &RedisServer, report: &mut String) -> anyhow::Result<()> {
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
    let describe = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        match (values.get(values.len() / 2), values.last()) {
            (Some(median), Some(max)) => {
                format!("{median:.1} | {max:.1} | {}/{ALERTS}", values.len())
            }
            _ => format!("- | - | 0/{ALERTS}"),
        }
    };
    writeln!(report, "## Time to alert\n")?;
    writeln!(
        report,
        "`attach --alert {}ms --json FILE`, {ALERTS} stalls of `DEBUG SLEEP {}`; a reader polling the file every \
         0.2 ms notes when each alert line appears.\n",
        ALERT_THRESHOLD.as_millis(),
        ALERT_STALL.as_secs_f64()
    )?;
    writeln!(report, "| alert | from | median ms | max ms | seen |")?;
    writeln!(report, "|---|---|---|---|---|")?;
    writeln!(
        report,
        "| `in_progress` | the iteration passing {} ms (command sent + {} ms) | {} |",
        ALERT_THRESHOLD.as_millis(),
        ALERT_THRESHOLD.as_millis(),
        describe(&mut in_progress_ms)
    )?;
    writeln!(
        report,
        "| `final` | the stall's end (the client has its reply) | {} |\n",
        describe(&mut final_ms)
    )?;
    Ok(())
}
