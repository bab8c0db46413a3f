//! `observe`: exercises metrics, ticks, shared data with CAS, shared queues, properties,
//! logging and the effective context.
//!
//! Contract (the host tests assert exactly this):
//!
//! * Plugin configuration (JSON, empty = defaults, every field optional, unknown fields ignored):
//!   `{"queue_role": "none", "queue_name": "events", "queue_vm_id": "", "tick_ms": 0}`
//!   (the defaults; `queue_role` is one of "none", "producer", "consumer").
//!   Invalid JSON (or an unknown role): logs an error and `on_configure` returns false.
//! * Root `on_configure`: defines counters `observe_requests_total`, `observe_ticks_total`,
//!   `observe_dequeued_total`, `observe_cas_retries_total`, gauge `observe_active_streams` and
//!   histogram `observe_request_header_count`. If shared data `observe.hits` is absent, stores
//!   "0" unconditionally (cas 0), which narrows the window in which two VMs both see it absent.
//!   `tick_ms > 0` → `proxy_set_tick_period_milliseconds(tick_ms)`.
//!   "consumer" → `proxy_register_shared_queue(queue_name)`, the id is kept.
//! * Root `on_tick`: increments `observe_ticks_total` by 1 and stores shared data
//!   `observe.ticks` = this root context's own tick count in decimal (cas 0).
//! * Root `on_queue_ready(queue_id)`: if `queue_id` is not the id it registered, logs warn
//!   `observe: on_queue_ready(<id>) but registered <Some(id)|None>`. Then in any case dequeues
//!   `queue_id` until EMPTY (or an error); for each item logs info `dequeued: <item, UTF-8
//!   lossy>` and increments `observe_dequeued_total` by 1. If any item was dequeued, appends
//!   them comma-joined to shared data `observe.dequeued` (a `,` separates the old value from
//!   the new items) with a CAS read-modify-write retried up to 100 times.
//! * HTTP request headers, in this order:
//!   1. metrics: `observe_requests_total` +1, `observe_active_streams` +1, histogram
//!      `observe_request_header_count` records the `num_headers` argument, and counter
//!      `observe_requests_by_method.method=<:method, "UNKNOWN" if missing>` +1 (defined on
//!      first use per method, ids cached in the root context).
//!   2. CAS increment of shared data `observe.hits` (absent or unparsable = 0): get, then set
//!      value+1 with the cas just read; on CAS_MISMATCH retry, at most 100 retries. Retries are
//!      added to `observe_cas_retries_total` (only when > 0). Sets (replaces) request headers
//!      `x-observe-hits: <new value>` (`cas-exhausted` after 100 failed retries) and
//!      `x-observe-cas-retries: <retries>`.
//!   3. "producer": `proxy_resolve_shared_queue(queue_vm_id, queue_name)` on every request; if
//!      not found logs warn `queue not found`, else enqueues the request `:path` ("" if
//!      missing); an enqueue error logs warn `enqueue failed: <status>`.
//!   4. properties: adds request headers, each value UTF-8 lossy, `<none>` when the host answers
//!      NOT_FOUND or no data, `<error>` for SERIALIZATION_FAILURE/INTERNAL_FAILURE:
//!      `x-prop-plugin-name` (plugin_name), `x-prop-root-id` (plugin_root_id), `x-prop-vm-id`
//!      (plugin_vm_id), `x-prop-path` (request.path), `x-prop-method` (request.method),
//!      `x-prop-source-address` (source.address), `x-prop-route-name` (xds.route_name),
//!      `x-prop-route-meta-owner` (xds.route_metadata.filter_metadata.wasmfilter.owner); then
//!      `proxy_set_property(observe.seen, "yes")` and adds `x-prop-set-roundtrip` with
//!      observe.seen read back the same way.
//!   5. logs `observe request (<level>)` once at each level trace, debug, info, warn, error,
//!      critical (in that order).
//!   6. if request header `x-observe-callout-cluster` is present: `proxy_http_call(<cluster>,
//!      [:method GET, :path /, :authority <cluster>], no body, no trailers, 5000 ms)`, Pause;
//!      if the dispatch fails, logs warn, adds `x-observe-callout-status: dispatch-error` and
//!      continues. Otherwise Continue.
//! * `on_http_call_response` (the SDK routes it to the stream that dispatched it and sets the
//!   effective context to that stream first): adds request header `x-observe-callout-status:
//!   <callout :status, "<none>" if missing>` (`failed` when `num_headers == 0`), then resumes.
//! * HTTP `on_log`: `observe_active_streams` -1 (only if step 1 incremented it).
//! * A metric hostcall answering NOT_FOUND/BAD_ARGUMENT is logged as a warning, not a panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ObserveRoot::default())
    });
}}

const MAX_CAS_RETRIES: u32 = 100;
const CALLOUT_TIMEOUT: Duration = Duration::from_millis(5000);

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum QueueRole {
    #[default]
    None,
    Producer,
    Consumer,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    queue_role: QueueRole,
    queue_name: String,
    queue_vm_id: String,
    tick_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_role: QueueRole::None,
            queue_name: "events".into(),
            queue_vm_id: String::new(),
            tick_ms: 0,
        }
    }
}

