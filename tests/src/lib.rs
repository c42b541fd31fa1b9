//! The kit shared by the integration tests and `cargo xtask demo`: a real `redis-server` on a
//! free port (stopped when dropped), and `redis-stallprof attach` run as a child process whose
//! JSON lines are parsed.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod builds;

pub use builds::Build;

/// Debian's redis-server, by its absolute path: Redis re-executes `argv[0]` on `DEBUG RESTART`.
const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Process names of the servers.
const SERVER_NAMES: [&str; 2] = ["redis-server", "valkey-server"];

/// How long a server or the profiler may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A JSON number that must be a whole one.
pub fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// The profiler binary: `$REDIS_STALLPROF_BIN`, else the workspace's release build.
pub fn profiler_bin() -> PathBuf {
    std::env::var_os("REDIS_STALLPROF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/redis-stallprof")
        })
}

/// The `comm` of process `pid` (empty if it is gone).
fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim().to_owned())
        .unwrap_or_default()
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// The profiler's metrics page at `127.0.0.1:PORT` (`--metrics`), fetched with curl.
pub fn scrape_metrics(port: u16) -> String {
    let output = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A TCP port nobody listens on right now, below the kernel's ephemeral range: an outgoing
/// connection (the tests make thousands) never takes it between this check and the server's
/// bind, as it could take a port the kernel handed out as free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos() as u64)
        ^ (u64::from(std::process::id()) << 16);
    let span = u64::from(high - low);
    (0..span)
        .map(|_| low + ((seed + NEXT.fetch_add(7919, Ordering::Relaxed)) % span) as u16)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// A network namespace of the test's own (`ip netns`), with loopback up; deleted when dropped.
pub struct NetworkNamespace {
    pub name: String,
}

impl NetworkNamespace {
    pub fn create(label: &str) -> Self {
        let name = format!("stallprof-{}-{label}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        let ok = |command: &mut Command| command.status().is_ok_and(|status| status.success());
        assert!(
            ok(Command::new("ip").args(["netns", "add", &name])),
            "ip netns add {name}"
        );
        assert!(ok(Command::new("ip").args([
            "netns", "exec", &name, "ip", "link", "set", "lo", "up"
        ])));
        Self { name }
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// The namespace's `TcpExtListenOverflows`.
    pub fn listen_overflows(&self) -> u64 {
        let output = self
            .command("cat")
            .arg("/proc/net/netstat")
            .output()
            .expect("read netstat");
        let text = String::from_utf8_lossy(&output.stdout);
        let mut rows = text.lines().filter(|line| line.starts_with("TcpExt:"));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "ListenOverflows")
            .and_then(|(_, value)| value.parse().ok())
            .expect("TcpExtListenOverflows")
    }
}

/// Runs `work` on a thread inside `namespace` (in ours when `None`): the sockets it opens
/// stay in that namespace whatever thread uses them later.
pub fn in_namespace<T: Send>(
    namespace: Option<&NetworkNamespace>,
    work: impl FnOnce() -> T + Send,
) -> T {
    use std::os::fd::AsRawFd;
    let namespace = namespace.map(|ns| {
        fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("open the namespace")
    });
    thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(namespace) = &namespace {
                    // SAFETY: moves this short-lived thread alone into the namespace.
                    assert_eq!(
                        unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) },
                        0,
                        "setns"
                    );
                }
                work()
            })
            .join()
            .expect("the thread in the namespace")
    })
}

/// A TCP socket from `source` (any port) connecting to `127.0.0.1:port`; with `blocking`, the
/// connection is established when this returns.
fn tcp_socket_from(source: [u8; 4], port: u16, blocking: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};
    let address = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (local, server) = (address(source, 0), address([127, 0, 0, 1], port));
    let length = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let flags = if blocking { 0 } else { libc::SOCK_NONBLOCK };
    // SAFETY: a new socket, owned at once; bind and connect read the addresses above.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | flags, 0);
        assert!(fd >= 0, "socket");
        let socket = OwnedFd::from_raw_fd(fd);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), length),
            0,
            "bind"
        );
        let connected = libc::connect(fd, (&server as *const libc::sockaddr_in).cast(), length);
        assert!(!blocking || connected == 0, "connect to port {port}");
        socket
    }
}

