//! The Debian package (`cargo xtask deb`; `cargo xtask test` builds it and names it in
//! `$REDIS_STALLPROF_DEB`): installed with `dpkg -i` on this machine, its service valid and
//! disabled, its binary naming a real redis-server's stall, then removed with `dpkg -r`
//! (everything but the configuration in /etc goes, as Debian keeps it) and purged (that goes
//! too).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::RedisServer;

const PACKAGE: &str = "redis-stallprof";
const UNIT: &str = "/usr/lib/systemd/system/redis-stallprof.service";

fn package_file() -> PathBuf {
    let package = std::env::var_os("REDIS_STALLPROF_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/deb/redis-stallprof_0.1.0-1_amd64.deb")
        });
    assert!(
        package.is_file(),
        "{} is missing: `cargo xtask deb` builds it (`cargo xtask test` does too)",
        package.display()
    );
    package
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"))
}

fn succeeds(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The package's status as dpkg says it (`None`: dpkg knows nothing of it).
fn status() -> Option<String> {
    let output = output("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
        .filter(|status| !status.contains("not-installed"))
}

#[test]
fn the_debian_package_installs_runs_and_goes_without_a_trace() {
    let package = package_file();
    if status().is_some() {
        succeeds("dpkg", &["--purge", PACKAGE]);
    }
    succeeds("dpkg", &["-i", package.to_str().unwrap()]);
    assert_eq!(status().as_deref(), Some("install ok installed"));
    let files: Vec<String> = succeeds("dpkg-query", &["-L", PACKAGE])
        .lines()
        .map(str::to_owned)
        .collect();
    for expected in [
        "/usr/bin/redis-stallprof",
        UNIT,
        "/etc/redis-stallprof/environment",
        "/etc/redis-stallprof/rules.toml",
        "/usr/share/man/man1/redis-stallprof-attach.1.gz",
        "/usr/share/bash-completion/completions/redis-stallprof",
        "/usr/share/zsh/vendor-completions/_redis-stallprof",
        "/usr/share/fish/vendor_completions.d/redis-stallprof.fish",
        "/usr/share/doc/redis-stallprof/LICENSE-MIT",
        "/usr/share/doc/redis-stallprof/THIRD-PARTY.md",
    ] {
        assert!(
            files.iter().any(|file| file == expected),
            "{expected} not in {files:?}"
        );
    }
    let conffiles = succeeds("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]);
    assert!(
        conffiles.contains("/etc/redis-stallprof/environment"),
        "{conffiles}"
    );

    // The service: valid, and not enabled by installing it.
    succeeds("systemd-analyze", &["verify", UNIT]);
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/redis-stallprof.service").exists(),
        "the service was enabled"
    );
    // Its command line, as the service runs it with the installed environment file.
    let environment = fs::read_to_string("/etc/redis-stallprof/environment").unwrap();
    assert!(environment.contains("--rules /etc/redis-stallprof/rules.toml"));

    // The installed binary and its installed rules name a stall.
    succeeds("/usr/bin/redis-stallprof", &["doctor"]);
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stalls.jsonl");
    let mut profiler = Command::new("/usr/bin/redis-stallprof")
        .args([
            "attach",
            "--duration",
            "4s",
            "--rules",
            "/etc/redis-stallprof/rules.toml",
        ])
        .args(["--pid", &redis.pid().to_string(), "--json"])
        .arg(&json)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(&json)
        .unwrap_or_default()
        .contains("\"type\":\"attached\"")
    {
        assert!(
            Instant::now() < deadline,
            "the installed binary did not attach"
        );
        thread::sleep(Duration::from_millis(50));
    }
    redis.cli(&["DEBUG", "SLEEP", "0.3"]);
    assert!(profiler.wait().unwrap().success());
    let records: Vec<Value> = fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let stall = records
        .iter()
        .find(|record| record["type"] == "stall")
        .unwrap_or_else(|| panic!("no stall: {records:?}"));
    assert_eq!(stall["origin"], "command:debug");
    assert_eq!(stall["mechanism"], "syscall.sleep");

    // Removed: every file but the configuration is gone.
    succeeds("dpkg", &["-r", PACKAGE]);
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    for file in &files {
        let path = Path::new(file);
        if path.is_dir() || file.starts_with("/etc/redis-stallprof") {
            continue;
        }
        assert!(!path.exists(), "{file} is left after dpkg -r");
    }
    // Purged: the configuration too, and dpkg forgets the package.
    succeeds("dpkg", &["--purge", PACKAGE]);
    assert!(!Path::new("/etc/redis-stallprof").exists());
    assert_eq!(status(), None);
}
