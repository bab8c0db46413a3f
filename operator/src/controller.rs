//! The WasmFilter controller: from a WasmFilter's spec to a published [`FilterVersion`] and a
//! status that says which module runs where.
//!
//! ```text
//!  watch::wasmfilters (all namespaces) ──► reflector store ──► Controller (≤ concurrency reconciles)
//!        │ Delete / relist: withdraw                               │
//!        ▼                                                          ▼
//!  ControlPlane::withdraw              reconcile: spec → domain types → pull secret → Resolver
//!                                        → ControlPlane::publish → status::compute
//!                                        → server-side apply of status → Events on transitions
//!  ControlPlane::subscribe_rollouts ──► reconcile_on (acks, nacks, dataplanes coming and going)
//!  every stats_interval: filters whose summed stats changed state ──► reconcile_on
//! ```
//!
//! Contracts:
//! - Level-triggered and idempotent: a reconcile derives everything from the object, the
//!   control plane and what this process resolved before; running it twice changes nothing.
//! - One module resolution per (object uid, generation) with pullPolicy IfNotPresent; with
//!   Always, again every [`Config::refresh_interval`]. A resolution always asks the registry
//!   for the manifest with the WasmFilter's own namespace's credentials (only blob downloads
//!   are shared through the content-addressed cache), so a namespace cannot run a private
//!   module another namespace pulled.
//! - A spec that fails never withdraws the version already published: the dataplanes keep
//!   it, and the Degraded condition says so. Across restarts too: a filter this process has
//!   not published yet whose module cannot be resolved is published with the module its
//!   status names, when that status speaks of the same generation or reference
//!   ([`Context::last_known_good`]).
//! - No snapshot before the first sync: the control plane's gate opens once the first list
//!   is processed and every listed filter was reconciled once, whatever the outcome
//!   ([`ControlPlane::mark_synced`]); until then dataplanes keep what they run.
//! - Objects are decoded one by one ([`crate::watch`]): one that a JSON decoder cannot take
//!   whole (a config nested too deep) is refused alone as an invalid spec.
//! - Transient failures (registry unreachable, API errors) return an error, so
//!   [`error_policy`] retries with backoff and a registry that comes back clears the condition
//!   by itself; other failures are retried on the same backoff (a pull secret or a tag may be
//!   fixed without touching the WasmFilter); an invalid spec waits for the next edit.
//! - No finalizer: there is no external state (the module cache is content-addressed and
//!   shared). A deleted WasmFilter is withdrawn when the watch reports the deletion, when a
//!   relist no longer has it, or when a scheduled reconcile no longer finds it.
//! - Status is written by server-side apply with the field manager [`FIELD_MANAGER`], only
//!   when it differs from the status this process wrote last (or, the first time, from the
//!   object's).
//! - `status.stats` (the dataplanes' figures, summed) is written for a change of its state
//!   ([`status::StatsState`]: reporting dataplanes, the first trap, fail-closed refusal or VM
//!   restart, the failure rate crossing 1%), never for counters growing alone (those are in
//!   /metrics), and then at most once per filter per [`Config::stats_interval`] (60 s): such a
//!   status waits until the interval has passed since the filter's previous write (the
//!   reconcile requeues itself for then). Any other change is written at once, with the
//!   current figures. The control plane does not announce new stats, so every interval the
//!   filters whose stats changed state are reconciled (published ones not in retry backoff);
//!   steady traffic causes neither writes nor reconciles.
//! - `module.url` is downloaded by the operator (`url.rs`), checked against `module.sha256`
//!   and as a module, once per generation, like an IfNotPresent image.

pub mod status;
pub mod url;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller, Error as ControllerError};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::broadcast;
use wasmfilter_api::crd::{self, SpecError, WasmFilter, WasmFilterStatus};
use wasmfilter_api::{FilterLimits, LabelSelector, ModuleLocation, RequestMatch};
use wasmfilter_oci::{Credentials, ResolveError, Resolver, credentials_from_dockerconfigjson};

use crate::admin::{Health, Metrics, ReasonLabel, ResultLabel};
use crate::control::{ControlPlane, StatsSummary};
use crate::index::{FilterKey, FilterVersion};
use crate::watch::SpecNotes;
use status::{EventKind, Failure, Resolution, reason};

