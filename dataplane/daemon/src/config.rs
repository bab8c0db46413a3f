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
    /// How long in-flight requests (and their response bodies) may take to finish after
    /// SIGTERM.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// Timeouts that keep a slow or silent peer from holding a connection (docs/operations.md).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Connection, stream and buffer limits of the proxy listeners (docs/operations.md).
    #[serde(default)]
    pub limits: ProxyLimits,
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
    /// Time to establish the link: TCP connect, TLS handshake, HTTP/2 handshake and the
    /// operator's answer to the stream's opening ([`DEFAULT_OPERATOR_HANDSHAKE_TIMEOUT`]). A
    /// peer that accepts and then says nothing fails the attempt, which is retried.
    #[serde(default = "d_operator_handshake", with = "duration")]
    pub handshake_timeout: Duration,
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
    /// The name network filters choose the listener by (`filters[].listeners`). Optional;
    /// unique when given.
    #[serde(default)]
    pub name: String,
    /// `HTTP` (the default: the HTTP reverse proxy with its routes and HTTP filters) or `TCP`
    /// (every connection is proxied byte for byte to `cluster`, through the network filters
    /// that choose this listener).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// `TCP` listeners: the cluster each connection goes to (its first endpoint that
    /// accepts).
    #[serde(default)]
    pub cluster: Option<String>,
    /// `TCP` listeners: time to connect to the upstream ([`DEFAULT_TCP_CONNECT_TIMEOUT`]).
    #[serde(default = "d_tcp_connect", with = "duration")]
    pub connect_timeout: Duration,
    /// `TCP` listeners: a connection with no bytes either way for this long is closed
    /// ([`DEFAULT_TCP_IDLE_TIMEOUT`]).
    #[serde(default = "d_tcp_idle", with = "duration")]
    pub idle_timeout: Duration,
    /// Plain `HTTP` listeners: speak HTTP/2 only (h2c with prior knowledge), as a gRPC or
    /// service-mesh listener would. By default a plain listener serves HTTP/1.1 and h2c on
    /// one port, told apart by the HTTP/2 preface; TLS listeners let ALPN choose.
    #[serde(default)]
    pub http2_only: bool,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ListenerProtocol {
    #[default]
    #[serde(alias = "http")]
    HTTP,
    #[serde(alias = "tcp")]
    TCP,
}

/// `listeners[].connectTimeout` default for TCP listeners: 5 s, Envoy's cluster
/// `connect_timeout` default.
pub const DEFAULT_TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `listeners[].idleTimeout` default for TCP listeners: 1 h, Envoy's `tcp_proxy`
/// `idle_timeout` default (a database connection may be quiet for minutes).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn d_tcp_connect() -> Duration {
    DEFAULT_TCP_CONNECT_TIMEOUT
}
fn d_tcp_idle() -> Duration {
    DEFAULT_TCP_IDLE_TIMEOUT
}

impl Listener {
    /// A plain HTTP listener on `address`.
    pub fn http(address: String, tls: Option<Tls>) -> Listener {
        Listener {
            address,
            tls,
            name: String::new(),
            protocol: ListenerProtocol::HTTP,
            cluster: None,
            connect_timeout: DEFAULT_TCP_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            http2_only: false,
        }
    }
}

