//! `cargo xtask host-tax [OTHER_BINARY] [ROUNDS]`: what a profiler costs the processes it does
//! not watch, and the loop it does. Small loops pinned to CPU 1 time an unrelated process's
//! system call (`getppid`), page fault (a first write to a fresh anonymous page) and pipe round
//! trip (two context switches); the watched loop is the poll microbenchmark (`xtask
//! poll-loop`) pinned to CPU 0, with 15 idle Redis servers beside it. Each round measures, in
//! turn, with no profiler, with this build watching the loop alone (1 watched) and the loop
//! and the 15 servers (16 watched), and the same with `OTHER_BINARY` when given; the order
//! rotates from round to round. This VM's noise is one-sided (a figure is only ever slowed
//! down), so each figure is the fastest over the rounds; the pipe round trip makes four
//! system calls besides its two context switches, so the cost per context switch is given
//! with the system calls' toll taken out. Written to docs/BENCHMARKS.md ("Host tax").
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use stallprof_testkit::RedisServer;

use super::{PollLoop, pin};

/// Idle servers watched beside the loop in the "16 watched" figures.
const OTHER_SERVERS: usize = 15;
/// Runs per figure (the fastest is kept) and their sizes.
const RUNS: usize = 5;
const SYSCALLS: u64 = 1_000_000;
const FAULT_PAGES: u64 = 20_000;
const ROUND_TRIPS: u64 = 50_000;
/// The heading of the section written into BENCHMARKS.md.
pub const SECTION: &str = "## Host tax";

/// One way of running during a round.
struct Condition {
    label: String,
    /// The profiler binary, none for no profiler.
    binary: Option<PathBuf>,
    /// Servers watched besides the loop.
    servers: usize,
    /// Further arguments of the profiler.
    args: &'static [&'static str],
    figures: Vec<Figures>,
}

/// What one measurement gives, in ns per operation.
#[derive(Clone, Copy)]
struct Figures {
    syscall: f64,
    fault: f64,
    round_trip: f64,
    poll: f64,
}

pub fn run(root: &Path, other: Option<&Path>, rounds: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let servers: Vec<RedisServer> = (0..OTHER_SERVERS)
        .map(|_| RedisServer::start(&[]))
        .collect();
    for server in &servers {
        pin(server.pid(), 0)?;
    }
    let mut poll_loop = PollLoop::start()?;
    let ours = stallprof_testkit::profiler_bin();
    let mut conditions = vec![condition("no profiler", None, 0, &[])];
    for (name, binary) in std::iter::once(("this build", ours.as_path()))
        .chain(other.into_iter().map(|binary| ("the other build", binary)))
    {
        conditions.push(condition(
            &format!("{name}, 1 watched"),
            Some(binary),
            0,
            &[],
        ));
        conditions.push(condition(
            &format!("{name}, 16 watched"),
            Some(binary),
            OTHER_SERVERS,
            &[],
        ));
    }
    // The one host-wide program a flag adds: `sys_enter_read`, on every read of the host.
    conditions.push(condition(
        "this build, 1 watched, `--clients exact`",
        Some(ours.as_path()),
        0,
        &["--clients", "exact"],
    ));
    for round in 0..rounds {
        for step in 0..conditions.len() {
            let index = (round + step) % conditions.len();
            let condition = &mut conditions[index];
            let figures = measure(condition, &mut poll_loop, &servers)?;
            eprintln!(
                "host-tax: round {} {}: getppid {:.1} ns, fault {:.1} ns, round trip {:.1} ns, \
                 poll {:.1} ns",
                round + 1,
                condition.label,
                figures.syscall,
                figures.fault,
                figures.round_trip,
                figures.poll
            );
            condition.figures.push(figures);
        }
    }
    let section = render(&conditions, other, rounds, started.elapsed());
    println!("{section}");
    let path = root.join("docs/BENCHMARKS.md");
    let existing = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, with_section(&existing, &section))?;
    eprintln!("host-tax: written to {}", path.display());
    Ok(())
}

fn condition(
    label: &str,
    binary: Option<&Path>,
    servers: usize,
    args: &'static [&'static str],
) -> Condition {
    Condition {
        label: label.to_owned(),
        binary: binary.map(Path::to_owned),
        servers,
        args,
        figures: Vec::new(),
    }
}

/// The figures with `condition`'s profiler attached (or none).
fn measure(
    condition: &Condition,
    poll_loop: &mut PollLoop,
    servers: &[RedisServer],
) -> anyhow::Result<Figures> {
    let profiler = match &condition.binary {
        Some(binary) => Some(Attached::start(
            binary,
            poll_loop.child.id(),
            &servers[..condition.servers],
            condition.args,
        )?),
        None => None,
    };
    let figures = Figures {
        syscall: fastest("syscall-loop", SYSCALLS)?,
        fault: fastest("fault-loop", FAULT_PAGES)?,
        round_trip: fastest("ping-pong", ROUND_TRIPS)?,
        poll: poll_loop.fastest_ns_per_poll()?,
    };
    drop(profiler);
    Ok(figures)
}

