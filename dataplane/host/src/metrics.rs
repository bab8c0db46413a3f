//! Metrics a plugin defines with `proxy_define_metric`.
//!
//! One registry per plugin, shared by all of that plugin's VMs (one per worker), so a counter
//! counts every worker's increments. Tags travel inside the name, Envoy-style: the name is split
//! on `.`, and every segment of the form `key=value` becomes a label while the other segments,
//! joined with `_`, form the metric name. `requests.method=GET.code=200` is the series
//! `requests{method="GET",code="200"}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::abi::MetricType;
use crate::limits::MAX_METRICS_PER_PLUGIN;

/// Upper bounds of the histogram buckets (values are whatever unit the plugin records).
pub const HISTOGRAM_BOUNDS: [u64; 16] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

#[derive(Default)]
pub struct MetricsRegistry {
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<(String, u8), u32>,
    metrics: Vec<Metric>,
}

struct Metric {
    name: String,
    kind: MetricType,
    value: AtomicI64,
    buckets: Option<Box<[AtomicU64; HISTOGRAM_BOUNDS.len() + 1]>>,
    sum: AtomicU64,
    count: AtomicU64,
}

/// Why a metric operation was refused; each maps to the status the ABI prescribes.
#[derive(Debug, PartialEq, Eq)]
pub enum MetricError {
    NotFound,
    BadArgument,
    /// The plugin has defined as many metrics as it may.
    TooMany,
}

/// A point-in-time copy of one metric, for exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSnapshot {
    /// The name with tag segments removed.
    pub name: String,
    /// Labels taken from `key=value` segments of the defined name, in order.
    pub labels: Vec<(String, String)>,
    pub kind: MetricType,
    /// Counter total or gauge value; for histograms, the number of samples.
    pub value: i64,
    /// Histograms only: cumulative counts per bound of [`HISTOGRAM_BOUNDS`], then +Inf.
    pub buckets: Vec<u64>,
    pub sum: u64,
}

/// Splits a defined name into the metric name and its labels.
pub fn split_tags(defined: &str) -> (String, Vec<(String, String)>) {
    let mut name_parts = Vec::new();
    let mut labels = Vec::new();
    for segment in defined.split('.') {
        match segment.split_once('=') {
            Some((k, v)) if !k.is_empty() => labels.push((k.to_string(), v.to_string())),
            _ => name_parts.push(segment),
        }
    }
    (name_parts.join("_"), labels)
}

