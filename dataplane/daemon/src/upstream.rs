//! Upstream calls: forwarding a request to a cluster, and filter callouts to clusters.
//! Connections are pooled per protocol; the first endpoint of a cluster that answers is used.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wasmfilter_host::{Fields, HttpCallResponse, HttpCallout};

use crate::chain::Active;
use crate::proxy::{Body, ProxyError, full};
use crate::state::State;

pub struct Clients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl Default for Clients {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Clients {
            http1: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }
}

/// Sends the request to `cluster` and returns its response (the body streams). Endpoints are
/// tried in order while they refuse connections, unless the request body is being streamed.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    state: &Arc<State>,
    active: &Arc<Active>,
    cluster: &str,
    method: &str,
    authority: &str,
    path: &str,
    headers: &Fields,
    body: Vec<u8>,
    mut streamed: Option<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let entry = active.clusters.get(cluster).ok_or(ProxyError::NoRoute)?;
    if active.is_builtin_echo(cluster) {
        return Ok(echo(method, path, headers, body));
    }
    let protocol = |message: String| ProxyError::UpstreamProtocol {
        cluster: cluster.into(),
        message,
    };
    let mut last_error = String::new();
    for endpoint in &entry.config.endpoints {
        let uri: Uri = format!("http://{endpoint}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| protocol(e.to_string()))?;
        let mut req = Request::builder().method(method).uri(uri);
        let hm = req.headers_mut().expect("builder is fresh");
        for (k, v) in headers.iter() {
            if k.starts_with(':') {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                hm.append(name, value);
            }
        }
        if let Ok(host) = HeaderValue::from_str(authority) {
            hm.insert(http::header::HOST, host);
        }
        hm.append(
            http::header::VIA,
            HeaderValue::from_static("1.1 wasmfilter"),
        );
        let was_streamed = streamed.is_some();
        let req_body: Body = match streamed.take() {
            Some(incoming) => incoming.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
            None => full(body.clone()),
        };
        let req = req.body(req_body).map_err(|e| protocol(e.to_string()))?;
        let client = if entry.config.http2 {
            &state.clients.http2
        } else {
            &state.clients.http1
        };
        match tokio::time::timeout(entry.config.timeout, client.request(req)).await {
            Err(_) => {
                state.metrics.upstream_error(cluster, "timeout");
                return Err(ProxyError::UpstreamTimeout {
                    cluster: cluster.into(),
                });
            }
            Ok(Ok(resp)) => {
                return Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()));
            }
            Ok(Err(e)) if e.is_connect() => {
                last_error = format!("{endpoint}: {e}");
                if was_streamed {
                    break;
                }
            }
            Ok(Err(e)) => {
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The built-in `echo` upstream: answers 200 with the request it received as JSON, so a
/// standalone dataplane shows its filters at work without any other server.
fn echo(method: &str, path: &str, headers: &Fields, body: Vec<u8>) -> Response<Body> {
    let header_map: serde_json::Map<String, serde_json::Value> = headers
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
        "method": method,
        "path": path,
        "headers": header_map,
        "body": String::from_utf8_lossy(&body),
    });
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
    text.push('\n');
    let mut resp = Response::new(full(text));
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
    for (k, v) in call.headers.iter() {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            hm.append(name, value);
        }
    }
    if let Some(Ok(host)) = call.headers.get(":authority").map(HeaderValue::from_bytes) {
        hm.insert(http::header::HOST, host);
    }
    let req = req.body(full(call.body.clone())).ok()?;
    let client = if entry.config.http2 {
        &state.clients.http2
    } else {
        &state.clients.http1
    };
    let timeout = crate::proxy::timeout_or(entry.config.timeout, call.timeout);
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
    Some(crate::proxy::callout_response(
        Response::from_parts(parts, bytes),
        trailers,
    ))
}
