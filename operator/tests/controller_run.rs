//! The operator process (`run::Operator`) and its Lease election, against the fake API
//! server: who leads, what /ready and /metrics say, when the gRPC listener opens.

use std::time::Duration;

use serde_json::json;
use wasmfilter_operator::leader::{Elector, LeaseConfig, LeaseLost};
use wasmfilter_operator::run::{Operator, RunArgs};

#[path = "controller/fake_apiserver.rs"]
#[allow(dead_code)] // shared with controller.rs, which uses the rest
mod fake_apiserver;
use fake_apiserver::FakeApiServer;

fn fast(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_millis(600),
        renew_every: Duration::from_millis(100),
        renew_deadline: Duration::from_millis(400),
        ..LeaseConfig::new("wasmfilter-system", "wasmfilter-operator", identity)
    }
}

fn holder(api: &FakeApiServer) -> Option<String> {
    api.object("leases", "wasmfilter-system", "wasmfilter-operator")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_when_it_stops_renewing() {
    let api = FakeApiServer::start().await;
    let a = Elector::new(api.client(), fast("replica-a"));
    let b = Elector::new(api.client(), fast("replica-b"));

    assert!(a.try_acquire_or_renew().await.unwrap(), "creates the Lease");
    assert!(!b.try_acquire_or_renew().await.unwrap(), "a holds it");
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));

    // a keeps renewing: b never gets it.
    let hold_a = tokio::spawn(async move {
        let lost = a.hold().await;
        (a, lost)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!b.try_acquire_or_renew().await.unwrap());
    hold_a.abort();
    let _ = hold_a.await;

    // a stops renewing (crashed): b takes over once the record stood still for the lease
    // duration on b's clock.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), b.acquire())
        .await
        .expect("b acquires the expired Lease");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "took over after {waited:?}"
    );
    assert_eq!(holder(&api).as_deref(), Some("replica-b"));
    let lease = api
        .object("leases", "wasmfilter-system", "wasmfilter-operator")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // A released Lease is taken at once.
    b.release().await;
    let c = Elector::new(api.client(), fast("replica-c"));
    assert!(c.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&api).as_deref(), Some("replica-c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_steps_down_before_the_lease_expires() {
    let api = FakeApiServer::start().await;
    let a = Elector::new(api.client(), fast("replica-a"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    // Someone else writes the Lease (a replica that saw it expire during a partition).
    let mut lease = api
        .object("leases", "wasmfilter-system", "wasmfilter-operator")
        .unwrap();
    lease["spec"]["holderIdentity"] = json!("replica-b");
    api.put_object("leases", "wasmfilter-system", "wasmfilter-operator", lease);
    match tokio::time::timeout(Duration::from_secs(5), a.hold())
        .await
        .unwrap()
    {
        LeaseLost::TakenOver { holder, .. } => assert_eq!(holder, "replica-b"),
        other => panic!("{other:?}"),
    }

    // The API server fails: the leader gives up after the renew deadline.
    let a = Elector::new(api.client(), fast("replica-a2"));
    api.put_object(
        "leases",
        "wasmfilter-system",
        "wasmfilter-operator",
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "wasmfilter-operator", "namespace": "wasmfilter-system"},
            "spec": {"holderIdentity": "replica-a2", "leaseDurationSeconds": 1}
        }),
    );
    assert!(a.try_acquire_or_renew().await.unwrap());
    api.fail_all(Some(500));
    let started = std::time::Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(5), a.hold())
        .await
        .unwrap();
    assert!(matches!(lost, LeaseLost::RenewFailed { .. }), "{lost:?}");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "before the lease duration"
    );
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_not_ready_and_opens_no_grpc_port_until_it_leads() {
    let api = FakeApiServer::start().await;
    // Another replica holds the Lease and keeps renewing it.
    let other = Elector::new(api.client(), fast("other"));
    assert!(other.try_acquire_or_renew().await.unwrap());
    let other = tokio::spawn(async move { other.hold().await });

    let cache = tempfile::tempdir().unwrap();
    let mut args = RunArgs::for_tests(cache.path().to_path_buf());
    args.no_leader_election = false;
    args.lease_namespace = "wasmfilter-system".into();
    args.identity = Some("me".into());
    let op = Operator::start_with_client(args, api.client())
        .await
        .unwrap();
    let admin = op.admin_addr();
    assert_eq!(get(admin, "/live").await.0, 200);
    let (code, body) = get(admin, "/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not the leader: waiting for the lease\n")
    );
    // The Lease's default timing (15 s) is too slow for a test: only check that nothing
    // leads here while the other replica renews.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!op.health().is_leader());
    assert_eq!(holder(&api).as_deref(), Some("other"));
    other.abort();
    tokio::time::timeout(Duration::from_secs(5), op.stop())
        .await
        .expect("a follower stops promptly")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_serves_grpc_is_ready_after_the_first_list_and_exports_metrics() {
    let api = FakeApiServer::start().await;
    api.put_filter(json!({
        "apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilter",
        "metadata": {"name": "bad", "namespace": "team-a"},
        "spec": {"module": {}},
    }));
    let cache = tempfile::tempdir().unwrap();
    let mut args = RunArgs::for_tests(cache.path().to_path_buf());
    args.no_leader_election = false;
    args.lease_namespace = "wasmfilter-system".into();
    args.identity = Some("me".into());
    let op = Operator::start_with_client(args, api.client())
        .await
        .unwrap();
    let grpc = tokio::time::timeout(Duration::from_secs(5), op.grpc_addr())
        .await
        .expect("leads at once: nobody holds the Lease");
    tokio::net::TcpStream::connect(grpc)
        .await
        .expect("the gRPC port accepts connections");
    let admin = op.admin_addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(admin, "/ready").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(&api).as_deref(), Some("me"));

    // The invalid filter was reconciled; /metrics says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = get(admin, "/metrics").await;
        assert_eq!(code, 200);
        if body.contains("wasmfilter_operator_reconcile_errors_total{reason=\"InvalidSpec\"} 1") {
            for series in [
                "wasmfilter_operator_reconciles_total",
                "wasmfilter_operator_connected_dataplanes 0",
                "wasmfilter_operator_snapshots_sent_total 0",
                "wasmfilter_operator_module_bytes_served_total 0",
                "wasmfilter_operator_pull_duration_seconds_count 0",
            ] {
                assert!(body.contains(series), "{series} missing from:\n{body}");
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconcile error in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(admin, "/nope").await.0, 404);

    tokio::time::timeout(Duration::from_secs(10), op.stop())
        .await
        .expect("stops promptly")
        .unwrap();
    // The Lease is released on a graceful stop, so a follower takes over at once.
    assert_eq!(holder(&api), None);
}

#[test]
fn tls_flags_go_together_or_plaintext_is_explicit() {
    let dir = std::path::PathBuf::from("/nonexistent");
    let mut args = RunArgs::for_tests(dir.clone());
    args.insecure_plaintext = false;
    let e = args.tls().unwrap_err().to_string();
    assert!(
        e.contains("--insecure-plaintext") && e.contains("--tls-cert"),
        "{e}"
    );
    args.tls_cert = Some(dir.join("cert.pem"));
    let e = args.tls().unwrap_err().to_string();
    assert!(e.contains("go together"), "{e}");
    args.tls_key = Some(dir.join("key.pem"));
    args.tls_client_ca = Some(dir.join("ca.pem"));
    args.insecure_plaintext = true;
    let e = args.tls().unwrap_err().to_string();
    assert!(e.contains("contradicts"), "{e}");
    args.insecure_plaintext = false;
    let e = args.tls().unwrap_err().to_string();
    assert!(e.contains("--tls-cert /nonexistent/cert.pem"), "{e}");
}
