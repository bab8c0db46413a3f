//! Upstream calls: forwarding a request to a cluster, and filter callouts to clusters.
//! Connections are pooled per protocol; the first endpoint of a cluster that answers is used.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use wasmfilter_host::{Fields, HttpCallResponse, HttpCallout};

use crate::body::BoxError;
use crate::body::{Body, Guarded, IdleTimeout, full};
use crate::chain::Active;
use crate::error::ProxyError;
use crate::pool::{Breaker, connections_full};
use crate::state::State;

/// A request body that says when it has been sent whole: the request timeout starts then
/// (as Envoy's route timeout does), so a long upload is not cut by it.
struct SignalEnd {
    inner: Body,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl hyper::body::Body for SignalEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if (matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream())
            && let Some(tx) = self.sent.take()
        {
            let _ = tx.send(());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `body` so the returned receiver resolves when it has been sent whole (or dropped).
fn signal_end(body: Body) -> (Body, tokio::sync::oneshot::Receiver<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = if body.is_end_stream() {
        let _ = tx.send(());
        None
    } else {
        Some(tx)
    };
    (SignalEnd { inner: body, sent }.boxed_unsync(), rx)
}

/// The request as it leaves for the upstream (after the filters ran on its headers).
pub struct Outgoing<'a> {
    pub cluster: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a Fields,
    /// The route's `timeout`, overriding the cluster's.
    pub timeout: Option<Duration>,
}

/// Sends the request to its cluster and returns the response (its body streams). Endpoints
/// are tried in order while they refuse connections, as long as there is no body to replay.
pub async fn send(
    state: &Arc<State>,
    active: &Arc<Active>,
    out: &Outgoing<'_>,
    body: Option<Body>,
) -> Result<Response<Body>, ProxyError> {
    let cluster = out.cluster;
    let entry = active.clusters.get(cluster).ok_or(ProxyError::NoRoute)?;
    if active.is_builtin_echo(cluster) {
        return Ok(echo(out, body).await);
    }
    let protocol = |message: String| ProxyError::UpstreamProtocol {
        cluster: cluster.into(),
        message,
    };
    let open = |breaker: Breaker| {
        state.metrics.circuit_open(cluster, breaker.label());
        ProxyError::CircuitOpen {
            cluster: cluster.into(),
            breaker: breaker.label(),
        }
    };
    let pool = state.clients.pool(cluster, &entry.config.circuit_breakers);
    // Held until the response body ends (or is dropped).
    let request_slot = pool
        .breakers
        .take(Breaker::Requests)
        .ok_or_else(|| open(Breaker::Requests))?;
    // Held until the response head arrives.
    let pending_slot = pool
        .breakers
        .take(Breaker::PendingRequests)
        .ok_or_else(|| open(Breaker::PendingRequests))?;
    let timeout = out.timeout.unwrap_or(entry.config.timeout);
    let mut body = body;
    let mut last_error = String::new();
    for endpoint in &entry.config.endpoints {
        let uri: Uri = format!("http://{endpoint}{}", out.path)
            .parse()
            .map_err(|e: http::uri::InvalidUri| protocol(e.to_string()))?;
        let mut req = Request::builder().method(out.method).uri(uri);
        let hm = req.headers_mut().expect("builder is fresh");
        *hm = crate::fields::to_header_map(out.headers);
        if let Ok(host) = HeaderValue::from_str(out.authority) {
            hm.insert(http::header::HOST, host);
        }
        hm.append(
            http::header::VIA,
            HeaderValue::from_static("1.1 wasmfilter"),
        );
        let streamed = body.is_some();
        let (req_body, sent) = signal_end(body.take().unwrap_or_else(|| full(Bytes::new())));
        let req = req.body(req_body).map_err(|e| protocol(e.to_string()))?;
        let answer = pool.client(entry.config.http2).request(req);
        // The request timeout runs from the moment the request has been sent whole.
        let expired = async {
            let _ = sent.await;
            tokio::time::sleep(timeout).await;
        };
        let answered = tokio::select! {
            answered = answer => answered,
            _ = expired => {
                state.metrics.upstream_error(cluster, "timeout");
                return Err(ProxyError::UpstreamTimeout {
                    cluster: cluster.into(),
                });
            }
        };
        match answered {
            Ok(resp) => {
                drop(pending_slot);
                let idle = state.timeouts.upstream_idle;
                return Ok(resp.map(|b| {
                    let body = b.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
                    Guarded::wrap(IdleTimeout::wrap(body, idle), request_slot)
                }));
            }
            Err(e) if connections_full(&e) => return Err(open(Breaker::Connections)),
            Err(e) if e.is_connect() => {
                last_error = format!("{endpoint}: {e}");
                if streamed {
                    break;
                }
            }
            Err(e) => {
                state.metrics.upstream_error(cluster, "protocol");
                return Err(protocol(e.to_string()));
            }
        }
    }
    state.metrics.upstream_error(cluster, "connect");
    Err(ProxyError::UpstreamConnect {
        cluster: cluster.into(),
        message: last_error,
    })
}

/// The built-in `echo` upstream: answers 200 with the request it received as JSON, so a
/// standalone dataplane shows its filters at work without any other server. Request trailers
/// come back as response trailers.
async fn echo(out: &Outgoing<'_>, body: Option<Body>) -> Response<Body> {
    let (bytes, trailers) = match body {
        None => (Bytes::new(), None),
        Some(b) => match b.collect().await {
            Ok(c) => {
                let t = c.trailers().cloned();
                (c.to_bytes(), t)
            }
            Err(e) => (Bytes::from(format!("<body failed: {e}>")), None),
        },
    };
    let header_map: serde_json::Map<String, serde_json::Value> = out
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(':'))
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    let json = serde_json::json!({
        "method": out.method,
        "path": out.path,
        "headers": header_map,
        "body": String::from_utf8_lossy(&bytes),
        "trailers": trailers.iter().flat_map(|t| t.iter()).map(|(k, v)| {
            (k.to_string(), serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
        }).collect::<serde_json::Map<_, _>>(),
    });
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
    text.push('\n');
    // HTTP/1.1 peers only accept trailer fields announced in a `Trailer` header.
    let announced = trailers
        .iter()
        .flat_map(|t| t.keys())
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let body = match trailers {
        None => full(text),
        Some(t) => full(text)
            .with_trailers(async move { Some(Ok(t)) })
            .boxed_unsync(),
    };
    let mut resp = Response::new(body);
    if !announced.is_empty()
        && let Ok(v) = HeaderValue::from_str(&announced)
    {
        resp.headers_mut().insert(http::header::TRAILER, v);
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("server", HeaderValue::from_static("wasmfilter-echo"));
    resp
}

/// Carries out a filter's HTTP callout; `None` when it failed (the filter sees zero headers).
pub async fn callout(
    state: &Arc<State>,
    active: &Arc<Active>,
    call: &HttpCallout,
) -> Option<HttpCallResponse> {
    let entry = active.clusters.get(&call.cluster)?;
    let endpoint = entry.config.endpoints.first()?;
    let path = call.headers.get_str(":path").unwrap_or_else(|| "/".into());
    let method = call
        .headers
        .get_str(":method")
        .unwrap_or_else(|| "GET".into());
    let uri: Uri = format!("http://{endpoint}{path}").parse().ok()?;
    let mut req = Request::builder().method(method.as_str()).uri(uri);
    let hm = req.headers_mut()?;
    *hm = crate::fields::to_header_map(&call.headers);
    if let Some(Ok(host)) = call.headers.get(":authority").map(HeaderValue::from_bytes) {
        hm.insert(http::header::HOST, host);
    }
    let req = req.body(full(call.body.clone())).ok()?;
    let pool = state
        .clients
        .pool(&call.cluster, &entry.config.circuit_breakers);
    let client = pool.client(entry.config.http2);
    let timeout = timeout_or(entry.config.timeout, call.timeout);
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(r)) => r,
        _ => {
            state.metrics.upstream_error(&call.cluster, "callout");
            return None;
        }
    };
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(timeout, body.collect())
        .await
        .ok()?
        .ok()?;
    let trailers = collected.trailers().cloned();
    let bytes: Bytes = collected.to_bytes();
    Some(crate::fields::callout_response(
        Response::from_parts(parts, bytes),
        trailers,
    ))
}

