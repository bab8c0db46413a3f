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
//! | Ready | every selected dataplane runs the current revision (`RolledOut`) | the resolve failure's reason, `NoDataplanes`, `Progressing`, `DataplanesRejected` |
//! | Degraded | an older module keeps running because the current spec failed (the failure's reason), or some dataplanes rejected the revision (`DataplanesRejected`) | `AsExpected` |
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
    if ready.reason == reason::DATAPLANES_REJECTED
        && prev(READY).is_none_or(|p| p.reason != reason::DATAPLANES_REJECTED)
    {
        events.push(EventSpec {
            kind: EventKind::Warning,
            reason: reason::DATAPLANES_REJECTED.into(),
            action: "Rollout",
            note: truncate(rejected_message(rollout), 1000),
        });
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

/// What to do with a computed status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// It is the status already written.
    Unchanged,
    /// Write it now.
    Now,
    /// Only `stats` changed and the previous write is too recent: look again after this long
    /// (nothing is written meanwhile).
    After(Duration),
}

/// The stats rate limit: a status that differs from the one written last only in `stats` is
/// written no sooner than `interval` after that write; any other difference (rollout counts,
/// conditions, module) is written at once, with the latest stats. `last_write` is when this
/// process last wrote the filter's status (None: never, e.g. since it started). The clock is
/// the caller's, so this is deterministic.
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
    if written.map(without_stats) != Some(without_stats(new)) {
        return Write::Now;
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

    /// The rate limit with a clock of our own: stats alone write at most once per interval
    /// after the previous write; anything else writes at once.
    #[test]
    fn stats_alone_write_at_most_once_per_interval_and_other_changes_at_once() {
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
        let s0 = with_stats(None, &ready, &summary(2, 0), 0);
        assert_eq!(write_decision(None, &s0, None, t0, TEN), Write::Now);
        let mut written = s0;
        let mut last_write = t0;

        // A report every second for 25 s, each with new figures: writes at 10 s and 20 s only.
        let mut writes = Vec::new();
        for n in 1..=25 {
            let s = with_stats(Some(&written), &ready, &summary(2, n * 100), n as i64);
            match write_decision(Some(&written), &s, Some(last_write), secs(n), TEN) {
                Write::Now => {
                    writes.push(n);
                    written = s;
                    last_write = secs(n);
                }
                Write::After(d) => assert_eq!(last_write + TEN, secs(n) + d, "due 10 s after"),
                Write::Unchanged => panic!("figures changed at {n}"),
            }
        }
        assert_eq!(writes, [10, 20]);
        assert_eq!(written.stats.as_ref().unwrap().invocations, 2000);

        // The same figures again: nothing to write, whenever.
        let same = with_stats(Some(&written), &ready, &summary(2, 2000), 21);
        assert_eq!(
            write_decision(Some(&written), &same, Some(last_write), secs(21), TEN),
            Write::Unchanged
        );

        // A rollout change 1 s after a stats write: written at once, with the latest stats.
        let progressing = rollout(3, 2, 0);
        let s = with_stats(Some(&written), &progressing, &summary(3, 2500), 21);
        assert_eq!(
            write_decision(Some(&written), &s, Some(last_write), secs(21), TEN),
            Write::Now
        );
        assert_eq!(s.stats.as_ref().unwrap().invocations, 2500);
        assert_eq!(s.dataplanes.as_ref().unwrap().selected, 3);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), 1024);
        assert!(s.len() <= 1024 && s.ends_with('…'), "{}", s.len());
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