/// The one field manager of every status write.
pub const FIELD_MANAGER: &str = "wasmfilter-operator";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// pullPolicy Always: how often a tag is re-resolved. Also the longest retry delay.
    pub refresh_interval: Duration,
    /// First retry after a failed reconcile; doubles per consecutive failure up to
    /// `refresh_interval`, and resets on success.
    pub retry_base: Duration,
    /// Reconciles (and so module pulls) running at once.
    pub concurrency: u16,
    /// Triggers for one object within this window become one reconcile (dataplanes
    /// acknowledging one after the other make one status write, not one each).
    pub debounce: Duration,
    /// Status writes caused by a change of the dataplanes' stats state alone: at most one per
    /// filter per this interval, counted from the filter's previous status write. Also how
    /// often published filters are checked for a changed stats state (the control plane does
    /// not announce stats). 60 s by default (`--status-stats-interval`): state changes are
    /// rare, so the interval only bounds a flapping state (a failure rate hovering at 1%,
    /// dataplanes coming and going) to one write per filter per minute — 1,000 flapping
    /// filters make about 17 writes per second, not 100 — while a first trap still reaches
    /// the status within about a minute, the pace at which people read `kubectl get`.
    pub stats_interval: Duration,
    /// `reportingInstance` of Events (the pod name).
    pub instance: Option<String>,
    pub metrics: Metrics,
    /// Set once the first list of WasmFilters has been processed.
    pub health: Arc<Health>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            refresh_interval: Duration::from_secs(300),
            retry_base: Duration::from_secs(5),
            concurrency: 8,
            debounce: Duration::from_millis(500),
            stats_interval: Duration::from_secs(60),
            instance: None,
            metrics: Metrics::default(),
            health: Arc::default(),
        }
    }
}

/// Why a reconcile returned an error (and will be retried by [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{key}: {reason}: {message}")]
    Transient {
        key: FilterKey,
        reason: &'static str,
        message: String,
    },
    #[error("writing the status of {key}: {source}")]
    Status {
        key: FilterKey,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub fn key(&self) -> &FilterKey {
        match self {
            Error::Transient { key, .. } | Error::Status { key, .. } => key,
        }
    }

    /// The `reason` label of the reconcile error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Transient { reason, .. } => reason,
            Error::Status { .. } => "StatusWriteFailed",
        }
    }
}

/// A module resolution remembered for one object generation.
#[derive(Clone, Debug)]
struct CachedResolution {
    generation: i64,
    at: Instant,
    module: crd::ResolvedModule,
}

/// What this process knows of one WasmFilter (by key; reset when the uid changes).
#[derive(Clone, Debug, Default)]
struct FilterState {
    uid: String,
    resolution: Option<CachedResolution>,
    /// The module of the version this process published for it.
    published: Option<crd::ResolvedModule>,
    /// The status this process wrote last (or found already in place).
    written: Option<WasmFilterStatus>,
    /// When this process last wrote the status, for the stats rate limit.
    last_write: Option<Instant>,
    /// Consecutive failed reconciles, for the retry backoff.
    failures: u32,
}