/// Which traffic a plugin sees (`filters[].type`).
pub use wasmfilter_api::PluginType;

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
    /// Overrides the cluster's `timeout` for this route. It is also the stream timeout: how long
    /// a filter may keep a request or response paused with nothing resuming it before the
    /// client gets a 504 naming the filter (docs/proxy-wasm-behaviour.md).
    #[serde(default, with = "optional_duration")]
    pub timeout: Option<Duration>,
    /// Accept `CONNECT` requests whose target host `match.hosts` accepts: the client gets 200
    /// and a byte tunnel to this route's cluster (its first endpoint that accepts), which no
    /// HTTP filter sees into. Without such a route CONNECT is refused (405). A CONNECT route
    /// serves only CONNECT; give it hosts and no pathPrefixes.
    #[serde(default)]
    pub connect: bool,
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
    /// The request timeout: from the moment the request (with its body) has been sent until
    /// the upstream's response head arrives; 504 past it. Default 15s, Envoy's route timeout.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Caps on what this cluster is sent at once; past one the request gets 503 at once.
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
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
    /// `HTTP` (default), `Network` or `Service`: see [`PluginType`].
    #[serde(default, rename = "type")]
    pub plugin_type: PluginType,
    /// Network filters: the names of the `TCP` listeners they run on (empty: every one).
    #[serde(default)]
    pub listeners: Vec<String>,
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
    // Quotas on host resources the filter can grow (docs/limits.md; defaults in
    // wasmfilter_host::limits). Byte quotas are quantities like `64Mi`; unset means default.
    /// Bytes (keys plus values) of the shared data of the filter's VM id (64Mi).
    #[serde(default)]
    pub shared_data_bytes: Option<String>,
    /// Bytes one shared queue holds before dropping its oldest items (16Mi).
    #[serde(default)]
    pub queue_bytes: Option<String>,
    /// Items one shared queue holds before dropping its oldest (10000).
    #[serde(default)]
    pub queue_items: Option<usize>,
    /// Metrics the filter may define (1000).
    #[serde(default)]
    pub metrics: Option<usize>,
    /// Longest metric name, in bytes (512).
    #[serde(default)]
    pub metric_name_bytes: Option<usize>,
    /// Fields the filter may put in one header or trailer map (1024).
    #[serde(default)]
    pub header_count: Option<usize>,
    /// Bytes the filter may put in one header or trailer map (1Mi).
    #[serde(default)]
    pub header_bytes: Option<String>,
    /// Callouts one VM may have outstanding (1000).
    #[serde(default)]
    pub pending_callouts: Option<usize>,
    /// Largest local reply body (1Mi).
    #[serde(default)]
    pub local_reply_bytes: Option<String>,
    /// Log records per second, all workers together; the excess is dropped and counted (1000).
    #[serde(default)]
    pub log_records_per_second: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: default_memory(),
            callback_timeout: default_callback_timeout(),
            shared_data_bytes: None,
            queue_bytes: None,
            queue_items: None,
            metrics: None,
            metric_name_bytes: None,
            header_count: None,
            header_bytes: None,
            pending_callouts: None,
            local_reply_bytes: None,
            log_records_per_second: None,
        }
    }
}

impl Limits {
    /// The filter's quotas: the set fields over the host's defaults. The error names the
    /// field (`limits.<name>`, relative to the filter) and the accepted range.
    pub fn quotas(&self) -> Result<wasmfilter_host::Quotas, (String, String)> {
        let mut q = wasmfilter_host::Quotas::default();
        let bytes =
            |name: &str, v: &Option<String>, into: &mut usize| -> Result<(), (String, String)> {
                if let Some(text) = v {
                    *into = parse_quantity(text).map_err(|m| (format!("limits.{name}"), m))?;
                }
                Ok(())
            };
        bytes(
            "sharedDataBytes",
            &self.shared_data_bytes,
            &mut q.shared_data_bytes,
        )?;
        bytes("queueBytes", &self.queue_bytes, &mut q.queue_bytes)?;
        bytes("headerBytes", &self.header_bytes, &mut q.header_bytes)?;
        bytes(
            "localReplyBytes",
            &self.local_reply_bytes,
            &mut q.local_reply_bytes,
        )?;
        for (v, into) in [
            (self.queue_items, &mut q.queue_items),
            (self.metrics, &mut q.metrics),
            (self.metric_name_bytes, &mut q.metric_name_bytes),
            (self.header_count, &mut q.header_count),
            (self.pending_callouts, &mut q.pending_callouts),
        ] {
            if let Some(v) = v {
                *into = v;
            }
        }
        if let Some(v) = self.log_records_per_second {
            q.log_records_per_second = v;
        }
        q.validate().map_err(|m| {
            let field = m.split_whitespace().next().unwrap_or("limits").to_string();
            (field, m)
        })?;
        Ok(q)
    }
}

// ---- Limits and defaults of the proxy (docs/operations.md explains each) ----

