//! One request through the proxy, top to bottom:
//!
//! 1. request headers → every matching filter's `on_request_headers`, in chain order (a filter
//!    may pause for a callout, reply locally, or rewrite `:authority`/`:path` to steer routing);
//! 2. request body and trailers → buffered (up to the buffer limit) when filters run, then
//!    each filter's body and trailer callbacks;
//! 3. routing on the headers as the filters left them, then the upstream call;
//! 4. response headers, body, trailers → the same filters in reverse order (they also run on
//!    local replies);
//! 5. every filter's `on_done`/`on_log`/`on_delete`.
//!
//! Errors are turned into responses in one place, [`ProxyError::into_response`]. No VM borrow
//! is ever held across an await: callbacks run synchronously between awaits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use parking_lot::Mutex;
use wasmfilter_api::FailurePolicy;
use wasmfilter_host::{
    Action, CallbackError, Effect, Fields, HttpCallResponse, HttpExchange, LocalResponse,
    SharedExchange, Vm,
};

use crate::chain::{Active, LoadedFilter, WORKER_VMS};
use crate::state::State;

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why a request did not get the upstream's answer. Each becomes a short response here.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    BodyTooLarge,
    ResponseTooLarge,
    BadRequestBody(String),
    UpstreamConnect { cluster: String, message: String },
    UpstreamTimeout { cluster: String },
    UpstreamProtocol { cluster: String, message: String },
    FilterFailed { filter: String, message: String },
    FilterStalled { filter: String },
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
            ProxyError::ResponseTooLarge => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "response body exceeds the filter buffer limit".into(),
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

/// A filter on this request: its VM context and whether it is still active.
struct Running {
    filter: Arc<LoadedFilter>,
    ctx: u32,
    skipped: bool,
}

/// How a phase ended.
enum Flow {
    Continue,
    Local(LocalResponse),
    Reset,
}

pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    state
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let active = state.active.load_full();
    let response = match proxy(&state, &active, req, peer, local).await {
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

fn to_fields(headers: &HeaderMap, fields: &mut Fields) {
    for (k, v) in headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            fields.add(k.as_str(), v.as_bytes());
        }
    }
}

fn to_header_map(fields: &Fields) -> HeaderMap {
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

async fn proxy(
    state: &Arc<State>,
    active: &Arc<Active>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
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
    ex.request_headers.add(":scheme", "http");
    for (k, v) in &parts.headers {
        if k != http::header::HOST && !HOP_BY_HOP.contains(&k.as_str()) {
            ex.request_headers.add(k.as_str(), v.as_bytes());
        }
    }
    ex.info.protocol = format!("{:?}", parts.version).replace("HTTP/2.0", "HTTP/2");
    ex.info.scheme = "http".into();
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
    let exchange: SharedExchange = Arc::new(Mutex::new(ex));

    let mut running: Vec<Running> = active
        .filters
        .iter()
        .filter(|f| {
            f.matches
                .matches(&authority, parts.uri.path(), parts.method.as_str())
        })
        .map(|f| Running {
            filter: f.clone(),
            ctx: 0,
            skipped: false,
        })
        .collect();
    let has_body = !hyper::body::Body::is_end_stream(&body);

    let mut streamed = None;
    let result = run_request(
        state,
        active,
        &exchange,
        &mut running,
        body,
        has_body,
        &mut streamed,
    )
    .await;
    let response = match result {
        Ok(Flow::Continue) => forward(state, active, &exchange, &mut running, streamed).await,
        Ok(Flow::Local(local)) => local_reply(state, active, &exchange, &mut running, local).await,
        Ok(Flow::Reset) => Err(ProxyError::FilterFailed {
            filter: "close_stream".into(),
            message: "a filter reset the stream".into(),
        }),
        Err(e) => Err(e),
    };
    finish_all(state, &running);
    response
}

/// Request headers, then (when filters run) the buffered body and trailers.
async fn run_request(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    running: &mut [Running],
    body: Incoming,
    has_body: bool,
    streamed: &mut Option<Incoming>,
) -> Result<Flow, ProxyError> {
    for r in running.iter_mut() {
        if !start_stream(state, active, exchange, r)? {
            continue;
        }
        let flow = callback(state, active, r, |vm, ctx| {
            vm.on_request_headers(ctx, !has_body)
        })
        .await?;
        if !matches!(flow, Flow::Continue) {
            return Ok(flow);
        }
    }
    if !has_body {
        return Ok(Flow::Continue);
    }
    if running.is_empty() {
        // No filter wants the body: it streams straight to the upstream.
        *streamed = Some(body);
        return Ok(Flow::Continue);
    }
    let collected = Limited::new(body, active.buffer_limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ProxyError::BodyTooLarge
            } else {
                ProxyError::BadRequestBody(e.to_string())
            }
        })?;
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    {
        let mut ex = exchange.lock();
        ex.info.request_body_bytes = bytes.len() as u64;
        ex.request_body = bytes.to_vec();
        if let Some(t) = &trailers {
            to_fields(t, &mut ex.request_trailers);
        }
    }
    for r in running.iter_mut() {
        let has_trailers = trailers.is_some();
        let flow = callback(state, active, r, |vm, ctx| {
            vm.on_request_body(ctx, !has_trailers)
        })
        .await?;
        if !matches!(flow, Flow::Continue) {
            return Ok(flow);
        }
        if has_trailers {
            let flow = callback(state, active, r, |vm, ctx| vm.on_request_trailers(ctx)).await?;
            if !matches!(flow, Flow::Continue) {
                return Ok(flow);
            }
        }
    }
    Ok(Flow::Continue)
}

