//! One request through the proxy, top to bottom:
//!
//! 1. request headers → every matching filter's `on_request_headers`, in chain order (a filter
//!    may pause for a callout, reply locally, or rewrite `:authority`/`:path` to steer routing);
//! 2. routing on the headers as the filters left them, and the upstream request starts;
//! 3. request body chunks stream through each filter's `on_request_body` on their way up (a
//!    filter that pauses gets the cumulative body on its next call; nothing passes it until it
//!    continues), then trailers through `on_request_trailers`;
//! 4. response headers, body chunks and trailers go through the same filters in reverse order,
//!    streaming to the client (local replies go through the filters that saw the request);
//! 5. every filter's `on_done`/`on_log`/`on_delete` once the response body has ended.
//!
//! Errors become responses in one place, [`ProxyError::into_response`]. No VM borrow is held
//! across an await: callbacks run synchronously between awaits, on the worker's thread.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as _, Incoming};
use parking_lot::Mutex;
use wasmfilter_api::FailurePolicy;
use wasmfilter_host::{
    Action, CallbackError, Effect, Fields, HttpCallResponse, HttpExchange, LocalResponse,
    SharedExchange, Vm,
};

use crate::body::{self, BoxError};
use crate::chain::{Active, LoadedFilter, VmHandle, WORKER_VMS};
use crate::state::State;

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1).
/// `Trailer` is forwarded: HTTP/1.1 peers only accept trailer fields it announces.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// A body of known length up to this size is read whole and run through the filters once:
/// one sized write instead of a chunked stream fed by a task.
const INLINE_BODY_LIMIT: u64 = 64 * 1024;

/// Why a request did not get the upstream's answer. Each becomes a short response here.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    BodyTooLarge,
    BadRequestBody(String),
    UpstreamConnect { cluster: String, message: String },
    UpstreamTimeout { cluster: String },
    UpstreamProtocol { cluster: String, message: String },
    FilterFailed { filter: String, message: String },
    FilterStalled { filter: String },
    Reset { filter: String },
}

impl ProxyError {
    fn status_and_reason(&self) -> (StatusCode, String) {
        match self {
            ProxyError::NoRoute => (
                StatusCode::NOT_FOUND,
                "no route matches this request".into(),
            ),
            ProxyError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body exceeds the filter buffer limit".into(),
            ),
            ProxyError::BadRequestBody(m) => (
                StatusCode::BAD_REQUEST,
                format!("reading the request body failed: {m}"),
            ),
            ProxyError::UpstreamConnect { cluster, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream {cluster} is unreachable"),
            ),
            ProxyError::UpstreamTimeout { cluster } => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream {cluster} timed out"),
            ),
            ProxyError::UpstreamProtocol { cluster, .. } => (
                StatusCode::BAD_GATEWAY,
                format!("upstream {cluster} sent an invalid response"),
            ),
            ProxyError::FilterFailed { filter, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("filter {filter} failed"),
            ),
            ProxyError::FilterStalled { filter } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("filter {filter} paused the request and nothing can resume it"),
            ),
            ProxyError::Reset { filter } => (
                StatusCode::BAD_GATEWAY,
                format!("filter {filter} reset the stream"),
            ),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, reason) = self.status_and_reason();
        tracing::debug!(?self, "request failed");
        let mut resp = Response::new(full(format!("{reason}\n")));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        resp.headers_mut().insert(
            "x-wasmfilter-error",
            HeaderValue::from_str(&reason).unwrap_or(HeaderValue::from_static("error")),
        );
        resp
    }
}

/// A filter on this request: its VM context, whether it is still active, and the body data it
/// holds while paused.
struct Running {
    filter: Arc<LoadedFilter>,
    /// The VM this request's stream context lives in, pinned for the request's life.
    vm: Option<VmHandle>,
    ctx: u32,
    skipped: bool,
    /// A native filter that ran its request-header phase (it has no stream context, and no
    /// body or trailer phases).
    native: bool,
    pending: Vec<u8>,
}

/// How a callback ended.
enum Flow {
    Continue,
    /// A body callback paused with nothing outstanding: keep buffering for this filter.
    Buffer,
    Local(LocalResponse),
    Reset,
}

