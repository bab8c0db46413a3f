//! Managed mode: the dataplane takes its filters from the operator.
//!
//! One thread holds the FilterDiscovery stream (reconnecting with backoff and jitter). For each
//! Snapshot it fetches the modules it does not hold (verified by digest), compiles and starts
//! each new or changed filter in a fresh VM off the request path, swaps the chain in one step
//! and answers with an Ack naming the filters it refused. A refused filter keeps its last good
//! revision; the others go live regardless. What runs is persisted in `stateDir`, so a
//! restart serves the last good chain before (or without) the operator.
//!
//! **Incomplete snapshots never strip the chain.** A snapshot without `complete` (an operator
//! that has not yet seen the whole truth, or one too old to say) that lists no filters while
//! the dataplane runs at least one from the operator is refused whole: the running chain
//! stays, nothing is written to `stateDir`, a warning says so, the refusal is counted
//! (`wasmfilter_managed_snapshots_refused_total`), and no Ack is sent. No Ack, because the
//! operator derives what a dataplane runs from its Acks (the acknowledged snapshot's filters,
//! less the refused ones, plus the revisions they keep): an Ack for an empty snapshot would
//! record "runs nothing" whatever errors it carried, while silence leaves the operator's record
//! at the last Ack, which is what still runs. The next snapshot is applied and acknowledged as
//! usual, and a complete empty one removes every filter. A snapshot that lists filters is
//! never refused this way, even if none of them loads (each then keeps its own last good
//! revision, or is NACKed).
//!
//! Configurations are copied out of the received message once per filter, into buffers shared
//! by the filter's VMs: a `Bytes` field of a decoded message is a slice of the whole receive
//! buffer, so keeping it would keep every byte of the snapshot that introduced the filter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wasmfilter_api::control::filter_discovery_client::FilterDiscoveryClient;
use wasmfilter_api::control::{
    self, Ack, DataplaneMessage, FetchModuleRequest, FilterError, Hello, Snapshot, Stats,
    control_message, dataplane_message,
};
use wasmfilter_api::{FailurePolicy, Phase, RequestMatch};
use wasmfilter_host::LogLevel;

use crate::chain::{FilterDef, LoadedFilter, next_generation};
use crate::config::OperatorLink;
use crate::state::State;

/// Every limit of managed mode, in one place.
pub mod limits {
    use std::time::Duration;
    pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest module accepted from the operator (its own cap is the same).
    pub const MAX_MODULE_BYTES: u64 = 64 << 20;
    /// Largest snapshot accepted.
    pub const MAX_SNAPSHOT_BYTES: usize = 64 << 20;
}

