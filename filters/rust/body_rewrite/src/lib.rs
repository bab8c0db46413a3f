//! `body_rewrite`: buffers whole request and response bodies and replaces `from` with `to`.
//!
//! Contract (the host tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"from": "hello", "to": "HELLO"}` (the defaults). Invalid JSON: logs an error and
//!   `on_configure` returns false. An empty `from` disables the replacement.
//! * Request headers: removes `content-length`. Continue.
//! * Request body: returns Pause while `end_of_stream` is false (the host buffers, so the next
//!   call sees the cumulative body). At `end_of_stream` with `body_size > 0`, reads the body
//!   with `get_buffer_bytes(HttpRequestBody, 0, body_size)`; if the host returns it, replaces
//!   every non-overlapping occurrence of `from` (bytewise, left to right) with `to` and writes
//!   the result with `set_buffer_bytes(HttpRequestBody, 0, body_size, new)`, even when nothing
//!   matched. Continue.
//! * Request trailers: adds `x-filter-trailer: seen`. Continue.
//! * Response headers: removes `content-length`. Continue.
//! * Response body: the same on HttpResponseBody; every call also records `body_size` (the
//!   buffered size before rewriting).
//! * Response trailers: adds `x-response-body-bytes: <last body_size passed to the response
//!   body callback>` (0 if it was never called). Continue.
//! * A stream with trailers never gets `end_of_stream = true` in its body callback, so its
//!   body is not rewritten.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(BodyRewriteRoot::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    from: String,
    to: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            from: "hello".into(),
            to: "HELLO".into(),
        }
    }
}

impl Config {
    /// Replaces every non-overlapping occurrence of `from` in `body`, left to right.
    fn rewrite(&self, body: &[u8]) -> Vec<u8> {
        let from = self.from.as_bytes();
        if from.is_empty() {
            return body.to_vec();
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest = body;
        while !rest.is_empty() {
            if rest.starts_with(from) {
                out.extend_from_slice(self.to.as_bytes());
                rest = &rest[from.len()..];
            } else {
                out.push(rest[0]);
                rest = &rest[1..];
            }
        }
        out
    }
}

#[derive(Default)]
struct BodyRewriteRoot {
    config: Rc<Config>,
}

impl Context for BodyRewriteRoot {}

impl RootContext for BodyRewriteRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.iter().all(u8::is_ascii_whitespace) {
            self.config = Rc::default();
            return true;
        }
        match serde_json::from_slice::<Config>(&raw) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                let message = format!("body_rewrite: invalid plugin configuration: {err}");
                let _ = hostcalls::log(LogLevel::Error, &message);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BodyRewrite {
            config: Rc::clone(&self.config),
            response_body_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct BodyRewrite {
    config: Rc<Config>,
    response_body_bytes: usize,
}

impl Context for BodyRewrite {}

impl HttpContext for BodyRewrite {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header("content-length", None);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if body_size == 0 {
            return Action::Continue;
        }
        if let Some(body) = self.get_http_request_body(0, body_size) {
            let new_body = self.config.rewrite(&body);
            self.set_http_request_body(0, body_size, &new_body);
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.add_http_request_trailer("x-filter-trailer", "seen");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("content-length", None);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.response_body_bytes = body_size;
        if !end_of_stream {
            return Action::Pause;
        }
        if body_size == 0 {
            return Action::Continue;
        }
        if let Some(body) = self.get_http_response_body(0, body_size) {
            let new_body = self.config.rewrite(&body);
            self.set_http_response_body(0, body_size, &new_body);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let bytes = self.response_body_bytes.to_string();
        self.add_http_response_trailer("x-response-body-bytes", &bytes);
        Action::Continue
    }
}
