//! Filter semantics on a par with Envoy, through a real dataplane to real upstreams, with
//! filters built from the official Rust SDK (filters/rust): streams resumed from another
//! context, stream timeouts, shared-queue delivery, gRPC local replies, the end of every
//! stream context (also for requests their clients abandoned), and recovery from a trap in a
//! tick.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmfilter_dataplane::Dataplane;

fn filter(name: &str) -> PathBuf {
    wasmfilter_testkit::rust_filter(name).expect("filter builds")
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-sem-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A dataplane with one route `all` to cluster `main` (`clusters` defines it), `route_extra`
/// added to the route, and `filters`.
fn start(
    dir: &Path,
    workers: usize,
    route_extra: &str,
    clusters: &str,
    filters: &str,
) -> Dataplane {
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: {workers}\nroutes:\n  - name: all\n    cluster: main\n{route_extra}clusters:\n{clusters}filters:\n{filters}"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    Dataplane::start(&path).expect("dataplane starts")
}

const ECHO: &str = "  - name: main\n    builtin: echo\n";

/// One HTTP/1.1 request; returns (status, lower-cased head, body).
fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn metrics(dp: &Dataplane) -> String {
    get(dp.admin_addr, "/metrics", "").2
}

/// The value of the first sample line starting with `prefix` (0 if there is none).
fn sample(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Polls /metrics until `done` holds (at most `limit`), and returns the last text.
fn wait_for(dp: &Dataplane, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let m = metrics(dp);
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_request_paused_in_its_headers_is_resumed_by_a_tick_200ms_later() {
    let dir = temp_dir("pause");
    let dp = start(
        &dir,
        2,
        "",
        ECHO,
        &format!(
            "  - name: pause\n    module: {}\n    config: {{resume_after_ms: 200, tick_ms: 20}}\n",
            filter("pause_until_tick").display()
        ),
    );
    // Several at once, so both workers hold paused streams.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let addr = dp.proxy_addr;
            std::thread::spawn(move || {
                let started = Instant::now();
                let (status, head, body) = get(addr, &format!("/paused/{i}"), "");
                (status, head, body, started.elapsed())
            })
        })
        .collect();
    for t in threads {
        let (status, head, body, elapsed) = t.join().unwrap();
        assert_eq!(status, 200, "{head}\n{body}");
        let echoed: serde_json::Value =
            serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(
            echoed["headers"]["x-resumed-by"], "tick",
            "the tick resumed the stream and its header reached the upstream: {body}"
        );
        assert!(
            elapsed >= Duration::from_millis(200),
            "the request was held until the tick resumed it ({elapsed:?})"
        );
        println!("paused request answered after {elapsed:?}");
    }
    dp.shutdown();
}

#[test]
fn a_paused_request_nothing_resumes_is_answered_504_after_the_route_timeout() {
    let dir = temp_dir("timeout");
    let dp = start(
        &dir,
        2,
        "    timeout: 300ms\n",
        ECHO,
        &format!(
            "  - name: count\n    module: {}\n  - name: stuck\n    module: {}\n    config: {{resume_after_ms: 0}}\n",
            filter("lifecycle_count").display(),
            filter("pause_until_tick").display()
        ),
    );
    let started = Instant::now();
    let (status, head, body) = get(dp.proxy_addr, "/stuck", "");
    let elapsed = started.elapsed();
    assert_eq!(status, 504, "{head}\n{body}");
    assert!(
        body.contains("filter stuck paused the stream"),
        "the reply names the filter that paused: {body}"
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    println!("504 after {elapsed:?} (route timeout 300ms)");
    // Both filters' contexts ended.
    let m = wait_for(&dp, Duration::from_secs(5), |m| {
        sample(m, "wasmfilter_plugin_lifecycle_delete_total") >= 1
    });
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_created_total"),
        1,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_log_total"),
        1,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_delete_total"),
        1,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_out_of_order_total"),
        0,
        "{m}"
    );
    dp.shutdown();
}

#[test]
fn a_queue_item_enqueued_by_one_filters_tick_reaches_another_filters_on_queue_ready() {
    let dir = temp_dir("queue");
    let dp = start(
        &dir,
        2,
        "",
        ECHO,
        &format!(
            "  - name: consumer\n    module: {}\n    vm: {{id: consumer-vm}}\n  - name: producer\n    module: {}\n    vm: {{id: producer-vm}}\n    config: {{queue_vm_id: consumer-vm, tick_ms: 50}}\n",
            filter("queue_consumer").display(),
            filter("queue_producer").display()
        ),
    );
    let m = wait_for(&dp, Duration::from_secs(10), |m| {
        sample(m, "wasmfilter_plugin_queue_consumer_received_total") >= 10
    });
    let enqueued = sample(&m, "wasmfilter_plugin_queue_producer_enqueued_total");
    let ready = sample(&m, "wasmfilter_plugin_queue_consumer_ready_total");
    let received = sample(&m, "wasmfilter_plugin_queue_consumer_received_total");
    println!("enqueued {enqueued}, on_queue_ready {ready}, received {received}");
    assert!(
        received >= 10,
        "items from the producer's ticks arrived:\n{m}"
    );
    assert!(received <= enqueued && ready <= enqueued, "{m}");
    // Both workers' producers enqueue; only one VM owns the queue: every notice crosses to it.
    assert!(
        enqueued - ready <= 4,
        "one proxy_on_queue_ready per enqueue (at most the last few still in flight):\n{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_queue_consumer_wrong_queue_total"),
        0,
        "delivered to the queue it registered:\n{m}"
    );
    let (status, head, _) = get(dp.proxy_addr, "/q", "");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("x-queue-last: tick-"),
        "the consumer's stream reads what its queue callback stored: {head}"
    );
    dp.shutdown();
}