/// Which way a body flows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The body buffer of this direction in the exchange.
    fn body(self, ex: &mut HttpExchange) -> &mut Vec<u8> {
        match self {
            Direction::Request => &mut ex.request_body,
            Direction::Response => &mut ex.response_body,
        }
    }

    /// The trailers of this direction in the exchange.
    fn trailers(self, ex: &mut HttpExchange) -> &mut Fields {
        match self {
            Direction::Request => &mut ex.request_trailers,
            Direction::Response => &mut ex.response_trailers,
        }
    }

    /// The body-size counter of this direction (for the `request.size`/`response.size`
    /// properties).
    fn body_bytes(self, ex: &mut HttpExchange) -> &mut u64 {
        match self {
            Direction::Request => &mut ex.info.request_body_bytes,
            Direction::Response => &mut ex.info.response_body_bytes,
        }
    }
}

pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    state
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let active = state.active.load_full();
    let response = match proxy(&state, &active, req, peer, local, tls).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .request(response.status().as_u16(), started.elapsed().as_secs_f64());
    state
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    Ok(response)
}

pub(crate) fn fields_from(headers: &HeaderMap, fields: &mut Fields) {
    to_fields(headers, fields)
}

fn to_fields(headers: &HeaderMap, fields: &mut Fields) {
    for (k, v) in headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            fields.add(k.as_str(), v.as_bytes());
        }
    }
}

/// The forwardable fields as an HTTP header map: pseudo-headers and hop-by-hop headers are
/// dropped, as are names or values HTTP cannot carry.
pub(crate) fn to_header_map(fields: &Fields) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(fields.len());
    for (k, v) in fields.iter() {
        if k.starts_with(':') || HOP_BY_HOP.contains(&k) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(name, value);
        }
    }
    map
}

