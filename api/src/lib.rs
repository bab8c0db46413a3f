//! The shared contract between the operator and the dataplane: how a filter is ordered in a
//! chain, which requests it applies to, what happens when it fails, which dataplanes run it
//! and where its module comes from. The WasmFilter CRD types live in [`crd`] (and the
//! control-plane proto will live here too); both sides convert into these domain types.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod crd;

/// The control protocol between the operator and the dataplanes (proto/wasmfilter/control/
/// v1alpha1/control.proto): generated messages and the FilterDiscovery client and server.
pub mod control {
    #![allow(clippy::all, missing_docs)]
    include!("proto/wasmfilter.control.v1alpha1.rs");
}

/// Where a filter sits in the chain; phases run in this order, then by priority (higher
/// first), then by name, so the order never depends on the order of creation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Phase {
    Authn,
    Authz,
    Stats,
    #[default]
    Default,
}

/// What a request sees when its filter cannot run (a trap, a timeout, a VM being rebuilt).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// Answer 503: the filter guards something, so no filter means no access.
    #[default]
    FailClosed,
    /// Skip the filter and count the skip: the filter only observes or decorates.
    FailOpen,
}

/// Which requests a filter applies to. Every non-empty list must match; empty matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Exact hosts (`:authority` without the port), or `*.suffix` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Upper-case methods.
    #[serde(default)]
    pub methods: Vec<String>,
}

impl RequestMatch {
    pub fn matches(&self, host: &str, path: &str, method: &str) -> bool {
        let host = host_without_port(host);
        (self.hosts.is_empty() || self.hosts.iter().any(|h| host_matches(h, host)))
            && (self.path_prefixes.is_empty()
                || self
                    .path_prefixes
                    .iter()
                    .any(|p| path.starts_with(p.as_str())))
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The sort key of a filter in a chain: phase, then priority (higher first), then name.
pub fn chain_order(
    phase: Phase,
    priority: i32,
    name: &str,
) -> (Phase, std::cmp::Reverse<i32>, String) {
    (phase, std::cmp::Reverse(priority), name.to_string())
}

/// Resource limits of one filter's VMs, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterLimits {
    /// Cap on the linear memory of each VM instance, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock budget of one proxy-wasm callback.
    pub callback_timeout: Duration,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            memory_bytes: 64 << 20,
            callback_timeout: Duration::from_millis(100),
        }
    }
}

/// Parses a byte size as the WasmFilter CRD and the dataplane config write it: a whole
/// number with an optional `Ki`, `Mi` or `Gi` suffix (`64Mi`, `512Ki`, `1048576`).
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let (num, mult) = if let Some(n) = text.strip_suffix("Gi") {
        (n, 1u64 << 30)
    } else if let Some(n) = text.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = text.strip_suffix("Ki") {
        (n, 1 << 10)
    } else {
        (text, 1)
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| num.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {text:?}: expected a whole number with an optional Ki, Mi or Gi suffix, like 64Mi"))
}

/// Parses a duration as the WasmFilter CRD and the dataplane config write it: a whole number
/// with the unit `ms`, `s` or `m` (`250ms`, `5s`, `1m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!(
            "invalid duration {text:?}: expected a whole number with a unit, like 250ms, 5s or 1m"
        )
    })?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid duration {text:?}: too long")),
        _ => Err(format!(
            "invalid duration {text:?}: the unit must be ms, s or m"
        )),
    }
}

