//! Prometheus metrics at `/metrics` (`--metrics ADDR`): iteration and stall histograms, stalls
//! per origin and mechanism, madvise bytes and latency, lost events, memory growth per origin
//! and mechanism, client connections per address (the top ones and `other`); every metric
//! carries its instance's `pid`, `port` and `server`. Served by hyper on a thread of its own
//! ([`serve`]).
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

mod labels;
mod serve;

use labels::{CauseLabels, ClientLabels, InstanceLabels, MadviseLabels, PortLabels};
pub use serve::spawn_server;

use crate::output::record::{ConnectionCensus, Instance, MemoryGrowth, Stall};

/// A histogram family's constructor (a plain fn: the families must be `Clone`).
type MakeHistogram = fn() -> Histogram;

/// 10 us .. ~84 s, doubling.
fn iteration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 24))
}

/// 1 ms .. ~33 s, doubling.
fn stall_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// 1 .. 32768 clients, doubling.
fn clients_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// 1 us .. ~67 s, times four.
fn madvise_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_001, 4.0, 14))
}

/// The run's metrics, every one labelled with its instance (atomics: shared with the HTTP
/// task without a lock).
pub struct Metrics {
    registry: Registry,
    iterations: Family<InstanceLabels, Histogram, MakeHistogram>,
    stalls_seconds: Family<InstanceLabels, Histogram, MakeHistogram>,
    stalls: Family<CauseLabels, Counter>,
    clients_held_up: Family<InstanceLabels, Histogram, MakeHistogram>,
    madvise_bytes: Family<MadviseLabels, Counter>,
    madvise_seconds: Family<InstanceLabels, Histogram, MakeHistogram>,
    lost_events: Family<InstanceLabels, Counter>,
    accept_overflows: Family<PortLabels, Counter>,
    accept_queue: Family<PortLabels, Gauge>,
    memory_growth: Family<CauseLabels, Counter>,
    new_page_bytes: Family<InstanceLabels, Counter>,
    given_back_bytes: Family<InstanceLabels, Counter>,
    resident_bytes: Family<InstanceLabels, Gauge>,
    client_connections: Family<ClientLabels, Gauge>,
    client_idle_seconds: Family<ClientLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    connections_opened: Family<InstanceLabels, Counter>,
    connections_closed: Family<InstanceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("redis_stallprof");
        let mut metrics = Self {
            registry: Registry::default(),
            iterations: Family::new_with_constructor(iteration_histogram),
            stalls_seconds: Family::new_with_constructor(stall_histogram),
            stalls: Family::default(),
            clients_held_up: Family::new_with_constructor(clients_histogram),
            madvise_bytes: Family::default(),
            madvise_seconds: Family::new_with_constructor(madvise_histogram),
            lost_events: Family::default(),
            accept_overflows: Family::default(),
            accept_queue: Family::default(),
            memory_growth: Family::default(),
            new_page_bytes: Family::default(),
            given_back_bytes: Family::default(),
            resident_bytes: Family::default(),
            client_connections: Family::default(),
            client_idle_seconds: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
        };
        metrics.register_all(&mut registry);
        metrics.registry = registry;
        metrics
    }

    /// The metrics of `instance`; its series without labels of their own are there from now,
    /// at zero.
    pub fn of(self: &Arc<Self>, instance: &Instance) -> InstanceMetrics {
        let metrics = InstanceMetrics {
            metrics: Arc::clone(self),
            labels: InstanceLabels::of(instance),
            series: Arc::default(),
        };
        metrics.create_series();
        metrics
    }

    /// Registers every metric (clones share their values) with its name and help.
    fn register_all(&self, registry: &mut Registry) {
        registry.register(
            "eventloop_iteration_seconds",
            "Event-loop iterations of the Redis main thread",
            self.iterations.clone(),
        );
        registry.register(
            "stall_seconds",
            "Event-loop iterations at or above the stall threshold",
            self.stalls_seconds.clone(),
        );
        registry.register(
            "stalls",
            "Stalls by what Redis was doing and where the time went",
            self.stalls.clone(),
        );
        registry.register(
            "stall_clients_held_up",
            "Client connections with requests waiting when a stall was last seen running, per stall",
            self.clients_held_up.clone(),
        );
        registry.register(
            "madvise_bytes",
            "Bytes advised by madvise calls, by thread role and advice",
            self.madvise_bytes.clone(),
        );
        registry.register(
            "madvise_seconds",
            "Duration of madvise calls of every thread",
            self.madvise_seconds.clone(),
        );
        registry.register(
            "lost_events",
            "Events the kernel could not send or userspace could not keep",
            self.lost_events.clone(),
        );
        registry.register(
            "accept_queue_overflows",
            "Connections a listening port dropped with its accept queue full",
            self.accept_overflows.clone(),
        );
        registry.register(
            "accept_queue_length",
            "Connections waiting in a listening port's accept queue",
            self.accept_queue.clone(),
        );
        registry.register(
            "memory_growth_bytes",
            "Resident memory faulted in (sampled page faults), by what Redis was doing and what the pages are for",
            self.memory_growth.clone(),
        );
        registry.register(
            "memory_new_page_bytes",
            "Pages the target's threads faulted in (every page fault on a page not present)",
            self.new_page_bytes.clone(),
        );
        registry.register(
            "memory_given_back_bytes",
            "Resident memory given back (pages faulted in minus the resident change)",
            self.given_back_bytes.clone(),
        );
        registry.register(
            "resident_bytes",
            "The target's resident memory (VmRSS) at the last interval",
            self.resident_bytes.clone(),
        );
        registry.register(
            "client_connections",
            "Established client connections by client address (the top addresses, then other)",
            self.client_connections.clone(),
        );
        registry.register(
            "client_connection_idle_seconds",
            "Median time since a client's connections last received data (the top addresses)",
            self.client_idle_seconds.clone(),
        );
        registry.register(
            "client_connections_opened",
            "Client connections opened (handshake completed)",
            self.connections_opened.clone(),
        );
        registry.register(
            "client_connections_closed",
            "Client connections closed",
            self.connections_closed.clone(),
        );
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Label sets of one kind an instance may create: past this, its series are labelled `other`
/// (origins come from the target's own symbols, thread roles from its thread names).
const MAX_SERIES_PER_KIND: usize = 256;
/// The label value of the series past [`MAX_SERIES_PER_KIND`].
const OTHER_LABEL: &str = "other";

/// The series an instance created besides its own labels' (removed with it).
#[derive(Default)]
struct InstanceSeries {
    stall_causes: HashSet<CauseLabels>,
    memory_causes: HashSet<CauseLabels>,
    madvise: HashSet<MadviseLabels>,
    ports: HashSet<PortLabels>,
    /// The client addresses its last census published (removed when they drop out).
    clients: Vec<String>,
}

/// `labels` if `created` has them or room for them, else `other` (made by `other`).
fn bounded_labels<L: Clone + Eq + std::hash::Hash>(
    created: &mut HashSet<L>,
    labels: L,
    other: impl FnOnce() -> L,
) -> L {
    if created.contains(&labels) || created.len() < MAX_SERIES_PER_KIND {
        created.insert(labels.clone());
        return labels;
    }
    let other = other();
    created.insert(other.clone());
    other
}

/// One instance's view of the run's metrics: what it records carries its labels.
#[derive(Clone)]
pub struct InstanceMetrics {
    metrics: Arc<Metrics>,
    labels: InstanceLabels,
    series: Arc<Mutex<InstanceSeries>>,
}

impl InstanceMetrics {
    /// The same metrics, now labelled with `instance` (after an exec or `--follow`): the
    /// series of the former labels are removed.
    pub fn relabel(&mut self, instance: &Instance) {
        let labels = InstanceLabels::of(instance);
        if labels != self.labels {
            self.forget();
            self.labels = labels;
        }
        self.create_series();
    }

    fn series(&self) -> std::sync::MutexGuard<'_, InstanceSeries> {
        self.series
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Removes every series of this instance (it exited, or took other labels): a run
    /// that outlives many servers (`--all`) shows only the live ones.
    pub fn forget(&self) {
        let metrics = &self.metrics;
        let labels = &self.labels;
        metrics.iterations.remove(labels);
        metrics.stalls_seconds.remove(labels);
        metrics.clients_held_up.remove(labels);
        metrics.madvise_seconds.remove(labels);
        metrics.lost_events.remove(labels);
        metrics.new_page_bytes.remove(labels);
        metrics.given_back_bytes.remove(labels);
        metrics.resident_bytes.remove(labels);
        metrics.connections_opened.remove(labels);
        metrics.connections_closed.remove(labels);
        let mut series = self.series();
        for cause in series.stall_causes.drain() {
            metrics.stalls.remove(&cause);
        }
        for cause in series.memory_causes.drain() {
            metrics.memory_growth.remove(&cause);
        }
        for madvise in series.madvise.drain() {
            metrics.madvise_bytes.remove(&madvise);
        }
        for port in series.ports.drain() {
            metrics.accept_queue.remove(&port);
            metrics.accept_overflows.remove(&port);
        }
        for client in series.clients.drain(..) {
            let client = ClientLabels {
                instance: labels.clone(),
                client,
            };
            metrics.client_connections.remove(&client);
            metrics.client_idle_seconds.remove(&client);
        }
    }

    fn create_series(&self) {
        let metrics = &self.metrics;
        drop(metrics.iterations.get_or_create(&self.labels));
        drop(metrics.stalls_seconds.get_or_create(&self.labels));
        drop(metrics.madvise_seconds.get_or_create(&self.labels));
        drop(metrics.lost_events.get_or_create(&self.labels));
    }

    /// Adds `count` iterations of about `seconds` each.
    pub fn observe_iterations(&self, seconds: f64, count: u64) {
        let histogram = self.metrics.iterations.get_or_create(&self.labels);
        for _ in 0..count {
            histogram.observe(seconds);
        }
    }

    pub fn observe_stall(&self, stall: &Stall) {
        self.metrics
            .stalls_seconds
            .get_or_create(&self.labels)
            .observe(stall.duration_us as f64 / 1e6);
        let labels = self.cause_labels(&stall.origin, &stall.mechanism, |series| {
            &mut series.stall_causes
        });
        self.metrics.stalls.get_or_create(&labels).inc();
        if let Some(waiting) = &stall.waiting {
            self.metrics
                .clients_held_up
                .get_or_create(&self.labels)
                .observe(waiting.connections as f64);
        }
    }

    /// The labels of a cause in the set `kind` picks (`other` past its bound).
    fn cause_labels(
        &self,
        origin: &str,
        mechanism: &str,
        kind: impl FnOnce(&mut InstanceSeries) -> &mut HashSet<CauseLabels>,
    ) -> CauseLabels {
        let labels = CauseLabels {
            instance: self.labels.clone(),
            origin: origin.to_owned(),
            mechanism: mechanism.to_owned(),
        };
        let mut series = self.series();
        bounded_labels(kind(&mut series), labels, || CauseLabels {
            instance: self.labels.clone(),
            origin: OTHER_LABEL.to_owned(),
            mechanism: OTHER_LABEL.to_owned(),
        })
    }

    pub fn observe_madvise(&self, thread_role: &str, advice: &str, bytes: u64, seconds: f64) {
        let labels = MadviseLabels {
            instance: self.labels.clone(),
            thread_role: thread_role.to_owned(),
            advice: advice.to_owned(),
        };
        let labels = bounded_labels(&mut self.series().madvise, labels, || MadviseLabels {
            instance: self.labels.clone(),
            thread_role: OTHER_LABEL.to_owned(),
            advice: OTHER_LABEL.to_owned(),
        });
        self.metrics
            .madvise_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
        self.metrics
            .madvise_seconds
            .get_or_create(&self.labels)
            .observe(seconds);
    }

    /// Takes in an accept-queue sample of a listening port.
    pub fn observe_accept_queue(&self, port: u16, queue: u32, new_overflows: u64) {
        let labels = PortLabels {
            instance: self.labels.clone(),
            listen_port: port.to_string(),
        };
        let labels = bounded_labels(&mut self.series().ports, labels, || PortLabels {
            instance: self.labels.clone(),
            listen_port: OTHER_LABEL.to_owned(),
        });
        self.metrics
            .accept_queue
            .get_or_create(&labels)
            .set(i64::from(queue));
        self.metrics
            .accept_overflows
            .get_or_create(&labels)
            .inc_by(new_overflows);
    }

    /// Takes in an interval's memory growth.
    pub fn observe_memory(&self, growth: &MemoryGrowth) {
        for entry in &growth.growth {
            let labels = self.cause_labels(&entry.origin, &entry.mechanism, |series| {
                &mut series.memory_causes
            });
            self.metrics
                .memory_growth
                .get_or_create(&labels)
                .inc_by(entry.bytes);
        }
        let metrics = &self.metrics;
        metrics
            .new_page_bytes
            .get_or_create(&self.labels)
            .inc_by(growth.new_page_bytes);
        metrics
            .given_back_bytes
            .get_or_create(&self.labels)
            .inc_by(growth.given_back_bytes);
        metrics
            .resident_bytes
            .get_or_create(&self.labels)
            .set(growth.resident_bytes as i64);
    }

    /// Takes in a census: the top addresses and `other` (whose series replace the last
    /// census's), and the opens and closes.
    pub fn observe_connections(&self, census: &ConnectionCensus) {
        let metrics = &self.metrics;
        let client = |client: &str| ClientLabels {
            instance: self.labels.clone(),
            client: client.to_owned(),
        };
        let mut series = self.series();
        let published = &mut series.clients;
        for gone in published.drain(..) {
            metrics.client_connections.remove(&client(&gone));
            metrics.client_idle_seconds.remove(&client(&gone));
        }
        let mut listed = 0;
        for entry in &census.clients {
            let labels = client(&entry.addr);
            metrics
                .client_connections
                .get_or_create(&labels)
                .set(entry.established as i64);
            metrics
                .client_idle_seconds
                .get_or_create(&labels)
                .set(entry.idle_ms.p50 as f64 / 1e3);
            listed += entry.established;
            published.push(entry.addr.clone());
        }
        metrics
            .client_connections
            .get_or_create(&client("other"))
            .set(census.established.saturating_sub(listed) as i64);
        published.push("other".to_owned());
        metrics
            .connections_opened
            .get_or_create(&self.labels)
            .inc_by(census.opened);
        metrics
            .connections_closed
            .get_or_create(&self.labels)
            .inc_by(census.closed);
    }

    /// Brings the lost-events counter up to `total`.
    pub fn set_lost_events(&self, total: u64) {
        let counter = self.metrics.lost_events.get_or_create(&self.labels);
        let known = counter.get();
        if total > known {
            counter.inc_by(total - known);
        }
    }
}

#[cfg(test)]
mod tests;
