//! The active configuration (routes, clusters, compiled filters), swapped atomically as one
//! value, and each worker's VMs for it.
//!
//! Standalone mode builds an [`Active`] from the YAML file (and again on reload); managed mode
//! will build it from the operator's snapshots. Either way requests see one consistent version:
//! a request loads the `Arc<Active>` once and keeps it to the end.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmfilter_api::control;
use wasmfilter_api::{FailurePolicy, Phase, RequestMatch, chain_order};
use wasmfilter_host::{
    CallbackError, Embedder, Host, LogLevel, MetricsRegistry, PluginModule, PluginSpec,
    PropertyValue, QueueReady, Vm, VmOptions,
};

use crate::config::{self, Builtin, Config, PluginType};

/// What runs a filter: a compiled proxy-wasm module (one VM per worker), or a filter built
/// into the dataplane ([`crate::native`]), called at the same points of the request path.
#[derive(Clone)]
pub enum FilterKind {
    Wasm(Arc<PluginModule>),
    Native {
        /// The name it was chosen by (`native:` in the configuration).
        name: String,
        filter: Arc<dyn crate::native::NativeFilter>,
    },
}

/// One filter of the chain, compiled and configured, shared by all workers.
pub struct LoadedFilter {
    pub name: String,
    pub kind: FilterKind,
    pub spec: PluginSpec,
    pub matches: RequestMatch,
    pub phase: Phase,
    pub priority: i32,
    pub failure_policy: FailurePolicy,
    pub vm_id: String,
    pub memory_limit: usize,
    pub callback_timeout: Duration,
    /// Quotas on the host resources the filter can grow (`limits` in the configuration).
    pub quotas: wasmfilter_host::Quotas,
    pub log_level: LogLevel,
    pub env: Vec<(String, String)>,
    /// Which traffic it sees: HTTP streams, TCP connections, or none (a service plugin).
    pub plugin_type: PluginType,
    /// Network filters: the TCP listeners they run on (empty: every one).
    pub listeners: Vec<String>,
    /// Which configuration version introduced this filter as it is now.
    pub version: u64,
    pub metrics: crate::metrics::FilterMetrics,
    /// Managed filters: the operator's revision and the definition it came in (persisted
    /// with the last applied snapshot). None for filters from the configuration file.
    pub managed: Option<(String, control::Filter)>,
}

/// A filter's definition, wherever it comes from (the configuration file or a snapshot).
pub struct FilterDef {
    pub name: String,
    pub root_id: String,
    /// Shared (not copied) by the filter's VMs on every worker; see [`PluginSpec`].
    pub configuration: Arc<[u8]>,
    pub vm_id: String,
    pub vm_configuration: Arc<[u8]>,
    pub env: Vec<(String, String)>,
    pub matches: RequestMatch,
    pub phase: Phase,
    pub priority: i32,
    pub failure_policy: FailurePolicy,
    pub memory_limit: usize,
    pub callback_timeout: Duration,
    /// Quotas on the host resources the filter can grow (`limits` in the configuration).
    pub quotas: wasmfilter_host::Quotas,
    pub log_level: LogLevel,
    pub plugin_type: PluginType,
    pub listeners: Vec<String>,
    pub managed: Option<(String, control::Filter)>,
}

impl LoadedFilter {
    /// Compiles `bytes` (or loads the compiled module from the cache) and starts the filter
    /// once in a fresh VM, so a module that fails `proxy_on_vm_start` or
    /// `proxy_on_configure` is refused here and never reaches traffic.
    pub fn load(
        host: &Arc<Host>,
        def: FilterDef,
        bytes: &[u8],
        version: u64,
        metrics: &crate::metrics::Metrics,
        embedder: Arc<ClusterNames>,
    ) -> Result<LoadedFilter, String> {
        let module = host.load(bytes).map_err(|e| e.to_string())?;
        let filter = LoadedFilter::new(FilterKind::Wasm(module), def, version, metrics);
        filter
            .instantiate(host, embedder)
            .map_err(|e| e.to_string())?;
        Ok(filter)
    }