/// Which dataplanes run a filter, by their labels (the labels a dataplane announces in its
/// Hello). The semantics of a Kubernetes label selector: every `match_labels` entry and every
/// expression must hold; an empty selector selects every dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| match e {
                LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                LabelRequirement::Exists(k) => labels.contains_key(k),
                LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// Where a filter's module comes from, as the operator resolves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleLocation {
    /// An OCI artifact: `reference` is `registry/repository:tag`, `registry/repository@sha256:…`
    /// or both.
    Image {
        reference: String,
        pull_secret: Option<String>,
        /// Re-resolve the tag periodically instead of once per spec change.
        always_pull: bool,
        /// Expected sha256 of the module bytes, lower-case hex.
        sha256: Option<String>,
    },
    /// A plain download; the sha256 of the module bytes is mandatory.
    Url { url: String, sha256: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_match_matches_everything_and_lists_must_all_match() {
        assert!(RequestMatch::default().matches("a", "/", "GET"));
        let m = RequestMatch {
            hosts: vec!["*.example.com".into(), "api.test".into()],
            path_prefixes: vec!["/v1".into()],
            methods: vec!["POST".into()],
        };
        assert!(m.matches("x.example.com:8080", "/v1/a", "post"));
        assert!(m.matches("api.test", "/v1", "POST"));
        assert!(
            !m.matches("example.com", "/v1", "POST"),
            "wildcard needs a subdomain"
        );
        assert!(!m.matches("api.test", "/v2", "POST"));
        assert!(!m.matches("api.test", "/v1", "GET"));
    }

    #[test]
    fn chains_order_by_phase_then_priority_then_name() {
        let mut filters = [
            (Phase::Default, 0, "z"),
            (Phase::Authn, 0, "b"),
            (Phase::Authn, 10, "c"),
            (Phase::Authn, 0, "a"),
            (Phase::Stats, 5, "s"),
        ];
        filters.sort_by_key(|(p, pr, n)| chain_order(*p, *pr, n));
        let names: Vec<&str> = filters.iter().map(|f| f.2).collect();
        assert_eq!(names, ["c", "a", "b", "s", "z"]);
    }

    #[test]
    fn phases_read_as_written_in_yaml() {
        let p: Phase = serde_json::from_str("\"Authz\"").unwrap();
        assert_eq!(p, Phase::Authz);
        assert_eq!(
            serde_json::to_string(&FailurePolicy::FailOpen).unwrap(),
            "\"FailOpen\""
        );
    }

    #[test]
    fn quantities_and_durations_parse_as_the_crd_writes_them() {
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("512Ki"), Ok(512 << 10));
        assert_eq!(parse_quantity("1048576"), Ok(1 << 20));
        for bad in [
            "",
            "Mi",
            "1.5Mi",
            "-1Mi",
            "+1Mi",
            "64MB",
            "64 Mi",
            "99999999999999999999Gi",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "ms", "1h", "1.5s", "-1s", "100"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let labels: BTreeMap<String, String> = [
            ("gateway".into(), "public".into()),
            ("zone".into(), "a".into()),
        ]
        .into();
        assert!(LabelSelector::default().matches(&labels));
        assert!(LabelSelector::default().matches(&BTreeMap::new()));
        let sel = |match_labels: &[(&str, &str)], match_expressions: Vec<LabelRequirement>| {
            LabelSelector {
                match_labels: match_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions,
            }
        };
        assert!(sel(&[("gateway", "public")], vec![]).matches(&labels));
        assert!(!sel(&[("gateway", "internal")], vec![]).matches(&labels));
        let zone = |vs: &[&str]| vs.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        assert!(
            sel(
                &[],
                vec![LabelRequirement::In("zone".into(), zone(&["a", "b"]))]
            )
            .matches(&labels)
        );
        assert!(
            !sel(&[], vec![LabelRequirement::In("zone".into(), zone(&["b"]))]).matches(&labels)
        );
        assert!(
            !sel(&[], vec![LabelRequirement::In("rack".into(), zone(&["a"]))]).matches(&labels)
        );
        assert!(
            sel(
                &[],
                vec![LabelRequirement::NotIn("rack".into(), zone(&["a"]))]
            )
            .matches(&labels)
        );
        assert!(
            !sel(
                &[],
                vec![LabelRequirement::NotIn("zone".into(), zone(&["a"]))]
            )
            .matches(&labels)
        );
        assert!(sel(&[], vec![LabelRequirement::Exists("zone".into())]).matches(&labels));
        assert!(!sel(&[], vec![LabelRequirement::DoesNotExist("zone".into())]).matches(&labels));
    }
}
