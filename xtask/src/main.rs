//! `cargo xtask setup | demo | test | bench | soak`: everything a fresh machine needs, done by the
//! project.
//! Every step checks first and skips what is already there, so a second run is quick.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod builds;
mod deb;
mod demo;
mod ebpf;
mod install_check;
mod ping_pong;
mod poll_loop;
mod setup;
mod soak;
mod unrelated;

use setup::{DIST_TARGET, Purpose, setup};

/// Set-up, demo, test and benchmark tasks for redis-stallprof; each installs what is missing
/// first.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what a task needs and is missing: `demo` (Redis), `dev` (and what rebuilds the
    /// kernel programs: nightly rust-src, LLVM, bpf-linker) or `test` (all of it, and what the
    /// tests check outputs with, the matrix's extra Redis and Valkey builds, cargo-deb).
    Setup {
        #[arg(long = "for", value_enum, default_value = "test")]
        purpose: Purpose,
    },
    /// Build, start a throwaway redis-server, make it stall, profile it, write the report.
    Demo,
    /// Build and run every test (unit and integration, against real redis-servers).
    Test,
    /// Measure the profiler's cost and speed and write docs/BENCHMARKS.md.
    Bench,
    /// Compare the added cost per poll of another build of the profiler with this one's, side
    /// by side in alternation.
    ComparePoll {
        /// The other build's `redis-stallprof` binary (e.g. built at an earlier commit).
        other: PathBuf,
        /// Alternations.
        #[arg(default_value_t = 6)]
        rounds: usize,
    },
    /// Measure what the profiler costs processes it does not watch (system call, page fault,
    /// context switch) and its watched loop's poll, side by side in alternation with no
    /// profiler and with OTHER (another build's binary) when given; writes docs/BENCHMARKS.md's
    /// "Host tax".
    HostTax {
        /// Another build's `redis-stallprof` binary to compare with.
        other: Option<PathBuf>,
        /// Rounds of alternation.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Measure only what watching idle servers adds per context switch (printed, not written).
    SwitchCost,
    /// Measure only the kernel programs' run time under load (printed, not written; set
    /// REDIS_STALLPROF_BIN to measure another build).
    KernelSide,
    /// Measure only the cost of tracing page faults while Redis's memory grows (printed, not
    /// written).
    MemoryCost,
    /// Build the static binary (x86_64 musl, the eBPF object embedded) into target/dist/.
    Dist,
    /// Build the Debian package (cargo-deb) into target/deb/.
    Deb,
    /// Write the generated docs: the CLI reference, the man pages, the shell completions.
    Docs,
    /// Install the profiler with `cargo install --path profiler` using stable Rust alone (no
    /// nightly, LLVM or bpf-linker) and check the installed binary names a stall.
    InstallCheck,
    /// Compile the kernel programs (nightly, bpf-linker) into the committed object
    /// profiler-ebpf/redis-stallprof.bpf.o; with --check, fail unless it is current.
    BuildEbpf {
        /// Compile aside and compare with the committed object instead of replacing it.
        #[arg(long)]
        check: bool,
    },
    /// Profile a server under a long storm of stalls and check that memory stays bounded.
    Soak {
        /// How long, in minutes.
        minutes: Option<u64>,
    },
    /// The bench's poll microbenchmark target (not for people).
    #[command(hide = true)]
    PollLoop,
    /// The bench's context-switch microbenchmark: prints ns per round trip (not for people).
    #[command(hide = true)]
    PingPong {
        /// Round trips.
        round_trips: u64,
    },
    /// The host-tax bench's system-call loop: prints ns per `getppid` (not for people).
    #[command(hide = true)]
    SyscallLoop { calls: u64 },
    /// The host-tax bench's page-fault loop: prints ns per first write to a fresh page (not
    /// for people).
    #[command(hide = true)]
    FaultLoop { pages: u64 },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup { purpose } => setup(purpose),
        Task::Demo => {
            // The build needs the CPUs, the set-up the network: both at once.
            let build = spawn_profiler_build()?;
            setup(Purpose::Demo)?;
            finish_build(build)?;
            demo::run(&workspace_root().join("stallprof-demo"))
        }
        Task::Test => {
            setup(Purpose::Test)?;
            let root = workspace_root();
            ebpf::check(&root)?;
            build()?;
            let package = deb::build(&root)?;
            test(&package)?;
            install_check::run_check(&root)
        }
        Task::Deb => {
            setup::package_tools()?;
            deb::run_task(&workspace_root())
        }
        Task::Docs => run(Command::new("cargo")
            .args([
                "test",
                "--quiet",
                "-p",
                "redis-stallprof",
                "--test",
                "generated_docs",
            ])
            .env("REDIS_STALLPROF_WRITE_DOCS", "1")
            .current_dir(workspace_root())),
        Task::InstallCheck => {
            setup(Purpose::Demo)?;
            install_check::run_check(&workspace_root())
        }
        Task::BuildEbpf { check } => {
            setup(Purpose::Dev)?;
            if check {
                ebpf::check(&workspace_root())
            } else {
                ebpf::build(&workspace_root())
            }
        }
        Task::Dist => {
            setup(Purpose::Demo)?;
            dist().map(|path| eprintln!("xtask: static binary at {}", path.display()))
        }
        Task::Bench => {
            setup(Purpose::Test)?;
            build()?;
            bench::run(&workspace_root())
        }
        Task::ComparePoll { other, rounds } => {
            setup(Purpose::Test)?;
            build()?;
            bench::compare::run(&other, rounds)
        }
        Task::HostTax { other, rounds } => {
            setup(Purpose::Test)?;
            build()?;
            bench::host_tax::run(&workspace_root(), other.as_deref(), rounds)
        }
        Task::SwitchCost => {
            setup(Purpose::Test)?;
            build()?;
            bench::switches::measure().map(drop)
        }
        Task::KernelSide => {
            setup(Purpose::Test)?;
            build()?;
            bench::print_kernel_side()
        }
        Task::MemoryCost => {
            setup(Purpose::Test)?;
            build()?;
            bench::memory::measure().map(drop)
        }
        Task::Soak { minutes } => {
            setup(Purpose::Demo)?;
            build()?;
            soak::run(minutes)
        }
        Task::PollLoop => poll_loop::run(),
        Task::PingPong { round_trips } => ping_pong::run(round_trips),
        Task::SyscallLoop { calls } => unrelated::syscalls(calls),
        Task::FaultLoop { pages } => unrelated::faults(pages),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs `command`, failing with its description unless it succeeds.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn stdout_of(command: &mut Command) -> String {
    command
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

/// `cargo build --release` at the root: the profiler (its kernel programs the committed
/// object) and the tasks.
fn build() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet"])
        .current_dir(workspace_root()))
}

