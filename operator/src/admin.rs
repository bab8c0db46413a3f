//! The operator's admin listener: `/live`, `/ready` and `/metrics` (Prometheus text format).
//!
//! - `/live`: 200 while the process serves HTTP at all.
//! - `/ready`: 200 only when this replica is the leader **and** the controller's initial list
//!   of WasmFilters is done (so every filter is published before dataplanes are let in);
//!   503 otherwise, with the reason in the body. The Service in front of the gRPC port uses
//!   this probe, so dataplane streams only ever reach the leader.
//! - `/metrics`: the controller's counters ([`Metrics`]), the control plane's totals and
//!   per-filter dataplane stats summed over dataplanes (labels `namespace`, `filter`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::control::ControlPlane;

/// What `/ready` answers from. Both flags only ever go from false to true in a process: a
/// replica that loses the lease exits (see `run`).
#[derive(Debug, Default)]
pub struct Health {
    leader: AtomicBool,
    synced: AtomicBool,
}

impl Health {
    pub fn set_leader(&self) {
        self.leader.store(true, Ordering::SeqCst);
    }

    /// The controller's first list of WasmFilters has been processed.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
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
            (true, true) => Ok(()),
            (false, _) => Err("not the leader: waiting for the lease\n"),
            (true, false) => Err("leader, waiting for the initial list of WasmFilters\n"),
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
        let gauge = ConstGauge::new(self.0.dataplane_count() as i64);
        gauge.encode(encoder.encode_descriptor(
            "connected_dataplanes",
            "Dataplanes with an open control stream",
            None,
            gauge.metric_type(),
        )?)?;
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

        // Per filter, summed over the dataplanes that report it.
        let mut per_filter: std::collections::BTreeMap<FilterLabels, [u64; 4]> = Default::default();
        for (_, s) in self.0.all_stats() {
            let (namespace, filter) = s
                .name
                .split_once('/')
                .map(|(n, f)| (n.to_string(), f.to_string()))
                .unwrap_or_else(|| (String::new(), s.name.clone()));
            let e = per_filter
                .entry(FilterLabels { namespace, filter })
                .or_default();
            e[0] += s.invocations;
            e[1] += s.traps;
            e[2] += s.fail_open_skips;
            e[3] += s.fail_closed;
        }
        for (i, (name, help)) in [
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
                "Requests that skipped a FailOpen filter that could not run",
            ),
            (
                "filter_fail_closed",
                "Requests refused (503) because a FailClosed filter could not run",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            if per_filter.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (labels, values) in &per_filter {
                ConstCounter::new(values[i]).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
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
