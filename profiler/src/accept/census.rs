//! The census of a target's client connections: per client address, the connections
//! established now (sock_diag, with how long each has been idle and what it received), and
//! those opened and closed since the last census (the kernel's events, so short-lived ones
//! count too).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::SystemTime,
};

use super::sampler::ConnectionSample;
use crate::{
    bounded::BoundedMap,
    output::record::{ClientCensus, ConnectionCensus, ConnectionTotals, IdleTimes},
};

/// Client addresses listed per census; metrics name these (and sum the rest as `other`).
pub const TOP_ADDRESSES: usize = 20;
/// Client addresses kept with their own counts, per interval and over the run (a client that
/// cycles through addresses, as IPv6 privacy addresses do, cannot grow them further).
const KEPT_ADDRESSES: usize = 4096;
/// The name the addresses past [`KEPT_ADDRESSES`] are counted under.
const OTHER_ADDRESSES: &str = "other";

/// Opens and closes per address since the last census, and what each connection had
/// received at the last one.
#[derive(Debug)]
pub struct Census {
    opened: BoundedMap<IpAddr, u64>,
    closed: BoundedMap<IpAddr, u64>,
    /// Socket inode -> bytes received at the last census (the connections established then).
    received_at_last: HashMap<u64, u64>,
    /// Over the run: per address (opened, closed) and bytes received, and the most
    /// connections at once.
    run_opened_closed: BoundedMap<IpAddr, (u64, u64)>,
    run_received: BoundedMap<IpAddr, u64>,
    max_established: u64,
    last: Option<ConnectionCensus>,
}

impl Default for Census {
    fn default() -> Self {
        Self {
            opened: BoundedMap::new(KEPT_ADDRESSES),
            closed: BoundedMap::new(KEPT_ADDRESSES),
            received_at_last: HashMap::new(),
            run_opened_closed: BoundedMap::new(KEPT_ADDRESSES),
            run_received: BoundedMap::new(KEPT_ADDRESSES),
            max_established: 0,
            last: None,
        }
    }
}

impl Census {
    pub fn opened(&mut self, client: IpAddr) {
        *self.opened.entry(client) += 1;
        self.run_opened_closed.entry(client).0 += 1;
    }

    pub fn closed(&mut self, client: IpAddr) {
        *self.closed.entry(client) += 1;
        self.run_opened_closed.entry(client).1 += 1;
    }

    /// The census of `connections` (the target's connections now), `seconds` after the last;
    /// `None` when there is nothing to tell (no connection, none opened or closed).
    pub fn take(
        &mut self,
        connections: &[ConnectionSample],
        seconds: f64,
    ) -> Option<ConnectionCensus> {
        let opened = self.opened.take();
        let closed = self.closed.take();
        let received_at_last = std::mem::take(&mut self.received_at_last);
        if connections.is_empty() && opened.is_empty() && closed.is_empty() {
            self.last = None;
            return None;
        }
        let mut idle: HashMap<IpAddr, Vec<u64>> = HashMap::new();
        let mut received: HashMap<IpAddr, u64> = HashMap::new();
        for connection in connections {
            let idle_ms = u64::from(connection.idle_ms.unwrap_or(0));
            idle.entry(connection.client).or_default().push(idle_ms);
            if let Some(bytes) = connection.received_bytes {
                let before = received_at_last
                    .get(&connection.inode)
                    .copied()
                    .unwrap_or(0);
                let new_bytes = bytes.saturating_sub(before);
                *received.entry(connection.client).or_default() += new_bytes;
                *self.run_received.entry(connection.client) += new_bytes;
                self.received_at_last.insert(connection.inode, bytes);
            }
        }
        let addresses: HashSet<IpAddr> = idle
            .keys()
            .chain(opened.iter().map(|(addr, _)| addr))
            .chain(closed.iter().map(|(addr, _)| addr))
            .copied()
            .collect();
        let mut clients: Vec<ClientCensus> = addresses
            .into_iter()
            .map(|addr| ClientCensus {
                addr: addr.to_string(),
                established: idle.get(&addr).map_or(0, |times| times.len() as u64),
                opened: opened.get(&addr).copied().unwrap_or(0),
                closed: closed.get(&addr).copied().unwrap_or(0),
                received_bytes: received.get(&addr).copied().unwrap_or(0),
                idle_ms: idle
                    .get_mut(&addr)
                    .map(|times| idle_times(times))
                    .unwrap_or_default(),
            })
            .collect();
        if opened.other().is_some() || closed.other().is_some() {
            clients.push(ClientCensus {
                addr: OTHER_ADDRESSES.to_owned(),
                opened: opened.other().copied().unwrap_or(0),
                closed: closed.other().copied().unwrap_or(0),
                ..ClientCensus::default()
            });
        }
        rank(&mut clients);
        let established = connections.len() as u64;
        self.max_established = self.max_established.max(established);
        let census = ConnectionCensus {
            instance: Default::default(),
            time: SystemTime::now(),
            seconds,
            established,
            opened: opened.values().sum(),
            closed: closed.values().sum(),
            addresses: idle.len() as u64,
            clients,
        };
        self.last = Some(census.clone());
        Some(census)
    }

