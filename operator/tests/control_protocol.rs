//! The control protocol end to end, in one process: the operator's real FilterDiscovery server
//! on loopback, real dataplanes in managed mode (their own threads, listeners and state
//! directories), real filters built with the Rust SDK, and real HTTP requests through them.
//! The operator side is driven through the ControlPlane, as the controller drives it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wasmfilter_api::{FailurePolicy, FilterLimits, LabelSelector, Phase, RequestMatch};
use wasmfilter_dataplane::Dataplane;
use wasmfilter_operator::ModuleCache;
use wasmfilter_operator::control::ControlPlane;
use wasmfilter_operator::index::{FilterKey, FilterVersion};

/// An operator process: its own runtime, so dropping it is a kill (no goodbye on the streams).
struct Operator {
    runtime: Option<tokio::runtime::Runtime>,
    control: Arc<ControlPlane>,
    addr: SocketAddr,
}

impl Operator {
    fn start(cache_dir: &Path, addr: SocketAddr) -> Operator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cache = Arc::new(ModuleCache::open(cache_dir).unwrap());
        let control = ControlPlane::new(cache);
        // No controller here: the test publishes by hand, so the control plane is synced.
        control.mark_synced();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(wasmfilter_operator::grpc::serve(
            control.clone(),
            listener,
            None,
            std::future::pending(),
        ));
        Operator {
            runtime: Some(runtime),
            control,
            addr,
        }
    }

    fn kill(mut self) -> SocketAddr {
        self.runtime
            .take()
            .unwrap()
            .shutdown_timeout(Duration::ZERO);
        self.addr
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::ZERO);
        }
    }
}

/// Writes a managed dataplane's configuration (echo upstream, no file filters).
fn dataplane_config(
    dir: &Path,
    operator: SocketAddr,
    id: &str,
    labels: &[(&str, &str)],
) -> PathBuf {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\ndrainTimeout: 1s\n\
             routes: [{{name: all, cluster: echo}}]\n\
             clusters: [{{name: echo, builtin: echo}}]\n\
             operator:\n  address: http://{operator}\n  insecure: true\n  id: {id}\n  \
             stateDir: {id}-state\n  statsInterval: 1s\n  labels:\n{labels}"
        ),
    )
    .unwrap();
    path
}

/// GET / through a dataplane: (status, response head).
fn get(addr: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let head = out.split("\r\n\r\n").next().unwrap_or("").to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head)
}

