//! Hostile filters end to end (issue #15): a filter's failure stays its own. Real HTTP/1.1
//! over loopback to a dataplane running WAT filters written here next to a Rust SDK filter,
//! the built-in echo upstream showing what was forwarded, `/metrics` showing the refusals.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use wasmfilter_dataplane::Dataplane;

fn temp_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("wasmfilter-hostile-{test}-{}", std::process::id()));
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

/// A plain HTTP/1.1 GET; returns (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of one sample on `/metrics`.
fn sample(dp: &Dataplane, series: &str) -> Option<u64> {
    let text = get(dp.admin_addr, "/metrics").1;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A minimal proxy-wasm module whose `proxy_on_request_headers` is `body`, with `data`
/// segments and `imports`.
fn wat_filter(dir: &Path, name: &str, imports: &str, data: &str, body: &str) -> PathBuf {
    let text = format!(
        r#"(module
  {imports}
  (memory (export "memory") 2)
  {data}
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0x8000))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    {body}
    (i32.const 0)))"#
    );
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(&text).unwrap()).unwrap();
    path
}

const ADD: &str = r#"(import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
const REPLACE: &str = r#"(import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))"#;

/// 40,000 headers per request (past the 32,768 at which `http::HeaderMap` panics): the
/// filter gets BAD_ARGUMENT past its headerCount, the request goes on with what fit, the
/// refusals are counted, other routes and filters answer, and the process stays small.
#[test]
fn a_filter_adding_forty_thousand_headers_per_request_cannot_hurt_the_node() {
    let dir = temp_dir("flood");
    let flood = wat_filter(
        &dir,
        "flood",
        ADD,
        r#"(data (i32.const 0x400) "x-h") (data (i32.const 0x410) "v")"#,
        r#"(block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const 40000)))
      (drop (call $add (i32.const 0) (i32.const 0x400) (i32.const 3) (i32.const 0x410) (i32.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))"#,
    );
    let hello = wasmfilter_testkit::rust_filter("header_rewrite").expect("filter builds");
    let yaml = format!(
        "  - name: flood\n    module: {}\n    match: {{pathPrefixes: [/flood]}}\n    limits: {{headerCount: 100, callbackTimeout: 20s}}\n  - name: hello\n    module: {}\n    config: {{request: {{add: {{x-hello: world}}}}}}\n",
        flood.display(),
        hello.display()
    );
    let dp = start(&dir, &yaml);
    let (status, body) = get(dp.proxy_addr, "/flood");
    assert_eq!(status, 200, "{body}");
    let forwarded = body.matches("\"x-h\"").count() + body.matches("\"v\"").count();
    assert!(forwarded > 0, "what fit was forwarded: {body}");
    assert!(
        body.len() < 64 * 1024,
        "at most 100 fields: {} bytes",
        body.len()
    );
    let before = rss_kib();
    let requests = 200;
    for _ in 1..requests {
        assert_eq!(get(dp.proxy_addr, "/flood").0, 200);
    }
    let after = rss_kib();
    let (status, body) = get(dp.proxy_addr, "/other");
    assert_eq!(status, 200);
    assert!(body.contains("\"x-hello\": \"world\""), "{body}");
    let refused = sample(
        &dp,
        "wasmfilter_filter_quota_refusals_total{filter=\"flood\",limit=\"headerCount\"}",
    )
    .expect("the refusals are on /metrics");
    assert!(refused >= requests * (40_000 - 100), "{refused}");
    assert_eq!(
        sample(
            &dp,
            "wasmfilter_filter_quota_refusals_total{filter=\"hello\",limit=\"headerCount\"}"
        ),
        Some(0)
    );
    assert_eq!(
        sample(&dp, "wasmfilter_filter_traps_total{filter=\"flood\"}").unwrap_or(0),
        0
    );
    eprintln!(
        "header flood: {requests} requests x 40,000 adds, {refused} refusals, RSS {before} -> {after} KiB"
    );
    // Generous: the unbounded version kept about 20 MB per request.
    assert!(
        after.saturating_sub(before) < 256 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    dp.shutdown();
}

/// A `:path` with CRLF and a value with LF used to be accepted, after which every request
/// failed with a 502 blaming the upstream. Now the writes are refused (BAD_ARGUMENT), counted
/// against the filter, and the request is forwarded as it came.
#[test]
fn a_filter_writing_crlf_into_path_and_headers_is_refused_and_requests_still_route() {
    let dir = temp_dir("crlf");
    let bad = wat_filter(
        &dir,
        "bad",
        &format!("{ADD}\n  {REPLACE}"),
        r#"(data (i32.const 0x400) ":path") (data (i32.const 0x410) "/x\0d\0aevil")
  (data (i32.const 0x420) "x-bad") (data (i32.const 0x430) "a\0ab")"#,
        r#"(drop (call $replace (i32.const 0) (i32.const 0x400) (i32.const 5) (i32.const 0x410) (i32.const 8)))
    (drop (call $add (i32.const 0) (i32.const 0x420) (i32.const 5) (i32.const 0x430) (i32.const 3)))"#,
    );
    let yaml = format!("  - name: bad-path\n    module: {}\n", bad.display());
    let dp = start(&dir, &yaml);
    for _ in 0..20 {
        let (status, body) = get(dp.proxy_addr, "/hello?x=1");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("/hello?x=1"), "{body}");
        assert!(!body.contains("x-bad"), "{body}");
    }
    assert_eq!(
        sample(
            &dp,
            "wasmfilter_filter_quota_refusals_total{filter=\"bad-path\",limit=\"headerSyntax\"}"
        ),
        Some(40)
    );
    dp.shutdown();
}

#[test]
fn bad_limits_each_get_one_error_naming_the_field() {
    let dir = temp_dir("badlimits");
    let base = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nroutes: [{name: r, cluster: echo}]\nclusters: [{name: echo, builtin: echo}]\n";
    for (limits, expected) in [
        (
            "{headerCount: 0}",
            "filters[0].limits.headerCount: limits.headerCount is 0: it must be between 1 and 1048576",
        ),
        (
            "{sharedDataBytes: lots}",
            "filters[0].limits.sharedDataBytes",
        ),
        (
            "{queueBytes: 2Gi}",
            "filters[0].limits.queueBytes: limits.queueBytes is 2147483648: it must be between 1 and 1073741824",
        ),
        ("{metrics: 20000}", "filters[0].limits.metrics"),
        ("{pendingCallouts: 0}", "filters[0].limits.pendingCallouts"),
        (
            "{logRecordsPerSecond: 0}",
            "filters[0].limits.logRecordsPerSecond",
        ),
        ("{headerCont: 5}", "unknown field `headerCont`"),
    ] {
        let path = dir.join("bad.yaml");
        std::fs::write(
            &path,
            format!("{base}filters: [{{name: f, module: x.wasm, limits: {limits}}}]\n"),
        )
        .unwrap();
        let err = match Dataplane::start(&path) {
            Ok(_) => panic!("{limits} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(expected),
            "{limits}: expected {expected:?} in:\n{err}"
        );
    }
}
