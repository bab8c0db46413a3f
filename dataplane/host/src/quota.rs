//! Per-filter quotas on the host resources a guest can grow, and the record of their
//! refusals: a counter per limit and a rate-limited log line (see [`crate::limits`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::limits::*;

/// The quotas of one filter, set per filter (the dataplane's `limits` block). Defaults are
/// the `DEFAULT_*` constants of [`crate::limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes (keys plus values) of the VM id's shared data.
    pub shared_data_bytes: usize,
    /// Bytes held by one shared queue.
    pub queue_bytes: usize,
    /// Items held by one shared queue.
    pub queue_items: usize,
    /// Metrics the filter may define.
    pub metrics: usize,
    /// Longest metric name.
    pub metric_name_bytes: usize,
    /// Fields the filter may put in one header or trailer map.
    pub header_count: usize,
    /// Bytes (names plus values) the filter may put in one header or trailer map.
    pub header_bytes: usize,
    /// Callouts outstanding per VM.
    pub pending_callouts: usize,
    /// Largest local reply body.
    pub local_reply_bytes: usize,
    /// Log records per second (all of the filter's VMs together).
    pub log_records_per_second: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            shared_data_bytes: DEFAULT_SHARED_DATA_BYTES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            queue_items: DEFAULT_QUEUE_ITEMS,
            metrics: DEFAULT_METRICS,
            metric_name_bytes: DEFAULT_METRIC_NAME_BYTES,
            header_count: DEFAULT_HEADER_COUNT,
            header_bytes: DEFAULT_HEADER_BYTES,
            pending_callouts: DEFAULT_PENDING_CALLOUTS,
            local_reply_bytes: DEFAULT_LOCAL_REPLY_BYTES,
            log_records_per_second: DEFAULT_LOG_RECORDS_PER_SECOND,
        }
    }
}

impl Quotas {
    /// The value of `limit` (0 for [`Limit::HeaderSyntax`], which is a rule, not a quota).
    pub fn value(&self, limit: Limit) -> u64 {
        (match limit {
            Limit::SharedDataBytes => self.shared_data_bytes,
            Limit::QueueBytes => self.queue_bytes,
            Limit::QueueItems => self.queue_items,
            Limit::Metrics => self.metrics,
            Limit::MetricNameBytes => self.metric_name_bytes,
            Limit::HeaderCount => self.header_count,
            Limit::HeaderBytes => self.header_bytes,
            Limit::PendingCallouts => self.pending_callouts,
            Limit::LocalReplyBytes => self.local_reply_bytes,
            Limit::LogRecordsPerSecond => self.log_records_per_second as usize,
            Limit::HeaderSyntax => 0,
        }) as u64
    }

    /// Checks every quota against its range; the error names the field (camelCase, as in the
    /// dataplane's `limits` block) and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        for limit in Limit::ALL {
            if limit == Limit::HeaderSyntax {
                continue;
            }
            let v = self.value(limit);
            let max = if limit.is_bytes() {
                MAX_QUOTA_BYTES
            } else {
                MAX_QUOTA_COUNT
            } as u64;
            let max = match limit {
                Limit::Metrics => MAX_METRICS_PER_PLUGIN as u64,
                Limit::PendingCallouts => MAX_PENDING_CALLOUTS as u64,
                _ => max,
            };
            if v == 0 || v > max {
                return Err(format!(
                    "limits.{} is {v}: it must be between 1 and {max}",
                    limit.name()
                ));
            }
        }
        Ok(())
    }
}

/// Which quota (or rule) refused a guest's request; its name is the `limits` field that
/// sets it and the `limit` label of the refusal counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    SharedDataBytes,
    QueueBytes,
    QueueItems,
    Metrics,
    MetricNameBytes,
    HeaderCount,
    HeaderBytes,
    PendingCallouts,
    LocalReplyBytes,
    LogRecordsPerSecond,
    /// Not a quota: a header name or value HTTP cannot carry (CR, LF, NUL, a bad
    /// pseudo-header, a name that is not a token).
    HeaderSyntax,
}

impl Limit {
    pub const ALL: [Limit; 11] = [
        Limit::SharedDataBytes,
        Limit::QueueBytes,
        Limit::QueueItems,
        Limit::Metrics,
        Limit::MetricNameBytes,
        Limit::HeaderCount,
        Limit::HeaderBytes,
        Limit::PendingCallouts,
        Limit::LocalReplyBytes,
        Limit::LogRecordsPerSecond,
        Limit::HeaderSyntax,
    ];

