//! `cargo xtask deb`: the Debian package, built by cargo-deb from `[package.metadata.deb]` in
//! `profiler/Cargo.toml`: the static binary, the service (installed disabled), its environment
//! file and rules in `/etc/redis-stallprof/`, the man pages, the shell completions, the
//! licences and the list of the licences of everything compiled into the binary
//! (`THIRD-PARTY.md`, written here from `cargo metadata`).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{DIST_TARGET, dist, run};

/// Builds the package into `target/deb/`; returns its path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    dist()?;
    let out = root.join("target/deb");
    fs::create_dir_all(&out)?;
    fs::write(out.join("THIRD-PARTY.md"), third_party(root)?)?;
    let output = Command::new("cargo")
        .args([
            "deb",
            "--quiet",
            "-p",
            "redis-stallprof",
            "--no-build",
            "--strip",
        ])
        .args(["--target", DIST_TARGET, "--output"])
        .arg(&out)
        .current_dir(root)
        .output()
        .context("cannot run cargo deb (cargo xtask setup installs it)")?;
    if !output.status.success() {
        bail!(
            "cargo deb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let package = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let package = PathBuf::from(package.lines().last().unwrap_or_default());
    if !package.is_file() {
        bail!("cargo deb named no package: {}", package.display());
    }
    Ok(package)
}

/// The crates compiled into the binary for [`DIST_TARGET`], by licence.
fn third_party(root: &Path) -> anyhow::Result<String> {
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", DIST_TARGET])
        .current_dir(root)
        .output()?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)?;
    let packages: BTreeMap<&str, &Value> = metadata["packages"]
        .as_array()
        .context("cargo metadata: no packages")?
        .iter()
        .filter_map(|package| Some((package["id"].as_str()?, package)))
        .collect();
    let nodes: BTreeMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata: no resolve")?
        .iter()
        .filter_map(|node| Some((node["id"].as_str()?, node)))
        .collect();
    // From the profiler, along normal (not build or dev) dependencies.
    let start = packages
        .iter()
        .find(|(_, package)| package["name"] == "redis-stallprof")
        .map(|(id, _)| *id)
        .context("cargo metadata: no redis-stallprof")?;
    let mut seen = vec![start];
    let mut index = 0;
    while let Some(id) = seen.get(index).copied() {
        index += 1;
        for dependency in nodes[id]["deps"].as_array().into_iter().flatten() {
            let normal = dependency["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|kind| kind["kind"].is_null());
            if let Some(next) = dependency["pkg"].as_str()
                && normal
                && !seen.contains(&next)
            {
                seen.push(next);
            }
        }
    }
    let mut by_licence: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &seen[1..] {
        let package = packages[id];
        let licence = package["license"]
            .as_str()
            .unwrap_or("(see the crate)")
            .to_owned();
        by_licence.entry(licence).or_default().push(format!(
            "{} {}",
            package["name"].as_str().unwrap_or("?"),
            package["version"].as_str().unwrap_or("?")
        ));
    }
    let mut text = String::from(
        "# Licences of the crates compiled into redis-stallprof\n\nredis-stallprof itself is \
         MIT OR Apache-2.0 (LICENSE-MIT, LICENSE-APACHE). Its kernel programs declare `Dual \
         MIT/GPL`. The crates below are compiled into the binary; each crate's own licence \
         text is in its source on crates.io.\n",
    );
    for (licence, crates) in by_licence {
        text += &format!("\n## {licence}\n\n{}\n", crates.join(", "));
    }
    Ok(text)
}

/// Builds the package and says where it is.
pub fn run_task(root: &Path) -> anyhow::Result<()> {
    let package = build(root)?;
    run(Command::new("dpkg-deb").arg("--info").arg(&package))?;
    eprintln!("xtask: Debian package at {}", package.display());
    Ok(())
}
