//! Accept queues of the target's listening TCP sockets: sampled with netlink sock_diag
//! ([`sampler`]), turned into drops per stall or outside stalls ([`tracker`]), with the
//! connections entering and leaving the queues ([`connections`]) and the namespace's
//! `TcpExtListenOverflows` / `ListenDrops`, and the census of the client connections
//! ([`census`]). [`AcceptWatch`] is all of it for one target.
pub mod census;
pub mod clients;
pub mod connections;
pub mod sampler;
pub mod tracker;

use std::{collections::HashMap, fs};

use profiler_common::{AcceptEvent, ConnectionEvent};

pub use census::Census;
pub use clients::{RunningSnapshot, SeenRead};
pub use connections::{ConnectionTracker, client_address};
pub use sampler::{AcceptError, NamespaceSamplers, QueueSampler};
pub use tracker::AcceptTracker;

use crate::{
    clock::{WallClock, monotonic_now_ns},
    metrics::InstanceMetrics,
    output::record::{
        AcceptOverflow, AcceptSummary, ConnectionCensus, ConnectionTotals, StallAccept,
        StallClient, StallWaiters,
    },
    stall::LastRead,
};

/// The watch on one target's accept queues.
pub struct AcceptWatch {
    pid: u32,
    sampler: QueueSampler,
    tracker: AcceptTracker,
    connections: ConnectionTracker,
    census: Census,
    /// The namespace's (ListenOverflows, ListenDrops) when the run began.
    namespace_counters_at_start: Option<(u64, u64)>,
    clock: WallClock,
    /// Whether a sampling failure was reported already.
    sampling_failed: bool,
    /// The server's connections seen while the current long iteration ran: the first dump
    /// (for its sender) and the last (for who it held up).
    running: Option<(RunningSnapshot, RunningSnapshot)>,
}

impl AcceptWatch {
    /// Opens the watch on process `pid`'s listeners (in its network namespace, with the
    /// sampler `samplers` has for it).
    pub fn open(
        pid: u32,
        clock: WallClock,
        samplers: &NamespaceSamplers,
    ) -> Result<Self, AcceptError> {
        let sampler = QueueSampler::open(pid, samplers)?;
        warn_without_listeners(&sampler, pid);
        Ok(Self {
            pid,
            sampler,
            tracker: AcceptTracker::default(),
            connections: ConnectionTracker::new(pid),
            census: Census::default(),
            namespace_counters_at_start: namespace_listen_counters(pid),
            clock,
            sampling_failed: false,
            running: None,
        })
    }

    /// Watches process `pid` from now on, the totals kept; `sampler` is its own when it is
    /// another process (`--follow`), `None` when the same one ran a new program.
    pub fn retarget(&mut self, pid: u32, sampler: Option<QueueSampler>) {
        if let Some(sampler) = sampler {
            warn_without_listeners(&sampler, pid);
            self.sampler = sampler;
        }
        self.pid = pid;
        self.connections.follow(pid);
    }

    /// A connection entered an accept queue.
    pub fn connection(&mut self, event: &ConnectionEvent) {
        self.connections.connection(event);
        self.census.opened(client_address(event));
    }

    /// A connection to a listener closed.
    pub fn connection_closed(&mut self, event: &ConnectionEvent) {
        self.census.closed(client_address(event));
    }

    /// The census of the client connections, `seconds` after the last; `None` when there is
    /// nothing to tell. A failure is reported once (with the accept queues').
    pub fn census(&mut self, seconds: f64) -> Option<ConnectionCensus> {
        let connections = match self.sampler.connections() {
            Ok(connections) => connections,
            Err(error) => {
                self.report_sampling_failure(&error);
                Vec::new()
            }
        };
        self.census.take(&connections, seconds)
    }

    /// The census over the run.
    pub fn census_totals(&self) -> ConnectionTotals {
        self.census.totals()
    }

    fn report_sampling_failure(&mut self, error: &AcceptError) {
        if !std::mem::replace(&mut self.sampling_failed, true) {
            log::warn!(
                "{}; accept-queue and connection figures may be incomplete",
                crate::error_chain::error_chain(error)
            );
        }
    }

    /// The target accepted a connection.
    pub fn accepted(&mut self, event: &AcceptEvent) {
        self.connections.accepted(event, self.sampler.listeners());
    }

    /// Samples the accept queues; a failure is reported once and sampling goes on.
    pub fn sample(&mut self, metrics: Option<&InstanceMetrics>) {
        let samples = match self.sampler.sample() {
            Ok(samples) => samples,
            Err(error) => {
                self.report_sampling_failure(&error);
                return;
            }
        };
        let added = self.tracker.add(monotonic_now_ns(), &samples);
        if let Some(metrics) = metrics {
            for (port, queue, overflows) in added {
                metrics.observe_accept_queue(port, queue, overflows);
            }
        }
    }

