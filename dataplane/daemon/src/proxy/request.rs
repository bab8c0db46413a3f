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
use crate::chain::Active;
use crate::error::ProxyError;
use crate::fields::HOP_BY_HOP;
use crate::state::State;

pub(crate) fn new_exchange(
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
