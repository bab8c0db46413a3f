//! Standalone mode with a filter pulled from a real OCI registry (the CNCF distribution
//! registry, built from its Go module by e2e/registry/build.sh).

use std::io::{Read, Write};
use std::net::TcpStream;

use wasmfilter_dataplane::Dataplane;
use wasmfilter_oci::Credentials;
use wasmfilter_oci::oci::{PushOptions, push_wasm};
use wasmfilter_testkit::registry::TestRegistry;

#[test]
fn filters_are_pulled_by_image_reference_and_pinned_by_digest() {
    let registry = TestRegistry::start(None);
    let module = wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap();
    let reference = registry.reference("filters/hello:v1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pushed = rt
        .block_on(push_wasm(
            &reference,
            module.clone(),
            "header_rewrite.wasm",
            &PushOptions {
                credentials: Credentials::Anonymous,
                insecure: true,
            },
        ))
        .unwrap();
    let digest = pushed.digest.trim_start_matches("sha256:").to_string();

    let dir = std::env::temp_dir().join(format!("wasmfilter-dp-oci-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |pin: &str| {
        let path = dir.join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nworkers: 1\ninsecureRegistries: [\"{host}\"]\nroutes: [{{name: all, cluster: echo}}]\nclusters: [{{name: echo, builtin: echo}}]\nfilters:\n  - name: hello\n    image: {reference}\n    sha256: \"{pin}\"\n    config: {{request: {{add: {{x-from-registry: yes}}}}}}\n",
                host = registry.host()
            ),
        )
        .unwrap();
        path
    };
    let dp = Dataplane::start(&write(&digest)).unwrap();
    let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\"x-from-registry\": \"yes\""), "{out}");
    let dump = {
        let mut s = TcpStream::connect(dp.admin_addr).unwrap();
        s.write_all(b"GET /config_dump HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut d = String::new();
        s.read_to_string(&mut d).unwrap();
        d
    };
    assert!(
        dump.contains(&digest),
        "config_dump shows the pulled module's digest: {dump}"
    );
    dp.shutdown();

    let wrong = "0".repeat(64);
    let err = match Dataplane::start(&write(&wrong)) {
        Ok(_) => panic!("a wrong pin was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("filters[0] (hello)") && err.contains(&wrong) && err.contains(&digest),
        "{err}"
    );
}