    /// A native filter (`crate::native`), configured with the definition's configuration
    /// bytes; a configuration it refuses is refused here, as a Wasm filter's
    /// `proxy_on_configure` would be.
    pub fn native(
        native: &str,
        def: FilterDef,
        version: u64,
        metrics: &crate::metrics::Metrics,
    ) -> Result<LoadedFilter, String> {
        let filter = crate::native::build(native, &def.configuration)?;
        Ok(LoadedFilter::new(
            FilterKind::Native {
                name: native.to_string(),
                filter,
            },
            def,
            version,
            metrics,
        ))
    }

    fn new(
        kind: FilterKind,
        def: FilterDef,
        version: u64,
        metrics: &crate::metrics::Metrics,
    ) -> LoadedFilter {
        LoadedFilter {
            kind,
            spec: PluginSpec {
                name: def.name.clone(),
                root_id: def.root_id,
                vm_configuration: def.vm_configuration,
                configuration: def.configuration,
                metrics: Arc::new(MetricsRegistry::default()),
            },
            matches: def.matches,
            phase: def.phase,
            priority: def.priority,
            failure_policy: def.failure_policy,
            vm_id: def.vm_id,
            memory_limit: def.memory_limit,
            callback_timeout: def.callback_timeout,
            quotas: def.quotas,
            log_level: def.log_level,
            env: def.env,
            plugin_type: def.plugin_type,
            listeners: def.listeners,
            version,
            metrics: metrics.for_filter(&def.name),
            managed: def.managed,
            name: def.name,
        }
    }

    /// The compiled module, for a Wasm filter.
    pub fn module(&self) -> Option<&Arc<PluginModule>> {
        match &self.kind {
            FilterKind::Wasm(m) => Some(m),
            FilterKind::Native { .. } => None,
        }
    }

    /// The native filter, for a filter built into the dataplane.
    pub fn native_filter(&self) -> Option<&dyn crate::native::NativeFilter> {
        match &self.kind {
            FilterKind::Wasm(_) => None,
            FilterKind::Native { filter, .. } => Some(filter.as_ref()),
        }
    }

    /// Whether HTTP requests run this filter (network filters and service plugins never see
    /// one).
    pub fn is_http(&self) -> bool {
        self.plugin_type == PluginType::HTTP
    }

    /// Whether connections on the TCP listener `listener` run this network filter.
    pub fn runs_on_tcp_listener(&self, listener: &str) -> bool {
        self.plugin_type == PluginType::Network
            && (self.listeners.is_empty() || self.listeners.iter().any(|l| l == listener))
    }

    pub fn revision(&self) -> &str {
        self.managed.as_ref().map_or("", |(r, _)| r.as_str())
    }
}

pub struct ClusterEntry {
    pub config: config::Cluster,
    pub metadata: Option<PropertyValue>,
}

pub struct RouteEntry {
    pub config: config::Route,
    pub metadata: Option<PropertyValue>,
}

/// Everything a request needs, as one immutable value.
pub struct Active {
    pub generation: u64,
    pub routes: Arc<Vec<RouteEntry>>,
    pub clusters: Arc<HashMap<String, ClusterEntry>>,
    /// In chain order: phase, priority (higher first), name.
    pub filters: Vec<Arc<LoadedFilter>>,
    pub buffer_limit: usize,
    pub embedder: Arc<ClusterNames>,
    /// Request normalisation and trusted hops (`http` in the configuration).
    pub http: Arc<config::HttpOptions>,
}

/// Tells VMs which clusters callouts may target, and carries `proxy_on_queue_ready` to the
/// worker that owns the queue's VM.
pub struct ClusterNames(pub Vec<String>, pub QueueRoutes);

