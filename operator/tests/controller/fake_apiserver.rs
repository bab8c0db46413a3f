//! A small in-memory Kubernetes API server over HTTP, answering exactly the requests the
//! operator makes: list and watch WasmFilters (all namespaces), get a WasmFilter, apply its
//! status, get a Secret, create and patch Events, and get/create/replace a Lease (with
//! resourceVersion conflicts). Everything it receives is recorded for the tests to assert on.
//!
//! It is not a real API server (no validation, no server-side apply merge: an apply of the
//! status subresource replaces the status, which is what a single field manager with force
//! amounts to); the e2e suite runs the operator against a real one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WF_PREFIX: &str = "/apis/wasmfilter.dev/v1alpha1";

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    /// When the request arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    /// (resource, namespace, name) → object. resource: wasmfilters, secrets, leases, events.
    objects: BTreeMap<(String, String, String), Value>,
    resource_version: u64,
    next_uid: u64,
    /// Every WasmFilter watch event: (resourceVersion, type, object).
    log: Vec<(u64, &'static str, Value)>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    requests: Vec<Recorded>,
    /// Answer every request with this status (simulates an API server outage).
    fail_all: Option<u16>,
}

#[derive(Clone)]
pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(v: &Value, status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
        StatusCode::from_u16(code).unwrap(),
    )
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = FakeApiServer {
            addr,
            inner: Arc::new(Mutex::new(Inner {
                resource_version: 1,
                ..Default::default()
            })),
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or updates a WasmFilter from its JSON (apiVersion/kind/metadata/spec): assigns
    /// a uid on create, bumps metadata.generation when the spec changes, keeps the status.
    pub fn put_filter(&self, mut obj: Value) -> Value {
        let mut inner = self.inner.lock().unwrap();
        let ns = obj["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let key = ("wasmfilters".to_string(), ns, name);
        let (kind, generation, uid, status) = match inner.objects.get(&key) {
            Some(old) => {
                let g = old["metadata"]["generation"].as_i64().unwrap();
                let g = if old["spec"] != obj["spec"] { g + 1 } else { g };
                (
                    "MODIFIED",
                    g,
                    old["metadata"]["uid"].clone(),
                    old.get("status").cloned(),
                )
            }
            None => {
                inner.next_uid += 1;
                ("ADDED", 1, json!(format!("uid-{}", inner.next_uid)), None)
            }
        };
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["uid"] = uid;
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if let Some(status) = status {
            obj["status"] = status;
        }
        inner.store(key, obj, kind)
    }

    pub fn delete_filter(&self, ns: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        let key = ("wasmfilters".to_string(), ns.to_string(), name.to_string());
        if let Some(mut obj) = inner.objects.remove(&key) {
            inner.resource_version += 1;
            let rv = inner.resource_version;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            inner.broadcast(rv, "DELETED", obj);
        }
    }

    pub fn filter(&self, ns: &str, name: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .get(&("wasmfilters".into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn put_object(&self, resource: &str, ns: &str, name: &str, obj: Value) {
        let mut inner = self.inner.lock().unwrap();
        inner.resource_version += 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
        inner
            .objects
            .insert((resource.into(), ns.into(), name.into()), obj);
    }

    pub fn object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The bodies of the status applies to one WasmFilter, in order.
    pub fn status_patches(&self, ns: &str, name: &str) -> Vec<Value> {
        let path = format!("{WF_PREFIX}/namespaces/{ns}/wasmfilters/{name}/status");
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH && r.path == path)
            .map(|r| r.body)
            .collect()
    }

    /// The status applies to one WasmFilter with their arrival times, in order.
    pub fn timed_status_patches(&self, ns: &str, name: &str) -> Vec<(std::time::Instant, Value)> {
        let path = format!("{WF_PREFIX}/namespaces/{ns}/wasmfilters/{name}/status");
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH && r.path == path)
            .map(|r| (r.at, r.body))
            .collect()
    }

    /// Events created (POST) about any object, in order.
    pub fn events(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
            .map(|r| r.body)
            .collect()
    }

    /// Answers every request with `code` until cleared with `None`.
    pub fn fail_all(&self, code: Option<u16>) {
        self.inner.lock().unwrap().fail_all = code;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let mut inner = self.inner.lock().unwrap();
        inner.requests.push(Recorded {
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
            at: std::time::Instant::now(),
        });
        if let Some(code) = inner.fail_all {
            return status(
                code,
                "InternalError",
                "the fake API server is failing on purpose",
            );
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let m = &parts.method;
        match segs.as_slice() {
            // WasmFilters, all namespaces: list or watch.
            ["apis", "wasmfilter.dev", "v1alpha1", "wasmfilters"] if m == Method::GET => {
                if query
                    .split('&')
                    .any(|q| q == "watch=true" || q == "watch=1")
                {
                    let since: u64 = query
                        .split('&')
                        .find_map(|q| q.strip_prefix("resourceVersion="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let (tx, rx) = mpsc::unbounded_channel();
                    for (rv, kind, obj) in &inner.log {
                        if *rv > since {
                            let _ = tx.send(watch_line(kind, obj));
                        }
                    }
                    inner.watchers.push(tx);
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                    });
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(stream)))
                        .unwrap();
                }
                let items: Vec<Value> = inner
                    .objects
                    .iter()
                    .filter(|((r, _, _), _)| r == "wasmfilters")
                    .map(|(_, v)| v.clone())
                    .collect();
                full(
                    &json!({"apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilterList",
                            "metadata": {"resourceVersion": inner.resource_version.to_string()},
                            "items": items}),
                    StatusCode::OK,
                )
            }
            [
                "apis",
                "wasmfilter.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "wasmfilters",
                name,
            ] => match inner.get("wasmfilters", ns, name) {
                Some(o) if m == Method::GET => full(&o, StatusCode::OK),
                _ => status(404, "NotFound", "wasmfilter not found"),
            },
            [
                "apis",
                "wasmfilter.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "wasmfilters",
                name,
                "status",
            ] if m == Method::PATCH => {
                let key = ("wasmfilters".to_string(), ns.to_string(), name.to_string());
                let Some(mut obj) = inner.objects.get(&key).cloned() else {
                    return status(404, "NotFound", "wasmfilter not found");
                };
                obj["status"] = body["status"].clone();
                let obj = inner.store(key, obj, "MODIFIED");
                full(&obj, StatusCode::OK)
            }
            ["api", "v1", "namespaces", ns, "secrets", name] if m == Method::GET => {
                match inner.get("secrets", ns, name) {
                    Some(o) => full(&o, StatusCode::OK),
                    None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                }
            }
            ["apis", "events.k8s.io", "v1", "namespaces", _, "events"] if m == Method::POST => {
                full(&body, StatusCode::CREATED)
            }
            ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _] => {
                full(&body, StatusCode::OK)
            }
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
            ] if m == Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                if inner.get("leases", ns, &name).is_some() {
                    return status(409, "AlreadyExists", "lease already exists");
                }
                let obj = inner.put_versioned("leases", ns, &name, body);
                full(&obj, StatusCode::CREATED)
            }
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ] => {
                let current = inner.get("leases", ns, name);
                match (m, current) {
                    (&Method::GET, Some(o)) => full(&o, StatusCode::OK),
                    (&Method::PUT, Some(o)) => {
                        if o["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                            return status(409, "Conflict", "the object has been modified");
                        }
                        let obj = inner.put_versioned("leases", ns, name, body);
                        full(&obj, StatusCode::OK)
                    }
                    _ => status(404, "NotFound", "lease not found"),
                }
            }
            _ => status(
                404,
                "NotFound",
                &format!("the fake API server does not serve {m} {path}"),
            ),
        }
    }
}

fn watch_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

impl Inner {
    fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    fn put_versioned(&mut self, resource: &str, ns: &str, name: &str, mut obj: Value) -> Value {
        self.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        obj["metadata"]["namespace"] = json!(ns);
        self.objects
            .insert((resource.into(), ns.into(), name.into()), obj.clone());
        obj
    }

    fn store(
        &mut self,
        key: (String, String, String),
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, obj.clone());
        self.broadcast(rv, kind, obj.clone());
        obj
    }

    fn broadcast(&mut self, rv: u64, kind: &'static str, obj: Value) {
        let line = watch_line(kind, &obj);
        self.watchers.retain(|w| w.send(line.clone()).is_ok());
        self.log.push((rv, kind, obj));
    }
}
