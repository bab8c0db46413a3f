//! Upstream connection pools, one per cluster, and the cluster's circuit breakers
//! (`clusters[].circuitBreakers`): connections counted by the pool's connector, pending and
//! active requests by slots the request path holds.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::{Body, BoxError};
use crate::config::CircuitBreakers;

/// Connection pools, one per cluster (so each cluster's connections can be counted against
/// its `circuitBreakers.maxConnections`), made on a cluster's first request.
#[derive(Default)]
pub struct Clients {
    pools: parking_lot::Mutex<HashMap<String, Arc<Pool>>>,
}

/// One cluster's pools (HTTP/1.1 and h2c) and circuit breakers.
pub struct Pool {
    http1: Client<Counting, Body>,
    http2: Client<Counting, Body>,
    pub breakers: Arc<Breakers>,
}

impl Clients {
    /// The cluster's pool, its breaker limits set from the active configuration.
    pub fn pool(&self, cluster: &str, limits: &CircuitBreakers) -> Arc<Pool> {
        let pool = self
            .pools
            .lock()
            .entry(cluster.to_string())
            .or_insert_with(|| Arc::new(Pool::new()))
            .clone();
        pool.breakers.set_limits(limits);
        pool
    }
}

impl Pool {
    fn new() -> Pool {
        let breakers = Arc::new(Breakers::default());
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        let connector = Counting {
            inner,
            breakers: breakers.clone(),
        };
        Pool {
            http1: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            breakers,
        }
    }

    pub(crate) fn client(&self, http2: bool) -> &Client<Counting, Body> {
        if http2 { &self.http2 } else { &self.http1 }
    }
}

/// A cluster's three circuit breakers (Envoy's): counters and their limits. A request past
/// a limit is refused at once with 503 instead of queueing behind a struggling upstream.
#[derive(Default)]
pub struct Breakers {
    max: [AtomicUsize; 3],
    open: [AtomicUsize; 3],
}

/// Which breaker: the index into [`Breakers`] and the metric's `breaker` label.
#[derive(Clone, Copy, Debug)]
pub enum Breaker {
    Connections = 0,
    PendingRequests = 1,
    Requests = 2,
}

impl Breaker {
    pub fn label(self) -> &'static str {
        match self {
            Breaker::Connections => "max_connections",
            Breaker::PendingRequests => "max_pending_requests",
            Breaker::Requests => "max_requests",
        }
    }
}

impl Breakers {
    fn set_limits(&self, l: &CircuitBreakers) {
        self.max[0].store(l.max_connections, Ordering::Relaxed);
        self.max[1].store(l.max_pending_requests, Ordering::Relaxed);
        self.max[2].store(l.max_requests, Ordering::Relaxed);
    }

    /// Takes one slot of `which`, or `None` when it is full.
    pub fn take(self: &Arc<Self>, which: Breaker) -> Option<Slot> {
        let i = which as usize;
        let max = self.max[i].load(Ordering::Relaxed);
        self.open[i]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            breakers: self.clone(),
            which,
        })
    }

    /// How many of `which` are taken now.
    pub fn open(&self, which: Breaker) -> usize {
        self.open[which as usize].load(Ordering::SeqCst)
    }
}

/// One taken slot of a breaker, given back on drop.
pub struct Slot {
    breakers: Arc<Breakers>,
    which: Breaker,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breakers.open[self.which as usize].fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connector's refusal when the cluster has `maxConnections` open.
#[derive(Debug)]
struct ConnectionsFull;

impl std::fmt::Display for ConnectionsFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the cluster has circuitBreakers.maxConnections connections open")
    }
}

impl std::error::Error for ConnectionsFull {}

/// An HTTP connector that counts its open connections against the cluster's breaker.
#[derive(Clone)]
pub(crate) struct Counting {
    inner: HttpConnector,
    breakers: Arc<Breakers>,
}

impl tower_service::Service<Uri> for Counting {
    type Response = Counted;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Some(slot) = self.breakers.take(Breaker::Connections) else {
            return Box::pin(async { Err(Box::new(ConnectionsFull) as BoxError) });
        };
        let connecting = tower_service::Service::<Uri>::call(&mut self.inner, uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Counted { io, _slot: slot })
        })
    }
}

/// An upstream connection holding its breaker slot until it closes.
pub(crate) struct Counted {
    io: TokioIo<tokio::net::TcpStream>,
    _slot: Slot,
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

pub(crate) fn connections_full(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<ConnectionsFull>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A raw TCP connection to the first of `endpoints` that accepts within `timeout` each
/// (TCP listeners and CONNECT tunnels); the error lists why each one failed.
pub(crate) async fn connect_first(
    endpoints: &[String],
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, String> {
    let mut errors = Vec::new();
    for endpoint in endpoints {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => errors.push(format!("{endpoint}: {e}")),
            Err(_) => errors.push(format!("{endpoint}: no answer within {timeout:?}")),
        }
    }
    Err(errors.join("; "))
}
