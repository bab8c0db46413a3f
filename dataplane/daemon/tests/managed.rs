//! Managed mode from the dataplane's side: the real dataplane binary (its own process, listeners
//! and state directory) against a FilterDiscovery server this test controls, so it can send
//! exactly the snapshots an operator could (the operator's own server is tested against real
//! dataplanes in operator/tests/control_protocol.rs). Filters are built from source.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wasmfilter_api::control::filter_discovery_server::{FilterDiscovery, FilterDiscoveryServer};
use wasmfilter_api::control::{
    self, Ack, ControlMessage, DataplaneMessage, FetchModuleRequest, ModuleChunk, Snapshot,
    control_message, dataplane_message,
};

type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

/// What the test operator knows: the modules it serves, the stream of the dataplane connected
/// last, and every Ack received.
#[derive(Default)]
struct Shared {
    modules: Mutex<HashMap<String, Bytes>>,
    stream: Mutex<Option<Outbound>>,
    acks: Mutex<Vec<Ack>>,
}

#[derive(Clone)]
struct Service(Arc<Shared>);

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl FilterDiscovery for Service {
    type StreamStream = Boxed<ControlMessage>;
    type FetchModuleStream = Boxed<ModuleChunk>;

    async fn stream(
        &self,
        request: Request<Streaming<DataplaneMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(DataplaneMessage {
                kind: Some(dataplane_message::Kind::Hello(_)),
            }) => {}
            _ => return Err(Status::invalid_argument("Hello first")),
        }
        let (tx, rx) = mpsc::channel(64);
        *self.0.stream.lock().unwrap() = Some(tx);
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(dataplane_message::Kind::Ack(ack)) = message.kind {
                    shared.acks.lock().unwrap().push(ack);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_module(
        &self,
        request: Request<FetchModuleRequest>,
    ) -> Result<Response<Self::FetchModuleStream>, Status> {
        let digest = request.into_inner().digest;
        let bytes = self.0.modules.lock().unwrap().get(&digest).cloned();
        let bytes = bytes.ok_or_else(|| Status::not_found(digest))?;
        let chunk = ModuleChunk {
            total_size: bytes.len() as u64,
            data: bytes,
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(chunk)]))))
    }
}