/// The first sync of this process (see [`ControlPlane::mark_synced`]): the filters of the
/// first list that have not been reconciled once yet.
#[derive(Debug, Default)]
struct FirstSync {
    /// Keys of the first list, once it is complete; `None` before.
    listed: Option<BTreeSet<FilterKey>>,
    /// Keys reconciled at least once (with any outcome) since the process started.
    reconciled: BTreeSet<FilterKey>,
    done: bool,
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    control: Arc<ControlPlane>,
    resolver: Arc<Resolver>,
    recorder: Recorder,
    config: Config,
    filters: Mutex<HashMap<FilterKey, FilterState>>,
    store: OnceLock<Store<WasmFilter>>,
    /// Why an object's spec could not be read whole (see [`crate::watch`]).
    notes: Arc<SpecNotes>,
    first_sync: Mutex<FirstSync>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Runs the controller until the process ends: [`Context::run`] without a shutdown signal.
pub async fn run(
    client: Client,
    control: Arc<ControlPlane>,
    resolver: Arc<Resolver>,
    config: Config,
) {
    Context::new(client, control, resolver, config)
        .run(std::future::pending())
        .await
}

impl Context {
    pub fn new(
        client: Client,
        control: Arc<ControlPlane>,
        resolver: Arc<Resolver>,
        config: Config,
    ) -> Arc<Context> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: config.instance.clone(),
            },
        );
        Arc::new(Context {
            client,
            control,
            resolver,
            recorder,
            config,
            filters: Mutex::default(),
            store: OnceLock::new(),
            notes: Arc::default(),
            first_sync: Mutex::default(),
        })
    }

    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Watches WasmFilters in every namespace and reconciles them until `shutdown` completes
    /// (reconciles in flight finish first).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
        let (reader, writer) = reflector::store();
        let _ = self.store.set(reader.clone());
        let observer = self.clone();
        let metrics = self.config.metrics.clone();
        let health = self.config.health.clone();
        let hooks = crate::watch::Hooks {
            notes: self.notes.clone(),
            on_skip: Arc::new(move |_| {
                metrics
                    .reconcile_errors
                    .get_or_create(&ReasonLabel {
                        reason: "Unreadable".into(),
                    })
                    .inc();
            }),
            on_reachable: Arc::new(move |ok| health.set_api_reachable(ok)),
        };
        let objects = crate::watch::wasmfilters(self.client.clone(), hooks)
            .default_backoff()
            .reflect(writer)
            .inspect(move |event| observer.observe(event))
            .applied_objects()
            // Only spec changes (and new objects) trigger from the watch: the status this
            // controller writes would otherwise re-trigger each reconcile once.
            .predicate_filter(predicates::generation, Default::default());
        let triggers = futures_util::stream::select(
            rollout_triggers(self.control.subscribe_rollouts(), reader.clone()),
            stats_triggers(self.clone()),
        );
        let config = kube::runtime::controller::Config::default()
            .concurrency(self.config.concurrency)
            .debounce(self.config.debounce);
        let ctx = self.clone();
        Controller::for_stream(objects, reader)
            .reconcile_on(triggers)
            .with_config(config)
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, self.clone())
            .for_each(move |result| {
                match result {
                    Ok((r, _)) => ctx.reconciled(key_of_ref(r.namespace.as_deref(), &r.name)),
                    // A reconcile scheduled (requeue, rollout) for an object that is gone.
                    Err(ControllerError::ObjectNotFound(r)) => {
                        let key = key_of_ref(r.namespace.as_deref(), &r.name);
                        ctx.forget(&key);
                        ctx.reconciled(key);
                    }
                    Err(ControllerError::ReconcilerFailed(e, r)) => {
                        tracing::warn!(error = %e, "reconcile failed; retrying with backoff");
                        ctx.reconciled(key_of_ref(r.namespace.as_deref(), &r.name));
                    }
                    Err(e) => tracing::warn!(error = %e, "WasmFilter watch"),
                }
                std::future::ready(())
            })
            .await;
    }

    /// Sees every watch event before the controller does: deletions withdraw, and the end of
    /// a (re)list withdraws whatever is no longer listed (deletions missed while the watch was
    /// down); the end of the first list starts the countdown of the first sync.
    fn observe(&self, event: &Result<watcher::Event<WasmFilter>, watcher::Error>) {
        match event {
            Ok(watcher::Event::Delete(obj)) => {
                let key = key_of(obj);
                self.forget(&key);
                self.reconciled(key);
            }
            Ok(watcher::Event::InitDone) => {
                let listed: BTreeSet<FilterKey> = self
                    .store
                    .get()
                    .map(|store| store.state().iter().map(|o| key_of(o)).collect())
                    .unwrap_or_default();
                let gone: Vec<FilterKey> = self
                    .filters
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|k| !listed.contains(k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.forget(&key);
                }
                let mut first = self.first_sync.lock().unwrap();
                if first.listed.is_none() {
                    tracing::info!(
                        filters = listed.len(),
                        "first list of WasmFilters done; snapshots wait until each is reconciled once"
                    );
                    first.listed = Some(listed);
                }
                drop(first);
                self.check_first_sync();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WasmFilter watch failed; retrying"),
        }
    }

    /// `key` was reconciled (with any outcome) or is gone: one step of the first sync.
    fn reconciled(&self, key: FilterKey) {
        let mut first = self.first_sync.lock().unwrap();
        if first.done {
            return;
        }
        first.reconciled.insert(key);
        drop(first);
        self.check_first_sync();
    }

    /// Opens the control plane's snapshot gate once every filter of the first list has been
    /// reconciled once: only then does this process know every filter the dataplanes should
    /// run, so no dataplane is ever sent a chain that lacks one it has not looked at yet.
    fn check_first_sync(&self) {
        let mut first = self.first_sync.lock().unwrap();
        let filters = match &first.listed {
            Some(listed) if !first.done && listed.is_subset(&first.reconciled) => listed.len(),
            _ => return,
        };
        first.done = true;
        drop(first);
        tracing::info!(
            filters,
            "every listed WasmFilter reconciled once; sending snapshots to the dataplanes"
        );
        self.control.mark_synced();
        self.config.health.set_synced();
    }

    /// The filters whose stats, as `status.stats` would show them now, are in another state
    /// ([`status::StatsState`]) than the ones this process wrote last: published filters that
    /// are not waiting for a retry (a failing one gets its stats on its next retry, so stats
    /// never cut its backoff short). One pass over the reported stats, whatever the number of
    /// filters.
    fn stats_changed(&self) -> Vec<ObjectRef<WasmFilter>> {
        let mut summaries: HashMap<String, StatsSummary> = HashMap::new();
        for (_, f) in self.control.all_stats() {
            summaries.entry(f.name.clone()).or_default().add(&f);
        }
        let epoch = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let none = StatsSummary::default();
        self.filters
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.published.is_some() && s.failures == 0)
            .filter(|(key, s)| {
                let summary = summaries.get(&key.to_string()).unwrap_or(&none);
                let written = s.written.as_ref().and_then(|w| w.stats.as_ref());
                let current = status::reported_stats(summary, None, &epoch);
                !status::same_stats_state(written, current.as_ref())
            })
            .map(|(key, _)| ObjectRef::new(&key.name).within(&key.namespace))
            .collect()
    }

    /// A WasmFilter is gone (or being deleted): take it off every dataplane.
    pub fn forget(&self, key: &FilterKey) {
        self.filters.lock().unwrap().remove(key);
        if self.control.is_published(key) {
            tracing::info!(filter = %key, "WasmFilter deleted; withdrawing it");
        }
        self.control.withdraw(key);
    }

    fn with_state<T>(
        &self,
        key: &FilterKey,
        uid: &str,
        f: impl FnOnce(&mut FilterState) -> T,
    ) -> T {
        let mut filters = self.filters.lock().unwrap();
        let state = filters.entry(key.clone()).or_default();
        if state.uid != uid {
            // A new object under the same name: nothing of the old one applies.
            *state = FilterState {
                uid: uid.to_string(),
                ..Default::default()
            };
        }
        f(state)
    }

    /// The delay before retrying a failing object: `retry_base` doubling per consecutive
    /// failure, capped at `refresh_interval`.
    fn retry_after(&self, key: &FilterKey) -> Duration {
        let n = {
            let mut filters = self.filters.lock().unwrap();
            let state = filters.entry(key.clone()).or_default();
            state.failures = state.failures.saturating_add(1);
            state.failures
        };
        let factor = 1u32 << (n - 1).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.refresh_interval)
            .max(Duration::from_millis(10))
    }

    /// Turns the spec into a deployable version: domain types, pull secret, module.
    async fn prepare(
        &self,
        obj: &WasmFilter,
        key: &FilterKey,
        uid: &str,
        generation: i64,
    ) -> Result<(LabelSelector, FilterVersion, crd::ResolvedModule), Failure> {
        if let Some(problem) = self.notes.problem(uid) {
            return Err(Failure {
                reason: reason::INVALID_SPEC,
                message: format!("{problem}; fix the WasmFilter's spec"),
                transient: false,
            });
        }
        let location = ModuleLocation::try_from(&obj.spec.module).map_err(invalid)?;
        // Converted before the module is resolved: an invalid spec never costs a pull.
        let (selector, version) = version_of(key, &obj.spec)?;
        let module = self.module(key, uid, generation, &location).await?;
        Ok((selector, with_module(version, &module), module))
    }

    /// The version to keep publishing when this process cannot resolve the module but has
    /// published nothing for the filter yet (it just started, or just became leader): the
    /// module its status says was resolved last, if that status speaks of the current spec
    /// (written for this generation, or resolved from the same reference). Dataplanes
    /// already hold that module and keep running it; only a successful resolution or a
    /// spec change replaces it.
    fn last_known_good(
        &self,
        obj: &WasmFilter,
        key: &FilterKey,
    ) -> Option<(LabelSelector, FilterVersion, crd::ResolvedModule)> {
        if self.control.is_published(key) {
            return None;
        }
        let status = obj.status.as_ref()?;
        let module = status.module.clone().filter(|m| !m.digest.is_empty())?;
        let same_source = match ModuleLocation::try_from(&obj.spec.module).ok()? {
            ModuleLocation::Image { reference, .. } => module.resolved_from == reference,
            ModuleLocation::Url { url, .. } => module.resolved_from == url,
        };
        let same_generation = status.observed_generation == obj.metadata.generation;
        if !same_source && !same_generation {
            return None;
        }
        let (selector, version) = version_of(key, &obj.spec).ok()?;
        Some((selector, with_module(version, &module), module))
    }
}