/// `timeouts.headerRead` default: a client has 10 s to send a request head (the first on a
/// connection, or the next on a keep-alive one). nginx's `client_header_timeout` is 60 s; a
/// real client needs milliseconds, a slowloris connection is cut six times sooner.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `timeouts.idle` default: a connection with no request in flight is closed after 75 s,
/// nginx's `keepalive_timeout` (Envoy's `idle_timeout` is 1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// `timeouts.keepAliveInterval` default: HTTP/2 PING every 30 s on an otherwise silent
/// connection; a peer that does not answer within `keepAliveTimeout` (20 s, hyper's default)
/// is gone and its connection closed.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// `timeouts.upstreamIdle` default: an upstream response body that sends nothing for 60 s
/// is cut (the client sees a reset). nginx's `proxy_read_timeout` is 60 s.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `timeouts.tlsHandshake` default: 10 s for a client to complete the TLS handshake
/// (Envoy's `transport_socket_connect_timeout` is commonly set so; nginx bounds it by
/// `client_header_timeout`).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `limits.maxConnections` default, per listener: Envoy's edge `connection_limit` 10000.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `limits.perConnectionBufferBytes` default: 1 MiB, Envoy's
/// `per_connection_buffer_limit_bytes`. HTTP/2 windows and send buffers are sized from it.
pub const DEFAULT_PER_CONNECTION_BUFFER: usize = 1 << 20;
/// `limits.maxConcurrentStreams` default: 100 HTTP/2 streams per connection, Envoy's edge
/// value (its protocol default is 2^31-1).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// `limits.maxRequestHeadersBytes` default: 60 KiB, Envoy's `max_request_headers_kb`.
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 60 << 10;
/// `clusters[].circuitBreakers.*` default: 1024 each, Envoy's circuit breaker defaults.
pub const DEFAULT_CIRCUIT_BREAKER: usize = 1024;
/// A cluster's `timeout` default, and the stream timeout of a request that matched no route:
/// 15 s, Envoy's route timeout. It also bounds how long a filter may keep a stream paused
/// with nothing resuming it (then 504, naming the filter).
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(15);
/// `drainTimeout` default: 10 s for in-flight requests after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a TLS listener's certificate and key files are looked at for a change
/// (`crate::tls`): 2 s. A Secret volume is updated about a minute after the Secret, and
/// cert-manager renews weeks before expiry, so a few seconds cost nothing and a `stat` of two
/// files every 2 s is free.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// `operator.handshakeTimeout` default: 10 s to connect to the operator and open the stream
/// (TCP, TLS, HTTP/2, the stream's response head). An operator answers in milliseconds; a
/// silent peer (a half-dead node, a wrong port that accepts) would otherwise hold the link
/// forever, as tonic's own connect timeout covers only the TCP connect.
pub const DEFAULT_OPERATOR_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `timeouts` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Time to receive a whole request head ([`DEFAULT_HEADER_READ_TIMEOUT`]); also bounds a
    /// connection that sends nothing at all.
    #[serde(default = "d_header_read", with = "duration")]
    pub header_read: Duration,
    /// A connection with no request in flight is closed after this ([`DEFAULT_IDLE_TIMEOUT`]).
    #[serde(default = "d_idle", with = "duration")]
    pub idle: Duration,
    /// HTTP/2 PING interval on a silent connection ([`DEFAULT_H2_KEEPALIVE_INTERVAL`]).
    #[serde(default = "d_ka_interval", with = "duration")]
    pub keep_alive_interval: Duration,
    /// How long a PING may go unanswered ([`DEFAULT_H2_KEEPALIVE_TIMEOUT`]).
    #[serde(default = "d_ka_timeout", with = "duration")]
    pub keep_alive_timeout: Duration,
    /// Longest silence between two reads of an upstream response body
    /// ([`DEFAULT_UPSTREAM_IDLE_TIMEOUT`]).
    #[serde(default = "d_upstream_idle", with = "duration")]
    pub upstream_idle: Duration,
    /// Time for a TLS client to finish its handshake ([`DEFAULT_TLS_HANDSHAKE_TIMEOUT`]).
    #[serde(default = "d_tls", with = "duration")]
    pub tls_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: DEFAULT_HEADER_READ_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            keep_alive_interval: DEFAULT_H2_KEEPALIVE_INTERVAL,
            keep_alive_timeout: DEFAULT_H2_KEEPALIVE_TIMEOUT,
            upstream_idle: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            tls_handshake: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }
}

