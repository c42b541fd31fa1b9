//! Connections entering the target's accept queues (handshakes) and leaving them (its
//! accepts), from the kernel's events: new connections and top clients per stall, and how long
//! accepted connections waited.
use std::{
    collections::{HashMap, VecDeque},
    fs,
};

use hdrhistogram::Histogram;
use profiler_common::{AcceptEvent, ConnectionEvent};

use crate::output::record::{AcceptWaits, ClientConnections};

/// Clients ranked in a stall.
const TOP_CLIENTS: usize = 5;
/// Connections remembered for the stalls' counts: a storm of this many in one stall is counted
/// in full.
const RECENT_CONNECTIONS: usize = 100_000;
/// Connections waiting per port at most: more than the largest accept queue (`somaxconn` is
/// at most 65,535); older ones were accepted unseen and are forgotten.
const MAX_QUEUED_PER_PORT: usize = 65_536;

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
    /// Queued connections forgotten past [`MAX_QUEUED_PER_PORT`].
    forgotten: u64,
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
            forgotten: 0,
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
        let queued = self.queued.entry(event.port).or_default();
        queued.push_back(event.time_ns);
        if queued.len() > MAX_QUEUED_PER_PORT {
            queued.pop_front();
            self.forgotten += 1;
        }
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
            forgotten: self.forgotten,
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: self.waits_ns.max() / 1_000,
        }
    }
}

/// The client address of a connection event.
pub fn client_address(event: &ConnectionEvent) -> std::net::IpAddr {
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

    fn connection(time_ns: u64, port: u16, last_octet: u8) -> ConnectionEvent {
        let mut client_addr = [0; 16];
        client_addr[..4].copy_from_slice(&[10, 0, 0, last_octet]);
        ConnectionEvent {
            kind: 5,
            port,
            family: 2,
            time_ns,
            client_port: 40_000,
            _padding: 0,
            pid: 1,
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
            pid: 1,
            _padding: 0,
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
}