    /// The `limits` field name (camelCase), also the metric's `limit` label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::SharedDataBytes => "sharedDataBytes",
            Limit::QueueBytes => "queueBytes",
            Limit::QueueItems => "queueItems",
            Limit::Metrics => "metrics",
            Limit::MetricNameBytes => "metricNameBytes",
            Limit::HeaderCount => "headerCount",
            Limit::HeaderBytes => "headerBytes",
            Limit::PendingCallouts => "pendingCallouts",
            Limit::LocalReplyBytes => "localReplyBytes",
            Limit::LogRecordsPerSecond => "logRecordsPerSecond",
            Limit::HeaderSyntax => "headerSyntax",
        }
    }

    fn is_bytes(self) -> bool {
        matches!(
            self,
            Limit::SharedDataBytes
                | Limit::QueueBytes
                | Limit::MetricNameBytes
                | Limit::HeaderBytes
                | Limit::LocalReplyBytes
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When a limit's refusals were last logged, and how many were not logged since.
#[derive(Clone, Copy, Default)]
struct LogGate {
    last: Option<Instant>,
    suppressed: u64,
}

/// A token bucket for log records.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One filter's refusal counters, log gates and log-rate bucket, shared by all of the
/// filter's VMs (pass the same `Arc` in every [`crate::VmOptions`] of the filter).
pub struct QuotaState {
    refusals: [AtomicU64; Limit::ALL.len()],
    gates: Mutex<[LogGate; Limit::ALL.len()]>,
    bucket: Mutex<Option<Bucket>>,
}

impl Default for QuotaState {
    fn default() -> Self {
        QuotaState {
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            gates: Mutex::new([LogGate::default(); Limit::ALL.len()]),
            bucket: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for QuotaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.refusals()).finish()
    }
}

impl QuotaState {
    /// Refusals per limit so far (every limit, zeros included).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        Limit::ALL
            .iter()
            .map(|l| (l.name(), self.refusals[l.index()].load(Ordering::Relaxed)))
            .collect()
    }

    /// Refusals of one limit so far.
    pub fn count(&self, limit: Limit) -> u64 {
        self.refusals[limit.index()].load(Ordering::Relaxed)
    }

    /// Counts one refusal; `Some(n)` when a line should be logged now, `n` being the
    /// refusals not logged since the last line.
    pub(crate) fn refuse(&self, limit: Limit) -> Option<u64> {
        self.refusals[limit.index()].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut gates = self.gates.lock();
        let gate = &mut gates[limit.index()];
        match gate.last {
            Some(t) if now.duration_since(t) < QUOTA_LOG_INTERVAL => {
                gate.suppressed += 1;
                None
            }
            _ => {
                gate.last = Some(now);
                Some(std::mem::take(&mut gate.suppressed))
            }
        }
    }

    /// Takes one log record from the bucket (`rate` per second, burst `rate`).
    pub(crate) fn allow_log(&self, rate: u32) -> bool {
        let rate = f64::from(rate.max(1));
        let now = Instant::now();
        let mut bucket = self.bucket.lock();
        let b = bucket.get_or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_or_huge_values_are_named() {
        Quotas::default().validate().unwrap();
        let q = Quotas {
            header_count: 0,
            ..Default::default()
        };
        assert_eq!(
            q.validate().unwrap_err(),
            "limits.headerCount is 0: it must be between 1 and 1048576"
        );
        let q = Quotas {
            shared_data_bytes: 2 << 30,
            ..Default::default()
        };
        assert!(q.validate().unwrap_err().contains("sharedDataBytes"));
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_the_suppressed_count() {
        let s = QuotaState::default();
        assert_eq!(s.refuse(Limit::QueueBytes), Some(0));
        assert_eq!(s.refuse(Limit::QueueBytes), None);
        assert_eq!(s.refuse(Limit::QueueBytes), None);
        assert_eq!(s.refuse(Limit::HeaderCount), Some(0));
        assert_eq!(s.count(Limit::QueueBytes), 3);
        s.gates.lock()[Limit::QueueBytes.index()].last = None;
        assert_eq!(s.refuse(Limit::QueueBytes), Some(2));
    }

    #[test]
    fn the_log_bucket_allows_a_burst_of_rate_then_refuses() {
        let s = QuotaState::default();
        let allowed = (0..50).filter(|_| s.allow_log(10)).count();
        assert!((10..=11).contains(&allowed), "{allowed}");
    }
}