    /// The run's totals: opens and closes per address, the most connections at once, and the
    /// last census's connections.
    pub fn totals(&self) -> ConnectionTotals {
        let last: HashMap<&str, &ClientCensus> = self
            .last
            .iter()
            .flat_map(|census| &census.clients)
            .map(|client| (client.addr.as_str(), client))
            .collect();
        let addresses: HashSet<String> = self
            .run_opened_closed
            .iter()
            .map(|(addr, _)| addr.to_string())
            .chain(last.keys().map(|addr| (*addr).to_owned()))
            .filter(|addr| addr != OTHER_ADDRESSES)
            .collect();
        let mut clients: Vec<ClientCensus> = addresses
            .into_iter()
            .map(|addr| {
                let ip = addr.parse::<IpAddr>().ok();
                let (opened, closed) = ip
                    .and_then(|ip| self.run_opened_closed.get(&ip).copied())
                    .unwrap_or_default();
                let now = last.get(addr.as_str());
                ClientCensus {
                    established: now.map_or(0, |client| client.established),
                    idle_ms: now.map_or(IdleTimes::default(), |client| client.idle_ms),
                    received_bytes: ip
                        .and_then(|ip| self.run_received.get(&ip).copied())
                        .unwrap_or(0),
                    opened,
                    closed,
                    addr,
                }
            })
            .collect();
        let folded = self.run_opened_closed.folded() + self.run_received.folded();
        if folded > 0 {
            let (opened, closed) = self.run_opened_closed.other().copied().unwrap_or_default();
            clients.push(ClientCensus {
                addr: OTHER_ADDRESSES.to_owned(),
                opened,
                closed,
                received_bytes: self.run_received.other().copied().unwrap_or(0),
                ..ClientCensus::default()
            });
        }
        rank(&mut clients);
        ConnectionTotals {
            opened: self
                .run_opened_closed
                .values()
                .map(|(opened, _)| opened)
                .sum(),
            closed: self
                .run_opened_closed
                .values()
                .map(|(_, closed)| closed)
                .sum(),
            max_established: self.max_established,
            clients,
            addresses_folded: folded,
        }
    }
}

/// Most established first, then most opened, then by address; the top [`TOP_ADDRESSES`].
fn rank(clients: &mut Vec<ClientCensus>) {
    clients.sort_by(|a, b| {
        (b.established, b.opened, &a.addr).cmp(&(a.established, a.opened, &b.addr))
    });
    clients.truncate(TOP_ADDRESSES);
}

fn idle_times(times: &mut [u64]) -> IdleTimes {
    times.sort_unstable();
    IdleTimes {
        min: times.first().copied().unwrap_or(0),
        p50: times.get(times.len() / 2).copied().unwrap_or(0),
        max: times.last().copied().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(inode: u64, client: &str, idle_ms: u32, received: u64) -> ConnectionSample {
        ConnectionSample {
            inode,
            client: client.parse().unwrap(),
            client_port: 40_000,
            queued_bytes: 0,
            idle_ms: Some(idle_ms),
            received_bytes: Some(received),
        }
    }

    #[test]
    fn a_pool_of_idle_connections_and_a_client_that_reconnects_stand_apart() {
        let mut census = Census::default();
        let pool: Vec<ConnectionSample> = (0..200)
            .map(|index| connection(index, "127.0.0.2", 1_000 + index as u32 * 10, 140))
            .collect();
        let churner: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..30 {
            census.opened(churner);
            census.closed(churner);
        }
        let first = census.take(&pool, 1.0).unwrap();
        assert_eq!(
            (first.established, first.opened, first.closed),
            (200, 30, 30)
        );
        assert_eq!(first.addresses, 1);
        let top = &first.clients[0];
        assert_eq!((top.addr.as_str(), top.established), ("127.0.0.2", 200));
        assert_eq!(
            top.idle_ms,
            IdleTimes {
                min: 1_000,
                p50: 2_000,
                max: 2_990
            }
        );
        assert_eq!(top.received_bytes, 200 * 140);
        let other = &first.clients[1];
        assert_eq!(
            (other.addr.as_str(), other.opened, other.closed),
            ("127.0.0.3", 30, 30)
        );
        // The next census counts only what each connection received since.
        let later: Vec<ConnectionSample> = pool
            .iter()
            .map(|sample| ConnectionSample {
                received_bytes: Some(154),
                ..*sample
            })
            .collect();
        let second = census.take(&later, 1.0).unwrap();
        assert_eq!(second.clients[0].received_bytes, 200 * 14);
        assert_eq!((second.opened, second.closed), (0, 0));
        let totals = census.totals();
        assert_eq!(
            (totals.opened, totals.closed, totals.max_established),
            (30, 30, 200)
        );
        assert_eq!(totals.clients[0].established, 200);
        assert_eq!(totals.clients[0].received_bytes, 200 * 154);
    }

    #[test]
    fn a_client_cycling_through_addresses_is_counted_under_other_past_the_limit() {
        let mut census = Census::default();
        let addresses = KEPT_ADDRESSES as u32 + 500;
        for index in 0..addresses {
            let client = IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(index),
            ));
            census.opened(client);
            census.closed(client);
        }
        assert!(census.run_opened_closed.iter().count() <= KEPT_ADDRESSES);
        let interval = census.take(&[], 10.0).unwrap();
        assert_eq!(
            (interval.opened, interval.closed),
            (u64::from(addresses), u64::from(addresses))
        );
        let totals = census.totals();
        assert_eq!(
            (totals.opened, totals.closed),
            (u64::from(addresses), u64::from(addresses))
        );
        assert_eq!(totals.addresses_folded, 2 * 500);
        let other = totals
            .clients
            .iter()
            .find(|client| client.addr == "other")
            .unwrap();
        assert_eq!((other.opened, other.closed), (500, 500));
    }

    #[test]
    fn nothing_connected_and_nothing_opened_gives_no_census() {
        assert_eq!(Census::default().take(&[], 1.0), None);
    }
}
