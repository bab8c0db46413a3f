//! The response side: the upstream's head, body and trailers through the filters in reverse
//! order to the client, and local replies.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use wasmfilter_host::{Fields, LocalResponse, SharedExchange};

use super::INLINE_BODY_LIMIT;
use super::dispatch::*;
use super::pipeline::*;
use crate::body::{self, Body, full};
use crate::chain::Active;
use crate::error::ProxyError;
use crate::fields::{add_via, to_fields, to_header_map};
use crate::state::State;

/// Runs the response side: headers through the filters (reverse order), then the body and
/// trailers streaming through them to the client. The stream contexts end when the body does.
pub(crate) async fn respond(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: SharedExchange,
    mut running: Chain,
    upstream: Response<Body>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = upstream.into_parts();
    running.phase = "response";
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
        running.finish();
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
                running.finish();
                return Ok(local_to_response(&reply, &exchange));
            }
            Ok(Flow::Reset) => {
                running.finish();
                return Err(ProxyError::Reset {
                    filter: running[i].filter.name.clone(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                running.finish();
                return Err(e);
            }
        }
    }
    if running.iter().all(|r| r.skipped || r.ctx == 0) {
        // Only native filters (header phases only) ran: the body streams through untouched,
        // with its length, instead of going through the body pipeline.
        running.finish();
        let mut head = response_head(&exchange);
        if let Some(length) = parts.headers.get(http::header::CONTENT_LENGTH) {
            head.headers_mut()
                .insert(http::header::CONTENT_LENGTH, length.clone());
        }
        return Ok(head.map(|_| body));
    }
    let head = response_head(&exchange);
    if !has_body {
        running.finish();
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
                through_whole(
                    &p,
                    &mut running.running,
                    &order,
                    Direction::Response,
                    collected,
                )
                .await
            }
            Err(e) => Err(ProxyError::UpstreamProtocol {
                cluster: "upstream".into(),
                message: e.to_string(),
            }),
        };
        running.finish();
        return match result? {
            (out, None) => Ok(head.map(|_| sized(out))),
            (_, Some(Flow::Local(reply))) => Ok(local_to_response(&reply, &exchange)),
            (_, Some(_)) => Err(ProxyError::Reset {
                filter: "response body".into(),
            }),
        };
    }
    let (tx, rx) = body::channel();
    let (state, active) = (state.clone(), active.clone());
    running.phase = "response_body";
    // The pump owns the chain: when the body ends the contexts end; if the client goes away,
    // the upstream fails, or the worker stops (the task is dropped), the chain's drop ends
    // them and counts the request as abandoned.
    tokio::task::spawn_local(async move {
        let p = Pipeline {
            state: &state,
            active: &active,
            exchange: &exchange,
        };
        if pump_response(&p, &mut running, body, tx).await {
            running.finish();
        }
    });
    Ok(head.map(|_| rx.boxed_unsync()))
}

/// The response head as the filters left it. Filters may change the body, so the length is
/// left to the transfer encoding.
pub(crate) fn response_head(exchange: &SharedExchange) -> Response<()> {
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

/// Streams the response body through the filters to the client; `true` when it was
/// delivered whole (or a filter ended it), `false` when the client or the upstream went away.
pub(crate) async fn pump_response(
    p: &Pipeline<'_>,
    running: &mut [Running],
    mut body: Body,
    tx: body::BodySender,
) -> bool {
    let exchange = p.exchange;
    let order: Vec<usize> = (0..running.len()).rev().collect();
    let mut total = 0u64;
    loop {
        // A client that goes away while the upstream is silent is noticed at once.
        let frame = tokio::select! {
            frame = next_frame(&mut body) => frame,
            _ = tx.closed() => return false,
        };
        let (data, trailers, eos) = match frame {
            Ok(frame) => frame,
            Err(e) => {
                tx.abort(format!("upstream body failed: {e}")).await;
                return false;
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
                return true;
            }
        };
        if !tx.data(out.data).await {
            return false;
        }
        if let Some(t) = out.trailers
            && !tx.trailers(t).await
        {
            return false;
        }
        if eos {
            return true;
        }
    }
}

/// A local reply as the client gets it, as Envoy sends it. To a gRPC request (content-type
/// `application/grpc*`): a trailers-only response, `:status 200`, `content-type:
/// application/grpc`, `grpc-status` (the filter's gRPC status, else mapped from the HTTP
/// status as Envoy does) and `grpc-message` (the body, else the details, percent-encoded),
/// with the filter's headers and no body. To any other request: the HTTP status, headers and
/// body as given (a gRPC status is ignored).
pub(crate) fn local_to_response(
    local: &LocalResponse,
    exchange: &SharedExchange,
) -> Response<Body> {
    if is_grpc_request(exchange) {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.headers_mut() = to_header_map(&local.headers);
        let headers = resp.headers_mut();
        headers.remove(http::header::CONTENT_LENGTH);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = local
            .grpc_status
            .unwrap_or_else(|| http_to_grpc_status(local.status));
        headers.insert("grpc-status", HeaderValue::from(code));
        let message = if local.body.is_empty() {
            local.details.as_bytes()
        } else {
            &local.body
        };
        if !message.is_empty()
            && let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message))
        {
            headers.insert("grpc-message", v);
        }
        return resp;
    }
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
    resp
}

/// Whether the client speaks gRPC (Envoy's `Grpc::Common::isGrpcRequestHeaders`).
fn is_grpc_request(exchange: &SharedExchange) -> bool {
    exchange
        .lock()
        .request_headers
        .get_str("content-type")
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`, for a local reply to a gRPC request that gave
/// no gRPC status.
fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        200 => 0,
        _ => 2, // UNKNOWN
    }
}

/// The gRPC spec's percent-encoding of `grpc-message`: bytes outside printable ASCII, and
/// `%` itself, become `%XX`.
fn grpc_percent_encode(message: &[u8]) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A filter replied locally: the filters that already saw the request see the reply's
/// response headers (as in Envoy), then it is sent.
pub(crate) async fn local_reply(
    state: &Arc<State>,
    active: &Arc<Active>,
    exchange: SharedExchange,
    mut running: Chain,
    local: LocalResponse,
) -> Response<Body> {
    let mut resp = local_to_response(&local, &exchange);
    let empty = resp.body().is_end_stream();
    {
        let mut ex = exchange.lock();
        ex.response_headers = Fields::new();
        ex.response_headers.add(":status", resp.status().as_str());
        to_fields(resp.headers(), &mut ex.response_headers);
        let length = if empty { 0 } else { local.body.len() };
        ex.response_headers
            .add("content-length", length.to_string());
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
            vm.on_response_headers(ctx, empty)
        })
        .await;
    }
    running.finish();
    let ex = exchange.lock();
    let mut headers = to_header_map(&ex.response_headers);
    headers.remove(http::header::CONTENT_LENGTH);
    *resp.headers_mut() = headers;
    resp
}