/// Starts `count` TCP connections to `127.0.0.1:port` at once (in `namespace`, else in ours),
/// without waiting for them (non-blocking connects, as a client pool does); closed when dropped.
pub fn connection_storm(
    port: u16,
    count: usize,
    namespace: Option<&NetworkNamespace>,
) -> Vec<std::os::fd::OwnedFd> {
    in_namespace(namespace, || {
        (0..count)
            .map(|_| tcp_socket_from([127, 0, 0, 1], port, false))
            .collect()
    })
}

/// `count` established connections to `127.0.0.1:port` from the address `source` (any of
/// 127.0.0.0/8 in a namespace's loopback), in `namespace`.
pub fn connect_from(
    source: [u8; 4],
    port: u16,
    count: usize,
    namespace: Option<&NetworkNamespace>,
) -> Vec<std::net::TcpStream> {
    in_namespace(namespace, || {
        (0..count)
            .map(|_| std::net::TcpStream::from(tcp_socket_from(source, port, true)))
            .collect()
    })
}

impl Drop for NetworkNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// A throwaway `redis-server` (Debian's), started with the DEBUG command enabled.
pub struct RedisServer {
    pub port: u16,
    /// The server's pid as the host sees it.
    pid: u32,
    child: Child,
    dir: tempfile::TempDir,
    /// The network namespace it runs in, if not ours.
    namespace: Option<String>,
}

impl RedisServer {
    /// Starts a server on a free port with `extra` configuration arguments (`--name value`).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts a server on `port` (e.g. the port of one that was shut down).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_with(
            with_debug_command(Command::new(REDIS_SERVER)),
            port,
            extra,
            None,
        )
    }

    /// Starts a server of `build` on a free port with `extra` configuration arguments.
    pub fn start_build(build: &Build, extra: &[&str]) -> Self {
        let launcher = Command::new(build.server());
        // Older servers allow DEBUG without the flag, and refuse the flag.
        let launcher = if build.debug_flag {
            with_debug_command(launcher)
        } else {
            launcher
        };
        Self::start_with(launcher, free_port(), extra, None)
    }

    /// Starts a server inside `namespace`; `cli` then runs there too.
    pub fn start_in(namespace: &NetworkNamespace, extra: &[&str]) -> Self {
        Self::start_in_on(namespace, free_port(), extra)
    }

    /// Starts a server inside `namespace` on `port` (each namespace has its own ports: pods
    /// all listen on 6379).
    pub fn start_in_on(namespace: &NetworkNamespace, port: u16, extra: &[&str]) -> Self {
        Self::start_with(
            with_debug_command(namespace.command(REDIS_SERVER)),
            port,
            extra,
            Some(namespace.name.clone()),
        )
    }

    /// Starts a server as a container would run it: inside `namespace` and in a pid namespace
    /// of its own (`unshare --pid --fork --mount-proc`), where it is pid 1.
    pub fn start_contained(namespace: &NetworkNamespace, extra: &[&str]) -> Self {
        let mut launcher = namespace.command("unshare");
        launcher.args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            REDIS_SERVER,
        ]);
        Self::start_with(
            with_debug_command(launcher),
            free_port(),
            extra,
            Some(namespace.name.clone()),
        )
    }

    /// Starts a server through `launcher` (e.g. `ip netns exec NS redis-server`).
    fn start_with(
        mut launcher: Command,
        port: u16,
        extra: &[&str],
        namespace: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let child = launcher
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (is the redis-server package installed?)");
        let mut server = Self {
            port,
            pid: child.id(),
            child,
            dir,
            namespace,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while server
            .try_cli(&["PING"])
            .map(|reply| reply.trim() != "PONG")
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING; log: {}",
                server.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        // A launcher that forks (unshare) has the server as its child.
        if !SERVER_NAMES.contains(&comm(server.pid).as_str()) {
            server.pid = children(server.pid)
                .into_iter()
                .find(|&pid| SERVER_NAMES.contains(&comm(pid).as_str()))
                .expect("the launcher's redis-server child");
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's log file.
    /// The server's resident memory (`VmRSS`), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A client connection (the `redis` crate).
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|client| client.get_connection())
            .expect("connect to redis-server")
    }

    /// `program` with the server's network namespace, if it has its own.
    pub fn command(&self, program: &str) -> Command {
        match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, program]);
                command
            }
            None => Command::new(program),
        }
    }

    /// `redis-cli ARGS` against the server: its output, or `None` if it failed.
    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        let output = self
            .command("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `redis-cli` against the server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// A numeric field of `INFO section` (e.g. `allocator_resident` of `memory`).
    pub fn info_number(&self, section: &str, field: &str) -> u64 {
        let info = self.cli(&["INFO", section]);
        info.lines()
            .find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no numeric {field} in INFO {section}"))
    }

    /// Waits until the server process has exited (after SHUTDOWN).
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for redis-server")
    }
}

