//! What a WasmFilter's status should say, and which Events to emit, as a pure function of what
//! the reconcile found: [`compute`]. No clock (the caller passes `now`), no client.
//!
//! ```text
//!  spec ──resolve──► Resolution ─┐
//!  ControlPlane::rollout ────────┼──► compute ──► (WasmFilterStatus, Vec<EventSpec>)
//!  previous status, published ───┘
//! ```
//!
//! Conditions (metav1.Condition, one per type):
//!
//! | type | True | False (reason) |
//! |---|---|---|
//! | Resolved | the current spec's module resolved, matched its sha256 and compiled (`Resolved`) | why not: `InvalidSpec`, `PullSecretNotFound`, `PullSecretMissingRegistry`, `PullSecretInvalid`, `PullUnauthorized`, `ImageNotFound`, `UnsupportedLayout`, `ModuleTooLarge`, `DigestMismatch`, `InvalidModule`, `RegistryUnavailable`, `ResolveFailed`, `DownloadFailed` (module.url) |
//! | Ready | every selected dataplane runs the current revision (`RolledOut`) | the resolve failure's reason, `NoDataplanes`, `Progressing`, `DataplanesRejected`, `SnapshotBudgetExceeded` |
//! | Degraded | an older module keeps running because the current spec failed (the failure's reason), some dataplanes rejected the revision (`DataplanesRejected`), or some dataplanes' chains leave it out because their snapshot would pass `--snapshot-budget` (`SnapshotBudgetExceeded`) | `AsExpected` |
//!
//! `lastTransitionTime` changes only when a condition's status changes. Events are emitted on
//! transitions only (a reconcile that finds the same state emits nothing).

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use wasmfilter_api::crd::{
    DataplaneFailure, DataplaneStatus, MAX_REPORTED_FAILURES, ReportedStats, ResolvedModule,
    WasmFilterStatus,
};

use crate::control::StatsSummary;
use crate::index::Rollout;

pub const RESOLVED: &str = "Resolved";
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";

/// Condition reasons (CamelCase, machine-readable).
pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DOWNLOAD_FAILED: &str = "DownloadFailed";
    pub const PULL_SECRET_NOT_FOUND: &str = "PullSecretNotFound";
    pub const PULL_SECRET_MISSING_REGISTRY: &str = "PullSecretMissingRegistry";
    pub const PULL_SECRET_INVALID: &str = "PullSecretInvalid";
    pub const PULL_SECRET_UNREADABLE: &str = "PullSecretUnreadable";
    pub const PULL_UNAUTHORIZED: &str = "PullUnauthorized";
    pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
    pub const UNSUPPORTED_LAYOUT: &str = "UnsupportedLayout";
    pub const MODULE_TOO_LARGE: &str = "ModuleTooLarge";
    pub const DIGEST_MISMATCH: &str = "DigestMismatch";
    pub const INVALID_MODULE: &str = "InvalidModule";
    pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";
    pub const RESOLVE_FAILED: &str = "ResolveFailed";
    pub const ROLLED_OUT: &str = "RolledOut";
    pub const PROGRESSING: &str = "Progressing";
    pub const NO_DATAPLANES: &str = "NoDataplanes";
    pub const DATAPLANES_REJECTED: &str = "DataplanesRejected";
    /// The filter does not fit some selected dataplanes' snapshot budget and is left out of
    /// their chain (the other filters still roll out).
    pub const SNAPSHOT_BUDGET_EXCEEDED: &str = "SnapshotBudgetExceeded";
    pub const AS_EXPECTED: &str = "AsExpected";
}

/// Why the current spec could not be deployed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// A [`reason`] constant.
    pub reason: &'static str,
    /// For the user: names the field or the object at fault and the fix.
    pub message: String,
    /// Retrying later may help without a change to the spec (registry down, API error).
    pub transient: bool,
}

/// What the reconcile found out about the current spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// The spec resolved to a deployable version, published as `revision`.
    Resolved {
        module: ResolvedModule,
        revision: String,
    },
    Failed(Failure),
}

/// Everything [`compute`] looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// metadata.generation of the object reconciled.
    pub generation: i64,
    /// The status as it stands (the object's, or the one this operator wrote last).
    pub previous: Option<&'a WasmFilterStatus>,
    pub resolution: &'a Resolution,
    /// The module the selected dataplanes are told to run, if the filter is published: after
    /// a success the new one, after a failure the last good one (or none).
    pub published: Option<&'a ResolvedModule>,
    /// The published revision's rollout (default when nothing is published).
    pub rollout: &'a Rollout,
    /// The filter's latest stats, summed over the dataplanes that report it.
    pub stats: &'a StatsSummary,
    pub now: Time,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// An Event to publish about the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub kind: EventKind,
    /// CamelCase, the condition reason it reports.
    pub reason: String,
    /// What was done: `Resolve` or `Rollout`.
    pub action: &'static str,
    pub note: String,
}

