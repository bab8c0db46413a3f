//! What a (re)started operator sends the dataplanes, against the fake API server
//! (tests/controller/fake_apiserver.rs) with the registry down: no snapshot before every
//! listed WasmFilter was reconciled once, the module each status names kept published, and an
//! object nested too deep for a JSON decoder refused alone (issue #21). The e2e suite checks
//! the same against a real API server with real dataplanes sampled every 10 ms.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_stream::StreamExt;
use wasmfilter_api::control::filter_discovery_client::FilterDiscoveryClient;
use wasmfilter_api::control::{
    DataplaneMessage, Hello, Snapshot, control_message, dataplane_message,
};
use wasmfilter_operator::run::{Operator, RunArgs};

#[path = "controller/fake_apiserver.rs"]
#[allow(dead_code)] // shared with controller.rs, which uses the rest
mod fake_apiserver;
use fake_apiserver::FakeApiServer;

const FILTERS: usize = 20;

/// A registry address nothing listens on: every resolution fails as "unavailable".
fn dead_registry() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

fn digest(i: usize) -> String {
    format!("sha256:{i:064x}")
}

/// `{"a":{"a":…1…}}`, `levels` deep, built without recursion.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!({ "a": v });
    }
    v
}

/// A WasmFilter as a previous operator process left it: resolved and published, its status
/// naming the module digest.
fn resolved_filter(api: &FakeApiServer, registry: &str, ns: &str, name: &str, i: usize) {
    let image = format!("{registry}/filters/f{i}:v1");
    api.put_filter(json!({
        "apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilter",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"module": {"image": image}, "config": {"filter": i},
                 "failurePolicy": if i.is_multiple_of(2) { "FailClosed" } else { "FailOpen" }},
    }));
    let mut obj = api.filter(ns, name).unwrap();
    obj["status"] = json!({
        "observedGeneration": 1,
        "module": {"digest": digest(i), "resolvedFrom": image, "size": 1000 + i},
        "conditions": [{"type": "Resolved", "status": "True", "reason": "Resolved",
                        "message": "resolved", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    api.put_object("wasmfilters", ns, name, obj);
}

fn condition(status: &Value, type_: &str) -> Option<(String, String, String)> {
    status["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == type_).then(|| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
    })
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects as a dataplane and returns the stream of snapshots it is sent.
async fn dataplane(
    op: &Operator,
    id: &str,
) -> impl tokio_stream::Stream<Item = Snapshot> + Unpin + use<> {
    let addr = op.grpc_addr().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FilterDiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DataplaneMessage {
        kind: Some(dataplane_message::Kind::Hello(Hello {
            id: id.into(),
            version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The sender stays open with the stream: keep it alive inside the returned stream.
    Box::pin(inbound.filter_map(move |m| {
        let _keep = &tx;
        match m.ok()?.kind? {
            control_message::Kind::Snapshot(s) => Some(s),
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_registry_down_sends_the_full_chain_first_and_refuses_deep_objects_alone()
 {
    let api = FakeApiServer::start().await;
    let registry = dead_registry();
    for i in 0..FILTERS {
        let ns = ["team-a", "team-b", "team-c"][i % 3];
        resolved_filter(&api, &registry, ns, &format!("f{i:02}"), i);
    }
    // Admitted by a real API server, past any JSON decoder's default depth limit.
    for (name, levels) in [("deep-200", 200), ("deep-1000", 1000)] {
        api.put_filter(json!({
            "apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilter",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"module": {"image": format!("{registry}/filters/deep:v1")},
                     "config": nested(levels)},
        }));
    }

    let cache = tempfile::tempdir().unwrap();
    let mut args = RunArgs::for_tests(cache.path().to_path_buf());
    args.insecure_registries = vec![registry.clone()];
    let started = Instant::now();
    let op = Operator::start_with_client(args, api.client())
        .await
        .unwrap();
    // A dataplane that was connected to the previous operator reconnects at once.
    let mut snapshots = dataplane(&op, "dp-1").await;
    let first = tokio::time::timeout(Duration::from_secs(30), snapshots.next())
        .await
        .expect("a first snapshot within 30s")
        .expect("the stream stays open");
    let first_after = started.elapsed();
    let mut names: Vec<(String, String)> = first
        .filters
        .iter()
        .map(|f| (f.name.clone(), f.module_digest.clone()))
        .collect();
    names.sort();
    let mut expected: Vec<(String, String)> = (0..FILTERS)
        .map(|i| {
            let ns = ["team-a", "team-b", "team-c"][i % 3];
            (format!("{ns}/f{i:02}"), digest(i))
        })
        .collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "the first snapshot holds every filter with the digest its status names (and not the \
         deep ones); it came {first_after:?} after the start"
    );
    assert!(first.complete, "the operator marks its snapshots complete");
    println!(
        "first snapshot: {} filters, {first_after:?} after the start",
        names.len()
    );

    // Status says why the module is not re-resolved, and keeps naming the running digest.
    for i in 0..FILTERS {
        let ns = ["team-a", "team-b", "team-c"][i % 3];
        let name = format!("f{i:02}");
        let status = wait_for(
            &format!("{ns}/{name}'s Resolved condition to say RegistryUnavailable"),
            Duration::from_secs(20),
            || {
                let status = api.filter(ns, &name)?["status"].clone();
                let (s, reason, _) = condition(&status, "Resolved")?;
                (s == "False" && reason == "RegistryUnavailable").then_some(status)
            },
        )
        .await;
        assert_eq!(status["module"]["digest"], json!(digest(i)), "{status}");
    }
    // Each deep object is refused alone, with the field and the bound in its status.
    for (name, levels) in [("deep-200", 200), ("deep-1000", 1000)] {
        let (s, reason, message) = wait_for(
            &format!("{name}'s InvalidSpec condition"),
            Duration::from_secs(20),
            || condition(&api.filter("team-a", name)?["status"], "Resolved"),
        )
        .await;
        assert_eq!(
            (s.as_str(), reason.as_str()),
            ("False", "InvalidSpec"),
            "{message}"
        );
        assert!(
            message.contains(&format!("spec.config is nested {levels} levels deep")),
            "{message}"
        );
        // The status write's answer (the deep object itself) must not fail the reconcile
        // before its Event is raised.
        wait_for(
            &format!("a Warning Event InvalidSpec for {name}"),
            Duration::from_secs(20),
            || {
                api.events()
                    .iter()
                    .any(|e| {
                        e["regarding"]["name"] == name
                            && e["type"] == "Warning"
                            && e["reason"] == "InvalidSpec"
                    })
                    .then_some(())
            },
        )
        .await;
    }

    // The operator is not blind: a deep object arriving on the watch is refused alone, and a
    // change made afterwards reaches the dataplane.
    api.put_filter(json!({
        "apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilter",
        "metadata": {"name": "deep-watch", "namespace": "team-b"},
        "spec": {"module": {"image": format!("{registry}/filters/deep:v1")},
                 "vm": {"config": nested(300)}},
    }));
    let (_, reason, message) = wait_for("deep-watch's condition", Duration::from_secs(20), || {
        condition(&api.filter("team-b", "deep-watch")?["status"], "Resolved")
    })
    .await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(
        message.contains("spec.vm.config is nested 300 levels deep"),
        "{message}"
    );
    api.delete_filter("team-c", "f02");
    let next = tokio::time::timeout(Duration::from_secs(10), snapshots.next())
        .await
        .expect("the deletion reaches the dataplane")
        .unwrap();
    assert_eq!(next.filters.len(), FILTERS - 1);
    assert!(next.filters.iter().all(|f| f.name != "team-c/f02"));
    op.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_goes_out_while_the_api_server_fails_the_first_list() {
    let api = FakeApiServer::start().await;
    let registry = dead_registry();
    resolved_filter(&api, &registry, "team-a", "guard", 7);
    api.fail_all(Some(503));
    let cache = tempfile::tempdir().unwrap();
    let mut args = RunArgs::for_tests(cache.path().to_path_buf());
    args.insecure_registries = vec![registry];
    let op = Operator::start_with_client(args, api.client())
        .await
        .unwrap();
    let mut snapshots = dataplane(&op, "dp-1").await;
    // While the API server fails, the dataplane is sent nothing (it keeps its chain).
    assert!(
        tokio::time::timeout(Duration::from_secs(2), snapshots.next())
            .await
            .is_err(),
        "no snapshot before the first list"
    );
    assert!(!op.health().is_synced());
    api.fail_all(None);
    let first = tokio::time::timeout(Duration::from_secs(30), snapshots.next())
        .await
        .expect("a snapshot once the API server answers")
        .unwrap();
    assert_eq!(first.filters.len(), 1);
    assert_eq!(first.filters[0].module_digest, digest(7));
    wait_for("ready", Duration::from_secs(10), || {
        op.health().readiness().ok()
    })
    .await;
    op.stop().await.unwrap();
}
