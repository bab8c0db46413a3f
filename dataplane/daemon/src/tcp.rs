//! TCP listeners: each connection is proxied byte for byte to its listener's cluster, through
//! the network filters that choose the listener (`filters[].type: Network`).
//!
//! One connection, phase by phase (each a proxy-wasm callback per network filter):
//!
//! 1. **New connection**, once the client is accepted and before the upstream is dialled:
//!    `proxy_on_new_connection` in chain order. A filter that closes the connection here ends
//!    it with nothing sent upstream; a failing filter applies its failure policy (FailClosed
//!    closes the connection).
//! 2. **Connect**: the cluster's endpoints are tried in order, each within `connectTimeout`;
//!    none accepting closes the client's connection.
//! 3. **Data**: bytes from the client run `proxy_on_downstream_data` in chain order, bytes from
//!    the upstream `proxy_on_upstream_data` in reverse order. A filter that pauses holds the
//!    bytes (the size it is given is cumulative) until it continues; nothing passes it
//!    meanwhile. Each direction has one chunk in flight: what leaves the last filter is written
//!    to the other side before more is read from this one (back-pressure), while the other
//!    direction keeps flowing, so two peers that both write never deadlock the proxy.
//! 4. **Half-close**: end of stream from one side reaches the filters (`end_of_stream`), then
//!    is passed on as a shutdown of the other side's write half; the other direction goes on.
//! 5. **End**, when both directions have ended, a filter closed the connection
//!    (`proxy_close_stream`), a filter failed closed, a filter held more than the buffer limit,
//!    or nothing moved for `idleTimeout`: `proxy_on_downstream_connection_close` and
//!    `proxy_on_upstream_connection_close` (the peer that closed: `Remote` for an end of stream
//!    read from that side, else `Local`), then `proxy_on_done`, `proxy_on_log` and
//!    `proxy_on_delete`, exactly once, also when the task is dropped (drain).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmfilter_host::{ConnectionSide, HttpExchange, PeerType, SharedExchange};

use crate::chain::Active;
use crate::error::ProxyError;
use crate::proxy::dispatch::{Chain, Flow, Running, callback, start_stream, with_vm};
use crate::state::State;

/// Bytes read from one side at a time.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// A TCP listener's settings, as the workers serve it.
#[derive(Clone, Debug)]
pub struct TcpListenerSpec {
    /// The listener's name (what `filters[].listeners` names; may be empty).
    pub name: String,
    pub cluster: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Why a connection ended, for the log.
#[derive(Debug)]
enum End {
    BothClosed,
    ClosedByFilter(String),
    FilterFailed(String),
    Idle,
    UpstreamUnreachable(String),
    Io(String),
}

/// Serves one accepted connection (plain or TLS) to its end.
pub async fn serve<S>(
    state: Arc<State>,
    spec: TcpListenerSpec,
    client: S,
    peer: SocketAddr,
    local: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let active = state.active.load_full();
    let exchange: SharedExchange = Arc::new(Mutex::new(HttpExchange::default()));
    {
        let mut ex = exchange.lock();
        ex.info.protocol = "TCP".into();
        ex.info.source_address = Some(peer);
        ex.info.destination_address = Some(local);
        ex.info.start_time = Some(SystemTime::now());
        ex.info.cluster_name = Some(spec.cluster.clone());
        ex.info.listener_name = Some(spec.name.clone());
        ex.info.cluster_metadata = active
            .clusters
            .get(&spec.cluster)
            .and_then(|c| c.metadata.clone());
    }
    let running: Vec<Running> = active
        .filters
        .iter()
        .filter(|f| f.runs_on_tcp_listener(&spec.name))
        .map(|f| Running {
            filter: f.clone(),
            vm: None,
            ctx: 0,
            skipped: false,
            native: false,
            pending: Vec::new(),
            stream_timeout: spec.idle_timeout,
        })
        .collect();
    let mut chain = Chain::new(&state, running);
    chain.phase = "connection";
    let mut closed = Closed::default();
    let end = run(
        &state,
        &active,
        &spec,
        &exchange,
        &mut chain,
        &mut closed,
        client,
    )
    .await;
    // Step 5: the close callbacks of the sides not reported yet, then the contexts end.
    report_close(
        &mut chain,
        &mut closed,
        ConnectionSide::Downstream,
        PeerType::Local,
    );
    report_close(
        &mut chain,
        &mut closed,
        ConnectionSide::Upstream,
        PeerType::Local,
    );
    chain.finish();
    state.metrics.tcp_connection_closed(&spec.name, end.label());
    let elapsed = started.elapsed();
    match &end {
        // Faults someone must look at: a filter failing closed, an upstream down.
        End::FilterFailed(why) => {
            tracing::warn!(listener = %spec.name, %peer, ?elapsed, "TCP connection closed: {why}")
        }
        End::UpstreamUnreachable(why) => {
            tracing::warn!(listener = %spec.name, %peer, ?elapsed, "TCP connection closed: {why}")
        }
        End::ClosedByFilter(filter) => {
            tracing::debug!(listener = %spec.name, %peer, ?elapsed, "TCP connection closed by filter {filter}")
        }
        End::Io(why) => {
            tracing::debug!(listener = %spec.name, %peer, ?elapsed, "TCP connection failed: {why}")
        }
        End::BothClosed | End::Idle => {
            tracing::debug!(listener = %spec.name, %peer, ?elapsed, ?end, "TCP connection ended")
        }
    }
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::BothClosed => "closed",
            End::ClosedByFilter(_) => "filter_closed",
            End::FilterFailed(_) => "filter_failed",
            End::Idle => "idle_timeout",
            End::UpstreamUnreachable(_) => "upstream_unreachable",
            End::Io(_) => "io_error",
        }
    }
}