fn d_header_read() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn d_idle() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn d_ka_interval() -> Duration {
    DEFAULT_H2_KEEPALIVE_INTERVAL
}
fn d_ka_timeout() -> Duration {
    DEFAULT_H2_KEEPALIVE_TIMEOUT
}
fn d_upstream_idle() -> Duration {
    DEFAULT_UPSTREAM_IDLE_TIMEOUT
}
fn d_tls() -> Duration {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT
}

/// The `limits` section (the proxy listeners; filters have their own `filters[].limits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyLimits {
    /// Open client connections per listener; more are closed as soon as they are accepted
    /// ([`DEFAULT_MAX_CONNECTIONS`]).
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Bytes buffered per connection, e.g. `1Mi` ([`DEFAULT_PER_CONNECTION_BUFFER`]): the
    /// HTTP/2 connection window and send buffer, split evenly over `maxConcurrentStreams` for
    /// each stream's window and send buffer (at least 16 KiB each).
    #[serde(default = "d_buffer", deserialize_with = "quantity")]
    pub per_connection_buffer_bytes: usize,
    /// HTTP/2 streams per connection ([`DEFAULT_MAX_CONCURRENT_STREAMS`]).
    #[serde(default = "d_streams")]
    pub max_concurrent_streams: u32,
    /// Largest request head, e.g. `60Ki` ([`DEFAULT_MAX_REQUEST_HEADERS`]); past it HTTP/1
    /// gets 431 and HTTP/2 a stream error.
    #[serde(default = "d_headers", deserialize_with = "quantity")]
    pub max_request_headers_bytes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            per_connection_buffer_bytes: DEFAULT_PER_CONNECTION_BUFFER,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS,
        }
    }
}

impl ProxyLimits {
    /// One HTTP/2 stream's share of the connection buffer (its window and send buffer).
    pub fn per_stream_buffer_bytes(&self) -> usize {
        (self.per_connection_buffer_bytes / self.max_concurrent_streams.max(1) as usize)
            .max(16 << 10)
    }
}

fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_buffer() -> usize {
    DEFAULT_PER_CONNECTION_BUFFER
}
fn d_streams() -> u32 {
    DEFAULT_MAX_CONCURRENT_STREAMS
}
fn d_headers() -> usize {
    DEFAULT_MAX_REQUEST_HEADERS
}

/// `clusters[].circuitBreakers`: Envoy's three per-cluster breakers.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Open connections to the cluster's endpoints.
    #[serde(default = "d_breaker")]
    pub max_connections: usize,
    /// Requests sent and still waiting for the response head.
    #[serde(default = "d_breaker")]
    pub max_pending_requests: usize,
    /// Requests in flight, from sending until the response body ends.
    #[serde(default = "d_breaker")]
    pub max_requests: usize,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: DEFAULT_CIRCUIT_BREAKER,
            max_pending_requests: DEFAULT_CIRCUIT_BREAKER,
            max_requests: DEFAULT_CIRCUIT_BREAKER,
        }
    }
}

fn d_breaker() -> usize {
    DEFAULT_CIRCUIT_BREAKER
}

/// A byte size written as `1Mi`, `60Ki` or a plain number.
fn quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Q {
        N(u64),
        S(String),
    }
    match Q::deserialize(d)? {
        Q::N(n) => Ok(n as usize),
        Q::S(s) => parse_quantity(&s).map_err(serde::de::Error::custom),
    }
}

/// An optional duration (`250ms`, `5s`).
mod optional_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn d_operator_handshake() -> Duration {
    DEFAULT_OPERATOR_HANDSHAKE_TIMEOUT
}