/// The status the object should have, and the Events that report how it got there.
pub fn compute(input: &Input<'_>) -> (WasmFilterStatus, Vec<EventSpec>) {
    let Input {
        generation,
        previous,
        resolution,
        published,
        rollout,
        stats,
        now,
    } = input;
    let prev_conditions: &[Condition] = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let prev = |t: &str| prev_conditions.iter().find(|c| c.type_ == t);

    let resolved = match resolution {
        Resolution::Resolved { module, .. } => cond(
            RESOLVED,
            true,
            reason::RESOLVED,
            format!(
                "Resolved {} to module {}{}",
                module.resolved_from,
                module.digest,
                module
                    .manifest_digest
                    .as_ref()
                    .map(|m| format!(" (manifest {m})"))
                    .unwrap_or_default()
            ),
        ),
        Resolution::Failed(f) => cond(RESOLVED, false, f.reason, f.message.clone()),
    };

    let keeps_running = |m: &ResolvedModule| {
        format!(
            "the selected dataplanes keep running the last good module {} (from {})",
            m.digest, m.resolved_from
        )
    };
    let ready = match (resolution, published) {
        (Resolution::Failed(f), Some(old)) => cond(
            READY,
            false,
            f.reason,
            format!(
                "generation {generation} is not deployed: {}; {}",
                f.message,
                keeps_running(old)
            ),
        ),
        (Resolution::Failed(f), None) => cond(
            READY,
            false,
            f.reason,
            format!("generation {generation} is not deployed: {}", f.message),
        ),
        (Resolution::Resolved { revision, .. }, _) => rollout_condition(revision, rollout),
    };

    let degraded = match (resolution, published) {
        (Resolution::Failed(f), Some(old)) => cond(
            DEGRADED,
            true,
            f.reason,
            format!(
                "generation {generation} cannot be deployed ({}: {}); {}",
                f.reason,
                f.message,
                keeps_running(old)
            ),
        ),
        _ if rollout.over_budget > 0 => cond(
            DEGRADED,
            true,
            reason::SNAPSHOT_BUDGET_EXCEEDED,
            over_budget_message(rollout),
        ),
        _ if rollout.failed > 0 => cond(
            DEGRADED,
            true,
            reason::DATAPLANES_REJECTED,
            rejected_message(rollout),
        ),
        _ => cond(
            DEGRADED,
            false,
            reason::AS_EXPECTED,
            "No dataplane rejected the filter and no older version is kept running".into(),
        ),
    };

    let mut events = Vec::new();
    transition_events(&resolved, prev(RESOLVED), resolution, &mut events);
    // Announced when Ready becomes True, or when a new revision is Ready (a config change).
    if ready.status == "True"
        && let Resolution::Resolved { revision, .. } = resolution
        && !prev(READY)
            .is_some_and(|p| p.status == "True" && p.message.contains(&rev_tag(revision)))
    {
        events.push(EventSpec {
            kind: EventKind::Normal,
            reason: reason::ROLLED_OUT.into(),
            action: "Rollout",
            note: format!(
                "Rolled out revision {revision} to {} dataplane{}",
                rollout.selected,
                plural(rollout.selected)
            ),
        });
    }
    for (failure, message) in [
        (
            reason::DATAPLANES_REJECTED,
            rejected_message as fn(&Rollout) -> String,
        ),
        (reason::SNAPSHOT_BUDGET_EXCEEDED, over_budget_message),
    ] {
        if ready.reason == failure && prev(READY).is_none_or(|p| p.reason != failure) {
            events.push(EventSpec {
                kind: EventKind::Warning,
                reason: failure.into(),
                action: "Rollout",
                note: truncate(message(rollout), 1000),
            });
        }
    }

    let conditions = [resolved, ready, degraded]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = Some(*generation);
            c.last_transition_time = match prev(&c.type_) {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            c
        })
        .collect();

    let dataplanes = published.map(|_| DataplaneStatus {
        selected: clamp(rollout.selected),
        ready: clamp(rollout.ready),
        failed: clamp(rollout.failed),
        failures: rollout
            .failures
            .iter()
            .take(MAX_REPORTED_FAILURES)
            .map(|(dataplane, message)| DataplaneFailure {
                dataplane: dataplane.clone(),
                message: truncate(message.clone(), 1024),
            })
            .collect(),
    });

    (
        WasmFilterStatus {
            observed_generation: Some(*generation),
            module: published.cloned(),
            dataplanes,
            stats: reported_stats(stats, previous.and_then(|p| p.stats.as_ref()), now),
            conditions,
        },
        events,
    )
}

