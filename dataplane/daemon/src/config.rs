//! The dataplane's YAML configuration: listeners, routes, clusters, admin address, and in
//! standalone mode the filters. Every error names the file, the field and what is expected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wasmfilter_api::{FailurePolicy, Phase, RequestMatch};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens, e.g. `127.0.0.1:8080` (shorthand for one entry of `listeners`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) on `listen` with this certificate.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// More listeners, each plain or with its own certificate. Every worker serves all of them.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Where `/ready`, `/live`, `/metrics` and `/config_dump` are served.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Worker threads; each runs its own event loop and its own VM per filter. 0 = one per core.
    #[serde(default)]
    pub workers: usize,
    /// Largest request or response body a filter chain may buffer (bytes); beyond it the
    /// request gets 413, the response 500.
    #[serde(default = "default_buffer_limit")]
    pub buffer_limit_bytes: usize,
    /// Registries (`host:port`) that filter `image`s are pulled from over plain HTTP.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// How request heads are normalised before filters and routes match them, and which
    /// peers may set `X-Forwarded-*` (docs/operations.md, "Request normalisation and scope
    /// matching").
    #[serde(default)]
    pub http: HttpOptions,
    pub routes: Vec<Route>,
    pub clusters: Vec<Cluster>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Managed mode: take filters from the operator as well (after the ones listed here).
    #[serde(default)]
    pub operator: Option<OperatorLink>,
}

