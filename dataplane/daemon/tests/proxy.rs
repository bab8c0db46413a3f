//! The dataplane end to end: real HTTP/1.1 over loopback, filters built from source with the
//! Rust SDK, the built-in echo upstream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use wasmfilter_dataplane::Dataplane;

fn filter(name: &str) -> PathBuf {
    wasmfilter_testkit::rust_filter(name).expect("filter builds")
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-dp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &Path, filters_yaml: &str) -> Dataplane {
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 2\nroutes:\n  - name: all\n    cluster: echo\nclusters:\n  - name: echo\n    builtin: echo\nfilters:\n{filters_yaml}"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    Dataplane::start(&path).expect("dataplane starts")
}

/// A plain HTTP/1.1 exchange; returns (status, lower-cased head, body).
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body).0
    } else {
        body.to_string()
    };
    (status, head, body)
}

/// Decodes a chunked body; returns the data and the trailer section.
fn dechunk(mut rest: &str) -> (String, String) {
    let mut data = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size =
            usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).expect("hex size");
        if size == 0 {
            return (data, after.trim_end_matches("\r\n").to_string());
        }
        data.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

#[test]
fn filters_rewrite_requests_and_responses_and_reply_locally() {
    let dir = temp_dir("chain");
    let yaml = format!(
        "  - name: hello\n    module: {}\n    config: {{request: {{add: {{x-hello: world}}}}, response: {{add: {{x-resp: yes}}}}}}\n  - name: deny\n    module: {}\n    phase: Authz\n    config: {{path_prefix: /admin}}\n  - name: body\n    module: {}\n    config: {{from: ping, to: PONG}}\n",
        filter("header_rewrite").display(),
        filter("local_reply").display(),
        filter("body_rewrite").display()
    );
    let dp = start(&dir, &yaml);
    let (status, head, body) = http(dp.proxy_addr, "POST", "/app", &[], "say ping");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("x-resp: yes"), "{head}");
    assert!(head.contains("x-local-reply-seen: 200"), "{head}");
    assert!(head.contains("via: 1.1 wasmfilter"), "{head}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["headers"]["x-hello"], "world", "{body}");
    assert_eq!(
        echoed["body"], "say PONG",
        "the request body was rewritten before the upstream saw it"
    );

    let (status, head, body) = http(dp.proxy_addr, "GET", "/admin/x", &[], "");
    assert_eq!(status, 403);
    assert_eq!(body, "denied\n");
    assert!(head.contains("x-denied-by: local_reply"), "{head}");
    assert!(
        head.contains("x-local-reply-seen: 403"),
        "response callbacks run on local replies: {head}"
    );
    assert!(
        !head.contains("x-resp"),
        "a filter after the replying one never saw the request, so it does not see the reply: {head}"
    );

    let metrics = http(dp.admin_addr, "GET", "/metrics", &[], "").2;
    assert!(
        metrics.contains("wasmfilter_requests_total{code=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmfilter_requests_total{code=\"403\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmfilter_filter_invocations_total{filter=\"hello\"}"),
        "{metrics}"
    );
    let dump = http(dp.admin_addr, "GET", "/config_dump", &[], "").2;
    assert!(dump.contains("\"digest\": \"sha256:"), "{dump}");
    assert_eq!(http(dp.admin_addr, "GET", "/ready", &[], "").0, 200);
    dp.shutdown();
}

const TRAPPING: &str = r#"(module
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    (local $p i32) (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get 0))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func $explode (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable))"#;