/// `status.stats` for `summary`: None while no dataplane reports the filter. When the figures
/// are those of `previous`, `previous` itself (its `updatedAt` kept), so unchanged stats never
/// make a status differ.
pub fn reported_stats(
    summary: &StatsSummary,
    previous: Option<&ReportedStats>,
    now: &Time,
) -> Option<ReportedStats> {
    if summary.dataplanes == 0 {
        return None;
    }
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let stats = ReportedStats {
        dataplanes: clamp(summary.dataplanes),
        invocations: count(summary.invocations),
        traps: count(summary.traps),
        fail_open_skips: count(summary.fail_open_skips),
        fail_closed: count(summary.fail_closed),
        vm_restarts: count(summary.vm_restarts),
        mean_callback_latency: mean_latency(summary.latency_sum_seconds, summary.latency_count),
        updated_at: now.clone(),
    };
    match previous {
        Some(p) if same_figures(Some(p), Some(&stats)) => Some(p.clone()),
        _ => Some(stats),
    }
}

/// Whether two `status.stats` put the filter in the same [`StatsState`].
pub fn same_stats_state(a: Option<&ReportedStats>, b: Option<&ReportedStats>) -> bool {
    StatsState::of(a) == StatsState::of(b)
}

/// Whether two `status.stats` say the same, whatever their `updatedAt`.
pub fn same_figures(a: Option<&ReportedStats>, b: Option<&ReportedStats>) -> bool {
    let strip = |s: &ReportedStats| ReportedStats {
        updated_at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ..s.clone()
    };
    a.map(strip) == b.map(strip)
}

/// A mean callback latency as a Go-style duration: `152µs` below a millisecond, `1.5ms` below
/// a second, `2.00s` above. None when no callback was counted.
pub fn mean_latency(sum_seconds: f64, count: u64) -> Option<String> {
    if count == 0 || !sum_seconds.is_finite() || sum_seconds < 0.0 {
        return None;
    }
    let mean = sum_seconds / count as f64;
    Some(if mean < 1e-3 {
        format!("{}µs", (mean * 1e6).round() as u64)
    } else if mean < 1.0 {
        format!("{:.1}ms", mean * 1e3)
    } else {
        format!("{mean:.2}s")
    })
}

/// Invocations per failure (trap or fail-closed refusal) at which a filter counts as failing
/// in [`StatsState`]: 1 in 100, i.e. 1%.
pub const FAILING_ONE_IN: u64 = 100;

/// What `status.stats` is written for: the state the figures put a filter in, not the figures.
/// Counters grow with every request, so a status that followed them would be rewritten for
/// every busy filter forever (1,000 filters every 10 s: 100 etcd writes and as many watch
/// events per second to every `kubectl get -w`, Argo CD and Flux); their growth belongs in
/// Prometheus, which the operator exports. The state changes only when something a reader of
/// the status would act on changes:
/// - how many dataplanes report the filter (stats appear, a dataplane joins or leaves);
/// - the first trap (or callback timeout), the first fail-closed refusal, the first VM restart
///   (each counter leaving zero, or returning to it when the dataplanes restarted);
/// - traps plus fail-closed refusals reaching 1 in [`FAILING_ONE_IN`] invocations, or falling
///   below it again (over the dataplanes' counters since they started).
///
/// A status written for another reason (rollout, conditions, module) carries the current
/// figures, whatever the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsState {
    pub dataplanes: i32,
    pub trapped: bool,
    pub failed_closed: bool,
    pub vm_restarted: bool,
    pub failing: bool,
}

impl StatsState {
    /// The state of `status.stats` (None while no dataplane reports the filter).
    pub fn of(stats: Option<&ReportedStats>) -> Option<StatsState> {
        let s = stats?;
        let failures = i128::from(s.traps) + i128::from(s.fail_closed);
        Some(StatsState {
            dataplanes: s.dataplanes,
            trapped: s.traps > 0,
            failed_closed: s.fail_closed > 0,
            vm_restarted: s.vm_restarts > 0,
            failing: failures > 0
                && failures * i128::from(FAILING_ONE_IN) >= i128::from(s.invocations),
        })
    }
}

