//! Streaming bodies, trailers, HTTP/2, callouts and hot swaps through the real proxy, against
//! in-process hyper upstreams.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use wasmfilter_dataplane::Dataplane;

fn filter(name: &str) -> PathBuf {
    wasmfilter_testkit::rust_filter(name).expect("filter builds")
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-st-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An HTTP/1.1 + h2c upstream on loopback whose answer `handler` computes from the request
/// (method, path, headers, whole body).
fn upstream<F>(handler: F) -> SocketAddr
where
    F: Fn(http::request::Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
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
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(handler(parts, body))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
    addr
}

fn write_config(dir: &Path, clusters: &str, filters: &str) -> PathBuf {
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 2\nroutes:\n  - name: all\n    cluster: main\nclusters:\n{clusters}filters:\n{filters}"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Sends a request with a chunked body (in `chunk`-byte pieces) and optional trailers; returns
/// (status, lower-case head, body, trailer section).
fn chunked_request(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    chunk: usize,
    trailers: &str,
) -> (u16, String, Vec<u8>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\nte: trailers\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes();
    for piece in body.chunks(chunk) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = &out[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return (status, head, rest.to_vec(), String::new());
    }
    let mut data = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (
                status,
                head,
                data,
                String::from_utf8_lossy(rest).to_ascii_lowercase(),
            );
        }
        data.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn a_streamed_one_mebibyte_body_is_rewritten_in_both_directions() {
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_by_upstream = seen.clone();
    let up = upstream(move |_, body| {
        seen_by_upstream.store(body.len(), Ordering::SeqCst);
        assert!(
            !body.windows(5).any(|w| w == b"hello"),
            "the upstream must only see the rewritten body"
        );
        let mut reply = body.to_vec();
        reply.extend_from_slice(b"\nthe upstream says hello");
        Response::new(Full::new(Bytes::from(reply)))
    });
    let dir = temp_dir("mib");
    let config = write_config(
        &dir,
        &format!("  - name: main\n    endpoints: [\"{up}\"]\n"),
        &format!(
            "  - name: rewrite\n    module: {}\n    config: {{from: hello, to: HELLO}}\n",
            filter("body_rewrite").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    // 1 MiB of "hello world " in 7 KiB chunks: matches straddle chunk boundaries.
    let body: Vec<u8> = b"hello world "
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    let (status, head, reply, _) = chunked_request(dp.proxy_addr, "/upload", &body, 7 * 1024, "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1 << 20,
        "same length: hello and HELLO are both five bytes"
    );
    // What the upstream answers (its input, rewritten, plus a line), rewritten once more.
    let mut upstream_reply = replace(&body, b"hello", b"HELLO");
    upstream_reply.extend_from_slice(b"\nthe upstream says hello");
    let expected = replace(&upstream_reply, b"hello", b"HELLO");
    assert_eq!(reply.len(), expected.len());
    if let Some(at) = reply.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "the response body differs at byte {at}: {:?} vs {:?}",
            String::from_utf8_lossy(&reply[at.saturating_sub(20)..(at + 40).min(reply.len())]),
            String::from_utf8_lossy(
                &expected[at.saturating_sub(20)..(at + 40).min(expected.len())]
            )
        );
    }
    dp.shutdown();
}

#[test]
fn trailers_pass_both_ways_and_filters_add_to_them() {
    let dir = temp_dir("trailers");
    let config = write_config(
        &dir,
        "  - name: main\n    builtin: echo\n",
        &format!(
            "  - name: rewrite\n    module: {}\n    config: {{from: ping, to: PONG}}\n",
            filter("body_rewrite").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let (status, head, body, trailers) = chunked_request(
        dp.proxy_addr,
        "/t",
        b"ping ping",
        4,
        "x-client-checksum: abc\r\n",
    );
    assert_eq!(status, 200, "{head}");
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echoed["body"], "ping ping",
        "with trailers the body never reaches end_of_stream in the body callback, so the filter leaves it (documented in filters/README.md)"
    );
    assert!(
        trailers.contains("x-client-checksum: abc"),
        "the client's trailer reached the upstream and came back: {trailers:?}"
    );
    assert!(
        trailers.contains("x-filter-trailer: seen"),
        "the filter's request trailer came back too: {trailers:?}"
    );
    // Trailers a filter adds to the response are not announced in a `Trailer` header, which
    // HTTP/1.1 requires; an HTTP/2 client receives them.
    let addr = dp.proxy_addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h2_trailers = rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut sent = http::HeaderMap::new();
        sent.insert("x-h2", http::HeaderValue::from_static("1"));
        let body = Full::new(Bytes::from("ping")).with_trailers(std::future::ready(Some(Ok(sent))));
        let req = Request::builder()
            .method("POST")
            .uri("http://test.local/t")
            .body(body)
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .trailers()
            .cloned()
            .unwrap_or_default()
    });
    assert_eq!(
        h2_trailers.get("x-h2").map(|v| v.to_str().unwrap()),
        Some("1"),
        "{h2_trailers:?}"
    );
    assert!(
        h2_trailers.contains_key("x-response-body-bytes"),
        "the filter's response trailer: {h2_trailers:?}"
    );
    dp.shutdown();
}

#[test]
fn http2_clients_get_the_same_filtered_answers() {
    let dir = temp_dir("h2");
    let config = write_config(
        &dir,
        "  - name: main\n    builtin: echo\n",
        &format!(
            "  - name: hello\n    module: {}\n    config: {{request: {{add: {{x-hello: h2}}}}, response: {{add: {{x-resp: h2}}}}}}\n",
            filter("header_rewrite").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for i in 0..5 {
            let req = Request::builder()
                .uri(format!("http://test.local/h2/{i}"))
                .body(Full::new(Bytes::from("x")))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.headers()["x-resp"], "h2");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(echoed["headers"]["x-hello"], "h2");
            assert_eq!(echoed["path"], format!("/h2/{i}"));
        }
    });
    dp.shutdown();
}

