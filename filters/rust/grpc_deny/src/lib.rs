//! `grpc_deny`: refuses every request with a gRPC status, as an Envoy gRPC filter would.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"message": "quota exceeded: 100% used"}` (the default). Invalid JSON: logs an error and
//!   `on_configure` returns false.
//! * Request headers: `send_grpc_response(Aborted (10), Some(message),
//!   [("x-denied-by", "grpc_deny")])` (the SDK sends HTTP status 200, the message as the body
//!   and the gRPC status), returns Pause.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(DenyRoot::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    message: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            message: "quota exceeded: 100% used".into(),
        }
    }
}

#[derive(Default)]
struct DenyRoot {
    config: Rc<Config>,
}

impl Context for DenyRoot {}

impl RootContext for DenyRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice(&bytes) {
                Ok(c) => self.config = Rc::new(c),
                Err(e) => {
                    let _ = hostcalls::log(
                        LogLevel::Error,
                        &format!("grpc_deny: invalid plugin configuration: {e}"),
                    );
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(DenyStream {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct DenyStream {
    config: Rc<Config>,
}

impl Context for DenyStream {}

impl HttpContext for DenyStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.send_grpc_response(
            GrpcStatusCode::Aborted,
            Some(&self.config.message),
            vec![("x-denied-by", b"grpc_deny".as_slice())],
        );
        Action::Pause
    }
}