/// The whole answer to a unary gRPC callout, delivered to the filter in order: initial
/// metadata, each message, trailing metadata, then the close with its status.
#[derive(Debug, Default)]
pub struct GrpcOutcome {
    pub initial_metadata: Option<Fields>,
    pub messages: Vec<Vec<u8>>,
    pub trailing_metadata: Option<Fields>,
    pub status: u32,
    pub message: String,
}

impl GrpcOutcome {
    fn failed(status: u32, message: impl Into<String>) -> GrpcOutcome {
        GrpcOutcome {
            status,
            message: message.into(),
            ..Default::default()
        }
    }
}

/// gRPC status codes used for transport failures.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;

/// Carries out a unary gRPC callout over HTTP/2: `POST /<service>/<method>` with the message
/// length-prefixed, as gRPC frames it.
pub async fn grpc_call(
    state: &Arc<State>,
    active: &Arc<Active>,
    call: &wasmfilter_host::GrpcCallout,
) -> GrpcOutcome {
    let Some(entry) = active.clusters.get(&call.cluster) else {
        return GrpcOutcome::failed(
            GRPC_UNAVAILABLE,
            format!("no cluster named {}", call.cluster),
        );
    };
    let Some(endpoint) = entry.config.endpoints.first() else {
        return GrpcOutcome::failed(
            GRPC_UNAVAILABLE,
            format!("cluster {} has no endpoints", call.cluster),
        );
    };
    let message = call.message.clone().unwrap_or_default();
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let uri = format!("http://{endpoint}/{}/{}", call.service, call.method);
    let Ok(mut req) = Request::builder()
        .method("POST")
        .uri(uri)
        .body(full(framed))
    else {
        return GrpcOutcome::failed(GRPC_INTERNAL, "invalid service or method name");
    };
    let headers = req.headers_mut();
    *headers = crate::fields::to_header_map(&call.initial_metadata);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let timeout = timeout_or(entry.config.timeout, call.timeout);
    let pool = state
        .clients
        .pool(&call.cluster, &entry.config.circuit_breakers);
    let result = tokio::time::timeout(timeout, async {
        let resp = pool
            .client(true)
            .request(req)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((parts, collected))
    })
    .await;
    let (parts, collected) = match result {
        Err(_) => return GrpcOutcome::failed(GRPC_DEADLINE_EXCEEDED, "deadline exceeded"),
        Ok(Err(e)) => {
            state.metrics.upstream_error(&call.cluster, "grpc");
            return GrpcOutcome::failed(GRPC_UNAVAILABLE, e);
        }
        Ok(Ok(v)) => v,
    };
    let mut initial = Fields::new();
    crate::fields::fields_from(&parts.headers, &mut initial);
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let mut messages = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < 5 + len {
            return GrpcOutcome::failed(GRPC_INTERNAL, "truncated gRPC message");
        }
        messages.push(rest[5..5 + len].to_vec());
        rest = &rest[5 + len..];
    }
    // A trailers-only answer carries its status in the headers.
    let status_source = trailers.as_ref().unwrap_or(&parts.headers);
    let status = status_source
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(if parts.status.is_success() {
            GRPC_INTERNAL
        } else {
            GRPC_UNAVAILABLE
        });
    let message = status_source
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let trailing = trailers.map(|t| {
        let mut f = Fields::new();
        crate::fields::fields_from(&t, &mut f);
        f
    });
    GrpcOutcome {
        initial_metadata: Some(initial),
        messages,
        trailing_metadata: trailing,
        status,
        message,
    }
}

pub(crate) fn timeout_or(
    cluster_timeout: std::time::Duration,
    call_timeout: Option<std::time::Duration>,
) -> std::time::Duration {
    call_timeout.unwrap_or(cluster_timeout)
}