/// A tiny gRPC service (the control protocol's FilterDiscovery, served by tonic) on loopback.
fn grpc_upstream() -> SocketAddr {
    use wasmfilter_api::control::filter_discovery_server::{
        FilterDiscovery, FilterDiscoveryServer,
    };
    use wasmfilter_api::control::{
        ControlMessage, DataplaneMessage, FetchModuleRequest, ModuleChunk,
    };
    struct Service;
    type Out<T> = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send + 'static>,
    >;
    #[tonic::async_trait]
    impl FilterDiscovery for Service {
        type StreamStream = Out<ControlMessage>;
        type FetchModuleStream = Out<ModuleChunk>;
        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<DataplaneMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not here"))
        }
        async fn fetch_module(
            &self,
            _: tonic::Request<FetchModuleRequest>,
        ) -> Result<tonic::Response<Self::FetchModuleStream>, tonic::Status> {
            let chunk = ModuleChunk::default();
            Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
                vec![Ok(chunk)],
            ))))
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(FilterDiscoveryServer::new(Service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    addr
}

#[test]
fn a_tonic_client_reads_aborted_and_its_message_from_a_grpc_local_reply() {
    use wasmfilter_api::control::FetchModuleRequest;
    use wasmfilter_api::control::filter_discovery_client::FilterDiscoveryClient;
    let grpc = grpc_upstream();
    let dir = temp_dir("grpc");
    let dp = start(
        &dir,
        2,
        "",
        &format!("  - name: main\n    http2: true\n    endpoints: [\"{grpc}\"]\n"),
        &format!(
            "  - name: deny\n    module: {}\n    match: {{pathPrefixes: [/deny, /wasmfilter.control.v1alpha1.FilterDiscovery/FetchModule]}}\n    config: {{message: \"quota exceeded: 100% used ✗\"}}\n",
            filter("grpc_deny").display()
        ),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Straight to the upstream: the service answers.
        let channel = |addr: SocketAddr| async move {
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap()
        };
        let mut direct = FilterDiscoveryClient::new(channel(grpc).await);
        assert!(
            direct
                .fetch_module(FetchModuleRequest::default())
                .await
                .is_ok()
        );
        // Through the proxy: the filter's local reply.
        let mut client = FilterDiscoveryClient::new(channel(dp.proxy_addr).await);
        let status = client
            .fetch_module(FetchModuleRequest::default())
            .await
            .expect_err("the filter refused the call");
        assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
        assert_eq!(
            status.message(),
            "quota exceeded: 100% used ✗",
            "{status:?}"
        );
        assert_eq!(
            status
                .metadata()
                .get("x-denied-by")
                .map(|v| v.to_str().unwrap()),
            Some("grpc_deny"),
            "the filter's headers come with the reply: {status:?}"
        );
    });
    // A plain HTTP request: the gRPC status is ignored, the HTTP reply goes out as given
    // (the SDK's send_grpc_response gives HTTP 200 with the message as the body).
    let (status, head, body) = get(dp.proxy_addr, "/deny/plain", "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, "quota exceeded: 100% used ✗");
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(head.contains("x-denied-by: grpc_deny"), "{head}");
    assert!(!head.contains("grpc-status"), "{head}");
    assert!(!head.contains("application/grpc"), "{head}");
    dp.shutdown();
}

/// Resident set size of this process (the dataplane runs in it), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// An upstream that reads each request head, counts it, and never answers (it holds the
/// connection until the proxy closes it).
fn silent_upstream(seen: Arc<AtomicUsize>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::AsyncReadExt;
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                head.extend_from_slice(&buf[..n]);
                                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                                    seen.fetch_add(1, Ordering::SeqCst);
                                    head.clear();
                                }
                            }
                        }
                    }
                });
            }
        });
    });
    addr
}