/// The value of response header `name` as the proxy answered it.
fn header(addr: SocketAddr, name: &str) -> Option<String> {
    let (status, head) = get(addr);
    assert_eq!(status, 200, "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Modules {
    header_rewrite: (String, u64),
}

fn modules(cache: &Path) -> Modules {
    let bytes = wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap();
    let digest = ModuleCache::open(cache).unwrap().put(&bytes).unwrap();
    Modules {
        header_rewrite: (digest, bytes.len() as u64),
    }
}

/// header_rewrite setting response header `x-team` to `value`.
fn rewrite(key: &FilterKey, module: &(String, u64), config: &str) -> FilterVersion {
    FilterVersion {
        key: key.clone(),
        module_digest: module.0.clone(),
        module_size: module.1,
        root_id: String::new(),
        configuration: config.as_bytes().to_vec(),
        vm_id: String::new(),
        vm_configuration: vec![],
        env: BTreeMap::new(),
        matches: RequestMatch::default(),
        phase: Phase::Default,
        priority: 0,
        failure_policy: FailurePolicy::FailClosed,
        limits: FilterLimits::default(),
        plugin_type: Default::default(),
        listeners: vec![],
    }
}

fn team(value: &str) -> String {
    format!(r#"{{"response": {{"set": {{"x-team": "{value}"}}}}}}"#)
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

#[test]
fn snapshots_reach_selected_dataplanes_config_changes_ship_no_bytes_and_bad_filters_stay_out() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("operator-cache");
    let m = modules(&cache);
    let op = Operator::start(&cache, "127.0.0.1:0".parse().unwrap());
    let cp = op.control.clone();
    let public = [("gateway", "public")];
    let dps: Vec<Dataplane> = [("dp-a", "public"), ("dp-b", "public"), ("dp-c", "internal")]
        .iter()
        .map(|(id, gw)| {
            Dataplane::start(&dataplane_config(
                tmp.path(),
                op.addr,
                id,
                &[("gateway", gw)],
            ))
            .unwrap()
        })
        .collect();
    wait_for("three dataplanes to connect", || cp.dataplane_count() == 3);

    // Apply: both public dataplanes fetch the module once, start the filter and ACK.
    let key = FilterKey::new("team", "rewrite");
    cp.publish(
        selector(&public),
        rewrite(&key, &m.header_rewrite, &team("a")),
    );
    wait_for("rollout to the public dataplanes", || {
        let r = cp.rollout(&key);
        (r.selected, r.ready, r.failed) == (2, 2, 0)
    });
    assert_eq!(header(dps[0].proxy_addr, "x-team").as_deref(), Some("a"));
    assert_eq!(header(dps[1].proxy_addr, "x-team").as_deref(), Some("a"));
    assert_eq!(
        header(dps[2].proxy_addr, "x-team"),
        None,
        "dp-c is not selected"
    );
    let counters = &cp.counters;
    assert_eq!(counters.module_fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        counters.module_bytes_served.load(Ordering::SeqCst),
        2 * m.header_rewrite.1
    );

    // A configuration change: new behaviour everywhere, not one module byte re-sent.
    cp.publish(
        selector(&public),
        rewrite(&key, &m.header_rewrite, &team("b")),
    );
    wait_for("the new configuration to be acknowledged", || {
        let r = cp.rollout(&key);
        r.ready == 2 && r.revision.is_some()
    });
    assert_eq!(header(dps[0].proxy_addr, "x-team").as_deref(), Some("b"));
    assert_eq!(header(dps[1].proxy_addr, "x-team").as_deref(), Some("b"));
    assert_eq!(counters.module_fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        counters.module_bytes_served.load(Ordering::SeqCst),
        2 * m.header_rewrite.1,
        "a configuration change re-shipped module bytes"
    );

    // A second filter whose proxy_on_configure fails: NACKed by both, with the reason; the
    // first filter keeps serving.
    let broken = FilterKey::new("team", "broken");
    cp.publish(
        selector(&public),
        rewrite(&broken, &m.header_rewrite, "{not json"),
    );
    wait_for("the broken filter to be refused", || {
        cp.rollout(&broken).failed == 2
    });
    let r = cp.rollout(&broken);
    assert_eq!((r.selected, r.ready), (2, 0));
    assert_eq!(r.failures.len(), 2);
    assert_eq!(r.failures[0].0, "dp-a");
    assert!(
        r.failures[0]
            .1
            .contains("proxy_on_configure returned false")
            && r.failures[0].1.contains("invalid plugin configuration"),
        "the failure names the callback and the module's own words: {:?}",
        r.failures
    );
    assert_eq!(cp.rollout(&key).ready, 2, "the good filter stays ready");
    assert_eq!(header(dps[0].proxy_addr, "x-team").as_deref(), Some("b"));

    // A bad update of the good filter: refused, and its last good revision keeps running.
    cp.withdraw(&broken);
    cp.publish(selector(&public), rewrite(&key, &m.header_rewrite, "[1,"));
    wait_for("the bad update to be refused", || {
        cp.rollout(&key).failed == 2
    });
    assert_eq!(
        header(dps[0].proxy_addr, "x-team").as_deref(),
        Some("b"),
        "the last good revision keeps serving"
    );

    // The selector moves to the internal gateway: the filter leaves dp-a and dp-b.
    cp.publish(
        selector(&[("gateway", "internal")]),
        rewrite(&key, &m.header_rewrite, &team("c")),
    );
    wait_for("the move to dp-c", || {
        let r = cp.rollout(&key);
        (r.selected, r.ready) == (1, 1)
    });
    wait_for("dp-a to drop the filter", || {
        header(dps[0].proxy_addr, "x-team").is_none()
    });
    assert_eq!(header(dps[1].proxy_addr, "x-team"), None);
    assert_eq!(header(dps[2].proxy_addr, "x-team").as_deref(), Some("c"));

    // Stats flow back: the requests through dp-c were counted by the filter.
    wait_for("stats from dp-c", || cp.stats_summary(&key).invocations > 0);

    // Deleted: gone from every dataplane.
    cp.withdraw(&key);
    wait_for("dp-c to drop the filter", || {
        header(dps[2].proxy_addr, "x-team").is_none()
    });
    for dp in dps {
        dp.shutdown();
    }
}

#[test]
fn traffic_survives_the_operator_and_a_restarted_dataplane_serves_its_last_good_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("operator-cache");
    let m = modules(&cache);
    let op = Operator::start(&cache, "127.0.0.1:0".parse().unwrap());
    let config = dataplane_config(tmp.path(), op.addr, "dp-a", &[("gateway", "public")]);
    let dp = Dataplane::start(&config).unwrap();
    let key = FilterKey::new("team", "rewrite");
    op.control
        .publish(selector(&[]), rewrite(&key, &m.header_rewrite, &team("a")));
    wait_for("rollout", || op.control.rollout(&key).ready == 1);

    // Kill the operator: every request still passes through the filter.
    let addr = op.kill();
    for _ in 0..50 {
        assert_eq!(header(dp.proxy_addr, "x-team").as_deref(), Some("a"));
    }

    // Restart the dataplane while the operator is down: it is ready at once, with its filter.
    dp.shutdown();
    let dp = Dataplane::start(&config).unwrap();
    assert_eq!(header(dp.proxy_addr, "x-team").as_deref(), Some("a"));
    assert_eq!(admin_status(dp.admin_addr, "/ready"), 200);

    // The operator comes back (same address, empty memory): the dataplane reconnects,
    // resyncs, and picks up what the operator publishes now.
    let op = Operator::start(&cache, addr);
    op.control
        .publish(selector(&[]), rewrite(&key, &m.header_rewrite, &team("z")));
    wait_for("resync after the operator restart", || {
        op.control.rollout(&key).ready == 1
    });
    assert_eq!(header(dp.proxy_addr, "x-team").as_deref(), Some("z"));
    dp.shutdown();
}

#[test]
fn a_fresh_managed_dataplane_is_not_ready_before_its_first_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens here: the operator is unreachable.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let dp = Dataplane::start(&dataplane_config(tmp.path(), addr, "dp-new", &[])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(admin_status(dp.admin_addr, "/ready"), 503);
    assert_eq!(admin_status(dp.admin_addr, "/live"), 200);
    dp.shutdown();
}

fn admin_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A CA and a certificate it signed for `names` (DNS names or IP addresses): (ca pem, cert pem, key pem).
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        Pki { ca }
    }

    fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.ca.pem()).unwrap();
    }
}