/// Where managed state lives: `snapshot.pb` (the filters running, as a Snapshot) and
/// `modules/<hex>.wasm` (their modules, named by the sha256 of their bytes).
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(dir.join("modules"))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn module_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join("modules").join(format!("{hex}.wasm")))
    }

    /// The module with this digest, if held and intact.
    pub fn read_module(&self, digest: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.module_path(digest)?).ok()?;
        (sha256_digest(&bytes) == digest).then_some(bytes)
    }

    fn write_module(&self, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self
            .module_path(digest)
            .ok_or_else(|| std::io::Error::other(format!("bad digest {digest:?}")))?;
        write_atomically(&path, bytes)
    }

    /// Digests of the modules held.
    pub fn digests(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("modules")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let hex = name.strip_suffix(".wasm")?;
                (hex.len() == 64).then(|| format!("sha256:{hex}"))
            })
            .collect()
    }

    /// Records the filters now running, then drops modules none of them uses.
    pub fn save(&self, filters: Vec<control::Filter>) -> std::io::Result<()> {
        let keep: std::collections::HashSet<String> =
            filters.iter().map(|f| f.module_digest.clone()).collect();
        let snapshot = Snapshot {
            filters,
            ..Default::default()
        };
        write_atomically(&self.dir.join("snapshot.pb"), &snapshot.encode_to_vec())?;
        for digest in self.digests() {
            if !keep.contains(&digest)
                && let Some(path) = self.module_path(&digest)
            {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Whether a snapshot was ever applied here.
    pub fn has_saved(&self) -> bool {
        self.dir.join("snapshot.pb").exists()
    }

    /// The filters that ran when the dataplane last applied a snapshot.
    pub fn load(&self) -> Vec<control::Filter> {
        match std::fs::read(self.dir.join("snapshot.pb")) {
            Ok(bytes) => match Snapshot::decode(bytes.as_slice()) {
                Ok(s) => s.filters,
                Err(e) => {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "the saved snapshot is unreadable; starting without managed filters");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An owned copy of a received buffer, for sharing: see the module doc.
fn shared(bytes: &[u8]) -> Arc<[u8]> {
    Arc::from(bytes)
}

/// Wire → definition. The operator validated the WasmFilter; this only refuses what a newer
/// operator could send that this dataplane does not understand.
fn definition(f: &control::Filter) -> Result<FilterDef, String> {
    let phase = match control::Phase::try_from(f.phase) {
        Ok(control::Phase::Authn) => Phase::Authn,
        Ok(control::Phase::Authz) => Phase::Authz,
        Ok(control::Phase::Stats) => Phase::Stats,
        Ok(control::Phase::Default) => Phase::Default,
        Err(_) => {
            return Err(format!(
                "unknown phase {} (is the operator newer?)",
                f.phase
            ));
        }
    };
    let failure_policy = match control::FailurePolicy::try_from(f.failure_policy) {
        Ok(control::FailurePolicy::FailClosed) => FailurePolicy::FailClosed,
        Ok(control::FailurePolicy::FailOpen) => FailurePolicy::FailOpen,
        Err(_) => {
            return Err(format!(
                "unknown failure policy {} (is the operator newer?)",
                f.failure_policy
            ));
        }
    };
    if f.memory_limit_bytes == 0 || f.callback_timeout_ms == 0 {
        return Err("memory limit and callback timeout must be set".into());
    }
    let m = f.r#match.clone().unwrap_or_default();
    let configuration = shared(&f.configuration);
    let vm_configuration = shared(&f.vm_configuration);
    // The definition kept for stateDir shares those buffers too.
    let kept = control::Filter {
        configuration: prost::bytes::Bytes::from_owner(configuration.clone()),
        vm_configuration: prost::bytes::Bytes::from_owner(vm_configuration.clone()),
        ..f.clone()
    };
    Ok(FilterDef {
        name: f.name.clone(),
        root_id: f.root_id.clone(),
        configuration,
        vm_id: f.vm_id.clone(),
        vm_configuration,
        env: f.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        matches: RequestMatch {
            hosts: m.hosts,
            path_prefixes: m.path_prefixes,
            methods: m.methods,
        }
        .normalized()
        .map_err(|(field, message)| format!("match.{field}: {message}"))?,
        phase,
        priority: f.priority,
        failure_policy,
        memory_limit: f
            .memory_limit_bytes
            .min(wasmfilter_host::limits::MAX_MEMORY_LIMIT_BYTES as u64)
            as usize,
        callback_timeout: Duration::from_millis(f.callback_timeout_ms.into()),
        // The control protocol carries no quotas yet: managed filters get the defaults.
        quotas: wasmfilter_host::Quotas::default(),
        log_level: LogLevel::Info,
        plugin_type: match f.plugin_type() {
            control::PluginType::Http => crate::config::PluginType::HTTP,
            control::PluginType::Network => crate::config::PluginType::Network,
            control::PluginType::Service => crate::config::PluginType::Service,
        },
        listeners: f.listeners.clone(),
        managed: Some((f.revision.clone(), kept)),
    })
}

/// Loads the filters saved by the last run (those whose modules are still on disk and start).
/// Runs before the listeners open, so a restarted dataplane serves its last good chain at
/// once.
pub fn restore(
    dir: &StateDir,
    host: &Arc<wasmfilter_host::Host>,
    metrics: &crate::metrics::Metrics,
    embedder: Arc<crate::chain::ClusterNames>,
) -> Vec<Arc<LoadedFilter>> {
    let mut restored = Vec::new();
    for f in dir.load() {
        let loaded = dir
            .read_module(&f.module_digest)
            .ok_or_else(|| {
                format!(
                    "module {} is missing from the state directory",
                    f.module_digest
                )
            })
            .and_then(|bytes| {
                let def = definition(&f)?;
                LoadedFilter::load(
                    host,
                    def,
                    &bytes,
                    next_generation(),
                    metrics,
                    embedder.clone(),
                )
            });
        match loaded {
            Ok(filter) => restored.push(Arc::new(filter)),
            Err(e) => tracing::warn!(filter = %f.name, error = %e, "saved filter not restored"),
        }
    }
    if !restored.is_empty() {
        tracing::info!(
            filters = restored.len(),
            "serving the last applied snapshot until the operator answers"
        );
    }
    restored
}

/// Starts the thread that keeps the operator link up until shutdown begins
/// (`State::shutdown`).
pub fn spawn(
    link: OperatorLink,
    config_file: PathBuf,
    dir: StateDir,
    state: Arc<State>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("operator-link".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("operator link runtime");
            rt.block_on(run(link, config_file, dir, state));
        })
}

async fn run(link: OperatorLink, config_file: PathBuf, dir: StateDir, state: Arc<State>) {
    let id = link.dataplane_id();
    let mut backoff = limits::BACKOFF_MIN;
    while !state.shutdown.is_cancelled() {
        let started = Instant::now();
        match session(&link, &config_file, &id, &dir, &state).await {
            Ok(()) => tracing::info!("operator stream closed"),
            Err(e) => {
                state.link.connected.store(false, Ordering::SeqCst);
                // `{:#}`: the whole cause chain (a transport error alone says nothing).
                tracing::warn!(operator = %link.address, error = format!("{e:#}"), "operator unreachable; serving the current chain, retrying")
            }
        }
        state.link.connected.store(false, Ordering::SeqCst);
        if started.elapsed() > limits::BACKOFF_MAX {
            backoff = limits::BACKOFF_MIN;
        }
        // Full jitter over the upper half, so a fleet does not reconnect in lockstep.
        let wait = backoff / 2 + backoff.mul_f64(jitter() / 2.0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => {}
        }
        backoff = (backoff * 2).min(limits::BACKOFF_MAX);
    }
}

/// A number in [0, 1).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
}

async fn channel(link: &OperatorLink, config_file: &Path) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(link.address.clone())?
        .connect_timeout(limits::CONNECT_TIMEOUT)
        .http2_keep_alive_interval(limits::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(limits::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = &link.tls {
        let read = |p: &Path, field: &str| {
            let path = crate::config::Config::module_path(config_file, p);
            std::fs::read(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: operator.tls.{field}: {}: {e}",
                    config_file.display(),
                    path.display()
                )
            })
        };
        endpoint = endpoint.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&tls.ca_file, "caFile")?))
                .identity(Identity::from_pem(
                    read(&tls.cert_file, "certFile")?,
                    read(&tls.key_file, "keyFile")?,
                )),
        )?;
    }
    Ok(endpoint.connect().await?)
}