/// Metric ids, defined in `on_configure`.
#[derive(Debug, Clone, Copy)]
struct Metrics {
    requests_total: u32,
    active_streams: u32,
    request_header_count: u32,
    ticks_total: u32,
    dequeued_total: u32,
    cas_retries_total: u32,
}

/// What the root shares with its HTTP contexts.
#[derive(Default)]
struct Shared {
    config: Config,
    /// `None` until `on_configure` succeeded.
    metrics: Option<Metrics>,
    /// Ids of `observe_requests_by_method.method=<METHOD>`, defined lazily.
    by_method: RefCell<HashMap<String, u32>>,
}

fn log(level: LogLevel, message: &str) {
    // The SDK panics on any status but OK, so there is no error to handle here.
    let _ = hostcalls::log(level, message);
}

fn define(metric_type: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(metric_type, name).unwrap()
}

fn increment(metric_id: u32, delta: i64) {
    if let Err(status) = hostcalls::increment_metric(metric_id, delta) {
        log(
            LogLevel::Warn,
            &format!("observe: increment_metric({metric_id}, {delta}) failed: {status:?}"),
        );
    }
}

fn record(metric_id: u32, value: u64) {
    if let Err(status) = hostcalls::record_metric(metric_id, value) {
        log(
            LogLevel::Warn,
            &format!("observe: record_metric({metric_id}, {value}) failed: {status:?}"),
        );
    }
}

/// Read-modify-write of a shared data key with CAS, retried at most `MAX_CAS_RETRIES` times.
/// Returns the value written (or `None` if every attempt hit a CAS mismatch) and the retries.
fn cas_update(key: &str, update: impl Fn(Option<&[u8]>) -> Vec<u8>) -> (Option<Vec<u8>>, u32) {
    let mut retries = 0;
    loop {
        let (value, cas) = hostcalls::get_shared_data(key).unwrap();
        let new_value = update(value.as_deref());
        match hostcalls::set_shared_data(key, Some(&new_value), cas) {
            Ok(()) => return (Some(new_value), retries),
            Err(_) if retries < MAX_CAS_RETRIES => retries += 1,
            Err(_) => return (None, retries),
        }
    }
}

/// A property as a header value: UTF-8 lossy, `<none>` if absent, `<error>` on a host error.
fn property(path: Vec<&str>) -> String {
    match hostcalls::get_property(path) {
        Ok(Some(value)) => String::from_utf8_lossy(&value).into_owned(),
        Ok(None) => "<none>".into(),
        Err(_) => "<error>".into(),
    }
}

#[derive(Default)]
struct ObserveRoot {
    shared: Rc<Shared>,
    queue_id: Option<u32>,
    ticks: u64,
}

impl Context for ObserveRoot {}

