//! The WasmFilter controller against a fake API server (tests/controller/fake_apiserver.rs)
//! and a real registry (the CNCF distribution registry, built from its Go module by
//! e2e/registry/build.sh): what a user sees in status, in Events and on the dataplanes (the
//! control plane's published chain).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use wasmfilter_api::crd::WasmFilter;
use wasmfilter_operator::admin::Metrics;
use wasmfilter_operator::cache::sha256_digest;
use wasmfilter_operator::control::ControlPlane;
use wasmfilter_operator::controller::{self, Config, Context};
use wasmfilter_operator::index::{FilterKey, FilterVersion};
use wasmfilter_operator::oci::{PushOptions, push_wasm};
use wasmfilter_operator::{Credentials, ModuleCache, Resolver, ResolverConfig};
use wasmfilter_testkit::registry::TestRegistry;

#[path = "controller/fake_apiserver.rs"]
#[allow(dead_code)] // shared with controller_run.rs, which uses the rest
mod fake_apiserver;
use fake_apiserver::FakeApiServer;

struct Env {
    api: FakeApiServer,
    control: Arc<ControlPlane>,
    ctx: Arc<Context>,
    metrics: Metrics,
    _cache: tempfile::TempDir,
}

async fn env(reg: &TestRegistry) -> Env {
    env_with(Some(reg), Config::default()).await
}

async fn env_with(reg: Option<&TestRegistry>, config: Config) -> Env {
    let api = FakeApiServer::start().await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ModuleCache::open(cache_dir.path()).unwrap());
    let resolver = Arc::new(Resolver::new(
        cache.clone(),
        ResolverConfig {
            insecure_registries: reg.map(|r| r.host()).into_iter().collect(),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(10),
            ..Default::default()
        },
    ));
    let control = ControlPlane::new(cache);
    let metrics = config.metrics.clone();
    let ctx = Context::new(api.client(), control.clone(), resolver, config);
    Env {
        api,
        control,
        ctx,
        metrics,
        _cache: cache_dir,
    }
}

fn module() -> Vec<u8> {
    wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap()
}

async fn push(reg: &TestRegistry, repo_tag: &str, bytes: Vec<u8>, creds: Credentials) -> String {
    let reference = reg.reference(repo_tag);
    push_wasm(
        &reference,
        bytes,
        "filter.wasm",
        &PushOptions {
            credentials: creds,
            insecure: true,
        },
    )
    .await
    .unwrap();
    reference
}