fn invalid(e: SpecError) -> Failure {
    Failure {
        reason: reason::INVALID_SPEC,
        message: format!("{e}; fix the WasmFilter's spec"),
        transient: false,
    }
}

/// The spec in domain types: what is published, once [`with_module`] names its module.
fn version_of(
    key: &FilterKey,
    spec: &crd::WasmFilterSpec,
) -> Result<(LabelSelector, FilterVersion), Failure> {
    let selector = spec.label_selector().map_err(invalid)?;
    let configuration = spec.configuration_bytes().map_err(invalid)?;
    let vm_configuration = spec.vm_configuration_bytes().map_err(invalid)?;
    let limits = FilterLimits::try_from(&spec.limits).map_err(invalid)?;
    let version = FilterVersion {
        key: key.clone(),
        module_digest: String::new(),
        module_size: 0,
        root_id: spec.root_id.clone(),
        configuration,
        vm_id: scoped_vm_id(&key.namespace, &spec.vm.id),
        vm_configuration,
        env: spec.vm.env.clone(),
        matches: RequestMatch::from(&spec.matches),
        phase: spec.phase.into(),
        priority: spec.priority,
        failure_policy: spec.failure_policy.into(),
        limits,
        plugin_type: spec.plugin_type.into(),
        listeners: spec.listeners.clone(),
    };
    Ok((selector, version))
}