async fn session(
    link: &OperatorLink,
    config_file: &Path,
    id: &str,
    dir: &StateDir,
    state: &Arc<State>,
) -> anyhow::Result<()> {
    // Everything up to the stream's response head under one deadline: tonic's connect
    // timeout covers the TCP connect only, so a peer that accepts and then says nothing
    // (no TLS ServerHello, no HTTP/2 answer) would otherwise hang the link forever.
    let handshake = async {
        let channel = channel(link, config_file).await?;
        let mut client = FilterDiscoveryClient::new(channel)
            .max_decoding_message_size(limits::MAX_SNAPSHOT_BYTES);
        let (tx, rx) = mpsc::channel(16);
        tx.send(DataplaneMessage {
            kind: Some(dataplane_message::Kind::Hello(Hello {
                id: id.to_string(),
                labels: link.labels.clone().into_iter().collect(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                module_digests: dir.digests(),
                applied_version: state.link.applied_version.load(Ordering::SeqCst),
            })),
        })
        .await?;
        let inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow::anyhow!("opening the stream: {s}"))?
            .into_inner();
        anyhow::Ok((client, tx, inbound))
    };
    let stopped = state.shutdown.cancelled();
    let (mut client, tx, mut inbound) = tokio::select! {
        r = tokio::time::timeout(link.handshake_timeout, handshake) => r.map_err(|_| {
            anyhow::anyhow!(
                "handshake timed out after {:?} (operator.handshakeTimeout): the peer accepted the connection but did not complete TLS, HTTP/2 or the stream's opening; is this the operator's gRPC port?",
                link.handshake_timeout
            )
        })??,
        _ = stopped => return Ok(()),
    };
    tracing::info!(operator = %link.address, %id, "connected to the operator");
    let mut stats = tokio::time::interval(link.stats_interval);
    stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                let Some(control_message::Kind::Snapshot(snapshot)) = message.kind else { continue };
                state.link.connected.store(true, Ordering::SeqCst);
                let version = snapshot.version;
                if let Some(running) = strips_incomplete(state, &snapshot) {
                    state.metrics.snapshot_refused();
                    tracing::warn!(version, "the operator sent an incomplete snapshot that would remove all {running} filters; keeping the running chain until a complete one arrives");
                    // No Ack: see the module doc.
                    continue;
                }
                let errors = apply(state, dir, &mut client, snapshot).await;
                state.link.applied_version.store(version, Ordering::SeqCst);
                state.link.synced.store(true, Ordering::SeqCst);
                tx.send(DataplaneMessage {
                    kind: Some(dataplane_message::Kind::Ack(Ack { version, errors })),
                })
                .await?;
            }
            _ = stats.tick() => {
                tx.send(DataplaneMessage {
                    kind: Some(dataplane_message::Kind::Stats(report(state))),
                })
                .await?;
            }
            _ = state.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Whether `snapshot` is one to refuse whole (module doc): not complete, no filters, while