impl Drop for RedisServer {
    /// Kills the server and the children it forked (a background save's would outlive it).
    fn drop(&mut self) {
        for child in children(self.pid) {
            // SAFETY: kill(2) on a pid; the child is the server's fork.
            unsafe { libc::kill(child as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `launcher` (of a server that knows the flag) with the DEBUG command enabled.
fn with_debug_command(mut launcher: Command) -> Command {
    launcher.args(["--enable-debug-command", "yes"]);
    launcher
}

/// A finished profiler run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub records: Vec<Value>,
    pub stderr: String,
}

impl Run {
    /// The JSON records of one `"type"`.
    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|record| record["type"] == kind)
            .collect()
    }

    /// The one `stall` record.
    pub fn only_stall(&self) -> &Value {
        let stalls = self.of_type("stall");
        assert_eq!(
            stalls.len(),
            1,
            "one stall expected: {stalls:?}\n{}",
            self.stderr
        );
        stalls[0]
    }

    /// The one `summary` record.
    pub fn summary(&self) -> &Value {
        let summaries = self.of_type("summary");
        assert_eq!(
            summaries.len(),
            1,
            "one summary expected; stderr:\n{}",
            self.stderr
        );
        summaries[0]
    }
}

/// A running `redis-stallprof attach`, writing JSON lines to a file.
pub struct Profiler {
    child: Child,
    json: PathBuf,
    /// Keeps a temporary JSON file until the run is collected.
    _temporary: Option<tempfile::NamedTempFile>,
    /// Collects stderr (taken when the run is collected).
    stderr: Option<thread::JoinHandle<String>>,
}

impl Profiler {
    /// Starts `redis-stallprof attach ARGS --json TEMPFILE` and waits for its `attached` record.
    pub fn attach(args: &[&str]) -> Self {
        let temporary = tempfile::NamedTempFile::new().expect("temporary file");
        let json = temporary.path().to_owned();
        Self::spawn(args, json, Some(temporary))
    }

    /// Starts `redis-stallprof attach ARGS --json JSON` and waits for its `attached` record.
    pub fn attach_writing(args: &[&str], json: &Path) -> Self {
        Self::spawn(args, json.to_owned(), None)
    }

    /// Starts `redis-stallprof attach ARGS --json JSON` without waiting for an `attached`
    /// record (`--all` with no server yet has none); gives it `settle` to load its programs.
    pub fn start_writing(args: &[&str], json: &Path, settle: Duration) -> Self {
        let profiler = Self::start_child(args, json.to_owned(), None);
        thread::sleep(settle);
        assert!(!profiler.has_exited(), "the profiler ended at once");
        profiler
    }

    fn spawn(args: &[&str], json: PathBuf, temporary: Option<tempfile::NamedTempFile>) -> Self {
        let profiler = Self::start_child(args, json, temporary);
        let deadline = Instant::now() + START_TIMEOUT;
        while !profiler
            .records()
            .iter()
            .any(|record| record["type"] == "attached")
        {
            if Instant::now() > deadline || profiler.has_exited() {
                let run = profiler.stop();
                panic!(
                    "the profiler did not attach: {:?}\n{}",
                    run.status, run.stderr
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        profiler
    }

    fn start_child(
        args: &[&str],
        json: PathBuf,
        temporary: Option<tempfile::NamedTempFile>,
    ) -> Self {
        // A file left by an earlier run would show its `attached` record before this run's.
        let _ = fs::remove_file(&json);
        let mut child = Command::new(profiler_bin())
            .arg("attach")
            .args(args)
            .arg("--json")
            .arg(&json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", profiler_bin().display()));
        let stderr = child.stderr.take().map(|stderr| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = BufReader::new(stderr).read_to_string(&mut text);
                text
            })
        });
        Self {
            child,
            json,
            _temporary: temporary,
            stderr,
        }
    }

    /// The profiler's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn has_exited(&self) -> bool {
        // SAFETY: waitpid with WNOHANG|WNOWAIT only peeks at our own child's state.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        unsafe {
            libc::waitid(libc::P_PID, self.child.id(), &mut info, flags) == 0 && info.si_pid() != 0
        }
    }

    /// The JSON records written so far.
    pub fn records(&self) -> Vec<Value> {
        let Ok(file) = fs::File::open(&self.json) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|line| line.ends_with('}'))
            .map(|line| {
                serde_json::from_str(&line)
                    .unwrap_or_else(|error| panic!("bad JSON line {line:?}: {error}"))
            })
            .collect()
    }