/// Creates the filter's stream context; `false` if the filter is skipped (FailOpen).
fn start_stream(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    r: &mut Running,
) -> Result<bool, ProxyError> {
    let result = WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        vms.sync(active);
        let (vm, root) = vms.get(&state.host, &r.filter, &active.embedder, &state.metrics)?;
        vm.create_stream(*root, exchange.clone())
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(ctx) => {
            r.ctx = ctx;
            Ok(true)
        }
        Err(message) => on_failure(state, r, message).map(|_| false),
    }
}

/// Applies the filter's failure policy: FailOpen skips it, FailClosed refuses the request.
fn on_failure(state: &Arc<State>, r: &mut Running, message: String) -> Result<(), ProxyError> {
    r.skipped = true;
    match r.filter.failure_policy {
        FailurePolicy::FailOpen => {
            state.metrics.fail_open(&r.filter.name);
            Ok(())
        }
        FailurePolicy::FailClosed => {
            state.metrics.fail_closed(&r.filter.name);
            Err(ProxyError::FilterFailed {
                filter: r.filter.name.clone(),
                message,
            })
        }
    }
}

fn with_vm<T>(
    active: &Arc<Active>,
    r: &Running,
    f: impl FnOnce(&mut Vm, u32) -> Result<T, CallbackError>,
) -> Result<T, CallbackError> {
    WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        vms.sync(active);
        match vms
            .slots
            .get_mut(&(r.filter.name.clone(), r.filter.version))
            .and_then(|s| s.vm.as_mut())
        {
            Some((vm, _)) => f(vm, r.ctx),
            None => Err(CallbackError::VmFailed(
                "the VM was rebuilt during this request".into(),
            )),
        }
    })
}

