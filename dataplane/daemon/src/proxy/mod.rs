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

pub(crate) mod dispatch;
mod pipeline;
mod request;
mod response;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use parking_lot::Mutex;
use wasmfilter_host::{LocalResponse, SharedExchange};

use crate::body::Guarded;
pub use crate::body::{Body, full};
use crate::chain::Active;
pub use crate::error::ProxyError;
use crate::state::{ConnActivity, InFlight, State};
use dispatch::{Chain, Running, stream_timeout};
use request::{Checked, check_head, new_exchange, request_path};
use response::{local_reply, respond};

/// A body of known length up to this size is read whole and run through the filters once:
/// one sized write instead of a chunked stream fed by a task.
pub(crate) const INLINE_BODY_LIMIT: u64 = 64 * 1024;

/// One request from a client. It counts as in flight ([`InFlight`]) until its response body
/// has ended or been dropped, so a drain waits for bodies still streaming and a request the
/// client abandoned stops counting at once.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    conn: Option<Arc<ConnActivity>>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let guard = InFlight::new(&state, conn);
    let active = state.active.load_full();
    // Nothing a client or a filter sends should panic the request path; if something does
    // anyway, the panic stays this request's: it is answered 500, counted and logged, and
    // the worker keeps serving. AssertUnwindSafe: the request's own state (exchange, stream
    // contexts) is dropped with the future; what it shares with other requests is behind
    // locks that do not poison (parking_lot) or atomics.
    let proxied = std::panic::AssertUnwindSafe(proxy(&state, &active, req, peer, local, tls));
    let response = match futures_util::FutureExt::catch_unwind(proxied).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            state.metrics.request_panic();
            tracing::error!(
                peer = %peer,
                "the request path panicked ({why}); answered 500, the worker keeps serving"
            );
            let mut resp =
                Response::new(full("internal error: the request could not be processed\n"));
            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    };
    state
        .metrics
        .request(response.status().as_u16(), started.elapsed().as_secs_f64());
    let mut response = response.map(|body| Guarded::wrap(body, guard));
    if state.shutdown.is_cancelled() {
        // Draining: this is the connection's last response (HTTP/2 drops the header; its
        // connection gets a GOAWAY instead).
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    Ok(response)
}

pub(crate) async fn proxy(
    state: &Arc<State>,
    active: &Arc<Active>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    if req.method() == http::Method::CONNECT {
        return crate::tunnel::connect(active, req).await;
    }
    let (parts, body) = req.into_parts();
    // The head is checked and normalised first: filters and routes match what is forwarded.
    let head = match check_head(active, &parts)? {
        Checked::Proxy(head) => head,
        Checked::Answer(resp) => return Ok(resp),
    };
    let exchange: SharedExchange = Arc::new(Mutex::new(new_exchange(
        active, &parts, &head, peer, local, tls,
    )));
    let timeout = stream_timeout(active, &exchange);
    let running: Vec<Running> = active
        .filters
        .iter()
        .filter(|f| {
            f.is_http()
                && f.matches
                    .matches(&head.authority, &head.path, parts.method.as_str())
        })
        .map(|f| Running {
            filter: f.clone(),
            vm: None,
            ctx: 0,
            skipped: false,
            native: false,
            pending: Vec::new(),
            stream_timeout: timeout,
        })
        .collect();
    // Owns the stream contexts from here: if this future is dropped (the client went away),
    // dropping the chain ends them.
    let mut running = Chain::new(state, running);
    let result = request_path(state, active, &exchange, &mut running, body).await;
    match result {
        Ok(Upstream::Response(resp)) => respond(state, active, exchange, running, resp).await,
        Ok(Upstream::Local(reply)) => {
            Ok(local_reply(state, active, exchange, running, reply).await)
        }
        Err(e) => {
            running.finish();
            Err(e)
        }
    }
}

/// What the request side ended in.
pub(crate) enum Upstream {
    Response(Response<Body>),
    Local(LocalResponse),
}
