//! Why a request did not get the upstream's answer, and the one place such errors become
//! responses ([`ProxyError::into_response`]).

use http::{HeaderValue, Response, StatusCode};

use crate::body::{Body, full};

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
