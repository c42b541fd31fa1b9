//! What a host deployment uses: the static binary of `cargo xtask dist`, alone in an empty
//! root, and the example systemd unit.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::Duration,
};

use serde_json::Value;
use stallprof_testkit::{RedisServer, free_port, number, profiler_bin};

/// The static binary: `$REDIS_STALLPROF_DIST_BIN` (set by `cargo xtask test`), else
/// `target/dist/redis-stallprof`.
fn dist_bin() -> PathBuf {
    let binary = std::env::var_os("REDIS_STALLPROF_DIST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist/redis-stallprof")
        });
    assert!(
        binary.exists(),
        "{} is missing: `cargo xtask dist` builds it (`cargo xtask test` does too)",
        binary.display()
    );
    binary
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// An empty directory with the static binary alone, `/proc` and `/sys` mounted in it;
/// unmounted when dropped.
struct EmptyRoot {
    dir: tempfile::TempDir,
}

impl EmptyRoot {
    fn with(binary: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(binary, dir.path().join("redis-stallprof")).unwrap();
        for mount in ["proc", "sys"] {
            fs::create_dir(dir.path().join(mount)).unwrap();
        }
        let root = Self { dir };
        run(Command::new("mount")
            .args(["--bind", "/proc"])
            .arg(root.path("proc")));
        // /sys with what is mounted under it (tracefs); private, so unmounting it here
        // unmounts nothing outside.
        run(Command::new("mount")
            .args(["--rbind", "/sys"])
            .arg(root.path("sys")));
        run(Command::new("mount")
            .args(["--make-rprivate"])
            .arg(root.path("sys")));
        root
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside)
    }
}

impl Drop for EmptyRoot {
    fn drop(&mut self) {
        for mount in ["sys", "proc"] {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(self.path(mount))
                .status();
        }
    }
}

#[test]
fn the_static_binary_alone_in_an_empty_root_names_a_stall() {
    let binary = dist_bin();
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let linked = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        linked.contains("statically linked"),
        "a static binary expected: {linked}"
    );
    let redis = RedisServer::start(&[]);
    let root = EmptyRoot::with(&binary);
    let profiler = Command::new("chroot")
        .arg(root.dir.path())
        .args([
            "/redis-stallprof",
            "attach",
            "--pid",
            &redis.pid().to_string(),
        ])
        .args(["--duration", "3s", "--json", "/stalls.jsonl"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    redis.cli(&["DEBUG", "SLEEP", "0.1"]);
    let output = profiler.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let records: Vec<Value> = fs::read_to_string(root.path("stalls.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let stalls: Vec<&Value> = records
        .iter()
        .filter(|record| record["type"] == "stall")
        .collect();
    assert_eq!(stalls.len(), 1, "{stderr}");
    let stall = stalls[0];
    assert_eq!(stall["origin"], "command:debug", "{stall}");
    assert_eq!(stall["mechanism"], "syscall.sleep", "{stall}");
    assert!((100..115).contains(&(number(&stall["duration_us"]) / 1_000)));
    assert!(
        stall["stacks"][0]["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|frame| frame == "debugCommand"),
        "{stall}"
    );
}

#[test]
fn the_systemd_unit_verifies_and_its_command_runs() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/redis-stallprof.service");
    let unit = fs::read_to_string(&example).unwrap();
    let installed = "/usr/local/bin/redis-stallprof";
    assert!(unit.contains(installed), "{unit}");
    // Verified with the binary where this build has it (systemd checks it is executable).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis-stallprof.service");
    let binary = profiler_bin().canonicalize().unwrap();
    fs::write(&path, unit.replace(installed, binary.to_str().unwrap())).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd) is installed by `cargo xtask setup`");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");

    // Its command line, with a file and an address of this test's, runs and stops cleanly
    // (a server of its own running, so that `--all` has one to watch).
    let _redis = RedisServer::start(&[]);
    let exec_start = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .unwrap();
    let json = dir.path().join("stalls.jsonl");
    let metrics = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = exec_start
        .split_whitespace()
        .skip(1)
        .map(|arg| match arg {
            "/var/log/redis-stallprof/stalls.jsonl" => json.to_str().unwrap().to_owned(),
            "127.0.0.1:9464" => metrics.clone(),
            other => other.to_owned(),
        })
        .collect();
    let output = Command::new(&binary)
        .args(&args)
        .args(["--duration", "1s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    assert!(!stderr.contains("warn"), "{args:?}: {stderr}");
}