fn with_module(version: FilterVersion, module: &crd::ResolvedModule) -> FilterVersion {
    FilterVersion {
        module_digest: module.digest.clone(),
        module_size: u64::try_from(module.size).unwrap_or(0),
        ..version
    }
}

impl Context {
    /// The module of `location`: this generation's earlier resolution when it may be reused,
    /// else a resolution against the registry with the namespace's credentials.
    async fn module(
        &self,
        key: &FilterKey,
        uid: &str,
        generation: i64,
        location: &ModuleLocation,
    ) -> Result<crd::ResolvedModule, Failure> {
        let (reference, pull_secret, always_pull, sha256) = match location {
            ModuleLocation::Image {
                reference,
                pull_secret,
                always_pull,
                sha256,
            } => (reference, pull_secret, *always_pull, sha256),
            ModuleLocation::Url { url, sha256 } => {
                return self.url_module(key, uid, generation, url, sha256).await;
            }
        };
        if let Some(module) = self.cached_resolution(key, uid, generation, always_pull) {
            self.config.metrics.resolution_cache_hits.inc();
            return Ok(module);
        }
        let credentials = self
            .credentials(&key.namespace, pull_secret.as_deref(), reference)
            .await?;
        let started = Instant::now();
        let result = self
            .resolver
            .resolve(reference, sha256.as_deref(), &credentials)
            .await;
        self.config
            .metrics
            .pull_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(m) => {
                self.pull_result("resolved");
                let module = crd::ResolvedModule {
                    digest: m.digest,
                    manifest_digest: Some(m.manifest_digest),
                    resolved_from: m.resolved_from,
                    size: i64::try_from(m.bytes.len()).unwrap_or(i64::MAX),
                };
                self.remember_resolution(key, uid, generation, &module);
                Ok(module)
            }
            Err(e) => {
                let failure = resolve_failure(&e, reference, pull_secret.as_deref());
                self.pull_result(failure.reason);
                Err(failure)
            }
        }
    }

    /// The module of a `module.url` source: this generation's earlier download, else a
    /// download checked against the pin (see [`url`]).
    async fn url_module(
        &self,
        key: &FilterKey,
        uid: &str,
        generation: i64,
        location: &str,
        sha256: &str,
    ) -> Result<crd::ResolvedModule, Failure> {
        if let Some(module) = self.cached_resolution(key, uid, generation, false) {
            self.config.metrics.resolution_cache_hits.inc();
            return Ok(module);
        }
        let started = Instant::now();
        let result = url::download(self.resolver.cache(), location, sha256).await;
        self.config
            .metrics
            .pull_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(d) => {
                self.pull_result("resolved");
                let module = crd::ResolvedModule {
                    digest: d.digest,
                    manifest_digest: None,
                    resolved_from: location.to_string(),
                    size: i64::try_from(d.size).unwrap_or(i64::MAX),
                };
                self.remember_resolution(key, uid, generation, &module);
                Ok(module)
            }
            Err(e) => {
                let failure = url::url_failure(&e, location);
                self.pull_result(failure.reason);
                Err(failure)
            }
        }
    }

    /// This generation's earlier resolution, when it may be reused (with `always_pull`, only
    /// within the refresh interval).
    fn cached_resolution(
        &self,
        key: &FilterKey,
        uid: &str,
        generation: i64,
        always_pull: bool,
    ) -> Option<crd::ResolvedModule> {
        self.with_state(key, uid, |s| {
            s.resolution
                .as_ref()
                .filter(|c| c.generation == generation)
                .filter(|c| !always_pull || c.at.elapsed() < self.config.refresh_interval)
                .map(|c| c.module.clone())
        })
    }

    fn remember_resolution(
        &self,
        key: &FilterKey,
        uid: &str,
        generation: i64,
        module: &crd::ResolvedModule,
    ) {
        self.with_state(key, uid, |s| {
            s.resolution = Some(CachedResolution {
                generation,
                at: Instant::now(),
                module: module.clone(),
            })
        });
    }

    fn pull_result(&self, result: &str) {
        self.config
            .metrics
            .pulls
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// The credentials for `reference` in `namespace`: anonymous without a pull secret, else
    /// the entry for the reference's registry in the Secret's `.dockerconfigjson`.
    async fn credentials(
        &self,
        namespace: &str,
        secret: Option<&str>,
        reference: &str,
    ) -> Result<Credentials, Failure> {
        let Some(name) = secret else {
            return Ok(Credentials::Anonymous);
        };
        let registry = registry_of(reference);
        let fail = |reason, message: String, transient| Failure {
            reason,
            message,
            transient,
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = match api.get_opt(name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(fail(
                    reason::PULL_SECRET_NOT_FOUND,
                    format!(
                        "module.pullSecret: Secret {name:?} not found in namespace {namespace:?}; \
                         create it with: kubectl create secret docker-registry {name} -n \
                         {namespace} --docker-server={registry} --docker-username=USER \
                         --docker-password=PASSWORD"
                    ),
                    false,
                ));
            }
            Err(e) => {
                return Err(fail(
                    reason::PULL_SECRET_UNREADABLE,
                    format!(
                        "module.pullSecret: reading Secret {name:?} in namespace {namespace:?}: \
                         {e} (the operator needs get on secrets)"
                    ),
                    true,
                ));
            }
        };
        const DOCKERCONFIGJSON: &str = "kubernetes.io/dockerconfigjson";
        let invalid = |what: String| {
            fail(
                reason::PULL_SECRET_INVALID,
                format!(
                    "module.pullSecret: Secret {name:?} in namespace {namespace:?} {what}; it \
                     must be a {DOCKERCONFIGJSON} Secret (kubectl create secret docker-registry)"
                ),
                false,
            )
        };
        if secret.type_.as_deref() != Some(DOCKERCONFIGJSON) {
            return Err(invalid(format!(
                "is of type {}",
                secret.type_.as_deref().unwrap_or("Opaque")
            )));
        }
        let Some(json) = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
        else {
            return Err(invalid("has no .dockerconfigjson key".into()));
        };
        match credentials_from_dockerconfigjson(&json.0, registry) {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(fail(
                reason::PULL_SECRET_MISSING_REGISTRY,
                format!(
                    "module.pullSecret: Secret {name:?} in namespace {namespace:?} has no \
                     credentials for registry {registry} (no entry for it under \"auths\" in its \
                     .dockerconfigjson); add one, or point module.pullSecret at a Secret that \
                     has one"
                ),
                false,
            )),
            Err(e) => Err(invalid(format!("cannot be read: {e}"))),
        }
    }

    async fn publish_event(&self, obj: &WasmFilter, e: &status::EventSpec) {
        let event = Event {
            type_: match e.kind {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: e.reason.clone(),
            note: Some(e.note.clone()),
            action: e.action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %err, filter = %key_of(obj), reason = %e.reason, "publishing an Event failed");
        }
    }
}