#[test]
fn a_trapping_filter_fails_closed_or_open_and_never_disturbs_the_others() {
    let dir = temp_dir("trap");
    let wasm = dir.join("trap.wasm");
    std::fs::write(&wasm, wat::parse_str(TRAPPING).unwrap()).unwrap();
    let hello = filter("header_rewrite");
    let closed = format!(
        "  - name: trap\n    module: {}\n    failurePolicy: FailClosed\n    match: {{pathPrefixes: [/guarded]}}\n  - name: hello\n    module: {}\n    config: {{request: {{add: {{x-hello: world}}}}}}\n  - name: trap-open\n    module: {}\n    failurePolicy: FailOpen\n    match: {{pathPrefixes: [/open]}}\n",
        wasm.display(),
        hello.display(),
        wasm.display()
    );
    let dp = start(&dir, &closed);
    let (status, head, _) = http(dp.proxy_addr, "GET", "/guarded", &[], "");
    assert_eq!(status, 503, "{head}");
    assert!(
        head.contains("x-wasmfilter-error: filter trap failed"),
        "{head}"
    );
    let (status, _, body) = http(dp.proxy_addr, "GET", "/open", &[], "");
    assert_eq!(status, 200, "FailOpen skips the broken filter");
    assert!(
        body.contains("\"x-hello\": \"world\""),
        "the healthy filter still ran: {body}"
    );
    let (status, _, body) = http(dp.proxy_addr, "GET", "/other", &[], "");
    assert_eq!(status, 200);
    assert!(body.contains("x-hello"));
    let metrics = http(dp.admin_addr, "GET", "/metrics", &[], "").2;
    assert!(
        metrics.contains("wasmfilter_filter_traps_total{filter=\"trap\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmfilter_filter_fail_open_skips_total{filter=\"trap-open\"} 1"),
        "{metrics}"
    );
    dp.shutdown();
}

/// A native filter runs at the same points as a Wasm one: request headers in chain order
/// (the echo upstream shows what it added), response headers in reverse order.
#[test]
fn a_native_filter_runs_where_a_wasm_filter_would() {
    let dir = temp_dir("native");
    let yaml = format!(
        "  - name: wasm\n    module: {}\n    config: {{\"response\": {{\"add\": {{\"x-wasm\": \"1\"}}}}}}\n  - name: native\n    native: header_rewrite\n    config: {{\"request\": {{\"set\": {{\"x-native-req\": \"yes\"}}}}, \"response\": {{\"add\": {{\"x-native\": \"1\"}}}}}}\n",
        filter("header_rewrite").display()
    );
    let dp = start(&dir, &yaml);
    let (status, head, body) = http(dp.proxy_addr, "GET", "/n", &[], "");
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("\"x-native-req\": \"yes\""), "{body}");
    assert!(head.contains("x-native: 1"), "{head}");
    assert!(head.contains("x-wasm: 1"), "{head}");
    assert_eq!(
        head.matches("x-wasmfilter: header_rewrite").count(),
        2,
        "{head}"
    );
    let (status, _, body) = http(dp.proxy_addr, "POST", "/n", &[], "a body passes untouched");
    assert_eq!(status, 200);
    assert!(body.contains("a body passes untouched"), "{body}");
    let metrics = http(dp.admin_addr, "GET", "/metrics", &[], "").2;
    assert!(
        metrics.contains("wasmfilter_filter_invocations_total{filter=\"native\"}"),
        "{metrics}"
    );
    let dump = http(dp.admin_addr, "GET", "/config_dump", &[], "").2;
    assert!(dump.contains("\"native\": \"header_rewrite\""), "{dump}");
    dp.shutdown();
}