fn new_exchange(
    active: &Active,
    parts: &http::request::Parts,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> HttpExchange {
    let scheme = if tls { "https" } else { "http" };
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let mut ex = HttpExchange::default();
    ex.request_headers.add(":method", parts.method.as_str());
    ex.request_headers.add(":path", path.as_str());
    ex.request_headers.add(":authority", authority.as_str());
    ex.request_headers.add(":scheme", scheme);
    for (k, v) in &parts.headers {
        if k != http::header::HOST && !HOP_BY_HOP.contains(&k.as_str()) {
            ex.request_headers.add(k.as_str(), v.as_bytes());
        }
    }
    // The client's address joins the chain of proxies before any filter runs.
    let xff = match ex.request_headers.get_str("x-forwarded-for") {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    ex.request_headers.set("x-forwarded-for", xff);
    if ex.request_headers.get("x-forwarded-proto").is_none() {
        ex.request_headers.add("x-forwarded-proto", scheme);
    }
    ex.info.protocol = match parts.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
    .into();
    ex.info.scheme = scheme.into();
    ex.info.mtls = false;
    ex.info.source_address = Some(peer);
    ex.info.destination_address = Some(local);
    ex.info.start_time = Some(SystemTime::now());
    if let Some(route) = active.route(&authority, parts.uri.path(), parts.method.as_str(), |h| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }) {
        ex.info.route_name = Some(route.config.name.clone());
        ex.info.route_metadata = route.metadata.clone();
        ex.info.cluster_name = Some(route.config.cluster.clone());
        ex.info.cluster_metadata = active
            .clusters
            .get(&route.config.cluster)
            .and_then(|c| c.metadata.clone());
    }
    ex
}

async fn proxy(
    state: &Arc<State>,
    active: &Arc<Active>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    let exchange: SharedExchange =
        Arc::new(Mutex::new(new_exchange(active, &parts, peer, local, tls)));
    let host = exchange
        .lock()
        .request_headers
        .get_str(":authority")
        .unwrap_or_default();
    let mut running: Vec<Running> = active
        .filters
        .iter()
        .filter(|f| {
            f.matches
                .matches(&host, parts.uri.path(), parts.method.as_str())
        })
        .map(|f| Running {
            filter: f.clone(),
            vm: None,
            ctx: 0,
            skipped: false,
            native: false,
            pending: Vec::new(),
        })
        .collect();
    let result = request_path(state, active, &exchange, &mut running, body).await;
    match result {
        Ok(Upstream::Response(resp)) => respond(state, active, exchange, running, resp).await,
        Ok(Upstream::Local(reply)) => {
            Ok(local_reply(state, active, exchange, running, reply).await)
        }
        Err(e) => {
            finish_all(&running);
            Err(e)
        }
    }
}

/// What the request side ended in.
enum Upstream {
    Response(Response<Body>),
    Local(LocalResponse),
}

/// Request headers through the filters, routing, then the upstream call with the request body
/// streaming through the filters alongside it.
async fn request_path(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    running: &mut [Running],
    body: Incoming,
) -> Result<Upstream, ProxyError> {
    let has_body = !body.is_end_stream();
    for r in running.iter_mut() {
        if let Some(native) = r.filter.native_filter() {
            let started = Instant::now();
            native.on_request_headers(&mut exchange.lock().request_headers);
            r.filter.metrics.callback(started.elapsed().as_secs_f64());
            r.native = true;
            continue;
        }
        if !start_stream(state, active, exchange, r)? {
            continue;
        }
        match callback(state, active, r, false, |vm, ctx| {
            vm.on_request_headers(ctx, !has_body)
        })
        .await?
        {
            Flow::Continue | Flow::Buffer => {}
            Flow::Local(reply) => return Ok(Upstream::Local(reply)),
            Flow::Reset => {
                return Err(ProxyError::Reset {
                    filter: r.filter.name.clone(),
                });
            }
        }
    }
    let filtered = running.iter().any(|r| !r.skipped && r.ctx != 0);
    let (method, authority, path, headers) = {
        let ex = exchange.lock();
        let get = |k: &str| ex.request_headers.get_str(k).unwrap_or_default();
        let mut headers = ex.request_headers.clone();
        if filtered && has_body {
            // Filters may change the body's length: the upstream gets the length of what
            // they pass on (or a chunked stream).
            headers.remove("content-length");
        }
        (get(":method"), get(":authority"), get(":path"), headers)
    };
    let url_path = path.split('?').next().unwrap_or("/").to_string();
    let cluster = active
        .route(&authority, &url_path, &method, |h| headers.get_str(h))
        .ok_or(ProxyError::NoRoute)?
        .config
        .cluster
        .clone();
    let request = crate::upstream::Outgoing {
        cluster: &cluster,
        method: &method,
        authority: &authority,
        path: &path,
        headers: &headers,
    };
    if !has_body {
        let resp = crate::upstream::send(state, active, &request, None).await?;
        return Ok(Upstream::Response(resp));
    }
    if !filtered {
        // No filter on this request: the body streams straight through.
        let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
        let resp = crate::upstream::send(state, active, &request, Some(body)).await?;
        return Ok(Upstream::Response(resp));
    }
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= INLINE_BODY_LIMIT)
    {
        let collected = body
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequestBody(e.to_string()))?;
        let order: Vec<usize> = (0..running.len()).collect();
        let p = Pipeline {
            state,
            active,
            exchange,
        };
        let (out, flow) = through_whole(&p, running, &order, Direction::Request, collected).await?;
        match flow {
            Some(Flow::Local(reply)) => return Ok(Upstream::Local(reply)),
            Some(_) => {
                return Err(ProxyError::Reset {
                    filter: "request body".into(),
                });
            }
            None => {}
        }
        let resp = crate::upstream::send(state, active, &request, Some(sized(out))).await?;
        return Ok(Upstream::Response(resp));
    }
    let (tx, rx) = body::channel();
    let upstream = crate::upstream::send(state, active, &request, Some(rx.boxed_unsync()));
    let pipeline = Pipeline {
        state,
        active,
        exchange,
    };
    let pump = pump_request(&pipeline, running, body, tx);
    tokio::pin!(upstream);
    tokio::pin!(pump);
    // The upstream may answer before the body is through; the body still finishes (or fails).
    let mut answered = None;
    let pumped = loop {
        tokio::select! {
            flow = &mut pump => break flow,
            resp = &mut upstream, if answered.is_none() => answered = Some(resp),
        }
    };
    match pumped? {
        Flow::Local(reply) => return Ok(Upstream::Local(reply)),
        Flow::Reset => {
            return Err(ProxyError::Reset {
                filter: "request body".into(),
            });
        }
        Flow::Continue | Flow::Buffer => {}
    }
    let resp = match answered {
        Some(r) => r,
        None => upstream.await,
    }?;
    Ok(Upstream::Response(resp))
}

