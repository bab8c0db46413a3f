//! HTTP/2 conformance: h2spec (every one of its 145 cases) against the dataplane's h2c
//! listeners (HTTP/1.1 and h2c on one port, and `http2Only`) and its TLS listener (HTTP/2 by
//! ALPN), through the filter chain to the built-in echo upstream.
//!
//! h2spec is built from the Go module pinned in `e2e/h2spec/go.mod` by `e2e/h2spec/build.sh`
//! (cached under `$WASMFILTER_CACHE/e2e/h2spec-<version>/`); `WASMFILTER_H2SPEC_BIN` names
//! another binary (`cargo xtask ci` builds it first and sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wasmfilter_dataplane::Dataplane;

/// Cases a listener cannot pass, with the reason (docs/operations.md, "HTTP/2 conformance").
/// Keyed by listener, then `package/case title` as h2spec's JUnit report names them.
const KNOWN_EXCEPTIONS: &[(&str, &str, &str)] = &[(
    "h2c",
    "http2/3.5: Sends invalid connection preface",
    "a cleartext listener serves HTTP/1.1 and h2c on one port, told apart by the HTTP/2 \
     preface: bytes that are not the preface are an HTTP/1.1 request, which hyper answers \
     with 400 before closing, and h2spec reads that 400 as a frame. On TLS, ALPN decides and \
     the case passes.",
)];

fn h2spec() -> PathBuf {
    if let Some(bin) = std::env::var_os("WASMFILTER_H2SPEC_BIN") {
        return bin.into();
    }
    let script = wasmfilter_testkit::repo_root().join("e2e/h2spec/build.sh");
    let out = Command::new("sh")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("sh e2e/h2spec/build.sh");
    assert!(
        out.status.success(),
        "{} failed: it needs Go on PATH and the Go module proxy",
        script.display()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
}

/// Every case of the JUnit report: (`package: title`, failure text if it failed or was
/// skipped).
fn cases(report: &str) -> Vec<(String, Option<String>)> {
    report
        .split("<testcase ")
        .skip(1)
        .map(|case| {
            let attr = |name: &str| {
                let start = case.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                case[start..][..case[start..].find('"').unwrap()].to_string()
            };
            let body = &case[..case.find("</testcase>").unwrap_or(case.len())];
            let failed = ["<error", "<failure", "<skipped"]
                .iter()
                .any(|t| body.contains(t))
                .then(|| body.to_string());
            (
                format!("{}: {}", attr("package"), attr("classname")),
                failed,
            )
        })
        .collect()
}

fn run(bin: &Path, dir: &Path, listener: &str, port: u16, tls: bool) {
    let report = dir.join(format!("{listener}.xml"));
    let mut cmd = Command::new(bin);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-o", "5", "-j"])
        .arg(&report);
    if tls {
        cmd.args(["-t", "-k"]);
    }
    let out = cmd.output().expect("h2spec runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let all = cases(&text);
    let failed: Vec<_> = all
        .iter()
        .filter_map(|(name, f)| f.as_ref().map(|f| (name.as_str(), f.as_str())))
        .collect();
    let unexpected: Vec<_> = failed
        .iter()
        .filter(|(name, _)| {
            !KNOWN_EXCEPTIONS
                .iter()
                .any(|(l, case, _)| *l == listener && case == name)
        })
        .collect();
    println!(
        "h2spec on the {listener} listener: {} cases, {} passed, {} known exceptions",
        all.len(),
        all.len() - failed.len(),
        failed.len() - unexpected.len()
    );
    assert_eq!(all.len(), 145, "every h2spec case ran: {stdout}");
    assert!(unexpected.is_empty(), "{listener}: {unexpected:#?}");
    // A known exception that passes is no longer one: the list must be corrected.
    for (l, case, _) in KNOWN_EXCEPTIONS.iter().filter(|(l, ..)| *l == listener) {
        assert!(
            failed.iter().any(|(name, _)| name == case),
            "{l}: {case} passes now; remove it from KNOWN_EXCEPTIONS and docs/operations.md"
        );
    }
}

#[test]
fn h2spec_passes_on_the_h2c_and_tls_listeners() {
    let bin = h2spec();
    let dir = std::env::temp_dir().join(format!("wasmfilter-h2spec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    let filter = wasmfilter_testkit::rust_filter("header_rewrite").expect("filter builds");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\n\
             listeners: [{{address: \"127.0.0.1:0\", tls: {{certFile: cert.pem, keyFile: key.pem}}}}, {{address: \"127.0.0.1:0\", http2Only: true}}]\n\
             routes: [{{name: all, cluster: main}}]\nclusters: [{{name: main, builtin: echo}}]\n\
             filters:\n  - name: tag\n    module: {}\n    config: {{response: {{add: {{x-tag: h2}}}}}}\n",
            filter.display()
        ),
    )
    .unwrap();
    let dp = Dataplane::start(&config).unwrap();
    run(&bin, &dir, "h2c", dp.proxy_addrs[0].port(), false);
    run(&bin, &dir, "tls", dp.proxy_addrs[1].port(), true);
    // A plain listener that speaks only HTTP/2 has no HTTP/1.1 to fall back to: every case.
    run(&bin, &dir, "h2c-only", dp.proxy_addrs[2].port(), false);
    dp.shutdown();
}
