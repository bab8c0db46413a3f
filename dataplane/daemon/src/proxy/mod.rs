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

mod dispatch;
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

pub use crate::body::{Body, full};
use crate::chain::Active;
pub use crate::error::ProxyError;
use crate::state::State;
use dispatch::{Running, finish_all};
use request::{Checked, check_head, new_exchange, request_path};
use response::{local_reply, respond};

/// A body of known length up to this size is read whole and run through the filters once:
/// one sized write instead of a chunked stream fed by a task.
pub(crate) const INLINE_BODY_LIMIT: u64 = 64 * 1024;

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

pub(crate) async fn proxy(
    state: &Arc<State>,
    active: &Arc<Active>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    // The head is checked and normalised first: filters and routes match what is forwarded.
    let head = match check_head(active, &parts)? {
        Checked::Proxy(head) => head,
        Checked::Answer(resp) => return Ok(resp),
    };
    let exchange: SharedExchange = Arc::new(Mutex::new(new_exchange(
        active, &parts, &head, peer, local, tls,
    )));
    let mut running: Vec<Running> = active
        .filters
        .iter()
        .filter(|f| {
            f.matches
                .matches(&head.authority, &head.path, parts.method.as_str())
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
pub(crate) enum Upstream {
    Response(Response<Body>),
    Local(LocalResponse),
}