/// Reads the request body frame by frame and feeds it through the filters to the upstream.
async fn pump_request(
    p: &Pipeline<'_>,
    running: &mut [Running],
    mut body: Incoming,
    tx: body::BodySender,
) -> Result<Flow, ProxyError> {
    let exchange = p.exchange;
    let order: Vec<usize> = (0..running.len()).collect();
    let mut total = 0u64;
    loop {
        let (data, trailers, eos) = match next_frame(&mut body).await {
            Ok(frame) => frame,
            Err(e) => {
                tx.abort(e.clone()).await;
                return Err(ProxyError::BadRequestBody(e));
            }
        };
        total += data.len() as u64;
        exchange.lock().info.request_body_bytes = total;
        let (out, flow) = match trailers {
            None => body_chunk(p, running, &order, Direction::Request, data, eos).await,
            Some(t) => trailers_through(p, running, &order, Direction::Request, t).await,
        }?;
        if let Some(flow) = flow {
            tx.abort("a filter ended the request".into()).await;
            return Ok(flow);
        }
        if !tx.data(out.data).await {
            return Ok(Flow::Continue);
        }
        if let Some(t) = out.trailers {
            tx.trailers(t).await;
        }
        if eos {
            return Ok(Flow::Continue);
        }
    }
}

/// The next piece of a body: (data, trailers, end of stream). End of stream comes only from
/// the end of the body or its trailers: `is_end_stream` may already be true while trailers
/// are still to come.
async fn next_frame<B>(body: &mut B) -> Result<(Vec<u8>, Option<HeaderMap>, bool), String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match body.frame().await {
        None => Ok((Vec::new(), None, true)),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(f)) => match f.into_data() {
            Ok(d) => Ok((d.to_vec(), None, false)),
            Err(f) => Ok((Vec::new(), f.into_trailers().ok(), true)),
        },
    }
}

/// What every step of a stream's body pipeline works with.
#[derive(Clone, Copy)]
struct Pipeline<'a> {
    state: &'a Arc<State>,
    active: &'a Arc<Active>,
    exchange: &'a SharedExchange,
}

/// What leaves the last filter for one chunk.
struct ChunkOut {
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
}

impl ChunkOut {
    fn data(data: Vec<u8>) -> ChunkOut {
        ChunkOut {
            data,
            trailers: None,
        }
    }
}

/// Feeds one chunk through the filters in `order`. Each filter holds its own pending bytes
/// while it pauses; the body callback sees them all (sizes are cumulative) and nothing passes
/// the filter until it continues.
#[allow(clippy::too_many_arguments)]
async fn body_chunk(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    mut data: Vec<u8>,
    eos: bool,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let Pipeline {
        state,
        active,
        exchange,
    } = *p;
    for &i in order {
        let r = &mut running[i];
        if r.skipped || r.ctx == 0 {
            continue;
        }
        if data.is_empty() && !eos {
            break;
        }
        r.pending.append(&mut data);
        if r.pending.len() > active.buffer_limit {
            return Err(match direction {
                Direction::Request => ProxyError::BodyTooLarge,
                Direction::Response => ProxyError::FilterFailed {
                    filter: r.filter.name.clone(),
                    message: "the response body exceeds the filter buffer limit".into(),
                },
            });
        }
        set_body(exchange, direction, std::mem::take(&mut r.pending));
        let flow = callback(state, active, r, !eos, |vm, ctx| match direction {
            Direction::Request => vm.on_request_body(ctx, eos),
            Direction::Response => vm.on_response_body(ctx, eos),
        })
        .await?;
        let held = take_body(exchange, direction);
        match flow {
            Flow::Buffer => {
                r.pending = held;
                return Ok((ChunkOut::data(Vec::new()), None));
            }
            Flow::Continue => data = held,
            other => {
                return Ok((ChunkOut::data(Vec::new()), Some(other)));
            }
        }
    }
    Ok((ChunkOut::data(data), None))
}

