//! Header conversions between hyper's maps and the host's [`Fields`] (what filters see).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use wasmfilter_host::{Fields, HttpCallResponse};

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1).
/// `Trailer` is forwarded: HTTP/1.1 peers only accept trailer fields it announces.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn fields_from(headers: &HeaderMap, fields: &mut Fields) {
    to_fields(headers, fields)
}

pub(crate) fn to_fields(headers: &HeaderMap, fields: &mut Fields) {
    for (k, v) in headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            fields.add(k.as_str(), v.as_bytes());
        }
    }
}

/// The forwardable fields as an HTTP header map: pseudo-headers and hop-by-hop headers are
/// dropped, as are names or values HTTP cannot carry.
pub(crate) fn to_header_map(fields: &Fields) -> HeaderMap {
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

pub(crate) fn add_via(headers: &mut HeaderMap) {
    headers.append(
        http::header::VIA,
        HeaderValue::from_static("1.1 wasmfilter"),
    );
}
