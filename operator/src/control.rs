//! The control plane's shared state: the [`Index`] behind a lock, change notifications for the
//! gRPC streams (which filters changed) and for the controller (whose rollout changed), the
//! module store dataplanes fetch from, and the latest stats each dataplane reported.
//!
//! The controller writes through [`ControlPlane::publish`] / [`ControlPlane::withdraw`]; the
//! gRPC layer through `connect`, `acknowledge`, `report_stats` and `disconnect`. Neither knows
//! the other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{broadcast, watch};
use wasmfilter_api::LabelSelector;
use wasmfilter_api::control::FilterStats;
use wasmfilter_oci::ModuleCache;

use crate::grpc::limits;
use crate::index::{FilterKey, FilterVersion, Index, Rollout};

pub struct ControlPlane {
    index: RwLock<Index>,
    /// False until the controller knows the whole truth: its first list of WasmFilters is
    /// processed and every listed filter was reconciled once (published, or found not
    /// deployable). Until then no stream sends a snapshot, so a restarted or newly elected
    /// operator never sends a dataplane a chain that lacks filters it merely has not
    /// reconciled yet; the dataplanes keep running what they have.
    synced: watch::Sender<bool>,
    /// Bumped whenever a published filter changes; each stream recomputes its chain.
    chains: watch::Sender<u64>,
    /// Filters whose rollout (or stats) changed, for the controller's status writer.
    rollouts: broadcast::Sender<FilterKey>,
    modules: Arc<ModuleCache>,
    /// (dataplane, filter name) → the filter's latest cumulative stats on that dataplane.
    stats: Mutex<BTreeMap<(String, String), FilterStats>>,
    /// Stream generation per dataplane id: a reconnect supersedes the older stream, whose
    /// late disconnect must not remove the new one.
    sessions: Mutex<BTreeMap<String, u64>>,
    next_session: AtomicU64,
    pub counters: Counters,
}

/// Totals since the operator started, for /metrics and for tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub module_bytes_served: AtomicU64,
    pub module_fetches: AtomicU64,
    pub snapshots_sent: AtomicU64,
    /// Encoded size of every snapshot sent (what a change costs on the wire).
    pub snapshot_bytes_sent: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
}

/// A filter's stats summed over the dataplanes that run it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsSummary {
    pub dataplanes: u32,
    pub invocations: u64,
    pub traps: u64,
    pub fail_open_skips: u64,
    pub fail_closed: u64,
    pub vm_restarts: u64,
    pub latency_count: u64,
    pub latency_sum_seconds: f64,
}

impl StatsSummary {
    /// Adds one dataplane's report of the filter.
    pub fn add(&mut self, f: &FilterStats) {
        self.dataplanes += 1;
        self.invocations += f.invocations;
        self.traps += f.traps;
        self.fail_open_skips += f.fail_open_skips;
        self.fail_closed += f.fail_closed;
        self.vm_restarts += f.vm_restarts;
        self.latency_count += f.latency_count;
        self.latency_sum_seconds += f.latency_sum_seconds;
    }
}

impl ControlPlane {
    /// A control plane with the default snapshot budget ([`limits::SNAPSHOT_BUDGET`]).
    pub fn new(modules: Arc<ModuleCache>) -> Arc<ControlPlane> {
        ControlPlane::with_snapshot_budget(modules, limits::SNAPSHOT_BUDGET as u64)
    }

    /// A control plane whose Snapshots take at most `budget` bytes: the filters that do not
    /// fit a dataplane's chain are left out of it (see [`crate::index`]).
    pub fn with_snapshot_budget(modules: Arc<ModuleCache>, budget: u64) -> Arc<ControlPlane> {
        Arc::new(ControlPlane {
            index: RwLock::new(Index::with_snapshot_budget(budget)),
            synced: watch::channel(false).0,
            chains: watch::channel(0).0,
            rollouts: broadcast::channel(4096).0,
            modules,
            stats: Mutex::default(),
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            counters: Counters::default(),
        })
    }

