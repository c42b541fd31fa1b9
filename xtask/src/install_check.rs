//! `cargo xtask install-check`: installs the profiler as someone with stable Rust alone would,
//! `cargo install --path profiler`, under a rustup home that holds the stable toolchain only
//! (no nightly, so no `rust-src` for the BPF target) and with a `PATH` that has no bpf-linker,
//! into a fresh target directory; then the installed binary's `doctor` must pass
//! and it must name a `DEBUG SLEEP` stall of a real redis-server.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use stallprof_testkit::RedisServer;

use crate::{run, stdout_of};

pub fn run_check(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let scratch = root.join("target/install-check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    let rustup_home = stable_only_rustup_home(&scratch)?;
    let bin = scratch.join("bin");
    fs::create_dir_all(&bin)?;
    let rustup = which("rustup")?;
    for proxy in ["cargo", "rustc", "rustup"] {
        symlink(&rustup, bin.join(proxy))?;
    }
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let stable_only = |program: &str| {
        let mut command = Command::new(bin.join(program));
        command
            .env("RUSTUP_HOME", &rustup_home)
            .env("PATH", &path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        command
    };
    let toolchains = stdout_of(stable_only("rustup").args(["toolchain", "list"]));
    if toolchains.contains("nightly") || !toolchains.contains("stable") {
        bail!("the scratch rustup home should hold stable alone: {toolchains}");
    }
    // LLVM's packages may be on this machine (the test set-up builds bpf-linker with them),
    // but without bpf-linker and nightly nothing can compile or link BPF code.
    if Command::new("sh")
        .args(["-c", "command -v bpf-linker"])
        .env("PATH", &path)
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        bail!("the scratch PATH should have no bpf-linker");
    }
    eprintln!(
        "xtask: install-check: cargo install --path profiler with stable Rust only ({})",
        toolchains.trim()
    );
    // What `cargo install redis-stallprof` would download holds the kernel programs' object.
    run(stable_only("cargo")
        .args([
            "package",
            "--quiet",
            "--no-verify",
            "--allow-dirty",
            "--locked",
        ])
        .args([
            "-p",
            "redis-stallprof-common",
            "-p",
            "redis-stallprof",
            "--target-dir",
        ])
        .arg(scratch.join("target"))
        .current_dir(root))?;
    let crate_file = scratch.join("target/package/redis-stallprof-0.1.0.crate");
    let listed = stdout_of(Command::new("tar").arg("tzf").arg(&crate_file));
    if !listed.contains("redis-stallprof-0.1.0/redis-stallprof.bpf.o") {
        bail!(
            "{} lacks the kernel programs' object:\n{listed}",
            crate_file.display()
        );
    }
    let installed = scratch.join("installed");
    run(stable_only("cargo")
        .args([
            "install", "--quiet", "--locked", "--path", "profiler", "--root",
        ])
        .arg(&installed)
        .arg("--target-dir")
        .arg(scratch.join("target"))
        .current_dir(root))?;
    let binary = installed.join("bin/redis-stallprof");
    run(Command::new(&binary).arg("doctor").stdout(Stdio::null()))
        .context("the installed binary's doctor")?;
    let stall = sleep_stall(&binary, &scratch)?;
    eprintln!(
        "xtask: install-check: the installed binary passes doctor and named a {} us stall \
         {} / {} ({:.0} s in all)",
        stall["duration_us"],
        stall["origin"],
        stall["mechanism"],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A rustup home in `scratch` whose only toolchain is the machine's stable one.
fn stable_only_rustup_home(scratch: &Path) -> anyhow::Result<PathBuf> {
    let sysroot =
        stdout_of(Command::new("rustup").args(["run", "stable", "rustc", "--print", "sysroot"]));
    let sysroot = Path::new(sysroot.trim());
    let name = sysroot
        .file_name()
        .and_then(|name| name.to_str())
        .context("no stable toolchain")?
        .to_owned();
    let home = scratch.join("rustup");
    fs::create_dir_all(home.join("toolchains"))?;
    symlink(sysroot, home.join("toolchains").join(&name))?;
    fs::write(
        home.join("settings.toml"),
        format!("version = \"12\"\ndefault_toolchain = \"{name}\"\nprofile = \"minimal\"\n"),
    )?;
    Ok(home)
}

/// `binary` attached to a fresh redis-server through a 300 ms `DEBUG SLEEP`: its stall.
fn sleep_stall(binary: &Path, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let redis = RedisServer::start(&[]);
    let json = scratch.join("stalls.jsonl");
    let mut profiler = Command::new(binary)
        .args([
            "attach",
            "--duration",
            "4s",
            "--pid",
            &redis.pid().to_string(),
            "--json",
        ])
        .arg(&json)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run the installed binary")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(&json)
        .unwrap_or_default()
        .contains("\"type\":\"attached\"")
    {
        if Instant::now() > deadline {
            bail!("the installed binary did not attach");
        }
        thread::sleep(Duration::from_millis(50));
    }
    redis.cli(&["DEBUG", "SLEEP", "0.3"]);
    let status = profiler.wait()?;
    if !status.success() {
        bail!("the installed binary's attach failed: {status}");
    }
    let text = fs::read_to_string(&json)?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|record| {
            record["type"] == "stall"
                && record["origin"] == "command:debug"
                && record["mechanism"] == "syscall.sleep"
        })
        .context("no DEBUG SLEEP stall named by the installed binary")
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> anyhow::Result<PathBuf> {
    let found = stdout_of(Command::new("sh").args(["-c", &format!("command -v {program}")]));
    let found = found.trim();
    if found.is_empty() {
        bail!("{program} not found");
    }
    Ok(PathBuf::from(found))
}
