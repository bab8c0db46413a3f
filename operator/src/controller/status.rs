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
//! | Resolved | the current spec's module resolved, matched its sha256 and compiled (`Resolved`) | why not: `InvalidSpec`, `PullSecretNotFound`, `PullSecretMissingRegistry`, `PullSecretInvalid`, `PullUnauthorized`, `ImageNotFound`, `UnsupportedLayout`, `ModuleTooLarge`, `DigestMismatch`, `InvalidModule`, `RegistryUnavailable`, `ResolveFailed`, `UnsupportedSource` |
//! | Ready | every selected dataplane runs the current revision (`RolledOut`) | the resolve failure's reason, `NoDataplanes`, `Progressing`, `DataplanesRejected` |
//! | Degraded | an older module keeps running because the current spec failed (the failure's reason), or some dataplanes rejected the revision (`DataplanesRejected`) | `AsExpected` |
//!
//! `lastTransitionTime` changes only when a condition's status changes. Events are emitted on
//! transitions only (a reconcile that finds the same state emits nothing).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use wasmfilter_api::crd::{
    DataplaneFailure, DataplaneStatus, MAX_REPORTED_FAILURES, ResolvedModule, WasmFilterStatus,
};

use crate::index::Rollout;

pub const RESOLVED: &str = "Resolved";
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";

/// Condition reasons (CamelCase, machine-readable).
pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const UNSUPPORTED_SOURCE: &str = "UnsupportedSource";
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
            conditions,
        },
        events,
    )
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

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), 1024);
        assert!(s.len() <= 1024 && s.ends_with('…'), "{}", s.len());
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
