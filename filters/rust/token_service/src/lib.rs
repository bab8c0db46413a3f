//! `token_service`: a service plugin (no listener, no stream). Fetches a token on every tick
//! and shares it with HTTP filters through shared data.
//!
//! Contract (dataplane/daemon/tests/network.rs asserts exactly this):
//!
//! * Plugin configuration (JSON, every field optional):
//!   `{"cluster": "tokens", "path": "/token", "tick_ms": 100}` (the defaults).
//! * Root `on_configure`: sets the tick period to `tick_ms`.
//! * Root `on_tick`: `proxy_http_call(cluster, [:method GET, :path <path>, :authority
//!   <cluster>], no body, 2000 ms)`; a dispatch error logs warn `token_service: dispatch
//!   failed: <status>`.
//! * Root `on_http_call_response`: a 200 answer's body (trimmed) is stored as shared data
//!   `token` (no CAS) and counter `token_service_fetches_total` +1; any other status logs warn
//!   `token_service: fetch answered <status>`.
//! * It creates no stream contexts.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Service::default()) });
}}

#[derive(Deserialize)]
#[serde(default)]
struct Settings {
    cluster: String,
    path: String,
    tick_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster: "tokens".into(),
            path: "/token".into(),
            tick_ms: 100,
        }
    }
}

#[derive(Default)]
struct Service {
    settings: Settings,
    fetches: u32,
}

impl Context for Service {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        if status != "200" {
            hostcalls::log(
                LogLevel::Warn,
                &format!("token_service: fetch answered {status}"),
            )
            .ok();
            return;
        }
        let value = self
            .get_http_call_response_body(0, body)
            .unwrap_or_default();
        let value = String::from_utf8_lossy(&value).trim().to_string();
        self.set_shared_data("token", Some(value.as_bytes()), None)
            .ok();
        hostcalls::increment_metric(self.fetches, 1).ok();
    }
}

impl RootContext for Service {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match serde_json::from_slice::<Settings>(&bytes) {
                Ok(s) => self.settings = s,
                Err(e) => {
                    hostcalls::log(LogLevel::Error, &format!("bad config: {e}")).ok();
                    return false;
                }
            }
        }
        self.fetches = hostcalls::define_metric(MetricType::Counter, "token_service_fetches_total")
            .unwrap_or(0);
        self.set_tick_period(Duration::from_millis(self.settings.tick_ms));
        true
    }

    fn on_tick(&mut self) {
        let cluster = self.settings.cluster.clone();
        let path = self.settings.path.clone();
        let headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", cluster.as_str()),
        ];
        if let Err(status) =
            self.dispatch_http_call(&cluster, headers, None, vec![], Duration::from_millis(2000))
        {
            hostcalls::log(
                LogLevel::Warn,
                &format!("token_service: dispatch failed: {status:?}"),
            )
            .ok();
        }
    }
}
