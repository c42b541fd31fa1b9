//! Bad input and hostile environments: each gets one clear line on stderr and a non-zero exit,
//! never a panic.
use std::{
    net::TcpListener,
    process::{Command, Output, Stdio},
};

use stallprof_testkit::{RedisServer, profiler_bin, record_types, run_profiler};

/// The run failed with exit code 1 and one `error:` line containing `expected`, and no panic.
fn assert_fails_with(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit 1 expected; stderr:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert!(
        errors[0].contains(expected),
        "expected {expected:?} in:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

/// Runs the profiler in a private mount namespace after `shell_setup` (mounts that hide or fake
/// kernel interfaces from it alone).
fn run_in_mount_namespace(shell_setup: &str, args: &[&str]) -> Output {
    let script = format!("{shell_setup} && exec \"$0\" \"$@\"");
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(profiler_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare")
}

#[test]
fn a_pid_with_no_process() {
    assert_fails_with(
        &run_profiler(&["attach", "--pid", "999999999"]),
        "no process with pid 999999999",
    );
}

#[test]
fn a_process_that_is_not_redis_is_refused_unless_forced() {
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    assert_fails_with(
        &run_profiler(&["attach", "--pid", &pid]),
        &format!("process {pid} (`sleep`) is not a redis-server or valkey-server; pass --force"),
    );
    let forced = run_profiler(&["attach", "--pid", &pid, "--force", "--duration", "300ms"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(forced.status.success(), "--force attaches: {stderr}");
    assert!(stderr.contains("attached to sleep pid"), "{stderr}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn a_port_nobody_listens_on() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_fails_with(
        &run_profiler(&["attach", "--port", &port.to_string()]),
        &format!("no process listens on TCP port {port}"),
    );
}

#[test]
fn no_redis_running_in_a_pid_namespace_of_our_own() {
    let output = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(profiler_bin())
        .arg("attach")
        .output()
        .expect("run unshare");
    assert_fails_with(&output, "no running redis-server or valkey-server found");
}

#[test]
fn several_redis_servers_are_listed() {
    let first = RedisServer::start(&[]);
    let second = RedisServer::start(&[]);
    let output = run_profiler(&["attach"]);
    for server in [&first, &second] {
        let entry = format!("pid {} (port {})", server.pid(), server.port);
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(&entry),
            "{entry} expected"
        );
    }
    assert_fails_with(&output, "several Redis servers are running");
}

#[test]
fn missing_privileges_name_the_capabilities() {
    let redis = RedisServer::start(&[]);
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(profiler_bin())
        .args(["attach", "--pid", &redis.pid().to_string()])
        .output()
        .expect("run setpriv");
    assert_fails_with(
        &output,
        "missing privileges: need CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), missing CAP_BPF and CAP_PERFMON",
    );
}

#[test]
fn a_kernel_without_btf() {
    let redis = RedisServer::start(&[]);
    let output = run_in_mount_namespace(
        "mount -t tmpfs none /sys/kernel/btf",
        &["attach", "--pid", &redis.pid().to_string()],
    );
    assert_fails_with(&output, "kernel BTF not found at `/sys/kernel/btf/vmlinux`");
}

#[test]
fn tracefs_not_mounted() {
    let redis = RedisServer::start(&[]);
    let hide = "mount -t tmpfs none /sys/kernel/tracing && { ! [ -d /sys/kernel/debug/tracing ] || mount -t tmpfs none /sys/kernel/debug/tracing; }";
    let output = run_in_mount_namespace(hide, &["attach", "--pid", &redis.pid().to_string()]);
    assert_fails_with(&output, "tracefs is not mounted");
}

#[test]
fn a_missing_tracepoint_is_named() {
    let redis = RedisServer::start(&[]);
    // A tracefs copy holding every poll tracepoint's id but `sys_enter_epoll_pwait`'s.
    let fake = "real=$(mktemp -d) && mount --bind /sys/kernel/tracing \"$real\" && \
        mount -t tmpfs none /sys/kernel/tracing && \
        for tp in sys_enter_epoll_wait sys_exit_epoll_wait sys_exit_epoll_pwait; do \
          mkdir -p /sys/kernel/tracing/events/syscalls/$tp && \
          cp \"$real/events/syscalls/$tp/id\" /sys/kernel/tracing/events/syscalls/$tp/id; done";
    let output = run_in_mount_namespace(fake, &["attach", "--pid", &redis.pid().to_string()]);
    assert_fails_with(
        &output,
        "the kernel lacks the tracepoint `syscalls:sys_enter_epoll_pwait`",
    );
}

#[test]
fn an_unwritable_output_path_fails_before_attaching() {
    let redis = RedisServer::start(&[]);
    let output = run_profiler(&[
        "attach",
        "--pid",
        &redis.pid().to_string(),
        "--json",
        "/nonexistent-dir/stalls.jsonl",
    ]);
    assert_fails_with(
        &output,
        "cannot write the JSON output `/nonexistent-dir/stalls.jsonl`",
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("attached"));
    let output = run_profiler(&[
        "attach",
        "--pid",
        &redis.pid().to_string(),
        "--memory-flamegraph",
        "/nonexistent-dir/memory.svg",
    ]);
    assert_fails_with(&output, "cannot write the memory stack files");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("attached"));
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["attach", "--threshold", "0ms"][..],
        &["attach", "--threshold", "soon"],
        &["attach", "--all", "--pid", "1"],
        &["attach", "--no-wait"],
        &["attach", "--pid", "-3"],
        &["attach", "--fault-sample-interval", "0ms"],
    ] {
        let output = run_profiler(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("error:") && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn doctor_passes_here() {
    let output = run_profiler(&["doctor"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for check in [
        "privileges",
        "kernel BTF",
        "tracefs",
        "syscalls:sys_enter_epoll_wait",
        "eBPF programs",
    ] {
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with("ok") && line.contains(check)),
            "{check}:\n{stdout}"
        );
    }
}

#[test]
fn doctor_fails_without_btf() {
    let output = run_in_mount_namespace("mount -t tmpfs none /sys/kernel/btf", &["doctor"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("FAIL") && line.contains("kernel BTF")),
        "{stdout}"
    );
}

#[test]
fn the_profiler_keeps_working_when_the_json_goes_to_stdout() {
    let redis = RedisServer::start(&[]);
    let output = run_profiler(&[
        "attach",
        "--pid",
        &redis.pid().to_string(),
        "--json",
        "-",
        "--duration",
        "500ms",
    ]);
    assert!(output.status.success());
    assert_eq!(
        record_types(&String::from_utf8_lossy(&output.stdout)),
        ["attached", "summary"]
    );
}
