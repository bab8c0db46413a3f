//! Which filters each dataplane runs, and how each filter's rollout stands: pure data, no kube,
//! no tonic, no clock. The controller feeds it resolved WasmFilters, the gRPC layer feeds it
//! dataplanes and their acknowledgements; both read answers from it.
//!
//! The snapshot budget: a dataplane's chain is one Snapshot message, so its encoded size is
//! capped ([`Index::with_snapshot_budget`]). Walking the chain in chain order, a filter whose
//! entry would take the Snapshot past the budget is left out of that dataplane's chain and
//! counts as a failed rollout of that filter on that dataplane ([`Rollout::over_budget`]),
//! with a message naming the sizes, the budget and the fix; every other filter still goes out.
//! Sizes are the filters' real protobuf encodings, computed once per published version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use wasmfilter_api::{
    FailurePolicy, FilterLimits, LabelSelector, Phase, PluginType, RequestMatch, chain_order,
};

/// A WasmFilter's identity: `namespace/name`, which is also its name on the dataplanes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilterKey {
    pub namespace: String,
    pub name: String,
}

impl FilterKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> FilterKey {
        FilterKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for FilterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One deployable version of a filter: a WasmFilter whose module resolved, verified and
/// compiled. Everything a dataplane needs except the module bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterVersion {
    pub key: FilterKey,
    pub module_digest: String,
    pub module_size: u64,
    pub root_id: String,
    pub configuration: Vec<u8>,
    /// The VM sharing key as the dataplane sees it: empty, or scoped to the namespace so two
    /// namespaces never share a VM.
    pub vm_id: String,
    pub vm_configuration: Vec<u8>,
    pub env: BTreeMap<String, String>,
    pub matches: RequestMatch,
    pub phase: Phase,
    pub priority: i32,
    pub failure_policy: FailurePolicy,
    pub limits: FilterLimits,
    pub plugin_type: PluginType,
    /// Network filters: the dataplanes' TCP listeners they run on (empty: every one).
    pub listeners: Vec<String>,
}

impl FilterVersion {
    /// A short hash of every field: dataplanes acknowledge revisions, so the operator knows
    /// which version each one runs, and an unchanged filter is never re-applied.
    pub fn revision(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.key.to_string().as_bytes());
        field(self.module_digest.as_bytes());
        field(self.root_id.as_bytes());
        field(&self.configuration);
        field(self.vm_id.as_bytes());
        field(&self.vm_configuration);
        for (k, v) in &self.env {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        for list in [
            &self.matches.hosts,
            &self.matches.path_prefixes,
            &self.matches.methods,
        ] {
            field(&(list.len() as u64).to_le_bytes());
            for item in list {
                field(item.as_bytes());
            }
        }
        field(
            format!(
                "{:?}/{}/{:?}",
                self.phase, self.priority, self.failure_policy
            )
            .as_bytes(),
        );
        field(&self.limits.memory_bytes.to_le_bytes());
        field(&(self.limits.callback_timeout.as_millis() as u64).to_le_bytes());
        // Added after the fields above: an HTTP filter keeps the revision it had before.
        if self.plugin_type != PluginType::HTTP || !self.listeners.is_empty() {
            field(format!("{:?}", self.plugin_type).as_bytes());
            for l in &self.listeners {
                field(l.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..8])
    }
}

/// A filter as published: the version to run and the dataplanes that run it.
#[derive(Clone, Debug)]
pub struct Published {
    pub selector: LabelSelector,
    pub version: Arc<FilterVersion>,
    pub revision: String,
    /// What the filter adds to a Snapshot ([`snapshot_entry_bytes`]).
    pub snapshot_bytes: u64,
}

/// The field number of `Snapshot.filters` in control.proto.
const SNAPSHOT_FILTERS_FIELD: u32 = 2;

/// The bytes a filter adds to a Snapshot: its `filters` entry (field key, length prefix and
/// the encoded `Filter`, exactly as the gRPC layer sends it).
pub fn snapshot_entry_bytes(version: &FilterVersion, revision: &str) -> u64 {
    let filter = crate::grpc::to_proto(version, revision);
    prost::encoding::message::encoded_len(SNAPSHOT_FILTERS_FIELD, &filter) as u64
}

/// Room for the Snapshot's fields besides `filters` at their widest: the version (key and a
/// 10-byte varint) and a flag or two (key and a byte each).
const SNAPSHOT_OTHER_FIELDS: u64 = 16;

/// The most a Snapshot whose filter entries take `entries` bytes can take as a ControlMessage:
/// the entries, the Snapshot's other fields at their widest and the ControlMessage's key and
/// length prefix.
pub fn snapshot_bytes(entries: u64) -> u64 {
    let snapshot = entries + SNAPSHOT_OTHER_FIELDS;
    1 + prost::encoding::encoded_len_varint(snapshot) as u64 + snapshot
}

/// A filter left out of a dataplane's chain because it does not fit the snapshot budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverBudget {
    /// The Snapshot with this filter and the filters before it in chain order that fit.
    pub chain_bytes: u64,
    /// What this filter adds ([`snapshot_entry_bytes`]).
    pub filter_bytes: u64,
    pub budget: u64,
}

