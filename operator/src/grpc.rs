//! The FilterDiscovery gRPC service: a thin layer that turns dataplane streams into calls on
//! the [`ControlPlane`] and chain changes into Snapshots.
//!
//! One task per stream. It never blocks on another stream: snapshots go out through a small
//! per-stream queue, and a stream whose queue is full is simply sent the then-current chain
//! once it drains (snapshots are complete, so skipping intermediate ones loses nothing).

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use wasmfilter_api::control::filter_discovery_server::{FilterDiscovery, FilterDiscoveryServer};
use wasmfilter_api::control::{
    self, ControlMessage, DataplaneMessage, FetchModuleRequest, ModuleChunk, Snapshot,
    control_message, dataplane_message,
};
use wasmfilter_api::{FailurePolicy, Phase, PluginType};

use crate::control::ControlPlane;
use crate::index::FilterVersion;

/// Every limit of the control protocol's server, in one place.
pub mod limits {
    use std::time::Duration;
    /// Time to wait for a new stream's Hello.
    pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
    /// Chain changes within this window reach a dataplane as one snapshot.
    pub const DEBOUNCE: Duration = Duration::from_millis(100);
    /// Snapshots queued per stream before the stream counts as slow.
    pub const STREAM_QUEUE: usize = 2;
    /// Largest message a dataplane may send (Hello with many digests, Stats of many filters).
    pub const MAX_INBOUND_MESSAGE: usize = 4 << 20;
    /// Largest message sent: a snapshot of a long chain with large configurations.
    pub const MAX_OUTBOUND_MESSAGE: usize = 64 << 20;
    /// Default of `--snapshot-budget`, the largest Snapshot the index lets a dataplane's chain
    /// reach: half of [`MAX_OUTBOUND_MESSAGE`], so the budget is hit (and named in the status of
    /// the filters left out) long before the message limit would fail every change.
    pub const SNAPSHOT_BUDGET: usize = 32 << 20;
    /// Module bytes per FetchModule chunk.
    pub const CHUNK: usize = 1 << 20;
    /// HTTP/2 pings that detect dead dataplanes (and keep NATs open).
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Concurrent RPCs per connection (one stream plus a few fetches per dataplane).
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
    /// Sent snapshots remembered per stream while their Acks are outstanding.
    pub const PENDING_ACKS: usize = 8;
}

/// The service, over the control plane it serves.
#[derive(Clone)]
pub struct Discovery {
    control: Arc<ControlPlane>,
    debounce: Duration,
}

impl Discovery {
    pub fn new(control: Arc<ControlPlane>) -> Discovery {
        Discovery {
            control,
            debounce: limits::DEBOUNCE,
        }
    }

    pub fn into_server(self) -> FilterDiscoveryServer<Discovery> {
        FilterDiscoveryServer::new(self)
            .max_decoding_message_size(limits::MAX_INBOUND_MESSAGE)
            .max_encoding_message_size(limits::MAX_OUTBOUND_MESSAGE)
    }
}

/// mTLS material of the server: its certificate and the CA dataplane certificates must chain to.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
}

impl ServerTls {
    pub fn from_files(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<ServerTls> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("{what} {}: {e}", p.display()))
        };
        Ok(ServerTls {
            cert_pem: read(cert, "--tls-cert")?,
            key_pem: read(key, "--tls-key")?,
            client_ca_pem: read(client_ca, "--tls-client-ca")?,
        })
    }
}

