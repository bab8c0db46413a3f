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

/// Which traffic a plugin sees: proxy-wasm's three plugin shapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PluginType {
    /// An HTTP filter: a stream context per HTTP request on the HTTP listeners its `match`
    /// accepts.
    #[default]
    HTTP,
    /// A network filter: a stream context per TCP connection on the TCP listeners it names
    /// (all of them when it names none). Istio's `NETWORK` is accepted.
    #[serde(alias = "NETWORK")]
    Network,
    /// A service plugin: a root context only, started once per dataplane process, for ticks,
    /// callouts, shared data and queues; never given a stream (Envoy's `envoy.bootstrap.wasm`).
    #[serde(alias = "SERVICE")]
    Service,
}

/// Which requests a filter (or a route) applies to. Every non-empty list must match; empty
/// matches all.
///
/// The dataplane normalises a request before matching it (and forwards what it matched): the
/// path is percent-decoded where that is safe, has its dot segments removed and its slashes
/// merged; the host is compared without port or trailing dot and ignoring case. So a scope
/// written here cannot be stepped around by spelling the same resource differently.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Host patterns, compared with the request's `:authority` (or `Host`) without its port or
    /// trailing dot, ignoring case. Envoy's forms: an exact name (`api.example.com`), `*` (any
    /// host), a suffix wildcard (`*.example.com`, `*-edge.example.com`: the `*` stands for at
    /// least one character) or a prefix wildcard (`api.*`, `api-*`). See
    /// [`normalize_host_pattern`].
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Prefixes of the normalised path (`/api/` also matches `/api/v1`; `/api` also `/apis`).
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Upper-case methods.
    #[serde(default)]
    pub methods: Vec<String>,
}

impl RequestMatch {
    /// `host` as the client sent it (port, trailing dot and case do not matter); `path`
    /// already normalised, without the query.
    pub fn matches(&self, host: &str, path: &str, method: &str) -> bool {
        let host = host_for_matching(host);
        (self.hosts.is_empty() || self.hosts.iter().any(|h| host_matches(h, host)))
            && (self.path_prefixes.is_empty()
                || self
                    .path_prefixes
                    .iter()
                    .any(|p| path.starts_with(p.as_str())))
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }

    /// The same match with every host pattern normalised ([`normalize_host_pattern`]) and
    /// every path prefix checked ([`check_path_prefix`]). A pattern that could never match a
    /// request is refused: the error is the field (`hosts[1]`) and the reason with the fix.
    pub fn normalized(&self) -> Result<RequestMatch, (String, String)> {
        let hosts = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| normalize_host_pattern(h).map_err(|e| (format!("hosts[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, p) in self.path_prefixes.iter().enumerate() {
            check_path_prefix(p).map_err(|e| (format!("pathPrefixes[{i}]"), e))?;
        }
        Ok(RequestMatch {
            hosts,
            path_prefixes: self.path_prefixes.clone(),
            methods: self.methods.clone(),
        })
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

/// The host part that patterns compare with: no port, no trailing dot (`A.example.com.:80`
/// → `A.example.com`; case is ignored by the comparison itself, so nothing is allocated).
pub fn host_for_matching(host: &str) -> &str {
    let host = host_without_port(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// A host pattern as it is compared: lower-case, without a trailing dot. Refused (with the
/// reason and the fix) when it could never match a request's host: empty, with a port, with a
/// `*` anywhere but alone, first or last, with an empty label (`a..b`) or with a character a
/// host name cannot hold.
pub fn normalize_host_pattern(pattern: &str) -> Result<String, String> {
    let lower = pattern.trim().to_ascii_lowercase();
    let p = lower.strip_suffix('.').unwrap_or(&lower);
    if p == "*" {
        return Ok(p.to_string());
    }
    let forms = "use an exact name (api.example.com), * , a suffix wildcard (*.example.com, *-edge.example.com) or a prefix wildcard (api.*)";
    if p.is_empty() {
        return Err(format!("{pattern:?} is empty; {forms}"));
    }
    if p.starts_with('[') {
        // An IPv6 literal, matched exactly.
        let inner = p.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        return match inner {
            Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => Ok(p.to_string()),
            _ => Err(format!(
                "{pattern:?} is not a bracketed IPv6 address without a port, like [::1]"
            )),
        };
    }
    if p.contains(':') {
        return Err(format!(
            "{pattern:?} has a port; hosts match without the port, so write {:?}",
            p.split(':').next().unwrap_or_default()
        ));
    }
    let stars = p.matches('*').count();
    let core = match stars {
        0 => p,
        1 if p.len() > 1 && p.starts_with('*') => &p[1..],
        1 if p.len() > 1 && p.ends_with('*') => &p[..p.len() - 1],
        _ => {
            return Err(format!(
                "{pattern:?} has a '*' that is not alone, first or last; {forms}"
            ));
        }
    };
    if let Some(c) = core
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "{pattern:?} contains {c:?}, which a host name cannot hold; {forms}"
        ));
    }
    // An empty label can never occur in a valid host (`a..b`, `.a`, `*..a`).
    let empty_label = core.contains("..")
        || (stars == 0 && (p.starts_with('.') || p.ends_with('.')))
        || (stars == 1 && p.starts_with('*') && core.ends_with('.'))
        || (stars == 1 && p.ends_with('*') && core.starts_with('.'));
    if empty_label {
        return Err(format!("{pattern:?} has an empty label; {forms}"));
    }
    Ok(p.to_string())
}

/// A path prefix is compared with the normalised path, so a prefix that normalisation would
/// change (a dot segment, `//`, a percent-encoded unreserved character, a backslash) or that
/// does not start with `/` would never match; it is refused with the reason.
pub fn check_path_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/', like /api/"));
    }
    if prefix.contains(['?', '#', '\\', ' ']) || prefix.chars().any(|c| c.is_ascii_control()) {
        return Err(format!(
            "{prefix:?} contains '?', '#', '\\', a space or a control character; a path prefix is the path alone"
        ));
    }
    if prefix.contains("//") {
        return Err(format!(
            "{prefix:?} contains '//', which requests never have after slashes are merged"
        ));
    }
    let segments: Vec<&str> = prefix.split('/').collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!(
            "{prefix:?} has a '.' or '..' segment, which requests never have after normalisation"
        ));
    }
    let bytes = prefix.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'%' {
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                return Err(format!(
                    "{prefix:?} percent-encodes {:?}, which requests carry decoded; write it plainly",
                    c as char
                ));
            }
            Some(_) if hex.is_some_and(|h| h.bytes().any(|b| b.is_ascii_lowercase())) => {
                return Err(format!(
                    "{prefix:?} has a lower-case percent-encoding; requests carry upper-case hex (%2F, not %2f)"
                ));
            }
            Some(_) => {}
            None => return Err(format!("{prefix:?} has an invalid percent-encoding")),
        }
    }
    Ok(())
}

