//! `queue_producer`: enqueues one item on a shared queue from every tick of its root context.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"queue_name": "events", "queue_vm_id": "", "tick_ms": 100}` (the defaults). Invalid
//!   JSON: logs an error and `on_configure` returns false.
//! * Root `on_configure`: defines counter `queue_producer_enqueued_total`, sets the tick period.
//! * Root `on_tick`: `proxy_resolve_shared_queue(queue_vm_id, queue_name)`; if found, enqueues
//!   `tick-<n>` (n counts this root's ticks from 1), adds 1 to the counter and logs info
//!   `queue_producer: enqueued tick-<n>`; if not found, logs debug `queue not found`.
//! * Streams: pass untouched.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Producer::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    queue_name: String,
    queue_vm_id: String,
    tick_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_name: "events".into(),
            queue_vm_id: String::new(),
            tick_ms: 100,
        }
    }
}

#[derive(Default)]
struct Producer {
    config: Config,
    ticks: u64,
    enqueued: u32,
}

impl Context for Producer {}

impl RootContext for Producer {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice(&bytes) {
                Ok(c) => self.config = c,
                Err(e) => {
                    let _ = hostcalls::log(
                        LogLevel::Error,
                        &format!("queue_producer: invalid plugin configuration: {e}"),
                    );
                    return false;
                }
            }
        }
        self.enqueued =
            hostcalls::define_metric(MetricType::Counter, "queue_producer_enqueued_total")
                .unwrap_or(0);
        if self.config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(self.config.tick_ms));
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        match hostcalls::resolve_shared_queue(&self.config.queue_vm_id, &self.config.queue_name) {
            Ok(Some(id)) => {
                let item = format!("tick-{}", self.ticks);
                if hostcalls::enqueue_shared_queue(id, Some(item.as_bytes())).is_ok() {
                    let _ = hostcalls::increment_metric(self.enqueued, 1);
                    let _ =
                        hostcalls::log(LogLevel::Info, &format!("queue_producer: enqueued {item}"));
                }
            }
            _ => {
                let _ = hostcalls::log(LogLevel::Debug, "queue not found");
            }
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(PassThrough))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Streams pass untouched.
struct PassThrough;

impl Context for PassThrough {}

impl HttpContext for PassThrough {}
