//! The request side: the exchange built from the client's head, request headers through the
//! filters, routing, and the request body pumped through them to the upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use wasmfilter_host::{HttpExchange, SharedExchange};

use super::dispatch::*;
use super::pipeline::*;
use super::{INLINE_BODY_LIMIT, Upstream};
use crate::body::{self, BoxError};
use crate::body::{Body, full};
use crate::chain::Active;
use crate::error::{ALLOWED_METHODS, ProxyError};
use crate::fields::HOP_BY_HOP;
use crate::normalize::{Target, normalize_authority, normalize_target};
use crate::state::State;

/// The client's request head once checked: what filters and routes match, and what is
/// forwarded (the same values, so a scope cannot be stepped around by spelling a request
/// differently).
pub(crate) struct Head {
    /// `host[:port]`, lower-case, without a trailing dot ([`normalize_authority`]).
    pub authority: String,
    /// The normalised path with the query as the client sent it.
    pub path_and_query: String,
    /// The normalised path alone.
    pub path: String,
}

/// What the head check decided.
pub(crate) enum Checked {
    /// Proxy the request with this head.
    Proxy(Head),
    /// The proxy answers itself (`OPTIONS *`).
    Answer(http::Response<Body>),
}

/// Checks and normalises the request head before any filter sees it (docs/operations.md,
/// "Request normalisation and scope matching"). hyper has already refused what it cannot
/// parse (a bad request line, `Transfer-Encoding` without a final `chunked` on HTTP/1.1,
/// `Content-Length` conflicts, HTTP/2 connection-specific headers).
pub(crate) fn check_head(
    active: &Active,
    parts: &http::request::Parts,
) -> Result<Checked, ProxyError> {
    for value in parts.headers.get_all(http::header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        if let Some(coding) = text
            .split(',')
            .map(str::trim)
            .find(|c| !c.eq_ignore_ascii_case("chunked"))
        {
            return Err(ProxyError::UnsupportedTransferCoding {
                coding: coding.to_string(),
            });
        }
    }
    let authority = authority(parts)?;
    if parts.method == http::Method::CONNECT {
        return Err(ProxyError::ConnectNotAllowed);
    }
    let uri = &parts.uri;
    if uri.path() == "*" && uri.scheme().is_none() {
        if parts.method != http::Method::OPTIONS {
            return Err(ProxyError::InvalidTarget {
                reason: "'*' is only the target of OPTIONS".into(),
            });
        }
        let mut resp = http::Response::new(full(""));
        resp.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static(ALLOWED_METHODS),
        );
        return Ok(Checked::Answer(resp));
    }
    match uri.scheme_str() {
        None if uri.authority().is_some() => {
            return Err(ProxyError::InvalidTarget {
                reason: "authority-form (host:port) is only the target of CONNECT".into(),
            });
        }
        None | Some("http") | Some("https") => {}
        Some(other) => {
            return Err(ProxyError::InvalidTarget {
                reason: format!("absolute-form with scheme {other:?}; only http and https"),
            });
        }
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    // Absolute-form without a path (`http://host`) means `/`; `?q` alone means `/?q`.
    let owned;
    let target = if target.starts_with('?') {
        owned = format!("/{target}");
        owned.as_str()
    } else if target.is_empty() {
        "/"
    } else {
        target
    };
    let path_and_query = match normalize_target(target, &active.http.path_options()) {
        Ok(Target::Forward(p)) => p,
        Ok(Target::Redirect(location)) => {
            return Err(ProxyError::EscapedSlashRedirect { location });
        }
        Err(e) => {
            return Err(ProxyError::InvalidPath {
                reason: e.to_string(),
            });
        }
    };
    let path = path_and_query.split('?').next().unwrap_or("/").to_string();
    Ok(Checked::Proxy(Head {
        authority,
        path_and_query,
        path,
    }))
}