#[test]
fn bad_configurations_each_get_one_clear_error() {
    let dir = temp_dir("badcfg");
    let not_wasm = dir.join("not.wasm");
    std::fs::write(&not_wasm, b"hello").unwrap();
    let no_marker = dir.join("nomarker.wasm");
    std::fs::write(
        &no_marker,
        wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(),
    )
    .unwrap();
    let base = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nroutes: [{name: r, cluster: echo}]\nclusters: [{name: echo, builtin: echo}]\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("{base}colour: blue\n"), "unknown field `colour`"),
        (format!("{base}tls: {{certFile: missing.pem, keyFile: missing.pem}}\n"), "tls.certFile"),
        (format!("{base}filters: [{{name: f, module: x.wasm, image: 127.0.0.1:1/f:v1}}]\n"), "set exactly one of module"),
        (format!("{base}filters: [{{name: f, image: 127.0.0.1:1/f:v1, sha256: abc}}]\n"), "filters[0].sha256"),
        ("listen: nowhere\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}]\n".into(), "listen"),
        ("routes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}]\n".into(), "no listener"),
        ("listen: 127.0.0.1:0\nlisteners: [{address: \"1.2.3\"}]\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}]\n".into(), "listeners[0].address"),
        ("listen: 127.0.0.1:0\nadmin: 1.2.3:4\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}]\n".into(), "admin"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: missing}]\nclusters: [{name: c, builtin: echo}]\n".into(), "routes[0].cluster: no cluster named \"missing\""),
        ("listen: 127.0.0.1:0\nroutes: []\nclusters: [{name: c, builtin: echo}]\n".into(), "routes: at least one route"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c}]\n".into(), "clusters[0].endpoints"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, endpoints: [\"nohost\"]}]\n".into(), "clusters[0].endpoints[0]"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo, timeout: 5 parsecs}]\n".into(), "invalid duration"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}, {name: c, builtin: echo}]\n".into(), "duplicate cluster name"),
        (format!("{base}filters: [{{name: f, module: /nonexistent/x.wasm}}]\n"), "filters[0] (f): module /nonexistent/x.wasm"),
        (format!("{base}filters: [{{name: f, module: {}}}]\n", not_wasm.display()), "not a WebAssembly module"),
        (format!("{base}filters: [{{name: f, module: {}}}]\n", no_marker.display()), "not a proxy-wasm module"),
        (format!("{base}filters: [{{name: f, module: x.wasm, limits: {{memory: lots}}}}]\n"), "filters[0].limits.memory"),
        (format!("{base}filters: [{{name: f, module: x.wasm, limits: {{memory: 4Gi}}}}]\n"), "out of range"),
        (format!("{base}filters: [{{name: f, module: x.wasm, logLevel: loud}}]\n"), "filters[0].logLevel"),
        (format!("{base}filters: [{{name: f, module: x.wasm, failurePolicy: Sometimes}}]\n"), "unknown variant `Sometimes`"),
        (format!("{base}filters: [{{name: f, module: {}, config: {{\"request\": 5}}}}]\n", filter("header_rewrite").display()), "proxy_on_configure returned false"),
        (format!("{base}filters: [{{name: f, native: nope}}]\n"), "unknown native filter \"nope\"; known native filters: header_rewrite"),
        (format!("{base}filters: [{{name: f, native: header_rewrite, module: x.wasm}}]\n"), "set exactly one of module"),
        (format!("{base}filters: [{{name: f, native: header_rewrite, config: \"{{not json\"}}]\n"), "native header_rewrite: header_rewrite: invalid plugin configuration"),
        (format!("{base}operator: {{address: \"grpc://op:7070\", stateDir: s}}\n"), "operator.address: \"grpc://op:7070\" must start with https://"),
        (format!("{base}operator: {{address: \"http://op:7070\", stateDir: s}}\n"), "operator.insecure: operator.address is plain http://"),
        (format!("{base}operator: {{address: \"https://op:7070\", stateDir: s}}\n"), "operator.tls: an https:// operator needs tls"),
        (format!("{base}operator: {{address: \"http://op:7070\", insecure: true, stateDir: s, statsInterval: 10ms}}\n"), "operator.statsInterval: must be at least 1s"),
        (format!("{base}operator: {{address: \"http://op:7070\", insecure: true}}\n"), "missing field `stateDir`"),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let err = match Dataplane::start(&path) {
            Ok(_) => panic!("case {i} was accepted:\n{yaml}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in:\n{err}"
        );
        assert!(
            err.contains(&path.display().to_string()),
            "case {i}: the error names the file: {err}"
        );
    }
}