impl MetricsRegistry {
    /// Defines (or finds) a metric; ids encode the type in their low two bits, as cpp-host does.
    /// A new metric past `max_metrics` (never above [`MAX_METRICS_PER_PLUGIN`]) is refused
    /// with [`MetricError::TooMany`].
    pub fn define(
        &self,
        kind: MetricType,
        name: &str,
        max_metrics: usize,
    ) -> Result<u32, MetricError> {
        let key = (name.to_string(), kind as u8);
        if let Some(&id) = self.inner.read().by_name.get(&key) {
            return Ok(id);
        }
        let mut inner = self.inner.write();
        if let Some(&id) = inner.by_name.get(&key) {
            return Ok(id);
        }
        if inner.metrics.len() >= max_metrics.min(MAX_METRICS_PER_PLUGIN) {
            return Err(MetricError::TooMany);
        }
        let index = inner.metrics.len() as u32;
        inner.metrics.push(Metric {
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            buckets: (kind == MetricType::Histogram)
                .then(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0)))),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        });
        let id = (index << 2) | kind as u32;
        inner.by_name.insert(key, id);
        Ok(id)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&Metric) -> R) -> Result<R, MetricError> {
        let inner = self.inner.read();
        let metric = inner
            .metrics
            .get((id >> 2) as usize)
            .filter(|m| m.kind as u32 == id & 3)
            .ok_or(MetricError::NotFound)?;
        Ok(f(metric))
    }

    /// Counters need a positive delta; gauges move either way; histograms refuse.
    pub fn increment(&self, id: u32, delta: i64) -> Result<(), MetricError> {
        self.with(id, |m| match m.kind {
            MetricType::Counter if delta > 0 => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
            MetricType::Gauge => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(MetricError::BadArgument),
        })?
    }

    /// Counters add, gauges set, histograms record a sample.
    pub fn record(&self, id: u32, value: u64) -> Result<(), MetricError> {
        self.with(id, |m| match m.kind {
            MetricType::Counter => {
                m.value.fetch_add(value as i64, Ordering::Relaxed);
            }
            MetricType::Gauge => m.value.store(value as i64, Ordering::Relaxed),
            MetricType::Histogram => {
                let slot = HISTOGRAM_BOUNDS
                    .iter()
                    .position(|b| value <= *b)
                    .unwrap_or(HISTOGRAM_BOUNDS.len());
                if let Some(buckets) = &m.buckets {
                    buckets[slot].fetch_add(1, Ordering::Relaxed);
                }
                m.sum.fetch_add(value, Ordering::Relaxed);
                m.count.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// Counter and gauge values; histograms refuse.
    pub fn get(&self, id: u32) -> Result<u64, MetricError> {
        self.with(id, |m| match m.kind {
            MetricType::Histogram => Err(MetricError::BadArgument),
            _ => Ok(m.value.load(Ordering::Relaxed) as u64),
        })?
    }

    /// How many metrics are defined.
    pub fn len(&self) -> usize {
        self.inner.read().metrics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every metric defined so far.
    pub fn snapshot(&self) -> Vec<MetricSnapshot> {
        let inner = self.inner.read();
        inner
            .metrics
            .iter()
            .map(|m| {
                let (name, labels) = split_tags(&m.name);
                let buckets = m
                    .buckets
                    .as_ref()
                    .map(|b| {
                        let mut acc = 0;
                        b.iter()
                            .map(|c| {
                                acc += c.load(Ordering::Relaxed);
                                acc
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                MetricSnapshot {
                    name,
                    labels,
                    kind: m.kind,
                    value: match m.kind {
                        MetricType::Histogram => m.count.load(Ordering::Relaxed) as i64,
                        _ => m.value.load(Ordering::Relaxed),
                    },
                    buckets,
                    sum: m.sum.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The snapshot of the metric defined under exactly `defined_name`, if any.
    pub fn find(&self, defined_name: &str) -> Option<MetricSnapshot> {
        let (name, labels) = split_tags(defined_name);
        self.snapshot()
            .into_iter()
            .find(|m| m.name == name && m.labels == labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_histograms_follow_the_abi() {
        let r = MetricsRegistry::default();
        let c = r.define(MetricType::Counter, "c", 10).unwrap();
        let g = r.define(MetricType::Gauge, "g", 10).unwrap();
        let h = r.define(MetricType::Histogram, "h", 10).unwrap();
        assert_eq!(r.define(MetricType::Counter, "c", 10).unwrap(), c);
        r.increment(c, 2).unwrap();
        assert_eq!(r.increment(c, -1), Err(MetricError::BadArgument));
        r.record(c, 3).unwrap();
        assert_eq!(r.get(c).unwrap(), 5);
        r.increment(g, 5).unwrap();
        r.increment(g, -2).unwrap();
        assert_eq!(r.get(g).unwrap(), 3);
        r.record(g, 9).unwrap();
        assert_eq!(r.get(g).unwrap(), 9);
        assert_eq!(r.increment(h, 1), Err(MetricError::BadArgument));
        r.record(h, 3).unwrap();
        r.record(h, 2_000_000).unwrap();
        assert_eq!(r.get(h), Err(MetricError::BadArgument));
        let snap = r.find("h").unwrap();
        assert_eq!(snap.value, 2);
        assert_eq!(snap.sum, 2_000_003);
        assert_eq!(snap.buckets[2], 1); // <= 5
        assert_eq!(*snap.buckets.last().unwrap(), 2);
        assert_eq!(r.get(12345), Err(MetricError::NotFound));
        assert_eq!(
            r.define(MetricType::Counter, "new", 3),
            Err(MetricError::TooMany)
        );
        assert_eq!(r.define(MetricType::Counter, "c", 3).unwrap(), c);
    }

    #[test]
    fn tags_in_names_become_labels() {
        assert_eq!(
            split_tags("requests.method=GET.code=200"),
            (
                "requests".to_string(),
                vec![
                    ("method".to_string(), "GET".to_string()),
                    ("code".to_string(), "200".to_string())
                ]
            )
        );
        assert_eq!(split_tags("a.b").0, "a_b");
    }
}