/// Trailers end the body: each filter's trailer callback runs, and whatever it still held
/// flows on with them (filters after a buffering one see that data only here).
async fn trailers_through(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    trailers: HeaderMap,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let Pipeline {
        state,
        active,
        exchange,
    } = *p;
    {
        let mut ex = exchange.lock();
        let map = direction.trailers(&mut ex);
        *map = Fields::new();
        to_fields(&trailers, map);
    }
    let mut data = Vec::new();
    for &i in order {
        let r = &mut running[i];
        if r.skipped || r.ctx == 0 {
            continue;
        }
        r.pending.append(&mut data);
        let flow = callback(state, active, r, false, |vm, ctx| match direction {
            Direction::Request => vm.on_request_trailers(ctx),
            Direction::Response => vm.on_response_trailers(ctx),
        })
        .await?;
        if let Flow::Local(_) | Flow::Reset = flow {
            return Ok((ChunkOut::data(Vec::new()), Some(flow)));
        }
        data = std::mem::take(&mut r.pending);
    }
    let trailers = to_header_map(direction.trailers(&mut exchange.lock()));
    Ok((
        ChunkOut {
            data,
            trailers: Some(trailers),
        },
        None,
    ))
}

/// A whole body (read at once) through the filters: its data with end of stream, then its
/// trailers if it has any.
async fn through_whole(
    p: &Pipeline<'_>,
    running: &mut [Running],
    order: &[usize],
    direction: Direction,
    collected: http_body_util::Collected<Bytes>,
) -> Result<(ChunkOut, Option<Flow>), ProxyError> {
    let exchange = p.exchange;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes().to_vec();
    *direction.body_bytes(&mut exchange.lock()) = data.len() as u64;
    let (mut out, flow) =
        body_chunk(p, running, order, direction, data, trailers.is_none()).await?;
    if flow.is_some() {
        return Ok((out, flow));
    }
    if let Some(t) = trailers {
        // Data a buffering filter still holds flows on with the trailers.
        let (more, flow) = trailers_through(p, running, order, direction, t).await?;
        out.data.extend_from_slice(&more.data);
        out.trailers = more.trailers;
        return Ok((out, flow));
    }
    Ok((out, None))
}

/// A body of known length (and trailers, if any).
fn sized(out: ChunkOut) -> Body {
    match out.trailers {
        None => full(out.data),
        Some(t) => body::Unsized(full(out.data).with_trailers(std::future::ready(Some(Ok(t)))))
            .boxed_unsync(),
    }
}

fn set_body(exchange: &SharedExchange, direction: Direction, bytes: Vec<u8>) {
    *direction.body(&mut exchange.lock()) = bytes;
}

fn take_body(exchange: &SharedExchange, direction: Direction) -> Vec<u8> {
    std::mem::take(direction.body(&mut exchange.lock()))
}

/// Creates the filter's stream context; `false` if the filter is skipped (FailOpen).
fn start_stream(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    r: &mut Running,
) -> Result<bool, ProxyError> {
    let handle = WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        vms.sync(active);
        vms.get(&state.host, &r.filter, &active.embedder)
    });
    let result = handle.and_then(|(h, created)| {
        if created {
            let effects = h.borrow_mut().0.take_effects();
            crate::timers::handle_root_effects(state, active, &r.filter, &h, effects);
        }
        let ctx = {
            let mut guard = h.borrow_mut();
            let (vm, root) = &mut *guard;
            vm.create_stream(*root, exchange.clone())
                .map_err(|e| e.to_string())?
        };
        r.vm = Some(h);
        Ok(ctx)
    });
    match result {
        Ok(ctx) => {
            r.ctx = ctx;
            Ok(true)
        }
        Err(message) => on_failure(r, message).map(|_| false),
    }
}

/// Applies the filter's failure policy: FailOpen skips it, FailClosed refuses the request.
fn on_failure(r: &mut Running, message: String) -> Result<(), ProxyError> {
    r.skipped = true;
    match r.filter.failure_policy {
        FailurePolicy::FailOpen => {
            r.filter.metrics.fail_open();
            Ok(())
        }
        FailurePolicy::FailClosed => {
            r.filter.metrics.fail_closed();
            Err(ProxyError::FilterFailed {
                filter: r.filter.name.clone(),
                message,
            })
        }
    }
}

fn with_vm<T>(
    r: &Running,
    f: impl FnOnce(&mut Vm, u32) -> Result<T, CallbackError>,
) -> Result<T, CallbackError> {
    match &r.vm {
        Some(handle) => f(&mut handle.borrow_mut().0, r.ctx),
        None => Err(CallbackError::UnknownContext(r.ctx)),
    }
}

