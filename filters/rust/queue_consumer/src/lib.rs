//! `queue_consumer`: registers a shared queue and drains it in `proxy_on_queue_ready`.
//!
//! Contract (the dataplane's semantics tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"queue_name": "events"}` (the default). Invalid JSON: logs an error and `on_configure`
//!   returns false.
//! * Root `on_configure`: defines counters `queue_consumer_ready_total`,
//!   `queue_consumer_received_total` and `queue_consumer_wrong_queue_total`; registers the queue.
//! * Root `on_queue_ready(id)`: `queue_consumer_ready_total` +1 (+1 on
//!   `queue_consumer_wrong_queue_total` too if `id` is not the queue it registered); dequeues
//!   until empty, for each item `queue_consumer_received_total` +1, logs info
//!   `queue_consumer: received <item>` and stores it as shared data `queue_consumer.last`.
//! * Response headers: adds `x-queue-last: <shared data queue_consumer.last, "<none>">`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Consumer::default())
    });
}}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    queue_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_name: "events".into(),
        }
    }
}

#[derive(Default)]
struct Consumer {
    queue: u32,
    ready: u32,
    received: u32,
    wrong: u32,
}

impl Context for Consumer {}

fn counter(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0)
}

impl RootContext for Consumer {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config: Config = if bytes.iter().all(u8::is_ascii_whitespace) {
            Config::default()
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    let _ = hostcalls::log(
                        LogLevel::Error,
                        &format!("queue_consumer: invalid plugin configuration: {e}"),
                    );
                    return false;
                }
            }
        };
        self.ready = counter("queue_consumer_ready_total");
        self.received = counter("queue_consumer_received_total");
        self.wrong = counter("queue_consumer_wrong_queue_total");
        match hostcalls::register_shared_queue(&config.queue_name) {
            Ok(id) => self.queue = id,
            Err(_) => return false,
        }
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let _ = hostcalls::increment_metric(self.ready, 1);
        if queue_id != self.queue {
            let _ = hostcalls::increment_metric(self.wrong, 1);
        }
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            let _ = hostcalls::increment_metric(self.received, 1);
            let text = String::from_utf8_lossy(&item).into_owned();
            let _ = hostcalls::log(LogLevel::Info, &format!("queue_consumer: received {text}"));
            let _ = hostcalls::set_shared_data("queue_consumer.last", Some(&item), None);
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ConsumerStream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ConsumerStream;

impl Context for ConsumerStream {}

impl HttpContext for ConsumerStream {
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let last = match hostcalls::get_shared_data("queue_consumer.last") {
            Ok((Some(v), _)) => String::from_utf8_lossy(&v).into_owned(),
            _ => "<none>".into(),
        };
        self.add_http_response_header("x-queue-last", &last);
        Action::Continue
    }
}
