//! `cargo xtask setup [--for demo|dev|test]`: installs what a task needs and nothing more, one
//! line per step (the installers' own output goes to `target/xtask-setup.log`, and its end is
//! shown when a step fails). Every step checks first and skips what is already there, so a
//! second run is quick.
//!
//! - `demo`: Redis (`redis-server`, `redis-tools`) and tracefs; the profiler builds with stable
//!   Rust alone, its kernel programs being the committed object.
//! - `dev`: the demo's, and what recompiles the kernel programs (`cargo xtask build-ebpf`):
//!   nightly's `rust-src`, LLVM 22 and bpf-linker.
//! - `test` (the default): the dev's, and what the tests and benchmarks check outputs with
//!   (Chromium, Prometheus, `go tool pprof`, `rsvg-convert`, perf, systemd, ...), the extra
//!   Redis and Valkey builds of the attribution matrix, the musl target of the static binary
//!   and cargo-deb.
use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{builds, stdout_of, workspace_root};

/// What the machine is set up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Purpose {
    /// `cargo xtask demo`.
    Demo,
    /// Rebuilding the kernel programs (`cargo xtask build-ebpf`).
    Dev,
    /// `cargo xtask test` and the benchmarks.
    Test,
}

/// The Debian packages the demo needs.
const DEMO_PACKAGES: &[&str] = &["redis-server", "redis-tools"];
/// LLVM 22, to build bpf-linker against.
const DEV_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// What the tests and benchmarks use besides: network namespaces (iproute2), unshare and
/// setpriv (util-linux), metrics scrapes (curl), the benchmark's comparison (linux-perf),
/// building a source distribution's Redis (make, gcc), `systemd-analyze verify`,
/// `go tool pprof` (golang-go), flamegraphs as PNG (librsvg2-bin), the HTML report in a real
/// browser (chromium), the alert rules and a real scrape (prometheus).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "curl",
    "linux-perf",
    "make",
    "gcc",
    "systemd",
    "golang-go",
    "librsvg2-bin",
    "chromium",
    "prometheus",
];
/// The bpf-linker release that builds against LLVM 22 (see PLATFORM.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo-deb release `cargo xtask deb` uses.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The target of the static binary `cargo xtask dist` builds.
pub const DIST_TARGET: &str = "x86_64-unknown-linux-musl";

/// Installs what `purpose` needs.
pub fn setup(purpose: Purpose) -> anyhow::Result<()> {
    let mut steps: Vec<Step> = vec![apt_step(DEMO_PACKAGES), tracefs_step()];
    if purpose >= Purpose::Dev {
        steps.extend([apt_step(DEV_PACKAGES), rust_src_step(), bpf_linker_step()]);
    }
    if purpose == Purpose::Test {
        steps.extend([
            apt_step(TEST_PACKAGES),
            musl_step(),
            cargo_deb_step(),
            matrix_step(),
        ]);
    }
    install(steps)
}

/// Adds the static binary's target when it is missing.
pub fn dist_target() -> anyhow::Result<()> {
    install(vec![musl_step()])
}

/// What `cargo xtask deb` needs besides: the static binary's target and cargo-deb.
pub fn package_tools() -> anyhow::Result<()> {
    install(vec![musl_step(), cargo_deb_step()])
}

/// Runs each of `steps` that is not done yet, one line each.
fn install(steps: Vec<Step>) -> anyhow::Result<()> {
    let count = steps.len();
    for (index, step) in steps.into_iter().enumerate() {
        let label = format!("[{}/{count}] {}", index + 1, step.what);
        if (step.done)() {
            continue;
        }
        eprint!("xtask: setup {label} ... ");
        let started = Instant::now();
        match (step.install)() {
            Ok(()) => eprintln!("done ({:.0} s)", started.elapsed().as_secs_f64()),
            Err(error) => {
                eprintln!("failed");
                show_log_tail();
                return Err(error.context(label));
            }
        }
    }
    Ok(())
}