impl OverBudget {
    /// For the filter's status: the sizes, the budget and what to do about it.
    pub fn message(&self, dataplane: &str) -> String {
        format!(
            "the chain for dataplane {dataplane} would be {} bytes, over the snapshot budget of \
             {} bytes (--snapshot-budget); this filter adds {} bytes: shrink its config (or \
             vm.config), narrow the selectors so that dataplane runs fewer filters, or raise \
             --snapshot-budget",
            self.chain_bytes, self.budget, self.filter_bytes
        )
    }
}

/// The chain of one set of dataplane labels, after the snapshot budget.
#[derive(Debug, Default)]
struct Plan {
    /// In chain order, with revisions: what the dataplanes are sent.
    chain: Vec<(Arc<FilterVersion>, String)>,
    /// Selected filters left out.
    over_budget: BTreeMap<FilterKey, OverBudget>,
}

/// What the index knows of one connected dataplane.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataplane {
    pub labels: BTreeMap<String, String>,
    /// Filter name → revision it reported running after its last Ack.
    pub running: BTreeMap<String, String>,
    /// Filter name → (refused revision, message) from its last Ack.
    pub refused: BTreeMap<String, (String, String)>,
}

/// How one filter's rollout stands over the connected dataplanes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// The revision being rolled out (None: the filter is not published).
    pub revision: Option<String>,
    pub selected: u32,
    pub ready: u32,
    pub failed: u32,
    /// Of `failed`: the dataplanes whose chain leaves the filter out for the snapshot budget.
    pub over_budget: u32,
    /// The message of the first of those (by dataplane), when there is one.
    pub first_over_budget: Option<String>,
    /// (dataplane, message), sorted by dataplane, at most [`MAX_FAILURES_LISTED`].
    pub failures: Vec<(String, String)>,
}

/// Failures listed per filter in its status; the counts cover the rest.
pub const MAX_FAILURES_LISTED: usize = 10;

/// Published filters and connected dataplanes.
#[derive(Debug)]
pub struct Index {
    filters: BTreeMap<FilterKey, Published>,
    dataplanes: BTreeMap<String, Dataplane>,
    /// The largest Snapshot sent to a dataplane, bytes.
    budget: u64,
    /// Sum of every published filter's `snapshot_bytes`: while a Snapshot of all of them fits,
    /// no chain needs checking.
    entries_total: u64,
    /// Chains by dataplane labels, computed on demand; cleared when a filter changes.
    plans: Mutex<HashMap<BTreeMap<String, String>, Arc<Plan>>>,
}

impl Default for Index {
    /// No snapshot budget.
    fn default() -> Self {
        Index::with_snapshot_budget(u64::MAX)
    }
}

impl Index {
    /// An empty index whose chains are cut to Snapshots of at most `budget` bytes.
    pub fn with_snapshot_budget(budget: u64) -> Index {
        Index {
            filters: BTreeMap::new(),
            dataplanes: BTreeMap::new(),
            budget,
            entries_total: 0,
            plans: Mutex::default(),
        }
    }