/// the dataplane runs some from the operator. Returns how many it runs.
fn strips_incomplete(state: &State, snapshot: &Snapshot) -> Option<usize> {
    let running = state.active.load().managed().len();
    (!snapshot.complete && snapshot.filters.is_empty() && running > 0).then_some(running)
}

/// Applies one snapshot; returns the filters refused. Serialized with reloads by the swap
/// lock, so neither loses the other's change.
pub async fn apply(
    state: &Arc<State>,
    dir: &StateDir,
    client: &mut FilterDiscoveryClient<Channel>,
    snapshot: Snapshot,
) -> Vec<FilterError> {
    let current: HashMap<String, Arc<LoadedFilter>> = state
        .active
        .load()
        .managed()
        .into_iter()
        .map(|f| (f.name.clone(), f))
        .collect();
    let mut next = Vec::new();
    let mut errors = Vec::new();
    let mut seen = BTreeMap::new();
    for f in snapshot.filters {
        if seen.insert(f.name.clone(), ()).is_some() {
            continue;
        }
        let running = current.get(&f.name);
        if let Some(cur) = running
            && cur.revision() == f.revision
        {
            next.push(cur.clone());
            continue;
        }
        match load(state, dir, client, &f).await {
            Ok(filter) => {
                tracing::info!(filter = %f.name, revision = %f.revision, digest = %f.module_digest, "filter loaded");
                next.push(Arc::new(filter));
            }
            Err(message) => {
                tracing::warn!(filter = %f.name, revision = %f.revision, error = %message, keeps = running.map(|r| r.revision()).unwrap_or(""), "filter refused");
                errors.push(FilterError {
                    name: f.name.clone(),
                    revision: f.revision.clone(),
                    message,
                    running_revision: running
                        .map(|r| r.revision().to_string())
                        .unwrap_or_default(),
                });
                if let Some(cur) = running {
                    next.push(cur.clone());
                }
            }
        }
    }
    let saved: Vec<control::Filter> = next
        .iter()
        .filter_map(|f| f.managed.as_ref().map(|(_, def)| def.clone()))
        .collect();
    {
        let _swap = state.swap.lock();
        let active = state.active.load().with_managed(next);
        state.active.store(Arc::new(active));
    }
    if let Err(e) = dir.save(saved) {
        tracing::warn!(error = %e, "could not save the applied snapshot; a restart would not have it");
    }
    errors
}