fn filter(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "wasmfilter.dev/v1alpha1",
        "kind": "WasmFilter",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

impl Env {
    async fn reconcile(&self, ns: &str, name: &str) -> Result<(), controller::Error> {
        let obj: WasmFilter = serde_json::from_value(self.api.filter(ns, name).unwrap()).unwrap();
        controller::reconcile(Arc::new(obj), self.ctx.clone())
            .await
            .map(|_| ())
    }

    fn status(&self, ns: &str, name: &str) -> Value {
        self.api.filter(ns, name).unwrap()["status"].clone()
    }

    /// The versions a dataplane with no labels would run.
    fn chain(&self) -> Vec<FilterVersion> {
        self.control
            .chain_for(&BTreeMap::new())
            .into_iter()
            .map(|(v, _)| (*v).clone())
            .collect()
    }

    fn event_notes(&self) -> Vec<(String, String, String)> {
        self.api
            .events()
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["note"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no conditions in {status}"))
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// (status, reason, message) of a condition.
fn cond(status: &Value, type_: &str) -> (String, String, String) {
    let c = condition(status, type_);
    (
        c["status"].as_str().unwrap().into(),
        c["reason"].as_str().unwrap().into(),
        c["message"].as_str().unwrap().into(),
    )
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolvable_filter_is_published_and_its_status_names_the_digest() {
    let reg = TestRegistry::start(None);
    let env = env(&reg).await;
    let bytes = module();
    let digest = sha256_digest(&bytes);
    let image = push(
        &reg,
        "filters/hello:v1",
        bytes.clone(),
        Credentials::Anonymous,
    )
    .await;
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({
            "module": {"image": image},
            "config": {"header": "x-hello"},
            "vm": {"id": "shared", "config": "raw vm config", "env": {"LOG": "debug"}},
            "phase": "Authz",
            "priority": 7,
            "failurePolicy": "FailOpen",
            "match": {"pathPrefixes": ["/api"]},
            "limits": {"memory": "32Mi", "callbackTimeout": "250ms"},
        }),
    ));

    env.reconcile("team-a", "hello").await.unwrap();

    // What the dataplanes get.
    let chain = env.chain();
    assert_eq!(chain.len(), 1);
    let v = &chain[0];
    assert_eq!(v.key, FilterKey::new("team-a", "hello"));
    assert_eq!(v.module_digest, digest);
    assert_eq!(v.module_size, bytes.len() as u64);
    assert_eq!(v.configuration, br#"{"header":"x-hello"}"#);
    assert_eq!(
        v.vm_id, "team-a/shared",
        "VM ids are scoped to the namespace"
    );
    assert_eq!(v.vm_configuration, b"raw vm config");
    assert_eq!(v.env.get("LOG").map(String::as_str), Some("debug"));
    assert_eq!(v.priority, 7);
    assert_eq!(v.phase, wasmfilter_api::Phase::Authz);
    assert_eq!(v.failure_policy, wasmfilter_api::FailurePolicy::FailOpen);
    assert_eq!(v.matches.path_prefixes, ["/api"]);
    assert_eq!(v.limits.memory_bytes, 32 << 20);
    assert_eq!(v.limits.callback_timeout, Duration::from_millis(250));

    // What kubectl shows.
    let patches = env.api.status_patches("team-a", "hello");
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["apiVersion"], "wasmfilter.dev/v1alpha1");
    let apply = env
        .api
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/status"))
        .unwrap();
    assert!(
        apply.query.contains("fieldManager=wasmfilter-operator")
            && apply.query.contains("force=true"),
        "server-side apply with one field manager, forced: {}",
        apply.query
    );
    let status = env.status("team-a", "hello");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["module"]["digest"], digest.as_str());
    assert_eq!(status["module"]["resolvedFrom"], image.as_str());
    assert_eq!(status["module"]["size"], bytes.len());
    assert!(
        status["module"]["manifestDigest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(cond(&status, "Resolved").0, "True");
    let (ready, reason, message) = cond(&status, "Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "NoDataplanes"));
    assert!(message.contains("spec.selector"), "{message}");
    assert_eq!(status["dataplanes"]["selected"], 0);
    assert_eq!(
        env.event_notes(),
        [(
            "Normal".to_string(),
            "Resolved".to_string(),
            format!("Resolved image {image} to digest {digest}")
        )]
    );

    // A dataplane connects and applies it: the next reconcile reports it, without asking
    // the registry again (IfNotPresent: once per generation).
    let revision = env.control.chain_for(&BTreeMap::new())[0].1.clone();
    let session = env.control.connect("node-a", BTreeMap::new());
    env.control.acknowledge(
        "node-a",
        &BTreeMap::from([("team-a/hello".to_string(), revision.clone())]),
        &BTreeMap::new(),
    );
    let pulls_before = env.metrics.pulls_with("resolved");
    env.reconcile("team-a", "hello").await.unwrap();
    assert_eq!(
        env.metrics.pulls_with("resolved"),
        pulls_before,
        "no second pull"
    );
    assert_eq!(env.metrics.resolution_cache_hits.get(), 1);
    let status = env.status("team-a", "hello");
    assert_eq!(status["dataplanes"]["selected"], 1);
    assert_eq!(status["dataplanes"]["ready"], 1);
    assert_eq!(cond(&status, "Ready").0, "True");
    assert_eq!(cond(&status, "Ready").1, "RolledOut");
    assert!(env.event_notes().contains(&(
        "Normal".into(),
        "RolledOut".into(),
        format!("Rolled out revision {revision} to 1 dataplane")
    )));

    // Nothing changed: no status write, no event.
    let (writes, events) = (
        env.api.status_patches("team-a", "hello").len(),
        env.api.events().len(),
    );
    env.reconcile("team-a", "hello").await.unwrap();
    assert_eq!(env.api.status_patches("team-a", "hello").len(), writes);
    assert_eq!(env.api.events().len(), events);

    // The dataplane refuses the next revision (a config change): Degraded, listed by name.
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({"module": {"image": image}, "config": "broken"}),
    ));
    env.reconcile("team-a", "hello").await.unwrap();
    let revision2 = env.control.chain_for(&BTreeMap::new())[0].1.clone();
    assert_ne!(revision2, revision);
    env.control.acknowledge(
        "node-a",
        &BTreeMap::from([("team-a/hello".to_string(), revision2.clone())]),
        &BTreeMap::from([(
            "team-a/hello".to_string(),
            (
                revision2.clone(),
                "proxy_on_configure returned false".to_string(),
                Some(revision.clone()),
            ),
        )]),
    );
    env.reconcile("team-a", "hello").await.unwrap();
    let status = env.status("team-a", "hello");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["dataplanes"]["failed"], 1);
    assert_eq!(status["dataplanes"]["failures"][0]["dataplane"], "node-a");
    assert_eq!(
        status["dataplanes"]["failures"][0]["message"],
        "proxy_on_configure returned false"
    );
    let (_, reason, _) = cond(&status, "Ready");
    assert_eq!(reason, "DataplanesRejected");
    let (degraded, reason, _) = cond(&status, "Degraded");
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "DataplanesRejected")
    );
    env.control.disconnect("node-a", session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_reported_and_nothing_is_published() {
    let reg = TestRegistry::start(None);
    let env = env(&reg).await;
    // Objects that bypassed the CRD's validation (an older CRD, or none).
    env.api
        .put_filter(filter("team-a", "nomodule", json!({"module": {}})));
    env.api.put_filter(filter(
        "team-a",
        "badlimits",
        json!({"module": {"image": reg.reference("f/x:v1")}, "limits": {"memory": "lots"}}),
    ));
    env.reconcile("team-a", "nomodule").await.unwrap();
    env.reconcile("team-a", "badlimits").await.unwrap();
    assert!(env.chain().is_empty());

    let status = env.status("team-a", "nomodule");
    let (resolved, reason, message) = cond(&status, "Resolved");
    assert_eq!(
        (resolved.as_str(), reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(message.starts_with("spec.module: "), "{message}");
    assert_eq!(cond(&status, "Ready").1, "InvalidSpec");
    assert!(status.get("module").is_none());
    let (_, reason, message) = cond(&env.status("team-a", "badlimits"), "Resolved");
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.limits.memory"), "{message}");
    let warnings: Vec<_> = env
        .event_notes()
        .into_iter()
        .map(|(t, r, _)| (t, r))
        .collect();
    assert_eq!(
        warnings,
        [
            ("Warning".to_string(), "InvalidSpec".to_string()),
            ("Warning".to_string(), "InvalidSpec".to_string())
        ]
    );
    // The registry was never asked.
    assert_eq!(
        env.metrics.pulls_with("resolved"),
        0,
        "the registry was never asked"
    );
}

fn dockerconfig_secret(registry: &str, user: &str, password: &str) -> Value {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = json!({"auths": {registry: {"auth": auth}}}).to_string();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secret_problems_name_the_secret_and_the_registry() {
    let reg = TestRegistry::start(Some(("alice", "s3cret")));
    let env = env(&reg).await;
    let image = reg.reference("private/hello:v1");
    let spec = json!({"module": {"image": image, "pullSecret": "regcred"}});
    env.api.put_filter(filter("team-a", "hello", spec.clone()));

    // No such Secret.
    env.reconcile("team-a", "hello").await.unwrap();
    let (_, reason, message) = cond(&env.status("team-a", "hello"), "Resolved");
    assert_eq!(reason, "PullSecretNotFound");
    assert!(
        message.contains("\"regcred\"") && message.contains("\"team-a\""),
        "{message}"
    );
    assert!(
        message.contains("kubectl create secret docker-registry regcred"),
        "{message}"
    );

    // A Secret for another registry.
    env.api.put_object(
        "secrets",
        "team-a",
        "regcred",
        dockerconfig_secret("other.registry.test:5000", "alice", "s3cret"),
    );
    env.reconcile("team-a", "hello").await.unwrap();
    let (_, reason, message) = cond(&env.status("team-a", "hello"), "Resolved");
    assert_eq!(reason, "PullSecretMissingRegistry");
    assert!(message.contains(&reg.host()), "{message}");

    // An Opaque Secret.
    let mut opaque = dockerconfig_secret(&reg.host(), "alice", "s3cret");
    opaque["type"] = json!("Opaque");
    env.api.put_object("secrets", "team-a", "regcred", opaque);
    env.reconcile("team-a", "hello").await.unwrap();
    let (_, reason, message) = cond(&env.status("team-a", "hello"), "Resolved");
    assert_eq!(reason, "PullSecretInvalid");
    assert!(message.contains("is of type Opaque"), "{message}");
    assert!(env.chain().is_empty());

    // The right Secret: resolved without any change to the WasmFilter.
    push(
        &reg,
        "private/hello:v1",
        module(),
        Credentials::basic("alice", "s3cret"),
    )
    .await;
    env.api.put_object(
        "secrets",
        "team-a",
        "regcred",
        dockerconfig_secret(&reg.host(), "alice", "s3cret"),
    );
    env.reconcile("team-a", "hello").await.unwrap();
    assert_eq!(cond(&env.status("team-a", "hello"), "Resolved").0, "True");
    assert_eq!(env.chain().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_module_is_used_only_with_the_namespaces_own_credentials() {
    let reg = TestRegistry::start(Some(("alice", "s3cret")));
    let env = env(&reg).await;
    let image = push(
        &reg,
        "private/hello:v1",
        module(),
        Credentials::basic("alice", "s3cret"),
    )
    .await;
    // team-a can pull it: the module is now in the operator's cache.
    env.api.put_object(
        "secrets",
        "team-a",
        "regcred",
        dockerconfig_secret(&reg.host(), "alice", "s3cret"),
    );
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({"module": {"image": image, "pullSecret": "regcred"}}),
    ));
    env.reconcile("team-a", "hello").await.unwrap();
    assert_eq!(cond(&env.status("team-a", "hello"), "Resolved").0, "True");

    // team-b names the same image without credentials, team-c with wrong ones: the cached
    // module is not theirs to use.
    env.api.put_filter(filter(
        "team-b",
        "hello",
        json!({"module": {"image": image}}),
    ));
    env.api.put_object(
        "secrets",
        "team-c",
        "regcred",
        dockerconfig_secret(&reg.host(), "alice", "wrong"),
    );
    env.api.put_filter(filter(
        "team-c",
        "hello",
        json!({"module": {"image": image, "pullSecret": "regcred"}}),
    ));
    env.reconcile("team-b", "hello").await.unwrap();
    env.reconcile("team-c", "hello").await.unwrap();
    let (_, reason, message) = cond(&env.status("team-b", "hello"), "Resolved");
    assert_eq!(reason, "PullUnauthorized");
    assert!(message.contains("set module.pullSecret"), "{message}");
    let (_, reason, message) = cond(&env.status("team-c", "hello"), "Resolved");
    assert_eq!(reason, "PullUnauthorized");
    assert!(message.contains("Secret \"regcred\""), "{message}");
    let published: Vec<FilterKey> = env.chain().into_iter().map(|v| v.key).collect();
    assert_eq!(published, [FilterKey::new("team-a", "hello")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_is_never_published_and_the_last_good_version_keeps_running() {
    let reg = TestRegistry::start(None);
    let env = env(&reg).await;
    let bytes = module();
    let digest = sha256_digest(&bytes);
    let image = push(&reg, "filters/hello:v1", bytes, Credentials::Anonymous).await;
    let wrong = "ab".repeat(32);

    // A new filter with a wrong pin: nothing published.
    env.api.put_filter(filter(
        "team-a",
        "pinned",
        json!({"module": {"image": image, "sha256": wrong}}),
    ));
    env.reconcile("team-a", "pinned").await.unwrap();
    assert!(env.chain().is_empty());
    let status = env.status("team-a", "pinned");
    let (_, reason, message) = cond(&status, "Resolved");
    assert_eq!(reason, "DigestMismatch");
    assert!(
        message.contains(&wrong) && message.contains(&digest),
        "{message}"
    );
    assert!(message.contains("fix module.sha256"), "{message}");
    assert_eq!(cond(&status, "Degraded").0, "False", "nothing older runs");

    // A running filter whose spec changes to a wrong pin: the old version stays published.
    env.api.put_filter(filter(
        "team-a",
        "running",
        json!({"module": {"image": image}}),
    ));
    env.reconcile("team-a", "running").await.unwrap();
    let before = env.chain();
    env.api.put_filter(filter(
        "team-a",
        "running",
        json!({"module": {"image": image, "sha256": wrong}}),
    ));
    env.reconcile("team-a", "running").await.unwrap();
    assert_eq!(env.chain(), before, "the last good version is kept");
    let status = env.status("team-a", "running");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["module"]["digest"], digest.as_str());
    let (degraded, reason, message) = cond(&status, "Degraded");
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "DigestMismatch")
    );
    assert!(
        message.contains("keep running the last good module"),
        "{message}"
    );
    assert_eq!(cond(&status, "Ready").1, "DigestMismatch");
}

/// The whole controller (watch, reconcile_on, error_policy) against the fake API server: a
/// registry outage clears by itself, rollouts reach status without any edit, and a deleted
/// WasmFilter is withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_controller_recovers_reports_rollouts_and_withdraws_deleted_filters() {
    let mut reg = TestRegistry::start(None);
    let config = Config {
        retry_base: Duration::from_millis(200),
        refresh_interval: Duration::from_secs(2),
        debounce: Duration::from_millis(50),
        ..Default::default()
    };
    let health = config.health.clone();
    let env = env_with(Some(&reg), config).await;
    let image = push(&reg, "filters/hello:v1", module(), Credentials::Anonymous).await;
    reg.stop();
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({"module": {"image": image}}),
    ));

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(env.ctx.clone().run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    eventually("the initial list", || health.is_synced()).await;

    // The registry is down: the condition says so...
    eventually("RegistryUnavailable in status", || {
        env.api
            .filter("team-a", "hello")
            .and_then(|o| o.get("status").cloned())
            .is_some_and(|s| cond(&s, "Resolved").1 == "RegistryUnavailable")
    })
    .await;
    assert!(env.chain().is_empty());
    // ...and it comes back: retried with backoff, no edit needed.
    reg.restart();
    eventually("Resolved after the registry came back", || {
        cond(&env.status("team-a", "hello"), "Resolved").0 == "True"
    })
    .await;
    assert_eq!(env.chain().len(), 1);

    // A dataplane connects and acknowledges: status follows by itself (rollout triggers).
    let revision = env.control.chain_for(&BTreeMap::new())[0].1.clone();
    env.control.connect("node-a", BTreeMap::new());
    eventually("selected: 1", || {
        env.status("team-a", "hello")["dataplanes"]["selected"] == 1
    })
    .await;
    env.control.acknowledge(
        "node-a",
        &BTreeMap::from([("team-a/hello".to_string(), revision)]),
        &BTreeMap::new(),
    );
    eventually("Ready", || {
        cond(&env.status("team-a", "hello"), "Ready").1 == "RolledOut"
    })
    .await;

    // Deleted: withdrawn from every dataplane.
    env.api.delete_filter("team-a", "hello");
    eventually("withdrawn", || {
        !env.control.is_published(&FilterKey::new("team-a", "hello"))
    })
    .await;

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the controller stops on the shutdown signal")
        .unwrap();
}

/// A file server on loopback: path → (status, body); counts the requests per path.
struct FileServer {
    addr: std::net::SocketAddr,
    hits: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
}

impl FileServer {
    async fn start(files: BTreeMap<&'static str, (u16, Vec<u8>)>) -> FileServer {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(files);
        let hits: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (files, hits) = (files.clone(), counted.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let path = req.uri().path().to_string();
                        *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                        let (code, body) = files
                            .get(path.as_str())
                            .cloned()
                            .unwrap_or((404, b"not found".to_vec()));
                        let resp = http::Response::builder()
                            .status(code)
                            .body(Full::new(bytes::Bytes::from(body)))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        FileServer { addr, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn hex_of(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_url_is_downloaded_checked_against_its_sha256_and_published() {
    let env = env_with(None, Config::default()).await;
    let bytes = module();
    let digest = sha256_digest(&bytes);
    let files = FileServer::start(BTreeMap::from([
        ("/filters/hello.wasm", (200, bytes.clone())),
        ("/filters/changed.wasm", (200, b"\0asm\x01\0\0\0".to_vec())),
        ("/filters/broken.wasm", (500, b"oops".to_vec())),
    ]))
    .await;

    // The right bytes: resolved, cached, published.
    let url = files.url("/filters/hello.wasm");
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({"module": {"url": url, "sha256": hex_of(&digest)}}),
    ));
    env.reconcile("team-a", "hello").await.unwrap();
    let status = env.status("team-a", "hello");
    let (resolved, reason, message) = cond(&status, "Resolved");
    assert_eq!(
        (resolved.as_str(), reason.as_str()),
        ("True", "Resolved"),
        "{message}"
    );
    assert_eq!(status["module"]["digest"], digest.as_str());
    assert_eq!(status["module"]["resolvedFrom"], url.as_str());
    assert_eq!(status["module"]["size"], bytes.len());
    assert!(status["module"].get("manifestDigest").is_none(), "{status}");
    let chain = env.chain();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].module_digest, digest);
    assert_eq!(
        env.control
            .modules()
            .get(&digest)
            .unwrap()
            .unwrap()
            .as_ref(),
        bytes.as_slice(),
        "the dataplanes fetch it from the operator's cache"
    );
    // Once per generation.
    env.reconcile("team-a", "hello").await.unwrap();
    assert_eq!(files.hits("/filters/hello.wasm"), 1);

    // Other bytes behind the URL: DigestMismatch, naming both digests and the URL.
    let changed = files.url("/filters/changed.wasm");
    env.api.put_filter(filter(
        "team-a",
        "changed",
        json!({"module": {"url": changed, "sha256": hex_of(&digest)}}),
    ));
    env.reconcile("team-a", "changed").await.unwrap();
    let (resolved, reason, message) = cond(&env.status("team-a", "changed"), "Resolved");
    assert_eq!(
        (resolved.as_str(), reason.as_str()),
        ("False", "DigestMismatch")
    );
    assert!(
        message.contains(&digest)
            && message.contains(&sha256_digest(b"\0asm\x01\0\0\0"))
            && message.contains(&changed)
            && message.contains("fix module.sha256"),
        "{message}"
    );

    // 404 and 500: DownloadFailed naming the URL and the status; a 500 is retried.
    let missing = files.url("/filters/missing.wasm");
    env.api.put_filter(filter(
        "team-a",
        "missing",
        json!({"module": {"url": missing, "sha256": hex_of(&digest)}}),
    ));
    env.reconcile("team-a", "missing").await.unwrap();
    let (_, reason, message) = cond(&env.status("team-a", "missing"), "Resolved");
    assert_eq!(reason, "DownloadFailed");
    assert!(
        message.contains(&missing) && message.contains("404 Not Found"),
        "{message}"
    );
    assert!(message.contains("check module.url"), "{message}");
    let broken = files.url("/filters/broken.wasm");
    env.api.put_filter(filter(
        "team-a",
        "broken",
        json!({"module": {"url": broken, "sha256": hex_of(&digest)}}),
    ));
    let err = env.reconcile("team-a", "broken").await.unwrap_err();
    assert_eq!(err.metric_label(), "DownloadFailed");
    let (_, reason, message) = cond(&env.status("team-a", "broken"), "Resolved");
    assert_eq!(reason, "DownloadFailed");
    assert!(
        message.contains(&broken) && message.contains("500"),
        "{message}"
    );

    // Nothing listens: DownloadFailed, transient.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}/f.wasm", closed.local_addr().unwrap());
    drop(closed);
    env.api.put_filter(filter(
        "team-a",
        "gone",
        json!({"module": {"url": gone, "sha256": hex_of(&digest)}}),
    ));
    assert!(env.reconcile("team-a", "gone").await.is_err());
    let (_, reason, message) = cond(&env.status("team-a", "gone"), "Resolved");
    assert_eq!(reason, "DownloadFailed");
    assert!(
        message.contains(&gone) && message.contains("cannot download"),
        "{message}"
    );

    let published: Vec<FilterKey> = env.chain().into_iter().map(|v| v.key).collect();
    assert_eq!(published, [FilterKey::new("team-a", "hello")]);
}

fn stats(name: &str, invocations: u64) -> wasmfilter_api::control::FilterStats {
    wasmfilter_api::control::FilterStats {
        name: name.into(),
        invocations,
        traps: 1,
        latency_count: invocations,
        latency_sum_seconds: invocations as f64 * 0.000_2,
        ..Default::default()
    }
}

/// The stats rate limit through the whole controller: stats reported many times within the
/// interval make at most one status write, no sooner than the interval after the previous
/// write; a rollout change right after is written at once. (The interval is 3 s here instead
/// of the default 10 s, to keep the test short; the unit test in controller/status.rs uses 10.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reach_status_at_most_once_per_interval_and_rollouts_at_once() {
    const INTERVAL: Duration = Duration::from_secs(3);
    let config = Config {
        stats_interval: INTERVAL,
        debounce: Duration::from_millis(50),
        ..Default::default()
    };
    let env = env_with(None, config).await;
    let bytes = module();
    let digest = sha256_digest(&bytes);
    let files = FileServer::start(BTreeMap::from([("/f.wasm", (200, bytes))])).await;
    env.api.put_filter(filter(
        "team-a",
        "hello",
        json!({"module": {"url": files.url("/f.wasm"), "sha256": hex_of(&digest)}}),
    ));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(env.ctx.clone().run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    eventually("published", || env.chain().len() == 1).await;
    let revision = env.control.chain_for(&BTreeMap::new())[0].1.clone();
    let mut sessions = BTreeMap::new();
    for node in ["node-a", "node-b"] {
        sessions.insert(node, env.control.connect(node, BTreeMap::new()));
        env.control.acknowledge(
            node,
            &BTreeMap::from([("team-a/hello".to_string(), revision.clone())]),
            &BTreeMap::new(),
        );
    }
    eventually("Ready on 2 dataplanes", || {
        let s = env.status("team-a", "hello");
        s["dataplanes"]["ready"] == 2 && cond(&s, "Ready").1 == "RolledOut"
    })
    .await;
    let before = env.api.timed_status_patches("team-a", "hello").len();
    let ready_write = env.api.timed_status_patches("team-a", "hello")[before - 1].0;

    // 10 reports from each dataplane within a second (well within the interval).
    let first_report = std::time::Instant::now();
    for i in 1..=10u64 {
        env.control
            .report_stats("node-a", vec![stats("team-a/hello", 10 * i)]);
        env.control
            .report_stats("node-b", vec![stats("team-a/hello", 5 * i)]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reporting = first_report.elapsed();
    assert!(reporting < INTERVAL - Duration::from_secs(1));
    eventually("the summed stats in status", || {
        env.status("team-a", "hello")["stats"]["invocations"] == 150
    })
    .await;
    // Give a second write, if there were one, the time to happen.
    tokio::time::sleep(INTERVAL + Duration::from_millis(500)).await;
    let patches = env.api.timed_status_patches("team-a", "hello");
    let stats_writes = &patches[before..];
    assert_eq!(
        stats_writes.len(),
        1,
        "20 reports within {INTERVAL:?} make one status write: {stats_writes:#?}"
    );
    let (at, body) = &stats_writes[0];
    assert!(
        *at >= ready_write + INTERVAL,
        "the stats write came {:?} after the previous write, before the {INTERVAL:?} interval",
        *at - ready_write
    );
    eprintln!(
        "stats write {:?} after the previous status write (20 reports in {reporting:?})",
        *at - ready_write
    );
    let mut without_stats = body["status"].clone();
    without_stats.as_object_mut().unwrap().remove("stats");
    let mut ready_status = patches[before - 1].1["status"].clone();
    ready_status.as_object_mut().unwrap().remove("stats");
    assert_eq!(without_stats, ready_status, "only the stats changed");
    let st = &env.status("team-a", "hello")["stats"];
    assert_eq!(st["dataplanes"], 2);
    assert_eq!(st["invocations"], 150);
    assert_eq!(st["traps"], 2);
    assert_eq!(st["failClosed"], 0);
    assert_eq!(st["meanCallbackLatency"], "200µs");
    assert!(st["updatedAt"].as_str().unwrap().ends_with('Z'), "{st}");

    // A dataplane leaves right after the stats write: written at once, with its stats gone.
    let left = std::time::Instant::now();
    env.control.disconnect("node-b", sessions["node-b"]);
    eventually("selected: 1", || {
        env.status("team-a", "hello")["dataplanes"]["selected"] == 1
    })
    .await;
    let (at, body) = env
        .api
        .timed_status_patches("team-a", "hello")
        .pop()
        .unwrap();
    assert!(
        at - left < INTERVAL / 2,
        "a rollout change waited {:?}",
        at - left
    );
    eprintln!("rollout write {:?} after the dataplane left", at - left);
    assert_eq!(body["status"]["stats"]["dataplanes"], 1);
    assert_eq!(body["status"]["stats"]["invocations"], 100);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the controller stops on the shutdown signal")
        .unwrap();
}

/// One dataplane's report of `name` with these cumulative counters.
fn report(name: &str, invocations: u64, traps: u64) -> wasmfilter_api::control::FilterStats {
    wasmfilter_api::control::FilterStats {
        name: name.into(),
        invocations,
        traps,
        latency_count: invocations,
        latency_sum_seconds: invocations as f64 * 0.000_1,
        ..Default::default()
    }
}

/// status.stats under steady traffic, counted at the API server: counters growing for several
/// intervals write nothing; the first trap writes once, with the figures of then; a state that
/// flaps (a dataplane's reports coming and going) writes at most once per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_writes_no_stats_and_a_state_change_at_most_once_per_interval() {
    const INTERVAL: Duration = Duration::from_secs(1);
    let config = Config {
        stats_interval: INTERVAL,
        debounce: Duration::from_millis(50),
        ..Default::default()
    };
    let env = env_with(None, config).await;
    let bytes = module();
    let digest = sha256_digest(&bytes);
    let files = FileServer::start(BTreeMap::from([("/f.wasm", (200, bytes))])).await;
    env.api.put_filter(filter(
        "team-a",
        "busy",
        json!({"module": {"url": files.url("/f.wasm"), "sha256": hex_of(&digest)}}),
    ));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(env.ctx.clone().run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    eventually("published", || env.chain().len() == 1).await;
    let revision = env.control.chain_for(&BTreeMap::new())[0].1.clone();
    for node in ["node-a", "node-b"] {
        env.control.connect(node, BTreeMap::new());
        env.control.acknowledge(
            node,
            &BTreeMap::from([("team-a/busy".to_string(), revision.clone())]),
            &BTreeMap::new(),
        );
    }
    eventually("Ready on 2 dataplanes", || {
        cond(&env.status("team-a", "busy"), "Ready").1 == "RolledOut"
    })
    .await;
    let name = "team-a/busy";
    // The first reports: stats appear, a state change, written once.
    env.control
        .report_stats("node-a", vec![report(name, 100, 0)]);
    env.control
        .report_stats("node-b", vec![report(name, 100, 0)]);
    eventually("stats in status", || {
        env.status("team-a", "busy")["stats"]["dataplanes"] == 2
    })
    .await;
    let patches = || env.api.timed_status_patches("team-a", "busy");
    let before = patches().len();

    // Steady traffic for 5 intervals: both dataplanes report every 100 ms, counters growing.
    let mut invocations = 100;
    let started = std::time::Instant::now();
    while started.elapsed() < 5 * INTERVAL {
        invocations += 1000;
        env.control
            .report_stats("node-a", vec![report(name, invocations, 0)]);
        env.control
            .report_stats("node-b", vec![report(name, invocations, 0)]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a stats scan that saw the last report finish.
    tokio::time::sleep(INTERVAL + Duration::from_millis(300)).await;
    let steady = &patches()[before..];
    assert!(
        steady.is_empty(),
        "{} status writes under steady traffic ({invocations} invocations per dataplane): {steady:#?}",
        steady.len()
    );
    assert_eq!(env.status("team-a", "busy")["stats"]["invocations"], 200);

    // The first trap, traffic going on: exactly one write, showing the figures of then.
    let before_trap = invocations;
    let trapped_at = std::time::Instant::now();
    while trapped_at.elapsed() < 3 * INTERVAL {
        invocations += 1000;
        env.control
            .report_stats("node-a", vec![report(name, invocations, 1)]);
        env.control
            .report_stats("node-b", vec![report(name, invocations, 0)]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let trap_writes = patches()[before..].to_vec();
    assert_eq!(
        trap_writes.len(),
        1,
        "the first trap makes one write: {trap_writes:#?}"
    );
    let (at, body) = &trap_writes[0];
    let st = &body["status"]["stats"];
    assert_eq!(st["traps"], 1);
    let written = st["invocations"].as_i64().unwrap() as u64;
    assert!(
        written > 2 * before_trap && written <= 2 * invocations,
        "the figures of the write's time, not of the previous write: {st}"
    );
    eprintln!(
        "first trap written {:?} after it was reported",
        *at - trapped_at
    );
    assert!(*at - trapped_at <= 2 * INTERVAL + Duration::from_millis(500));

    // node-b's reports go, come back and go again, each change as soon as the status shows
    // the one before: one write per change, each at least an interval after the previous.
    for (k, reporting) in [1, 2, 1].into_iter().enumerate() {
        invocations += 1000;
        let b = if reporting == 2 {
            vec![report(name, invocations, 0)]
        } else {
            vec![]
        };
        env.control.report_stats("node-b", b);
        eventually(
            &format!("change {k}: {reporting} dataplanes in status"),
            || env.status("team-a", "busy")["stats"]["dataplanes"] == reporting,
        )
        .await;
    }
    tokio::time::sleep(INTERVAL + Duration::from_millis(300)).await;
    let all = patches();
    let stats_writes = &all[before..];
    assert_eq!(
        stats_writes.len(),
        4,
        "the first trap and three changes of the reporting dataplanes: {stats_writes:#?}"
    );
    for pair in stats_writes.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        eprintln!("stats writes {gap:?} apart");
        assert!(gap >= INTERVAL, "two stats writes {gap:?} apart");
    }
    // Every write was for stats alone: the rest of the status stayed as it was.
    let strip = |v: &Value| {
        let mut s = v["status"].clone();
        s.as_object_mut().unwrap().remove("stats");
        s
    };
    assert!(
        all[before..]
            .iter()
            .all(|(_, b)| strip(b) == strip(&all[before - 1].1))
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the controller stops on the shutdown signal")
        .unwrap();
}
