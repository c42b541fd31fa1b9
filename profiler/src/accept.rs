//! Accept queues of the target's listening TCP sockets: sampled with netlink sock_diag in the
//! target's own network namespace (queue length, its limit, the listener's drop counter), and
//! the namespace's `TcpExtListenOverflows` / `ListenDrops`. Drops are attributed to the stall
//! they happened in, or reported on their own.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs, io,
    os::fd::AsRawFd,
};

use hdrhistogram::Histogram;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use profiler_common::{AcceptEvent, ConnectionEvent};
use serde::{Deserialize, Serialize};

use crate::target::listening_sockets;

/// Samples kept to attribute drops to stalls: at the default 10 ms, a minute.
const HISTORY_SAMPLES: usize = 6_000;

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("cannot enter the network namespace of process {pid} (`/proc/{pid}/ns/net`): {cause}")]
    Namespace { pid: u32, cause: io::Error },
    #[error("cannot ask the kernel for socket diagnostics (netlink sock_diag): {cause}")]
    Netlink { cause: io::Error },
}

/// One listening socket at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSample {
    /// The socket's inode: a port often has two listeners (IPv4 and IPv6).
    pub inode: u64,
    pub port: u16,
    /// Connections waiting in the accept queue.
    pub queue: u32,
    /// The queue's limit (the listen backlog).
    pub limit: u32,
    /// The listener's drop counter (connections dropped with the queue full, among others).
    pub drops: u64,
}

/// Clients ranked in a stall.
const TOP_CLIENTS: usize = 5;
/// Connections remembered for the stalls' counts: a storm of this many in one stall is counted
/// in full.
const RECENT_CONNECTIONS: usize = 100_000;

/// The accept queues during a stall.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallAccept {
    /// Connections dropped by the listeners during the stall.
    pub overflows: u64,
    /// Longest accept queue seen.
    pub max_queue: u32,
    /// Its limit.
    pub limit: u32,
    /// Connections that completed their handshake (entered an accept queue) during the stall.
    #[serde(default)]
    pub new_connections: u64,
    /// Their clients, most connections first.
    #[serde(default)]
    pub top_clients: Vec<ClientConnections>,
}

/// Connections of one client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConnections {
    pub addr: String,
    pub connections: u64,
}

/// How long accepted connections waited in the accept queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptWaits {
    /// Connections that entered an accept queue of the target.
    pub connections: u64,
    /// Connections accepted whose entry into the queue was seen.
    pub accepted: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Drops outside any stall, reported on their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptOverflow {
    #[serde(
        serialize_with = "crate::clock::serialize_rfc3339",
        deserialize_with = "crate::clock::deserialize_rfc3339"
    )]
    pub time: std::time::SystemTime,
    pub port: u16,
    pub overflows: u64,
    pub max_queue: u32,
    pub limit: u32,
}

/// Accept-queue totals of a listening port, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOverflows {
    pub port: u16,
    pub overflows: u64,
    pub max_queue: u32,
    pub limit: u32,
}

/// The accept-queue part of the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptSummary {
    /// Per listening port.
    pub ports: Vec<PortOverflows>,
    /// Change of the namespace's `TcpExtListenOverflows` over the run.
    pub namespace_listen_overflows: u64,
    /// Change of the namespace's `TcpExtListenDrops` over the run.
    pub namespace_listen_drops: u64,
    /// Time connections waited in the accept queues.
    #[serde(default)]
    pub waits: AcceptWaits,
}

/// Asks sock_diag about the target's listeners, in the target's network namespace.
pub struct QueueSampler {
    pid: u32,
    socket: Socket,
    /// The target's listening sockets: inode -> port.
    listeners: HashMap<u64, u16>,
}

