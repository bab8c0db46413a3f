//! Issue #14: a filter scoped with `match` cannot be stepped around by spelling a request
//! differently, and the request head is cleaned before anything trusts it.
//!
//! A real dataplane runs in front of a recording upstream (both on loopback). The scoped
//! filter is `header_rewrite` built from filters/rust with `match: {hosts: [...],
//! pathPrefixes: [/api/]}`; it marks what it sees with `x-scoped: 1`. Each attempt is sent over
//! raw TCP (HTTP/1.1) or with hyper's HTTP/2 client, and must end either refused by the proxy
//! (4xx/5xx, the upstream never called) or at the upstream with the mark and a normalised path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use wasmfilter_dataplane::Dataplane;

/// What the upstream received: method, path-and-query, headers (lower-case names).
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An HTTP/1.1 upstream on loopback that records every request and answers 200 `upstream`.
fn recording_upstream() -> (SocketAddr, Log) {
    let log: Log = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = log.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let seen = Seen {
                                path: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect(),
                            };
                            let _ = req.into_body().collect().await;
                            log.lock().unwrap().push(seen);
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"upstream"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    (addr, log)
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-sb-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The scope an Authn filter would have: these hosts, paths under /api/.
const HOSTS: &str = "[\"*.example.com\", \"API.test\", \"*-edge.example.org\", \"shop.*\"]";

fn start(dir: &Path, upstream: SocketAddr, http: &str) -> Dataplane {
    let filter = wasmfilter_testkit::rust_filter("header_rewrite").expect("filter builds");
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\n{http}routes:\n  - name: all\n    cluster: up\nclusters:\n  - name: up\n    endpoints: [\"{upstream}\"]\nfilters:\n  - name: scoped\n    module: {}\n    phase: Authn\n    match: {{hosts: {HOSTS}, pathPrefixes: [/api/]}}\n    config: {{request: {{set: {{x-scoped: \"1\"}}}}}}\n",
        filter.display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    Dataplane::start(&path).expect("dataplane starts")
}

/// Sends raw bytes as one HTTP/1.1 request; returns (status, lower-case head).
fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let head = out.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase())
}

fn get(addr: SocketAddr, target: &str, host: &str) -> (u16, String) {
    raw(
        addr,
        &format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
    )
}

/// One HTTP/2 request (h2c with prior knowledge) with this URI and optional `host` header.
fn h2(addr: SocketAddr, uri: &str, host: Option<&str>) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        resp.status().as_u16()
    })
}

/// How an attempt must end.
#[derive(Debug)]
enum Expect {
    /// Refused by the proxy with this status; the upstream never called.
    Refused(u16),
    /// At the upstream with the filter's mark, this path and this Host.
    Marked(&'static str, &'static str),
    /// A control outside the scope: at the upstream unmarked, with this path and Host.
    Unmarked(&'static str, &'static str),
}

enum Send {
    H1(&'static str, &'static str),
    Raw(String),
    H2(&'static str, Option<&'static str>),
}