impl Embedder for ClusterNames {
    fn has_cluster(&self, cluster: &str) -> bool {
        self.0.iter().any(|c| c == cluster)
    }

    /// Called on the enqueuing thread (any worker): posts the notice to the owner VM's worker,
    /// which delivers it from its event loop (`timers::on_queue_ready`), once per enqueue.
    fn queue_ready(&self, ready: QueueReady) {
        let tx = self.1.0.lock().get(&ready.vm_instance).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(ready);
            }
            None => tracing::debug!(?ready, "queue item for a VM that is gone"),
        }
    }
}

/// Which worker runs each VM (by [`Vm::instance_id`]), for queue notices.
#[derive(Default)]
pub struct QueueRoutes(parking_lot::Mutex<HashMap<u64, QueueSender>>);

/// A worker's queue-notice inbox.
pub type QueueSender = tokio::sync::mpsc::UnboundedSender<QueueReady>;

thread_local! {
    /// This worker's queue-notice inbox, set when its event loop starts.
    static WORKER_QUEUE: RefCell<Option<QueueSender>> = const { RefCell::new(None) };
}

/// Makes `tx` the inbox of the VMs this worker creates from now on.
pub fn set_worker_queue(tx: QueueSender) {
    WORKER_QUEUE.with(|q| *q.borrow_mut() = Some(tx));
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A new configuration version; versions only grow.
pub fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// Phase, then priority (higher first), then name.
fn in_chain_order(mut filters: Vec<Arc<LoadedFilter>>) -> Vec<Arc<LoadedFilter>> {
    filters.sort_by_cached_key(|f| chain_order(f.phase, f.priority, &f.name));
    filters
}

fn metadata(value: &serde_json::Value) -> Option<PropertyValue> {
    (!value.is_null()).then(|| PropertyValue::from_json(value))
}

/// A filter that could not be loaded: its name and why, for the error message.
#[derive(Debug, thiserror::Error)]
#[error("{file}: filters[{index}] ({name}): {message}")]
pub struct FilterLoadError {
    pub file: String,
    pub index: usize,
    pub name: String,
    pub message: String,
}

impl Active {
    /// Compiles every filter of `config` (off the request path) and checks that each one
    /// starts: a module that fails `proxy_on_vm_start` or `proxy_on_configure` is refused here,
    /// so a bad filter never reaches traffic. `managed` filters (from the operator) join the
    /// chain as they are.
    pub fn build(
        host: &Arc<Host>,
        config: &Config,
        config_file: &Path,
        metrics: &crate::metrics::Metrics,
        managed: Vec<Arc<LoadedFilter>>,
    ) -> Result<Active, FilterLoadError> {
        let generation = next_generation();
        let embedder = Arc::new(ClusterNames(
            config.clusters.iter().map(|c| c.name.clone()).collect(),
            QueueRoutes::default(),
        ));
        let mut filters = Vec::new();
        for (index, f) in config.filters.iter().enumerate() {
            let fail = |message: String| FilterLoadError {
                file: config_file.display().to_string(),
                index,
                name: f.name.clone(),
                message,
            };
            let def = FilterDef {
                name: f.name.clone(),
                root_id: f.root_id.clone(),
                configuration: config::config_bytes(&f.config).into(),
                vm_id: f.vm.id.clone(),
                vm_configuration: config::config_bytes(&f.vm.config).into(),
                env: f
                    .vm
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                matches: f
                    .matches
                    .normalized()
                    .map_err(|(x, m)| fail(format!("match.{x}: {m}")))?,
                phase: f.phase,
                priority: f.priority,
                failure_policy: f.failure_policy,
                memory_limit: config::parse_quantity(&f.limits.memory).map_err(fail)?,
                callback_timeout: f.limits.callback_timeout,
                quotas: f.limits.quotas().map_err(|(_, m)| fail(m))?,
                log_level: f.log_level.parse().map_err(fail)?,
                plugin_type: f.plugin_type,
                listeners: f.listeners.clone(),
                managed: None,
            };
            if let Some(native) = &f.native {
                let filter = LoadedFilter::native(native, def, generation, metrics)
                    .map_err(|e| fail(format!("native {native}: {e}")))?;
                filters.push(Arc::new(filter));
                continue;
            }
            let (bytes, source) = match (&f.module, &f.image) {
                (Some(module), _) => {
                    let path = Config::module_path(config_file, module);
                    let bytes = std::fs::read(&path).map_err(|e| {
                        fail(format!(
                            "module {}: {e} (build it, or fix filters[{index}].module)",
                            path.display()
                        ))
                    })?;
                    (bytes, path.display().to_string())
                }
                (None, Some(image)) => {
                    let bytes = pull(image, f.sha256.as_deref(), &config.insecure_registries)
                        .map_err(|e| fail(format!("image {image}: {e}")))?;
                    (bytes, image.clone())
                }
                (None, None) => return Err(fail("no module or image".into())),
            };
            if let Some(pin) = &f.sha256 {
                let actual = sha256_hex(&bytes);
                if &actual != pin {
                    return Err(fail(format!(
                        "{source}: sha256 is {actual}, the configuration pins {pin}"
                    )));
                }
            }
            let filter =
                LoadedFilter::load(host, def, &bytes, generation, metrics, embedder.clone())
                    .map_err(|e| fail(format!("module {source}: {e}")))?;
            filters.push(Arc::new(filter));
        }
        filters.extend(managed);
        Ok(Active {
            generation,
            routes: Arc::new(
                config
                    .routes
                    .iter()
                    .map(|r| RouteEntry {
                        // Validated at load: the patterns normalise.
                        config: config::Route {
                            matches: r.matches.normalized().unwrap_or_else(|_| r.matches.clone()),
                            ..r.clone()
                        },
                        metadata: metadata(&r.metadata),
                    })
                    .collect(),
            ),
            clusters: Arc::new(
                config
                    .clusters
                    .iter()
                    .map(|c| {
                        (
                            c.name.clone(),
                            ClusterEntry {
                                config: c.clone(),
                                metadata: metadata(&c.metadata),
                            },
                        )
                    })
                    .collect(),
            ),
            filters: in_chain_order(filters),
            buffer_limit: config.buffer_limit_bytes,
            http: Arc::new(config.http.clone()),
            embedder,
        })
    }

    /// The same routes, clusters and file filters with a new set of managed filters, as a
    /// new generation.
    pub fn with_managed(&self, managed: Vec<Arc<LoadedFilter>>) -> Active {
        let mut filters: Vec<_> = self
            .filters
            .iter()
            .filter(|f| f.managed.is_none())
            .cloned()
            .collect();
        filters.extend(managed);
        Active {
            generation: next_generation(),
            routes: self.routes.clone(),
            clusters: self.clusters.clone(),
            filters: in_chain_order(filters),
            buffer_limit: self.buffer_limit,
            http: self.http.clone(),
            embedder: self.embedder.clone(),
        }
    }

    /// The filters that came from the operator.
    pub fn managed(&self) -> Vec<Arc<LoadedFilter>> {
        self.filters
            .iter()
            .filter(|f| f.managed.is_some())
            .cloned()
            .collect()
    }

    /// The first route whose match (and header conditions) accept the request.
    pub fn route(
        &self,
        host: &str,
        path: &str,
        method: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| {
            // A connect route serves only CONNECT (`crate::tunnel`).
            !r.config.connect
                && r.config.matches.matches(host, path, method)
                && r.config
                    .headers
                    .iter()
                    .all(|(k, v)| header(k).as_deref() == Some(v.as_str()))
        })
    }

    pub fn is_builtin_echo(&self, cluster: &str) -> bool {
        self.clusters.get(cluster).and_then(|c| c.config.builtin) == Some(Builtin::Echo)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Pulls a module from an OCI registry (anonymously), through the on-disk cache shared with
/// earlier runs. Runs on its own thread and runtime: configurations are built both from plain
/// threads and from inside the signal loop's runtime.
fn pull(image: &str, sha256: Option<&str>, insecure: &[String]) -> Result<Vec<u8>, String> {
    let dir = crate::module_cache_dir().join("oci");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let cache = Arc::new(
                        wasmfilter_oci::ModuleCache::open(&dir).map_err(|e| e.to_string())?,
                    );
                    let resolver = wasmfilter_oci::Resolver::new(
                        cache,
                        wasmfilter_oci::ResolverConfig {
                            insecure_registries: insecure.to_vec(),
                            ..Default::default()
                        },
                    );
                    resolver
                        .resolve(image, sha256, &wasmfilter_oci::Credentials::Anonymous)
                        .await
                        .map(|m| m.bytes.to_vec())
                        .map_err(|e| e.to_string())
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the pull thread panicked".into()))
    })
}

