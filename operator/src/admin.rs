//! The operator's admin listener: `/live`, `/ready` and `/metrics` (Prometheus text format).
//!
//! - `/live`: 200 while the process serves HTTP at all.
//! - `/ready`: 200 only when this replica is the leader **and** the controller's initial list
//!   of WasmFilters is done (so every filter is published before dataplanes are let in);
//!   503 otherwise, with the reason in the body. The Service in front of the gRPC port uses
//!   this probe, so dataplane streams only ever reach the leader.
//! - `/metrics`: the controller's counters ([`Metrics`]), the control plane's totals and
//!   per-filter dataplane stats summed over the dataplanes whose latest report includes the
//!   filter (labels `namespace`, `filter`): invocations, traps, fail-open skips, fail-closed
//!   refusals, VM restarts, the callback latency histogram, and every metric the module defined
//!   as `wasmfilter_operator_filter_module_metric{namespace, filter, name, kind, <its labels>}`.
//!   Read at scrape time from the control plane; a dataplane that leaves drops out of the sums.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;

use wasmfilter_api::control::FilterStats;

use crate::control::ControlPlane;

/// What `/ready` answers from. `leader` and `synced` only ever go from false to true in a
/// process (a replica that loses the lease exits, see `run`); the API server's reachability
/// comes and goes with the controller's list-watch.
#[derive(Debug, Default)]
pub struct Health {
    leader: AtomicBool,
    synced: AtomicBool,
    /// Since when every list or watch request to the API server has failed.
    api_failing_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long the API server may stay unreachable before `/ready` says so: a watch renewal or
/// one failed request is no reason to take the operator out of its Service.
pub const API_UNREACHABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl Health {
    pub fn set_leader(&self) {
        self.leader.store(true, Ordering::SeqCst);
    }

    /// The controller's first list of WasmFilters has been processed.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// The latest list or watch request reached the API server (or failed).
    pub fn set_api_reachable(&self, reachable: bool) {
        let mut since = self.api_failing_since.lock().unwrap();
        match (reachable, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    fn api_unreachable(&self) -> bool {
        self.api_failing_since
            .lock()
            .unwrap()
            .is_some_and(|t| t.elapsed() >= API_UNREACHABLE_GRACE)
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match (self.is_leader(), self.is_synced()) {
            (false, _) => Err("not the leader: waiting for the lease\n"),
            (true, false) => {
                Err("leader, waiting for the first list of WasmFilters and one reconcile of each\n")
            }
            (true, true) if self.api_unreachable() => Err(
                "the Kubernetes API server has not answered the WasmFilter watch for 10s or more\n",
            ),
            (true, true) => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The controller's metrics. Cheap to clone (every metric is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconciles that ended in a failure, by condition reason.
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    /// Registry resolutions (manifest request, and a download unless the module cache has the
    /// digest), by result: `resolved` or the failure's condition reason.
    pub pulls: Family<ResultLabel, Counter>,
    /// Reconciles that reused this generation's resolution instead of asking the registry
    /// (pullPolicy IfNotPresent, or Always within the refresh interval).
    pub resolution_cache_hits: Counter,
    /// Time a resolution took, seconds (including the download and the module check).
    pub pull_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            pulls: Family::default(),
            resolution_cache_hits: Counter::default(),
            pull_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        }
    }
}

impl Metrics {
    /// Resolutions that ended with `result` so far.
    pub fn pulls_with(&self, result: &str) -> u64 {
        self.pulls
            .get(&ResultLabel {
                result: result.into(),
            })
            .map_or(0, |c| c.get())
    }

    /// A registry with these metrics and, when given, the control plane's figures.
    pub fn registry(&self, control: Option<Arc<ControlPlane>>) -> Registry {
        let mut r = Registry::with_prefix("wasmfilter_operator");
        r.register(
            "reconciles",
            "WasmFilter reconciles run",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "WasmFilter reconciles that ended in a failure, by condition reason",
            self.reconcile_errors.clone(),
        );
        r.register(
            "pulls",
            "Module resolutions against a registry, by result (resolved, or the failure reason)",
            self.pulls.clone(),
        );
        r.register(
            "resolution_cache_hits",
            "Reconciles that reused the generation's resolution instead of asking the registry",
            self.resolution_cache_hits.clone(),
        );
        r.register(
            "pull_duration_seconds",
            "Time a module resolution took (manifest, download, checks)",
            self.pull_duration.clone(),
        );
        if let Some(control) = control {
            r.register_collector(Box::new(ControlCollector(control)));
        }
        r
    }
}

/// Reads the control plane at scrape time.
struct ControlCollector(Arc<ControlPlane>);

impl std::fmt::Debug for ControlCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct FilterLabels {
    namespace: String,
    filter: String,
}

impl Collector for ControlCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0.counters;
        for (name, help, value) in [
            (
                "connected_dataplanes",
                "Dataplanes with an open control stream",
                self.0.dataplane_count() as u64,
            ),
            (
                "snapshot_budget_bytes",
                "The largest snapshot a dataplane is sent (--snapshot-budget)",
                self.0.snapshot_budget(),
            ),
            (
                "snapshot_budget_refusals",
                "Filters left out of a connected dataplane's chain because its snapshot would pass \
                 the budget, one per (filter, dataplane)",
                self.0.over_budget_count(),
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        for (name, help, value) in [
            (
                "snapshots_sent",
                "Snapshots sent to dataplanes",
                c.snapshots_sent.load(Relaxed),
            ),
            (
                "acks",
                "Snapshots dataplanes applied in full",
                c.acks.load(Relaxed),
            ),
            (
                "nacks",
                "Snapshots dataplanes refused some filters of",
                c.nacks.load(Relaxed),
            ),
            (
                "module_fetches",
                "FetchModule calls served",
                c.module_fetches.load(Relaxed),
            ),
            (
                "module_bytes_served",
                "Module bytes sent to dataplanes",
                c.module_bytes_served.load(Relaxed),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }

        encode_filter_stats(&self.0.all_stats(), &mut encoder)
    }
}

/// Per filter, summed over the dataplanes whose latest report includes it.
#[derive(Debug, Default)]
struct FilterTotals {
    counters: [u64; 5],
    latency_sum: f64,
    latency_count: u64,
    /// (upper bound, cumulative count); None once two dataplanes disagree on the bounds
    /// (then only the +Inf bucket is exported).
    latency_buckets: Option<Vec<(f64, u64)>>,
    seen: bool,
}

/// The per-filter counters, in the order of `FilterTotals::counters`: (name, help).
const FILTER_COUNTERS: [(&str, &str); 5] = [
    (
        "filter_invocations",
        "Requests a filter ran on, summed over dataplanes",
    ),
    (
        "filter_traps",
        "Traps and callback timeouts of a filter, summed over dataplanes",
    ),
    (
        "filter_fail_open_skips",
        "Requests that skipped a FailOpen filter that could not run, summed over dataplanes",
    ),
    (
        "filter_fail_closed",
        "Requests refused (503) because a FailClosed filter could not run, summed over dataplanes",
    ),
    (
        "filter_vm_restarts",
        "VMs of a filter rebuilt after a failure, summed over dataplanes",
    ),
];

/// `namespace/name` as labels (a name without a namespace keeps an empty one).
fn filter_labels(name: &str) -> FilterLabels {
    let (namespace, filter) = name
        .split_once('/')
        .map(|(n, f)| (n.to_string(), f.to_string()))
        .unwrap_or_else(|| (String::new(), name.to_string()));
    FilterLabels { namespace, filter }
}

/// A label name Prometheus accepts: `[a-zA-Z_][a-zA-Z0-9_]*`; the labels the operator sets
/// itself get a `module_` prefix, so a module's label never overwrites them.
fn module_label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    if matches!(
        name.as_str(),
        "namespace" | "filter" | "name" | "kind" | "le"
    ) {
        name.insert_str(0, "module_");
    }
    name
}

/// prometheus-client writes label values as given: quotes, backslashes and newlines from a
/// module are escaped here (the OpenMetrics rules).
fn escape_label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Encodes every filter's figures (summed over dataplanes, labels `namespace` and `filter`)
/// and every metric a module defined (summed per name, kind and labels).
fn encode_filter_stats(
    stats: &[(String, FilterStats)],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    use wasmfilter_api::control::module_metric::Kind;

    let mut per_filter: BTreeMap<FilterLabels, FilterTotals> = BTreeMap::new();
    // (namespace, filter, name, kind, sorted labels) → summed value.
    type ModuleKey = (FilterLabels, String, &'static str, Vec<(String, String)>);
    let mut module: BTreeMap<ModuleKey, i64> = BTreeMap::new();
    for (_, s) in stats {
        let labels = filter_labels(&s.name);
        let t = per_filter.entry(labels.clone()).or_default();
        for (i, v) in [
            s.invocations,
            s.traps,
            s.fail_open_skips,
            s.fail_closed,
            s.vm_restarts,
        ]
        .into_iter()
        .enumerate()
        {
            t.counters[i] = t.counters[i].saturating_add(v);
        }
        t.latency_sum += s.latency_sum_seconds;
        t.latency_count = t.latency_count.saturating_add(s.latency_count);
        let buckets: Option<Vec<(f64, u64)>> = (s.latency_bounds.len() == s.latency_buckets.len())
            .then(|| {
                s.latency_bounds
                    .iter()
                    .copied()
                    .zip(s.latency_buckets.iter().copied())
                    .collect()
            });
        t.latency_buckets = match (t.seen, t.latency_buckets.take(), buckets) {
            (false, _, b) => b,
            (true, Some(mut sum), Some(b))
                if sum.len() == b.len() && sum.iter().zip(&b).all(|(x, y)| x.0 == y.0) =>
            {
                sum.iter_mut()
                    .zip(&b)
                    .for_each(|(x, y)| x.1 = x.1.saturating_add(y.1));
                Some(sum)
            }
            _ => None,
        };
        t.seen = true;
        for m in &s.module_metrics {
            let kind = match Kind::try_from(m.kind) {
                Ok(Kind::Counter) => "counter",
                Ok(Kind::Gauge) => "gauge",
                Ok(Kind::Histogram) => "histogram",
                Err(_) => continue,
            };
            let mut extra: Vec<(String, String)> = m
                .labels
                .iter()
                .map(|(k, v)| (module_label_name(k), escape_label_value(v)))
                .collect();
            extra.sort();
            let e = module
                .entry((labels.clone(), escape_label_value(&m.name), kind, extra))
                .or_default();
            *e = e.saturating_add(m.value);
        }
    }
    if per_filter.is_empty() {
        return Ok(());
    }
    for (i, (name, help)) in FILTER_COUNTERS.into_iter().enumerate() {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, t) in &per_filter {
            ConstCounter::new(t.counters[i]).encode(family.encode_family(labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "filter_callback_latency_seconds",
        "Wall-clock time of a filter's proxy-wasm callbacks, summed over dataplanes (the \
         buckets are those the dataplanes report, when they all report the same ones)",
        None,
        MetricType::Histogram,
    )?;
    for (labels, t) in &per_filter {
        // prometheus-client takes per-bucket counts and accumulates them itself.
        let mut buckets = Vec::new();
        let mut previous = 0u64;
        for (bound, cumulative) in t.latency_buckets.iter().flatten() {
            buckets.push((*bound, cumulative.saturating_sub(previous)));
            previous = *cumulative;
        }
        buckets.push((f64::MAX, t.latency_count.saturating_sub(previous)));
        family
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(t.latency_sum, t.latency_count, &buckets, None)?;
    }
    if !module.is_empty() {
        let mut family = encoder.encode_descriptor(
            "filter_module_metric",
            "Metrics a filter's module defined (proxy_define_metric), summed over dataplanes: \
             label name is the module's metric name, kind its type (a histogram's value is its \
             sample count), the other labels the module's own",
            None,
            MetricType::Gauge,
        )?;
        for ((labels, name, kind, extra), value) in &module {
            let mut all: Vec<(&str, &str)> = vec![
                ("namespace", labels.namespace.as_str()),
                ("filter", labels.filter.as_str()),
                ("name", name.as_str()),
                ("kind", kind),
            ];
            all.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            ConstGauge::new(*value).encode(family.encode_family(&all)?)?;
        }
    }
    Ok(())
}

/// What the admin server answers from.
pub struct Admin {
    pub health: Arc<Health>,
    pub registry: Registry,
}

impl Admin {
    pub fn new(health: Arc<Health>, registry: Registry) -> Arc<Admin> {
        Arc::new(Admin { health, registry })
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, ctype: &'static str, body: String| {
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, ctype)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        };
        const TEXT: &str = "text/plain; charset=utf-8";
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "only GET and HEAD\n".into(),
            );
        }
        match req.uri().path() {
            "/live" => reply(StatusCode::OK, TEXT, "live\n".into()),
            "/ready" => match self.health.readiness() {
                Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, why.into()),
            },
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    ),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        format!("encoding metrics: {e}\n"),
                    ),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "not found: /live, /ready, /metrics\n".into(),
            ),
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    admin: Arc<Admin>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = admin.handle(&req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(control: &Arc<ControlPlane>) -> String {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(
            &mut body,
            &Metrics::default().registry(Some(control.clone())),
        )
        .unwrap();
        body
    }

    /// What a scrape of /metrics shows after two dataplanes reported a filter.
    #[test]
    fn a_scrape_shows_each_filters_stats_summed_over_dataplanes() {
        use wasmfilter_api::control::{ModuleMetric, module_metric::Kind};
        let dir = tempfile::tempdir().unwrap();
        let control = ControlPlane::new(Arc::new(
            wasmfilter_oci::ModuleCache::open(dir.path()).unwrap(),
        ));
        assert!(
            !scrape(&control).contains("filter_invocations"),
            "no stats, no series"
        );
        let metric = |name: &str, kind: Kind, value: i64, labels: &[(&str, &str)]| ModuleMetric {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kind: kind as i32,
            value,
        };
        let report = |n: u64, buckets: [u64; 2], module_metrics| FilterStats {
            name: "team-a/auth".into(),
            revision: "r1".into(),
            invocations: 100 * n,
            traps: n,
            fail_open_skips: 2 * n,
            fail_closed: 3 * n,
            vm_restarts: 4 * n,
            latency_bounds: vec![0.001, 0.01],
            latency_buckets: buckets.to_vec(),
            latency_count: 10 * n,
            latency_sum_seconds: 0.5 * n as f64,
            module_metrics,
        };
        control.report_stats(
            "node-a",
            vec![report(
                1,
                [4, 9],
                vec![
                    metric("denied", Kind::Counter, 5, &[("reason", "no \"token\"")]),
                    metric("inflight", Kind::Gauge, 2, &[]),
                ],
            )],
        );
        control.report_stats(
            "node-b",
            vec![report(
                2,
                [15, 19],
                vec![
                    metric("denied", Kind::Counter, 7, &[("reason", "no \"token\"")]),
                    metric("denied", Kind::Counter, 1, &[("reason", "expired")]),
                    metric("size", Kind::Histogram, 6, &[("name", "x")]),
                ],
            )],
        );
        let body = scrape(&control);
        let l = r#"{namespace="team-a",filter="auth"}"#;
        for line in [
            format!("wasmfilter_operator_filter_invocations_total{l} 300"),
            format!("wasmfilter_operator_filter_traps_total{l} 3"),
            format!("wasmfilter_operator_filter_fail_open_skips_total{l} 6"),
            format!("wasmfilter_operator_filter_fail_closed_total{l} 9"),
            format!("wasmfilter_operator_filter_vm_restarts_total{l} 12"),
            format!("wasmfilter_operator_filter_callback_latency_seconds_sum{l} 1.5"),
            format!("wasmfilter_operator_filter_callback_latency_seconds_count{l} 30"),
            r#"wasmfilter_operator_filter_callback_latency_seconds_bucket{le="0.001",namespace="team-a",filter="auth"} 19"#.into(),
            r#"wasmfilter_operator_filter_callback_latency_seconds_bucket{le="0.01",namespace="team-a",filter="auth"} 28"#.into(),
            r#"wasmfilter_operator_filter_callback_latency_seconds_bucket{le="+Inf",namespace="team-a",filter="auth"} 30"#.into(),
            r#"wasmfilter_operator_filter_module_metric{namespace="team-a",filter="auth",name="denied",kind="counter",reason="expired"} 1"#.into(),
            r#"wasmfilter_operator_filter_module_metric{namespace="team-a",filter="auth",name="denied",kind="counter",reason="no \"token\""} 12"#.into(),
            r#"wasmfilter_operator_filter_module_metric{namespace="team-a",filter="auth",name="inflight",kind="gauge"} 2"#.into(),
            r#"wasmfilter_operator_filter_module_metric{namespace="team-a",filter="auth",name="size",kind="histogram",module_name="x"} 6"#.into(),
        ] {
            assert!(
                body.lines().any(|b| b == line),
                "{line} missing from:\n{body}"
            );
        }

        // A dataplane that leaves drops out of the sums.
        let session = control.connect("node-b", Default::default());
        control.disconnect("node-b", session);
        let body = scrape(&control);
        assert!(
            body.contains(&format!(
                "wasmfilter_operator_filter_invocations_total{l} 100\n"
            )),
            "{body}"
        );
    }

    #[test]
    fn a_scrape_counts_the_filters_left_out_for_the_snapshot_budget() {
        use crate::index::{FilterKey, FilterVersion};
        let dir = tempfile::tempdir().unwrap();
        let control = ControlPlane::with_snapshot_budget(
            Arc::new(wasmfilter_oci::ModuleCache::open(dir.path()).unwrap()),
            3000,
        );
        let version = |name: &str| FilterVersion {
            key: FilterKey::new("team-a", name),
            module_digest: format!("sha256:{}", "a".repeat(64)),
            module_size: 10,
            root_id: String::new(),
            configuration: vec![b'x'; 2000],
            vm_id: String::new(),
            vm_configuration: vec![],
            env: Default::default(),
            matches: Default::default(),
            phase: wasmfilter_api::Phase::Default,
            priority: 0,
            failure_policy: wasmfilter_api::FailurePolicy::FailClosed,
            limits: Default::default(),
            plugin_type: Default::default(),
            listeners: vec![],
        };
        control.publish(Default::default(), version("a"));
        control.publish(Default::default(), version("b"));
        let line = |n: u64| format!("wasmfilter_operator_snapshot_budget_refusals {n}");
        let body = scrape(&control);
        assert!(body.lines().any(|b| b == line(0)), "no dataplane: {body}");
        assert!(
            body.lines()
                .any(|b| b == "wasmfilter_operator_snapshot_budget_bytes 3000"),
            "{body}"
        );
        control.connect("node-a", Default::default());
        control.connect("node-b", Default::default());
        let body = scrape(&control);
        assert!(body.lines().any(|b| b == line(2)), "{body}");
        control.withdraw(&FilterKey::new("team-a", "a"));
        assert!(scrape(&control).lines().any(|b| b == line(0)));
    }

    #[test]
    fn ready_needs_the_lease_and_the_initial_list() {
        let h = Health::default();
        assert!(h.readiness().unwrap_err().contains("not the leader"));
        h.set_synced();
        assert!(h.readiness().is_err());
        h.set_leader();
        assert_eq!(h.readiness(), Ok(()));
    }
}