/// Runs one stream callback and everything it leads to (callouts and their answers) until the
/// filter continues, replies locally, or resets the stream. `buffering`: a pause with nothing
/// outstanding means "give me more body" ([`Flow::Buffer`]) rather than a stall.
async fn callback(
    state: &Arc<State>,
    active: &Arc<Active>,
    r: &mut Running,
    buffering: bool,
    call: impl FnOnce(&mut Vm, u32) -> Result<Action, CallbackError>,
) -> Result<Flow, ProxyError> {
    if r.skipped {
        return Ok(Flow::Continue);
    }
    let started = Instant::now();
    let result = with_vm(r, |vm, ctx| {
        Ok((call(vm, ctx)?, vm.take_effects(), vm.memory_bytes()))
    });
    r.filter.metrics.callback(started.elapsed().as_secs_f64());
    let (action, mut effects, memory) = match result {
        Ok(v) => v,
        Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
    };
    r.filter.metrics.vm_memory(memory);
    let mut resumed = action == Action::Continue;
    let mut pending = tokio::task::JoinSet::new();
    loop {
        for effect in std::mem::take(&mut effects) {
            match effect {
                Effect::LocalResponse { response, .. } => return Ok(Flow::Local(response)),
                Effect::CloseStream { .. } => return Ok(Flow::Reset),
                Effect::ContinueStream { context_id, .. } if context_id == r.ctx => resumed = true,
                Effect::TickPeriod {
                    root_context_id,
                    period,
                } => {
                    if let Some(vm) = &r.vm {
                        crate::timers::set_tick(
                            state,
                            active,
                            &r.filter,
                            vm,
                            root_context_id,
                            period,
                        );
                    }
                }
                Effect::HttpCall(call) => {
                    let state = state.clone();
                    let active = active.clone();
                    pending.spawn_local(async move {
                        let response = crate::upstream::callout(&state, &active, &call).await;
                        Answer::Http(call.token, response)
                    });
                }
                Effect::GrpcCall(call) => {
                    let state = state.clone();
                    let active = active.clone();
                    pending.spawn_local(async move {
                        let outcome = crate::upstream::grpc_call(&state, &active, &call).await;
                        Answer::Grpc(call.token, outcome)
                    });
                }
                Effect::GrpcStreamOpen(call) => {
                    // Streaming gRPC callouts are not carried out yet: the filter is told the
                    // stream is unavailable, as for an unreachable upstream.
                    let token = call.token;
                    match with_vm(r, |vm, _| {
                        vm.on_grpc_close(
                            token,
                            14,
                            "gRPC streams are not supported by this dataplane yet",
                        )?;
                        Ok(vm.take_effects())
                    }) {
                        Ok(more) => effects.extend(more),
                        Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
                    }
                }
                _ => {}
            }
        }
        if !effects.is_empty() {
            continue;
        }
        if resumed {
            return Ok(Flow::Continue);
        }
        if pending.is_empty() && buffering {
            return Ok(Flow::Buffer);
        }
        let Some(Ok(answer)) = pending.join_next().await else {
            return Err(ProxyError::FilterStalled {
                filter: r.filter.name.clone(),
            });
        };
        match with_vm(r, |vm, _| {
            deliver(vm, answer)?;
            Ok(vm.take_effects())
        }) {
            Ok(more) => effects = more,
            Err(e) => return callback_failed(r, e).map(|_| Flow::Continue),
        }
    }
}

/// The answer to a callout, on its way back to the filter's root context.
enum Answer {
    Http(u32, Option<HttpCallResponse>),
    Grpc(u32, crate::upstream::GrpcOutcome),
}

fn deliver(vm: &mut Vm, answer: Answer) -> Result<(), CallbackError> {
    match answer {
        Answer::Http(token, response) => vm.on_http_call_response(token, response),
        Answer::Grpc(token, outcome) => {
            if let Some(md) = outcome.initial_metadata {
                vm.on_grpc_initial_metadata(token, md)?;
            }
            for message in outcome.messages {
                vm.on_grpc_message(token, message)?;
            }
            if let Some(md) = outcome.trailing_metadata {
                vm.on_grpc_trailing_metadata(token, md)?;
            }
            vm.on_grpc_close(token, outcome.status, &outcome.message)
        }
    }
}

fn callback_failed(r: &mut Running, e: CallbackError) -> Result<(), ProxyError> {
    r.filter.metrics.trap();
    if let Some(handle) = &r.vm {
        WORKER_VMS.with(|vms| vms.borrow_mut().fail(&r.filter, handle, &e));
    }
    on_failure(r, e.to_string())
}

