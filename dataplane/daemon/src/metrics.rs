//! The dataplane's own Prometheus metrics, plus the metrics filters define, rendered together
//! on the admin listener's `/metrics`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wasmfilter_api::control;
use wasmfilter_host::{MetricType, QuotaState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabels {
    pub filter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub cluster: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    pub cluster: String,
    pub breaker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpEndLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Certificate reloads of the TLS listeners (`crate::tls`), counted by result.
#[derive(Clone, Debug)]
pub struct TlsReloads {
    ok: Counter,
    error: Counter,
}

impl TlsReloads {
    pub fn count(&self, ok: bool) {
        if ok {
            self.ok.inc()
        } else {
            self.error.inc()
        };
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    request_duration: Histogram,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    invocations: Family<FilterLabels, Counter>,
    callback_duration: Family<FilterLabels, Histogram, fn() -> Histogram>,
    traps: Family<FilterLabels, Counter>,
    fail_open_skips: Family<FilterLabels, Counter>,
    fail_closed: Family<FilterLabels, Counter>,
    vm_restarts: Family<FilterLabels, Counter>,
    vm_memory: Family<FilterLabels, Gauge>,
    snapshots_refused: Counter,
    reloads: Family<ResultLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    abandoned: Family<PhaseLabels, Counter>,
    circuit_open: Family<BreakerLabels, Counter>,
    connections_overflow: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
    tcp_connections_closed: Family<TcpEndLabels, Counter>,
    /// Callback latency per filter again, readable for the stats reported to the operator
    /// (prometheus-client histograms cannot be read back).
    latency: parking_lot::Mutex<std::collections::HashMap<String, Arc<LatencyTotals>>>,
    /// Requests whose handling panicked (answered 500; the worker kept serving).
    request_panics: Counter,
    /// Each filter's quota refusals, counted by the host (shared by every configuration
    /// version of the filter, like its other series).
    quotas: parking_lot::Mutex<std::collections::HashMap<String, Arc<QuotaState>>>,
}

/// Upper bounds (seconds) of the latency buckets reported to the operator.
pub const REPORTED_LATENCY_BOUNDS: [f64; 8] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0];

#[derive(Default)]
pub struct LatencyTotals {
    count: AtomicU64,
    sum_ns: AtomicU64,
    /// Non-cumulative counts per bound of [`REPORTED_LATENCY_BOUNDS`].
    buckets: [AtomicU64; REPORTED_LATENCY_BOUNDS.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wasmfilter");
        let m = Metrics {
            requests: Family::default(),
            request_duration: latency_histogram(),
            upstream_errors: Family::default(),
            invocations: Family::default(),
            callback_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            traps: Family::default(),
            fail_open_skips: Family::default(),
            fail_closed: Family::default(),
            vm_restarts: Family::default(),
            vm_memory: Family::default(),
            snapshots_refused: Counter::default(),
            reloads: Family::default(),
            tls_reloads: Family::default(),
            abandoned: Family::default(),
            circuit_open: Family::default(),
            connections_overflow: Family::default(),
            accept_errors: Family::default(),
            connections: Family::default(),
            tcp_connections_closed: Family::default(),
            latency: Default::default(),
            request_panics: Counter::default(),
            quotas: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures, by cluster and reason",
            m.upstream_errors.clone(),
        );
        registry.register(
            "filter_invocations",
            "Filter callbacks run",
            m.invocations.clone(),
        );
        registry.register(
            "filter_callback_duration_seconds",
            "Duration of one filter callback",
            m.callback_duration.clone(),
        );
        registry.register(
            "filter_traps",
            "Filter callbacks that trapped or timed out",
            m.traps.clone(),
        );
        registry.register(
            "filter_fail_open_skips",
            "Requests that skipped a failed FailOpen filter",
            m.fail_open_skips.clone(),
        );
        registry.register(
            "filter_fail_closed",
            "Requests refused with 503 because a FailClosed filter failed",
            m.fail_closed.clone(),
        );
        registry.register(
            "filter_vm_restarts",
            "VMs rebuilt after a failure",
            m.vm_restarts.clone(),
        );
        registry.register(
            "filter_vm_memory_bytes",
            "Linear memory of the filter's VM on the last worker that reported",
            m.vm_memory.clone(),
        );
        registry.register(
            "request_panics",
            "Requests whose handling panicked: answered 500 and logged, the worker kept serving",
            m.request_panics.clone(),
        );
        registry.register(
            "managed_snapshots_refused",
            "Snapshots from the operator refused whole: not complete, and they would have removed every filter running",
            m.snapshots_refused.clone(),
        );
        registry.register(
            "upstream_circuit_open",
            "Requests refused with 503 because a cluster's circuit breaker was full, by cluster and breaker",
            m.circuit_open.clone(),
        );
        registry.register(
            "downstream_connections_overflow",
            "Client connections closed at once because the listener had limits.maxConnections open",
            m.connections_overflow.clone(),
        );
        registry.register(
            "downstream_accept_errors",
            "Failed accepts (such as EMFILE: out of file descriptors), by listener",
            m.accept_errors.clone(),
        );
        registry.register(
            "downstream_connections",
            "Open client connections, by listener",
            m.connections.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "Connections of the TCP listeners that ended, by listener and reason: closed (both sides ended), filter_closed, filter_failed, idle_timeout, upstream_unreachable, io_error",
            m.tcp_connections_closed.clone(),
        );
        registry.register(
            "requests_abandoned",
            "Requests that ended before their response did (client gone, stream reset, upstream failure mid-response, drain), by phase",
            m.abandoned.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads (SIGHUP or file change), by result: applied, invalid (the file or a filter did not load), restart_required (a field only a restart applies changed)",
            m.reloads.clone(),
        );
        registry.register(
            "tls_certificate_reloads",
            "TLS listener certificates loaded again after their files changed, by result: ok, error (the previous certificate keeps serving)",
            m.tls_reloads.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn filter(name: &str) -> FilterLabels {
    FilterLabels {
        filter: name.to_string(),
    }
}

/// One filter's series, resolved once when its configuration is built, so the request path
/// updates them without looking labels up (or allocating them) on every callback.
#[derive(Clone)]
pub struct FilterMetrics {
    invocations: Counter,
    callback_duration: Histogram,
    traps: Counter,
    fail_open_skips: Counter,
    fail_closed: Counter,
    vm_restarts: Counter,
    vm_memory: Gauge,
    latency: Arc<LatencyTotals>,
    /// The filter's quota refusal counters and log gates, handed to each of its VMs.
    pub quota: Arc<QuotaState>,
}

impl FilterMetrics {
    pub fn callback(&self, seconds: f64) {
        self.invocations.inc();
        self.callback_duration.observe(seconds);
        let l = &self.latency;
        l.count.fetch_add(1, Ordering::Relaxed);
        l.sum_ns
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
        if let Some(i) = REPORTED_LATENCY_BOUNDS.iter().position(|b| seconds <= *b) {
            l.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This filter's totals since the dataplane started, as reported to the operator.
    pub fn report(&self, name: &str, revision: &str) -> control::FilterStats {
        let l = &self.latency;
        let mut cumulative = 0;
        let latency_buckets = l
            .buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Ordering::Relaxed);
                cumulative
            })
            .collect();
        control::FilterStats {
            name: name.to_string(),
            revision: revision.to_string(),
            invocations: self.invocations.get(),
            traps: self.traps.get(),
            fail_open_skips: self.fail_open_skips.get(),
            fail_closed: self.fail_closed.get(),
            vm_restarts: self.vm_restarts.get(),
            latency_bounds: REPORTED_LATENCY_BOUNDS.to_vec(),
            latency_buckets,
            latency_count: l.count.load(Ordering::Relaxed),
            latency_sum_seconds: l.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            module_metrics: Vec::new(),
        }
    }
    pub fn trap(&self) {
        self.traps.inc();
    }
    pub fn fail_open(&self) {
        self.fail_open_skips.inc();
    }
    pub fn fail_closed(&self) {
        self.fail_closed.inc();
    }
    pub fn vm_restart(&self) {
        self.vm_restarts.inc();
    }
    pub fn vm_memory(&self, bytes: usize) {
        self.vm_memory.set(bytes as i64);
    }
}

impl Metrics {
    pub fn request(&self, code: u16, seconds: f64) {
        self.requests.get_or_create(&CodeLabels { code }).inc();
        self.request_duration.observe(seconds);
    }
    pub fn upstream_error(&self, cluster: &str, reason: &str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                cluster: cluster.into(),
                reason: reason.into(),
            })
            .inc();
    }
    /// A cluster's circuit breaker (`max_connections`, `max_pending_requests`,
    /// `max_requests`) refused a request.
    pub fn circuit_open(&self, cluster: &str, breaker: &str) {
        self.circuit_open
            .get_or_create(&BreakerLabels {
                cluster: cluster.into(),
                breaker: breaker.into(),
            })
            .inc();
    }
    fn listener(listener: &str) -> ListenerLabels {
        ListenerLabels {
            listener: listener.into(),
        }
    }
    pub fn connection_overflow(&self, listener: &str) {
        self.connections_overflow
            .get_or_create(&Self::listener(listener))
            .inc();
    }
    pub fn accept_error(&self, listener: &str) {
        self.accept_errors
            .get_or_create(&Self::listener(listener))
            .inc();
    }
    /// A client connection opened (+1) or closed (-1).
    pub fn connection(&self, listener: &str, delta: i64) {
        self.connections
            .get_or_create(&Self::listener(listener))
            .inc_by(delta);
    }
    /// A reload ended with `result`: `applied`, `invalid` or `restart_required`.
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
    /// The counters the TLS listeners' certificate stores update.
    pub fn tls_reloads(&self) -> TlsReloads {
        // One at a time: `get_or_create` holds the family's lock until its guard is dropped.
        let ok = self
            .tls_reloads
            .get_or_create(&ResultLabels { result: "ok" })
            .clone();
        let error = self
            .tls_reloads
            .get_or_create(&ResultLabels { result: "error" })
            .clone();
        TlsReloads { ok, error }
    }
    /// The request path panicked; the request was answered 500 (see `crate::proxy::handle`).
    pub fn request_panic(&self) {
        self.request_panics.inc();
    }
    /// Managed mode refused a snapshot whole (see `crate::managed`).
    pub fn snapshot_refused(&self) {
        self.snapshots_refused.inc();
    }
    /// A request ended unanswered in `phase` (`request`, `response`, `response_body`); its
    /// filters' stream contexts were ended all the same.
    /// A TCP listener's connection ended (`crate::tcp`), for `reason`.
    pub fn tcp_connection_closed(&self, listener: &str, reason: &'static str) {
        self.tcp_connections_closed
            .get_or_create(&TcpEndLabels {
                listener: listener.to_string(),
                reason,
            })
            .inc();
    }
    pub fn request_abandoned(&self, phase: &'static str) {
        self.abandoned.get_or_create(&PhaseLabels { phase }).inc();
    }
    /// The series of filter `name` (shared by every configuration version of it).
    pub fn for_filter(&self, name: &str) -> FilterMetrics {
        let l = filter(name);
        FilterMetrics {
            invocations: self.invocations.get_or_create(&l).clone(),
            callback_duration: self.callback_duration.get_or_create(&l).clone(),
            traps: self.traps.get_or_create(&l).clone(),
            fail_open_skips: self.fail_open_skips.get_or_create(&l).clone(),
            fail_closed: self.fail_closed.get_or_create(&l).clone(),
            vm_restarts: self.vm_restarts.get_or_create(&l).clone(),
            vm_memory: self.vm_memory.get_or_create(&l).clone(),
            quota: self
                .quotas
                .lock()
                .entry(name.to_string())
                .or_default()
                .clone(),
            latency: self
                .latency
                .lock()
                .entry(name.to_string())
                .or_default()
                .clone(),
        }
    }

    /// Prometheus text: the dataplane's metrics, then every metric the active filters (each
    /// a name and the registry its VMs define metrics in) defined as
    /// `wasmfilter_plugin_<name>{filter="…", <tags>}`.
    pub fn render(&self, filters: &[(&str, &wasmfilter_host::MetricsRegistry)]) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        // The host's quota refusals per filter and limit (docs/limits.md).
        let quotas = self.quotas.lock();
        let mut typed = false;
        for (name, _) in filters {
            let Some(q) = quotas.get(*name) else {
                continue;
            };
            if !typed {
                typed = true;
                out.push_str("# HELP wasmfilter_filter_quota_refusals Requests of a filter refused (or records dropped) by one of its limits, by filter and limit (the limits field that sets it; headerSyntax: a header HTTP cannot carry)\n# TYPE wasmfilter_filter_quota_refusals counter\n");
            }
            for (limit, n) in q.refusals() {
                let _ = writeln!(
                    out,
                    "wasmfilter_filter_quota_refusals_total{{filter=\"{}\",limit=\"{limit}\"}} {n}",
                    escape(name)
                );
            }
        }
        drop(quotas);
        for (filter, registry) in filters {
            for m in registry.snapshot() {
                let name = format!("wasmfilter_plugin_{}", sanitize(&m.name));
                let mut labels = format!("filter=\"{}\"", escape(filter));
                for (k, v) in &m.labels {
                    let _ = write!(labels, ",{}=\"{}\"", sanitize(k), escape(v));
                }
                match m.kind {
                    MetricType::Counter => {
                        // OpenMetrics: the family has no `_total`; its sample always does.
                        let family = name.strip_suffix("_total").unwrap_or(&name);
                        let _ = writeln!(
                            out,
                            "# TYPE {family} counter\n{family}_total{{{labels}}} {}",
                            m.value
                        );
                    }
                    MetricType::Gauge => {
                        let _ =
                            writeln!(out, "# TYPE {name} gauge\n{name}{{{labels}}} {}", m.value);
                    }
                    MetricType::Histogram => {
                        let _ = writeln!(out, "# TYPE {name} histogram");
                        for (bound, count) in
                            wasmfilter_host::HISTOGRAM_BOUNDS.iter().zip(&m.buckets)
                        {
                            let _ =
                                writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
                        }
                        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", m.value);
                        let _ = writeln!(
                            out,
                            "{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}",
                            m.sum, m.value
                        );
                    }
                }
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