/// Brings one filter up: its module from disk or the operator, then compile and start.
async fn load(
    state: &Arc<State>,
    dir: &StateDir,
    client: &mut FilterDiscoveryClient<Channel>,
    f: &control::Filter,
) -> Result<LoadedFilter, String> {
    let def = definition(f)?;
    let bytes = match dir.read_module(&f.module_digest) {
        Some(bytes) => bytes,
        None => {
            let bytes = fetch(client, &f.module_digest).await?;
            dir.write_module(&f.module_digest, &bytes)
                .map_err(|e| format!("saving module {}: {e}", f.module_digest))?;
            bytes
        }
    };
    let host = state.host.clone();
    let embedder = state.active.load().embedder.clone();
    let state = state.clone();
    // Compiling takes milliseconds to seconds: off this thread's event loop, which keeps
    // answering keepalives.
    tokio::task::spawn_blocking(move || {
        LoadedFilter::load(
            &host,
            def,
            &bytes,
            next_generation(),
            &state.metrics,
            embedder,
        )
    })
    .await
    .map_err(|e| format!("loading panicked: {e}"))?
}

/// Fetches a module by digest and checks that the bytes are the ones named.
async fn fetch(
    client: &mut FilterDiscoveryClient<Channel>,
    digest: &str,
) -> Result<Vec<u8>, String> {
    let mut chunks = client
        .fetch_module(FetchModuleRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|s| format!("fetching module {digest}: {}", s.message()))?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks
        .message()
        .await
        .map_err(|s| format!("fetching module {digest}: {}", s.message()))?
    {
        if chunk.total_size > limits::MAX_MODULE_BYTES
            || bytes.len() as u64 + chunk.data.len() as u64 > limits::MAX_MODULE_BYTES
        {
            return Err(format!(
                "module {digest} is larger than {} bytes",
                limits::MAX_MODULE_BYTES
            ));
        }
        if bytes.is_empty() && chunk.total_size > 0 {
            bytes.reserve(chunk.total_size as usize);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let actual = sha256_digest(&bytes);
    if actual != digest {
        return Err(format!(
            "module fetched as {digest} has digest {actual}; refused"
        ));
    }
    Ok(bytes)
}

/// Every managed filter's stats, plus the metrics its module defined.
fn report(state: &State) -> Stats {
    let active = state.active.load();
    Stats {
        filters: active
            .filters
            .iter()
            .filter(|f| f.managed.is_some())
            .map(|f| {
                let mut s = f.metrics.report(&f.name, f.revision());
                s.module_metrics = f
                    .spec
                    .metrics
                    .snapshot()
                    .into_iter()
                    .map(|m| control::ModuleMetric {
                        name: m.name,
                        labels: m.labels.into_iter().collect(),
                        kind: match m.kind {
                            wasmfilter_host::MetricType::Counter => {
                                control::module_metric::Kind::Counter
                            }
                            wasmfilter_host::MetricType::Gauge => {
                                control::module_metric::Kind::Gauge
                            }
                            wasmfilter_host::MetricType::Histogram => {
                                control::module_metric::Kind::Histogram
                            }
                        } as i32,
                        value: m.value,
                    })
                    .collect();
                s
            })
            .collect(),
    }
}