/// A profiler watching the poll loop (`--force`) and `servers`, attached to all of them.
struct Attached {
    child: Child,
    _json: tempfile::NamedTempFile,
}

impl Attached {
    fn start(
        binary: &Path,
        poll_loop: u32,
        servers: &[RedisServer],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let json = tempfile::NamedTempFile::new()?;
        let mut command = Command::new(binary);
        command
            .args(["attach", "--force", "--interval", "600s"])
            .args(args)
            .arg("--pid")
            .arg(poll_loop.to_string())
            .arg("--json")
            .arg(json.path());
        for server in servers {
            command.args(["--pid", &server.pid().to_string()]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let attached = Self { child, _json: json };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(attached._json.path()).unwrap_or_default();
            if text.matches("\"type\":\"attached\"").count() > servers.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not attach to its targets", binary.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(attached)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: signals our own child, the profiler.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// The least ns per operation over [`RUNS`] runs of `xtask LOOP N` on CPU 1.
fn fastest(name: &str, size: u64) -> anyhow::Result<f64> {
    let mut fastest = f64::MAX;
    for _ in 0..RUNS {
        let output = Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::current_exe()?)
            .args([name, &size.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {name}"))?;
        if !output.status.success() {
            bail!("{name} failed: {:?}", output.status);
        }
        let ns: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{name} output"))?;
        fastest = fastest.min(ns);
    }
    Ok(fastest)
}

/// A column of the table: its heading and its figure.
type Column = (&'static str, fn(&Figures) -> f64);

/// System calls in one pipe round trip (each side writes and reads once).
const SYSCALLS_PER_ROUND_TRIP: f64 = 4.0;

/// The section's Markdown.
fn render(conditions: &[Condition], other: Option<&Path>, rounds: usize, took: Duration) -> String {
    let fastest = |condition: &Condition, pick: fn(&Figures) -> f64| {
        condition.figures.iter().map(pick).fold(f64::MAX, f64::min)
    };
    let columns: [Column; 4] = [
        ("`getppid` (ns)", |f| f.syscall),
        ("page fault (ns)", |f| f.fault),
        ("pipe round trip, 2 switches (ns)", |f| f.round_trip),
        ("watched loop's poll (ns)", |f| f.poll),
    ];
    let baseline = &conditions[0];
    let mut text = format!(
        "{SECTION}\n\nWritten by `cargo xtask host-tax{}` on {} ({}): {rounds} rounds in \
         alternation; in each, the fastest of {RUNS} runs of {SYSCALLS} `getppid` calls, \
         {FAULT_PAGES} first writes to fresh anonymous pages and {ROUND_TRIPS} pipe round trips \
         by processes pinned to CPU 1 that nobody watches, and of the watched poll loop on CPU 0 \
         (`xtask poll-loop`, `--force`); each figure is the fastest over the rounds (this VM's \
         noise only ever slows a run). \"1 watched\": the loop alone; \"16 watched\": the loop \
         and {OTHER_SERVERS} idle Redis servers on CPU 0. Each cell: ns, then the change against \
         no profiler. \"Per context switch\": the round trip's change less the toll of its four \
         system calls (the `getppid` change), halved; with `--clients exact`, whose program \
         runs on every `read` of the host, the round trip's two reads pay it too. The \
         measurements took {:.0} s.\n\n",
        other.map_or(String::new(), |other| format!(" {}", other.display())),
        super::today(),
        super::machine(),
        took.as_secs_f64()
    );
    text += "| profiler |";
    for (name, _) in &columns {
        text += &format!(" {name} |");
    }
    text += " per context switch (ns) |\n|---|";
    text += &"---|".repeat(columns.len() + 1);
    text += "\n";
    for condition in conditions {
        text += &format!("| {} |", condition.label);
        for (_, pick) in &columns {
            let value = fastest(condition, *pick);
            let alone = fastest(baseline, *pick);
            if std::ptr::eq(condition, baseline) {
                text += &format!(" {value:.1} |");
            } else {
                let change = value - alone;
                text += &format!(
                    " {value:.1} ({change:+.1}, {:+.1}%) |",
                    100.0 * change / alone.max(1.0)
                );
            }
        }
        let change = |pick: fn(&Figures) -> f64| fastest(condition, pick) - fastest(baseline, pick);
        let per_switch =
            (change(|f| f.round_trip) - SYSCALLS_PER_ROUND_TRIP * change(|f| f.syscall)) / 2.0;
        if std::ptr::eq(condition, baseline) {
            text += " |\n";
        } else {
            text += &format!(" {per_switch:+.1} |\n");
        }
    }
    text
}

/// `document` with its `SECTION` replaced by `section` (appended if it has none).
pub fn with_section(document: &str, section: &str) -> String {
    let Some(start) = document.find(SECTION) else {
        return format!("{}\n\n{section}", document.trim_end());
    };
    let after = &document[start + SECTION.len()..];
    let end = after
        .find("\n## ")
        .map_or(document.len(), |end| start + SECTION.len() + end + 1);
    format!("{}{section}\n{}", &document[..start], &document[end..])
}