fn default_admin() -> String {
    "127.0.0.1:9901".into()
}
fn default_buffer_limit() -> usize {
    8 << 20
}
fn default_drain() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_timeout() -> Duration {
    DEFAULT_STREAM_TIMEOUT
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
        self.validate_limits(file)?;
        self.validate_plugin_types(file)?;
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
            f.limits
                .quotas()
                .map_err(|(name, message)| err(field(&name), message))?;
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
            check_operator_uri(&op.address).map_err(|m| err("operator.address".into(), m))?;
            if op.handshake_timeout < Duration::from_millis(100)
                || op.handshake_timeout > Duration::from_secs(300)
            {
                return Err(err(
                    "operator.handshakeTimeout".into(),
                    "must be between 100ms and 300s (default 10s)".into(),
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

    /// The limits and timeouts: each within a range that still lets a client be served.
    fn validate_limits(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| ConfigError {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        let t = &self.timeouts;
        let between = |field: &str, d: Duration, lo: Duration, hi: Duration| {
            if d < lo || d > hi {
                Err(err(
                    field,
                    format!(
                        "{d:?} is out of range: give a duration between {lo:?} and {hi:?}, like 10s"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        between("timeouts.headerRead", t.header_read, ms(10), hour)?;
        between("timeouts.idle", t.idle, ms(10), 24 * hour)?;
        between(
            "timeouts.keepAliveInterval",
            t.keep_alive_interval,
            ms(100),
            hour,
        )?;
        between(
            "timeouts.keepAliveTimeout",
            t.keep_alive_timeout,
            ms(100),
            hour,
        )?;
        between("timeouts.upstreamIdle", t.upstream_idle, ms(10), 24 * hour)?;
        between(
            "timeouts.tlsHandshake",
            t.tls_handshake,
            ms(10),
            Duration::from_secs(300),
        )?;
        between("drainTimeout", self.drain_timeout, Duration::ZERO, hour)?;
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(err(
                "limits.maxConnections",
                "must be at least 1 (default 10000)".into(),
            ));
        }
        if !(64 << 10..=1 << 30).contains(&l.per_connection_buffer_bytes) {
            return Err(err(
                "limits.perConnectionBufferBytes",
                "must be between 64Ki and 1Gi (default 1Mi)".into(),
            ));
        }
        if !(1..=10_000).contains(&l.max_concurrent_streams) {
            return Err(err(
                "limits.maxConcurrentStreams",
                "must be between 1 and 10000 (default 100)".into(),
            ));
        }
        if !(8 << 10..=1 << 20).contains(&l.max_request_headers_bytes) {
            return Err(err(
                "limits.maxRequestHeadersBytes",
                "must be between 8Ki and 1Mi (default 60Ki)".into(),
            ));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            between(
                &format!("clusters[{i}].timeout"),
                c.timeout,
                ms(1),
                24 * hour,
            )?;
            let b = &c.circuit_breakers;
            for (name, v) in [
                ("maxConnections", b.max_connections),
                ("maxPendingRequests", b.max_pending_requests),
                ("maxRequests", b.max_requests),
            ] {
                if v == 0 {
                    return Err(err(
                        &format!("clusters[{i}].circuitBreakers.{name}"),
                        "must be at least 1 (default 1024)".into(),
                    ));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(d) = r.timeout {
                between(&format!("routes[{i}].timeout"), d, ms(1), 24 * hour)?;
            }
        }
        Ok(())
    }

    /// TCP listeners and the plugin types: every combination that cannot work is refused here.
    fn validate_plugin_types(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: String, message: String| ConfigError {
            file: file.to_string(),
            field,
            message,
        };
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let field = |f: &str| format!("listeners[{i}].{f}");
            if !l.name.is_empty() && !names.insert(l.name.as_str()) {
                return Err(err(
                    field("name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            match (l.protocol, &l.cluster) {
                (ListenerProtocol::TCP, None) => {
                    return Err(err(
                        field("cluster"),
                        "a TCP listener proxies every connection to one cluster: name it in `cluster`".into(),
                    ));
                }
                (ListenerProtocol::TCP, Some(c)) if !self.clusters.iter().any(|k| &k.name == c) => {
                    return Err(err(
                        field("cluster"),
                        format!(
                            "no cluster named {c:?}; defined clusters: {:?}",
                            self.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
                        ),
                    ));
                }
                (ListenerProtocol::TCP, Some(c))
                    if self
                        .clusters
                        .iter()
                        .any(|k| &k.name == c && k.builtin.is_some()) =>
                {
                    return Err(err(
                        field("cluster"),
                        format!(
                            "cluster {c:?} is a built-in HTTP upstream; a TCP listener needs a cluster with endpoints"
                        ),
                    ));
                }
                (ListenerProtocol::HTTP, Some(_)) => {
                    return Err(err(
                        field("cluster"),
                        "only TCP listeners have a cluster; HTTP listeners route with `routes`"
                            .into(),
                    ));
                }
                _ => {}
            }
            if l.http2_only && (l.protocol == ListenerProtocol::TCP || l.tls.is_some()) {
                return Err(err(
                    field("http2Only"),
                    "http2Only applies to plain HTTP listeners: on a TLS listener ALPN chooses the protocol, and a TCP listener speaks no HTTP".into(),
                ));
            }
            if l.protocol == ListenerProtocol::TCP
                && (l.connect_timeout.is_zero() || l.idle_timeout.is_zero())
            {
                return Err(err(
                    field("connectTimeout"),
                    "connectTimeout and idleTimeout must be more than zero".into(),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate().filter(|(_, r)| r.connect) {
            if !r.matches.path_prefixes.is_empty() {
                return Err(err(
                    format!("routes[{i}].match.pathPrefixes"),
                    "a CONNECT request has no path: a connect route matches by hosts only".into(),
                ));
            }
            if self
                .clusters
                .iter()
                .any(|c| c.name == r.cluster && c.builtin.is_some())
            {
                return Err(err(
                    format!("routes[{i}].cluster"),
                    format!(
                        "cluster {:?} is a built-in HTTP upstream; a CONNECT tunnel needs a cluster with endpoints",
                        r.cluster
                    ),
                ));
            }
        }
        for (i, f) in self.filters.iter().enumerate() {
            let field = |x: &str| format!("filters[{i}].{x}");
            let has_match = !(f.matches.hosts.is_empty()
                && f.matches.path_prefixes.is_empty()
                && f.matches.methods.is_empty());
            match f.plugin_type {
                PluginType::HTTP if !f.listeners.is_empty() => {
                    return Err(err(
                        field("listeners"),
                        "listeners chooses TCP listeners for a Network filter; an HTTP filter runs on the HTTP listeners and is scoped with `match`".into(),
                    ));
                }
                PluginType::Network | PluginType::Service if has_match => {
                    return Err(err(
                        field("match"),
                        format!(
                            "a {:?} plugin sees no HTTP requests, so an HTTP `match` can never apply; remove it{}",
                            f.plugin_type,
                            if f.plugin_type == PluginType::Network {
                                " and choose TCP listeners with `listeners`"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                PluginType::Service if !f.listeners.is_empty() => {
                    return Err(err(
                        field("listeners"),
                        "a Service plugin is bound to no listener; remove `listeners`".into(),
                    ));
                }
                PluginType::Network | PluginType::Service if f.native.is_some() => {
                    return Err(err(
                        field("type"),
                        "native filters are HTTP filters; a Network or Service plugin needs a module or image".into(),
                    ));
                }
                _ => {}
            }
            for (j, name) in f.listeners.iter().enumerate() {
                match self.listeners.iter().find(|l| &l.name == name) {
                    Some(l) if l.protocol == ListenerProtocol::TCP => {}
                    Some(_) => {
                        return Err(err(
                            format!("filters[{i}].listeners[{j}]"),
                            format!(
                                "listener {name:?} is an HTTP listener; network filters run on TCP listeners"
                            ),
                        ));
                    }
                    None => {
                        return Err(err(
                            format!("filters[{i}].listeners[{j}]"),
                            format!(
                                "no listener named {name:?}; named listeners: {:?}",
                                self.listeners
                                    .iter()
                                    .filter(|l| !l.name.is_empty())
                                    .map(|l| &l.name)
                                    .collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every listener: `listen` (with `tls`) first, then `listeners`.
    pub fn all_listeners(&self) -> Vec<Listener> {
        let mut all: Vec<Listener> = self
            .listen
            .iter()
            .map(|address| Listener::http(address.clone(), self.tls.clone()))
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

/// An operator address is a URI with a host, an optional port and nothing else.
fn check_operator_uri(text: &str) -> Result<(), String> {
    let example = "like https://wasmfilter-operator.wasmfilter-system.svc:7070";
    let uri: http::Uri = text.parse().map_err(|e| {
        format!("{text:?} is not a valid URI ({e}): expected scheme://host:port, {example}")
    })?;
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err(format!(
            "{text:?} has no host: expected scheme://host:port, {example}"
        ));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{text:?} carries user information; give only scheme://host:port"
        ));
    }
    if let Some(port) = uri.port_u16()
        && port == 0
    {
        return Err(format!(
            "{text:?}: port 0 cannot be connected to; {example}"
        ));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!(
            "{text:?} has a path or query, which the operator link does not use: give only scheme://host:port"
        ));
    }
    Ok(())
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