    pub fn snapshot_budget(&self) -> u64 {
        self.budget
    }

    /// Publishes (or replaces) a filter. Returns whether anything changed.
    pub fn publish(&mut self, selector: LabelSelector, version: FilterVersion) -> bool {
        let revision = version.revision();
        let key = version.key.clone();
        if let Some(p) = self.filters.get(&key)
            && p.revision == revision
            && p.selector == selector
        {
            return false;
        }
        let snapshot_bytes = snapshot_entry_bytes(&version, &revision);
        self.entries_total += snapshot_bytes;
        if let Some(old) = self.filters.insert(
            key,
            Published {
                selector,
                version: Arc::new(version),
                revision,
                snapshot_bytes,
            },
        ) {
            self.entries_total -= old.snapshot_bytes;
        }
        self.plans_changed();
        true
    }

    /// Withdraws a filter from every dataplane. Returns whether it was published.
    pub fn withdraw(&mut self, key: &FilterKey) -> bool {
        let Some(old) = self.filters.remove(key) else {
            return false;
        };
        self.entries_total -= old.snapshot_bytes;
        self.plans_changed();
        true
    }

    fn plans_changed(&mut self) {
        self.plans.get_mut().unwrap().clear();
    }

    /// Whether every published filter fits one Snapshot, so no chain can be over budget.
    fn all_fit(&self) -> bool {
        snapshot_bytes(self.entries_total) <= self.budget
    }

    /// The chain of dataplanes with `labels`, after the budget (computed once per labels
    /// until a filter changes).
    fn plan(&self, labels: &BTreeMap<String, String>) -> Arc<Plan> {
        if let Some(plan) = self.plans.lock().unwrap().get(labels) {
            return plan.clone();
        }
        let mut selected: Vec<_> = self
            .filters
            .iter()
            .filter(|(_, p)| p.selector.matches(labels))
            .map(|(key, p)| {
                (
                    chain_order(p.version.phase, p.version.priority, &key.to_string()),
                    p,
                )
            })
            .collect();
        selected.sort_by(|a, b| a.0.cmp(&b.0));
        let mut plan = Plan::default();
        let mut entries = 0u64;
        for (_, p) in selected {
            let chain_bytes = snapshot_bytes(entries + p.snapshot_bytes);
            if chain_bytes > self.budget {
                plan.over_budget.insert(
                    p.version.key.clone(),
                    OverBudget {
                        chain_bytes,
                        filter_bytes: p.snapshot_bytes,
                        budget: self.budget,
                    },
                );
            } else {
                entries += p.snapshot_bytes;
                plan.chain.push((p.version.clone(), p.revision.clone()));
            }
        }
        let plan = Arc::new(plan);
        self.plans
            .lock()
            .unwrap()
            .insert(labels.clone(), plan.clone());
        plan
    }

    /// Why `key` is left out of the chain of a dataplane with `labels`, if it is.
    pub fn over_budget(
        &self,
        key: &FilterKey,
        labels: &BTreeMap<String, String>,
    ) -> Option<OverBudget> {
        if self.all_fit() {
            return None;
        }
        self.plan(labels).over_budget.get(key).copied()
    }

    /// Filter → the connected dataplanes whose chain leaves it out for the budget.
    pub fn over_budget_counts(&self) -> BTreeMap<FilterKey, u32> {
        let mut counts = BTreeMap::new();
        if self.all_fit() {
            return counts;
        }
        for dp in self.dataplanes.values() {
            for key in self.plan(&dp.labels).over_budget.keys() {
                *counts.entry(key.clone()).or_default() += 1;
            }
        }
        counts
    }

    pub fn published(&self, key: &FilterKey) -> Option<&Published> {
        self.filters.get(key)
    }

    pub fn published_keys(&self) -> impl Iterator<Item = &FilterKey> {
        self.filters.keys()
    }

