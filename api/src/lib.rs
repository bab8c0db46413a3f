//! The shared contract between the operator and the dataplane: how a filter is ordered in a
//! chain, which requests it applies to, and what happens when it fails. The WasmFilter CRD
//! types and the control-plane proto will live here too; both sides convert into these.

use serde::{Deserialize, Serialize};

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
}
