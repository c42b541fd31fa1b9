//! The clients of a stall: who sent the command it ran, and who felt it. Both come from a dump
//! of the server's connections (sock_diag with `tcp_info`) taken every `--queue-interval`
//! while an iteration runs past the gate, so a healthy loop pays nothing for them:
//! - who felt it: the connections with bytes waiting in their receive queues, unread, when
//!   the stall was last seen running, and how long since their data arrived;
//! - who sent it, by default (`census`): the connections whose data arrived just before the
//!   iteration began and that the server had read whole. Usually one; when another client's
//!   request came in the same moment, both are listed, and the record says it is one of them;
//! - with `--clients exact`: the connection the event-loop thread last read from before the
//!   command's samples (a `sys_enter_read` program), and the command's name as typed.
//!
//! Only a command's stall has a sender: a cron stall has none, whatever was read before it.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader},
    net::IpAddr,
};

use super::sampler::ConnectionSample;
use crate::{
    output::record::{ClientPeer, ClientSource, StallClient, StallWaiters, WaitingClients},
    stall::LastRead,
};

/// How long before an iteration began the request of its command may have arrived (it may
/// have waited through the iteration before).
const REQUEST_WINDOW_MS: u64 = 15;
/// The kernel's idle clock (`tcpi_last_data_recv`) counts in jiffies (4 ms at 250 Hz): two of
/// them either way.
const CLOCK_SLACK_MS: u64 = 8;
/// Client addresses listed among the waiters.
const TOP_WAITING: usize = 5;
/// Candidates listed when several clients may have sent the command.
const MAX_CANDIDATES: usize = 8;

/// The server's connections seen while an iteration ran.
#[derive(Debug, Clone)]
pub struct RunningSnapshot {
    /// The iteration's start and when the dump was taken (monotonic ns).
    pub iteration_start_ns: u64,
    pub taken_ns: u64,
    pub connections: Vec<ConnectionSample>,
    /// With `--clients exact`: the event-loop thread's last read, named then (once the stall
    /// is over its client may be gone, and its descriptor reused).
    pub read: Option<SeenRead>,
}

/// A descriptor the event-loop thread read from, and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRead {
    pub fd: u32,
    /// Whether it was a socket (not a file, as the cron's reads of `/proc` are).
    pub socket: bool,
    /// The client at its other end, when found.
    pub peer: Option<ClientPeer>,
}

impl SeenRead {
    /// Names descriptor `fd` of process `pid` now: a TCP client among `connections` (the
    /// server's, by the socket's inode), or the path of its unix socket.
    pub fn name(pid: u32, fd: u32, connections: impl FnOnce() -> Vec<ConnectionSample>) -> Self {
        let Some(inode) = socket_inode(pid, fd) else {
            return Self {
                fd,
                socket: false,
                peer: None,
            };
        };
        let tcp = connections()
            .into_iter()
            .find(|connection| connection.inode == inode)
            .map(|connection| ClientPeer {
                addr: socket_address(connection.client, connection.client_port),
            });
        Self {
            fd,
            socket: true,
            peer: tcp.or_else(|| {
                unix_path(pid, inode).map(|path| ClientPeer {
                    addr: format!("unix:{path}"),
                })
            }),
        }
    }
}

impl RunningSnapshot {
    /// How old the iteration was when the dump was taken, in ms.
    fn age_ms(&self) -> u64 {
        self.taken_ns.saturating_sub(self.iteration_start_ns) / 1_000_000
    }

    /// The clients the stall that ended at `end_ns` held up.
    pub fn waiters(&self, end_ns: u64) -> StallWaiters {
        let waiting: Vec<&ConnectionSample> = self
            .connections
            .iter()
            .filter(|connection| connection.queued_bytes > 0)
            .collect();
        let since_dump_us = end_ns.saturating_sub(self.taken_ns) / 1_000;
        let longest_wait_us = waiting
            .iter()
            .filter_map(|connection| connection.idle_ms)
            .max()
            .map_or(0, |idle_ms| u64::from(idle_ms) * 1_000 + since_dump_us);
        let mut by_address: HashMap<IpAddr, (u64, u64)> = HashMap::new();
        for connection in &waiting {
            let (connections, bytes) = by_address.entry(connection.client).or_default();
            *connections += 1;
            *bytes += u64::from(connection.queued_bytes);
        }
        let mut top: Vec<WaitingClients> = by_address
            .into_iter()
            .map(|(addr, (connections, bytes))| WaitingClients {
                addr: addr.to_string(),
                connections,
                bytes,
            })
            .collect();
        top.sort_by(|a, b| {
            (b.connections, b.bytes, &a.addr).cmp(&(a.connections, a.bytes, &b.addr))
        });
        top.truncate(TOP_WAITING);
        StallWaiters {
            connections: waiting.len() as u64,
            bytes: waiting
                .iter()
                .map(|connection| u64::from(connection.queued_bytes))
                .sum(),
            longest_wait_us,
            top,
        }
    }