/// Runs one stream callback and everything it leads to (callouts and their answers) until the
/// filter continues, replies locally, or resets the stream.
async fn callback(
    state: &Arc<State>,
    active: &Arc<Active>,
    r: &mut Running,
    call: impl FnOnce(&mut Vm, u32) -> Result<Action, CallbackError>,
) -> Result<Flow, ProxyError> {
    if r.skipped {
        return Ok(Flow::Continue);
    }
    let started = Instant::now();
    let result = with_vm(active, r, |vm, ctx| {
        Ok((call(vm, ctx)?, vm.take_effects(), vm.memory_bytes()))
    });
    state
        .metrics
        .callback(&r.filter.name, started.elapsed().as_secs_f64());
    let (action, mut effects, memory) = match result {
        Ok(v) => v,
        Err(e) => return callback_failed(state, r, e).map(|_| Flow::Continue),
    };
    state.metrics.vm_memory(&r.filter.name, memory);
    let mut resumed = action == Action::Continue;
    let mut pending = tokio::task::JoinSet::new();
    loop {
        for effect in std::mem::take(&mut effects) {
            match effect {
                Effect::LocalResponse { response, .. } => return Ok(Flow::Local(response)),
                Effect::CloseStream { .. } => return Ok(Flow::Reset),
                Effect::ContinueStream { context_id, .. } if context_id == r.ctx => resumed = true,
                Effect::HttpCall(call) => {
                    let state = state.clone();
                    let active = active.clone();
                    pending.spawn_local(async move {
                        let response = crate::upstream::callout(&state, &active, &call).await;
                        (call.token, response)
                    });
                }
                Effect::GrpcCall(call) | Effect::GrpcStreamOpen(call) => {
                    // gRPC callouts are not carried out by the dataplane yet: the filter is
                    // told the call is unavailable, as it would be for an unreachable upstream.
                    let token = call.token;
                    let result = with_vm(active, r, |vm, _| {
                        vm.on_grpc_close(
                            token,
                            14,
                            "gRPC callouts are not supported by this dataplane yet",
                        )?;
                        Ok(vm.take_effects())
                    });
                    match result {
                        Ok(more) => effects.extend(more),
                        Err(e) => return callback_failed(state, r, e).map(|_| Flow::Continue),
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
        let Some(done) = pending.join_next().await else {
            return Err(ProxyError::FilterStalled {
                filter: r.filter.name.clone(),
            });
        };
        let Ok((token, response)) = done else {
            return Err(ProxyError::FilterStalled {
                filter: r.filter.name.clone(),
            });
        };
        match with_vm(active, r, |vm, _| {
            vm.on_http_call_response(token, response)?;
            Ok(vm.take_effects())
        }) {
            Ok(more) => effects = more,
            Err(e) => return callback_failed(state, r, e).map(|_| Flow::Continue),
        }
    }
}

fn callback_failed(
    state: &Arc<State>,
    r: &mut Running,
    e: CallbackError,
) -> Result<(), ProxyError> {
    state.metrics.trap(&r.filter.name);
    WORKER_VMS.with(|vms| vms.borrow_mut().fail(&r.filter, &e));
    on_failure(state, r, e.to_string())
}

/// Routes on the (possibly rewritten) request and forwards it, then runs the response side.
async fn forward(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    running: &mut [Running],
    streamed: Option<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (method, authority, path, headers, body) = {
        let ex = exchange.lock();
        let get = |k: &str| ex.request_headers.get_str(k).unwrap_or_default();
        (
            get(":method"),
            get(":authority"),
            get(":path"),
            ex.request_headers.clone(),
            ex.request_body.clone(),
        )
    };
    let url_path = path.split('?').next().unwrap_or("/").to_string();
    let route = active
        .route(&authority, &url_path, &method, |h| headers.get_str(h))
        .ok_or(ProxyError::NoRoute)?;
    let cluster = route.config.cluster.clone();
    let upstream = crate::upstream::send(
        state, active, &cluster, &method, &authority, &path, &headers, body, streamed,
    )
    .await?;
    respond(state, active, exchange, running, upstream).await
}

/// Runs the response callbacks (reverse order) on the upstream's (or a local) response.
async fn respond(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: &SharedExchange,
    running: &mut [Running],
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
    if running.iter().all(|r| r.skipped) {
        let mut resp = Response::new(body);
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = to_header_map(&exchange.lock().response_headers);
        add_via(resp.headers_mut());
        return Ok(resp);
    }
    let has_body = !hyper::body::Body::is_end_stream(&body);
    for r in running.iter_mut().rev() {
        if let Flow::Local(local) = callback(state, active, r, |vm, ctx| {
            vm.on_response_headers(ctx, !has_body)
        })
        .await?
        {
            return Ok(local_to_response(&local));
        }
    }
    let collected = Limited::new(body, active.buffer_limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ProxyError::ResponseTooLarge
            } else {
                ProxyError::UpstreamProtocol {
                    cluster: "upstream".into(),
                    message: e.to_string(),
                }
            }
        })?;
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    {
        let mut ex = exchange.lock();
        ex.info.response_body_bytes = bytes.len() as u64;
        ex.response_body = bytes.to_vec();
        if let Some(t) = &trailers {
            to_fields(t, &mut ex.response_trailers);
        }
    }
    if has_body {
        for r in running.iter_mut().rev() {
            let eos = trailers.is_none();
            if let Flow::Local(local) =
                callback(state, active, r, |vm, ctx| vm.on_response_body(ctx, eos)).await?
            {
                return Ok(local_to_response(&local));
            }
        }
    }
    if trailers.is_some() {
        for r in running.iter_mut().rev() {
            if let Flow::Local(local) =
                callback(state, active, r, |vm, ctx| vm.on_response_trailers(ctx)).await?
            {
                return Ok(local_to_response(&local));
            }
        }
    }
    Ok(build_response(exchange))
}

fn build_response(exchange: &SharedExchange) -> Response<Body> {
    let mut ex = exchange.lock();
    let status = ex
        .response_headers
        .get_str(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = to_header_map(&ex.response_headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let body = std::mem::take(&mut ex.response_body);
    let trailers = (!ex.response_trailers.is_empty()).then(|| to_header_map(&ex.response_trailers));
    let body: Body = match trailers {
        None => full(body),
        Some(t) => full(body)
            .with_trailers(async move { Some(Ok(t)) })
            .boxed_unsync(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    add_via(resp.headers_mut());
    resp
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
    exchange: &SharedExchange,
    running: &mut [Running],
    local: LocalResponse,
) -> Result<Response<Body>, ProxyError> {
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
    for r in running.iter_mut().rev().filter(|r| r.ctx != 0) {
        // A second local reply from the response side is ignored: the first one stands.
        let _ = callback(state, active, r, |vm, ctx| {
            vm.on_response_headers(ctx, local.body.is_empty())
        })
        .await?;
    }
    let ex = exchange.lock();
    let mut headers = to_header_map(&ex.response_headers);
    headers.remove(http::header::CONTENT_LENGTH);
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// Ends every filter's stream context, whatever happened to the request.
fn finish_all(state: &Arc<State>, running: &[Running]) {
    let _ = state;
    WORKER_VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        for r in running.iter().filter(|r| r.ctx != 0) {
            if let Some((vm, _)) = vms
                .slots
                .get_mut(&(r.filter.name.clone(), r.filter.version))
                .and_then(|s| s.vm.as_mut())
            {
                if let Err(e) = vm.finish_stream(r.ctx) {
                    tracing::warn!(filter = %r.filter.name, %e, "finishing the stream failed");
                    let _ = vm.take_effects();
                    vms.fail(&r.filter, &e);
                } else {
                    let _ = vm.take_effects();
                    vms.succeeded(&r.filter);
                }
            }
        }
    });
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