/// One thing to install: whether it is there, and how to install it.
struct Step {
    what: String,
    done: Box<dyn Fn() -> bool>,
    install: Box<dyn Fn() -> anyhow::Result<()>>,
}

fn apt_step(packages: &'static [&'static str]) -> Step {
    let missing = move || -> Vec<&'static str> {
        packages
            .iter()
            .copied()
            .filter(|package| {
                !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                    .contains("install ok installed")
            })
            .collect()
    };
    Step {
        what: format!("Debian packages {}", packages.join(" ")),
        done: Box::new(move || missing().is_empty()),
        install: Box::new(move || {
            logged(Command::new("apt-get").args(["update", "-q"]))?;
            logged(
                Command::new("apt-get")
                    .args(["install", "-y", "-q", "--no-install-recommends"])
                    .args(missing())
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        }),
    }
}

fn tracefs_step() -> Step {
    let tracefs = Path::new("/sys/kernel/tracing");
    Step {
        what: format!("tracefs at {}", tracefs.display()),
        done: Box::new(move || {
            fs::read_dir(tracefs).is_ok_and(|mut entries| entries.next().is_some())
        }),
        install: Box::new(move || {
            logged(
                Command::new("mount")
                    .args(["-t", "tracefs", "nodev"])
                    .arg(tracefs),
            )
        }),
    }
}

fn rust_src_step() -> Step {
    Step {
        what: "the nightly toolchain's rust-src".to_owned(),
        done: Box::new(|| {
            stdout_of(Command::new("rustup").args([
                "component",
                "list",
                "--toolchain",
                "nightly",
                "--installed",
            ]))
            .lines()
            .any(|component| component.starts_with("rust-src"))
        }),
        install: Box::new(|| {
            logged(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }),
    }
}

fn bpf_linker_step() -> Step {
    Step {
        what: format!("bpf-linker {BPF_LINKER_VERSION}, built against LLVM 22 (about 3 minutes)"),
        done: Box::new(|| {
            stdout_of(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION)
        }),
        install: Box::new(|| {
            let path = format!(
                "/usr/lib/llvm-22/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            logged(
                Command::new("cargo")
                    .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                    .args(["--locked", "--no-default-features", "--features", "llvm-22"])
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                    .env("PATH", path),
            )
        }),
    }
}

fn musl_step() -> Step {
    Step {
        what: format!("the {DIST_TARGET} target (the static binary)"),
        done: Box::new(|| {
            stdout_of(Command::new("rustup").args(["target", "list", "--installed"]))
                .lines()
                .any(|target| target.trim() == DIST_TARGET)
        }),
        install: Box::new(|| logged(Command::new("rustup").args(["target", "add", DIST_TARGET]))),
    }
}

fn cargo_deb_step() -> Step {
    Step {
        what: format!("cargo-deb {CARGO_DEB_VERSION} (about 2 minutes)"),
        done: Box::new(|| {
            stdout_of(Command::new("cargo").args(["deb", "--version"])).contains(CARGO_DEB_VERSION)
        }),
        install: Box::new(|| {
            logged(Command::new("cargo").args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]))
        }),
    }
}

fn matrix_step() -> Step {
    Step {
        what: "the attribution matrix's Redis and Valkey builds".to_owned(),
        done: Box::new(builds::all_fetched),
        install: Box::new(|| {
            builds::fetch();
            Ok(())
        }),
    }
}

/// The log the installers write to.
fn log_path() -> PathBuf {
    workspace_root().join("target/xtask-setup.log")
}

/// Runs `command` with its output appended to the log, failing unless it succeeds.
fn logged(command: &mut Command) -> anyhow::Result<()> {
    let path = log_path();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let status = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!(
            "{command:?} failed: {status} (its output: {})",
            path.display()
        );
    }
    Ok(())
}

/// Shows the last lines of the log.
fn show_log_tail() {
    let Ok(file) = File::open(log_path()) else {
        return;
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    for line in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("    {line}");
    }
}