/// `n` clients send a request each, wait until the upstream has seen all of them (so every
/// request is inside the proxy, its filter contexts created), then drop their connections.
fn abandon(proxy: SocketAddr, seen: &AtomicUsize, n: usize) {
    let target = seen.load(Ordering::SeqCst) + n;
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(proxy).unwrap();
        write!(s, "GET /slow/{i} HTTP/1.1\r\nhost: test.local\r\n\r\n").unwrap();
        clients.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(Ordering::SeqCst) < target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        seen.load(Ordering::SeqCst) >= target,
        "every request reached the upstream"
    );
    drop(clients);
}

#[test]
fn ten_thousand_requests_abandoned_mid_flight_end_every_context_and_leave_memory_flat() {
    const BATCH: usize = 250;
    const TOTAL: usize = 10_000;
    let seen = Arc::new(AtomicUsize::new(0));
    let upstream = silent_upstream(seen.clone());
    let dir = temp_dir("abandon");
    let dp = start(
        &dir,
        2,
        "    timeout: 60s\n",
        &format!("  - name: main\n    endpoints: [\"{upstream}\"]\n"),
        &format!(
            "  - name: count\n    module: {}\n",
            filter("lifecycle_count").display()
        ),
    );
    // Warm up (allocator arenas, connection pools, the test's own sockets) before measuring.
    const WARM_BATCHES: usize = 4;
    for _ in 0..WARM_BATCHES {
        abandon(dp.proxy_addr, &seen, BATCH);
    }
    let warm = (WARM_BATCHES * BATCH) as u64;
    wait_for(&dp, Duration::from_secs(10), |m| {
        sample(m, "wasmfilter_plugin_lifecycle_delete_total") >= warm
    });
    let before = rss_kib();
    let started = Instant::now();
    let mut checkpoints = Vec::new();
    for i in 1..=TOTAL / BATCH {
        abandon(dp.proxy_addr, &seen, BATCH);
        if i % (TOTAL / BATCH / 4) == 0 {
            checkpoints.push(format!("{}: {} KiB", i * BATCH, rss_kib()));
        }
    }
    let total = warm + TOTAL as u64;
    let m = wait_for(&dp, Duration::from_secs(30), |m| {
        sample(m, "wasmfilter_plugin_lifecycle_delete_total") >= total
    });
    let after = rss_kib();
    println!(
        "{TOTAL} abandoned requests in {:?}; RSS before {before} KiB, after {after} KiB ({:+} KiB); after n requests: {}",
        started.elapsed(),
        after as i64 - before as i64,
        checkpoints.join(", ")
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_created_total"),
        total,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_done_total"),
        total,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_log_total"),
        total,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_delete_total"),
        total,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_out_of_order_total"),
        0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_requests_abandoned_total{phase=\"request\"}"),
        total,
        "{m}"
    );
    dp.shutdown();
}

#[test]
fn a_trap_in_a_tick_is_followed_by_the_ticks_of_the_rebuilt_vm() {
    let dir = temp_dir("ticktrap");
    let dp = start(
        &dir,
        1,
        "",
        ECHO,
        &format!(
            "  - name: ticker\n    module: {}\n    config: {{tick_ms: 20, trap_on_tick: 3}}\n",
            filter("tick_trap").display()
        ),
    );
    // No request is needed: the worker rebuilds the VM after its backoff and its ticks start.
    let m = wait_for(&dp, Duration::from_secs(10), |m| {
        sample(m, "wasmfilter_filter_vm_restarts_total{filter=\"ticker\"}") >= 1
            && sample(m, "wasmfilter_plugin_tick_trap_ticks_total") >= 10
    });
    assert_eq!(
        sample(&m, "wasmfilter_filter_traps_total{filter=\"ticker\"}"),
        1,
        "one trap:\n{m}"
    );
    assert!(
        sample(&m, "wasmfilter_filter_vm_restarts_total{filter=\"ticker\"}") >= 1,
        "{m}"
    );
    assert!(
        sample(&m, "wasmfilter_plugin_tick_trap_ticks_total") >= 10,
        "ticks go on after the trap (3 before it):\n{m}"
    );
    let (status, head, _) = get(dp.proxy_addr, "/after", "");
    assert_eq!(status, 200, "{head}");
    dp.shutdown();
}