/// Starts building the profiler alone, in release mode (what the demo runs).
fn spawn_profiler_build() -> anyhow::Result<std::process::Child> {
    eprintln!("xtask: building redis-stallprof (release; two minutes the first time)");
    Command::new("cargo")
        .args(["build", "--release", "--quiet", "-p", "redis-stallprof"])
        .current_dir(workspace_root())
        .spawn()
        .context("cannot run cargo build")
}

/// Waits for the build `spawn_profiler_build` started.
fn finish_build(mut build: std::process::Child) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let status = build.wait()?;
    if !status.success() {
        bail!("cargo build --release -p redis-stallprof failed: {status}");
    }
    eprintln!(
        "xtask: redis-stallprof built ({:.0} s after the set-up)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds the static binary for [`DIST_TARGET`] (adding the target to the toolchain if it is
/// missing) and copies it to `target/dist/`, which it returns.
fn dist() -> anyhow::Result<PathBuf> {
    setup::dist_target()?;
    let root = workspace_root();
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet", "-p", "redis-stallprof"])
        .args(["--target", DIST_TARGET])
        .current_dir(&root))?;
    let dist = root.join("target/dist");
    std::fs::create_dir_all(&dist)?;
    let binary = dist.join("redis-stallprof");
    let built = root
        .join("target")
        .join(DIST_TARGET)
        .join("release/redis-stallprof");
    std::fs::copy(&built, &binary)
        .with_context(|| format!("cannot copy {} to {}", built.display(), binary.display()))?;
    Ok(binary)
}

/// Every test: unit tests, then the integration tests against real redis-servers (the static
/// binary's and the Debian `package`'s among them).
fn test(package: &Path) -> anyhow::Result<()> {
    let root = workspace_root();
    let binary = root.join("target/release/redis-stallprof");
    run(Command::new("cargo")
        .args([
            "test",
            "--release",
            // Every failure, not only the first test binary's.
            "--no-fail-fast",
            "-p",
            "redis-stallprof-common",
            "-p",
            "redis-stallprof",
            "-p",
            "integration-tests",
        ])
        .current_dir(&root)
        .env("REDIS_STALLPROF_BIN", binary)
        .env(
            "REDIS_STALLPROF_DIST_BIN",
            root.join("target/dist/redis-stallprof"),
        )
        .env("REDIS_STALLPROF_DEB", package))
}
