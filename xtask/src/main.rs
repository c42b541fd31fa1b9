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
mod demo;
mod ping_pong;
mod poll_loop;
mod soak;
mod unrelated;

/// Debian packages: LLVM 22 for bpf-linker, Redis for the tests and the demo, iproute2 for
/// network namespaces, util-linux for unshare/setpriv, curl to scrape the metrics in tests,
/// perf for the benchmark's comparison, systemd for `systemd-analyze verify` of the example
/// unit, golang-go for `go tool pprof`.
const APT_PACKAGES: [&str; 14] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "redis-server",
    "redis-tools",
    "iproute2",
    "util-linux",
    "curl",
    "linux-perf",
    // Building the Redis of a source distribution, for the attribution matrix.
    "make",
    "gcc",
    "systemd",
    // `go tool pprof`, to read back the --pprof output in a test.
    "golang-go",
];
/// The target of the static binary `cargo xtask dist` builds.
const DIST_TARGET: &str = "x86_64-unknown-linux-musl";
/// The bpf-linker release that builds against LLVM 22 (see PLATFORM.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

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
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker, the extra Redis
    /// and Valkey builds; mount tracefs.
    Setup,
    /// Build, start a throwaway redis-server, make it stall, profile it, write the report.
    Demo,
    /// Build and run every test (unit and integration, against real redis-servers).
    Test,
    /// Measure the profiler's cost and speed and write BENCHMARKS.md.
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
    /// profiler and with OTHER (another build's binary) when given; writes BENCHMARKS.md's
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
        Task::Setup => setup(),
        Task::Demo => {
            setup()?;
            build()?;
            demo::run(&workspace_root().join("stallprof-demo"))
        }
        Task::Test => {
            setup()?;
            build()?;
            dist()?;
            test()
        }
        Task::Dist => {
            setup()?;
            dist().map(|path| eprintln!("xtask: static binary at {}", path.display()))
        }
        Task::Bench => {
            setup()?;
            build()?;
            bench::run(&workspace_root())
        }
        Task::ComparePoll { other, rounds } => {
            setup()?;
            build()?;
            bench::compare::run(&other, rounds)
        }
        Task::HostTax { other, rounds } => {
            setup()?;
            build()?;
            bench::host_tax::run(&workspace_root(), other.as_deref(), rounds)
        }
        Task::SwitchCost => {
            setup()?;
            build()?;
            bench::switches::measure().map(drop)
        }
        Task::KernelSide => {
            setup()?;
            build()?;
            bench::print_kernel_side()
        }
        Task::MemoryCost => {
            setup()?;
            build()?;
            bench::memory::measure().map(drop)
        }
        Task::Soak { minutes } => {
            setup()?;
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

/// Installs what is missing: Debian packages, nightly `rust-src`, bpf-linker, the extra server
/// builds; mounts tracefs.
fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .into_iter()
        .filter(|package| {
            !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .contains("install ok installed")
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let installed = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !installed
        .lines()
        .any(|component| component.starts_with("rust-src"))
    {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if !stdout_of(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION) {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)"
        );
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path))?;
    }

    builds::fetch();

    let tracefs = Path::new("/sys/kernel/tracing");
    if std::fs::read_dir(tracefs)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(true)
    {
        eprintln!("xtask: mounting tracefs at {}", tracefs.display());
        run(Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(tracefs))?;
    }
    Ok(())
}

/// `cargo build --release` at the root: the eBPF object and the profiler.
fn build() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet"])
        .current_dir(workspace_root()))
}

/// Builds the static binary for [`DIST_TARGET`] (adding the target to the toolchain if it is
/// missing) and copies it to `target/dist/`, which it returns.
fn dist() -> anyhow::Result<PathBuf> {
    let installed = stdout_of(Command::new("rustup").args(["target", "list", "--installed"]));
    if !installed.lines().any(|target| target.trim() == DIST_TARGET) {
        eprintln!("xtask: adding the {DIST_TARGET} target");
        run(Command::new("rustup").args(["target", "add", DIST_TARGET]))?;
    }
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

/// Every test: unit tests, then the integration tests against real redis-servers.
fn test() -> anyhow::Result<()> {
    let root = workspace_root();
    let binary = root.join("target/release/redis-stallprof");
    run(Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "profiler-common",
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
        ))
}
