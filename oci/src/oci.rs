//! Resolving a module reference (`registry/repo:tag` or `registry/repo@sha256:…`) to module
//! bytes, and publishing a module as a CNCF Wasm OCI artifact.
//!
//! Accepted layouts (design doc, control-plane-anchors §4):
//!
//! | layout | recognised by |
//! |---|---|
//! | CNCF Wasm artifact | config `application/vnd.wasm.config.v0+json`, one `application/wasm` layer |
//! | wasm-to-oci | one `application/vnd.wasm.content.layer.v1+wasm` layer |
//! | Solo oci variant | one `application/vnd.module.wasm.content.layer.v1+wasm` layer |
//! | plain `application/wasm` layer | one such layer, whatever the config |
//! | Solo compat image | one tar+gzip layer holding `plugin.wasm` |
//! | single-layer `oras push` | one layer of any other type whose blob starts with `\0asm` |
//!
//! Anything else fails with an error listing the media types found.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};

use crate::auth::Credentials;
use crate::cache::{CacheError, ModuleCache, digest_hex, sha256_digest};

pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER: &str = "application/wasm";
pub const WASM_TO_OCI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
pub const SOLO_OCI_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const OCI_TAR_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// Default cap on a module (and on the blob that carries it).
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 64 << 20;

/// Which accepted layout a manifest was recognised as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    CncfWasm,
    WasmToOci,
    SoloOci,
    WasmLayer,
    SoloCompat,
    SingleLayer,
}

