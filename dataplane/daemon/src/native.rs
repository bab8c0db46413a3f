//! Native filters: Rust implementations run at the same point of the request path as the Wasm
//! filters (request headers in chain order, response headers in reverse order), so a benchmark
//! can tell the cost of the Wasm boundary from the cost of the filter's work (benchmark S3,
//! goal G4 of the performance notes). They are chosen by name in the configuration:
//!
//! ```yaml
//! filters:
//!   - name: hello
//!     native: header_rewrite
//!     config: {"response": {"add": {"x-bench": "1"}}}
//! ```
//!
//! A native filter only sees headers: it has no body, trailer, callout or timer phases, never
//! fails, and always continues. Its invocations are counted in the same filter metrics as a
//! Wasm filter's.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use wasmfilter_host::Fields;

/// A filter compiled into the dataplane. Shared by every worker, so it is `Send + Sync`;
/// the header phases take `&self` (per-request state would live in the request, not here).
pub trait NativeFilter: Send + Sync {
    /// The request headers (pseudo-headers included) before routing, in chain order.
    fn on_request_headers(&self, headers: &mut Fields);
    /// The response headers (`:status` included), in reverse chain order.
    fn on_response_headers(&self, headers: &mut Fields);
}

/// The names `native:` accepts.
pub const NAMES: &[&str] = &["header_rewrite"];

/// Builds the native filter `name` with its configuration bytes (the same bytes a Wasm
/// filter's `proxy_on_configure` would read). Unknown names list the known ones.
pub fn build(name: &str, config: &[u8]) -> Result<Arc<dyn NativeFilter>, String> {
    match name {
        "header_rewrite" => Ok(Arc::new(HeaderRewrite::from_config(config)?)),
        other => Err(unknown(other)),
    }
}

/// The error for a name that is not in [`NAMES`].
pub fn unknown(name: &str) -> String {
    format!(
        "unknown native filter {name:?}; known native filters: {}",
        NAMES.join(", ")
    )
}

/// The native twin of `filters/rust/header_rewrite`, with the same contract for a plugin
/// configuration (`{"request": {"add", "set", "remove"}, "response": {...}}`, applied in that
/// order and in key order; empty means no rules; invalid JSON is refused) and the same
/// `x-wasmfilter: header_rewrite` response header. It has no VM configuration, so it never
/// sets `x-vm-config`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HeaderRewrite {
    request: Rules,
    response: Rules,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Rules {
    add: BTreeMap<String, String>,
    set: BTreeMap<String, String>,
    remove: Vec<String>,
}

impl Rules {
    fn apply(&self, headers: &mut Fields) {
        for (name, value) in &self.add {
            headers.add(name, value.as_bytes());
        }
        for (name, value) in &self.set {
            headers.set(name, value.as_bytes());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

impl HeaderRewrite {
    pub fn from_config(config: &[u8]) -> Result<HeaderRewrite, String> {
        if config.iter().all(u8::is_ascii_whitespace) {
            return Ok(HeaderRewrite::default());
        }
        serde_json::from_slice(config)
            .map_err(|e| format!("header_rewrite: invalid plugin configuration: {e}"))
    }
}

impl NativeFilter for HeaderRewrite {
    fn on_request_headers(&self, headers: &mut Fields) {
        self.request.apply(headers);
    }

    fn on_response_headers(&self, headers: &mut Fields) {
        self.response.apply(headers);
        headers.add("x-wasmfilter", "header_rewrite");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rewrite_follows_the_wasm_filters_contract() {
        let f = build(
            "header_rewrite",
            br#"{"request": {"add": {"x-a": "1"}, "set": {"x-b": "2"}, "remove": ["x-c"]},
                 "response": {"add": {"x-bench": "1"}}}"#,
        )
        .unwrap();
        let mut req = Fields::from_pairs([("x-b", "old"), ("x-c", "gone"), ("x-b", "dup")]);
        f.on_request_headers(&mut req);
        assert_eq!(req.get_str("x-a").as_deref(), Some("1"));
        assert_eq!(req.get_joined("x-b").as_deref(), Some(&b"2"[..]));
        assert!(req.get("x-c").is_none());
        let mut resp = Fields::from_pairs([(":status", "200")]);
        f.on_response_headers(&mut resp);
        assert_eq!(resp.get_str("x-bench").as_deref(), Some("1"));
        assert_eq!(
            resp.get_str("x-wasmfilter").as_deref(),
            Some("header_rewrite")
        );
    }

    #[test]
    fn empty_config_means_no_rules_and_bad_json_is_refused() {
        let f = build("header_rewrite", b"  ").unwrap();
        let mut req = Fields::from_pairs([("x-a", "1")]);
        f.on_request_headers(&mut req);
        assert_eq!(req.len(), 1);
        let err = build("header_rewrite", b"{not json").err().unwrap();
        assert!(err.contains("invalid plugin configuration"), "{err}");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = build("nope", b"").err().unwrap();
        assert!(err.contains("\"nope\""), "{err}");
        assert!(err.contains("header_rewrite"), "{err}");
    }
}