    /// The connections whose data arrived just before the iteration began and were read whole:
    /// those that may have sent its command, the closest to its start first.
    fn senders(&self) -> Vec<&ConnectionSample> {
        let age_ms = self.age_ms();
        let mut senders: Vec<(&ConnectionSample, u64)> = self
            .connections
            .iter()
            // Read whole, and not a connection that never sent anything (its idle clock
            // runs from its handshake).
            .filter(|connection| {
                connection.queued_bytes == 0 && connection.received_bytes != Some(0)
            })
            .filter_map(|connection| {
                let idle_ms = u64::from(connection.idle_ms?);
                // Its data came no later than the iteration's start, and not long before.
                let arrived_by_start = idle_ms + CLOCK_SLACK_MS >= age_ms;
                let recent = idle_ms <= age_ms + REQUEST_WINDOW_MS + CLOCK_SLACK_MS;
                (arrived_by_start && recent).then_some((connection, idle_ms.abs_diff(age_ms)))
            })
            .collect();
        senders.sort_by_key(|(_, distance)| *distance);
        senders
            .into_iter()
            .map(|(connection, _)| connection)
            .collect()
    }
}

/// Who sent the command of a stall named `origin`: from the thread's `last_read` (exact),
/// else from `snapshot` (census). A read the snapshot did not name is named now from
/// `connections`, the server's; `pid` is the server's.
pub fn stall_client(
    origin: &str,
    snapshot: Option<&RunningSnapshot>,
    last_read: Option<&LastRead>,
    connections: impl FnOnce() -> Vec<ConnectionSample>,
    pid: u32,
) -> StallClient {
    if !origin.starts_with("command:") {
        return StallClient {
            source: ClientSource::NoCommand,
            ..StallClient::default()
        };
    }
    if let Some(read) = last_read {
        let seen = snapshot
            .and_then(|snapshot| snapshot.read.clone())
            .filter(|seen| seen.fd == read.fd)
            .unwrap_or_else(|| SeenRead::name(pid, read.fd, connections));
        // A read from a file (the cron's, say) tells nothing: then the census answers.
        if seen.socket {
            return StallClient {
                source: ClientSource::Exact,
                candidates: seen.peer.into_iter().collect(),
                others: 0,
                command: command_name(&read.request),
            };
        }
    }
    let Some(snapshot) = snapshot else {
        return StallClient {
            source: ClientSource::Unknown,
            ..StallClient::default()
        };
    };
    let senders = snapshot.senders();
    let candidates: Vec<ClientPeer> = senders
        .iter()
        .take(MAX_CANDIDATES)
        .map(|connection| ClientPeer {
            addr: socket_address(connection.client, connection.client_port),
        })
        .collect();
    StallClient {
        others: (senders.len() - candidates.len()) as u64,
        source: if candidates.is_empty() {
            ClientSource::Unknown
        } else {
            ClientSource::Census
        },
        candidates,
        command: None,
    }
}

/// `ip:port`, IPv6 in brackets.
fn socket_address(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The inode of socket descriptor `fd` of process `pid`; `None` for any other file.
fn socket_inode(pid: u32, fd: u32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The path of unix socket `inode` of process `pid` (its listener's, for an accepted one), from
/// `/proc/PID/net/unix`, read line by line (a host's table can be long).
fn unix_path(pid: u32, inode: u64) -> Option<String> {
    let table = BufReader::new(fs::File::open(format!("/proc/{pid}/net/unix")).ok()?);
    table
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.nth(6)?.parse::<u64>().ok()? == inode)
                .then(|| fields.next().map(str::to_owned))?
        })
}

/// The command name a RESP request (`*2\r\n$4\r\nKEYS\r\n...`) or an inline one (`KEYS x\r\n`)
/// begins with, lowercased; `None` when the bytes are not one.
pub fn command_name(request: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(request)
        .unwrap_or_else(|error| std::str::from_utf8(&request[..error.valid_up_to()]).unwrap_or(""));
    let name = if let Some(rest) = text.strip_prefix('*') {
        let (_, rest) = rest.split_once("\r\n")?;
        let rest = rest.strip_prefix('$')?;
        let (length, rest) = rest.split_once("\r\n")?;
        let length: usize = length.parse().ok()?;
        rest.get(..length)?
    } else {
        text.split([' ', '\r', '\n']).next()?
    };
    let valid = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|byte| {
            byte.is_ascii_alphanumeric()
                || byte == b'-'
                || byte == b'_'
                || byte == b'.'
                || byte == b'|'
        });
    valid.then(|| name.to_ascii_lowercase())
}

