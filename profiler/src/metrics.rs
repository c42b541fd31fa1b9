//! Prometheus metrics at `/metrics` (`--metrics ADDR`): iteration and stall histograms, stalls
//! per origin and mechanism, madvise bytes and latency, lost events; every metric carries the
//! target's `pid` and `port`. Served by hyper on the run's own runtime.
use std::{borrow::Cow, convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::output::record::Stall;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    origin: String,
    mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    listen_port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MadviseLabels {
    thread_role: String,
    advice: String,
}

/// The run's metrics (atomics: shared with the HTTP task without a lock).
pub struct Metrics {
    registry: Registry,
    iterations: Histogram,
    stalls_seconds: Histogram,
    stalls: Family<CauseLabels, Counter>,
    madvise_bytes: Family<MadviseLabels, Counter>,
    madvise_seconds: Histogram,
    lost_events: Counter,
    accept_overflows: Family<PortLabels, Counter>,
    accept_queue: Family<PortLabels, Gauge>,
}

impl Metrics {
    pub fn new(pid: u32, port: Option<u16>) -> Self {
        let labels = [
            (Cow::Borrowed("pid"), Cow::Owned(pid.to_string())),
            (
                Cow::Borrowed("port"),
                Cow::Owned(port.map(|p| p.to_string()).unwrap_or_default()),
            ),
        ];
        let mut registry = Registry::with_prefix_and_labels("redis_stallprof", labels.into_iter());
        // 10 us .. ~84 s, doubling.
        let iterations = Histogram::new(exponential_buckets(0.000_01, 2.0, 24));
        // 1 ms .. ~33 s, doubling.
        let stalls_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let madvise_seconds = Histogram::new(exponential_buckets(0.000_001, 4.0, 14));
        let mut metrics = Self {
            registry: Registry::default(),
            iterations,
            stalls_seconds,
            stalls: Family::default(),
            madvise_bytes: Family::default(),
            madvise_seconds,
            lost_events: Counter::default(),
            accept_overflows: Family::default(),
            accept_queue: Family::default(),
        };
        metrics.register_all(&mut registry);
        metrics.registry = registry;
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
    }

    /// Adds `count` iterations of about `seconds` each.
    pub fn observe_iterations(&self, seconds: f64, count: u64) {
        for _ in 0..count {
            self.iterations.observe(seconds);
        }
    }

    pub fn observe_stall(&self, stall: &Stall) {
        self.stalls_seconds.observe(stall.duration_us as f64 / 1e6);
        let labels = CauseLabels {
            origin: stall.origin.clone(),
            mechanism: stall.mechanism.clone(),
        };
        self.stalls.get_or_create(&labels).inc();
    }

    pub fn observe_madvise(&self, thread_role: &str, advice: &str, bytes: u64, seconds: f64) {
        let labels = MadviseLabels {
            thread_role: thread_role.to_owned(),
            advice: advice.to_owned(),
        };
        self.madvise_bytes.get_or_create(&labels).inc_by(bytes);
        self.madvise_seconds.observe(seconds);
    }

    /// Takes in an accept-queue sample of a listening port.
    pub fn observe_accept_queue(&self, port: u16, queue: u32, new_overflows: u64) {
        let labels = PortLabels {
            listen_port: port.to_string(),
        };
        self.accept_queue
            .get_or_create(&labels)
            .set(i64::from(queue));
        self.accept_overflows
            .get_or_create(&labels)
            .inc_by(new_overflows);
    }

    /// Brings the lost-events counter up to `total`.
    pub fn set_lost_events(&self, total: u64) {
        let known = self.lost_events.get();
        if total > known {
            self.lost_events.inc_by(total - known);
        }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `/metrics` on `listener` until the run ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("metrics connection: {error}");
            }
        });
    }
}

fn respond(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            404,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        )
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_the_target_labels() {
        let metrics = Metrics::new(42, Some(6379));
        metrics.observe_iterations(0.000_02, 3);
        let stall = Stall::example("command:debug", "syscall.sleep", 250_000);
        metrics.observe_stall(&stall);
        metrics.observe_madvise("main", "MADV_DONTNEED", 4096, 0.000_1);
        metrics.set_lost_events(2);
        let text = metrics.encode();
        for expected in [
            "redis_stallprof_eventloop_iteration_seconds_count{pid=\"42\",port=\"6379\"} 3",
            "redis_stallprof_stall_seconds_count{pid=\"42\",port=\"6379\"} 1",
            "redis_stallprof_stalls_total{pid=\"42\",port=\"6379\",origin=\"command:debug\",mechanism=\"syscall.sleep\"} 1",
            "redis_stallprof_madvise_bytes_total{pid=\"42\",port=\"6379\",thread_role=\"main\",advice=\"MADV_DONTNEED\"} 4096",
            "redis_stallprof_lost_events_total{pid=\"42\",port=\"6379\"} 2",
            "# EOF",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }
}