/// How a managed dataplane reaches the operator and who it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorLink {
    /// `https://host:port` (mTLS, the default) or `http://host:port` (plain text, only with
    /// `insecure: true`).
    pub address: String,
    /// This dataplane's unique id (usually the node name). Empty: the environment variable
    /// `WASMFILTER_DATAPLANE_ID`, else the host name.
    #[serde(default)]
    pub id: String,
    /// The labels WasmFilter selectors match against.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the last applied snapshot and its modules are kept (relative to the
    /// configuration file), so a restart serves the
    /// last good chain before the operator answers.
    pub state_dir: PathBuf,
    /// Client certificate and the CA the operator's certificate must chain to (PEM files,
    /// relative to the configuration file).
    #[serde(default)]
    pub tls: Option<OperatorTls>,
    /// Allow a plain-text `http://` address: every filter and module then travels
    /// unauthenticated, so this must be said explicitly.
    #[serde(default)]
    pub insecure: bool,
    /// How often per-filter stats are reported.
    #[serde(default = "default_stats_interval", with = "duration")]
    pub stats_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl OperatorLink {
    /// The id to announce: `id`, else `WASMFILTER_DATAPLANE_ID`, else the host name.
    pub fn dataplane_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        if let Ok(id) = std::env::var("WASMFILTER_DATAPLANE_ID")
            && !id.is_empty()
        {
            return id;
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "dataplane".into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// `ip:port`.
    pub address: String,
    #[serde(default)]
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, relative to the configuration file.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), relative to the configuration file.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RequestMatch,
    /// Exact header values the request must carry.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub cluster: String,
    /// Readable by filters as `xds.route_metadata` / `route_metadata`.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// The `http` section: request normalisation and trusted hops. Every default is the safe one.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpOptions {
    /// Decode percent-encoded unreserved characters and remove dot segments from the path
    /// before matching and forwarding (Envoy's `normalize_path`). Default on.
    #[serde(default = "yes")]
    pub normalize_path: bool,
    /// Merge runs of `/` in the path into one (Envoy's `merge_slashes`). Default on.
    #[serde(default = "yes")]
    pub merge_slashes: bool,
    /// What to do with `%2F`, `%5C` and a raw `\` in a path: `RejectRequest` (the default:
    /// 400), `KeepUnchanged`, `UnescapeAndRedirect` (307 to the unescaped path) or
    /// `UnescapeAndForward`; Envoy's upper-case spellings are accepted too.
    #[serde(default)]
    pub path_with_escaped_slashes_action: crate::normalize::EscapedSlashes,
    /// Peers (CIDRs, like `10.0.0.0/8` or `fd00::/8`) whose `X-Forwarded-For` and
    /// `X-Forwarded-Proto` are kept (the peer is appended to `X-Forwarded-For`). From any
    /// other peer both are overwritten from the connection. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            normalize_path: true,
            merge_slashes: true,
            path_with_escaped_slashes_action: Default::default(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl HttpOptions {
    pub fn path_options(&self) -> crate::normalize::PathOptions {
        crate::normalize::PathOptions {
            normalize: self.normalize_path,
            merge_slashes: self.merge_slashes,
            escaped_slashes: self.path_with_escaped_slashes_action,
        }
    }

    /// Whether `peer` is a trusted proxy whose `X-Forwarded-*` headers are kept.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }
}

fn yes() -> bool {
    true
}

/// An address range, `ip/prefix` (a bare ip is the one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(text: String) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "http.trustedProxies: {text:?} is not a CIDR: expected ip/prefix, like 10.0.0.0/8 or fd00::/8"
            )
        };
        let (ip, prefix) = text.split_once('/').unwrap_or((&text, ""));
        let addr: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            "" => max,
            p => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr {
            addr: addr.to_canonical(),
            prefix: if addr.is_ipv6() && addr.to_canonical().is_ipv4() {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// `host:port` endpoints; the first that answers is used.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// A built-in upstream instead of endpoints: `echo` answers with what it received.
    #[serde(default)]
    pub builtin: Option<Builtin>,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Speak HTTP/2 (h2c) to the endpoints, as gRPC needs.
    #[serde(default)]
    pub http2: bool,
    /// Readable by filters as `xds.cluster_metadata` / `cluster_metadata`.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    Echo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    pub name: String,
    /// Path to the `.wasm` module, relative to the configuration file. Give this or `image`.
    #[serde(default)]
    pub module: Option<PathBuf>,
    /// An OCI reference (`registry/repository:tag` or `…@sha256:…`) to pull the module from,
    /// in any layout the operator accepts. Give this or `module`.
    #[serde(default)]
    pub image: Option<String>,
    /// A filter compiled into the dataplane instead of a module (`crate::native::NAMES`),
    /// given the same `config`. Give this, `module` or `image`.
    #[serde(default)]
    pub native: Option<String>,
    /// Expected sha256 (64 hex) of the module bytes; a module that differs is refused.
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub root_id: String,
    /// Plugin configuration: a string is passed as-is, anything else as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub vm: VmConfig,
    #[serde(default, rename = "match")]
    pub matches: RequestMatch,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Lowest guest log level kept: trace, debug, info, warn, error, critical.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    /// VM sharing key; filters with the same id and module share a VM.
    #[serde(default)]
    pub id: String,
    /// Passed to `proxy_on_vm_start`: a string as-is, anything else as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Environment variables visible to the module through WASI.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap, e.g. `64Mi`.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Budget of one callback, e.g. `100ms`.
    #[serde(default = "default_callback_timeout", with = "duration")]
    pub callback_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: default_memory(),
            callback_timeout: default_callback_timeout(),
        }
    }
}