/// One reconcile of `obj`. Public so tests can drive it without the watch machinery.
pub async fn reconcile(obj: Arc<WasmFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.config.metrics.reconciles.inc();
    let key = key_of(&obj);
    if obj.metadata.deletion_timestamp.is_some() {
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or(0);

    let resolution = match ctx.prepare(&obj, &key, &uid, generation).await {
        Ok((selector, version, module)) => {
            let revision = version.revision();
            ctx.control.publish(selector, version);
            ctx.with_state(&key, &uid, |s| {
                s.published = Some(module.clone());
                s.failures = 0;
            });
            Resolution::Resolved { module, revision }
        }
        Err(failure) => {
            ctx.config
                .metrics
                .reconcile_errors
                .get_or_create(&ReasonLabel {
                    reason: failure.reason.into(),
                })
                .inc();
            tracing::info!(filter = %key, reason = failure.reason, message = %failure.message, "WasmFilter not deployable");
            if failure.reason != reason::INVALID_SPEC
                && let Some((selector, version, module)) = ctx.last_known_good(&obj, &key)
            {
                tracing::info!(filter = %key, digest = %module.digest, "keeping the module its status names published until it can be resolved again");
                ctx.control.publish(selector, version);
                ctx.with_state(&key, &uid, |s| s.published = Some(module));
            }
            Resolution::Failed(failure)
        }
    };

    let (published, written, last_write) = ctx.with_state(&key, &uid, |s| {
        (s.published.clone(), s.written.clone(), s.last_write)
    });
    let published = published.filter(|_| ctx.control.is_published(&key));
    let rollout = ctx.control.rollout(&key);
    let stats = if published.is_some() {
        ctx.control.stats_summary(&key)
    } else {
        Default::default()
    };
    let previous = written.or_else(|| obj.status.clone());
    let (new_status, events) = status::compute(&status::Input {
        generation,
        previous: previous.as_ref(),
        resolution: &resolution,
        published: published.as_ref(),
        rollout: &rollout,
        stats: &stats,
        now: now(),
    });
    // Only a change of the stats state, too soon after the previous write: look again when it
    // is due. Counters alone leave the status as written.
    let mut stats_due = None;
    match status::write_decision(
        previous.as_ref(),
        &new_status,
        last_write,
        Instant::now(),
        ctx.config.stats_interval,
    ) {
        status::Write::Unchanged => ctx.with_state(&key, &uid, |s| s.written = Some(new_status)),
        status::Write::CountersOnly => {}
        status::Write::After(delay) => stats_due = Some(delay),
        status::Write::Now => {
            let patch = serde_json::json!({
                "apiVersion": "wasmfilter.dev/v1alpha1",
                "kind": "WasmFilter",
                "status": new_status,
            });
            // The answer (the whole object) is not decoded: a spec nested too deep for a JSON
            // decoder (see crate::watch) must not turn a status write that was applied into a
            // failed reconcile that never raises its Event.
            let write = kube::core::Request::new(WasmFilter::url_path(&(), Some(&key.namespace)))
                .patch_subresource(
                    "status",
                    &key.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .map_err(kube::Error::BuildRequest);
            let written = match write {
                Ok(request) => ctx.client.request_text(request).await.map(drop),
                Err(e) => Err(e),
            };
            match written {
                // Timed after the API server answered, so the next stats write is at least
                // stats_interval after this one arrived.
                Ok(_) => ctx.with_state(&key, &uid, |s| {
                    s.written = Some(new_status);
                    s.last_write = Some(Instant::now());
                }),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    ctx.forget(&key);
                    return Ok(Action::await_change());
                }
                Err(source) => {
                    ctx.config
                        .metrics
                        .reconcile_errors
                        .get_or_create(&ReasonLabel {
                            reason: "StatusWriteFailed".into(),
                        })
                        .inc();
                    return Err(Error::Status { key, source });
                }
            }
        }
    }
    for e in &events {
        ctx.publish_event(&obj, e).await;
    }

    let requeue = match resolution {
        Resolution::Resolved { .. } => {
            let always = matches!(
                ModuleLocation::try_from(&obj.spec.module),
                Ok(ModuleLocation::Image {
                    always_pull: true,
                    ..
                })
            );
            always.then_some(ctx.config.refresh_interval)
        }
        Resolution::Failed(f) if f.transient => {
            return Err(Error::Transient {
                key,
                reason: f.reason,
                message: f.message,
            });
        }
        // Only an edit of the spec can fix it.
        Resolution::Failed(f) if f.reason == reason::INVALID_SPEC => None,
        // A pull secret, a tag, a registry's permissions or a URL may be fixed without an edit.
        Resolution::Failed(_) => Some(ctx.retry_after(&key)),
    };
    Ok(match (requeue, stats_due) {
        (Some(a), Some(b)) => Action::requeue(a.min(b)),
        (Some(d), None) | (None, Some(d)) => Action::requeue(d),
        (None, None) => Action::await_change(),
    })
}

/// Retries a failed reconcile with per-object exponential backoff.
pub fn error_policy(obj: Arc<WasmFilter>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.retry_after(&key_of(&obj));
    tracing::debug!(error = %err, ?delay, "retrying");
    Action::requeue(delay)
}

/// ObjectRefs to reconcile when rollouts change; everything when the receiver lagged.
fn rollout_triggers(
    rx: broadcast::Receiver<FilterKey>,
    store: Store<WasmFilter>,
) -> impl Stream<Item = ObjectRef<WasmFilter>> + Send + 'static {
    futures_util::stream::unfold((rx, store), |(mut rx, store)| async move {
        let refs: Vec<ObjectRef<WasmFilter>> = match rx.recv().await {
            Ok(key) => vec![ObjectRef::new(&key.name).within(&key.namespace)],
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "rollout notifications lagged; reconciling all");
                store
                    .state()
                    .iter()
                    .map(|o| ObjectRef::from_obj(&**o))
                    .collect()
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((futures_util::stream::iter(refs), (rx, store)))
    })
    .flatten()
}

