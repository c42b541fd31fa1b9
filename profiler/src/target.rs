//! Finding the Redis process to profile (by pid, by listening port, or the only one running)
//! and what we know of it: its main thread, executable and listening TCP ports.
//!
//! Everything is read from `/proc`; listening sockets are read from the target's own
//! `/proc/PID/net/tcp{,6}`, so a Redis in another network namespace is seen as it sees itself.
use std::{
    collections::HashSet,
    fmt, fs, io,
    path::{Path, PathBuf},
};

/// Process names (`comm`) of the servers we profile without `--force`.
pub const REDIS_NAMES: [&str; 2] = ["redis-server", "valkey-server"];
/// Functions every Redis and Valkey server's executable exports (they link with `-rdynamic`):
/// `--all` takes a process by its name only when its executable has them too, since any local
/// user can start a process of that name.
const SERVER_FUNCTIONS: [&str; 2] = ["aeMain", "serverCron"];

/// How the user chose the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSelector {
    Pid(u32),
    Port(u16),
    /// The single Redis server running.
    Only,
}

impl fmt::Display for TargetSelector {
    /// The flag that chose the target.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSelector::Pid(pid) => write!(formatter, "--pid {pid}"),
            TargetSelector::Port(port) => write!(formatter, "--port {port}"),
            TargetSelector::Only => write!(formatter, "the only Redis running"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    #[error(
        "process {pid} (`{name}`) is not a redis-server or valkey-server; pass --force to profile it anyway"
    )]
    NotRedis { pid: u32, name: String },
    #[error("no running redis-server or valkey-server found")]
    NoRedisRunning,
    #[error(
        "process {pid} is named `{name}` but its executable is not a Redis or Valkey server (it \
         exports no `aeMain` and `serverCron`); not watched"
    )]
    NotRedisExecutable { pid: u32, name: String },
    #[error(
        "several Redis servers are running: {servers}; choose with --pid or --port, or watch them \
         all with --all"
    )]
    SeveralRedis { servers: String },
    #[error("process {pid} is selected twice ({first} and {second})")]
    SelectedTwice {
        pid: u32,
        first: String,
        second: String,
    },
    #[error("no process listens on TCP port {port}")]
    NoListener { port: u16 },
    #[error("cannot read `{path}`")]
    Proc {
        path: PathBuf,
        #[source]
        cause: io::Error,
    },
}

/// The process being profiled.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    /// The event-loop thread: Redis runs it on the main thread, whose tid equals the pid.
    pub main_tid: u32,
    /// `comm` of the process.
    pub name: String,
    /// `/proc/PID/exe`: opens the target's executable even inside another mount namespace.
    pub exe: PathBuf,
    /// TCP ports it listens on (IPv4 and IPv6), sorted.
    pub ports: Vec<u16>,
    /// Its network namespace: the inode number of `/proc/PID/ns/net` (0 if unreadable).
    pub netns: u32,
    /// Start time (clock ticks after boot) to tell the process from a later one with its pid.
    start_ticks: u64,
}

impl Target {
    /// Finds the target the user selected; refuses a non-Redis process unless `force`.
    pub fn find(selector: TargetSelector, force: bool) -> Result<Self, TargetError> {
        let pid = match selector {
            TargetSelector::Pid(pid) => pid,
            TargetSelector::Port(port) => pid_listening_on(port)?,
            TargetSelector::Only => only_redis_server()?,
        };
        let target = Self::from_pid(pid)?;
        if !force && !is_redis_name(&target.name) {
            return Err(TargetError::NotRedis {
                pid,
                name: target.name,
            });
        }
        Ok(target)
    }

    pub fn from_pid(pid: u32) -> Result<Self, TargetError> {
        let process = Path::new("/proc").join(pid.to_string());
        let stat = fs::read_to_string(process.join("stat")).map_err(|source| {
            if is_gone(&source) {
                TargetError::NoSuchProcess { pid }
            } else {
                TargetError::Proc {
                    path: process.join("stat"),
                    cause: source,
                }
            }
        })?;
        let stat = ProcStat::parse(&stat).ok_or_else(|| TargetError::Proc {
            path: process.join("stat"),
            cause: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
        })?;
        if stat.pid != pid {
            // A thread id (visible under /proc but not a process) is not a pid.
            return Err(TargetError::NoSuchProcess { pid });
        }
        Ok(Self {
            pid,
            main_tid: pid,
            name: stat.name,
            exe: process.join("exe"),
            ports: listening_ports(pid)?,
            netns: network_namespace(pid),
            start_ticks: stat.start_ticks,
        })
    }