/// `host` without port or trailing dot; `pattern` normalised (lower-case). The `*` of a
/// wildcard stands for at least one character, as in Envoy.
fn host_matches(pattern: &str, host: &str) -> bool {
    let (p, h) = (pattern.as_bytes(), host.as_bytes());
    if p == b"*" {
        return !h.is_empty();
    }
    if let Some(suffix) = p.strip_prefix(b"*") {
        return h.len() > suffix.len() && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
    }
    if let Some(prefix) = p.strip_suffix(b"*") {
        return h.len() > prefix.len() && h[..prefix.len()].eq_ignore_ascii_case(prefix);
    }
    p.eq_ignore_ascii_case(h)
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
    fn hosts_match_ignoring_case_port_and_trailing_dot() {
        let m = RequestMatch {
            hosts: vec!["*.example.com".into(), "api.test".into()],
            ..Default::default()
        }
        .normalized()
        .unwrap();
        for host in [
            "A.EXAMPLE.COM",
            "a.Example.com",
            "a.example.com.",
            "a.example.com.:8443",
            "api.test.",
            "API.TEST:80",
            "x.y.example.com",
        ] {
            assert!(m.matches(host, "/", "GET"), "{host} should match");
        }
        for host in [
            "example.com",
            ".example.com",
            "example.com.",
            "api.test.x",
            "xapi.test",
        ] {
            assert!(!m.matches(host, "/", "GET"), "{host} should not match");
        }
    }

    #[test]
    fn envoy_wildcard_forms_match_as_in_envoy() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("*", &["a", "x.example.com", "[::1]"], &[""]),
            (
                "*.example.com",
                &["a.example.com", "a.b.example.com"],
                &["example.com", "aexample.com"],
            ),
            (
                "*-edge.example.com",
                &["eu-edge.example.com", "a.b-edge.example.com"],
                &["-edge.example.com", "edge.example.com"],
            ),
            (
                "api.*",
                &["api.example.com", "API.test:80"],
                &["api.", "apix.example.com"],
            ),
            ("api-*", &["api-v1", "api-v1.example.com"], &["api-", "api"]),
            ("[::1]", &["[::1]:8080", "[::1]"], &["[::2]"]),
        ];
        for (pattern, yes, no) in cases {
            let m = RequestMatch {
                hosts: vec![pattern.to_string()],
                ..Default::default()
            }
            .normalized()
            .unwrap();
            for h in *yes {
                assert!(m.matches(h, "/", "GET"), "{pattern} should match {h}");
            }
            for h in *no {
                assert!(!m.matches(h, "/", "GET"), "{pattern} should not match {h}");
            }
        }
    }

    #[test]
    fn host_patterns_are_normalised_or_refused_at_load() {
        assert_eq!(
            normalize_host_pattern("API.Example.COM.").unwrap(),
            "api.example.com"
        );
        assert_eq!(
            normalize_host_pattern("*.Example.com").unwrap(),
            "*.example.com"
        );
        assert_eq!(normalize_host_pattern("*.").unwrap(), "*");
        for bad in [
            "",
            "api.example.com:8080",
            "*.example.com:443",
            "a*b.example.com",
            "*.*.example.com",
            "**",
            "api.*.com",
            "a..b",
            ".a",
            "*..a",
            ".*",
            "a b",
            "a/b",
            "[::1]:80",
            "[zz]",
        ] {
            assert!(
                normalize_host_pattern(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let err = RequestMatch {
            hosts: vec!["ok.test".into(), "x.test:80".into()],
            ..Default::default()
        }
        .normalized()
        .unwrap_err();
        assert_eq!(err.0, "hosts[1]", "{err:?}");
        assert!(err.1.contains("port"), "{err:?}");
        for bad in [
            "api", "/a//b", "/a/../b", "/./a", "/%61pi", "/a%2f", "/a?b", "/a\\b", "/%zz",
        ] {
            assert!(check_path_prefix(bad).is_err(), "{bad:?} should be refused");
        }
        for good in ["/", "/api/", "/a%2Fb", "/a.b/c..d"] {
            assert!(
                check_path_prefix(good).is_ok(),
                "{good:?} should be accepted"
            );
        }
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
