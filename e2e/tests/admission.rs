//! The WasmFilter CRD in a real API server: every case of api/tests/data/wasmfilter-cases.yaml
//! applied with `kubectl apply --server-side`. Valid ones are stored; invalid ones are refused
//! at admission, and kubectl shows the user the field and the message the table names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use serde_json::Value;
use wasmfilter_e2e::{Cluster, Output, repo_root};

const NAMESPACE: &str = "admission";

#[derive(Debug, Deserialize)]
struct Cases {
    valid: Vec<Case>,
    invalid: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, Value>,
    field: Option<String>,
    message: Option<String>,
    #[allow(dead_code)] // which part of the CRD rejects it; the API server does not say
    by: Option<String>,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

impl Case {
    /// The example with this case's edits (JSON pointers, `remove` first, then `set` in key
    /// order, as api/tests/crd.rs applies them), named `object_name`.
    fn object(&self, example: &Value, object_name: &str) -> Value {
        let mut object = example.clone();
        for pointer in &self.remove {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let removed = object
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .and_then(|o| o.remove(&key.replace("~1", "/")));
            assert!(
                removed.is_some(),
                "{}: nothing to remove at {pointer}",
                self.name
            );
        }
        for (pointer, value) in &self.set {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            object
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("{}: no object at {pointer}", self.name))
                .insert(key.replace("~1", "/"), value.clone());
        }
        object["metadata"] = serde_json::json!({"name": object_name, "namespace": NAMESPACE});
        object
    }
}

fn cases() -> Cases {
    serde_yaml_ng::from_str(&read("api/tests/data/wasmfilter-cases.yaml")).unwrap()
}

fn example() -> Value {
    serde_yaml_ng::from_str(&read("examples/wasmfilter.yaml")).unwrap()
}

/// The shared API server with the CRD from crds/ installed and established, and the test
/// namespace created.
fn cluster() -> Option<&'static Cluster> {
    let cluster = Cluster::shared()?;
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let crd = repo_root().join("crds/wasmfilter.yaml");
        cluster
            .kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()])
            .ok();
        cluster
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/wasmfilters.wasmfilter.dev",
            ])
            .ok();
        cluster
            .apply_yaml(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n"
            ))
            .ok();
    });
    Some(cluster)
}

/// How an object is sent to the API server.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `kubectl apply --server-side`: a PATCH; the API server first merges the object into its
    /// typed form, which refuses duplicates in set-type lists itself.
    ServerSideApply,
    /// `kubectl create`: a POST, checked by the CRD's schema and CEL rules alone.
    Create,
}

/// Sends objects from several threads (kubectl is a process per object; the API server
/// answers in a few milliseconds).
fn send_all(cluster: &Cluster, objects: &[(String, Value)], via: Via) -> Vec<Output> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, object)) = objects.get(i) else {
                        break;
                    };
                    let out = match via {
                        Via::ServerSideApply => cluster.apply_yaml(&object.to_string()),
                        Via::Create => {
                            cluster.kubectl_with_input(&["create", "-f", "-"], &object.to_string())
                        }
                    };
                    results.lock().unwrap().insert(i, out);
                }
            });
        }
    });
    results.into_inner().unwrap().into_values().collect()
}

#[test]
fn every_valid_wasmfilter_is_accepted() {
    let Some(cluster) = cluster() else { return };
    let example = example();
    let cases = cases().valid;
    let objects: Vec<(String, Value)> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let name = format!("valid-{i}");
            let object = case.object(&example, &name);
            (name, object)
        })
        .collect();
    let mut refused = Vec::new();
    for ((case, (name, _)), out) in
        cases
            .iter()
            .zip(&objects)
            .zip(send_all(cluster, &objects, Via::ServerSideApply))
    {
        if !out.success()
            || !out
                .stdout
                .contains(&format!("wasmfilter.wasmfilter.dev/{name}"))
        {
            refused.push(format!("{} ({name}):\n{out}", case.name));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} valid WasmFilters were refused:\n\n{}",
        refused.len(),
        cases.len(),
        refused.join("\n\n")
    );

    // Stored, and read back with the API server's defaults.
    let out = cluster
        .kubectl(&["get", "wasmfilters", "-n", NAMESPACE, "-o", "json"])
        .ok();
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let stored: BTreeMap<&str, &Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap(), o))
        .filter(|(name, _)| name.starts_with("valid-"))
        .collect();
    let expected: BTreeSet<&str> = objects.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(stored.keys().copied().collect::<BTreeSet<_>>(), expected);
    // The bare-minimum case gets every default from the schema.
    let minimum = cases
        .iter()
        .position(|c| c.name.starts_with("a bare minimum"))
        .expect("the table has a bare-minimum case");
    let spec = &stored[format!("valid-{minimum}").as_str()]["spec"];
    assert_eq!(spec["phase"], "Default", "{spec:#}");
    assert_eq!(spec["failurePolicy"], "FailClosed", "{spec:#}");
    assert_eq!(spec["priority"], 0, "{spec:#}");
}

#[test]
fn every_invalid_wasmfilter_is_rejected_naming_the_field() {
    let Some(cluster) = cluster() else { return };
    let example = example();
    let cases = cases().invalid;
    assert!(
        cases.len() >= 20,
        "the table should hold at least 20 invalid WasmFilters"
    );
    let objects: Vec<(String, Value)> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let name = format!("invalid-{i}");
            let object = case.object(&example, &name);
            (name, object)
        })
        .collect();
    // The table's field and message are what the schema and CEL rules say (a POST, as
    // `kubectl create` or a first client-side `kubectl apply` sends).
    let mut wrong = Vec::new();
    for ((case, (name, _)), out) in
        cases
            .iter()
            .zip(&objects)
            .zip(send_all(cluster, &objects, Via::Create))
    {
        let field = case
            .field
            .as_deref()
            .expect("an invalid case names a field");
        let message = case
            .message
            .as_deref()
            .expect("an invalid case names a message");
        // kubectl prints: The WasmFilter "NAME" is invalid: FIELD: ... MESSAGE
        let named = out
            .stderr
            .contains(&format!("WasmFilter \"{name}\" is invalid"));
        let field_shown = out.stderr.contains(&format!("{field}: "));
        if out.success() || !named || !field_shown || !out.stderr.contains(message) {
            wrong.push(format!(
                "{} ({name}): expected a refusal naming `{field}` with `{message}`\n{out}",
                case.name
            ));
        }
    }
    // `kubectl apply --server-side` refuses every one as well, naming the field; a duplicate in
    // a set-type list is refused before validation, naming the list (`.spec.match.hosts`)
    // rather than the entry (`spec.match.hosts[1]`).
    for ((case, (name, _)), out) in
        cases
            .iter()
            .zip(&objects)
            .zip(send_all(cluster, &objects, Via::ServerSideApply))
    {
        let field = case.field.as_deref().unwrap();
        let list = field.split('[').next().unwrap();
        if out.success() || !out.stderr.contains(list) {
            wrong.push(format!(
                "{} ({name}): expected `kubectl apply --server-side` to refuse it naming `{list}`\n{out}",
                case.name
            ));
        }
    }
    // Nothing of them was stored.
    let out = cluster
        .kubectl(&["get", "wasmfilters", "-n", NAMESPACE, "-o", "name"])
        .ok();
    let stored: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("/invalid-"))
        .collect();
    assert!(stored.is_empty(), "refused objects were stored: {stored:?}");
    eprintln!(
        "{} invalid WasmFilters refused by the API server, each naming its field",
        cases.len()
    );
}
