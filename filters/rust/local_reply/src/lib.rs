//! `local_reply`: answers matching requests locally, and resets the stream on demand.
//!
//! Contract (the host tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"path_prefix": "/deny", "status": 403, "body": "denied\n",
//!     "headers": {"x-denied-by": "local_reply"}, "grpc": false}` (the defaults).
//!   Invalid JSON: logs an error and `on_configure` returns false.
//! * Request headers, checked in this order:
//!   1. request header `x-close` present (any value) → `proxy_close_stream(HttpRequest)`
//!      (`reset_http_request`), returns Pause;
//!   2. `:path` (missing = "") starts with `path_prefix` (plain byte prefix, so "/denyx" matches
//!      "/deny") → with `grpc: false` `send_http_response(status, headers, Some(body))`; with
//!      `grpc: true` `send_grpc_response(PermissionDenied (7), Some("denied"), [])`, which the SDK
//!      sends as HTTP 200 with grpc_status 7 and ignores `status`/`body`/`headers`. Returns Pause;
//!   3. otherwise Continue.
//! * Response headers (every response, including the local reply): adds
//!   `x-local-reply-seen: <:status of the response>` (`<none>` if `:status` is missing). Continue.

use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(LocalReplyRoot::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    path_prefix: String,
    status: u32,
    body: String,
    headers: BTreeMap<String, String>,
    grpc: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path_prefix: "/deny".into(),
            status: 403,
            body: "denied\n".into(),
            headers: BTreeMap::from([("x-denied-by".into(), "local_reply".into())]),
            grpc: false,
        }
    }
}

#[derive(Default)]
struct LocalReplyRoot {
    config: Rc<Config>,
}

impl Context for LocalReplyRoot {}

impl RootContext for LocalReplyRoot {
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
                let message = format!("local_reply: invalid plugin configuration: {err}");
                let _ = hostcalls::log(LogLevel::Error, &message);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(LocalReply {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct LocalReply {
    config: Rc<Config>,
}

impl Context for LocalReply {}

impl HttpContext for LocalReply {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.get_http_request_header("x-close").is_some() {
            self.reset_http_request();
            return Action::Pause;
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if !path.starts_with(&self.config.path_prefix) {
            return Action::Continue;
        }
        if self.config.grpc {
            self.send_grpc_response(GrpcStatusCode::PermissionDenied, Some("denied"), vec![]);
        } else {
            let headers = self
                .config
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            self.send_http_response(
                self.config.status,
                headers,
                Some(self.config.body.as_bytes()),
            );
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let status = self.get_http_response_header(":status");
        self.add_http_response_header("x-local-reply-seen", status.as_deref().unwrap_or("<none>"));
        Action::Continue
    }
}