/// Every `stats_interval`, the filters whose stats changed state ([`Context::stats_changed`]).
/// The reconcile they trigger writes them, or waits until the rate limit allows it.
fn stats_triggers(ctx: Arc<Context>) -> impl Stream<Item = ObjectRef<WasmFilter>> + Send + 'static {
    let period = ctx.config.stats_interval.max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures_util::stream::unfold((ticks, ctx), |(mut ticks, ctx)| async move {
        ticks.tick().await;
        let refs = ctx.stats_changed();
        Some((futures_util::stream::iter(refs), (ticks, ctx)))
    })
    .flatten()
}

/// The dataplanes' VM sharing key: empty stays empty (a VM of its own); anything else is
/// scoped to the namespace, so two namespaces never share a VM.
pub fn scoped_vm_id(namespace: &str, id: &str) -> String {
    if id.is_empty() {
        String::new()
    } else {
        format!("{namespace}/{id}")
    }
}

/// The registry host (and port) of an image reference: what precedes the first `/` (the
/// CRD requires an explicit registry).
fn registry_of(reference: &str) -> &str {
    reference.split('/').next().unwrap_or(reference)
}

/// The key of a controller ObjectRef (typed or dynamic: both carry these two fields).
fn key_of_ref(namespace: Option<&str>, name: &str) -> FilterKey {
    FilterKey::new(namespace.unwrap_or_default(), name)
}