#[test]
fn a_scoped_filter_cannot_be_bypassed() {
    let (up, log) = recording_upstream();
    let dir = temp_dir("bypass");
    let dp = start(&dir, up, "");
    let addr = dp.proxy_addr;
    use Expect::*;
    use Send::*;
    let cases: Vec<(&str, Send, Expect)> = vec![
        ("baseline", H1("/api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("host upper case", H1("/api/x", "A.EXAMPLE.COM"), Marked("/api/x", "a.example.com")),
        ("host mixed case", H1("/api/x", "a.Example.com"), Marked("/api/x", "a.example.com")),
        ("host trailing dot", H1("/api/x", "a.example.com."), Marked("/api/x", "a.example.com")),
        ("exact host trailing dot", H1("/api/x", "api.test."), Marked("/api/x", "api.test")),
        ("exact host, pattern written upper case", H1("/api/x", "api.TEST"), Marked("/api/x", "api.test")),
        ("host with port", H1("/api/x", "a.example.com:8080"), Marked("/api/x", "a.example.com:8080")),
        ("trailing dot and port", H1("/api/x", "a.example.com.:8080"), Marked("/api/x", "a.example.com:8080")),
        ("deep subdomain", H1("/api/x", "b.a.example.com"), Marked("/api/x", "b.a.example.com")),
        ("suffix wildcard *-edge", H1("/api/x", "EU-edge.example.org"), Marked("/api/x", "eu-edge.example.org")),
        ("prefix wildcard shop.*", H1("/api/x", "shop.example.net."), Marked("/api/x", "shop.example.net")),
        ("dot-dot segment", H1("/x/../api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("double slash", H1("//api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("many slashes", H1("/api///x//", "a.example.com"), Marked("/api/x/", "a.example.com")),
        ("dot segment", H1("/./api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("dot inside", H1("/api/./y/../x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("encoded unreserved", H1("/%61pi/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("encoded slashes hiding dot segments", H1("/%41%50%49/x/..%2F..%2f", "a.example.com"), Refused(400)),
        ("encoded dots", H1("/x/%2e%2E/api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("half-encoded dots", H1("/x/.%2e/api/x", "a.example.com"), Marked("/api/x", "a.example.com")),
        ("encoded reserved kept, hex upper-cased", H1("/api/a%3ab", "a.example.com"), Marked("/api/a%3Ab", "a.example.com")),
        ("query kept byte for byte", H1("/x/../api/x?q=/../%61&r=%2f", "a.example.com"), Marked("/api/x?q=/../%61&r=%2f", "a.example.com")),
        ("encoded slash", H1("/api%2fx", "a.example.com"), Refused(400)),
        ("encoded slash upper", H1("/api%2Fx", "a.example.com"), Refused(400)),
        ("encoded slash before api", H1("/%2fapi/x", "a.example.com"), Refused(400)),
        ("encoded backslash", H1("/api%5cx", "a.example.com"), Refused(400)),
        ("raw backslash", H1("/api\\x", "a.example.com"), Refused(400)),
        ("climbing above root", H1("/../api/x", "a.example.com"), Refused(400)),
        ("encoded climb above root", H1("/%2e%2e/api/x", "a.example.com"), Refused(400)),
        ("encoded NUL", H1("/api/x%00", "a.example.com"), Refused(400)),
        ("invalid percent-encoding", H1("/api/%zz", "a.example.com"), Refused(400)),
        ("host with user info", H1("/api/x", "u@a.example.com"), Refused(400)),
        ("host with two ports", H1("/api/x", "a.example.com:1:2"), Refused(400)),
        ("host percent-encoded", H1("/api/x", "a%2eexample.com"), Refused(400)),
        ("host empty label", H1("/api/x", "a..example.com"), Refused(400)),
        ("absolute-form", Raw("GET http://a.example.com/api/x HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n".into()), Marked("/api/x", "a.example.com")),
        ("absolute-form, case and dots", Raw("GET http://A.EXAMPLE.COM./x/../api/x HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into()), Marked("/api/x", "a.example.com")),
        ("absolute-form authority wins over Host", Raw("GET http://other.test/api/x HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into()), Unmarked("/api/x", "other.test")),
        ("absolute-form with another scheme", Raw("GET ftp://a.example.com/api/x HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into()), Refused(400)),
        ("authority-form on GET", Raw("GET a.example.com:80 HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into()), Refused(400)),
        ("asterisk-form on GET", Raw("GET * HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into()), Refused(400)),
        ("control: bare domain is outside *.example.com", H1("/api/x", "example.com"), Unmarked("/api/x", "example.com")),
        ("control: /apix is outside /api/", H1("/apix", "a.example.com"), Unmarked("/apix", "a.example.com")),
        ("h2 baseline", H2("http://a.example.com/api/x", None), Marked("/api/x", "a.example.com")),
        ("h2 :authority upper case, trailing dot", H2("http://A.EXAMPLE.COM./api/x", None), Marked("/api/x", "a.example.com")),
        ("h2 dot segments and encoding", H2("http://a.example.com/x/..//%61pi/x", None), Marked("/api/x", "a.example.com")),
        ("h2 Host agrees with :authority", H2("http://a.example.com/api/x", Some("A.example.com")), Marked("/api/x", "a.example.com")),
        ("h2 Host disagrees with :authority", H2("http://other.test/api/x", Some("a.example.com")), Refused(400)),
        ("h2 :authority in scope, Host not", H2("http://a.example.com/api/x", Some("other.test")), Refused(400)),
        ("h2 encoded slash", H2("http://a.example.com/api%2Fx", None), Refused(400)),
    ];
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for (name, send, expect) in &cases {
        let before = log.lock().unwrap().len();
        let (status, head) = match send {
            H1(target, host) => get(addr, target, host),
            Raw(request) => raw(addr, request),
            H2(uri, host) => (h2(addr, uri, *host), String::new()),
        };
        let seen: Vec<Seen> = log.lock().unwrap()[before..].to_vec();
        let ok = match expect {
            Refused(code) => status == *code && seen.is_empty(),
            Marked(path, host) | Unmarked(path, host) => {
                let marked = matches!(expect, Marked(..));
                status == 200
                    && seen.len() == 1
                    && seen[0].path == *path
                    && seen[0].header("host") == Some(*host)
                    && (seen[0].header("x-scoped") == Some("1")) == marked
            }
        };
        if !ok {
            failures.push(format!(
                "{name}: expected {expect:?}, got {status} {head:?}, upstream saw {seen:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    dp.shutdown();
}

#[test]
fn escaped_slashes_can_be_unescaped_instead_of_refused() {
    let (up, log) = recording_upstream();
    let dir = temp_dir("unescape");
    let forward = start(
        &dir,
        up,
        "http: {pathWithEscapedSlashesAction: UnescapeAndForward}\n",
    );
    let (status, _) = get(forward.proxy_addr, "/x%2F..%2Fapi%5Cx", "a.example.com");
    assert_eq!(status, 200);
    let seen = log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.path, "/api/x");
    assert_eq!(seen.header("x-scoped"), Some("1"), "{seen:?}");
    forward.shutdown();

    let dir = temp_dir("redirect");
    let redirect = start(
        &dir,
        up,
        "http: {pathWithEscapedSlashesAction: UNESCAPE_AND_REDIRECT}\n",
    );
    let before = log.lock().unwrap().len();
    let (status, head) = get(redirect.proxy_addr, "/api%2Fx?a=%2F", "a.example.com");
    assert_eq!(status, 307, "{head}");
    assert!(head.contains("location: /api/x?a=%2f"), "{head}");
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "the upstream was not called"
    );
    redirect.shutdown();
}

#[test]
fn forwarded_headers_come_from_the_connection_unless_the_peer_is_trusted() {
    let (up, log) = recording_upstream();
    let spoof = "GET /api/x HTTP/1.1\r\nhost: a.example.com\r\nx-forwarded-for: 10.9.9.9\r\nx-forwarded-proto: https\r\nconnection: close\r\n\r\n";
    let dir = temp_dir("xff");
    let dp = start(&dir, up, "");
    assert_eq!(raw(dp.proxy_addr, spoof).0, 200);
    let seen = log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{seen:?}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{seen:?}");
    dp.shutdown();

    let dir = temp_dir("xff-trusted");
    let dp = start(&dir, up, "http: {trustedProxies: [127.0.0.0/8]}\n");
    assert_eq!(raw(dp.proxy_addr, spoof).0, 200);
    let seen = log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("10.9.9.9, 127.0.0.1"),
        "{seen:?}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{seen:?}");
    dp.shutdown();
}

#[test]
fn the_request_head_is_cleaned_or_refused() {
    let (up, log) = recording_upstream();
    let dir = temp_dir("hygiene");
    let dp = start(&dir, up, "");
    let addr = dp.proxy_addr;
    let calls = || log.lock().unwrap().len();

    // Headers named in Connection are hop-by-hop: not forwarded.
    let (status, _) = raw(
        addr,
        "GET /api/x HTTP/1.1\r\nhost: a.example.com\r\nconnection: close, x-secret\r\nx-secret: s\r\nx-kept: k\r\n\r\n",
    );
    assert_eq!(status, 200);
    let seen = log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.header("x-secret"), None, "{seen:?}");
    assert_eq!(seen.header("x-kept"), Some("k"), "{seen:?}");

    let before = calls();
    let refused: Vec<(&str, String, u16)> = vec![
        ("gzip before chunked", "POST /api/x HTTP/1.1\r\nhost: a.example.com\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n".into(), 501),
        ("missing Host", "GET /api/x HTTP/1.1\r\nconnection: close\r\n\r\n".into(), 400),
        ("HTTP/1.0 without Host", "GET /api/x HTTP/1.0\r\n\r\n".into(), 400),
        ("two Host headers", "GET /api/x HTTP/1.1\r\nhost: other.test\r\nhost: a.example.com\r\nconnection: close\r\n\r\n".into(), 400),
        ("invalid Host", "GET /api/x HTTP/1.1\r\nhost: a example\r\nconnection: close\r\n\r\n".into(), 400),
        ("CONNECT", "CONNECT a.example.com:443 HTTP/1.1\r\nhost: a.example.com:443\r\n\r\n".into(), 405),
    ];
    for (name, request, code) in &refused {
        let (status, head) = raw(addr, request);
        assert_eq!(status, *code, "{name}: {head}");
    }
    // Transfer-Encoding: gzip alone is refused by hyper before the proxy sees it (400).
    let (status, head) = raw(
        addr,
        "POST /api/x HTTP/1.1\r\nhost: a.example.com\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{head}");

    // OPTIONS * is about the proxy itself: answered here, never forwarded as a broken URL.
    let (status, head) = raw(
        addr,
        "OPTIONS * HTTP/1.1\r\nhost: a.example.com\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("allow: get, head, post"), "{head}");
    assert_eq!(
        calls(),
        before,
        "no refused or answered request reached the upstream"
    );
    dp.shutdown();
}

#[test]
fn host_patterns_that_can_never_match_are_refused_at_load() {
    let dir = temp_dir("patterns");
    let base = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nclusters: [{name: echo, builtin: echo}]\n";
    let cases = [
        (
            format!(
                "{base}routes: [{{name: r, cluster: echo, match: {{hosts: [ok.test, \"api.example.com:8080\"]}}}}]\n"
            ),
            "routes[0].match.hosts[1]",
        ),
        (
            format!(
                "{base}routes: [{{name: r, cluster: echo}}]\nfilters: [{{name: f, native: header_rewrite, match: {{hosts: [\"a*b.example.com\"]}}}}]\n"
            ),
            "filters[0].match.hosts[0]",
        ),
        (
            format!(
                "{base}routes: [{{name: r, cluster: echo, match: {{pathPrefixes: [/a/../b]}}}}]\n"
            ),
            "routes[0].match.pathPrefixes[0]",
        ),
        (
            format!(
                "{base}http: {{trustedProxies: [10.0.0.0/33]}}\nroutes: [{{name: r, cluster: echo}}]\n"
            ),
            "http.trustedProxies",
        ),
        (
            format!(
                "{base}http: {{pathWithEscapedSlashesAction: Sometimes}}\nroutes: [{{name: r, cluster: echo}}]\n"
            ),
            "unknown variant `Sometimes`",
        ),
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
    }
}