/// The error of starting a filter in a new VM.
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    #[error(transparent)]
    Vm(#[from] wasmfilter_host::VmError),
    #[error(transparent)]
    Start(#[from] wasmfilter_host::StartError),
    #[error("filter {0} is native: it has no VM")]
    Native(String),
}

impl LoadedFilter {
    pub fn instantiate(
        &self,
        host: &Arc<Host>,
        embedder: Arc<ClusterNames>,
    ) -> Result<(Vm, u32), InstantiateError> {
        let FilterKind::Wasm(module) = &self.kind else {
            return Err(InstantiateError::Native(self.name.clone()));
        };
        let mut vm = host.new_vm(
            module,
            VmOptions {
                vm_id: self.vm_id.clone(),
                label: self.name.clone(),
                memory_limit_bytes: self.memory_limit,
                callback_timeout: self.callback_timeout,
                quotas: self.quotas,
                quota_state: self.metrics.quota.clone(),
                log_level: self.log_level,
                env: self.env.clone(),
                embedder,
                ..Default::default()
            },
        )?;
        let root = vm.start_plugin(self.spec.clone())?;
        Ok((vm, root))
    }
}

/// A worker's VM for one filter with the plugin's root context id. Requests hold a clone for
/// their whole life, so a VM replaced by a swap or a failure stays alive (and its stream
/// contexts valid) until the requests that started streams on it are done.
pub type VmHandle = Rc<RefCell<(Vm, u32)>>;

/// A worker's VM for one filter, or why it has none right now.
pub struct Slot {
    pub vm: Option<VmHandle>,
    pub failures: u32,
    pub retry_at: Option<Instant>,
}

/// Per-worker VMs, keyed by filter name and version. A stream stays on its worker, so its
/// filters' VMs are always these.
#[derive(Default)]
pub struct WorkerVms {
    generation: u64,
    pub slots: HashMap<(String, u64), Slot>,
}

thread_local! {
    pub static WORKER_VMS: RefCell<WorkerVms> = RefCell::new(WorkerVms::default());
    /// Whether this worker runs the service plugins (`type: Service`): exactly one does.
    pub static HOSTS_SERVICE_PLUGINS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How often a worker looks for failed VMs whose backoff has passed, to rebuild them (and
/// restart their ticks and queues) without waiting for a request: 50 ms, the shortest backoff's
/// half.
pub const RETRY_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Backoff before rebuilding a VM after its `n`th consecutive failure: 100 ms doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(9))).min(Duration::from_secs(30))
}