    /// Dumps the server's connections while the iteration that began at `iteration_start_ns`
    /// runs past the gate (see [`clients`]), and names the descriptor `read_fd` the loop last
    /// read from (`--clients exact`); a failure is reported once.
    pub fn see_running_iteration(&mut self, iteration_start_ns: u64, read_fd: Option<u32>) {
        // Before the dump: its idle times are counted from about now.
        let taken_ns = monotonic_now_ns();
        let connections = match self.sampler.connections() {
            Ok(connections) => connections,
            Err(error) => return self.report_sampling_failure(&error),
        };
        let named_before = self
            .running
            .as_ref()
            .filter(|(first, _)| first.iteration_start_ns == iteration_start_ns)
            .and_then(|(first, _)| first.read.clone());
        let read = read_fd.map(|fd| match named_before {
            Some(seen) if seen.fd == fd => seen,
            _ => SeenRead::name(self.pid, fd, || connections.clone()),
        });
        let seen = RunningSnapshot {
            iteration_start_ns,
            taken_ns,
            connections,
            read,
        };
        match &mut self.running {
            Some((first, last)) if first.iteration_start_ns == iteration_start_ns => *last = seen,
            running => *running = Some((seen.clone(), seen)),
        }
    }

    /// The clients of the stall from `start_ns` to `end_ns` whose origin is `origin`: who sent
    /// its command (`last_read`: the loop's last read, with `--clients exact`), and who it held
    /// up when it was last seen running.
    pub fn stall_clients(
        &mut self,
        start_ns: u64,
        end_ns: u64,
        origin: &str,
        last_read: Option<&LastRead>,
    ) -> (StallClient, Option<StallWaiters>) {
        let running = self
            .running
            .take()
            .filter(|(first, _)| first.iteration_start_ns == start_ns);
        let sampler = &mut self.sampler;
        let client = clients::stall_client(
            origin,
            running.as_ref().map(|(first, _)| first),
            last_read,
            || sampler.connections().unwrap_or_default(),
            self.pid,
        );
        (client, running.map(|(_, last)| last.waiters(end_ns)))
    }

    /// The accept queues during the stall from `start_ns` to `end_ns`, sampled up to its end;
    /// `None` when the target has no TCP listener.
    pub fn stall(
        &mut self,
        start_ns: u64,
        end_ns: u64,
        metrics: Option<&InstanceMetrics>,
    ) -> Option<StallAccept> {
        if !self.sampler.has_listeners() {
            return None;
        }
        self.sample(metrics);
        let mut accept = self.tracker.stall(start_ns, end_ns);
        (accept.new_connections, accept.top_clients) = self.connections.stall(start_ns, end_ns);
        Some(accept)
    }

    /// Re-reads the listeners; returns their ports.
    pub fn refresh_listeners(&mut self) -> Vec<u16> {
        self.sampler.refresh_listeners();
        self.connections.forget_listening_fds();
        let mut ports: Vec<u16> = self.sampler.listeners().values().copied().collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Drops before `before_ns` that no stall claimed, one report per port.
    pub fn overflows_outside_stalls(&mut self, before_ns: u64) -> Vec<AcceptOverflow> {
        self.tracker.take_outside_stalls(before_ns, &self.clock)
    }

    /// The accept-queue part of the summary.
    pub fn summary(&self) -> AcceptSummary {
        let now = namespace_listen_counters(self.pid);
        let (overflows, drops) = match (self.namespace_counters_at_start, now) {
            (Some((overflows_then, drops_then)), Some((overflows_now, drops_now))) => (
                overflows_now.saturating_sub(overflows_then),
                drops_now.saturating_sub(drops_then),
            ),
            _ => (0, 0),
        };
        AcceptSummary {
            ports: self.tracker.ports(),
            namespace_listen_overflows: overflows,
            namespace_listen_drops: drops,
            waits: self.connections.waits(),
        }
    }
}

fn warn_without_listeners(sampler: &QueueSampler, pid: u32) {
    if !sampler.has_listeners() {
        log::warn!(
            "process {pid} has no TCP listener (a unix socket only?); accept queues are watched if one appears"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_counters_are_read_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\nTcpExt: 0 12 14 99\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_counters(netstat), Some((12, 14)));
        assert_eq!(parse_listen_counters("IpExt: a\nIpExt: 1\n"), None);
    }
}