impl Layout {
    /// Whether the layer blob is the module itself (its digest is the module digest).
    fn raw(self) -> bool {
        !matches!(self, Layout::SoloCompat)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid module reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid sha256 pin {0:?}: expected 64 hex digits, optionally prefixed with sha256:")]
    InvalidPin(String),
    #[error("cannot reach registry {registry}: {detail}")]
    Connection { registry: String, detail: String },
    #[error("authentication to registry {registry} failed: {detail}")]
    Unauthorized { registry: String, detail: String },
    #[error("{reference} not found: {detail}")]
    NotFound { reference: String, detail: String },
    #[error("registry error for {reference}: {detail}")]
    Registry { reference: String, detail: String },
    #[error("unsupported OCI layout for {reference}: {found}")]
    UnsupportedLayout { reference: String, found: String },
    #[error("{what} is larger than the {limit}-byte limit ({found})")]
    TooLarge {
        what: String,
        /// What is known of its size: "N bytes", or "more than N bytes" when reading stopped.
        found: String,
        limit: u64,
    },
    #[error("sha256 mismatch: expected {expected}, the module is {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("module check failed: {0}")]
    ModuleCheck(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl ResolveError {
    /// Whether retrying later may help (the registry was unreachable or answered 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(self, ResolveError::Connection { .. })
    }
}

/// What a reference resolved to.
#[derive(Clone, Debug)]
pub struct ResolvedModule {
    /// `sha256:<hex>` of the module bytes (what a `sha256` pin is compared with).
    pub digest: String,
    /// `sha256:<hex>` of the manifest the reference resolved to.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the layer the module came from (equal to `digest` unless the layer
    /// is a tar+gzip image layer).
    pub layer_digest: String,
    pub layout: Layout,
    pub bytes: Bytes,
    /// The reference as given.
    pub resolved_from: String,
}

#[derive(Clone, Debug)]
pub struct ResolverConfig {
    /// Largest module (and layer blob) accepted, enforced while downloading.
    pub max_module_bytes: u64,
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Installs ring as the process-wide rustls provider (oci-client is built without one).
fn install_crypto_provider() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Fails only if another provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn new_client(protocol: ClientProtocol, cfg: Option<&ResolverConfig>) -> Client {
    install_crypto_provider();
    Client::new(ClientConfig {
        protocol,
        connect_timeout: cfg.map(|c| c.connect_timeout),
        read_timeout: cfg.map(|c| c.read_timeout),
        ..Default::default()
    })
}

/// The process-wide host the module check compiles with (pooling off: it only compiles).
fn check_host() -> Result<Arc<wasmfilter_host::Host>, String> {
    static HOST: OnceLock<Result<Arc<wasmfilter_host::Host>, String>> = OnceLock::new();
    HOST.get_or_init(|| {
        wasmfilter_host::Host::new(wasmfilter_host::HostConfig {
            pooling: false,
            ..Default::default()
        })
        .map_err(|e| format!("cannot start the wasm engine: {e:#}"))
    })
    .clone()
}

/// Checks that `bytes` is a proxy-wasm module this host can run: wasm magic, then
/// [`wasmfilter_host::Host::load`] (compiles it and checks the ABI marker, allocator, memory,
/// export signatures and imports). Blocking: call it off the async runtime's threads.
pub fn check_module(bytes: &[u8]) -> Result<(), ResolveError> {
    if !bytes.starts_with(b"\0asm") {
        let head: Vec<u8> = bytes.iter().take(4).copied().collect();
        return Err(ResolveError::ModuleCheck(format!(
            "not a WebAssembly module: it starts with {head:02x?}, expected the magic bytes 00 61 73 6d"
        )));
    }
    let host = check_host().map_err(ResolveError::ModuleCheck)?;
    host.load(bytes)
        .map(|_| ())
        .map_err(|e| ResolveError::ModuleCheck(e.to_string()))
}

/// Normalises a sha256 pin to `sha256:<hex>`.
pub fn normalize_pin(pin: &str) -> Result<String, ResolveError> {
    digest_hex(pin)
        .map(|h| format!("sha256:{h}"))
        .ok_or_else(|| ResolveError::InvalidPin(pin.to_string()))
}

fn parse_reference(reference: &str) -> Result<Reference, ResolveError> {
    reference
        .parse::<Reference>()
        .map_err(|e| ResolveError::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// Maps an oci-client error to what went wrong, as the user sees it.
fn classify(err: OciDistributionError, reference: &Reference) -> ResolveError {
    let registry = reference.registry().to_string();
    let detail = error_chain(&err);
    match &err {
        // Connect, timeout, reset, truncated body: all worth retrying later.
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            ResolveError::Connection { registry, detail }
        }
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            ResolveError::Unauthorized { registry, detail }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => ResolveError::NotFound {
            reference: reference.whole(),
            detail,
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ResolveError::Unauthorized { registry, detail }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                ResolveError::NotFound {
                    reference: reference.whole(),
                    detail,
                }
            } else {
                ResolveError::Registry {
                    reference: reference.whole(),
                    detail,
                }
            }
        }
        OciDistributionError::ServerError { code, .. } if *code == 401 || *code == 403 => {
            ResolveError::Unauthorized { registry, detail }
        }
        OciDistributionError::ServerError { code, .. } if *code == 404 => ResolveError::NotFound {
            reference: reference.whole(),
            detail,
        },
        OciDistributionError::ServerError { code, .. } if *code >= 500 => {
            ResolveError::Connection { registry, detail }
        }
        _ => ResolveError::Registry {
            reference: reference.whole(),
            detail,
        },
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

/// Describes a manifest's media types for "unsupported layout" errors.
fn describe(manifest: &OciImageManifest) -> String {
    let layers: Vec<&str> = manifest
        .layers
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    let kind = manifest
        .media_type
        .as_deref()
        .map(|t| format!("manifest {t}, "))
        .unwrap_or_default();
    format!(
        "{kind}config {}, {} layer(s) [{}]; accepted: a CNCF Wasm artifact ({WASM_CONFIG_V0} config, one {WASM_LAYER} layer), one {WASM_TO_OCI_LAYER} or {SOLO_OCI_LAYER} layer, one tar+gzip layer holding plugin.wasm, or one layer that is a wasm module",
        manifest.config.media_type,
        layers.len(),
        layers.join(", ")
    )
}

/// Picks the layer holding the module and the layout, from the manifest alone. The
/// [`Layout::SingleLayer`] guess is confirmed by the wasm magic once the blob is in.
fn choose_layer(
    manifest: &OciImageManifest,
    reference: &Reference,
) -> Result<(Layout, OciDescriptor), ResolveError> {
    let unsupported = |extra: &str| ResolveError::UnsupportedLayout {
        reference: reference.whole(),
        found: format!("{extra}{}", describe(manifest)),
    };
    let of_type = |t: &str| -> Vec<&OciDescriptor> {
        manifest
            .layers
            .iter()
            .filter(|l| l.media_type == t)
            .collect()
    };
    if manifest.config.media_type == WASM_CONFIG_V0 {
        // CNCF v0: layer 0 is the module; consumers should reject more than one layer.
        return match manifest.layers.as_slice() {
            [l] if l.media_type == WASM_LAYER => Ok((Layout::CncfWasm, l.clone())),
            _ => Err(unsupported(
                "a CNCF Wasm artifact must have exactly one application/wasm layer: ",
            )),
        };
    }
    // Solo's oci variant has two layers of its type, told apart by title: runtime-config.json
    // and filter.wasm.
    let solo = of_type(SOLO_OCI_LAYER);
    if solo.len() > 1 {
        let titled: Vec<&&OciDescriptor> = solo
            .iter()
            .filter(|l| {
                l.annotations
                    .as_ref()
                    .and_then(|a| a.get(TITLE_ANNOTATION))
                    .is_some_and(|t| t == "filter.wasm")
            })
            .collect();
        return match titled.as_slice() {
            [l] => Ok((Layout::SoloOci, (**l).clone())),
            _ => Err(unsupported(&format!(
                "several {SOLO_OCI_LAYER} layers and not exactly one titled filter.wasm: "
            ))),
        };
    }
    for (t, layout) in [
        (WASM_TO_OCI_LAYER, Layout::WasmToOci),
        (SOLO_OCI_LAYER, Layout::SoloOci),
        (WASM_LAYER, Layout::WasmLayer),
    ] {
        match of_type(t).as_slice() {
            [] => {}
            [l] => return Ok((layout, (*l).clone())),
            _ => return Err(unsupported(&format!("more than one {t} layer: "))),
        }
    }
    match manifest.layers.as_slice() {
        [l] if l.media_type == OCI_TAR_GZIP_LAYER || l.media_type == DOCKER_TAR_GZIP_LAYER => {
            Ok((Layout::SoloCompat, l.clone()))
        }
        [l] => Ok((Layout::SingleLayer, l.clone())),
        _ => Err(unsupported("")),
    }
}

/// Reads `plugin.wasm` out of a tar+gzip layer, reading at most `limit` bytes of it.
fn extract_plugin_wasm(blob: &[u8], limit: u64) -> Result<Option<Vec<u8>>, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar+gzip layer: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a tar+gzip layer: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("bad tar entry name: {e}"))?
            .into_owned();
        let name = path.to_string_lossy();
        let name = name.trim_start_matches("./").trim_start_matches('/');
        if name != "plugin.wasm" {
            continue;
        }
        let mut out = Vec::new();
        entry
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("reading plugin.wasm: {e}"))?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// Resolves module references against registries, through a [`ModuleCache`].
#[derive(Debug)]
pub struct Resolver {
    cache: Arc<ModuleCache>,
    config: ResolverConfig,
}

impl Resolver {
    pub fn new(cache: Arc<ModuleCache>, config: ResolverConfig) -> Resolver {
        Resolver { cache, config }
    }

    pub fn cache(&self) -> &Arc<ModuleCache> {
        &self.cache
    }

    fn client(&self) -> Client {
        let protocol = if self.config.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(self.config.insecure_registries.clone())
        };
        new_client(protocol, Some(&self.config))
    }

    /// Resolves `reference` (tag or digest) to a checked module: always asks the registry for
    /// the manifest (a tag may have moved), then takes the module from the cache when its
    /// digest is known and cached, else downloads it once (concurrent resolves share the
    /// download), checks the pin and the module, and caches it. Nothing that fails a check
    /// is cached.
    pub async fn resolve(
        &self,
        reference: &str,
        sha256_pin: Option<&str>,
        credentials: &Credentials,
    ) -> Result<ResolvedModule, ResolveError> {
        let pin = sha256_pin.map(normalize_pin).transpose()?;
        let image = parse_reference(reference)?;
        let client = self.client();
        let auth = credentials.to_registry_auth();
        let (manifest, manifest_digest) = client
            .pull_manifest(&image, &auth)
            .await
            .map_err(|e| classify(e, &image))?;
        let manifest = match manifest {
            OciManifest::Image(m) => m,
            OciManifest::ImageIndex(index) => {
                let kinds: Vec<&str> = index
                    .manifests
                    .iter()
                    .map(|m| m.media_type.as_str())
                    .collect();
                return Err(ResolveError::UnsupportedLayout {
                    reference: image.whole(),
                    found: format!(
                        "an image index of {} manifest(s) [{}], expected a single manifest",
                        kinds.len(),
                        kinds.join(", ")
                    ),
                });
            }
        };
        let (layout, layer) = choose_layer(&manifest, &image)?;
        // The module digest, when it can be known before downloading: for raw layouts it is the
        // layer digest (so a wrong pin fails here, without a download); for a tar+gzip layer it
        // is what an earlier extraction of that same layer recorded. Never the pin itself: a
        // cached module matching the pin says nothing about what the reference points to.
        let known = if layout.raw() {
            let module_digest =
                normalize_pin(&layer.digest).map_err(|_| ResolveError::Registry {
                    reference: image.whole(),
                    detail: format!("layer digest {} is not a sha256 digest", layer.digest),
                })?;
            if let Some(expected) = &pin
                && *expected != module_digest
            {
                return Err(ResolveError::DigestMismatch {
                    expected: expected.clone(),
                    actual: module_digest,
                });
            }
            Some(module_digest)
        } else {
            self.cache.layer_alias(&layer.digest)?
        };
        let max = self.config.max_module_bytes;
        let cached = self
            .cache
            .get_or_fetch(&layer.digest, known.as_deref(), || async {
                let blob = self.download(&client, &image, &layer).await?;
                let module = match layout {
                    Layout::SoloCompat => {
                        let limit = max;
                        let extracted =
                            tokio::task::spawn_blocking(move || extract_plugin_wasm(&blob, limit))
                                .await
                                .map_err(|e| ResolveError::ModuleCheck(e.to_string()))?
                                .map_err(|e| ResolveError::UnsupportedLayout {
                                    reference: image.whole(),
                                    found: format!("{e} ({})", describe(&manifest)),
                                })?;
                        let Some(module) = extracted else {
                            return Err(ResolveError::UnsupportedLayout {
                                reference: image.whole(),
                                found: format!(
                                    "the tar+gzip layer holds no plugin.wasm ({})",
                                    describe(&manifest)
                                ),
                            });
                        };
                        if module.len() as u64 > max {
                            return Err(ResolveError::TooLarge {
                                what: "plugin.wasm".into(),
                                found: format!("more than {max} bytes once decompressed"),
                                limit: max,
                            });
                        }
                        Bytes::from(module)
                    }
                    Layout::SingleLayer if !blob.starts_with(b"\0asm") => {
                        return Err(ResolveError::UnsupportedLayout {
                            reference: image.whole(),
                            found: format!(
                                "its single layer is not a wasm module (starts with {:02x?}); {}",
                                &blob[..blob.len().min(4)],
                                describe(&manifest)
                            ),
                        });
                    }
                    _ => blob,
                };
                let actual = sha256_digest(&module);
                if let Some(expected) = &pin
                    && *expected != actual
                {
                    return Err(ResolveError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
                let m = module.clone();
                tokio::task::spawn_blocking(move || check_module(&m))
                    .await
                    .map_err(|e| ResolveError::ModuleCheck(e.to_string()))??;
                Ok(module)
            })
            .await?;
        if !layout.raw() {
            self.cache.set_layer_alias(&layer.digest, &cached.digest)?;
        }
        if let Some(expected) = &pin
            && *expected != cached.digest
        {
            return Err(ResolveError::DigestMismatch {
                expected: expected.clone(),
                actual: cached.digest,
            });
        }
        Ok(ResolvedModule {
            digest: cached.digest,
            manifest_digest,
            layer_digest: layer.digest.clone(),
            layout,
            bytes: cached.bytes,
            resolved_from: reference.to_string(),
        })
    }

    /// Downloads a blob, refusing it as soon as it is larger than the limit.
    async fn download(
        &self,
        client: &Client,
        image: &Reference,
        layer: &OciDescriptor,
    ) -> Result<Bytes, ResolveError> {
        let limit = self.config.max_module_bytes;
        let too_large = |found: String| ResolveError::TooLarge {
            what: format!("layer {}", layer.digest),
            found,
            limit,
        };
        if layer.size > 0 && layer.size as u64 > limit {
            return Err(too_large(format!("{} bytes", layer.size)));
        }
        let mut stream = client
            .pull_blob_stream(image, layer)
            .await
            .map_err(|e| classify(e, image))?;
        if let Some(len) = stream.content_length
            && len > limit
        {
            return Err(too_large(format!("{len} bytes")));
        }
        let mut buf = Vec::with_capacity(layer.size.clamp(0, limit as i64) as usize);
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| ResolveError::Connection {
                registry: image.registry().to_string(),
                detail: format!("downloading {}: {e}", layer.digest),
            })?;
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(too_large(format!(
                    "more than {limit} bytes, stopped downloading"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        let actual = sha256_digest(&buf);
        if digest_hex(&actual) != digest_hex(&layer.digest) {
            return Err(ResolveError::Registry {
                reference: image.whole(),
                detail: format!(
                    "layer content does not match its descriptor: expected {}, got {actual}",
                    layer.digest
                ),
            });
        }
        Ok(Bytes::from(buf))
    }
}

/// Where a push went.
#[derive(Clone, Debug)]
pub struct PushResult {
    pub manifest_url: String,
    /// `sha256:<hex>` of the pushed manifest.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the module (= the layer digest).
    pub digest: String,
}

/// Options for [`push_artifact`].
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    pub credentials: Credentials,
    /// Speak plain HTTP to the registry.
    pub insecure: bool,
}

/// Pushes `layers` with `config` (and manifest `annotations`) to `reference` as-is: the
/// building block of [`push_wasm`], also used by tests to publish other layouts.
pub async fn push_artifact(
    reference: &str,
    layers: Vec<ImageLayer>,
    config: Config,
    annotations: Option<BTreeMap<String, String>>,
    opts: &PushOptions,
) -> Result<PushResult, ResolveError> {
    let image = parse_reference(reference)?;
    let client = new_client(
        if opts.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        None,
    );
    let manifest = OciImageManifest::build(&layers, &config, annotations);
    let auth = opts.credentials.to_registry_auth();
    let digest = layers
        .first()
        .map(|l| sha256_digest(&l.data))
        .unwrap_or_default();
    let resp = client
        .push(&image, &layers, config, &auth, Some(manifest))
        .await
        .map_err(|e| classify(e, &image))?;
    let manifest_digest = client
        .fetch_manifest_digest(&image, &auth)
        .await
        .map_err(|e| classify(e, &image))?;
    Ok(PushResult {
        manifest_url: resp.manifest_url,
        manifest_digest,
        digest,
    })
}

/// Publishes `module` as a CNCF Wasm OCI artifact: config `application/vnd.wasm.config.v0+json`
/// and one `application/wasm` layer titled `title`.
pub async fn push_wasm(
    reference: &str,
    module: Vec<u8>,
    title: &str,
    opts: &PushOptions,
) -> Result<PushResult, ResolveError> {
    let digest = sha256_digest(&module);
    let config = serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": [digest],
    });
    let layer_annotations = BTreeMap::from([(TITLE_ANNOTATION.to_string(), title.to_string())]);
    push_artifact(
        reference,
        vec![ImageLayer::new(
            module,
            WASM_LAYER.to_string(),
            Some(layer_annotations),
        )],
        Config::new(
            config.to_string().into_bytes(),
            WASM_CONFIG_V0.to_string(),
            None,
        ),
        Some(BTreeMap::from([(
            TITLE_ANNOTATION.to_string(),
            title.to_string(),
        )])),
        opts,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(config: &str, layers: &[&str]) -> OciImageManifest {
        OciImageManifest {
            config: OciDescriptor {
                media_type: config.into(),
                digest: sha256_digest(b"{}"),
                size: 2,
                ..Default::default()
            },
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, t)| OciDescriptor {
                    media_type: (*t).into(),
                    digest: sha256_digest(&[i as u8]),
                    size: 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn reference() -> Reference {
        "127.0.0.1:5000/x:v1".parse().unwrap()
    }

    #[test]
    fn layouts_are_recognised_from_media_types() {
        let r = reference();
        let cases = [
            (WASM_CONFIG_V0, vec![WASM_LAYER], Layout::CncfWasm),
            (
                "application/vnd.wasm.config.v1+json",
                vec![WASM_TO_OCI_LAYER],
                Layout::WasmToOci,
            ),
            (
                "application/vnd.module.wasm.config.v1+json",
                vec![SOLO_OCI_LAYER],
                Layout::SoloOci,
            ),
            (
                "application/vnd.oci.empty.v1+json",
                vec![WASM_LAYER],
                Layout::WasmLayer,
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                vec![OCI_TAR_GZIP_LAYER],
                Layout::SoloCompat,
            ),
            (
                "application/vnd.docker.container.image.v1+json",
                vec![DOCKER_TAR_GZIP_LAYER],
                Layout::SoloCompat,
            ),
            (
                "application/vnd.oci.empty.v1+json",
                vec!["application/vnd.oci.image.layer.v1.tar"],
                Layout::SingleLayer,
            ),
        ];
        for (config, layers, want) in cases {
            let (got, _) = choose_layer(&manifest(config, &layers), &r).unwrap();
            assert_eq!(got, want, "{config} {layers:?}");
        }
    }

    #[test]
    fn other_layouts_name_what_was_found() {
        let r = reference();
        let e = choose_layer(
            &manifest(
                "application/vnd.oci.image.config.v1+json",
                &[OCI_TAR_GZIP_LAYER, OCI_TAR_GZIP_LAYER],
            ),
            &r,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported OCI layout"), "{e}");
        assert!(
            e.contains("config application/vnd.oci.image.config.v1+json"),
            "{e}"
        );
        assert!(e.contains("2 layer(s)"), "{e}");
        let e = choose_layer(&manifest(WASM_CONFIG_V0, &[WASM_LAYER, WASM_LAYER]), &r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one application/wasm layer"), "{e}");
        let e = choose_layer(&manifest(WASM_CONFIG_V0, &[]), &r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 layer(s)"), "{e}");
    }

    #[test]
    fn plugin_wasm_is_found_in_a_tar_gzip_layer() {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, data) in [
            ("runtime-config.json", &b"{}"[..]),
            ("./plugin.wasm", &b"\0asm\x01\0\0\0"[..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data).unwrap();
        }
        let gz = tar.into_inner().unwrap().finish().unwrap();
        assert_eq!(
            extract_plugin_wasm(&gz, 1024).unwrap().unwrap(),
            b"\0asm\x01\0\0\0"
        );
        // The read stops just past the limit.
        assert_eq!(extract_plugin_wasm(&gz, 3).unwrap().unwrap().len(), 4);
        assert!(extract_plugin_wasm(b"plain", 1024).is_err());
    }

    #[test]
    fn pins_are_normalised() {
        let hex = "ab".repeat(32);
        assert_eq!(normalize_pin(&hex).unwrap(), format!("sha256:{hex}"));
        assert_eq!(
            normalize_pin(&format!("sha256:{}", hex.to_uppercase())).unwrap(),
            format!("sha256:{hex}")
        );
        assert!(normalize_pin("sha256:abc").is_err());
    }

    #[test]
    fn module_check_rejects_non_wasm_and_non_proxy_wasm() {
        let e = check_module(b"hello world").unwrap_err().to_string();
        assert!(e.contains("not a WebAssembly module"), "{e}");
        let e = check_module(&wat::parse_str("(module)").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a proxy-wasm module"), "{e}");
    }
}
