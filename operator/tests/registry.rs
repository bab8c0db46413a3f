//! Resolution against a real registry: the CNCF distribution registry built from its Go
//! module (e2e/registry/build.sh), one process per test on a free loopback port, storage in a temp dir.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use oci_client::client::{Config, ImageLayer};
use wasmfilter_operator::cache::sha256_digest;
use wasmfilter_operator::oci::{self, Layout, PushOptions, push_artifact};
use wasmfilter_operator::{Credentials, ModuleCache, ResolveError, Resolver, ResolverConfig};

use wasmfilter_testkit::registry::TestRegistry as Registry;

/// A resolver that speaks plain HTTP to `reg`, with its own cache directory.
fn resolver(reg: &Registry) -> (Resolver, tempfile::TempDir) {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ModuleCache::open(cache_dir.path()).unwrap());
    let resolver = Resolver::new(
        cache,
        ResolverConfig {
            insecure_registries: vec![reg.host()],
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(10),
            ..Default::default()
        },
    );
    (resolver, cache_dir)
}

fn module() -> Vec<u8> {
    wasmfilter_testkit::rust_filter_bytes("header_rewrite").unwrap()
}

/// Runs `wasmfilter-operator push FILE REF --insecure ARGS…`; returns the manifest digest.
fn cli_push(bytes: &[u8], reference: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("filter.wasm");
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter-operator"))
        .arg("push")
        .arg(&file)
        .arg(reference)
        .arg("--insecure")
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "push failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest "))
        .unwrap_or_else(|| panic!("no manifest digest in {stdout:?}"));
    manifest.trim().to_string()
}

fn insecure() -> PushOptions {
    PushOptions {
        insecure: true,
        ..Default::default()
    }
}

fn titled(title: &str) -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(
        oci::TITLE_ANNOTATION.to_string(),
        title.to_string(),
    )]))
}

fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, *data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn cache_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_layout_resolves_to_the_module_bytes() {
    let module = module();
    let digest = sha256_digest(&module);
    let reg = Registry::start(None);
    let (resolver, cache_dir) = resolver(&reg);

    // CNCF Wasm artifact, with the push command.
    let cncf = reg.reference("filters/cncf:v1");
    let cncf_manifest = cli_push(&module, &cncf, &[]);

    // wasm-to-oci.
    let w2o = reg.reference("filters/wasm-to-oci:v1");
    push_artifact(
        &w2o,
        vec![ImageLayer::new(
            module.clone(),
            oci::WASM_TO_OCI_LAYER.into(),
            None,
        )],
        Config::new(
            b"{}".to_vec(),
            "application/vnd.wasm.config.v1+json".into(),
            None,
        ),
        None,
        &insecure(),
    )
    .await
    .unwrap();

    // Solo's oci variant: runtime-config.json and filter.wasm, both of the same type.
    let solo = reg.reference("filters/solo-oci:v1");
    push_artifact(
        &solo,
        vec![
            ImageLayer::new(
                br#"{"type":"envoy_proxy","abiVersions":["v0-4689a30309abf31aee9ae36e73d34b1bb182685f"],"config":{"rootIds":["x"]}}"#.to_vec(),
                oci::SOLO_OCI_LAYER.into(),
                titled("runtime-config.json"),
            ),
            ImageLayer::new(module.clone(), oci::SOLO_OCI_LAYER.into(), titled("filter.wasm")),
        ],
        Config::new(
            br#"{"type":"envoy_proxy"}"#.to_vec(),
            "application/vnd.module.wasm.config.v1+json".into(),
            None,
        ),
        None,
        &insecure(),
    )
    .await
    .unwrap();

    // `oras push ref filter.wasm` defaults: empty config, one .tar-typed raw layer.
    let oras = reg.reference("filters/oras:v1");
    push_artifact(
        &oras,
        vec![ImageLayer::new(
            module.clone(),
            "application/vnd.oci.image.layer.v1.tar".into(),
            titled("filter.wasm"),
        )],
        Config::new(
            b"{}".to_vec(),
            "application/vnd.oci.empty.v1+json".into(),
            None,
        ),
        None,
        &insecure(),
    )
    .await
    .unwrap();

    // Solo's compat image: FROM scratch + COPY plugin.wasm.
    let compat = reg.reference("filters/compat:v1");
    let layer = tar_gz(&[("plugin.wasm", &module)]);
    let diff_id = {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&layer[..])
            .read_to_end(&mut raw)
            .unwrap();
        sha256_digest(&raw)
    };
    let image_config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    push_artifact(
        &compat,
        vec![ImageLayer::oci_v1_gzip(layer.clone(), None)],
        Config::oci_v1(image_config.to_string().into_bytes(), None),
        Some(BTreeMap::from([(
            "module.wasm.image/variant".to_string(),
            "compat".to_string(),
        )])),
        &insecure(),
    )
    .await
    .unwrap();

    for (reference, layout) in [
        (&cncf, Layout::CncfWasm),
        (&w2o, Layout::WasmToOci),
        (&solo, Layout::SoloOci),
        (&oras, Layout::SingleLayer),
        (&compat, Layout::SoloCompat),
    ] {
        let r = resolver
            .resolve(reference, Some(&digest), &Credentials::Anonymous)
            .await
            .unwrap_or_else(|e| panic!("{reference}: {e}"));
        assert_eq!(r.layout, layout, "{reference}");
        assert_eq!(r.digest, digest, "{reference}");
        assert!(r.bytes == module, "{reference}: wrong bytes");
        assert!(r.manifest_digest.starts_with("sha256:"), "{reference}");
        if layout == Layout::SoloCompat {
            assert_eq!(r.layer_digest, sha256_digest(&layer));
        } else {
            assert_eq!(r.layer_digest, digest, "{reference}");
        }
    }

    // The CNCF artifact: manifest digest as the push printed it, and by digest reference.
    let r = resolver
        .resolve(&cncf, None, &Credentials::Anonymous)
        .await
        .unwrap();
    assert_eq!(r.manifest_digest, cncf_manifest);
    let by_digest = format!("{}/filters/cncf@{cncf_manifest}", reg.host());
    let r = resolver
        .resolve(&by_digest, None, &Credentials::Anonymous)
        .await
        .unwrap();
    assert_eq!(r.digest, digest);
    assert_eq!(r.manifest_digest, cncf_manifest);
    // All five layouts carry the same module: one cache entry.
    assert_eq!(
        cache_files(cache_dir.path()),
        vec![format!("{}.wasm", &digest["sha256:".len()..])]
    );

    // Once cached, a layer is not downloaded again: with the blobs deleted from the registry
    // (manifests still there), raw and tar+gzip layouts still resolve, from the cache.
    for (repo, blob) in [
        ("filters/cncf", digest.clone()),
        ("filters/compat", sha256_digest(&layer)),
    ] {
        let path = format!("/v2/{repo}/blobs/{blob}");
        assert_eq!(reg.status("DELETE", &path), 202, "DELETE {path}");
        assert_eq!(reg.status("GET", &path), 404, "GET {path} after DELETE");
    }
    for reference in [&cncf, &compat] {
        let r = resolver
            .resolve(reference, None, &Credentials::Anonymous)
            .await
            .unwrap_or_else(|e| panic!("{reference} from the cache: {e}"));
        assert_eq!(r.digest, digest);
    }

    // Something else: an image with two gzip layers. The error names what was found.
    let other = reg.reference("filters/other:v1");
    push_artifact(
        &other,
        vec![
            ImageLayer::oci_v1_gzip(tar_gz(&[("a", b"a")]), None),
            ImageLayer::oci_v1_gzip(tar_gz(&[("b", b"b")]), None),
        ],
        Config::oci_v1(b"{}".to_vec(), None),
        None,
        &insecure(),
    )
    .await
    .unwrap();
    let e = resolver
        .resolve(&other, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::UnsupportedLayout { .. }), "{e}");
    let msg = e.to_string();
    eprintln!("other layout: {msg}");
    assert!(
        msg.contains("application/vnd.oci.image.config.v1+json"),
        "{msg}"
    );
    assert!(
        msg.contains("2 layer(s) [application/vnd.oci.image.layer.v1.tar+gzip, application/vnd.oci.image.layer.v1.tar+gzip]"),
        "{msg}"
    );

    // A single raw layer that is not wasm is not taken for a module.
    let text = reg.reference("filters/text:v1");
    push_artifact(
        &text,
        vec![ImageLayer::new(
            b"hello".to_vec(),
            "application/vnd.oci.image.layer.v1.tar".into(),
            None,
        )],
        Config::new(
            b"{}".to_vec(),
            "application/vnd.oci.empty.v1+json".into(),
            None,
        ),
        None,
        &insecure(),
    )
    .await
    .unwrap();
    let e = resolver
        .resolve(&text, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a wasm module"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_resolves_to_the_new_digest() {
    let first = module();
    let second = wasmfilter_testkit::rust_filter_bytes("local_reply").unwrap();
    assert_ne!(first, second);
    let reg = Registry::start(None);
    let (resolver, cache_dir) = resolver(&reg);
    let reference = reg.reference("filters/moving:latest");

    let m1 = cli_push(&first, &reference, &[]);
    let r1 = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap();
    assert_eq!(r1.digest, sha256_digest(&first));
    assert_eq!(r1.manifest_digest, m1);

    // Concurrent resolves of the same reference agree (and share one download).
    let shared = Arc::new(resolver);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let r = shared.clone();
            let reference = reference.clone();
            tokio::spawn(async move {
                r.resolve(&reference, None, &Credentials::Anonymous)
                    .await
                    .map(|m| m.digest)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), sha256_digest(&first));
    }
    let resolver = shared;

    let m2 = cli_push(&second, &reference, &[]);
    assert_ne!(m1, m2);
    let r2 = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap();
    assert_eq!(r2.digest, sha256_digest(&second));
    assert_eq!(r2.manifest_digest, m2);
    assert!(r2.bytes == second);
    assert_eq!(cache_files(cache_dir.path()).len(), 2);

    // Pinned to the old module, which is cached: the pin does not pick the cached module, the
    // reference decides, so this is a mismatch naming both.
    let old = sha256_digest(&first);
    let e = resolver
        .resolve(&reference, Some(&old), &Credentials::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&old), "{e}");
    assert!(e.to_string().contains(&sha256_digest(&second)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_names_both_digests_and_caches_nothing() {
    let module = module();
    let reg = Registry::start(None);
    let (resolver, cache_dir) = resolver(&reg);
    let reference = reg.reference("filters/pinned:v1");
    cli_push(&module, &reference, &[]);

    let wrong = sha256_digest(b"some other module");
    let e = resolver
        .resolve(&reference, Some(&wrong), &Credentials::Anonymous)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("wrong pin: {msg}");
    assert!(matches!(e, ResolveError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(&wrong), "{msg}");
    assert!(msg.contains(&sha256_digest(&module)), "{msg}");
    assert!(cache_files(cache_dir.path()).is_empty());

    // The right pin, bare hex, is accepted.
    let right = sha256_digest(&module);
    let r = resolver
        .resolve(
            &reference,
            Some(&right["sha256:".len()..]),
            &Credentials::Anonymous,
        )
        .await
        .unwrap();
    assert_eq!(r.digest, right);
    assert_eq!(cache_files(cache_dir.path()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_is_not_proxy_wasm_is_rejected() {
    let plain = wat::parse_str("(module)").unwrap();
    let reg = Registry::start(None);
    let (resolver, cache_dir) = resolver(&reg);
    let reference = reg.reference("filters/plain:v1");

    // The push command checks too, unless told not to.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain.wasm");
    std::fs::write(&file, &plain).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter-operator"))
        .args(["push", file.to_str().unwrap(), &reference, "--insecure"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a proxy-wasm module"), "{stderr}");
    cli_push(&plain, &reference, &["--no-check"]);

    let e = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    eprintln!("plain module: {e}");
    assert!(matches!(e, ResolveError::ModuleCheck(_)), "{e}");
    assert!(e.to_string().contains("not a proxy-wasm module"), "{e}");
    assert!(cache_files(cache_dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_fails_then_recovers() {
    let module = module();
    let mut reg = Registry::start(None);
    let (resolver, _cache_dir) = resolver(&reg);
    let reference = reg.reference("filters/outage:v1");
    cli_push(&module, &reference, &[]);

    reg.stop();
    let e = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    eprintln!("registry down: {e}");
    assert!(matches!(e, ResolveError::Connection { .. }), "{e}");
    assert!(e.is_transient());
    assert!(e.to_string().contains(&reg.host()), "{e}");

    reg.restart();
    let r = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap();
    assert_eq!(r.digest, sha256_digest(&module));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_needs_valid_credentials() {
    let module = module();
    let reg = Registry::start(Some(("alice", "s3cret")));
    let (resolver, cache_dir) = resolver(&reg);
    let reference = reg.reference("private/filter:v1");
    cli_push(
        &module,
        &reference,
        &["--username", "alice", "--password", "s3cret"],
    );

    let e = resolver
        .resolve(&reference, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    eprintln!("anonymous: {e}");
    assert!(matches!(e, ResolveError::Unauthorized { .. }), "{e}");
    let e = resolver
        .resolve(&reference, None, &Credentials::basic("alice", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::Unauthorized { .. }), "{e}");
    assert!(cache_files(cache_dir.path()).is_empty());

    // Credentials as the controller will get them: from a dockerconfigjson Secret.
    let secret = format!(
        r#"{{"auths":{{"{}":{{"username":"alice","password":"s3cret"}}}}}}"#,
        reg.host()
    );
    let creds =
        wasmfilter_operator::credentials_from_dockerconfigjson(secret.as_bytes(), &reg.host())
            .unwrap()
            .unwrap();
    let r = resolver.resolve(&reference, None, &creds).await.unwrap();
    assert_eq!(r.digest, sha256_digest(&module));
    assert!(r.bytes == module);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_over_the_size_limit_are_refused() {
    let module = module();
    let reg = Registry::start(None);
    let cache_dir = tempfile::tempdir().unwrap();
    let limit = 16 * 1024;
    assert!(module.len() > limit);
    let resolver = Resolver::new(
        Arc::new(ModuleCache::open(cache_dir.path()).unwrap()),
        ResolverConfig {
            max_module_bytes: limit as u64,
            insecure_registries: vec![reg.host()],
            ..Default::default()
        },
    );

    // A layer over the limit.
    let big = reg.reference("filters/big:v1");
    cli_push(&module, &big, &[]);
    let e = resolver
        .resolve(&big, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    eprintln!("big layer: {e}");
    assert!(matches!(e, ResolveError::TooLarge { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("{limit}-byte limit")),
        "{e}"
    );

    // A small gzip layer that inflates past the limit: the cap holds while decompressing.
    let mut bomb = b"\0asm\x01\0\0\0".to_vec();
    bomb.resize(1 << 20, 0);
    let layer = tar_gz(&[("plugin.wasm", &bomb)]);
    assert!(layer.len() < limit);
    let compat = reg.reference("filters/inflating:v1");
    push_artifact(
        &compat,
        vec![ImageLayer::oci_v1_gzip(layer, None)],
        Config::oci_v1(b"{}".to_vec(), None),
        None,
        &insecure(),
    )
    .await
    .unwrap();
    let e = resolver
        .resolve(&compat, None, &Credentials::Anonymous)
        .await
        .unwrap_err();
    eprintln!("inflating layer: {e}");
    assert!(matches!(e, ResolveError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("plugin.wasm"), "{e}");
    assert!(e.to_string().contains("once decompressed"), "{e}");
    assert!(cache_files(cache_dir.path()).is_empty());
}