/// `origin` narrowed to the command typed, when the stack could not tell it from others
/// sharing its code (`command:hgetall|hkeys|hvals` and `hgetall` typed: `command:hgetall`).
pub fn narrowed_origin(origin: &str, command: &str) -> Option<String> {
    let names = origin.strip_prefix("command:")?;
    (names.contains('|') && names.split('|').any(|name| name == command))
        .then(|| format!("command:{command}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(client: &str, port: u16, idle_ms: u32, queued_bytes: u32) -> ConnectionSample {
        ConnectionSample {
            inode: u64::from(port),
            client: client.parse().unwrap(),
            client_port: port,
            queued_bytes,
            idle_ms: Some(idle_ms),
            received_bytes: None,
        }
    }

    /// A dump 30 ms into an iteration that began at 1 s.
    fn snapshot(connections: Vec<ConnectionSample>) -> RunningSnapshot {
        RunningSnapshot {
            iteration_start_ns: 1_000_000_000,
            taken_ns: 1_030_000_000,
            connections,
            read: None,
        }
    }

    #[test]
    fn the_sender_is_the_connection_read_whole_whose_data_came_just_before() {
        let seen = snapshot(vec![
            connection("127.0.0.2", 40_002, 31, 0),     // sent it
            connection("127.0.0.3", 40_003, 5, 33),     // sent during the stall: waiting
            connection("127.0.0.4", 40_004, 90_000, 0), // idle for a minute
        ]);
        let client = stall_client("command:keys", Some(&seen), None, Vec::new, 1);
        assert_eq!(client.source, ClientSource::Census);
        assert_eq!(client.sender().unwrap().addr, "127.0.0.2:40002");
        let waiters = seen.waiters(1_100_000_000);
        assert_eq!((waiters.connections, waiters.bytes), (1, 33));
        assert_eq!(waiters.longest_wait_us, 5_000 + 70_000);
        assert_eq!(waiters.top[0].addr, "127.0.0.3");
    }

    #[test]
    fn two_possible_senders_are_both_listed_and_a_cron_stall_has_none() {
        let seen = snapshot(vec![
            connection("127.0.0.2", 40_002, 31, 0),
            connection("::1", 40_005, 33, 0),
        ]);
        let client = stall_client("command:keys", Some(&seen), None, Vec::new, 1);
        assert_eq!(client.candidates.len(), 2);
        assert!(client.sender().is_none());
        assert_eq!(client.candidates[1].addr, "[::1]:40005");
        let cron = stall_client("cron.expire", Some(&seen), None, Vec::new, 1);
        assert_eq!(
            (cron.source, cron.candidates.len()),
            (ClientSource::NoCommand, 0)
        );
        let unseen = stall_client("command:keys", None, None, Vec::new, 1);
        assert_eq!(unseen.source, ClientSource::Unknown);
    }

    #[test]
    fn a_connection_that_never_sent_is_no_sender_and_candidates_past_eight_are_counted() {
        let mut silent = connection("127.0.0.7", 40_007, 30, 0);
        silent.received_bytes = Some(0);
        let mut seen = snapshot(vec![connection("127.0.0.2", 40_002, 31, 0), silent]);
        let client = stall_client("command:debug", Some(&seen), None, Vec::new, 1);
        assert_eq!(client.sender().unwrap().addr, "127.0.0.2:40002");
        seen.connections = (0..10)
            .map(|index| connection("127.0.0.3", 40_100 + index, 30, 0))
            .collect();
        let client = stall_client("command:debug", Some(&seen), None, Vec::new, 1);
        assert_eq!((client.candidates.len(), client.others), (8, 2));
        assert_eq!(client.possible_senders(), 10);
        assert!(client.sender().is_none());
    }

    #[test]
    fn a_command_is_named_as_typed_and_narrows_a_shared_origin() {
        assert_eq!(
            command_name(b"*2\r\n$7\r\nHGETALL\r\n$3\r\nkey\r\n").as_deref(),
            Some("hgetall")
        );
        assert_eq!(command_name(b"KEYS *\r\n").as_deref(), Some("keys"));
        assert_eq!(command_name(b"*2\r\n$99\r\nHGE").as_deref(), None);
        assert_eq!(command_name(b"\x00\x01garbage").as_deref(), None);
        assert_eq!(
            narrowed_origin("command:hgetall|hkeys|hvals", "hkeys").as_deref(),
            Some("command:hkeys")
        );
        assert_eq!(narrowed_origin("command:keys", "keys"), None);
        assert_eq!(narrowed_origin("command:del|unlink", "get"), None);
    }
}