impl QueueSampler {
    /// Opens a sock_diag socket in the network namespace of `pid` (a socket keeps the namespace
    /// it was created in; `setns` moves only the short-lived thread that creates it).
    pub fn open(pid: u32) -> Result<Self, AcceptError> {
        let namespace = fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|cause| AcceptError::Namespace { pid, cause })?;
        let socket = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread alone, with a namespace fd we own.
                    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(AcceptError::Namespace {
                            pid,
                            cause: io::Error::last_os_error(),
                        });
                    }
                    let mut socket = Socket::new(NETLINK_SOCK_DIAG)
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    socket
                        .bind_auto()
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    socket
                        .connect(&SocketAddr::new(0, 0))
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    Ok(socket)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(AcceptError::Netlink {
                        cause: io::Error::other("the namespace thread failed"),
                    })
                })
        })?;
        let mut sampler = Self {
            pid,
            socket,
            listeners: HashMap::new(),
        };
        sampler.refresh_listeners();
        Ok(sampler)
    }

    /// Re-reads which sockets the target listens on (listeners come and go).
    pub fn refresh_listeners(&mut self) {
        if let Ok(listeners) = listening_sockets(self.pid) {
            self.listeners = listeners;
        }
    }

    pub fn has_listeners(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// The target's listening sockets: inode -> port.
    pub fn listeners(&self) -> &HashMap<u64, u16> {
        &self.listeners
    }

    /// The target's listeners now.
    pub fn sample(&mut self) -> Result<Vec<ListenerSample>, AcceptError> {
        let mut samples = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, &mut samples)?;
        }
        Ok(samples)
    }

    fn dump(&mut self, family: u8, samples: &mut Vec<ListenerSample>) -> Result<(), AcceptError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::SKMEMINFO,
            states: StateFlags::LISTEN,
            socket_id,
        };
        let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket
            .send(&buffer, 0)
            .map_err(|cause| AcceptError::Netlink { cause })?;

        let mut received = Vec::with_capacity(64 * 1024);
        loop {
            received.clear();
            self.socket
                .recv(&mut received, 0)
                .map_err(|cause| AcceptError::Netlink { cause })?;
            let mut offset = 0;
            while offset < received.len() {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..])
                    .map_err(|error| AcceptError::Netlink {
                    cause: io::Error::other(error.to_string()),
                })?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let inode = u64::from(response.header.inode);
                        if let Some(&port) = self.listeners.get(&inode) {
                            let drops = response.nlas.iter().find_map(|nla| match nla {
                                Nla::MemInfo(info) => Some(u64::from(info.drops)),
                                _ => None,
                            });
                            samples.push(ListenerSample {
                                inode,
                                port,
                                queue: response.header.recv_queue,
                                limit: response.header.send_queue,
                                drops: drops.unwrap_or(0),
                            });
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(error) => {
                        return Err(AcceptError::Netlink {
                            cause: io::Error::other(format!("{error:?}")),
                        });
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

/// The namespace's `TcpExtListenOverflows` and `TcpExtListenDrops`, as the target sees them.
pub fn namespace_listen_counters(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?;
    parse_listen_counters(&text)
}

fn parse_listen_counters(netstat: &str) -> Option<(u64, u64)> {
    let mut lines = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let fields: HashMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    Some((*fields.get("ListenOverflows")?, *fields.get("ListenDrops")?))
}

/// The drops of one sample interval on one port.
#[derive(Debug, Clone, Copy)]
struct Drops {
    time_ns: u64,
    port: u16,
    overflows: u64,
    max_queue: u32,
    limit: u32,
}

/// Turns samples into drops per interval and hands them to stalls or to `accept_overflow`.
#[derive(Debug, Default)]
pub struct AcceptTracker {
    /// Last drop counter per listening socket (inode).
    last_drops: HashMap<u64, u64>,
    /// Queue samples (time, port, queue, limit) for the stalls' longest queue.
    queues: VecDeque<(u64, u16, u32, u32)>,
    /// Drops not yet given to a stall or reported.
    unattributed: VecDeque<Drops>,
    totals: BTreeMap<u16, PortOverflows>,
}

impl AcceptTracker {
    /// Takes in a sample made at `time_ns`; returns each port's longest queue and new drops.
    pub fn add(&mut self, time_ns: u64, samples: &[ListenerSample]) -> Vec<(u16, u32, u64)> {
        // Per port: (longest queue, limit, new drops), summed over its sockets.
        let mut ports: BTreeMap<u16, (u32, u32, u64)> = BTreeMap::new();
        for sample in samples {
            let previous = self.last_drops.insert(sample.inode, sample.drops);
            let overflows = previous.map_or(0, |previous| sample.drops.saturating_sub(previous));
            let (queue, limit, drops) = ports.entry(sample.port).or_default();
            *queue = (*queue).max(sample.queue);
            *limit = (*limit).max(sample.limit);
            *drops += overflows;
        }
        let mut added = Vec::new();
        for (port, (queue, limit, overflows)) in ports {
            let total = self.totals.entry(port).or_insert_with(|| PortOverflows {
                port,
                ..Default::default()
            });
            total.max_queue = total.max_queue.max(queue);
            total.limit = limit;
            total.overflows += overflows;
            if overflows > 0 {
                self.unattributed.push_back(Drops {
                    time_ns,
                    port,
                    overflows,
                    max_queue: queue,
                    limit,
                });
            }
            self.queues.push_back((time_ns, port, queue, limit));
            added.push((port, queue, overflows));
        }
        while self.queues.len() > HISTORY_SAMPLES {
            self.queues.pop_front();
        }
        added
    }

    /// The accept queues of the stall from `start_ns` to `end_ns` (sample just before asking).
    pub fn stall(&mut self, start_ns: u64, end_ns: u64) -> StallAccept {
        let mut accept = StallAccept::default();
        for &(time_ns, _, queue, limit) in &self.queues {
            if (start_ns..=end_ns).contains(&time_ns) && queue >= accept.max_queue {
                accept.max_queue = queue;
                accept.limit = limit;
            }
        }
        self.unattributed.retain(|drops| {
            let inside = (start_ns..=end_ns).contains(&drops.time_ns);
            if inside {
                accept.overflows += drops.overflows;
                accept.max_queue = accept.max_queue.max(drops.max_queue);
                accept.limit = accept.limit.max(drops.limit);
            }
            !inside
        });
        accept
    }

    /// Drops that happened before `before_ns` and belong to no stall, one report per port
    /// (timed at its first drop).
    pub fn take_outside_stalls(
        &mut self,
        before_ns: u64,
        clock: &crate::clock::WallClock,
    ) -> Vec<AcceptOverflow> {
        let mut reported: Vec<AcceptOverflow> = Vec::new();
        while self
            .unattributed
            .front()
            .is_some_and(|drops| drops.time_ns < before_ns)
        {
            let drops = self.unattributed.pop_front().expect("checked above");
            match reported.iter_mut().find(|report| report.port == drops.port) {
                Some(report) => {
                    report.overflows += drops.overflows;
                    report.max_queue = report.max_queue.max(drops.max_queue);
                }
                None => reported.push(AcceptOverflow {
                    time: clock.at(drops.time_ns),
                    port: drops.port,
                    overflows: drops.overflows,
                    max_queue: drops.max_queue,
                    limit: drops.limit,
                }),
            }
        }
        reported
    }

    pub fn ports(&self) -> Vec<PortOverflows> {
        self.totals.values().cloned().collect()
    }
}

/// Connections entering the accept queues (handshakes) and leaving them (the target's
/// accepts), from the kernel's events. A listener's accept queue is first in, first out, so
/// the n-th connection accepted on a port is the n-th that entered it.
pub struct ConnectionTracker {
    pid: u32,
    /// Per port, when each waiting connection entered the queue.
    queued: HashMap<u16, VecDeque<u64>>,
    /// Recent connections: (time, client address).
    recent: VecDeque<(u64, std::net::IpAddr)>,
    /// Listening fd -> its port (None: not a listener of the target).
    fd_ports: HashMap<i64, Option<u16>>,
    waits_ns: Histogram<u64>,
    connections: u64,
}

impl ConnectionTracker {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            queued: HashMap::new(),
            recent: VecDeque::new(),
            fd_ports: HashMap::new(),
            waits_ns: Histogram::new_with_bounds(1, 3_600_000_000_000, 2)
                .expect("constant bounds are valid"),
            connections: 0,
        }
    }

    /// Tracks process `pid` from now on (after a restart or an exec), with the waits counted
    /// so far.
    pub fn follow(&mut self, pid: u32) {
        self.pid = pid;
        self.queued.clear();
        self.recent.clear();
        self.fd_ports.clear();
    }

    /// A connection entered the accept queue of `event.port`.
    pub fn connection(&mut self, event: &ConnectionEvent) {
        self.connections += 1;
        self.queued
            .entry(event.port)
            .or_default()
            .push_back(event.time_ns);
        self.recent
            .push_back((event.time_ns, client_address(event)));
        while self.recent.len() > RECENT_CONNECTIONS {
            self.recent.pop_front();
        }
    }

    /// The target accepted a connection; `listeners` maps socket inodes to ports.
    pub fn accepted(&mut self, event: &AcceptEvent, listeners: &HashMap<u64, u16>) {
        let pid = self.pid;
        let port = *self.fd_ports.entry(event.listen_fd).or_insert_with(|| {
            let link = fs::read_link(format!("/proc/{pid}/fd/{}", event.listen_fd)).ok()?;
            let inode: u64 = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            listeners.get(&inode).copied()
        });
        if let Some(entered_ns) = port.and_then(|port| self.queued.get_mut(&port)?.pop_front()) {
            let _ = self
                .waits_ns
                .record(event.time_ns.saturating_sub(entered_ns).max(1));
        }
    }

    /// Forgets fd -> port answers (listeners changed).
    pub fn forget_listening_fds(&mut self) {
        self.fd_ports.clear();
    }

    /// Connections that entered a queue from `start_ns` to `end_ns`, and their top clients.
    pub fn stall(&self, start_ns: u64, end_ns: u64) -> (u64, Vec<ClientConnections>) {
        let mut clients: HashMap<std::net::IpAddr, u64> = HashMap::new();
        for (_, addr) in self
            .recent
            .iter()
            .filter(|(time_ns, _)| (start_ns..=end_ns).contains(time_ns))
        {
            *clients.entry(*addr).or_default() += 1;
        }
        let total = clients.values().sum();
        let mut top: Vec<ClientConnections> = clients
            .into_iter()
            .map(|(addr, connections)| ClientConnections {
                addr: addr.to_string(),
                connections,
            })
            .collect();
        top.sort_by(|a, b| {
            b.connections
                .cmp(&a.connections)
                .then_with(|| a.addr.cmp(&b.addr))
        });
        top.truncate(TOP_CLIENTS);
        (total, top)
    }

    pub fn waits(&self) -> AcceptWaits {
        let us = |quantile| self.waits_ns.value_at_quantile(quantile) / 1_000;
        AcceptWaits {
            connections: self.connections,
            accepted: self.waits_ns.len(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: self.waits_ns.max() / 1_000,
        }
    }
}

/// The client address of a connection event.
fn client_address(event: &ConnectionEvent) -> std::net::IpAddr {
    const AF_INET: u16 = 2;
    if event.family == AF_INET {
        let [a, b, c, d, ..] = event.client_addr;
        std::net::IpAddr::from([a, b, c, d])
    } else {
        std::net::IpAddr::from(event.client_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(port: u16, queue: u32, drops: u64) -> ListenerSample {
        ListenerSample {
            inode: u64::from(port),
            port,
            queue,
            limit: 16,
            drops,
        }
    }

    #[test]
    fn drops_inside_a_stall_belong_to_it_and_the_others_are_reported() {
        let mut tracker = AcceptTracker::default();
        tracker.add(100, &[sample(6379, 0, 5)]);
        tracker.add(200, &[sample(6379, 3, 7)]); // before the stall: 2
        tracker.add(300, &[sample(6379, 17, 27)]); // in it: 20
        tracker.add(400, &[sample(6379, 17, 57)]); // in it: 30
        tracker.add(500, &[sample(6379, 0, 58)]); // after it: 1
        let stall = tracker.stall(250, 450);
        assert_eq!(
            stall,
            StallAccept {
                overflows: 50,
                max_queue: 17,
                limit: 16,
                ..Default::default()
            }
        );
        let reported = tracker.take_outside_stalls(1_000, &crate::clock::WallClock::new());
        let overflows: Vec<u64> = reported.iter().map(|r| r.overflows).collect();
        assert_eq!(
            overflows,
            [3],
            "the drops before and after the stall, in one report for the port"
        );
        assert_eq!(
            tracker.ports()[0].overflows,
            53,
            "the first sample is the baseline"
        );
    }

    #[test]
    fn the_ipv4_and_ipv6_listeners_of_a_port_are_counted_apart_then_summed() {
        let mut tracker = AcceptTracker::default();
        let v4 = |drops| ListenerSample {
            inode: 1,
            port: 6379,
            queue: 2,
            limit: 16,
            drops,
        };
        let v6 = |drops| ListenerSample {
            inode: 2,
            port: 6379,
            queue: 5,
            limit: 16,
            drops,
        };
        tracker.add(100, &[v4(500), v6(0)]);
        assert_eq!(tracker.add(200, &[v4(510), v6(3)]), [(6379, 5, 13)]);
        assert_eq!(tracker.add(300, &[v4(510), v6(3)]), [(6379, 5, 0)]);
        assert_eq!(tracker.ports()[0].overflows, 13);
    }

    fn connection(time_ns: u64, port: u16, last_octet: u8) -> ConnectionEvent {
        let mut client_addr = [0; 16];
        client_addr[..4].copy_from_slice(&[10, 0, 0, last_octet]);
        ConnectionEvent {
            kind: 5,
            port,
            family: 2,
            time_ns,
            client_port: 40_000,
            _padding: [0; 6],
            client_addr,
        }
    }

    #[test]
    fn connections_are_counted_per_client_and_their_waits_matched_first_in_first_out() {
        let mut tracker = ConnectionTracker::new(u32::MAX - 1);
        for (time_ns, octet) in [(100, 7), (200, 7), (300, 8), (5_000_000, 7)] {
            tracker.connection(&connection(time_ns, 6379, octet));
        }
        let (count, top) = tracker.stall(150, 400);
        assert_eq!(count, 2);
        assert_eq!(
            top,
            [
                ClientConnections {
                    addr: "10.0.0.7".into(),
                    connections: 1
                },
                ClientConnections {
                    addr: "10.0.0.8".into(),
                    connections: 1
                },
            ]
        );
        // The fd cannot be resolved in a process that does not exist: the accept is not matched.
        let accept = AcceptEvent {
            kind: 6,
            tid: 1,
            time_ns: 1_000_000_100,
            listen_fd: 3,
            result: 9,
        };
        tracker.accepted(&accept, &HashMap::new());
        assert_eq!(tracker.waits().accepted, 0);
        // Once the fd is known to be the port's listener, the oldest connection leaves first.
        tracker.fd_ports.insert(3, Some(6379));
        tracker.accepted(&accept, &HashMap::new());
        let waits = tracker.waits();
        assert_eq!((waits.connections, waits.accepted), (4, 1));
        assert!((995_000..=1_005_000).contains(&waits.max_us), "{waits:?}"); // entered at 100 ns
    }

    #[test]
    fn ipv6_clients_keep_their_address() {
        let mut event = connection(1, 6379, 0);
        event.family = 10;
        event.client_addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(client_address(&event).to_string(), "::1");
    }

    #[test]
    fn netstat_counters_are_read_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\nTcpExt: 0 12 14 99\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_counters(netstat), Some((12, 14)));
        assert_eq!(parse_listen_counters("IpExt: a\nIpExt: 1\n"), None);
    }

    #[test]
    fn our_own_listener_is_sampled_with_its_queue_and_limit() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _waiting = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut sampler = QueueSampler::open(std::process::id()).unwrap();
        let samples = sampler.sample().unwrap();
        let ours = samples
            .iter()
            .find(|s| s.port == port)
            .expect("our listener");
        assert_eq!(ours.queue, 1, "one connection waits to be accepted");
        assert!(ours.limit >= 128, "std's backlog: {ours:?}");
    }
}