/// Serves FilterDiscovery on `listener` until `shutdown` completes. With `tls`, every
/// dataplane must present a certificate signed by its client CA.
pub async fn serve(
    control: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(limits::MAX_STREAMS_PER_CONNECTION))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
                .client_ca_root(Certificate::from_pem(tls.client_ca_pem)),
        )?;
    }
    builder
        .add_service(Discovery::new(control).into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<ModuleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl FilterDiscovery for Discovery {
    type StreamStream = ControlStream;
    type FetchModuleStream = ChunkStream;

    async fn stream(
        &self,
        request: Request<Streaming<DataplaneMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(limits::HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(DataplaneMessage {
                kind: Some(dataplane_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be Hello",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        if hello.id.is_empty() || hello.id.len() > 253 {
            return Err(Status::invalid_argument(
                "Hello.id must be 1 to 253 characters (the dataplane's operator.id or WASMFILTER_DATAPLANE_ID)",
            ));
        }
        let labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        tracing::info!(dataplane = %hello.id, ?labels, version = %hello.version, held = hello.module_digests.len(), "dataplane connected");
        let session = self.control.connect(&hello.id, labels.clone());
        let (tx, rx) = mpsc::channel(limits::STREAM_QUEUE);
        tokio::spawn(run_session(
            self.control.clone(),
            self.debounce,
            hello.id,
            session,
            labels,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_module(
        &self,
        request: Request<FetchModuleRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let digest = request.into_inner().digest;
        if wasmfilter_oci::cache::digest_hex(&digest).is_none() {
            return Err(Status::invalid_argument(format!(
                "digest {digest:?} is not sha256:<64 hex>"
            )));
        }
        if !self.control.published_digests().contains(&digest) {
            return Err(Status::not_found(format!(
                "no published filter uses module {digest}"
            )));
        }
        let bytes = match self.control.modules().get(&digest) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(Status::not_found(format!(
                    "module {digest} is not in the operator's cache"
                )));
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        let counters = &self.control.counters;
        counters.module_fetches.fetch_add(1, Ordering::Relaxed);
        counters
            .module_bytes_served
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let total = bytes.len() as u64;
        let chunks: Vec<Result<ModuleChunk, Status>> = bytes
            .chunks(limits::CHUNK)
            .enumerate()
            .map(|(i, c)| {
                Ok(ModuleChunk {
                    data: bytes.slice_ref(c),
                    total_size: if i == 0 { total } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// One dataplane's stream: sends its chain whenever it changes, records its Acks and Stats.
async fn run_session(
    control: Arc<ControlPlane>,
    debounce: Duration,
    id: String,
    session: u64,
    labels: BTreeMap<String, String>,
    mut inbound: Streaming<DataplaneMessage>,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
) {
    let mut chains = control.subscribe_chains();
    // No snapshot before the control plane is synced: until then the dataplane keeps its chain.
    let mut synced = control.subscribe_synced();
    let mut version = 0u64;
    let mut last_sent: Option<BTreeMap<String, String>> = None;
    let mut pending: BTreeMap<u64, BTreeMap<String, String>> = BTreeMap::new();
    let mut dirty = true;
    loop {
        let is_synced = *synced.borrow();
        if dirty && is_synced {
            dirty = false;
            let chain = control.chain_for(&labels);
            let revisions: BTreeMap<String, String> = chain
                .iter()
                .map(|(f, rev)| (f.key.to_string(), rev.clone()))
                .collect();
            if last_sent.as_ref() != Some(&revisions) {
                let snapshot = Snapshot {
                    version: version + 1,
                    filters: chain.iter().map(|(f, rev)| to_proto(f, rev)).collect(),
                    // Sessions are served only once the control plane is synced (initial list
                    // processed, every filter reconciled once), so every snapshot is the whole truth.
                    complete: true,
                };
                let message = ControlMessage {
                    kind: Some(control_message::Kind::Snapshot(snapshot)),
                };
                let size = prost::Message::encoded_len(&message) as u64;
                match tx.try_send(Ok(message)) {
                    Ok(()) => {
                        version += 1;
                        let counters = &control.counters;
                        counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                        counters
                            .snapshot_bytes_sent
                            .fetch_add(size, Ordering::Relaxed);
                        pending.insert(version, revisions.clone());
                        while pending.len() > limits::PENDING_ACKS {
                            pending.pop_first();
                        }
                        last_sent = Some(revisions);
                    }
                    // Slow reader: retry with the then-current chain once it drains.
                    Err(mpsc::error::TrySendError::Full(_)) => dirty = true,
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
        tokio::select! {
            changed = chains.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::time::sleep(debounce).await;
                chains.borrow_and_update();
                dirty = true;
            }
            message = inbound.message() => match message {
                Ok(Some(DataplaneMessage { kind: Some(kind) })) => match kind {
                    dataplane_message::Kind::Ack(ack) => {
                        let Some(sent) = pending.get(&ack.version) else {
                            tracing::debug!(dataplane = %id, version = ack.version, "Ack for an unknown or old snapshot");
                            continue;
                        };
                        let refused = ack
                            .errors
                            .into_iter()
                            .map(|e| {
                                let keeps = (!e.running_revision.is_empty()).then_some(e.running_revision);
                                (e.name, (e.revision, truncate(e.message, 1024), keeps))
                            })
                            .collect::<BTreeMap<_, _>>();
                        if !refused.is_empty() {
                            tracing::warn!(dataplane = %id, version = ack.version, ?refused, "dataplane refused filters");
                        }
                        control.acknowledge(&id, sent, &refused);
                        // Older snapshots can no longer be acknowledged meaningfully.
                        let acked = ack.version;
                        pending.retain(|v, _| *v > acked);
                    }
                    dataplane_message::Kind::Stats(stats) => control.report_stats(&id, stats.filters),
                    dataplane_message::Kind::Hello(_) => {
                        let _ = tx.try_send(Err(Status::invalid_argument("Hello is only the first message of a stream")));
                        break;
                    }
                },
                Ok(Some(DataplaneMessage { kind: None })) => {}
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(dataplane = %id, %status, "dataplane stream failed");
                    break;
                }
            },
            _ = synced.changed(), if !is_synced => {}
            _ = tokio::time::sleep(debounce), if dirty && is_synced => {}
        }
    }
    tracing::info!(dataplane = %id, "dataplane disconnected");
    control.disconnect(&id, session);
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Domain → wire.
pub fn to_proto(f: &FilterVersion, revision: &str) -> control::Filter {
    control::Filter {
        name: f.key.to_string(),
        revision: revision.to_string(),
        module_digest: f.module_digest.clone(),
        module_size: f.module_size,
        root_id: f.root_id.clone(),
        configuration: f.configuration.clone().into(),
        vm_id: f.vm_id.clone(),
        vm_configuration: f.vm_configuration.clone().into(),
        env: f.env.clone().into_iter().collect(),
        r#match: Some(control::RequestMatch {
            hosts: f.matches.hosts.clone(),
            path_prefixes: f.matches.path_prefixes.clone(),
            methods: f.matches.methods.clone(),
        }),
        phase: match f.phase {
            Phase::Authn => control::Phase::Authn,
            Phase::Authz => control::Phase::Authz,
            Phase::Stats => control::Phase::Stats,
            Phase::Default => control::Phase::Default,
        } as i32,
        priority: f.priority,
        failure_policy: match f.failure_policy {
            FailurePolicy::FailClosed => control::FailurePolicy::FailClosed,
            FailurePolicy::FailOpen => control::FailurePolicy::FailOpen,
        } as i32,
        memory_limit_bytes: f.limits.memory_bytes,
        callback_timeout_ms: f.limits.callback_timeout.as_millis().min(u32::MAX as u128) as u32,
        plugin_type: match f.plugin_type {
            PluginType::HTTP => control::PluginType::Http,
            PluginType::Network => control::PluginType::Network,
            PluginType::Service => control::PluginType::Service,
        } as i32,
        listeners: f.listeners.clone(),
    }
}