/// The request's authority: the absolute-form target's, else `:authority` (HTTP/2), else the
/// one `Host` header (RFC 9112 §3.2: exactly one, valid; RFC 9113 §8.3.1: `Host` may not
/// disagree with `:authority`).
fn authority(parts: &http::request::Parts) -> Result<String, ProxyError> {
    let invalid = |reason: String| ProxyError::InvalidHost { reason };
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(invalid("more than one Host header".into()));
    }
    let host = match host {
        Some(h) => Some(
            normalize_authority(
                h.to_str()
                    .map_err(|_| invalid("the Host header is not ASCII".into()))?,
            )
            .map_err(|e| invalid(e.to_string()))?,
        ),
        None => None,
    };
    let from_target = match parts.uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            return Err(invalid(format!(
                "the request target's authority {:?} carries user information",
                a.as_str()
            )));
        }
        Some(a) => Some(normalize_authority(a.as_str()).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    match (from_target, host) {
        (Some(a), Some(h)) if parts.version == http::Version::HTTP_2 && a != h => Err(invalid(
            format!("Host {h:?} disagrees with :authority {a:?}"),
        )),
        (Some(a), _) => Ok(a),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(invalid(
            "the request has no Host header (nor :authority)".into(),
        )),
    }
}

pub(crate) fn new_exchange(
    active: &Active,
    parts: &http::request::Parts,
    head: &Head,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
) -> HttpExchange {
    let scheme = if tls { "https" } else { "http" };
    let authority = head.authority.as_str();
    let mut ex = HttpExchange::default();
    ex.request_headers.add(":method", parts.method.as_str());
    ex.request_headers
        .add(":path", head.path_and_query.as_str());
    ex.request_headers.add(":authority", authority);
    ex.request_headers.add(":scheme", scheme);
    // Headers the client named in `Connection` describe its connection only (RFC 9110
    // §7.6.1): they are not forwarded, nor shown to filters.
    let named: Vec<String> = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect();
    for (k, v) in &parts.headers {
        if k != http::header::HOST
            && !HOP_BY_HOP.contains(&k.as_str())
            && !named.iter().any(|n| n == k.as_str())
        {
            ex.request_headers.add(k.as_str(), v.as_bytes());
        }
    }
    // X-Forwarded-For and -Proto come from the connection unless the peer is a trusted proxy
    // (`http.trustedProxies`): an untrusted client's values are replaced, not appended to, so
    // nothing after the proxy reads an address or a scheme the client made up.
    let trusted = active.http.trusts(peer.ip());
    let client = peer.ip().to_canonical().to_string();
    let xff = match ex.request_headers.get_str("x-forwarded-for") {
        Some(prior) if trusted => format!("{prior}, {client}"),
        _ => client,
    };
    ex.request_headers.set("x-forwarded-for", xff);
    if !trusted || ex.request_headers.get("x-forwarded-proto").is_none() {
        ex.request_headers.set("x-forwarded-proto", scheme);
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
    if let Some(route) = active.route(authority, &head.path, parts.method.as_str(), |h| {
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

/// Request headers through the filters, routing, then the upstream call with the request body
/// streaming through the filters alongside it.
pub(crate) async fn request_path(
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
    let route = active
        .route(&authority, &url_path, &method, |h| headers.get_str(h))
        .ok_or(ProxyError::NoRoute)?;
    let (cluster, timeout) = (route.config.cluster.clone(), route.config.timeout);
    let request = crate::upstream::Outgoing {
        cluster: &cluster,
        method: &method,
        authority: &authority,
        path: &path,
        headers: &headers,
        timeout,
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
    // The upstream may answer before the body is through. A refusal (4xx/5xx: 401, 403, 413,
    // ...) is forwarded at once and the rest of the body dropped, as Envoy and nginx do: such
    // an upstream usually stops reading, and waiting for the body to get through would hold
    // the client forever. Any other early answer (a streaming 200) waits for the body.
    let mut answered = None;
    let pumped = loop {
        tokio::select! {
            flow = &mut pump => break flow,
            resp = &mut upstream, if answered.is_none() => match resp {
                Ok(r) if refuses(r.status()) => return Ok(Upstream::Response(r)),
                other => answered = Some(other),
            },
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

/// An answer that ends the exchange whatever the rest of the request body would have been.
fn refuses(status: http::StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Reads the request body frame by frame and feeds it through the filters to the upstream.
pub(crate) async fn pump_request(
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