/// What to do with a computed status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// It is the status already written.
    Unchanged,
    /// Only counters of `stats` moved, in the same [`StatsState`]: not written (the status as
    /// written stays the reference; the figures reach the status with the next write).
    CountersOnly,
    /// Write it now.
    Now,
    /// Only `stats` changed state and the previous write is too recent: look again after this
    /// long (nothing is written meanwhile).
    After(Duration),
}

/// The stats rule: a status that differs from the one written last only in `stats` is written
/// when the stats changed [state](StatsState), and then no sooner than `interval` after the
/// previous write; counters growing in the same state write nothing. Any other difference
/// (rollout counts, conditions, module) is written at once, with the latest figures.
/// `last_write` is when this process last wrote the filter's status (None: never, e.g. since it
/// started). The clock is the caller's, so this is deterministic.
pub fn write_decision(
    written: Option<&WasmFilterStatus>,
    new: &WasmFilterStatus,
    last_write: Option<Instant>,
    now: Instant,
    interval: Duration,
) -> Write {
    if written == Some(new) {
        return Write::Unchanged;
    }
    let without_stats = |s: &WasmFilterStatus| WasmFilterStatus {
        stats: None,
        ..s.clone()
    };
    let Some(written) = written.filter(|w| without_stats(w) == without_stats(new)) else {
        return Write::Now;
    };
    if same_stats_state(written.stats.as_ref(), new.stats.as_ref()) {
        return Write::CountersOnly;
    }
    match last_write.map(|t| t + interval) {
        Some(due) if due > now => Write::After(due - now),
        _ => Write::Now,
    }
}

fn rollout_condition(revision: &str, r: &Rollout) -> Condition {
    let tag = rev_tag(revision);
    if r.selected == 0 {
        cond(
            READY,
            false,
            reason::NO_DATAPLANES,
            format!("{tag}is published, but no connected dataplane matches spec.selector"),
        )
    } else if r.ready == r.selected {
        cond(
            READY,
            true,
            reason::ROLLED_OUT,
            format!(
                "{tag}runs on all {} selected dataplane{}",
                r.selected,
                plural(r.selected)
            ),
        )
    } else if r.over_budget > 0 {
        cond(
            READY,
            false,
            reason::SNAPSHOT_BUDGET_EXCEEDED,
            over_budget_message(r),
        )
    } else if r.failed > 0 {
        cond(
            READY,
            false,
            reason::DATAPLANES_REJECTED,
            rejected_message(r),
        )
    } else {
        cond(
            READY,
            false,
            reason::PROGRESSING,
            format!(
                "{tag}runs on {} of {} selected dataplanes; waiting for the others to apply it",
                r.ready, r.selected
            ),
        )
    }
}

/// "revision R " — also how a later reconcile recognises the revision a Ready message is about.
fn rev_tag(revision: &str) -> String {
    format!("revision {revision} ")
}

fn rejected_message(r: &Rollout) -> String {
    let first = r
        .failures
        .first()
        .map(|(dp, m)| format!("; {dp}: {m}"))
        .unwrap_or_default();
    format!(
        "{} of {} selected dataplanes rejected revision {} and keep running their previous version \
         (status.dataplanes.failures lists them){first}",
        r.failed,
        r.selected,
        r.revision.as_deref().unwrap_or("?"),
    )
}

/// The first budget failure names the dataplane, the sizes, the budget and the fix.
fn over_budget_message(r: &Rollout) -> String {
    let first = r
        .first_over_budget
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    format!(
        "revision {} is left out of the snapshots of {} of {} selected dataplanes, which would \
         pass the snapshot budget with it (status.dataplanes.failures lists them){first}",
        r.revision.as_deref().unwrap_or("?"),
        r.over_budget,
        r.selected,
    )
}