#[test]
fn with_certificates_the_link_is_mutual_tls_and_strangers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cache = dir.join("operator-cache");
    let m = modules(&cache);
    let pki = Pki::new("wasmfilter test CA");
    pki.write_ca(&dir.join("ca.crt"));
    let (server_cert, server_key) = pki.issue(dir, "operator", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = pki.issue(dir, "dp-good", &["dp-good"]);
    let stranger = Pki::new("someone else's CA");
    let (bad_cert, bad_key) = stranger.issue(dir, "dp-bad", &["dp-bad"]);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let control = ControlPlane::new(Arc::new(ModuleCache::open(&cache).unwrap()));
    control.mark_synced();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = wasmfilter_operator::grpc::ServerTls::from_files(
        &server_cert,
        &server_key,
        &dir.join("ca.crt"),
    )
    .unwrap();
    runtime.spawn(wasmfilter_operator::grpc::serve(
        control.clone(),
        listener,
        Some(tls),
        std::future::pending(),
    ));

    let config = |id: &str, cert: &Path, key: &Path| {
        let path = dir.join(format!("{id}.yaml"));
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\ndrainTimeout: 1s\n\
                 routes: [{{name: all, cluster: echo}}]\n\
                 clusters: [{{name: echo, builtin: echo}}]\n\
                 operator:\n  address: https://localhost:{}\n  id: {id}\n  stateDir: {id}-state\n  \
                 tls: {{caFile: ca.crt, certFile: {}, keyFile: {}}}\n",
                addr.port(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        path
    };
    let good = Dataplane::start(&config("dp-good", &client_cert, &client_key)).unwrap();
    let bad = Dataplane::start(&config("dp-bad", &bad_cert, &bad_key)).unwrap();
    let key = FilterKey::new("team", "rewrite");
    control.publish(
        selector(&[]),
        rewrite(&key, &m.header_rewrite, &team("tls")),
    );
    wait_for("the dataplane with a good certificate to ACK", || {
        control.rollout(&key).ready == 1
    });
    assert_eq!(header(good.proxy_addr, "x-team").as_deref(), Some("tls"));
    // The stranger never gets in: one dataplane connected, and it is not ready.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(control.dataplane_count(), 1);
    assert_eq!(admin_status(bad.admin_addr, "/ready"), 503);
    good.shutdown();
    bad.shutdown();
    runtime.shutdown_timeout(Duration::ZERO);
}

#[test]
fn a_dataplane_that_stops_reading_never_holds_up_the_others() {
    use wasmfilter_api::control::filter_discovery_client::FilterDiscoveryClient;
    use wasmfilter_api::control::{DataplaneMessage, Hello, dataplane_message};

    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("operator-cache");
    let m = modules(&cache);
    let op = Operator::start(&cache, "127.0.0.1:0".parse().unwrap());
    let cp = op.control.clone();
    let key = FilterKey::new("team", "rewrite");
    // A large configuration, so the stuck stream's HTTP/2 window fills after a few snapshots.
    let padding = "x".repeat(200 << 10);
    let big = |v: &str| {
        format!(r#"{{"response": {{"set": {{"x-team": "{v}"}}}}, "padding": "{padding}"}}"#)
    };
    cp.publish(selector(&[]), rewrite(&key, &m.header_rewrite, &big("0")));

    // The stuck dataplane: says Hello, then never reads a byte of what the operator sends.
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let addr = op.addr;
    let _stuck = client_rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FilterDiscoveryClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(DataplaneMessage {
            kind: Some(dataplane_message::Kind::Hello(Hello {
                id: "stuck".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let response = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap();
        (tx, response)
    });
    let dp = Dataplane::start(&dataplane_config(tmp.path(), op.addr, "dp-ok", &[])).unwrap();
    wait_for("both connected", || cp.dataplane_count() == 2);
    for i in 1..=10 {
        let value = i.to_string();
        cp.publish(
            selector(&[]),
            rewrite(&key, &m.header_rewrite, &big(&value)),
        );
        wait_for("the reading dataplane to follow every change", || {
            header(dp.proxy_addr, "x-team").as_deref() == Some(value.as_str())
        });
    }
    // The Ack of the last change may still be on its way after the chain swapped.
    wait_for("the last change to be acknowledged", || {
        cp.rollout(&key).ready == 1
    });
    let r = cp.rollout(&key);
    assert_eq!(
        (r.selected, r.ready),
        (2, 1),
        "the stuck one never acknowledged"
    );
    dp.shutdown();
}

/// An operator whose snapshots take at most `budget` bytes.
fn operator_with_budget(cache_dir: &Path, budget: u64) -> Operator {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let control =
        ControlPlane::with_snapshot_budget(Arc::new(ModuleCache::open(cache_dir).unwrap()), budget);
    control.mark_synced();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(wasmfilter_operator::grpc::serve(
        control.clone(),
        listener,
        None,
        std::future::pending(),
    ));
    Operator {
        runtime: Some(runtime),
        control,
        addr,
    }
}

/// The snapshot budget with real dataplanes: in chain order, the filter that would take the
/// chain past the budget is left out alone (its rollout failed, naming the budget, the sizes
/// and the fix, and its status says SnapshotBudgetExceeded); the others, a smaller filter after
/// it included, reach the dataplane and serve, and later changes still arrive.
#[test]
fn a_chain_over_the_snapshot_budget_leaves_out_only_the_filters_past_it() {
    use wasmfilter_operator::controller::status;

    const BUDGET: u64 = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("operator-cache");
    let m = modules(&cache);
    let op = operator_with_budget(&cache, BUDGET);
    let cp = op.control.clone();
    let dp = Dataplane::start(&dataplane_config(tmp.path(), op.addr, "dp-a", &[])).unwrap();
    wait_for("the dataplane to connect", || cp.dataplane_count() == 1);

    // Each sets its own response header; three carry ~40 KB of configuration. Chain order is
    // priority, higher first: first (30), second (20), big (10), small (0).
    let padded = |header: &str, value: &str, padding: usize| {
        format!(
            r#"{{"response": {{"set": {{"{header}": "{value}"}}}}, "padding": "{}"}}"#,
            "x".repeat(padding)
        )
    };
    let filter = |name: &str, priority: i32, config: String| {
        let mut v = rewrite(&FilterKey::new("team", name), &m.header_rewrite, &config);
        v.priority = priority;
        v
    };
    let keys = ["first", "second", "big", "small"].map(|n| FilterKey::new("team", n));
    cp.publish(
        selector(&[]),
        filter("first", 30, padded("x-first", "1", 40_000)),
    );
    cp.publish(
        selector(&[]),
        filter("second", 20, padded("x-second", "1", 40_000)),
    );
    cp.publish(
        selector(&[]),
        filter("big", 10, padded("x-big", "1", 40_000)),
    );
    cp.publish(selector(&[]), filter("small", 0, padded("x-small", "1", 0)));
    wait_for("the filters that fit to be acknowledged", || {
        [&keys[0], &keys[1], &keys[3]]
            .iter()
            .all(|k| cp.rollout(k).ready == 1)
    });
    let r = cp.rollout(&keys[2]);
    assert_eq!((r.selected, r.ready, r.failed, r.over_budget), (1, 0, 1, 1));
    let (dataplane, message) = &r.failures[0];
    assert_eq!(dataplane, "dp-a");
    assert!(
        message.starts_with("the chain for dataplane dp-a would be ")
            && message.contains("over the snapshot budget of 100000 bytes (--snapshot-budget)")
            && message.contains("shrink its config"),
        "{message}"
    );
    eprintln!("{message}");
    let (status, _) = status::compute(&status::Input {
        generation: 1,
        previous: None,
        resolution: &status::Resolution::Resolved {
            module: wasmfilter_api::crd::ResolvedModule {
                digest: m.header_rewrite.0.clone(),
                manifest_digest: None,
                resolved_from: "https://example.test/f.wasm".into(),
                size: m.header_rewrite.1 as i64,
            },
            revision: r.revision.clone().unwrap(),
        },
        published: None,
        rollout: &r,
        stats: &Default::default(),
        now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
    });
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SnapshotBudgetExceeded")
    );
    assert!(
        ready.message.contains(message.as_str()),
        "{}",
        ready.message
    );

    // What the dataplane serves: every filter but the one past the budget.
    let served = |h: &str| header(dp.proxy_addr, h);
    assert_eq!(served("x-first").as_deref(), Some("1"));
    assert_eq!(served("x-second").as_deref(), Some("1"));
    assert_eq!(served("x-small").as_deref(), Some("1"));
    assert_eq!(served("x-big"), None);
    let sent = cp.counters.snapshot_bytes_sent.load(Ordering::SeqCst);
    let snapshots = cp.counters.snapshots_sent.load(Ordering::SeqCst);
    assert!(
        sent <= snapshots * BUDGET,
        "{sent} bytes in {snapshots} snapshots"
    );

    // A change to another filter still arrives.
    cp.publish(selector(&[]), filter("small", 0, padded("x-small", "2", 0)));
    wait_for("the change to serve", || {
        served("x-small").as_deref() == Some("2")
    });
    assert_eq!(cp.rollout(&keys[2]).over_budget, 1);

    // Shrunk, the filter fits and goes out.
    cp.publish(selector(&[]), filter("big", 10, padded("x-big", "1", 100)));
    wait_for("the shrunk filter to be acknowledged", || {
        cp.rollout(&keys[2]).ready == 1
    });
    assert_eq!(served("x-big").as_deref(), Some("1"));
    assert_eq!(served("x-first").as_deref(), Some("1"));
    dp.shutdown();
}
