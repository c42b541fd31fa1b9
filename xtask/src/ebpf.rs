//! `cargo xtask build-ebpf`: compiles the kernel programs (`profiler-ebpf`, for
//! `bpfel-unknown-none`: nightly with `rust-src`, and bpf-linker) into the committed object
//! [`OBJECT`], which `profiler/build.rs` embeds, so that building the profiler needs stable Rust
//! alone. `--check` compiles them aside and fails unless the committed object is the same,
//! byte for byte: paths are mapped to fixed prefixes, so the object does not depend on where
//! the checkout, the toolchain or the registry live.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{run, stdout_of};

/// The committed object, relative to the workspace root.
pub const OBJECT: &str = "profiler-ebpf/redis-stallprof.bpf.o";
/// The BPF target (little-endian, as x86_64 and arm64 are).
const TARGET: &str = "bpfel-unknown-none";

/// Compiles the kernel programs with `target_dir` as cargo's target directory; returns the
/// object.
fn compile(root: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let sysroot =
        stdout_of(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]));
    let sysroot = sysroot.trim();
    if sysroot.is_empty() {
        bail!("no nightly toolchain: run `cargo xtask setup --for dev`");
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    // As aya-build passes them, plus the path mappings.
    let flags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        format!("--remap-path-prefix={}=/redis-stallprof", root.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
        format!("--remap-path-prefix={sysroot}=/rust"),
    ];
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", "profiler-ebpf", "--bins", "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .current_dir(root))?;
    Ok(target_dir.join(TARGET).join("release/profiler-ebpf"))
}

/// Compiles the kernel programs into the committed object.
pub fn build(root: &Path) -> anyhow::Result<()> {
    let object = compile(root, &root.join("target/ebpf"))?;
    let committed = root.join(OBJECT);
    fs::copy(&object, &committed).with_context(|| {
        format!(
            "cannot copy {} to {}",
            object.display(),
            committed.display()
        )
    })?;
    eprintln!("xtask: kernel programs built into {OBJECT}; commit it with the sources");
    Ok(())
}

/// Compiles the kernel programs aside and fails unless the committed object is the same.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let object = compile(root, &root.join("target/ebpf-check"))?;
    let built = fs::read(&object).with_context(|| format!("cannot read {}", object.display()))?;
    let committed = fs::read(root.join(OBJECT)).with_context(|| format!("cannot read {OBJECT}"))?;
    if built != committed {
        bail!(
            "{OBJECT} is not what the kernel programs' sources build ({} bytes built, {} \
             committed): run `cargo xtask build-ebpf` and commit the object",
            built.len(),
            committed.len()
        );
    }
    eprintln!(
        "xtask: {OBJECT} is what the sources build ({} bytes, byte for byte)",
        built.len()
    );
    Ok(())
}