    /// Sends SIGINT (as Ctrl-C would) and collects the finished run.
    pub fn stop(self) -> Run {
        self.signal(libc::SIGINT)
    }

    /// Sends SIGTERM and collects the finished run.
    pub fn terminate(self) -> Run {
        self.signal(libc::SIGTERM)
    }

    fn signal(self, signal: i32) -> Run {
        self.signal_only(signal);
        self.wait()
    }

    /// Sends `signal` and lets the profiler run on (SIGHUP).
    pub fn signal_only(&self, signal: i32) {
        // SAFETY: signals our own child, the profiler.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the profiler to end by itself (`--duration`, target exit) and collects the run.
    pub fn wait(mut self) -> Run {
        let status = self.child.wait().expect("wait for the profiler");
        let records = self.records();
        let stderr = self
            .stderr
            .take()
            .map(|reader| reader.join().unwrap_or_default())
            .unwrap_or_default();
        Run {
            status,
            records,
            stderr,
        }
    }
}

/// The `"type"` of each JSON line of `text`.
pub fn record_types(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("bad JSON line {line:?}: {error}"));
            record["type"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Runs the profiler with `args` to completion (for bad-input checks).
pub fn run_profiler(args: &[&str]) -> Output {
    Command::new(profiler_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the profiler")
}

/// Sends one RESP command.
fn send_command(stream: &mut TcpStream, args: &[&[u8]]) -> std::io::Result<()> {
    let mut command = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        command.extend(format!("${}\r\n", arg.len()).as_bytes());
        command.extend(*arg);
        command.extend(b"\r\n");
    }
    stream.write_all(&command)
}

/// Leaves `clients` connections whose query buffers are about `bytes_each` large, resident and
/// empty, then lets them idle: the state in which clientsCron's query-buffer resize
/// (clientsCronResizeQueryBuffer -> sdsRemoveFreeSpace -> realloc) makes jemalloc give the
/// buffers back with madvise on the event loop, more than 2 s later. A blocked client's input
/// is still read into its query buffer, so each client blocks in BLPOP, sends `bytes_each` of
/// SET commands (values under Redis's 32 KiB "big argument" size), and is then unblocked.
/// Returns the connections: dropping them closes the clients.
pub fn leave_big_idle_query_buffers(
    port: u16,
    clients: usize,
    bytes_each: usize,
) -> Vec<TcpStream> {
    let mut one_set = b"*3\r\n$3\r\nSET\r\n$2\r\nqb\r\n$30000\r\n".to_vec();
    one_set.extend(std::iter::repeat_n(b'x', 30_000));
    one_set.extend(b"\r\n");
    let commands = bytes_each / one_set.len();
    let pipeline = one_set.repeat(commands);
    let mut connections = Vec::new();
    for index in 0..clients {
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis-server");
        send_command(
            &mut client,
            &[b"BLPOP", format!("stallprof-queue{index}").as_bytes(), b"0"],
        )
        .unwrap();
        client.write_all(&pipeline).expect("send the pipeline");
        connections.push(client);
    }
    let mut control = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis-server");
    for index in 0..clients {
        send_command(
            &mut control,
            &[
                b"LPUSH",
                format!("stallprof-queue{index}").as_bytes(),
                b"go",
            ],
        )
        .unwrap();
    }
    // Read the replies (BLPOP's, then one +OK per SET) so every command has run.
    for client in &mut connections {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let expected = commands * b"+OK\r\n".len();
        let (mut received, mut buffer) = (0, [0u8; 65536]);
        while received < expected {
            match client.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => received += read,
            }
        }
    }
    connections
}

/// Adds `count` sets of one short non-integer member each (`SADD set:N mN`), pipelined:
/// each becomes a hash table, several times the memory its member needs.
pub fn add_small_sets(client: &mut redis::Connection, count: usize) {
    let commands: Vec<redis::Cmd> = (0..count)
        .map(|index| {
            let mut command = redis::cmd("SADD");
            command.arg(format!("set:{index}")).arg(format!("m{index}"));
            command
        })
        .collect();
    for chunk in commands.chunks(10_000) {
        let mut pipe = redis::pipe();
        for command in chunk {
            pipe.add_command(command.clone()).ignore();
        }
        pipe.query::<()>(client).expect("SADD pipeline");
    }
}