fn transition_events(
    resolved: &Condition,
    prev: Option<&Condition>,
    resolution: &Resolution,
    events: &mut Vec<EventSpec>,
) {
    match resolution {
        Resolution::Resolved { module, .. } => {
            if prev.is_none_or(|p| p.status != "True" || p.message != resolved.message) {
                events.push(EventSpec {
                    kind: EventKind::Normal,
                    reason: reason::RESOLVED.into(),
                    action: "Resolve",
                    note: format!(
                        "Resolved image {} to digest {}",
                        module.resolved_from, module.digest
                    ),
                });
            }
        }
        Resolution::Failed(f) => {
            if prev.is_none_or(|p| p.status != "False" || p.reason != f.reason) {
                events.push(EventSpec {
                    kind: EventKind::Warning,
                    reason: f.reason.into(),
                    action: "Resolve",
                    note: truncate(f.message.clone(), 1000),
                });
            }
        }
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: truncate(message, 32 * 1024),
        observed_generation: None,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn clamp(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with "…".
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn module(digest: &str) -> ResolvedModule {
        ResolvedModule {
            digest: format!("sha256:{digest}"),
            manifest_digest: Some("sha256:m".into()),
            resolved_from: "registry.test:5000/f:v1".into(),
            size: 42,
        }
    }

    fn resolved(digest: &str, revision: &str) -> Resolution {
        Resolution::Resolved {
            module: module(digest),
            revision: revision.into(),
        }
    }

    fn failed(reason: &'static str, message: &str) -> Resolution {
        Resolution::Failed(Failure {
            reason,
            message: message.into(),
            transient: false,
        })
    }

    fn rollout(selected: u32, ready: u32, failed: u32) -> Rollout {
        Rollout {
            revision: Some("r1".into()),
            selected,
            ready,
            failed,
            over_budget: 0,
            first_over_budget: None,
            failures: (0..failed)
                .map(|i| {
                    (
                        format!("node-{i}"),
                        format!("proxy_on_configure returned false ({i})"),
                    )
                })
                .collect(),
        }
    }

    fn get<'a>(s: &'a WasmFilterStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn run(
        generation: i64,
        previous: Option<&WasmFilterStatus>,
        resolution: &Resolution,
        published: Option<&ResolvedModule>,
        rollout: &Rollout,
        now: i64,
    ) -> (WasmFilterStatus, Vec<EventSpec>) {
        compute(&Input {
            generation,
            previous,
            resolution,
            published,
            rollout,
            stats: &StatsSummary::default(),
            now: at(now),
        })
    }

    #[test]
    fn a_resolved_filter_rolled_out_everywhere_is_ready_and_says_so_once() {
        let m = module("aa");
        let r = resolved("aa", "r1");
        let (s, events) = run(3, None, &r, Some(&m), &rollout(2, 2, 0), 100);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.module.as_ref().unwrap().digest, "sha256:aa");
        let dp = s.dataplanes.as_ref().unwrap();
        assert_eq!((dp.selected, dp.ready, dp.failed), (2, 2, 0));
        let c = get(&s, RESOLVED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Resolved"));
        assert!(c.message.contains("sha256:aa"), "{}", c.message);
        let c = get(&s, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "RolledOut")
        );
        assert_eq!(c.message, "revision r1 runs on all 2 selected dataplanes");
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.last_transition_time == at(100))
        );
        let notes: Vec<_> = events.iter().map(|e| (e.kind, e.note.as_str())).collect();
        assert_eq!(
            notes,
            [
                (
                    EventKind::Normal,
                    "Resolved image registry.test:5000/f:v1 to digest sha256:aa"
                ),
                (EventKind::Normal, "Rolled out revision r1 to 2 dataplanes"),
            ]
        );

        // The same state again: the same status (timestamps kept), no events.
        let (again, events) = run(3, Some(&s), &r, Some(&m), &rollout(2, 2, 0), 200);
        assert_eq!(again, s);
        assert!(events.is_empty(), "{events:?}");

        // A third dataplane joins and applies it: counts change, no new event, time kept.
        let (more, events) = run(3, Some(&s), &r, Some(&m), &rollout(3, 3, 0), 300);
        assert_eq!(more.dataplanes.as_ref().unwrap().selected, 3);
        assert_eq!(get(&more, READY).last_transition_time, at(100));
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn progress_then_rejection_then_recovery() {
        let m = module("aa");
        let r = resolved("aa", "r1");
        let (s, _) = run(1, None, &r, Some(&m), &rollout(3, 1, 0), 10);
        let c = get(&s, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Progressing")
        );
        assert!(c.message.contains("1 of 3"), "{}", c.message);

        let (s2, events) = run(1, Some(&s), &r, Some(&m), &rollout(3, 1, 2), 20);
        let c = get(&s2, READY);
        assert_eq!(c.reason, "DataplanesRejected");
        assert_eq!(c.last_transition_time, at(10), "still False: time kept");
        assert!(
            c.message.contains("node-0: proxy_on_configure"),
            "{}",
            c.message
        );
        let d = get(&s2, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "DataplanesRejected")
        );
        assert_eq!(d.last_transition_time, at(20));
        assert_eq!(s2.dataplanes.as_ref().unwrap().failures.len(), 2);
        assert_eq!(
            events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["DataplanesRejected"]
        );
        // Still rejected on the next reconcile: no second warning.
        let (_, events) = run(1, Some(&s2), &r, Some(&m), &rollout(3, 1, 2), 25);
        assert!(events.is_empty(), "{events:?}");

        // A fixed spec (new revision) rolls out everywhere.
        let r2 = resolved("bb", "r2");
        let m2 = module("bb");
        let mut ro = rollout(3, 3, 0);
        ro.revision = Some("r2".into());
        let (s3, events) = run(2, Some(&s2), &r2, Some(&m2), &ro, 30);
        assert_eq!(get(&s3, READY).status, "True");
        assert_eq!(get(&s3, DEGRADED).status, "False");
        assert!(s3.dataplanes.as_ref().unwrap().failures.is_empty());
        let reasons: Vec<_> = events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["Resolved", "RolledOut"]);
    }

    #[test]
    fn a_filter_left_out_for_the_snapshot_budget_says_so_and_how_to_fix_it() {
        let m = module("aa");
        let r = resolved("aa", "r1");
        let message = "the chain for dataplane node-0 would be 40000 bytes, over the snapshot \
                       budget of 30000 bytes (--snapshot-budget); this filter adds 12000 bytes";
        let mut ro = rollout(3, 2, 0);
        ro.failed = 1;
        ro.over_budget = 1;
        ro.failures = vec![("node-0".into(), message.into())];
        ro.first_over_budget = Some(message.into());
        let (s, events) = run(1, None, &r, Some(&m), &ro, 10);
        let c = get(&s, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "SnapshotBudgetExceeded")
        );
        assert_eq!(
            c.message,
            format!(
                "revision r1 is left out of the snapshots of 1 of 3 selected dataplanes, which \
                 would pass the snapshot budget with it (status.dataplanes.failures lists them): \
                 {message}"
            )
        );
        let d = get(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SnapshotBudgetExceeded")
        );
        let dp = s.dataplanes.as_ref().unwrap();
        assert_eq!((dp.selected, dp.ready, dp.failed), (3, 2, 1));
        assert_eq!(dp.failures[0].message, message);
        let warnings: Vec<_> = events
            .iter()
            .filter(|e| e.kind == EventKind::Warning)
            .map(|e| (e.reason.as_str(), e.note.as_str()))
            .collect();
        assert_eq!(warnings, [("SnapshotBudgetExceeded", c.message.as_str())]);
        // Still over budget on the next reconcile: no second warning.
        let (_, events) = run(1, Some(&s), &r, Some(&m), &ro, 20);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn a_new_revision_while_ready_is_announced() {
        let m = module("aa");
        let (s, _) = run(
            1,
            None,
            &resolved("aa", "r1"),
            Some(&m),
            &rollout(1, 1, 0),
            1,
        );
        // A config change: same module, new revision, applied everywhere before the reconcile.
        let mut ro = rollout(1, 1, 0);
        ro.revision = Some("r2".into());
        let (s2, events) = run(2, Some(&s), &resolved("aa", "r2"), Some(&m), &ro, 2);
        assert_eq!(get(&s2, READY).last_transition_time, at(1));
        assert_eq!(
            events.iter().map(|e| e.note.as_str()).collect::<Vec<_>>(),
            ["Rolled out revision r2 to 1 dataplane"]
        );
    }

    #[test]
    fn no_matching_dataplane_is_not_ready() {
        let m = module("aa");
        let (s, events) = run(
            1,
            None,
            &resolved("aa", "r1"),
            Some(&m),
            &rollout(0, 0, 0),
            1,
        );
        let c = get(&s, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoDataplanes")
        );
        assert!(c.message.contains("spec.selector"), "{}", c.message);
        assert_eq!(
            s.dataplanes,
            Some(DataplaneStatus {
                selected: 0,
                ready: 0,
                failed: 0,
                failures: vec![]
            })
        );
        assert_eq!(events.len(), 1, "only Resolved: {events:?}");
    }

    #[test]
    fn a_failure_with_nothing_running_says_why_and_shows_no_module() {
        let f = failed(
            reason::PULL_SECRET_NOT_FOUND,
            "module.pullSecret: Secret \"regcred\" not found in namespace \"team-a\"",
        );
        let (s, events) = run(1, None, &f, None, &Rollout::default(), 5);
        assert_eq!(s.module, None);
        assert_eq!(s.dataplanes, None);
        let c = get(&s, RESOLVED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "PullSecretNotFound")
        );
        let c = get(&s, READY);
        assert_eq!(c.reason, "PullSecretNotFound");
        assert!(c.message.contains("regcred"), "{}", c.message);
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Warning);
        assert_eq!(events[0].reason, "PullSecretNotFound");
        // The same failure again: no new event.
        let (s2, events) = run(1, Some(&s), &f, None, &Rollout::default(), 6);
        assert_eq!(s2, s);
        assert!(events.is_empty());
        // Another failure: a new warning.
        let g = failed(reason::REGISTRY_UNAVAILABLE, "cannot reach registry");
        let (_, events) = run(1, Some(&s2), &g, None, &Rollout::default(), 7);
        assert_eq!(events[0].reason, "RegistryUnavailable");
    }

    #[test]
    fn a_failing_new_spec_keeps_the_old_module_and_says_degraded() {
        let m = module("aa");
        let (s, _) = run(
            1,
            None,
            &resolved("aa", "r1"),
            Some(&m),
            &rollout(2, 2, 0),
            1,
        );
        let f = failed(
            reason::DIGEST_MISMATCH,
            "sha256 mismatch: expected sha256:bb, the module is sha256:cc",
        );
        let (s2, events) = run(2, Some(&s), &f, Some(&m), &rollout(2, 2, 0), 2);
        assert_eq!(s2.observed_generation, Some(2));
        assert_eq!(
            s2.module.as_ref().unwrap().digest,
            "sha256:aa",
            "last good module"
        );
        let c = get(&s2, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "DigestMismatch")
        );
        assert!(
            c.message
                .contains("keep running the last good module sha256:aa"),
            "{}",
            c.message
        );
        let d = get(&s2, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "DigestMismatch")
        );
        assert!(
            d.message.starts_with("generation 2 cannot be deployed"),
            "{}",
            d.message
        );
        assert_eq!(
            events
                .iter()
                .map(|e| (e.kind, e.reason.as_str()))
                .collect::<Vec<_>>(),
            [(EventKind::Warning, "DigestMismatch")]
        );
    }

    fn summary(dataplanes: u32, invocations: u64) -> StatsSummary {
        StatsSummary {
            dataplanes,
            invocations,
            traps: 2,
            fail_open_skips: 1,
            fail_closed: 3,
            vm_restarts: 1,
            latency_count: 4,
            latency_sum_seconds: 0.000_608,
        }
    }

    #[test]
    fn stats_are_summed_figures_whose_time_moves_only_when_they_change() {
        assert_eq!(reported_stats(&StatsSummary::default(), None, &at(1)), None);
        let s = reported_stats(&summary(2, 10), None, &at(1)).unwrap();
        assert_eq!(
            s,
            ReportedStats {
                dataplanes: 2,
                invocations: 10,
                traps: 2,
                fail_open_skips: 1,
                fail_closed: 3,
                vm_restarts: 1,
                mean_callback_latency: Some("152µs".into()),
                updated_at: at(1),
            }
        );
        // Same figures later: the previous stats, time kept.
        assert_eq!(
            reported_stats(&summary(2, 10), Some(&s), &at(9)),
            Some(s.clone())
        );
        // New figures: new time.
        let s2 = reported_stats(&summary(2, 11), Some(&s), &at(9)).unwrap();
        assert_eq!((s2.invocations, s2.updated_at.clone()), (11, at(9)));
        // Every dataplane gone: no stats.
        assert_eq!(
            reported_stats(&StatsSummary::default(), Some(&s2), &at(10)),
            None
        );
    }

    #[test]
    fn mean_latency_reads_like_a_duration() {
        assert_eq!(mean_latency(0.0, 0), None);
        assert_eq!(mean_latency(0.000_152, 1).as_deref(), Some("152µs"));
        assert_eq!(mean_latency(0.003, 2).as_deref(), Some("1.5ms"));
        assert_eq!(mean_latency(4.0, 2).as_deref(), Some("2.00s"));
        assert_eq!(mean_latency(f64::NAN, 2), None);
    }

    fn figures(dataplanes: u32, invocations: u64, traps: u64, fail_closed: u64) -> StatsSummary {
        StatsSummary {
            dataplanes,
            invocations,
            traps,
            fail_closed,
            latency_count: invocations,
            latency_sum_seconds: invocations as f64 * 0.000_1,
            ..Default::default()
        }
    }

    #[test]
    fn the_stats_state_is_reporting_dataplanes_first_failures_and_the_failure_rate() {
        let state = |s: StatsSummary| StatsState::of(reported_stats(&s, None, &at(1)).as_ref());
        assert_eq!(state(StatsSummary::default()), None);
        let clean = state(figures(2, 1000, 0, 0)).unwrap();
        assert_eq!(
            clean,
            StatsState {
                dataplanes: 2,
                trapped: false,
                failed_closed: false,
                vm_restarted: false,
                failing: false,
            }
        );
        assert_eq!(
            state(figures(2, 1_000_000, 0, 0)),
            Some(clean),
            "counters alone"
        );
        assert_ne!(
            state(figures(3, 1000, 0, 0)),
            Some(clean),
            "a dataplane joins"
        );
        let one_trap = state(figures(2, 1000, 1, 0)).unwrap();
        assert!(one_trap.trapped && !one_trap.failing, "{one_trap:?}");
        // 1% of invocations, traps and fail-closed refusals together: failing; below: not.
        assert!(state(figures(2, 1000, 6, 4)).unwrap().failing);
        assert!(!state(figures(2, 1001, 6, 4)).unwrap().failing);
        let restarted = StatsSummary {
            vm_restarts: 1,
            ..figures(2, 1000, 0, 0)
        };
        assert!(state(restarted).unwrap().vm_restarted);
    }

    /// The stats rule with a clock of our own: counters growing write nothing, however long;
    /// a state change writes, at most once per interval after the previous write; anything
    /// else writes at once, with the current figures.
    #[test]
    fn stats_write_on_a_state_change_at_most_once_per_interval_and_other_changes_at_once() {
        const TEN: Duration = Duration::from_secs(10);
        let m = module("aa");
        let r = resolved("aa", "r1");
        let with_stats = |prev: Option<&WasmFilterStatus>, ro: &Rollout, st: &StatsSummary, now| {
            compute(&Input {
                generation: 1,
                previous: prev,
                resolution: &r,
                published: Some(&m),
                rollout: ro,
                stats: st,
                now: at(now),
            })
            .0
        };
        let t0 = Instant::now();
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let ready = rollout(2, 2, 0);

        // The first status: written at once.
        let s0 = with_stats(None, &ready, &figures(2, 0, 0, 0), 0);
        assert_eq!(write_decision(None, &s0, None, t0, TEN), Write::Now);
        let mut written = s0;
        let mut last_write = t0;
        let mut writes = Vec::new();
        let mut step = |n: u64, st: StatsSummary, written: &mut WasmFilterStatus| {
            let s = with_stats(Some(written), &ready, &st, n as i64);
            let decision = write_decision(Some(written), &s, Some(last_write), secs(n), TEN);
            match decision {
                Write::Now => {
                    writes.push(n);
                    *written = s;
                    last_write = secs(n);
                }
                Write::After(d) => assert_eq!(last_write + TEN, secs(n) + d, "due 10 s after"),
                Write::CountersOnly | Write::Unchanged => {}
            }
            decision
        };

        // Traffic for 60 s, a report every second: counters only, nothing written.
        for n in 1..=60 {
            let d = step(n, figures(2, n * 1000, 0, 0), &mut written);
            assert_eq!(d, Write::CountersOnly, "at {n} s");
        }
        // The first trap: written at once (the previous write is old), with the figures then.
        assert_eq!(step(61, figures(2, 61_000, 1, 0), &mut written), Write::Now);
        assert_eq!(written.stats.as_ref().unwrap().invocations, 61_000);
        assert_eq!(written.stats.as_ref().unwrap().traps, 1);
        // The first fail-closed refusal 1 s later: due 10 s after the previous write.
        assert_eq!(
            step(62, figures(2, 62_000, 1, 1), &mut written),
            Write::After(Duration::from_secs(9))
        );
        // A burst of 1,000 traps at 63 s: failing (≥ 1% of invocations) until traffic grows
        // past 100,100 invocations at 101 s. Each state change waits for the interval, and
        // what is written is the figures of then.
        for n in 63..=120 {
            step(n, figures(2, n * 1000, 1000, 1), &mut written);
        }
        assert_eq!(writes, [61, 71, 101]);
        assert!(!StatsState::of(written.stats.as_ref()).unwrap().failing);
        assert_eq!(written.stats.as_ref().unwrap().invocations, 101_000);

        // The same figures again: nothing to write, whenever.
        let same = with_stats(Some(&written), &ready, &figures(2, 101_000, 1000, 1), 121);
        assert_eq!(
            write_decision(Some(&written), &same, Some(last_write), secs(121), TEN),
            Write::Unchanged
        );

        // A rollout change 1 s after a stats write: written at once, with the latest figures.
        let progressing = rollout(3, 2, 0);
        let s = with_stats(
            Some(&written),
            &progressing,
            &figures(3, 102_000, 1000, 1),
            102,
        );
        assert_eq!(
            write_decision(Some(&written), &s, Some(last_write), secs(102), TEN),
            Write::Now
        );
        assert_eq!(s.stats.as_ref().unwrap().invocations, 102_000);
        assert_eq!(s.dataplanes.as_ref().unwrap().selected, 3);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), 1024);
        assert!(s.len() <= 1024 && s.ends_with('…'), "{}", s.len());
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