/// Which close callbacks already ran.
#[derive(Default)]
struct Closed {
    downstream: bool,
    upstream: bool,
}

/// Runs `proxy_on_{downstream,upstream}_connection_close` once per side.
fn report_close(chain: &mut Chain, closed: &mut Closed, side: ConnectionSide, peer: PeerType) {
    let done = match side {
        ConnectionSide::Downstream => &mut closed.downstream,
        ConnectionSide::Upstream => &mut closed.upstream,
    };
    if std::mem::replace(done, true) {
        return;
    }
    for r in chain.iter_mut().filter(|r| r.ctx != 0 && !r.skipped) {
        if let Err(e) = with_vm(r, |vm, ctx| vm.on_connection_close(ctx, side, peer)) {
            tracing::warn!(filter = %r.filter.name, %e, "a network filter's close callback failed");
            r.filter.metrics.trap();
        }
    }
}

/// Steps 1 to 4; returns why the connection ended.
async fn run<S>(
    state: &Arc<State>,
    active: &Arc<Active>,
    spec: &TcpListenerSpec,
    exchange: &SharedExchange,
    chain: &mut Chain,
    closed: &mut Closed,
    client: S,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // 1. New connection.
    for r in chain.iter_mut() {
        match start_stream(state, active, exchange, r) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return End::FilterFailed(reason(e)),
        }
        match callback(state, active, r, false, |vm, ctx| vm.on_new_connection(ctx)).await {
            Ok(Flow::Continue | Flow::Buffer) => {}
            Ok(Flow::Reset | Flow::Local(_)) => {
                return End::ClosedByFilter(r.filter.name.clone());
            }
            Err(e) => return End::FilterFailed(reason(e)),
        }
    }
    // 2. Connect.
    let upstream = match connect(active, spec).await {
        Ok(s) => s,
        Err(e) => return End::UpstreamUnreachable(e),
    };
    exchange.lock().info.upstream_address = upstream.peer_addr().ok();
    let _ = upstream.set_nodelay(true);
    // 3 and 4. Data both ways.
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = upstream.into_split();
    let mut from_client = vec![0u8; READ_CHUNK_BYTES];
    let mut from_upstream = vec![0u8; READ_CHUNK_BYTES];
    // Bytes on their way to the upstream / client, and how much of them is written.
    let (mut to_upstream, mut to_upstream_at) = (Vec::<u8>::new(), 0usize);
    let (mut to_client, mut to_client_at) = (Vec::<u8>::new(), 0usize);
    // Whether each side has sent its end of stream, and whether it was passed on.
    let (mut client_done, mut upstream_done) = (false, false);
    let (mut upstream_shut, mut client_shut) = (false, false);
    let forward: Vec<usize> = (0..chain.len()).collect();
    let reverse: Vec<usize> = (0..chain.len()).rev().collect();
    loop {
        if client_done && to_upstream.is_empty() && !upstream_shut {
            upstream_shut = true;
            let _ = upstream_tx.shutdown().await;
        }
        if upstream_done && to_client.is_empty() && !client_shut {
            client_shut = true;
            let _ = client_tx.shutdown().await;
        }
        if upstream_shut && client_shut {
            return End::BothClosed;
        }
        let idle = tokio::time::sleep(spec.idle_timeout);
        let event = tokio::select! {
            n = client_rx.read(&mut from_client), if !client_done && to_upstream.is_empty() => {
                Event::Read(ConnectionSide::Downstream, n)
            }
            n = upstream_rx.read(&mut from_upstream), if !upstream_done && to_client.is_empty() => {
                Event::Read(ConnectionSide::Upstream, n)
            }
            n = upstream_tx.write(&to_upstream[to_upstream_at..]), if !to_upstream.is_empty() => {
                Event::Wrote(ConnectionSide::Upstream, n)
            }
            n = client_tx.write(&to_client[to_client_at..]), if !to_client.is_empty() => {
                Event::Wrote(ConnectionSide::Downstream, n)
            }
            _ = idle => Event::Idle,
        };
        match event {
            Event::Idle => return End::Idle,
            Event::Wrote(_, Err(e)) => return End::Io(e.to_string()),
            Event::Wrote(ConnectionSide::Upstream, Ok(n)) => {
                to_upstream_at += n;
                if to_upstream_at >= to_upstream.len() {
                    to_upstream.clear();
                    to_upstream_at = 0;
                }
            }
            Event::Wrote(ConnectionSide::Downstream, Ok(n)) => {
                to_client_at += n;
                if to_client_at >= to_client.len() {
                    to_client.clear();
                    to_client_at = 0;
                }
            }
            Event::Read(side, result) => {
                let (data, eos) = match (side, result) {
                    (_, Ok(0)) | (_, Err(_)) => (Vec::new(), true),
                    (ConnectionSide::Downstream, Ok(n)) => (from_client[..n].to_vec(), false),
                    (ConnectionSide::Upstream, Ok(n)) => (from_upstream[..n].to_vec(), false),
                };
                let order = match side {
                    ConnectionSide::Downstream => &forward,
                    ConnectionSide::Upstream => &reverse,
                };
                let out =
                    match through(state, active, exchange, chain, order, side, data, eos).await {
                        Ok(Passed::Data(out)) => out,
                        Ok(Passed::Closed(filter)) => return End::ClosedByFilter(filter),
                        Err(e) => return End::FilterFailed(reason(e)),
                    };
                match side {
                    ConnectionSide::Downstream => to_upstream = out,
                    ConnectionSide::Upstream => to_client = out,
                }
                if eos {
                    match side {
                        ConnectionSide::Downstream => client_done = true,
                        ConnectionSide::Upstream => upstream_done = true,
                    }
                    report_close(chain, closed, side, PeerType::Remote);
                }
            }
        }
    }
}

