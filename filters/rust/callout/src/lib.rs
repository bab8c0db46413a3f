//! `callout`: authorizes each request with an HTTP or gRPC callout made from the HTTP context.
//!
//! Contract (the host tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"cluster": "auth", "path": "/check", "timeout_ms": 1000, "grpc_cluster": "",
//!     "grpc_service": "test.Echo", "grpc_method": "Check"}` (the defaults).
//!   Invalid JSON: logs an error and `on_configure` returns false.
//! * HTTP mode (`grpc_cluster` empty). Request headers: `proxy_http_call(cluster, headers, no body,
//!   no trailers, timeout_ms)` with headers, in this order, `:method: GET`, `:path: <path>`,
//!   `:authority: <cluster>`, `x-original-path: <request :path, "" if missing>`, and
//!   `authorization: <value>` only if the request has one. Returns Pause.
//!   If the dispatch fails (BAD_ARGUMENT/INTERNAL_FAILURE): logs warn `callout: dispatch failed:
//!   <status>` and sends local reply 500 with header `x-callout-error: dispatch`, no body; Pause.
//! * `on_http_call_response(token, num_headers, body_size, num_trailers)`:
//!   - `num_headers == 0` (callout failed): local reply 503, `x-callout-error: failed`,
//!     body `callout failed\n`;
//!   - callout `:status` is `200`: adds request headers `x-auth-user: <callout header x-user, or
//!     else the callout body as UTF-8 (lossy) with surrounding whitespace trimmed (`str::trim`), "" if
//!     no body>` and `x-callout-body-bytes: <body_size>`, then resumes the request;
//!   - any other `:status` (or none): local reply 403, `x-callout-status: <status, "<none>" if
//!     missing>`, body `forbidden by callout\n`.
//! * gRPC mode (`grpc_cluster` non-empty). Request headers: `proxy_grpc_call(grpc_cluster,
//!   grpc_service, grpc_method, metadata [("x-md", "1")], message = request :path bytes,
//!   timeout_ms)`. Returns Pause. If the dispatch fails (PARSE_FAILURE/INTERNAL_FAILURE): the
//!   same warn log and 500 `x-callout-error: dispatch`.
//! * `on_grpc_call_response(token, status_code, response_size)` (the SDK calls it with status 0
//!   from `proxy_on_grpc_receive`, and with the close status and size 0 from `proxy_on_grpc_close`
//!   when no message came first): adds request headers `x-grpc-status: <status_code>` and
//!   `x-grpc-response: <response body as UTF-8 (lossy), "" when response_size is 0>`, then resumes.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(CalloutRoot::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    cluster: String,
    path: String,
    timeout_ms: u64,
    grpc_cluster: String,
    grpc_service: String,
    grpc_method: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: "auth".into(),
            path: "/check".into(),
            timeout_ms: 1000,
            grpc_cluster: String::new(),
            grpc_service: "test.Echo".into(),
            grpc_method: "Check".into(),
        }
    }
}

#[derive(Default)]
struct CalloutRoot {
    config: Rc<Config>,
}

impl Context for CalloutRoot {}

impl RootContext for CalloutRoot {
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
                let message = format!("callout: invalid plugin configuration: {err}");
                let _ = hostcalls::log(LogLevel::Error, &message);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Callout {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Callout {
    config: Rc<Config>,
}

impl Callout {
    fn dispatch(&self) -> Result<u32, proxy_wasm::types::Status> {
        let config = &self.config;
        let timeout = Duration::from_millis(config.timeout_ms);
        let request_path = self.get_http_request_header(":path").unwrap_or_default();
        if config.grpc_cluster.is_empty() {
            let authorization = self.get_http_request_header("authorization");
            let mut headers = vec![
                (":method", "GET"),
                (":path", config.path.as_str()),
                (":authority", config.cluster.as_str()),
                ("x-original-path", request_path.as_str()),
            ];
            if let Some(authorization) = &authorization {
                headers.push(("authorization", authorization));
            }
            self.dispatch_http_call(&config.cluster, headers, None, vec![], timeout)
        } else {
            self.dispatch_grpc_call(
                &config.grpc_cluster,
                &config.grpc_service,
                &config.grpc_method,
                vec![("x-md", b"1")],
                Some(request_path.as_bytes()),
                timeout,
            )
        }
    }
}

impl Context for Callout {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if num_headers == 0 {
            self.send_http_response(
                503,
                vec![("x-callout-error", "failed")],
                Some(b"callout failed\n"),
            );
            return;
        }
        let status = self.get_http_call_response_header(":status");
        if status.as_deref() != Some("200") {
            self.send_http_response(
                403,
                vec![("x-callout-status", status.as_deref().unwrap_or("<none>"))],
                Some(b"forbidden by callout\n"),
            );
            return;
        }
        let user = match self.get_http_call_response_header("x-user") {
            Some(user) => user,
            None => self
                .get_http_call_response_body(0, body_size)
                .map(|body| String::from_utf8_lossy(&body).trim().to_string())
                .unwrap_or_default(),
        };
        self.add_http_request_header("x-auth-user", &user);
        self.add_http_request_header("x-callout-body-bytes", &body_size.to_string());
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        let response = if response_size == 0 {
            String::new()
        } else {
            self.get_grpc_call_response_body(0, response_size)
                .map(|body| String::from_utf8_lossy(&body).into_owned())
                .unwrap_or_default()
        };
        self.add_http_request_header("x-grpc-status", &status_code.to_string());
        self.add_http_request_header("x-grpc-response", &response);
        self.resume_http_request();
    }
}

impl HttpContext for Callout {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Err(status) = self.dispatch() {
            let message = format!("callout: dispatch failed: {status:?}");
            let _ = hostcalls::log(LogLevel::Warn, &message);
            self.send_http_response(500, vec![("x-callout-error", "dispatch")], None);
        }
        Action::Pause
    }
}