#[test]
fn http_callouts_reach_their_cluster_and_steer_the_request() {
    let auth = upstream(|parts, _| {
        let allowed = parts
            .headers
            .get("authorization")
            .map(|v| v == "Bearer good")
            .unwrap_or(false);
        let mut resp = Response::new(Full::new(Bytes::new()));
        if allowed {
            resp.headers_mut()
                .insert("x-user", "alice".parse().unwrap());
        } else {
            *resp.status_mut() = http::StatusCode::UNAUTHORIZED;
        }
        resp
    });
    let dir = temp_dir("callout");
    let config = write_config(
        &dir,
        &format!(
            "  - name: main\n    builtin: echo\n  - name: auth\n    endpoints: [\"{auth}\"]\n"
        ),
        &format!(
            "  - name: auth\n    module: {}\n    config: {{cluster: auth, path: /check}}\n",
            filter("callout").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let get = |token: &str| {
        let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
        write!(s, "GET /private HTTP/1.1\r\nhost: t\r\nauthorization: {token}\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ok = get("Bearer good");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("\"x-auth-user\": \"alice\""),
        "the callout's answer was added to the request: {ok}"
    );
    let denied = get("Bearer bad");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("x-callout-status: 401"), "{denied}");
    dp.shutdown();
}

#[test]
fn the_chain_is_swapped_twenty_times_under_load_without_a_failed_or_mixed_response() {
    let dir = temp_dir("swap");
    let module = filter("header_rewrite");
    let write = |version: usize| {
        write_config(
            &dir,
            "  - name: main\n    builtin: echo\n",
            &format!(
                "  - name: version\n    module: {}\n    config: {{request: {{set: {{x-chain: \"v{version}\"}}}}, response: {{set: {{x-chain: \"v{version}\"}}}}}}\n",
                module.display()
            ),
        )
    };
    let config = write(0);
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut mixed) = (0usize, 0usize, 0usize);
                // Bounded: at most 20 000 requests per client.
                for _ in 0..20_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET /swap HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                        .unwrap();
                    let mut out = String::new();
                    if s.read_to_string(&mut out).is_err() || !out.starts_with("HTTP/1.1 200") {
                        failed += 1;
                        continue;
                    }
                    let response_version = out
                        .lines()
                        .find_map(|l| l.strip_prefix("x-chain: "))
                        .map(str::to_string);
                    let request_version = out
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("\"x-chain\": \""))
                        .map(|v| v.trim_end_matches(['"', ',']).to_string());
                    if response_version.is_none() || response_version != request_version {
                        mixed += 1;
                    }
                    ok += 1;
                }
                (ok, failed, mixed)
            })
        })
        .collect();
    for version in 1..=20 {
        std::thread::sleep(std::time::Duration::from_millis(40));
        write(version);
        dp.reload().expect("reload");
    }
    std::thread::sleep(std::time::Duration::from_millis(40));
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed, mut mixed) = (0, 0, 0);
    for c in clients {
        let (o, f, m) = c.join().unwrap();
        ok += o;
        failed += f;
        mixed += m;
    }
    eprintln!("hot swap: {ok} requests, {failed} failed, {mixed} mixed, 20 swaps");
    assert!(ok > 100, "the load really ran: {ok} requests");
    assert_eq!(failed, 0, "no request failed during the swaps");
    assert_eq!(mixed, 0, "every response came from one chain version");
    let last = TcpStream::connect(addr).and_then(|mut s| {
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    assert!(
        last.unwrap().contains("x-chain: v20"),
        "the last chain serves"
    );
    dp.shutdown();
}

#[test]
fn go_and_assemblyscript_filters_run_in_the_proxy() {
    let go = wasmfilter_testkit::go_filter("headers").unwrap();
    let asc = wasmfilter_testkit::assemblyscript_filter("add_header").unwrap();
    let dir = temp_dir("sdks");
    let config = write_config(
        &dir,
        "  - name: main\n    builtin: echo\n",
        &format!(
            "  - name: go\n    module: {}\n    config: {{header: x-go, value: gopher}}\n  - name: as\n    module: {}\n    rootId: add_header\n    config: from-as\n",
            go.display(),
            asc.display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
    s.write_all(b"GET /sdk HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("x-go-response: gopher"), "{out}");
    assert!(out.contains("x-as-filter: from-as"), "{out}");
    assert!(out.contains("\"x-go\": \"gopher\""), "{out}");
    assert!(out.contains("\"x-as-request\": \"1\""), "{out}");
    dp.shutdown();
}

#[test]
fn timers_properties_and_filter_metrics_through_the_proxy() {
    let dir = temp_dir("observe");
    let config = write_config(
        &dir,
        "  - name: main\n    builtin: echo\n",
        &format!(
            "  - name: observer\n    module: {}\n    config: {{tick_ms: 20}}\n    vm: {{id: observer-vm}}\n",
            filter("observe").display()
        ),
    );
    // Route metadata, as filters read it through xds.route_metadata.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "    cluster: main\n",
        "    cluster: main\n    metadata: {filter_metadata: {wasmfilter: {owner: team-z}}}\n",
    );
    std::fs::write(&config, text).unwrap();
    let dp = Dataplane::start(&config).unwrap();
    let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
    s.write_all(b"GET /props?x=1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
    let json_start = body.find('{').unwrap();
    let json_end = body.rfind('}').unwrap();
    let echoed: serde_json::Value = serde_json::from_str(&body[json_start..=json_end]).unwrap();
    let h = &echoed["headers"];
    assert_eq!(h["x-prop-plugin-name"], "observer");
    assert_eq!(h["x-prop-vm-id"], "observer-vm");
    assert_eq!(h["x-prop-path"], "/props?x=1");
    assert_eq!(h["x-prop-method"], "GET");
    assert_eq!(h["x-prop-route-name"], "all");
    assert_eq!(h["x-prop-route-meta-owner"], "team-z");
    let source = h["x-prop-source-address"].as_str().unwrap();
    assert!(source.starts_with("127.0.0.1:"), "{source}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");

    // Ticks run on every worker without any request (the VMs are warmed at start).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let metrics = loop {
        let mut s = TcpStream::connect(dp.admin_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut m = String::new();
        s.read_to_string(&mut m).unwrap();
        let ticks: u64 = m
            .lines()
            .find(|l| l.starts_with("wasmfilter_plugin_observe_ticks_total{filter=\"observer\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ticks >= 10 || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let ticks_line = metrics
        .lines()
        .find(|l| l.starts_with("wasmfilter_plugin_observe_ticks_total"))
        .unwrap_or_else(|| panic!("no tick counter in:\n{metrics}"));
    let ticks: u64 = ticks_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(ticks >= 10, "{ticks_line}");
    assert!(
        !metrics.contains("_total_total"),
        "counter names are not doubled:\n{metrics}"
    );
    assert!(
        metrics.contains("wasmfilter_plugin_observe_requests_by_method_total{filter=\"observer\",method=\"GET\"} 1"),
        "tags in metric names become labels:\n{metrics}"
    );
    assert!(metrics.contains("wasmfilter_plugin_observe_request_header_count_bucket{filter=\"observer\",le=\"+Inf\"} 1"), "{metrics}");
    dp.shutdown();
}

/// A gRPC server on loopback (h2c) answering `/test.Echo/Check` with `pong:<request>`.
fn grpc_upstream() -> SocketAddr {
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
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        assert_eq!(req.uri().path(), "/test.Echo/Check");
                        assert_eq!(req.headers()["content-type"], "application/grpc");
                        assert_eq!(
                            req.headers()["x-md"],
                            "1",
                            "initial metadata from the filter"
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let message = &body[5..];
                        let reply = [b"pong:".as_slice(), message].concat();
                        let mut framed = vec![0u8];
                        framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                        framed.extend_from_slice(&reply);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let body = Full::new(Bytes::from(framed))
                            .with_trailers(std::future::ready(Some(Ok(trailers))));
                        let mut resp = Response::new(body);
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
    addr
}

#[test]
fn grpc_callouts_reach_an_http2_cluster() {
    let grpc = grpc_upstream();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = temp_dir("grpc");
    let config = write_config(
        &dir,
        &format!(
            "  - name: main\n    builtin: echo\n  - name: grpc\n    http2: true\n    endpoints: [\"{grpc}\"]\n  - name: down\n    http2: true\n    endpoints: [\"{closed}\"]\n"
        ),
        &format!(
            "  - name: check\n    module: {m}\n    match: {{pathPrefixes: [/up]}}\n    config: {{grpc_cluster: grpc, grpc_service: test.Echo, grpc_method: Check}}\n  - name: check-down\n    module: {m}\n    match: {{pathPrefixes: [/down]}}\n    config: {{grpc_cluster: down, grpc_service: test.Echo, grpc_method: Check}}\n",
            m = filter("callout").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let get = |path: &str| {
        let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let up = get("/up/hello");
    assert!(up.starts_with("HTTP/1.1 200"), "{up}");
    assert!(up.contains("\"x-grpc-status\": \"0\""), "{up}");
    assert!(
        up.contains("\"x-grpc-response\": \"pong:/up/hello\""),
        "{up}"
    );
    let down = get("/down/x");
    assert!(down.starts_with("HTTP/1.1 200"), "{down}");
    assert!(
        down.contains("\"x-grpc-status\": \"14\""),
        "an unreachable gRPC cluster is UNAVAILABLE: {down}"
    );
    dp.shutdown();
}

#[test]
fn tls_listeners_serve_http1_and_http2_by_alpn() {
    let dir = temp_dir("tls");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    let config = write_config(
        &dir,
        "  - name: main\n    builtin: echo\n",
        &format!(
            "  - name: hello\n    module: {}\n    config: {{response: {{add: {{x-resp: tls}}}}}}\n",
            filter("header_rewrite").display()
        ),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "admin: 127.0.0.1:0\n",
        "admin: 127.0.0.1:0\ntls: {certFile: cert.pem, keyFile: key.pem}\nlisteners: [{address: \"127.0.0.1:0\"}]\n",
    );
    std::fs::write(&config, text).unwrap();
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    // A second, plain listener served by the same workers and filters.
    assert_eq!(dp.proxy_addrs.len(), 2);
    let mut plain = TcpStream::connect(dp.proxy_addrs[1]).unwrap();
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    plain.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("x-resp: tls"),
        "{out}"
    );
    assert!(out.contains("\"x-forwarded-proto\": \"http\""), "{out}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        for (alpn, version) in [
            (b"h2".to_vec(), http::Version::HTTP_2),
            (b"http/1.1".to_vec(), http::Version::HTTP_11),
        ] {
            let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            client.alpn_protocols = vec![alpn];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let tls = connector
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            let io = hyper_util::rt::TokioIo::new(tls);
            let req = Request::builder()
                .uri("https://localhost/secure")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = if version == http::Version::HTTP_2 {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                sender.send_request(req).await.unwrap()
            } else {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                let mut req = req;
                req.headers_mut()
                    .insert("host", http::HeaderValue::from_static("localhost"));
                sender.send_request(req).await.unwrap()
            };
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), version);
            assert_eq!(resp.headers()["x-resp"], "tls");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");
        }
    });
    dp.shutdown();
}

#[test]
fn shutdown_stops_accepting_but_finishes_requests_in_flight() {
    let slow = upstream(|_, _| {
        std::thread::sleep(std::time::Duration::from_millis(400));
        Response::new(Full::new(Bytes::from("slow but complete")))
    });
    let dir = temp_dir("drain");
    let config = write_config(
        &dir,
        &format!("  - name: main\n    endpoints: [\"{slow}\"]\n"),
        &format!(
            "  - name: hello\n    module: {}\n",
            filter("header_rewrite").display()
        ),
    );
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    let in_flight = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let started = std::time::Instant::now();
    dp.shutdown();
    let out = in_flight.join().unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the request in flight completed: {out}"
    );
    assert!(out.contains("slow but complete"), "{out}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "shutdown waited for it"
    );
    assert!(TcpStream::connect(addr).is_err(), "no longer accepting");
}

#[test]
fn filters_steer_routing_by_rewriting_path_and_authority() {
    let v1 = upstream(|parts, _| {
        Response::new(Full::new(Bytes::from(format!("v1 {}", parts.uri.path()))))
    });
    let v2 = upstream(|parts, _| {
        Response::new(Full::new(Bytes::from(format!(
            "v2 {} {}",
            parts.uri.path(),
            parts.headers["host"].to_str().unwrap()
        ))))
    });
    let dir = temp_dir("steer");
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\nroutes:\n  - name: v2\n    match: {{hosts: [v2.internal], pathPrefixes: [/v2]}}\n    cluster: v2\n  - name: all\n    cluster: v1\nclusters:\n  - name: v1\n    endpoints: [\"{v1}\"]\n  - name: v2\n    endpoints: [\"{v2}\"]\nfilters:\n  - name: steer\n    module: {}\n    match: {{pathPrefixes: [/beta]}}\n    config: {{request: {{set: {{\":path\": /v2/from-beta, \":authority\": v2.internal}}}}}}\n",
        filter("header_rewrite").display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).unwrap();
    let get = |p: &str| {
        let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
        write!(
            s,
            "GET {p} HTTP/1.1\r\nhost: public.example\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let plain = get("/stable");
    assert!(plain.ends_with("v1 /stable"), "{plain}");
    let steered = get("/beta/x");
    assert!(
        steered.ends_with("v2 /v2/from-beta v2.internal"),
        "the route was chosen after the filter rewrote :path and :authority: {steered}"
    );
    dp.shutdown();
}
