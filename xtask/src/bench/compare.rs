//! `cargo xtask compare-poll OTHER [ROUNDS]`: the added cost per poll of another build of the
//! profiler (`OTHER`, e.g. the binary of an earlier commit) and of this workspace's, measured
//! side by side in alternation on the same poll loop, with the kernel's own run time of
//! `poll_entry` (`bpf_stats`, which adds its own clock reads to every run). Builds measured
//! minutes apart on a shared VM differ by more than the change: this is the fair comparison.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;

use super::{BpfStats, PollLoop, median, program_stats};

/// How long a profiler gets to attach before its round is measured.
const ATTACH_TIME: Duration = Duration::from_millis(2500);

/// The figures of one build over the rounds.
struct BuildFigures {
    name: String,
    binary: PathBuf,
    added_ns: Vec<f64>,
    poll_entry_ns_per_run: Vec<f64>,
}

pub fn run(other: &Path, rounds: usize) -> anyhow::Result<()> {
    let ours = stallprof_testkit::profiler_bin();
    let mut builds = [
        BuildFigures::new("other", other),
        BuildFigures::new("this workspace", &ours),
    ];
    let _stats = BpfStats::enable()?;
    let mut poll_loop = PollLoop::start()?;
    let pid = poll_loop.child.id();
    for round in 0..rounds {
        // Each round starts with the other build than the last one did.
        for index in [round % 2, 1 - round % 2] {
            builds[index].measure(&mut poll_loop, pid)?;
        }
    }
    for build in &builds {
        println!(
            "{}: added ns per poll median {:.1} (min {:.1}); poll_entry ns per run median {:.0} ({})",
            build.name,
            median(&build.added_ns),
            build.added_ns.iter().copied().fold(f64::MAX, f64::min),
            median(&build.poll_entry_ns_per_run),
            build.binary.display()
        );
    }
    Ok(())
}

impl BuildFigures {
    fn new(name: &str, binary: &Path) -> Self {
        Self {
            name: name.to_owned(),
            binary: binary.to_owned(),
            added_ns: Vec::new(),
            poll_entry_ns_per_run: Vec::new(),
        }
    }

    /// One round: the loop alone, then with this build attached.
    fn measure(&mut self, poll_loop: &mut PollLoop, pid: u32) -> anyhow::Result<()> {
        let alone = poll_loop.fastest_ns_per_poll()?;
        let mut profiler = Command::new(&self.binary)
            .args([
                "attach",
                "--pid",
                &pid.to_string(),
                "--force",
                "--interval",
                "60s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        thread::sleep(ATTACH_TIME);
        let before = poll_entry_stats(profiler.id())?;
        let with = poll_loop.fastest_ns_per_poll()?;
        let after = poll_entry_stats(profiler.id())?;
        // SAFETY: signals our own child, the profiler, which then detaches and exits.
        unsafe { libc::kill(profiler.id() as i32, libc::SIGINT) };
        profiler.wait()?;
        let (ns, runs) = (after.0 - before.0, (after.1 - before.1).max(1));
        self.added_ns.push(with - alone);
        self.poll_entry_ns_per_run.push(ns as f64 / runs as f64);
        eprintln!(
            "compare-poll: {}: alone {alone:.1} ns, with {with:.1} ns, poll_entry {:.0} ns per run",
            self.name,
            ns as f64 / runs as f64
        );
        Ok(())
    }
}

/// `(run_time_ns, run_cnt)` of the profiler's `poll_entry` program.
fn poll_entry_stats(pid: u32) -> anyhow::Result<(u64, u64)> {
    program_stats(pid)?
        .into_iter()
        .find(|(name, _)| name == "poll_entry")
        .map(|(_, stats)| stats)
        .context("the profiler has no poll_entry program")
}
