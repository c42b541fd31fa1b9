//! The HTTP endpoint: `/metrics` served by hyper on a thread of its own with its own runtime,
//! so neither a slow scraper nor a flood of connections holds up the thread that drains the
//! kernel's events. Whoever reaches the port is a stranger, so every resource is bounded: at
//! most [`MAX_CONNECTIONS`] at once (one more closes the oldest), a request's head must
//! arrive within [`HEADER_READ_TIMEOUT`], a connection lasts at most [`CONNECTION_LIFETIME`],
//! and failing accepts (no descriptor left) back off instead of spinning. The thread holds no
//! capability.
use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::AbortHandle};

use super::Metrics;
use crate::privileges;

/// Connections served at once; a scraper needs one.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open, requests and keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The first and the longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Serves `/metrics` on `listener` (non-blocking) from a thread of its own until the process
/// ends.
pub fn spawn_server(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            if let Err(error) = privileges::drop_all_in_this_thread() {
                log::warn!("metrics: cannot drop this thread's capabilities: {error}");
            }
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    runtime.block_on(async {
                        serve(TcpListener::from_std(listener)?, metrics).await;
                        Ok(())
                    })
                });
            if let Err(error) = served {
                log::warn!("cannot serve metrics: {error}");
            }
        })
        .map(drop)
}

/// Accepts connections for ever, each served by a task of its own.
async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let open: Arc<Mutex<VecDeque<AbortHandle>>> = Arc::default();
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(error) => {
                log::debug!("metrics: cannot accept a connection: {error}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let mut open = open.lock().unwrap_or_else(|poison| poison.into_inner());
        open.retain(|connection| !connection.is_finished());
        if open.len() >= MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            oldest.abort();
        }
        let task = tokio::spawn(serve_connection(stream, Arc::clone(&metrics)));
        open.push_back(task.abort_handle());
    }
}

/// Serves one connection until it closes, stalls sending a request or outlives its time.
async fn serve_connection(stream: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let metrics = Arc::clone(&metrics);
        async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
        Ok(Err(error)) => log::debug!("metrics connection: {error}"),
        Err(_) => log::debug!("metrics connection closed after {CONNECTION_LIFETIME:?}"),
        Ok(Ok(())) => {}
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
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