    /// The chain a dataplane with `labels` runs, in chain order (phase, priority, then
    /// `namespace/name`), without the filters that do not fit the snapshot budget.
    pub fn chain_for(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Vec<(Arc<FilterVersion>, String)> {
        self.plan(labels).chain.clone()
    }

    /// Every module digest some dataplane may be told to fetch.
    pub fn digests(&self) -> BTreeSet<String> {
        self.filters
            .values()
            .map(|p| p.version.module_digest.clone())
            .collect()
    }

    pub fn connect(&mut self, id: &str, labels: BTreeMap<String, String>) {
        self.dataplanes.insert(
            id.to_string(),
            Dataplane {
                labels,
                ..Default::default()
            },
        );
    }

    pub fn disconnect(&mut self, id: &str) {
        self.dataplanes.remove(id);
    }

    pub fn dataplane(&self, id: &str) -> Option<&Dataplane> {
        self.dataplanes.get(id)
    }

    pub fn dataplane_count(&self) -> usize {
        self.dataplanes.len()
    }

    /// Records a dataplane's Ack: `sent` is the snapshot it answers (filter name → revision),
    /// `refused` the filters it could not apply (name → (revision, message, revision it keeps
    /// running, if any)). Returns the filters whose rollout this changes.
    pub fn acknowledge(
        &mut self,
        id: &str,
        sent: &BTreeMap<String, String>,
        refused: &BTreeMap<String, (String, String, Option<String>)>,
    ) -> BTreeSet<String> {
        let Some(dp) = self.dataplanes.get_mut(id) else {
            return BTreeSet::new();
        };
        let mut running = BTreeMap::new();
        let mut refusals = BTreeMap::new();
        for (name, revision) in sent {
            match refused.get(name) {
                None => {
                    running.insert(name.clone(), revision.clone());
                }
                Some((rev, message, keeps)) => {
                    refusals.insert(name.clone(), (rev.clone(), message.clone()));
                    if let Some(keeps) = keeps {
                        running.insert(name.clone(), keeps.clone());
                    }
                }
            }
        }
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for name in dp.running.keys().chain(running.keys()) {
            if dp.running.get(name) != running.get(name) {
                changed.insert(name.clone());
            }
        }
        for name in dp.refused.keys().chain(refusals.keys()) {
            if dp.refused.get(name) != refusals.get(name) {
                changed.insert(name.clone());
            }
        }
        dp.running = running;
        dp.refused = refusals;
        changed
    }

    /// How `key`'s current revision stands on the dataplanes its selector matches.
    pub fn rollout(&self, key: &FilterKey) -> Rollout {
        let Some(p) = self.filters.get(key) else {
            return Rollout::default();
        };
        let name = key.to_string();
        let mut r = Rollout {
            revision: Some(p.revision.clone()),
            ..Default::default()
        };
        let all_fit = self.all_fit();
        for (id, dp) in &self.dataplanes {
            if !p.selector.matches(&dp.labels) {
                continue;
            }
            r.selected += 1;
            // Left out of the chain: failed, even while an Ack of an older chain still lists it.
            if !all_fit && let Some(over) = self.plan(&dp.labels).over_budget.get(key) {
                let message = over.message(id);
                r.failed += 1;
                r.over_budget += 1;
                if r.first_over_budget.is_none() {
                    r.first_over_budget = Some(message.clone());
                }
                if r.failures.len() < MAX_FAILURES_LISTED {
                    r.failures.push((id.clone(), message));
                }
            } else if dp.running.get(&name) == Some(&p.revision) {
                r.ready += 1;
            } else if let Some((rev, message)) = dp.refused.get(&name)
                && rev == &p.revision
            {
                r.failed += 1;
                if r.failures.len() < MAX_FAILURES_LISTED {
                    r.failures.push((id.clone(), message.clone()));
                }
            }
        }
        r
    }

    /// The filters (published now) that a dataplane with `labels` runs, by name.
    pub fn selecting(&self, labels: &BTreeMap<String, String>) -> BTreeSet<FilterKey> {
        self.filters
            .iter()
            .filter(|(_, p)| p.selector.matches(labels))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmfilter_api::LabelRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs),
            match_expressions: vec![],
        }
    }

    fn version(ns: &str, name: &str, phase: Phase, priority: i32) -> FilterVersion {
        FilterVersion {
            key: FilterKey::new(ns, name),
            module_digest: format!("sha256:{}", "a".repeat(64)),
            module_size: 10,
            root_id: String::new(),
            configuration: b"{}".to_vec(),
            vm_id: String::new(),
            vm_configuration: vec![],
            env: BTreeMap::new(),
            matches: RequestMatch::default(),
            phase,
            priority,
            failure_policy: FailurePolicy::FailClosed,
            limits: FilterLimits::default(),
            plugin_type: PluginType::HTTP,
            listeners: vec![],
        }
    }

    fn names(chain: &[(Arc<FilterVersion>, String)]) -> Vec<String> {
        chain.iter().map(|(f, _)| f.key.to_string()).collect()
    }

    #[test]
    fn each_dataplane_gets_the_filters_its_labels_select_in_chain_order() {
        let mut index = Index::default();
        index.publish(selector(&[]), version("team-a", "stats", Phase::Stats, 0));
        index.publish(
            selector(&[("gateway", "public")]),
            version("team-a", "auth", Phase::Authn, 0),
        );
        index.publish(
            selector(&[("gateway", "public")]),
            version("team-b", "rate", Phase::Authn, 10),
        );
        index.publish(
            LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![LabelRequirement::In("zone".into(), vec!["a".into()])],
            },
            version("team-b", "zone-a", Phase::Default, 0),
        );
        let public_a = index.chain_for(&labels(&[("gateway", "public"), ("zone", "a")]));
        assert_eq!(
            names(&public_a),
            [
                "team-b/rate",
                "team-a/auth",
                "team-a/stats",
                "team-b/zone-a"
            ]
        );
        let internal = index.chain_for(&labels(&[("gateway", "internal")]));
        assert_eq!(names(&internal), ["team-a/stats"]);
        assert!(
            index.chain_for(&labels(&[])).len() == 1,
            "empty selector selects everyone"
        );
    }

    #[test]
    fn equal_phase_and_priority_order_by_namespace_then_name() {
        let mut index = Index::default();
        for (ns, n) in [("b", "a"), ("a", "z"), ("a", "b")] {
            index.publish(selector(&[]), version(ns, n, Phase::Default, 0));
        }
        assert_eq!(names(&index.chain_for(&labels(&[]))), ["a/b", "a/z", "b/a"]);
    }

    #[test]
    fn republishing_the_same_version_is_not_a_change_but_any_field_is() {
        let mut index = Index::default();
        let v = version("ns", "f", Phase::Default, 0);
        assert!(index.publish(selector(&[]), v.clone()));
        assert!(!index.publish(selector(&[]), v.clone()));
        let rev = index.published(&v.key).unwrap().revision.clone();
        let mut config_changed = v.clone();
        config_changed.configuration = b"{\"a\":1}".to_vec();
        assert!(index.publish(selector(&[]), config_changed));
        let rev2 = index.published(&v.key).unwrap().revision.clone();
        assert_ne!(rev, rev2, "a config change is a new revision");
        assert!(index.publish(
            selector(&[("x", "y")]),
            version("ns", "f", Phase::Default, 0)
        ));
        assert!(index.withdraw(&v.key));
        assert!(!index.withdraw(&v.key));
        assert!(index.chain_for(&labels(&[("x", "y")])).is_empty());
    }

    #[test]
    fn rollout_counts_selected_ready_and_failed_dataplanes() {
        let mut index = Index::default();
        let v = version("ns", "auth", Phase::Authn, 0);
        let key = v.key.clone();
        index.publish(selector(&[("gateway", "public")]), v);
        let rev = index.published(&key).unwrap().revision.clone();
        for id in ["node-a", "node-b", "node-c"] {
            index.connect(id, labels(&[("gateway", "public")]));
        }
        index.connect("node-internal", labels(&[("gateway", "internal")]));
        let sent: BTreeMap<String, String> = [("ns/auth".to_string(), rev.clone())].into();
        assert_eq!(
            index.rollout(&key),
            Rollout {
                revision: Some(rev.clone()),
                selected: 3,
                ..Default::default()
            }
        );
        let changed = index.acknowledge("node-a", &sent, &BTreeMap::new());
        assert_eq!(changed, ["ns/auth".to_string()].into());
        let refused = [(
            "ns/auth".to_string(),
            (
                rev.clone(),
                "proxy_on_configure returned false".to_string(),
                None,
            ),
        )]
        .into();
        index.acknowledge("node-b", &sent, &refused);
        let r = index.rollout(&key);
        assert_eq!((r.selected, r.ready, r.failed), (3, 1, 1));
        assert_eq!(
            r.failures,
            [(
                "node-b".to_string(),
                "proxy_on_configure returned false".to_string()
            )]
        );
        // The same Ack again changes nothing (no status write, no Event).
        assert!(
            index
                .acknowledge("node-a", &sent, &BTreeMap::new())
                .is_empty()
        );
        // A dataplane that leaves is no longer counted.
        index.disconnect("node-b");
        let r = index.rollout(&key);
        assert_eq!((r.selected, r.ready, r.failed), (2, 1, 0));
        // A new revision is not ready anywhere until acknowledged.
        let mut v2 = version("ns", "auth", Phase::Authn, 0);
        v2.configuration = b"new".to_vec();
        index.publish(selector(&[("gateway", "public")]), v2);
        assert_eq!(index.rollout(&key).ready, 0);
    }

    #[test]
    fn a_refused_update_that_keeps_the_old_revision_running_is_failed_not_ready() {
        let mut index = Index::default();
        let v = version("ns", "f", Phase::Default, 0);
        let key = v.key.clone();
        index.publish(selector(&[]), v);
        let old = index.published(&key).unwrap().revision.clone();
        index.connect("dp", labels(&[]));
        index.acknowledge(
            "dp",
            &[("ns/f".to_string(), old.clone())].into(),
            &BTreeMap::new(),
        );
        let mut v2 = version("ns", "f", Phase::Default, 0);
        v2.configuration = b"bad".to_vec();
        index.publish(selector(&[]), v2);
        let new = index.published(&key).unwrap().revision.clone();
        index.acknowledge(
            "dp",
            &[("ns/f".to_string(), new.clone())].into(),
            &[(
                "ns/f".to_string(),
                (new.clone(), "bad config".to_string(), Some(old.clone())),
            )]
            .into(),
        );
        let r = index.rollout(&key);
        assert_eq!((r.selected, r.ready, r.failed), (1, 0, 1));
        assert_eq!(index.dataplane("dp").unwrap().running["ns/f"], old);
    }

    /// A version whose configuration is `bytes` long.
    fn sized(ns: &str, name: &str, priority: i32, bytes: usize) -> FilterVersion {
        let mut v = version(ns, name, Phase::Default, priority);
        v.configuration = vec![b'x'; bytes];
        v
    }

    /// The ControlMessage the gRPC layer would send for `chain`, encoded, at the widest version.
    fn encoded(chain: &[(Arc<FilterVersion>, String)]) -> u64 {
        use wasmfilter_api::control::{ControlMessage, Snapshot, control_message};
        let message = ControlMessage {
            kind: Some(control_message::Kind::Snapshot(Snapshot {
                version: u64::MAX,
                filters: chain
                    .iter()
                    .map(|(f, rev)| crate::grpc::to_proto(f, rev))
                    .collect(),
                ..Default::default()
            })),
        };
        prost::Message::encoded_len(&message) as u64
    }

    #[test]
    fn filters_past_the_snapshot_budget_are_left_out_in_chain_order_and_fail_alone() {
        let all = |index: &Index| {
            let mut with_all: Vec<_> = index
                .filters
                .values()
                .map(|p| (p.version.clone(), p.revision.clone()))
                .collect();
            with_all.sort_by_key(|(f, _)| chain_order(f.phase, f.priority, &f.key.to_string()));
            with_all
        };
        // Room for about two 10 KB configurations: chain order is priority (higher first).
        let mut index = Index::with_snapshot_budget(25_000);
        index.publish(selector(&[]), sized("a", "first", 30, 10_000));
        index.publish(selector(&[]), sized("b", "second", 20, 10_000));
        index.publish(selector(&[]), sized("c", "big", 10, 10_000));
        index.publish(selector(&[]), sized("d", "small", 0, 100));
        index.publish(
            selector(&[("gateway", "internal")]),
            sized("e", "internal-only", 0, 100),
        );
        index.connect("node-a", labels(&[]));
        index.connect("node-b", labels(&[]));
        index.connect("node-i", labels(&[("gateway", "internal")]));

        // A smaller filter after the refused one still fits.
        let chain = index.chain_for(&labels(&[]));
        assert_eq!(names(&chain), ["a/first", "b/second", "d/small"]);
        assert!(encoded(&chain) <= 25_000, "{}", encoded(&chain));

        // The refused filter fails on every dataplane, naming the sizes and the fix; exact
        // sizes: the Snapshot with it would be the real encoding of the chain plus it.
        let big = FilterKey::new("c", "big");
        let r = index.rollout(&big);
        assert_eq!((r.selected, r.ready, r.failed, r.over_budget), (3, 0, 3, 3));
        let mut with_big = chain[..2].to_vec();
        let p = index.published(&big).unwrap();
        with_big.push((p.version.clone(), p.revision.clone()));
        let over = index.over_budget(&big, &labels(&[])).unwrap();
        let real = encoded(&with_big);
        assert!(
            (real..=real + SNAPSHOT_OTHER_FIELDS).contains(&over.chain_bytes),
            "{over:?}: {real} bytes encoded"
        );
        assert_eq!(over.filter_bytes, real - encoded(&chain[..2]));
        assert_eq!(r.failures[0].0, "node-a");
        assert_eq!(
            r.failures[0].1,
            format!(
                "the chain for dataplane node-a would be {} bytes, over the snapshot budget of \
                 25000 bytes (--snapshot-budget); this filter adds {} bytes: shrink its config \
                 (or vm.config), narrow the selectors so that dataplane runs fewer filters, or \
                 raise --snapshot-budget",
                over.chain_bytes, over.filter_bytes
            )
        );
        assert_eq!(index.over_budget_counts(), [(big.clone(), 3)].into());
        // The others are unaffected: nothing failed, and the internal gateway still gets the
        // rest, its own filter included.
        for name in [("a", "first"), ("d", "small"), ("e", "internal-only")] {
            let r = index.rollout(&FilterKey::new(name.0, name.1));
            assert_eq!((r.failed, r.over_budget), (0, 0), "{name:?}");
        }
        assert_eq!(
            names(&index.chain_for(&labels(&[("gateway", "internal")]))),
            ["a/first", "b/second", "d/small", "e/internal-only"]
        );

        // Without a budget, everything goes out.
        let mut unlimited = Index::default();
        for (f, _) in all(&index) {
            unlimited.publish(selector(&[]), (*f).clone());
        }
        let chain = unlimited.chain_for(&labels(&[]));
        assert_eq!(chain.len(), 5);
        assert!(encoded(&chain) > 25_000);

        // Withdrawing a filter before it in the chain makes room.
        index.withdraw(&FilterKey::new("a", "first"));
        assert_eq!(
            names(&index.chain_for(&labels(&[]))),
            ["b/second", "c/big", "d/small"]
        );
        assert_eq!(index.rollout(&big).over_budget, 0);
        assert!(index.over_budget_counts().is_empty());
    }

    #[test]
    fn failures_listed_are_bounded() {
        let mut index = Index::default();
        let v = version("ns", "f", Phase::Default, 0);
        let key = v.key.clone();
        index.publish(selector(&[]), v);
        let rev = index.published(&key).unwrap().revision.clone();
        for i in 0..25 {
            let id = format!("dp-{i:02}");
            index.connect(&id, labels(&[]));
            index.acknowledge(
                &id,
                &[("ns/f".to_string(), rev.clone())].into(),
                &[("ns/f".to_string(), (rev.clone(), "no".to_string(), None))].into(),
            );
        }
        let r = index.rollout(&key);
        assert_eq!(r.failed, 25);
        assert_eq!(r.failures.len(), MAX_FAILURES_LISTED);
        assert_eq!(r.failures[0].0, "dp-00");
    }
}