fn key_of(obj: &WasmFilter) -> FilterKey {
    FilterKey::new(obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Now, to the second (what the API server keeps of a metav1.Time).
fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// A resolver error as a condition: the reason, and a message that names the field and the fix.
pub fn resolve_failure(e: &ResolveError, reference: &str, pull_secret: Option<&str>) -> Failure {
    let registry = registry_of(reference);
    let (reason, hint, transient) = match e {
        ResolveError::InvalidReference { .. } => (
            reason::INVALID_SPEC,
            "fix module.image: registry/repository:tag or registry/repository@sha256:<hex>".into(),
            false,
        ),
        ResolveError::InvalidPin(_) => (
            reason::INVALID_SPEC,
            "fix module.sha256: 64 hex digits".into(),
            false,
        ),
        ResolveError::Connection { .. } => (
            reason::REGISTRY_UNAVAILABLE,
            "retrying with backoff; the running version (if any) is kept".into(),
            true,
        ),
        ResolveError::Unauthorized { .. } => (
            reason::PULL_UNAUTHORIZED,
            match pull_secret {
                None => format!(
                    "set module.pullSecret to a kubernetes.io/dockerconfigjson Secret with \
                     credentials for {registry}"
                ),
                Some(s) => format!(
                    "check the credentials for {registry} in Secret {s:?} (module.pullSecret)"
                ),
            },
            false,
        ),
        ResolveError::NotFound { .. } => (
            reason::IMAGE_NOT_FOUND,
            "check module.image, or push the module (wasmfilter-operator push)".into(),
            false,
        ),
        ResolveError::Registry { .. } => (
            reason::RESOLVE_FAILED,
            "the registry's answer could not be used".into(),
            false,
        ),
        ResolveError::UnsupportedLayout { .. } => (
            reason::UNSUPPORTED_LAYOUT,
            "publish the module as a CNCF Wasm artifact (wasmfilter-operator push)".into(),
            false,
        ),
        ResolveError::TooLarge { .. } => (
            reason::MODULE_TOO_LARGE,
            "use a smaller module".into(),
            false,
        ),
        ResolveError::DigestMismatch { .. } => (
            reason::DIGEST_MISMATCH,
            format!(
                "module.sha256 does not match the module {reference} holds: fix module.sha256 or \
                 the image; nothing was rolled out"
            ),
            false,
        ),
        ResolveError::ModuleCheck(_) => (
            reason::INVALID_MODULE,
            format!("{reference} is not a proxy-wasm module this dataplane can run"),
            false,
        ),
        ResolveError::Cache(_) => (
            reason::RESOLVE_FAILED,
            "the operator's module cache failed; retrying".into(),
            true,
        ),
    };
    Failure {
        reason,
        message: format!("{e}; {hint}"),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmfilter_api::control::FilterStats;

    #[test]
    fn the_stats_trigger_sums_like_the_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlPlane::new(Arc::new(
            wasmfilter_oci::ModuleCache::open(dir.path()).unwrap(),
        ));
        let report = |name: &str, n: u64| FilterStats {
            name: name.into(),
            invocations: n,
            traps: n + 1,
            fail_open_skips: n + 2,
            fail_closed: n + 3,
            vm_restarts: n + 4,
            latency_count: n + 5,
            latency_sum_seconds: n as f64 / 8.0,
            ..Default::default()
        };
        control.report_stats("node-a", vec![report("ns/f", 1), report("ns/g", 7)]);
        control.report_stats("node-b", vec![report("ns/f", 10)]);
        let mut ours = StatsSummary::default();
        for (_, f) in control.all_stats().iter().filter(|(_, f)| f.name == "ns/f") {
            ours.add(f);
        }
        assert_eq!(ours, control.stats_summary(&FilterKey::new("ns", "f")));
        assert_eq!(ours.dataplanes, 2);
    }

    #[test]
    fn vm_ids_are_scoped_to_the_namespace() {
        assert_eq!(scoped_vm_id("team-a", ""), "");
        assert_eq!(scoped_vm_id("team-a", "shared"), "team-a/shared");
    }

    #[test]
    fn resolver_errors_become_reasons_that_name_the_fix() {
        let f = resolve_failure(
            &ResolveError::Connection {
                registry: "r.test:5000".into(),
                detail: "connection refused".into(),
            },
            "r.test:5000/f:v1",
            None,
        );
        assert_eq!((f.reason, f.transient), ("RegistryUnavailable", true));
        let f = resolve_failure(
            &ResolveError::Unauthorized {
                registry: "r.test:5000".into(),
                detail: "401".into(),
            },
            "r.test:5000/f:v1",
            None,
        );
        assert_eq!((f.reason, f.transient), ("PullUnauthorized", false));
        assert!(f.message.contains("set module.pullSecret"), "{}", f.message);
        let f = resolve_failure(
            &ResolveError::DigestMismatch {
                expected: "sha256:aa".into(),
                actual: "sha256:bb".into(),
            },
            "r.test:5000/f:v1",
            None,
        );
        assert_eq!(f.reason, "DigestMismatch");
        assert!(f.message.contains("fix module.sha256"), "{}", f.message);
        assert_eq!(registry_of("r.test:5000/a/b:v1"), "r.test:5000");
    }
}