    /// Opens the gate of [`synced`](Self::subscribe_synced): snapshots may go out. Called by
    /// the controller once; tests and tools that publish by hand call it themselves.
    pub fn mark_synced(&self) {
        self.synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Becomes true once the control plane is synced (see the field's contract).
    pub fn subscribe_synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    pub fn modules(&self) -> &Arc<ModuleCache> {
        &self.modules
    }

    /// Publishes a filter version to the dataplanes `selector` matches (replacing the one
    /// published before). Affected streams push a new snapshot after a short debounce.
    /// Filters another filter's change moved in or out of some chain for the snapshot budget
    /// are announced too, so their status follows.
    pub fn publish(&self, selector: LabelSelector, version: FilterVersion) {
        let key = version.key.clone();
        self.change(&key, |index| index.publish(selector, version));
    }

    /// Removes a filter from every dataplane.
    pub fn withdraw(&self, key: &FilterKey) {
        self.change(key, |index| index.withdraw(key));
    }

    fn change(&self, key: &FilterKey, apply: impl FnOnce(&mut Index) -> bool) {
        let affected = {
            let mut index = self.index.write().unwrap();
            let before = index.over_budget_counts();
            if !apply(&mut index) {
                return;
            }
            let after = index.over_budget_counts();
            let mut affected: BTreeSet<FilterKey> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(k) != after.get(k))
                .cloned()
                .collect();
            affected.insert(key.clone());
            affected
        };
        self.chains.send_modify(|v| *v += 1);
        self.notify(affected);
    }

    /// The largest Snapshot a dataplane is sent, bytes.
    pub fn snapshot_budget(&self) -> u64 {
        self.index.read().unwrap().snapshot_budget()
    }

    /// (filter, connected dataplane) pairs whose chain leaves the filter out for the snapshot
    /// budget.
    pub fn over_budget_count(&self) -> u64 {
        let counts = self.index.read().unwrap().over_budget_counts();
        counts.values().map(|&n| u64::from(n)).sum()
    }

    pub fn rollout(&self, key: &FilterKey) -> Rollout {
        self.index.read().unwrap().rollout(key)
    }

    pub fn is_published(&self, key: &FilterKey) -> bool {
        self.index.read().unwrap().published(key).is_some()
    }

    /// Filters whose rollout changed (a dataplane acknowledged, refused, connected or left),
    /// as they happen. A lagging receiver should re-read every filter it cares about.
    pub fn subscribe_rollouts(&self) -> broadcast::Receiver<FilterKey> {
        self.rollouts.subscribe()
    }

    pub fn subscribe_chains(&self) -> watch::Receiver<u64> {
        self.chains.subscribe()
    }

    /// The chain a dataplane with these labels runs now, in chain order, with revisions.
    pub fn chain_for(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Vec<(Arc<FilterVersion>, String)> {
        self.index.read().unwrap().chain_for(labels)
    }

    pub fn dataplane_count(&self) -> usize {
        self.index.read().unwrap().dataplane_count()
    }

    /// Registers a dataplane's stream; returns its session number for [`disconnect`](Self::disconnect).
    pub fn connect(&self, id: &str, labels: BTreeMap<String, String>) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .unwrap()
            .insert(id.to_string(), session);
        let affected = {
            let mut index = self.index.write().unwrap();
            index.connect(id, labels.clone());
            index.selecting(&labels)
        };
        self.notify(affected);
        session
    }

    /// Forgets a dataplane whose stream ended, unless a newer stream of the same id took over.
    pub fn disconnect(&self, id: &str, session: u64) {
        {
            let mut sessions = self.sessions.lock().unwrap();
            if sessions.get(id) != Some(&session) {
                return;
            }
            sessions.remove(id);
        }
        let affected = {
            let mut index = self.index.write().unwrap();
            let affected = index
                .dataplane(id)
                .map(|dp| index.selecting(&dp.labels))
                .unwrap_or_default();
            index.disconnect(id);
            affected
        };
        self.stats.lock().unwrap().retain(|(dp, _), _| dp != id);
        self.notify(affected);
    }

    /// Records a dataplane's answer to the snapshot that carried `sent` (name → revision).
    pub fn acknowledge(
        &self,
        id: &str,
        sent: &BTreeMap<String, String>,
        refused: &BTreeMap<String, (String, String, Option<String>)>,
    ) {
        if refused.is_empty() {
            self.counters.acks.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.nacks.fetch_add(1, Ordering::Relaxed);
        }
        let changed = self.index.write().unwrap().acknowledge(id, sent, refused);
        self.notify(changed.iter().filter_map(|name| parse_key(name)).collect());
    }

    pub fn report_stats(&self, id: &str, filters: Vec<FilterStats>) {
        let mut stats = self.stats.lock().unwrap();
        stats.retain(|(dp, _), _| dp != id);
        for f in filters {
            stats.insert((id.to_string(), f.name.clone()), f);
        }
    }

    /// The latest stats of `key`, summed over the dataplanes that reported it.
    pub fn stats_summary(&self, key: &FilterKey) -> StatsSummary {
        let name = key.to_string();
        let stats = self.stats.lock().unwrap();
        let mut s = StatsSummary::default();
        for ((_, filter), f) in stats.iter() {
            if filter != &name {
                continue;
            }
            s.add(f);
        }
        s
    }

    /// Every (dataplane, filter) stats entry, for the Prometheus exposition.
    pub fn all_stats(&self) -> Vec<(String, FilterStats)> {
        self.stats
            .lock()
            .unwrap()
            .iter()
            .map(|((dp, _), f)| (dp.clone(), f.clone()))
            .collect()
    }

    /// Digests of every published module.
    pub fn published_digests(&self) -> BTreeSet<String> {
        self.index.read().unwrap().digests()
    }

    fn notify(&self, keys: BTreeSet<FilterKey>) {
        for key in keys {
            let _ = self.rollouts.send(key);
        }
    }
}

/// `namespace/name` → key.
pub fn parse_key(name: &str) -> Option<FilterKey> {
    let (ns, n) = name.split_once('/')?;
    Some(FilterKey::new(ns, n))
}
