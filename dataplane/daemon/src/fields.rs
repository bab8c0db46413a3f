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

/// Most fields one HTTP header map may hold here. `http::HeaderMap` panics past 32,768
/// entries (in `with_capacity` and `append`); the host's per-map quotas keep what filters
/// write far below this, and whatever is past it is dropped, never a panic.
pub(crate) const MAX_HEADER_MAP_FIELDS: usize = 16_384;

/// The forwardable fields as an HTTP header map: pseudo-headers and hop-by-hop headers are
/// dropped, as are names or values HTTP cannot carry and fields past
/// [`MAX_HEADER_MAP_FIELDS`]. Never panics, whatever the fields hold.
pub(crate) fn to_header_map(fields: &Fields) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(fields.len().min(MAX_HEADER_MAP_FIELDS));
    for (k, v) in fields.iter() {
        if map.len() >= MAX_HEADER_MAP_FIELDS {
            break;
        }
        if k.starts_with(':') || HOP_BY_HOP.contains(&k) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) && map.try_append(name, value).is_err()
        {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hundred_thousand_fields_make_a_bounded_map_without_panicking() {
        let mut fields = Fields::new();
        for i in 0..100_000 {
            fields.add(&format!("x-h{i}"), "v");
        }
        fields.add("x-bad", "a\r\nb");
        fields.add("bad name", "v");
        let map = to_header_map(&fields);
        assert_eq!(map.len(), MAX_HEADER_MAP_FIELDS);
        let mut same = Fields::new();
        for _ in 0..100_000 {
            same.add("x-same", "v");
        }
        assert_eq!(to_header_map(&same).len(), MAX_HEADER_MAP_FIELDS);
    }

    #[test]
    fn fields_http_cannot_carry_are_dropped() {
        let fields = Fields::from_pairs([
            (":path", "/"),
            ("connection", "close"),
            ("x-bad", "a\nb"),
            ("x-ok", "1"),
        ]);
        let map = to_header_map(&fields);
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-ok"], "1");
    }
}