    /// True while the process we attached to still runs (not a zombie, not a pid reused later).
    /// Only "no such process" says it exited: any other failure to read `/proc` (no descriptor
    /// left, say) says nothing of the target, which is taken to run on.
    pub fn is_alive(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => ProcStat::parse(&stat)
                .is_some_and(|stat| stat.start_ticks == self.start_ticks && stat.state != 'Z'),
            Err(error) => !is_gone(&error),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} pid {}", self.name, self.pid)?;
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            write!(formatter, " (port {})", ports.join(", "))?;
        }
        Ok(())
    }
}

/// The inode number of process `pid`'s network namespace (as the kernel's `ns.inum`), 0 if
/// it cannot be read.
pub fn network_namespace(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .and_then(|namespace| u32::try_from(namespace.ino()).ok())
        .unwrap_or(0)
}

/// Checks that the executable of `target` is a Redis or Valkey server's (see
/// [`SERVER_FUNCTIONS`]): opened and mapped as a module is, its symbol tables read.
pub fn check_server_executable(target: &Target) -> Result<(), TargetError> {
    use object::{Object as _, ObjectSymbol as _};
    let not_redis = || TargetError::NotRedisExecutable {
        pid: target.pid,
        name: target.name.clone(),
    };
    let executable =
        crate::module_file::ModuleFile::open_executable(target.pid).map_err(|error| {
            log::debug!("{}", crate::error_chain::error_chain(&error));
            not_redis()
        })?;
    let file = object::File::parse(&*executable).map_err(|_| not_redis())?;
    let exports = |function: &str| {
        file.dynamic_symbols()
            .chain(file.symbols())
            .any(|symbol| symbol.is_definition() && symbol.name() == Ok(function))
    };
    if SERVER_FUNCTIONS.iter().all(|function| exports(function)) {
        Ok(())
    } else {
        Err(not_redis())
    }
}

/// Whether reading a process's `/proc` files failed because the process is gone.
fn is_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

fn is_redis_name(name: &str) -> bool {
    REDIS_NAMES.contains(&name)
}

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    pid: u32,
    name: String,
    state: char,
    parent_pid: u32,
    start_ticks: u64,
}

impl ProcStat {
    /// Parses `pid (comm) state ppid ... starttime ...`; `comm` may hold spaces and parentheses.
    fn parse(stat: &str) -> Option<Self> {
        let (pid, rest) = stat.split_once(" (")?;
        let (name, rest) = rest.rsplit_once(") ")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After comm: state is field 3 of the man page, ppid 4, starttime 22.
        Some(Self {
            pid: pid.trim().parse().ok()?,
            name: name.to_owned(),
            state: fields.first()?.chars().next()?,
            parent_pid: fields.get(1)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }
}

fn all_processes() -> Result<Vec<ProcStat>, TargetError> {
    let entries = fs::read_dir("/proc").map_err(|source| TargetError::Proc {
        path: "/proc".into(),
        cause: source,
    })?;
    Ok(entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| ProcStat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .collect())
}

/// Redis servers that are not children of another Redis server (BGSAVE and AOF-rewrite
/// children carry the same name).
fn redis_servers(processes: &[ProcStat]) -> Vec<&ProcStat> {
    let redis_pids: HashSet<u32> = processes
        .iter()
        .filter(|p| is_redis_name(&p.name))
        .map(|p| p.pid)
        .collect();
    processes
        .iter()
        .filter(|p| is_redis_name(&p.name) && !redis_pids.contains(&p.parent_pid) && p.state != 'Z')
        .collect()
}

/// Every Redis server running now (not their forked children), by pid.
pub fn redis_server_pids() -> Result<Vec<u32>, TargetError> {
    Ok(redis_servers(&all_processes()?)
        .iter()
        .map(|server| server.pid)
        .collect())
}

fn only_redis_server() -> Result<u32, TargetError> {
    let processes = all_processes()?;
    match redis_servers(&processes).as_slice() {
        [] => Err(TargetError::NoRedisRunning),
        [only] => Ok(only.pid),
        several => {
            let servers: Vec<String> = several
                .iter()
                .map(|server| {
                    let ports = listening_ports(server.pid).unwrap_or_default();
                    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                    format!("pid {} (port {})", server.pid, ports.join(", "))
                })
                .collect();
            Err(TargetError::SeveralRedis {
                servers: servers.join(", "),
            })
        }
    }
}

/// The process holding a listening socket on `port` in our network namespace; of a parent and
/// its forked children that share it, the parent.
fn pid_listening_on(port: u16) -> Result<u32, TargetError> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        inodes.extend(
            parse_listeners(&text)
                .filter(|l| l.port == port)
                .map(|l| l.inode),
        );
    }
    let processes = all_processes()?;
    let holders: HashSet<u32> = processes
        .iter()
        .filter(|process| {
            socket_inodes(process.pid)
                .iter()
                .any(|inode| inodes.contains(inode))
        })
        .map(|process| process.pid)
        .collect();
    processes
        .iter()
        .filter(|process| holders.contains(&process.pid) && !holders.contains(&process.parent_pid))
        .map(|process| process.pid)
        .min()
        .ok_or(TargetError::NoListener { port })
}