enum Event {
    Read(ConnectionSide, std::io::Result<usize>),
    Wrote(ConnectionSide, std::io::Result<usize>),
    Idle,
}

/// What one chunk came to after the filters.
enum Passed {
    /// The bytes to write to the other side (possibly none: a filter holds them).
    Data(Vec<u8>),
    /// This filter closed the connection.
    Closed(String),
}

/// One chunk (or the end of stream) of `side` through the filters in `order`.
#[allow(clippy::too_many_arguments)]
async fn through(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    chain: &mut Chain,
    order: &[usize],
    side: ConnectionSide,
    mut data: Vec<u8>,
    eos: bool,
) -> Result<Passed, ProxyError> {
    for &i in order {
        let r = &mut chain[i];
        if r.skipped || r.ctx == 0 {
            continue;
        }
        if data.is_empty() && !eos {
            break;
        }
        r.pending.append(&mut data);
        if r.pending.len() > active.buffer_limit {
            return Err(ProxyError::FilterFailed {
                filter: r.filter.name.clone(),
                message: format!(
                    "the filter held more than bufferLimitBytes ({}) of connection data",
                    active.buffer_limit
                ),
            });
        }
        set_data(exchange, side, std::mem::take(&mut r.pending));
        let flow = callback(state, active, r, !eos, |vm, ctx| match side {
            ConnectionSide::Downstream => vm.on_downstream_data(ctx, eos),
            ConnectionSide::Upstream => vm.on_upstream_data(ctx, eos),
        })
        .await?;
        let held = take_data(exchange, side);
        match flow {
            Flow::Buffer => {
                r.pending = held;
                return Ok(Passed::Data(Vec::new()));
            }
            Flow::Continue => data = held,
            Flow::Reset | Flow::Local(_) => return Ok(Passed::Closed(r.filter.name.clone())),
        }
    }
    Ok(Passed::Data(data))
}

fn set_data(exchange: &SharedExchange, side: ConnectionSide, bytes: Vec<u8>) {
    let mut ex = exchange.lock();
    match side {
        ConnectionSide::Downstream => ex.downstream_data = bytes,
        ConnectionSide::Upstream => ex.upstream_data = bytes,
    }
}

fn take_data(exchange: &SharedExchange, side: ConnectionSide) -> Vec<u8> {
    let mut ex = exchange.lock();
    match side {
        ConnectionSide::Downstream => std::mem::take(&mut ex.downstream_data),
        ConnectionSide::Upstream => std::mem::take(&mut ex.upstream_data),
    }
}

/// The first endpoint of the listener's cluster that accepts within `connectTimeout`.
async fn connect(active: &Active, spec: &TcpListenerSpec) -> Result<TcpStream, String> {
    let Some(cluster) = active.clusters.get(&spec.cluster) else {
        return Err(format!("cluster {} is not configured", spec.cluster));
    };
    crate::pool::connect_first(&cluster.config.endpoints, spec.connect_timeout)
        .await
        .map_err(|errors| format!("cluster {}: no endpoint accepted ({errors})", spec.cluster))
}

fn reason(e: ProxyError) -> String {
    match e {
        ProxyError::FilterFailed { filter, message } => format!("filter {filter}: {message}"),
        other => format!("{other:?}"),
    }
}