/// Runs the response side: headers through the filters (reverse order), then the body and
/// trailers streaming through them to the client. The stream contexts end when the body does.
async fn respond(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: SharedExchange,
    mut running: Vec<Running>,
    upstream: Response<Body>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = upstream.into_parts();
    {
        let mut ex = exchange.lock();
        ex.response_headers = Fields::new();
        ex.response_headers.add(":status", parts.status.as_str());
        to_fields(&parts.headers, &mut ex.response_headers);
        ex.info.response_code = Some(parts.status.as_u16());
    }
    if running
        .iter()
        .all(|r| (r.skipped || r.ctx == 0) && !r.native)
    {
        finish_all(&running);
        let mut resp = Response::new(body);
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = to_header_map(&exchange.lock().response_headers);
        add_via(resp.headers_mut());
        return Ok(resp);
    }
    let has_body = !body.is_end_stream();
    for i in (0..running.len()).rev() {
        if running[i].native {
            native_response_headers(&running[i], &exchange);
            continue;
        }
        let flow = callback(state, active, &mut running[i], false, |vm, ctx| {
            vm.on_response_headers(ctx, !has_body)
        })
        .await;
        match flow {
            Ok(Flow::Local(reply)) => {
                finish_all(&running);
                return Ok(local_to_response(&reply));
            }
            Ok(Flow::Reset) => {
                finish_all(&running);
                return Err(ProxyError::Reset {
                    filter: running[i].filter.name.clone(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                finish_all(&running);
                return Err(e);
            }
        }
    }
    if running.iter().all(|r| r.skipped || r.ctx == 0) {
        // Only native filters (header phases only) ran: the body streams through untouched,
        // with its length, instead of going through the body pipeline.
        finish_all(&running);
        let mut head = response_head(&exchange);
        if let Some(length) = parts.headers.get(http::header::CONTENT_LENGTH) {
            head.headers_mut()
                .insert(http::header::CONTENT_LENGTH, length.clone());
        }
        return Ok(head.map(|_| body));
    }
    let head = response_head(&exchange);
    if !has_body {
        finish_all(&running);
        return Ok(head.map(|_| full(Bytes::new())));
    }
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= INLINE_BODY_LIMIT)
    {
        let result = match body.collect().await {
            Ok(collected) => {
                let order: Vec<usize> = (0..running.len()).rev().collect();
                let p = Pipeline {
                    state,
                    active,
                    exchange: &exchange,
                };
                through_whole(&p, &mut running, &order, Direction::Response, collected).await
            }
            Err(e) => Err(ProxyError::UpstreamProtocol {
                cluster: "upstream".into(),
                message: e.to_string(),
            }),
        };
        finish_all(&running);
        return match result? {
            (out, None) => Ok(head.map(|_| sized(out))),
            (_, Some(Flow::Local(reply))) => Ok(local_to_response(&reply)),
            (_, Some(_)) => Err(ProxyError::Reset {
                filter: "response body".into(),
            }),
        };
    }
    let (tx, rx) = body::channel();
    let (state, active) = (state.clone(), active.clone());
    tokio::task::spawn_local(async move {
        let p = Pipeline {
            state: &state,
            active: &active,
            exchange: &exchange,
        };
        pump_response(&p, &mut running, body, tx).await;
        finish_all(&running);
    });
    Ok(head.map(|_| rx.boxed_unsync()))
}

/// The response head as the filters left it. Filters may change the body, so the length is
/// left to the transfer encoding.
fn response_head(exchange: &SharedExchange) -> Response<()> {
    let ex = exchange.lock();
    let status = ex
        .response_headers
        .get_str(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = to_header_map(&ex.response_headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    add_via(resp.headers_mut());
    resp
}

async fn pump_response(
    p: &Pipeline<'_>,
    running: &mut [Running],
    mut body: Body,
    tx: body::BodySender,
) {
    let exchange = p.exchange;
    let order: Vec<usize> = (0..running.len()).rev().collect();
    let mut total = 0u64;
    loop {
        let (data, trailers, eos) = match next_frame(&mut body).await {
            Ok(frame) => frame,
            Err(e) => {
                tx.abort(format!("upstream body failed: {e}")).await;
                return;
            }
        };
        total += data.len() as u64;
        exchange.lock().info.response_body_bytes = total;
        let result = match trailers {
            None => body_chunk(p, running, &order, Direction::Response, data, eos).await,
            Some(t) => trailers_through(p, running, &order, Direction::Response, t).await,
        };
        let out = match result {
            Ok((out, None)) => out,
            // The head is already on its way: a failure now can only reset the stream.
            Ok((_, Some(_))) | Err(_) => {
                tx.abort("a filter ended the response".into()).await;
                return;
            }
        };
        if !tx.data(out.data).await {
            return;
        }
        if let Some(t) = out.trailers {
            tx.trailers(t).await;
        }
        if eos {
            return;
        }
    }
}

fn add_via(headers: &mut HeaderMap) {
    headers.append(
        http::header::VIA,
        HeaderValue::from_static("1.1 wasmfilter"),
    );
}

fn local_to_response(local: &LocalResponse) -> Response<Body> {
    let mut resp = Response::new(full(local.body.clone()));
    *resp.status_mut() =
        StatusCode::from_u16(local.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *resp.headers_mut() = to_header_map(&local.headers);
    if !local.body.is_empty() && !resp.headers().contains_key(http::header::CONTENT_TYPE) {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    if let Some(code) = local.grpc_status {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from(code));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    resp
}

/// A filter replied locally: the filters that already saw the request see the reply's
/// response headers (as in Envoy), then it is sent.
async fn local_reply(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: SharedExchange,
    mut running: Vec<Running>,
    local: LocalResponse,
) -> Response<Body> {
    let mut resp = local_to_response(&local);
    {
        let mut ex = exchange.lock();
        ex.response_headers = Fields::new();
        ex.response_headers.add(":status", resp.status().as_str());
        to_fields(resp.headers(), &mut ex.response_headers);
        ex.response_headers
            .add("content-length", local.body.len().to_string());
        ex.info.response_code = Some(local.status);
        ex.info.response_code_details = Some(local.details.clone());
    }
    for r in running.iter_mut().rev().filter(|r| r.ctx != 0 || r.native) {
        if r.native {
            native_response_headers(r, &exchange);
            continue;
        }
        // A second local reply from the response side is ignored: the first one stands.
        let _ = callback(state, active, r, false, |vm, ctx| {
            vm.on_response_headers(ctx, local.body.is_empty())
        })
        .await;
    }
    finish_all(&running);
    let ex = exchange.lock();
    let mut headers = to_header_map(&ex.response_headers);
    headers.remove(http::header::CONTENT_LENGTH);
    *resp.headers_mut() = headers;
    resp
}

/// A native filter's response-header phase (timed like a Wasm callback).
fn native_response_headers(r: &Running, exchange: &SharedExchange) {
    if let Some(native) = r.filter.native_filter() {
        let started = Instant::now();
        native.on_response_headers(&mut exchange.lock().response_headers);
        r.filter.metrics.callback(started.elapsed().as_secs_f64());
    }
}

/// Ends every filter's stream context, whatever happened to the request.
fn finish_all(running: &[Running]) {
    for r in running.iter().filter(|r| r.ctx != 0) {
        let Some(handle) = &r.vm else { continue };
        let result = {
            let mut guard = handle.borrow_mut();
            let result = guard.0.finish_stream(r.ctx);
            let _ = guard.0.take_effects();
            result
        };
        WORKER_VMS.with(|vms| {
            let mut vms = vms.borrow_mut();
            match &result {
                Ok(()) => vms.succeeded(&r.filter),
                Err(e) => {
                    tracing::warn!(filter = %r.filter.name, %e, "finishing the stream failed");
                    vms.fail(&r.filter, handle, e);
                }
            }
        });
    }
}

pub fn timeout_or(cluster_timeout: Duration, call_timeout: Option<Duration>) -> Duration {
    call_timeout.unwrap_or(cluster_timeout)
}

pub fn callout_response(resp: Response<Bytes>, trailers: Option<HeaderMap>) -> HttpCallResponse {
    let mut headers = Fields::new();
    headers.add(":status", resp.status().as_str());
    to_fields(resp.headers(), &mut headers);
    let mut t = Fields::new();
    if let Some(tr) = &trailers {
        to_fields(tr, &mut t);
    }
    HttpCallResponse {
        headers,
        body: resp.into_body().to_vec(),
        trailers: t,
    }
}