/// One listening socket from a `/proc/net/tcp{,6}` table.
#[derive(Debug, PartialEq, Eq)]
struct Listener {
    port: u16,
    inode: u64,
}

/// State `0A` is `TCP_LISTEN`.
fn parse_listeners(table: &str) -> impl Iterator<Item = Listener> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&"0A") {
            return None;
        }
        let (_, port) = fields.get(1)?.rsplit_once(':')?;
        Some(Listener {
            port: u16::from_str_radix(port, 16).ok()?,
            inode: fields.get(9)?.parse().ok()?,
        })
    })
}

/// Inodes of the sockets among the process's open files.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let link = fs::read_link(entry.ok()?.path()).ok()?;
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// TCP ports the process listens on, read in its own network namespace.
pub fn listening_ports(pid: u32) -> Result<Vec<u16>, TargetError> {
    let mut ports: Vec<u16> = listening_sockets(pid)?.into_values().collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// The process's listening TCP sockets (IPv4 and IPv6) in its own network namespace: inode ->
/// port.
fn listening_sockets(pid: u32) -> Result<std::collections::HashMap<u64, u16>, TargetError> {
    let sockets: HashSet<u64> = socket_inodes(pid).into_iter().collect();
    let mut listeners = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let path = PathBuf::from(format!("/proc/{pid}/net/{table}"));
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) if source.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(TargetError::Proc {
                    path,
                    cause: source,
                });
            }
        };
        listeners.extend(
            parse_listeners(&text)
                .filter(|l| sockets.contains(&l.inode))
                .map(|l| (l.inode, l.port)),
        );
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name_parses() {
        let stat = "4242 (redis-server (x)) S 1 4242 4242 0 -1 4194560 371 0 0 0 5 3 0 0 20 0 5 0 \
                    987654 123 456 18446744073709551615";
        let parsed = ProcStat::parse(stat).unwrap();
        assert_eq!(parsed.pid, 4242);
        assert_eq!(parsed.name, "redis-server (x)");
        assert_eq!(parsed.state, 'S');
        assert_eq!(parsed.parent_pid, 1);
        assert_eq!(parsed.start_ticks, 987654);
    }

    #[test]
    fn only_listening_rows_are_read() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 31337 1 0000000000000000 100 0 0 10 0\n   \
   1: 0100007F:18EB 0100007F:C350 01 00000000:00000000 00:00000000 00000000   100        0 31338 1 0000000000000000 20 4 30 10 -1\n";
        let listeners: Vec<Listener> = parse_listeners(table).collect();
        assert_eq!(
            listeners,
            [Listener {
                port: 6379,
                inode: 31337
            }]
        );
    }

    #[test]
    fn children_of_a_redis_server_are_not_servers_of_their_own() {
        let process = |pid, name: &str, parent_pid| ProcStat {
            pid,
            name: name.to_owned(),
            state: 'S',
            parent_pid,
            start_ticks: 0,
        };
        let processes = [
            process(10, "redis-server", 1),
            process(11, "redis-server", 10),
            process(12, "bash", 1),
            process(13, "valkey-server", 12),
        ];
        let pids: Vec<u32> = redis_servers(&processes).iter().map(|p| p.pid).collect();
        assert_eq!(pids, [10, 13]);
    }

    #[test]
    fn a_process_whose_executable_exports_no_event_loop_is_not_a_server() {
        let ours = Target::from_pid(std::process::id()).unwrap();
        let error = check_server_executable(&ours).unwrap_err().to_string();
        assert!(error.contains("is not a Redis or Valkey server"), "{error}");
    }

    #[test]
    fn our_own_process_is_found_and_is_not_redis() {
        let pid = std::process::id();
        let error = Target::find(TargetSelector::Pid(pid), false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a redis-server"), "{error}");
        let forced = Target::find(TargetSelector::Pid(pid), true).unwrap();
        assert_eq!(forced.main_tid, pid);
        assert!(forced.is_alive());
    }
}
