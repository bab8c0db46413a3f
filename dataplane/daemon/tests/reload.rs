//! Operating a running dataplane (issue #14): reloads that apply or are refused loudly,
//! certificates rotated on disk, `--check`, and an operator link that a silent peer cannot
//! hang. Real clients over loopback, the real binary where its exit code or log is the point.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use wasmfilter_dataplane::Dataplane;

const BIN: &str = env!("CARGO_BIN_EXE_wasmfilter-dataplane");

fn filter(name: &str) -> PathBuf {
    wasmfilter_testkit::rust_filter(name).expect("filter builds")
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-rl-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration whose one route goes to the built-in echo upstream through header_rewrite,
/// which adds `x-tag: TAG` to every response.
fn config(head: &str, tag: &str) -> String {
    format!(
        "{head}routes: [{{name: all, cluster: main}}]\nclusters: [{{name: main, builtin: echo}}]\n\
         filters:\n  - name: tag\n    module: {}\n    config: {{response: {{add: {{x-tag: {tag}}}}}}}\n",
        filter("header_rewrite").display()
    )
}

/// One HTTP/1.1 GET; the whole response as text.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one sample on the admin listener's /metrics (0 when absent).
fn metric(dp: &Dataplane, sample: &str) -> f64 {
    let text = get(dp.admin_addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (bounded) until `done` holds; panics with `what` otherwise.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn restart_only_changes_are_refused_loudly_and_the_old_configuration_keeps_serving() {
    let dir = temp_dir("refuse");
    let path = dir.join("config.yaml");
    let head = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 2\n";
    std::fs::write(&path, config(head, "one")).unwrap();
    let dp = Dataplane::start(&path).unwrap();
    assert!(get(dp.proxy_addr, "/").contains("x-tag: one"));
    // A free port, so that only the refusal can keep the dataplane off it.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cases = [
        (
            format!("listen: {free}\nadmin: 127.0.0.1:0\nworkers: 2\n"),
            format!("listen: 127.0.0.1:0 -> {free}"),
        ),
        (
            format!("{head}listeners: [{{address: \"{free}\"}}]\n"),
            "listen/listeners: [\"127.0.0.1:0\"] -> [\"127.0.0.1:0\", ".to_string(),
        ),
        (
            format!("listen: 127.0.0.1:0\nadmin: {free}\nworkers: 2\n"),
            format!("admin: 127.0.0.1:0 -> {free}"),
        ),
        (
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 3\n".to_string(),
            "workers: 2 -> 3".to_string(),
        ),
    ];
    for (i, (changed, field)) in cases.iter().enumerate() {
        // The filter's tag changes too: a refused reload applies nothing of the file.
        std::fs::write(&path, config(changed, "two")).unwrap();
        let err = format!(
            "{:#}",
            dp.reload().expect_err("a restart-only change is refused")
        );
        assert!(err.contains(field.as_str()), "case {i}: {err}");
        assert!(err.contains("only a restart applies"), "{err}");
        assert!(err.contains("nothing was reloaded"), "{err}");
        let answer = get(dp.proxy_addr, "/");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("x-tag: one"),
            "the old chain stays: {answer}"
        );
        assert!(
            TcpStream::connect(free).is_err(),
            "nothing listens on {free}"
        );
        assert_eq!(
            metric(&dp, "wasmfilter_reloads_total{result=\"restart_required\"}"),
            (i + 1) as f64
        );
    }
    // What a reload does apply still applies after the refusals.
    std::fs::write(&path, config(head, "three")).unwrap();
    let summary = dp.reload().expect("the filter change applies");
    assert!(summary.contains("configuration reloaded"), "{summary}");
    assert!(get(dp.proxy_addr, "/").contains("x-tag: three"));
    assert_eq!(
        metric(&dp, "wasmfilter_reloads_total{result=\"applied\"}"),
        1.0
    );
    // A file that does not load is counted apart.
    std::fs::write(&path, "listen: [").unwrap();
    dp.reload().expect_err("invalid YAML");
    assert_eq!(
        metric(&dp, "wasmfilter_reloads_total{result=\"invalid\"}"),
        1.0
    );
    assert!(get(dp.proxy_addr, "/").contains("x-tag: three"));
    dp.shutdown();
}

/// A self-signed certificate for `localhost` with this subject common name and serial.
fn certificate(common_name: &str, serial: u64) -> (CertificateDer<'static>, String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), cert.pem(), key.serialize_pem())
}

/// Writes `bytes` to `path` the way a careful writer does: a new file renamed into place.
fn replace(path: &Path, bytes: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Handshakes with `addr` trusting `roots`, sends one GET, and returns the certificate the
/// server presented and the response.
fn fetch_tls(addr: SocketAddr, roots: &[CertificateDer<'static>]) -> (Vec<u8>, String) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /tls HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    // A TLS peer may close without close_notify after `connection: close`.
    let _ = tls.read_to_end(&mut out);
    let served = tls.conn.peer_certificates().unwrap()[0].to_vec();
    (served, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn certificates_rotated_on_disk_serve_without_a_restart_and_a_broken_pair_keeps_the_old() {
    let dir = temp_dir("rotate");
    // As a Secret volume lays them out: cert.pem -> data/tls.crt, data -> a versioned dir.
    let install = |version: &str, cert: &str, key: &str| {
        let versioned = dir.join(version);
        std::fs::create_dir_all(&versioned).unwrap();
        std::fs::write(versioned.join("tls.crt"), cert).unwrap();
        std::fs::write(versioned.join("tls.key"), key).unwrap();
        let link = dir.join("data.tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(version, &link).unwrap();
        std::fs::rename(&link, dir.join("data")).unwrap();
    };
    let (one, one_cert, one_key) = certificate("rotation-one", 1);
    let (two, two_cert, two_key) = certificate("rotation-two", 2);
    let (three, three_cert, three_key) = certificate("rotation-three", 3);
    let roots = [one.clone(), two.clone(), three.clone()];
    install("v1", &one_cert, &one_key);
    std::os::unix::fs::symlink("data/tls.crt", dir.join("cert.pem")).unwrap();
    std::os::unix::fs::symlink("data/tls.key", dir.join("key.pem")).unwrap();
    let path = dir.join("config.yaml");
    let head = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\ntls: {certFile: cert.pem, keyFile: key.pem}\n";
    std::fs::write(&path, config(head, "tls")).unwrap();
    let dp = Dataplane::start(&path).unwrap();
    let (served, answer) = fetch_tls(dp.proxy_addr, &roots);
    assert_eq!(served, one.to_vec(), "rotation-one serves first");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("x-tag: tls"),
        "{answer}"
    );

    // cert-manager's way: a new versioned directory, the `data` symlink swapped to it.
    install("v2", &two_cert, &two_key);
    wait_until(
        "the swapped-in certificate serves",
        Duration::from_secs(20),
        || fetch_tls(dp.proxy_addr, &roots).0 == two.to_vec(),
    );
    let ok = metric(
        &dp,
        "wasmfilter_tls_certificate_reloads_total{result=\"ok\"}",
    );
    assert!(ok >= 1.0, "counted: {ok}");

    // A broken pair (the key does not match): refused, counted, the old pair keeps serving.
    replace(&dir.join("v2/tls.key"), &three_key);
    wait_until(
        "the broken pair is refused",
        Duration::from_secs(20),
        || {
            metric(
                &dp,
                "wasmfilter_tls_certificate_reloads_total{result=\"error\"}",
            ) >= 1.0
        },
    );
    let (served, answer) = fetch_tls(dp.proxy_addr, &roots);
    assert_eq!(served, two.to_vec(), "rotation-two still serves");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A reload with the broken pair is refused whole, naming the field.
    let err = format!(
        "{:#}",
        dp.reload().expect_err("a broken pair refuses the reload")
    );
    assert!(
        err.contains("tls.keyFile") && err.contains("do not form a usable pair"),
        "{err}"
    );
    assert_eq!(fetch_tls(dp.proxy_addr, &roots).0, two.to_vec());

    // The file rewritten in place, completing the pair: rotation-three serves.
    replace(&dir.join("v2/tls.crt"), &three_cert);
    wait_until(
        "the rewritten certificate serves",
        Duration::from_secs(20),
        || fetch_tls(dp.proxy_addr, &roots).0 == three.to_vec(),
    );
    // New paths in the configuration apply on reload.
    std::fs::write(dir.join("one.crt"), &one_cert).unwrap();
    std::fs::write(dir.join("one.key"), &one_key).unwrap();
    let head = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\ntls: {certFile: one.crt, keyFile: one.key}\n";
    std::fs::write(&path, config(head, "tls")).unwrap();
    let summary = dp.reload().unwrap();
    assert!(summary.contains("1 TLS certificates re-read"), "{summary}");
    assert_eq!(fetch_tls(dp.proxy_addr, &roots).0, one.to_vec());
    dp.shutdown();
}

#[test]
fn check_validates_without_binding_or_contacting_the_operator() {
    let dir = temp_dir("check");
    // The test holds the ports the configuration names: a check that bound them would fail.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let operator = TcpListener::bind("127.0.0.1:0").unwrap();
    operator.set_nonblocking(true).unwrap();
    let (cert, cert_pem, key_pem) = certificate("check", 7);
    let _ = cert;
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    let head = format!(
        "listen: {}\nadmin: {}\ntls: {{certFile: cert.pem, keyFile: key.pem}}\n\
         operator: {{address: \"http://{}\", insecure: true, stateDir: state}}\n",
        proxy.local_addr().unwrap(),
        admin.local_addr().unwrap(),
        operator.local_addr().unwrap()
    );
    let good = dir.join("good.yaml");
    std::fs::write(&good, config(&head, "checked")).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    assert!(
        stdout.contains("configuration OK: 1 listeners, 1 routes, 1 clusters, 1 filters started"),
        "{stdout}"
    );
    assert!(
        operator
            .accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the operator was not contacted"
    );
    assert!(
        !dir.join("state").exists(),
        "no state directory was created"
    );

    // Each bad configuration: a non-zero exit, the field named on stderr.
    let base = format!(
        "listen: {}\nadmin: 127.0.0.1:0\n",
        proxy.local_addr().unwrap()
    );
    let cases = [
        (
            format!(
                "{base}routes: [{{name: r, cluster: c}}]\nclusters: [{{name: c, builtin: echo}}]\n\
                 filters: [{{name: f, module: {}, config: {{\"request\": 5}}}}]\n",
                filter("header_rewrite").display()
            ),
            "filters[0] (f)",
        ),
        (
            format!(
                "{base}routes: [{{name: r, cluster: missing}}]\nclusters: [{{name: c, builtin: echo}}]\n"
            ),
            "routes[0].cluster",
        ),
        (
            config(
                &format!("{base}tls: {{certFile: key.pem, keyFile: key.pem}}\n"),
                "x",
            ),
            "tls.certFile",
        ),
        (
            config(
                &format!("{base}operator: {{address: \"https://op erator:7070\", stateDir: s}}\n"),
                "x",
            ),
            "operator.address",
        ),
    ];
    for (i, (yaml, field)) in cases.iter().enumerate() {
        let bad = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&bad, yaml).unwrap();
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&bad)
            .arg("--check")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(stderr.contains(field), "case {i}: {field} in {stderr}");
        assert!(
            out.stdout.is_empty(),
            "case {i}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn an_invalid_operator_address_is_refused_at_load_with_the_field_named() {
    let dir = temp_dir("opuri");
    let base = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, builtin: echo}]\n";
    for (address, expected) in [
        ("https://op erator:7070", "is not a valid URI"),
        ("https://:7070", "has no host"),
        ("https://user@operator:7070", "user information"),
        ("https://operator:7070/control?x=1", "has a path or query"),
        ("https://operator:0", "port 0"),
    ] {
        let path = dir.join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "{base}operator: {{address: \"{address}\", stateDir: s, tls: {{caFile: a, certFile: b, keyFile: c}}}}\n"
            ),
        )
        .unwrap();
        let err = match Dataplane::start(&path) {
            Ok(_) => panic!("{address} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("operator.address"), "{address}: {err}");
        assert!(err.contains(expected), "{address}: {expected} in {err}");
    }
}

/// A peer that accepts connections and never sends a byte; counts the connections.
fn silent_peer() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    (addr, held)
}

#[test]
fn a_silent_operator_does_not_hang_the_link() {
    let dir = temp_dir("silent");
    let (cert, cert_pem, key_pem) = certificate("client", 9);
    let _ = cert;
    std::fs::write(dir.join("tls.crt"), &cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &key_pem).unwrap();
    // https: the TLS handshake never completes; http: HTTP/2 never answers.
    for scheme in ["https", "http"] {
        let (peer, held) = silent_peer();
        let link = match scheme {
            "https" => format!(
                "{{address: \"https://{peer}\", stateDir: state-{scheme}, handshakeTimeout: 500ms, \
                 tls: {{caFile: tls.crt, certFile: tls.crt, keyFile: tls.key}}}}"
            ),
            _ => format!(
                "{{address: \"http://{peer}\", insecure: true, stateDir: state-{scheme}, handshakeTimeout: 500ms}}"
            ),
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let path = dir.join(format!("{scheme}.yaml"));
        std::fs::write(
            &path,
            config(
                &format!("listen: {port}\nadmin: 127.0.0.1:0\noperator: {link}\n"),
                scheme,
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        wait_until("the proxy answers", Duration::from_secs(60), || {
            TcpStream::connect(port).is_ok()
        });
        wait_until(
            "a timed-out handshake, logged, and retried",
            Duration::from_secs(30),
            || {
                held.lock().unwrap().len() >= 2
                    && log
                        .lock()
                        .unwrap()
                        .contains("handshake timed out after 500ms")
            },
        );
        // The proxy serves its file filters all along.
        let answer = get(port, "/");
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains(&format!("x-tag: {scheme}")),
            "{answer}"
        );
        let log = log.lock().unwrap();
        assert!(
            log.contains("operator unreachable; serving the current chain, retrying"),
            "{log}"
        );
    }
}
