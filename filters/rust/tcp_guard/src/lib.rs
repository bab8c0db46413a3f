//! `tcp_guard`: a network (L4) filter. Counts bytes both ways, masks a word in what the client
//! sends, and closes the connection when the client sends a forbidden pattern.
//!
//! Contract (dataplane/daemon/tests/network.rs asserts exactly this):
//!
//! * Plugin configuration (JSON, every field optional):
//!   `{"deny": "QUIT!", "mask": "secret"}` (the defaults).
//! * Root `on_configure` defines counters `tcp_guard_connections_total`,
//!   `tcp_guard_downstream_bytes_total`, `tcp_guard_upstream_bytes_total`,
//!   `tcp_guard_denied_total`.
//! * `on_new_connection`: `tcp_guard_connections_total` +1; logs info
//!   `tcp_guard: new connection from <source.address>`.
//! * `on_downstream_data(n, eos)`: adds `n` to `tcp_guard_downstream_bytes_total`. If the data
//!   contains `deny`: `tcp_guard_denied_total` +1, logs warn `tcp_guard: denied`, closes the
//!   downstream and returns Pause (nothing of it is forwarded). Otherwise each occurrence of
//!   `mask` is replaced by as many `*` (same length) with `set_downstream_data`, Continue.
//! * `on_upstream_data(n, eos)`: adds `n` to `tcp_guard_upstream_bytes_total`, Continue.
//! * `on_downstream_close(peer)` / `on_upstream_close(peer)`: logs info
//!   `tcp_guard: downstream closed by <peer>` / `upstream closed by <peer>`.
//! * `on_log`: logs info `tcp_guard: done, <down> bytes in, <up> bytes out` (this connection).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Clone, Deserialize)]
#[serde(default)]
struct Settings {
    deny: String,
    mask: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            deny: "QUIT!".into(),
            mask: "secret".into(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Metrics {
    connections: u32,
    downstream: u32,
    upstream: u32,
    denied: u32,
}

#[derive(Default)]
struct Root {
    settings: Settings,
    metrics: Metrics,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match serde_json::from_slice::<Settings>(&bytes) {
                Ok(s) => self.settings = s,
                Err(e) => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad config: {e}")).ok();
                    return false;
                }
            }
        }
        let define = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        self.metrics = Metrics {
            connections: define("tcp_guard_connections_total"),
            downstream: define("tcp_guard_downstream_bytes_total"),
            upstream: define("tcp_guard_upstream_bytes_total"),
            denied: define("tcp_guard_denied_total"),
        };
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Connection {
            settings: self.settings.clone(),
            metrics: self.metrics,
            down: 0,
            up: 0,
        }))
    }
}

struct Connection {
    settings: Settings,
    metrics: Metrics,
    down: usize,
    up: usize,
}

impl Context for Connection {}

fn log(level: LogLevel, message: String) {
    hostcalls::log(level, &message).ok();
}

fn peer(p: PeerType) -> &'static str {
    match p {
        PeerType::Local => "local",
        PeerType::Remote => "remote",
        _ => "unknown",
    }
}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        hostcalls::increment_metric(self.metrics.connections, 1).ok();
        let source = self
            .get_property(vec!["source", "address"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| "<none>".into());
        log(
            LogLevel::Info,
            format!("tcp_guard: new connection from {source}"),
        );
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.down += data_size;
        hostcalls::increment_metric(self.metrics.downstream, data_size as i64).ok();
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        let deny = self.settings.deny.as_bytes();
        if !deny.is_empty() && data.windows(deny.len()).any(|w| w == deny) {
            hostcalls::increment_metric(self.metrics.denied, 1).ok();
            log(LogLevel::Warn, "tcp_guard: denied".into());
            self.close_downstream();
            return Action::Pause;
        }
        let mask = self.settings.mask.as_bytes();
        if !mask.is_empty() && data.windows(mask.len()).any(|w| w == mask) {
            let mut out = Vec::with_capacity(data.len());
            let mut i = 0;
            while i < data.len() {
                if data[i..].starts_with(mask) {
                    out.extend(std::iter::repeat_n(b'*', mask.len()));
                    i += mask.len();
                } else {
                    out.push(data[i]);
                    i += 1;
                }
            }
            self.set_downstream_data(0, data_size, &out);
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer_type: PeerType) {
        log(
            LogLevel::Info,
            format!("tcp_guard: downstream closed by {}", peer(peer_type)),
        );
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.up += data_size;
        hostcalls::increment_metric(self.metrics.upstream, data_size as i64).ok();
        Action::Continue
    }

    fn on_upstream_close(&mut self, peer_type: PeerType) {
        log(
            LogLevel::Info,
            format!("tcp_guard: upstream closed by {}", peer(peer_type)),
        );
    }

    fn on_log(&mut self) {
        log(
            LogLevel::Info,
            format!(
                "tcp_guard: done, {} bytes in, {} bytes out",
                self.down, self.up
            ),
        );
    }
}
