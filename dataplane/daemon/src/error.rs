//! Why a request did not get the upstream's answer, and the one place such errors become
//! responses ([`ProxyError::into_response`]).

use http::{HeaderValue, Response, StatusCode};

use crate::body::{Body, full};

/// The methods the proxy names in `Allow` (answering `OPTIONS *`, refusing `CONNECT`).
pub(crate) const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

/// Why a request did not get the upstream's answer. Each becomes a short response here.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    BodyTooLarge,
    BadRequestBody(String),
    UpstreamConnect {
        cluster: String,
        message: String,
    },
    /// One of the cluster's circuit breakers is at its limit (503 at once).
    CircuitOpen {
        cluster: String,
        breaker: &'static str,
    },
    UpstreamTimeout {
        cluster: String,
    },
    UpstreamProtocol {
        cluster: String,
        message: String,
    },
    FilterFailed {
        filter: String,
        message: String,
    },
    /// A filter paused the stream and nothing resumed it within the route's stream timeout.
    StreamTimeout {
        filter: String,
        timeout: std::time::Duration,
    },
    Reset {
        filter: String,
    },
    // The client's request head, refused before any filter or route sees it (the client is
    // at fault; docs/operations.md, "Request normalisation and scope matching").
    /// The path cannot be normalised safely (400).
    InvalidPath {
        reason: String,
    },
    /// `Host`/`:authority` missing, repeated, malformed or disagreeing (400).
    InvalidHost {
        reason: String,
    },
    /// A request target that is neither origin-form, absolute-form, `*` for OPTIONS nor
    /// authority-form for CONNECT (400).
    InvalidTarget {
        reason: String,
    },
    /// `Transfer-Encoding` with a coding other than `chunked` (501, as RFC 9112 §6.1 says).
    UnsupportedTransferCoding {
        coding: String,
    },
    /// `CONNECT`: the proxy opens no tunnels, which no HTTP filter could see into (405).
    ConnectNotAllowed,
    /// With `pathWithEscapedSlashesAction: UnescapeAndRedirect`: come back at `location` (307).
    EscapedSlashRedirect {
        location: String,
    },
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
            ProxyError::CircuitOpen { cluster, breaker } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream {cluster} is over its {breaker} circuit breaker"),
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
            ProxyError::StreamTimeout { filter, timeout } => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "filter {filter} paused the stream and nothing resumed it within {timeout:?}"
                ),
            ),
            ProxyError::InvalidPath { reason } => (
                StatusCode::BAD_REQUEST,
                format!("client error: invalid path: {reason}"),
            ),
            ProxyError::InvalidHost { reason } => {
                (StatusCode::BAD_REQUEST, format!("client error: {reason}"))
            }
            ProxyError::InvalidTarget { reason } => (
                StatusCode::BAD_REQUEST,
                format!("client error: invalid request target: {reason}"),
            ),
            ProxyError::UnsupportedTransferCoding { coding } => (
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "client error: transfer coding {coding:?} is not supported; only chunked is"
                ),
            ),
            ProxyError::ConnectNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "client error: CONNECT is not allowed: this proxy opens no tunnels".into(),
            ),
            ProxyError::EscapedSlashRedirect { .. } => (
                StatusCode::TEMPORARY_REDIRECT,
                "the path had encoded slashes; use the unescaped path in Location".into(),
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
        if let ProxyError::EscapedSlashRedirect { location } = &self
            && let Ok(v) = HeaderValue::from_str(location)
        {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
        if let ProxyError::ConnectNotAllowed = &self {
            resp.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static(ALLOWED_METHODS),
            );
        }
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