/// A FilterDiscovery server on loopback whose snapshots the test writes by hand.
struct TestOperator {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TestOperator {
    fn start() -> TestOperator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, incoming) = mpsc::channel(4);
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                if conns.send(Ok::<_, std::io::Error>(socket)).await.is_err() {
                    break;
                }
            }
        });
        let service =
            FilterDiscoveryServer::new(Service(shared.clone())).max_encoding_message_size(64 << 20);
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(ReceiverStream::new(incoming)),
        );
        TestOperator {
            runtime,
            addr,
            shared,
        }
    }

    fn serve_module(&self, bytes: Vec<u8>) -> (String, u64) {
        let digest = sha256(&bytes);
        let size = bytes.len() as u64;
        self.shared
            .modules
            .lock()
            .unwrap()
            .insert(digest.clone(), bytes.into());
        (digest, size)
    }

    fn wait_connected(&self) {
        wait_for("the dataplane to connect", || {
            self.shared.stream.lock().unwrap().is_some()
        });
    }

    fn send(&self, snapshot: Snapshot) {
        let tx = self
            .shared
            .stream
            .lock()
            .unwrap()
            .clone()
            .expect("connected");
        let message = ControlMessage {
            kind: Some(control_message::Kind::Snapshot(snapshot)),
        };
        self.runtime.block_on(tx.send(Ok(message))).unwrap();
    }

    fn ack(&self, version: u64) -> Option<Ack> {
        let acks = self.shared.acks.lock().unwrap();
        acks.iter().find(|a| a.version == version).cloned()
    }

    fn wait_ack(&self, version: u64) -> Ack {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(ack) = self.ack(version) {
                return ack;
            }
            assert!(Instant::now() < deadline, "no Ack for snapshot {version}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One filter as an operator would send it: header_rewrite with `configuration`.
fn filter(name: &str, module: &(String, u64), configuration: Vec<u8>) -> control::Filter {
    control::Filter {
        name: name.to_string(),
        // What the operator's revision stands for: this name with this configuration.
        revision: sha256(&[name.as_bytes(), &configuration].concat())[7..23].to_string(),
        module_digest: module.0.clone(),
        module_size: module.1,
        configuration: configuration.into(),
        memory_limit_bytes: 64 << 20,
        callback_timeout_ms: 1000,
        ..Default::default()
    }
}

/// header_rewrite setting response header `header` to `value`.
fn set_header(header: &str, value: &str) -> Vec<u8> {
    format!(r#"{{"response": {{"set": {{"{header}": "{value}"}}}}}}"#).into_bytes()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("wasmfilter-managed-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The dataplane binary, started on a configuration file; killed on drop.
struct DataplaneProcess {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl DataplaneProcess {
    fn start(dir: &Path, config: &str) -> DataplaneProcess {
        let path = dir.join("dataplane.yaml");
        std::fs::write(&path, config).unwrap();
        // The dataplane logs to stdout; both streams go to one file the test reads.
        let log = dir.join("dataplane.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wasmfilter-dataplane"))
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // "wasmfilter dataplane listening on http://A (admin http://B)"
        let mut addrs: Vec<SocketAddr> = Vec::new();
        wait_for("the dataplane to listen", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let Some(line) = text.lines().find(|l| l.contains("dataplane listening on")) else {
                return false;
            };
            addrs = line
                .split("http://")
                .skip(1)
                .map(|s| s.split([' ', ')']).next().unwrap().parse().unwrap())
                .collect();
            true
        });
        assert_eq!(addrs.len(), 2, "{}", std::fs::read_to_string(&log).unwrap());
        DataplaneProcess {
            child,
            proxy: addrs[0],
            admin: addrs[1],
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for DataplaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn managed_config(operator: SocketAddr, workers: usize) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: {workers}\ndrainTimeout: 1s\n\
         routes: [{{name: all, cluster: echo}}]\n\
         clusters: [{{name: echo, builtin: echo}}]\n\
         operator:\n  address: http://{operator}\n  insecure: true\n  id: dp-test\n  \
         stateDir: state\n  statsInterval: 60s\n"
    )
}

/// GET `path` on `addr`: (status, lower-cased head, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

/// The names of the filters /config_dump lists.
fn config_dump_filters(admin: SocketAddr) -> Vec<String> {
    let (status, _, body) = get(admin, "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    dump["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// The value of a sample in /metrics, if it is there.
fn metric(admin: SocketAddr, sample: &str) -> Option<f64> {
    let (_, _, body) = get(admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

const REFUSED: &str = "wasmfilter_managed_snapshots_refused_total";

#[test]
fn an_incomplete_empty_snapshot_keeps_the_running_chain_and_a_complete_one_removes_it() {
    let dir = temp_dir("refuse");
    let op = TestOperator::start();
    let module = op.serve_module(wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap());
    let dp = DataplaneProcess::start(&dir, &managed_config(op.addr, 2));
    op.wait_connected();

    op.send(Snapshot {
        version: 1,
        filters: vec![
            filter("team/a", &module, set_header("x-a", "on")),
            filter("team/b", &module, set_header("x-b", "on")),
        ],
        complete: false,
    });
    assert_eq!(op.wait_ack(1).errors, vec![], "both filters start");
    let (status, head, _) = get(dp.proxy, "/");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("x-a: on") && head.contains("x-b: on"),
        "{head}"
    );
    assert_eq!(config_dump_filters(dp.admin), ["team/a", "team/b"]);
    let saved = dir.join("state/snapshot.pb");
    let saved_before = std::fs::read(&saved).unwrap();
    assert_eq!(
        metric(dp.admin, REFUSED),
        Some(0.0),
        "counter exported from the start"
    );

    // An operator that has not seen the whole truth (no `complete`) sends an empty chain.
    op.send(Snapshot {
        version: 2,
        filters: vec![],
        complete: false,
    });
    wait_for("the refusal to be counted", || {
        metric(dp.admin, REFUSED) == Some(1.0)
    });
    let (status, head, _) = get(dp.proxy, "/");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("x-a: on") && head.contains("x-b: on"),
        "both filters still run: {head}"
    );
    assert_eq!(config_dump_filters(dp.admin), ["team/a", "team/b"]);
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        saved_before,
        "stateDir keeps the running chain"
    );
    assert!(
        dp.log().contains(
            "the operator sent an incomplete snapshot that would remove all 2 filters; \
             keeping the running chain until a complete one arrives"
        ),
        "{}",
        dp.log()
    );

    // The operator's complete view: nothing selects this dataplane any more.
    op.send(Snapshot {
        version: 3,
        filters: vec![],
        complete: true,
    });
    assert_eq!(op.wait_ack(3).errors, vec![]);
    assert!(
        op.ack(2).is_none(),
        "a refused snapshot is not acknowledged, so the operator's record of what runs stays true"
    );
    let (status, head, _) = get(dp.proxy, "/");
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("x-a") && !head.contains("x-b"), "{head}");
    assert_eq!(config_dump_filters(dp.admin), Vec::<String>::new());
    let saved_after: control::Snapshot =
        prost::Message::decode(std::fs::read(&saved).unwrap().as_slice()).unwrap();
    assert_eq!(
        saved_after.filters.len(),
        0,
        "stateDir records the empty chain"
    );
    assert_eq!(metric(dp.admin, REFUSED), Some(1.0));
}

/// A configuration of about `size` bytes that header_rewrite accepts (it ignores unknown
/// fields), different for every filter as real configurations are.
fn large_config(i: usize, size: usize) -> Vec<u8> {
    let mut padding = String::with_capacity(size);
    while padding.len() < size {
        padding.push_str(&format!("{i:08x}"));
    }
    format!(r#"{{"response": {{"set": {{"x-f{i}": "on"}}}}, "padding": "{padding}"}}"#).into_bytes()
}

/// Memory of a managed dataplane whose chain grows one filter per snapshot (as an operator
/// publishes filters as it reconciles them), to `WASMFILTER_RSS_FILTERS` (40) filters with
/// configurations of `WASMFILTER_RSS_CONFIG_KIB` (250) KiB each, on 2 workers. Prints the
/// figures; run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn measure_rss_of_a_managed_dataplane_with_large_configurations() {
    let n: usize = std::env::var("WASMFILTER_RSS_FILTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let kib: usize = std::env::var("WASMFILTER_RSS_CONFIG_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let dir = temp_dir("rss");
    let op = TestOperator::start();
    let module = op.serve_module(wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap());
    let dp = DataplaneProcess::start(&dir, &managed_config(op.addr, 2));
    op.wait_connected();
    let idle = dp.rss_kib();
    let filters: Vec<control::Filter> = (0..n)
        .map(|i| {
            filter(
                &format!("team/f{i:03}"),
                &module,
                large_config(i, kib << 10),
            )
        })
        .collect();
    for k in 1..=n {
        op.send(Snapshot {
            version: k as u64,
            filters: filters[..k].to_vec(),
            complete: true,
        });
        assert_eq!(op.wait_ack(k as u64).errors, vec![]);
    }
    let (status, head, _) = get(dp.proxy, "/");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains(&format!("x-f{}: on", n - 1)), "{head}");
    std::thread::sleep(Duration::from_secs(1));
    let rss = dp.rss_kib();
    println!(
        "managed dataplane, {n} filters x {kib} KiB configuration, 2 workers, {n} growing snapshots: \
         RSS {} MiB (idle before the first snapshot: {} MiB)",
        rss / 1024,
        idle / 1024
    );
}