impl RootContext for ObserveRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = if raw.iter().all(u8::is_ascii_whitespace) {
            Config::default()
        } else {
            match serde_json::from_slice::<Config>(&raw) {
                Ok(config) => config,
                Err(err) => {
                    log(
                        LogLevel::Error,
                        &format!("observe: invalid plugin configuration: {err}"),
                    );
                    return false;
                }
            }
        };
        let metrics = Metrics {
            requests_total: define(MetricType::Counter, "observe_requests_total"),
            active_streams: define(MetricType::Gauge, "observe_active_streams"),
            request_header_count: define(MetricType::Histogram, "observe_request_header_count"),
            ticks_total: define(MetricType::Counter, "observe_ticks_total"),
            dequeued_total: define(MetricType::Counter, "observe_dequeued_total"),
            cas_retries_total: define(MetricType::Counter, "observe_cas_retries_total"),
        };
        // Narrow the window in which two VMs both see the key absent and write unconditionally.
        if self.get_shared_data("observe.hits").0.is_none() {
            let _ = self.set_shared_data("observe.hits", Some(b"0"), None);
        }
        if config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(config.tick_ms));
        }
        self.queue_id = match config.queue_role {
            QueueRole::Consumer => Some(self.register_shared_queue(&config.queue_name)),
            _ => None,
        };
        self.shared = Rc::new(Shared {
            config,
            metrics: Some(metrics),
            by_method: RefCell::default(),
        });
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if let Some(metrics) = self.shared.metrics {
            increment(metrics.ticks_total, 1);
        }
        let ticks = self.ticks.to_string();
        let _ = self.set_shared_data("observe.ticks", Some(ticks.as_bytes()), None);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.queue_id != Some(queue_id) {
            let registered = self.queue_id;
            log(
                LogLevel::Warn,
                &format!("observe: on_queue_ready({queue_id}) but registered {registered:?}"),
            );
        }
        let mut items = Vec::new();
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            let item = String::from_utf8_lossy(&item).into_owned();
            log(LogLevel::Info, &format!("dequeued: {item}"));
            if let Some(metrics) = self.shared.metrics {
                increment(metrics.dequeued_total, 1);
            }
            items.push(item);
        }
        if items.is_empty() {
            return;
        }
        let joined = items.join(",");
        let (written, _) = cas_update("observe.dequeued", |old| match old {
            Some(old) if !old.is_empty() => [old, b",", joined.as_bytes()].concat(),
            _ => joined.as_bytes().to_vec(),
        });
        if written.is_none() {
            log(
                LogLevel::Warn,
                "observe: CAS retries exhausted for observe.dequeued",
            );
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Observe {
            shared: Rc::clone(&self.shared),
            counted: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Observe {
    shared: Rc<Shared>,
    /// Whether `observe_active_streams` was incremented for this stream.
    counted: bool,
}

impl Observe {
    fn record_metrics(&mut self, num_headers: usize) {
        let Some(metrics) = self.shared.metrics else {
            return;
        };
        increment(metrics.requests_total, 1);
        increment(metrics.active_streams, 1);
        self.counted = true;
        record(metrics.request_header_count, num_headers as u64);
        let method = self
            .get_http_request_header(":method")
            .unwrap_or_else(|| "UNKNOWN".into());
        let id = *self
            .shared
            .by_method
            .borrow_mut()
            .entry(method)
            .or_insert_with_key(|method| {
                define(
                    MetricType::Counter,
                    &format!("observe_requests_by_method.method={method}"),
                )
            });
        increment(id, 1);
    }

    fn count_hit(&self) {
        let (written, retries) = cas_update("observe.hits", |old| {
            let hits: u64 = old
                .and_then(|old| std::str::from_utf8(old).ok())
                .and_then(|old| old.trim().parse().ok())
                .unwrap_or(0);
            (hits + 1).to_string().into_bytes()
        });
        if retries > 0 {
            if let Some(metrics) = self.shared.metrics {
                increment(metrics.cas_retries_total, i64::from(retries));
            }
        }
        let hits = match &written {
            Some(value) => String::from_utf8_lossy(value).into_owned(),
            None => {
                log(
                    LogLevel::Warn,
                    "observe: CAS retries exhausted for observe.hits",
                );
                "cas-exhausted".into()
            }
        };
        self.set_http_request_header("x-observe-hits", Some(&hits));
        self.set_http_request_header("x-observe-cas-retries", Some(&retries.to_string()));
    }

    fn produce(&self) {
        let config = &self.shared.config;
        if config.queue_role != QueueRole::Producer {
            return;
        }
        let Some(queue_id) = self.resolve_shared_queue(&config.queue_vm_id, &config.queue_name)
        else {
            log(LogLevel::Warn, "queue not found");
            return;
        };
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if let Err(status) = self.enqueue_shared_queue(queue_id, Some(path.as_bytes())) {
            log(LogLevel::Warn, &format!("enqueue failed: {status:?}"));
        }
    }

    fn add_properties(&self) {
        for (header, path) in [
            ("x-prop-plugin-name", vec!["plugin_name"]),
            ("x-prop-root-id", vec!["plugin_root_id"]),
            ("x-prop-vm-id", vec!["plugin_vm_id"]),
            ("x-prop-path", vec!["request", "path"]),
            ("x-prop-method", vec!["request", "method"]),
            ("x-prop-source-address", vec!["source", "address"]),
            ("x-prop-route-name", vec!["xds", "route_name"]),
            (
                "x-prop-route-meta-owner",
                vec![
                    "xds",
                    "route_metadata",
                    "filter_metadata",
                    "wasmfilter",
                    "owner",
                ],
            ),
        ] {
            self.add_http_request_header(header, &property(path));
        }
        self.set_property(vec!["observe", "seen"], Some(b"yes"));
        let roundtrip = property(vec!["observe", "seen"]);
        self.add_http_request_header("x-prop-set-roundtrip", &roundtrip);
    }
}

impl Context for Observe {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let status = if num_headers == 0 {
            "failed".to_string()
        } else {
            self.get_http_call_response_header(":status")
                .unwrap_or_else(|| "<none>".into())
        };
        self.add_http_request_header("x-observe-callout-status", &status);
        self.resume_http_request();
    }
}

impl HttpContext for Observe {
    fn on_http_request_headers(&mut self, num_headers: usize, _end_of_stream: bool) -> Action {
        self.record_metrics(num_headers);
        self.count_hit();
        self.produce();
        self.add_properties();
        for (level, name) in [
            (LogLevel::Trace, "trace"),
            (LogLevel::Debug, "debug"),
            (LogLevel::Info, "info"),
            (LogLevel::Warn, "warn"),
            (LogLevel::Error, "error"),
            (LogLevel::Critical, "critical"),
        ] {
            log(level, &format!("observe request ({name})"));
        }
        let Some(cluster) = self.get_http_request_header("x-observe-callout-cluster") else {
            return Action::Continue;
        };
        let headers = vec![(":method", "GET"), (":path", "/"), (":authority", &cluster)];
        match self.dispatch_http_call(&cluster, headers, None, vec![], CALLOUT_TIMEOUT) {
            Ok(_) => Action::Pause,
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!("observe: callout dispatch failed: {status:?}"),
                );
                self.add_http_request_header("x-observe-callout-status", "dispatch-error");
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        if let (true, Some(metrics)) = (self.counted, self.shared.metrics) {
            increment(metrics.active_streams, -1);
        }
    }
}