fn default_admin() -> String {
    "127.0.0.1:9901".into()
}
fn default_buffer_limit() -> usize {
    8 << 20
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_memory() -> String {
    "64Mi".into()
}
fn default_callback_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_log_level() -> String {
    "info".into()
}

/// Durations are written as `250ms`, `5s`, `1m`.
mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations and sizes are written as in a WasmFilter (`250ms`, `5s`, `1m`; `64Mi`): one
/// parser for both, in wasmfilter-api.
pub use wasmfilter_api::parse_duration;

/// Parses `64Mi`, `512Ki`, `1Gi` or a plain byte count.
pub fn parse_quantity(text: &str) -> Result<usize, String> {
    wasmfilter_api::parse_quantity(text.trim()).map(|n| n as usize)
}

/// A configuration error: which file, which field, what is wrong and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "(file)".into(),
            message: format!("cannot read the configuration: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let location = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "(document)".into());
            ConfigError {
                file: file.to_string(),
                field: location,
                message: e.to_string(),
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: String, message: String| ConfigError {
            file: file.to_string(),
            field,
            message,
        };
        if let Some(listen) = &self.listen {
            check_addr(listen).map_err(|m| err("listen".into(), m))?;
        } else if self.tls.is_some() {
            return Err(err("tls".into(), "tls applies to `listen`, which is not set; give the certificate in `listeners[].tls` instead".into()));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            check_addr(&l.address).map_err(|m| err(format!("listeners[{i}].address"), m))?;
        }
        if self.all_listeners().is_empty() {
            return Err(err(
                "listen".into(),
                "no listener: set `listen` (ip:port) or `listeners`".into(),
            ));
        }
        check_addr(&self.admin).map_err(|m| err("admin".into(), m))?;
        if self.routes.is_empty() {
            return Err(err("routes".into(), "at least one route is needed".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let field = |f: &str| format!("clusters[{i}].{f}");
            if c.name.is_empty() {
                return Err(err(field("name"), "must not be empty".into()));
            }
            if !names.insert(c.name.as_str()) {
                return Err(err(
                    field("name"),
                    format!("duplicate cluster name {:?}", c.name),
                ));
            }
            match (&c.builtin, c.endpoints.is_empty()) {
                (None, true) => {
                    return Err(err(
                        field("endpoints"),
                        format!(
                            "cluster {:?} needs at least one host:port endpoint (or `builtin: echo`)",
                            c.name
                        ),
                    ));
                }
                (Some(_), false) => {
                    return Err(err(
                        field("builtin"),
                        "give either endpoints or builtin, not both".into(),
                    ));
                }
                _ => {}
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                check_endpoint(e).map_err(|m| err(format!("clusters[{i}].endpoints[{j}]"), m))?;
            }
        }
        let mut route_names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if !route_names.insert(r.name.as_str()) {
                return Err(err(
                    format!("routes[{i}].name"),
                    format!("duplicate route name {:?}", r.name),
                ));
            }
            if !names.contains(r.cluster.as_str()) {
                return Err(err(
                    format!("routes[{i}].cluster"),
                    format!(
                        "no cluster named {:?}; defined clusters: {:?}",
                        r.cluster,
                        self.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
                    ),
                ));
            }
        }
        let mut filter_names = std::collections::HashSet::new();
        for (i, f) in self.filters.iter().enumerate() {
            let field = |x: &str| format!("filters[{i}].{x}");
            if f.name.is_empty() {
                return Err(err(field("name"), "must not be empty".into()));
            }
            let sources = [f.module.is_some(), f.image.is_some(), f.native.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(err(
                    field("module"),
                    format!(
                        "filter {:?}: set exactly one of module (a .wasm file), image (an OCI reference) or native (a filter built into the dataplane)",
                        f.name
                    ),
                ));
            }
            if let Some(native) = &f.native {
                if !crate::native::NAMES.contains(&native.as_str()) {
                    return Err(err(field("native"), crate::native::unknown(native)));
                }
                if f.sha256.is_some() {
                    return Err(err(
                        field("sha256"),
                        "a native filter has no module bytes to pin".into(),
                    ));
                }
            }
            if let Some(pin) = &f.sha256
                && !(pin.len() == 64
                    && pin
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            {
                return Err(err(
                    field("sha256"),
                    "must be 64 lower-case hex digits (the sha256 of the module bytes)".into(),
                ));
            }
            if !filter_names.insert(f.name.as_str()) {
                return Err(err(
                    field("name"),
                    format!("duplicate filter name {:?}", f.name),
                ));
            }
            let bytes =
                parse_quantity(&f.limits.memory).map_err(|m| err(field("limits.memory"), m))?;
            if !(1 << 20..=wasmfilter_host::limits::MAX_MEMORY_LIMIT_BYTES).contains(&bytes) {
                return Err(err(
                    field("limits.memory"),
                    format!("{} is out of range: between 1Mi and 1Gi", f.limits.memory),
                ));
            }
            if f.limits.callback_timeout.is_zero()
                || f.limits.callback_timeout > Duration::from_secs(60)
            {
                return Err(err(
                    field("limits.callbackTimeout"),
                    "must be between 1ms and 60s".into(),
                ));
            }
            f.log_level
                .parse::<wasmfilter_host::LogLevel>()
                .map_err(|m| err(field("logLevel"), m))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.matches
                .normalized()
                .map_err(|(f, m)| err(format!("routes[{i}].match.{f}"), m))?;
        }
        for (i, f) in self.filters.iter().enumerate() {
            f.matches
                .normalized()
                .map_err(|(x, m)| err(format!("filters[{i}].match.{x}"), m))?;
        }
        if let Some(op) = &self.operator {
            let plain = op.address.starts_with("http://");
            if !plain && !op.address.starts_with("https://") {
                return Err(err(
                    "operator.address".into(),
                    format!(
                        "{:?} must start with https:// (or http:// together with insecure: true), like https://wasmfilter-operator.wasmfilter-system.svc:7070",
                        op.address
                    ),
                ));
            }
            match (plain, op.insecure, &op.tls) {
                (true, false, _) => {
                    return Err(err(
                        "operator.insecure".into(),
                        "operator.address is plain http://: set insecure: true to allow unauthenticated plain text, or use https:// with operator.tls".into(),
                    ));
                }
                (true, true, Some(_)) => {
                    return Err(err(
                        "operator.tls".into(),
                        "tls is set but the address is http://; use https://".into(),
                    ));
                }
                (false, _, None) => {
                    return Err(err(
                        "operator.tls".into(),
                        "an https:// operator needs tls: {caFile, certFile, keyFile} (the chart mounts them from its Secret)".into(),
                    ));
                }
                _ => {}
            }
            for (k, v) in &op.labels {
                if k.is_empty() || k.len() > 317 || v.len() > 63 {
                    return Err(err(
                        format!("operator.labels.{k}"),
                        "label keys are 1 to 317 characters (prefix/name), values at most 63, as in Kubernetes".into(),
                    ));
                }
            }
            if op.stats_interval < Duration::from_secs(1) {
                return Err(err(
                    "operator.statsInterval".into(),
                    "must be at least 1s".into(),
                ));
            }
        }
        Ok(())
    }

    /// Every listener: `listen` (with `tls`) first, then `listeners`.
    pub fn all_listeners(&self) -> Vec<Listener> {
        let mut all: Vec<Listener> = self
            .listen
            .iter()
            .map(|address| Listener {
                address: address.clone(),
                tls: self.tls.clone(),
            })
            .collect();
        all.extend(self.listeners.iter().cloned());
        all
    }

    /// Absolute path of a filter's module (relative paths are relative to the config file).
    pub fn module_path(config_file: &Path, module: &Path) -> PathBuf {
        if module.is_absolute() {
            module.to_path_buf()
        } else {
            config_file.parent().unwrap_or(Path::new(".")).join(module)
        }
    }
}

fn check_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not a socket address: expected ip:port, like 127.0.0.1:8080")
    })
}

fn check_endpoint(text: &str) -> Result<(), String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{text:?} is not an endpoint: expected host:port, like 127.0.0.1:3000 or backend.svc:80"
        )),
    }
}

/// A JSON value as the bytes a module receives: strings as-is, null as nothing, else JSON.
pub fn config_bytes(value: &serde_json::Value) -> Vec<u8> {
    match value {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}