/// An upstream that counts requests; `/partial/*` gets its head and a first chunk `hello`,
/// then nothing more; anything else gets nothing at all. Either way the connection is held.
fn stalling_upstream(seen: Arc<AtomicUsize>) -> SocketAddr {
    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let seen = seen.clone();
                        async move {
                            let _: &hyper::body::Incoming = req.body();
                            seen.fetch_add(1, Ordering::SeqCst);
                            if !req.uri().path().starts_with("/partial") {
                                std::future::pending::<()>().await;
                            }
                            let chunks = futures_util::stream::once(async {
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from("hello")))
                            })
                            .chain(futures_util::stream::pending());
                            let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
                            Ok::<_, std::convert::Infallible>(http::Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

#[test]
fn requests_abandoned_mid_response_or_reset_over_http2_end_their_contexts() {
    const N: usize = 20;
    let seen = Arc::new(AtomicUsize::new(0));
    let upstream = stalling_upstream(seen.clone());
    let dir = temp_dir("reset");
    let dp = start(
        &dir,
        2,
        "    timeout: 60s\n",
        &format!("  - name: main\n    endpoints: [\"{upstream}\"]\n"),
        &format!(
            "  - name: count\n    module: {}\n",
            filter("lifecycle_count").display()
        ),
    );
    // HTTP/1.1 clients that read the head and the first chunk, then go away.
    for i in 0..N {
        let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
        write!(s, "GET /partial/{i} HTTP/1.1\r\nhost: test.local\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("hello") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the head and first chunk arrive");
            got.extend_from_slice(&buf[..n]);
        }
        drop(s);
    }
    // HTTP/2 streams on one connection, each reset by the client while the upstream is silent.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(dp.proxy_addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        for i in 0..N {
            let before = seen.load(Ordering::SeqCst);
            let req = http::Request::get(format!("http://test.local/silent/{i}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let pending = sender.send_request(req);
            // Reset the stream (by dropping it) once the upstream has the request.
            let waited = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::pin!(pending);
                loop {
                    tokio::select! {
                        r = &mut pending => panic!("the upstream never answers: {r:?}"),
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {
                            if seen.load(Ordering::SeqCst) > before {
                                return;
                            }
                        }
                    }
                }
            })
            .await;
            assert!(waited.is_ok(), "request {i} reached the upstream");
        }
        // The connection task sends the last reset, then ends with the connection.
        drop(sender);
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    });
    let total = 2 * N as u64;
    let m = wait_for(&dp, Duration::from_secs(10), |m| {
        sample(m, "wasmfilter_plugin_lifecycle_delete_total") >= total
    });
    for name in ["created", "done", "log", "delete"] {
        assert_eq!(
            sample(&m, &format!("wasmfilter_plugin_lifecycle_{name}_total")),
            total,
            "{name}:\n{m}"
        );
    }
    assert_eq!(
        sample(&m, "wasmfilter_plugin_lifecycle_out_of_order_total"),
        0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "wasmfilter_requests_abandoned_total{phase=\"response_body\"}"
        ),
        N as u64,
        "{m}"
    );
    assert_eq!(
        sample(&m, "wasmfilter_requests_abandoned_total{phase=\"request\"}"),
        N as u64,
        "{m}"
    );
    drop(rt);
    dp.shutdown();
}

#[test]
fn callouts_of_abandoned_requests_are_cancelled_and_free_the_filters_callout_quota() {
    let seen = Arc::new(AtomicUsize::new(0));
    let silent = silent_upstream(seen.clone());
    let dir = temp_dir("callouts");
    let dp = start(
        &dir,
        1,
        "",
        &format!("{ECHO}  - name: slow\n    endpoints: [\"{silent}\"]\n"),
        &format!(
            "  - name: observer\n    module: {}\n    limits: {{pendingCallouts: 2}}\n",
            filter("observe").display()
        ),
    );
    // Five requests in turn, each paused on a callout the upstream never answers, each
    // abandoned by its client: with the callouts of abandoned requests left pending, the third
    // dispatch would be refused by the quota of 2 and never reach the upstream.
    for i in 0..5 {
        let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
        write!(
            s,
            "GET /c/{i} HTTP/1.1\r\nhost: test.local\r\nx-observe-callout-cluster: slow\r\n\r\n"
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) <= i && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            seen.load(Ordering::SeqCst),
            i + 1,
            "callout {i} was dispatched (the quota was not used up by abandoned requests)"
        );
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
    dp.shutdown();
}