impl WorkerVms {
    /// After a swap, forgets the VMs of filters the new configuration no longer has (requests
    /// still using them keep them alive). Only moves forward: a request that loaded an older
    /// configuration does not bring old slots back.
    pub fn sync(&mut self, active: &Active) {
        if active.generation <= self.generation {
            return;
        }
        self.generation = active.generation;
        self.slots.retain(|(name, version), _| {
            active
                .filters
                .iter()
                .any(|f| &f.name == name && f.version == *version)
        });
    }

    /// The generation this worker's VMs were last warmed for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The slot of `filter`, found without building a key: this runs for every filter of every
    /// request, and a `(String, u64)` key would allocate (profile of S3, bench/README.md).
    fn slot_mut(&mut self, filter: &LoadedFilter) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|((name, version), _)| *version == filter.version && *name == filter.name)
            .map(|(_, slot)| slot)
    }

    /// The VM of `filter` on this worker (`true`: just created), creating it (or re-creating it after a failure,
    /// once its backoff has passed). `Err` carries why there is no VM.
    pub fn get(
        &mut self,
        host: &Arc<Host>,
        filter: &LoadedFilter,
        embedder: &Arc<ClusterNames>,
    ) -> Result<(VmHandle, bool), String> {
        if let Some(vm) = self.slot_mut(filter).and_then(|s| s.vm.clone()) {
            return Ok((vm, false));
        }
        let slot = self
            .slots
            .entry((filter.name.clone(), filter.version))
            .or_insert(Slot {
                vm: None,
                failures: 0,
                retry_at: None,
            });
        if let Some(vm) = &slot.vm {
            return Ok((vm.clone(), false));
        }
        if let Some(at) = slot.retry_at
            && Instant::now() < at
        {
            return Err(format!(
                "filter {} is restarting after a failure",
                filter.name
            ));
        }
        match filter.instantiate(host, embedder.clone()) {
            Ok(vm) => {
                if slot.failures > 0 {
                    filter.metrics.vm_restart();
                }
                if let Some(tx) = WORKER_QUEUE.with(|q| q.borrow().clone()) {
                    let mut routes = embedder.1.0.lock();
                    // Routes to workers that stopped go.
                    routes.retain(|_, tx| !tx.is_closed());
                    routes.insert(vm.0.instance_id(), tx);
                }
                let handle = Rc::new(RefCell::new(vm));
                slot.vm = Some(handle.clone());
                Ok((handle, true))
            }
            Err(e) => {
                slot.failures += 1;
                slot.retry_at = Some(Instant::now() + backoff(slot.failures));
                Err(format!("filter {} could not start: {e}", filter.name))
            }
        }
    }

    /// Records a callback failure: the slot's VM is dropped (once its requests finish) and
    /// rebuilt after a backoff.
    pub fn fail(&mut self, filter: &LoadedFilter, vm: &VmHandle, error: &CallbackError) {
        if let Some(slot) = self.slot_mut(filter)
            // A VM already replaced (by a swap or an earlier failure) leaves its successor alone.
            && slot.vm.as_ref().is_some_and(|current| Rc::ptr_eq(current, vm))
        {
            tracing::warn!(filter = %filter.name, %error, "filter failed; its VM will be rebuilt");
            slot.vm = None;
            slot.failures += 1;
            slot.retry_at = Some(Instant::now() + backoff(slot.failures));
        }
    }

    /// Whether a failed VM's backoff has passed, so [`WorkerVms::get`] would rebuild it.
    pub fn retry_due(&self) -> bool {
        let now = Instant::now();
        self.slots
            .values()
            .any(|s| s.vm.is_none() && s.retry_at.is_some_and(|at| at <= now))
    }

    /// The current VM of this worker whose instance id is `instance`, with its filter's key.
    pub fn by_instance(&self, instance: u64) -> Option<((String, u64), VmHandle)> {
        self.slots.iter().find_map(|(key, slot)| {
            let vm = slot.vm.as_ref()?;
            (vm.try_borrow().ok()?.0.instance_id() == instance).then(|| (key.clone(), vm.clone()))
        })
    }

    pub fn succeeded(&mut self, filter: &LoadedFilter) {
        if let Some(slot) = self.slot_mut(filter)
            && slot.failures > 0
        {
            slot.failures = 0;
        }
    }
}
