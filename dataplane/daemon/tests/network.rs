//! Network filters on a TCP listener and service plugins, end to end: real TCP clients over
//! loopback, a real TCP upstream and HTTP upstream started here, filters built from source with
//! the official Rust SDK (filters/rust/tcp_guard, token_service, token_header).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmfilter_dataplane::Dataplane;

mod support;

use support::{rust_filter as filter, temp_dir};

/// A TCP echo server: every connection gets back what it sends, and a half-close once the
/// client has half-closed. Serves until the test process ends.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 32 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// An HTTP/1.1 upstream answering every request with `body`, counting requests.
fn http_server(body: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (addr, count)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The value of a sample in /metrics (0 when absent).
fn metric(admin: SocketAddr, sample: &str) -> f64 {
    let (_, text) = get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (bounded) until `sample` reaches at least `want`; returns its last value.
fn wait_metric(admin: SocketAddr, sample: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(admin, sample);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_network_filter_sees_rewrites_and_closes_tcp_connections_through_the_tcp_proxy() {
    let dir = temp_dir("guard");
    let upstream = echo_server();
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 2
listeners:
  - name: db
    address: 127.0.0.1:0
    protocol: TCP
    cluster: backend
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: backend
    endpoints: [\"{upstream}\"]
filters:
  - name: guard
    type: Network
    listeners: [db]
    module: {}
",
        filter("tcp_guard").display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");
    let tcp = dp.proxy_addrs[1];

    // A masked word on the way up; the half-close reaches the upstream, whose echo and
    // half-close come back.
    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello secret world").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    c.read_to_string(&mut echoed).unwrap();
    assert_eq!(
        echoed, "hello ****** world",
        "the filter masks what the client sends"
    );

    // The deny pattern: the filter closes the connection and nothing is echoed.
    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"please QUIT! now").unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "a denied connection is closed with nothing echoed, got {:?}",
        String::from_utf8_lossy(&rest)
    );

    // 8 MiB both ways at once: the proxy keeps both directions flowing (no deadlock while
    // both peers write) and loses nothing.
    let payload: Vec<u8> = (0..8 << 20).map(|i| b"0123456789"[i % 10]).collect();
    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = c.try_clone().unwrap();
    let sent = payload.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    w.join().unwrap();
    assert_eq!(back.len(), payload.len(), "every byte comes back");
    assert!(back == payload, "the bytes come back unchanged");

    let admin = dp.admin_addr;
    let sample =
        |name: &str| format!("wasmfilter_plugin_tcp_guard_{name}_total{{filter=\"guard\"}}");
    assert_eq!(wait_metric(admin, &sample("connections"), 3.0), 3.0);
    assert_eq!(wait_metric(admin, &sample("denied"), 1.0), 1.0);
    let up_bytes = (18 + payload.len()) as f64;
    let down_bytes = up_bytes + "please QUIT! now".len() as f64;
    assert_eq!(
        wait_metric(admin, &sample("downstream_bytes"), down_bytes),
        down_bytes,
        "the filter saw every byte the clients sent"
    );
    assert_eq!(
        wait_metric(admin, &sample("upstream_bytes"), up_bytes),
        up_bytes,
        "the filter saw every byte the upstream sent"
    );
    let closed = |reason: &str| {
        format!("wasmfilter_tcp_connections_closed_total{{listener=\"db\",reason=\"{reason}\"}}")
    };
    assert_eq!(wait_metric(admin, &closed("filter_closed"), 1.0), 1.0);
    assert_eq!(wait_metric(admin, &closed("closed"), 2.0), 2.0);

    // The HTTP listener does not run the network filter: a plain request is answered.
    let (status, _) = get(dp.proxy_addrs[0], "/plain");
    assert_eq!(status, 200);
    dp.shutdown();
}

#[test]
fn an_unreachable_upstream_closes_the_client_connection_and_is_counted() {
    let dir = temp_dir("unreachable");
    // A port nobody listens on: bind, note, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 1
listeners:
  - address: 127.0.0.1:0
    name: dead
    protocol: TCP
    cluster: nowhere
    connectTimeout: 500ms
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: nowhere
    endpoints: [\"{dead}\"]
"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");
    let mut c = TcpStream::connect(dp.proxy_addrs[1]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let sample = "wasmfilter_tcp_connections_closed_total{listener=\"dead\",reason=\"upstream_unreachable\"}";
    assert_eq!(wait_metric(dp.admin_addr, sample, 1.0), 1.0);
    dp.shutdown();
}

#[test]
fn a_service_plugin_fetches_a_token_on_its_ticks_and_shares_it_with_an_http_filter() {
    let dir = temp_dir("service");
    let (tokens, fetched) = http_server("tok-42");
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 2
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: tokens
    endpoints: [\"{tokens}\"]
filters:
  - name: fetcher
    type: Service
    module: {service}
    vm: {{id: tokens}}
    config: {{cluster: tokens, path: /token, tick_ms: 200}}
  - name: stamp
    module: {header}
    vm: {{id: tokens}}
",
        service = filter("token_service").display(),
        header = filter("token_header").display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");

    // Requests on either worker see the token once the service plugin has fetched it; the
    // service plugin never runs on a request (its module has no HTTP context: it would fail
    // the request if it did).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 4 && Instant::now() < deadline {
        let (status, text) = get(dp.proxy_addr, "/");
        assert_eq!(status, 200, "{text}");
        // The echo upstream answers with the request it got, as pretty JSON.
        let text = text.replace(": ", ":");
        if text.contains("\"x-token\":\"tok-42\"") {
            seen += 1;
        } else {
            assert!(text.contains("\"x-token\":\"none\""), "{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(seen, 4, "the shared token reached the HTTP filter");

    // One instance per process: over 2 s a 200 ms tick fetches about 10 times (ticks can be
    // late, never early); two instances (one per worker) would fetch about 20 times.
    let before = fetched.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    let during = fetched.load(Ordering::SeqCst) - before;
    assert!(
        (1..=12).contains(&during),
        "a singleton ticking every 200 ms fetched {during} times in 2 s"
    );
    assert!(
        metric(
            dp.admin_addr,
            "wasmfilter_plugin_token_service_fetches_total{filter=\"fetcher\"}"
        ) >= 1.0
    );
    dp.shutdown();
}

#[test]
fn impossible_plugin_and_listener_combinations_are_refused_naming_the_field() {
    let base = "listen: 127.0.0.1:0
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: db
    endpoints: [\"127.0.0.1:5432\"]
";
    let cases = [
        (
            "listeners:\n  - address: 127.0.0.1:0\n    protocol: TCP\n",
            "listeners[0].cluster",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:0\n    protocol: TCP\n    cluster: echo\n",
            "listeners[0].cluster",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:0\n    cluster: db\n",
            "listeners[0].cluster",
        ),
        (
            "filters:\n  - name: n\n    type: Network\n    module: x.wasm\n    match: {pathPrefixes: [/api/]}\n",
            "filters[0].match",
        ),
        (
            "filters:\n  - name: s\n    type: Service\n    module: x.wasm\n    listeners: [db]\n",
            "filters[0].listeners",
        ),
        (
            "filters:\n  - name: h\n    module: x.wasm\n    listeners: [db]\n",
            "filters[0].listeners",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:0\n    name: web\nfilters:\n  - name: n\n    type: NETWORK\n    module: x.wasm\n    listeners: [web]\n",
            "filters[0].listeners[0]",
        ),
        (
            "filters:\n  - name: n\n    type: Network\n    module: x.wasm\n    listeners: [nope]\n",
            "filters[0].listeners[0]",
        ),
        (
            "filters:\n  - name: n\n    type: Network\n    native: header_rewrite\n",
            "filters[0].type",
        ),
    ];
    for (extra, field) in cases {
        let text = format!("{base}{extra}");
        let err = wasmfilter_dataplane::config::Config::parse(&text, "test.yaml")
            .expect_err(&format!("refused: {extra}"));
        assert_eq!(err.field, field, "{extra} → {err}");
        assert!(!err.message.is_empty());
    }
}

#[test]
fn a_go_sdk_network_filter_rewrites_and_closes_connections() {
    let dir = temp_dir("go");
    let upstream = echo_server();
    let module = wasmfilter_testkit::go_filter("tcpcount").expect("Go filter builds");
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 1
listeners:
  - name: raw
    address: 127.0.0.1:0
    protocol: TCP
    cluster: backend
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: backend
    endpoints: [\"{upstream}\"]
filters:
  - name: go
    type: NETWORK
    module: {}
",
        module.display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");
    let tcp = dp.proxy_addrs[1];

    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello from go").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    c.read_to_string(&mut echoed).unwrap();
    assert_eq!(
        echoed,
        "HELLO FROM GO",
        "{}",
        get(dp.admin_addr, "/metrics").1
    );

    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"QUIT!").unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    let sample = |name: &str| format!("wasmfilter_plugin_go_tcp_{name}_total{{filter=\"go\"}}");
    assert_eq!(
        wait_metric(dp.admin_addr, &sample("downstream_bytes"), 18.0),
        18.0
    );
    assert_eq!(
        wait_metric(dp.admin_addr, &sample("upstream_bytes"), 13.0),
        13.0
    );
    assert_eq!(
        wait_metric(dp.admin_addr, &sample("connections_done"), 2.0),
        2.0
    );
    dp.shutdown();
}

#[test]
fn a_service_plugin_receives_the_queue_items_http_filters_enqueue_on_every_worker() {
    let dir = temp_dir("collector");
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 2
routes:
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
filters:
  - name: collector
    type: Service
    module: {consumer}
    vm: {{id: collector}}
    config: {{queue_name: events}}
  - name: producer
    module: {producer}
    config: {{queue_role: producer, queue_name: events, queue_vm_id: collector}}
",
        consumer = filter("queue_consumer").display(),
        producer = filter("observe").display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");
    // Separate connections, so both workers serve some of them.
    for i in 0..20 {
        let (status, text) = get(dp.proxy_addr, &format!("/item-{i}"));
        assert_eq!(status, 200, "{text}");
    }
    let received = "wasmfilter_plugin_queue_consumer_received_total{filter=\"collector\"}";
    assert_eq!(
        wait_metric(dp.admin_addr, received, 20.0),
        20.0,
        "every enqueued path reaches the service plugin once"
    );
    let wrong = "wasmfilter_plugin_queue_consumer_wrong_queue_total{filter=\"collector\"}";
    assert_eq!(metric(dp.admin_addr, wrong), 0.0);
    dp.shutdown();
}

#[test]
fn connect_opens_a_tunnel_only_where_a_route_allows_it() {
    let dir = temp_dir("connect");
    let upstream = echo_server();
    let config = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: 1
routes:
  - name: db-tunnel
    connect: true
    match: {{hosts: [db.internal]}}
    cluster: backend
  - name: all
    cluster: echo
clusters:
  - name: echo
    builtin: echo
  - name: backend
    endpoints: [\"{upstream}\"]
"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let dp = Dataplane::start(&path).expect("dataplane starts");

    // An allowed target: 200, then the bytes go both ways through the tunnel.
    let mut c = TcpStream::connect(dp.proxy_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"CONNECT DB.internal:5432 HTTP/1.1\r\nhost: DB.internal:5432\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut byte).unwrap(), 1, "head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.write_all(b"through the tunnel").unwrap();
    let mut echoed = [0u8; 18];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"through the tunnel");

    // Any other target, and a CONNECT route never serves ordinary requests.
    let mut c = TcpStream::connect(dp.proxy_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"CONNECT other.host:443 HTTP/1.1\r\nhost: other.host:443\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 12];
    c.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 405");
    let (status, text) = get(dp.proxy_addr, "/");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("wasmfilter-echo"),
        "ordinary requests take the next route: {text}"
    );
    dp.shutdown();
}
