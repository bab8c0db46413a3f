//! `module.url`: downloading a module over http(s), pinned by `module.sha256`.
//!
//! Contracts:
//! - The operator downloads, never the dataplanes; they fetch the verified bytes by digest.
//! - At most [`DEFAULT_MAX_MODULE_BYTES`] (64 MiB, the OCI cap): a larger `Content-Length` is
//!   refused before reading, and a body that grows past the cap is cut off while streaming.
//! - The bytes must hash to the pin, then pass [`check_module`] (the dataplane's wasmtime
//!   compiles them), before they enter the shared [`ModuleCache`]. Nothing else is cached.
//! - Always downloaded (once per WasmFilter generation, see the controller), even when the
//!   cache holds the pinned digest already: a namespace gets a module only by serving its
//!   bytes itself, never because another namespace pulled a private image with that digest.
//!   Concurrent downloads of the same URL and pin share one request.
//! - No credentials are sent; redirects are followed (up to 10).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use wasmfilter_oci::cache::{CacheError, sha256_digest};
use wasmfilter_oci::oci::{DEFAULT_MAX_MODULE_BYTES, check_module, normalize_pin};
use wasmfilter_oci::{ModuleCache, ResolveError};

use super::status::{Failure, reason};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What a download of `module.url` can run into.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("module.url {url}: cannot download: {detail}")]
    Connection { url: String, detail: String },
    #[error("module.url {url}: the server answered {status}")]
    Status {
        url: String,
        status: u16,
        text: String,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

impl From<CacheError> for UrlError {
    fn from(e: CacheError) -> UrlError {
        UrlError::Resolve(ResolveError::Cache(e))
    }
}

/// A downloaded, verified and cached module.
#[derive(Clone, Debug)]
pub struct Downloaded {
    /// `sha256:<hex>` of the bytes (the pin).
    pub digest: String,
    pub size: u64,
}

fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            crate::run::install_crypto_provider();
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .user_agent(concat!("wasmfilter-operator/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Downloads `url`, checks it against `sha256` (64 hex, with or without `sha256:`) and as a
/// proxy-wasm module, and stores it in `cache`.
pub async fn download(
    cache: &ModuleCache,
    url: &str,
    sha256: &str,
) -> Result<Downloaded, UrlError> {
    download_capped(cache, url, sha256, DEFAULT_MAX_MODULE_BYTES).await
}

/// [`download`] with another size cap (tests).
pub async fn download_capped(
    cache: &ModuleCache,
    url: &str,
    sha256: &str,
    max_bytes: u64,
) -> Result<Downloaded, UrlError> {
    let pin = normalize_pin(sha256)?;
    let key = format!("url {pin} {url}");
    let module = cache
        .get_or_fetch(&key, None, || async {
            let bytes = fetch(url, max_bytes).await?;
            let actual = sha256_digest(&bytes);
            if actual != pin {
                return Err(UrlError::Resolve(ResolveError::DigestMismatch {
                    expected: pin.clone(),
                    actual,
                }));
            }
            let checked = bytes.clone();
            tokio::task::spawn_blocking(move || check_module(&checked))
                .await
                .map_err(|e| {
                    ResolveError::ModuleCheck(format!("the module check panicked: {e}"))
                })??;
            Ok(bytes)
        })
        .await?;
    Ok(Downloaded {
        digest: module.digest,
        size: module.bytes.len() as u64,
    })
}

async fn fetch(url: &str, max_bytes: u64) -> Result<Bytes, UrlError> {
    let connection = |detail: String| UrlError::Connection {
        url: url.to_string(),
        detail,
    };
    let client = client().map_err(connection)?;
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| connection(error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(UrlError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            text: status.canonical_reason().unwrap_or("").to_string(),
        });
    }
    let too_large = |found: String| {
        UrlError::Resolve(ResolveError::TooLarge {
            what: format!("the module at {url}"),
            found,
            limit: max_bytes,
        })
    };
    if let Some(len) = response.content_length()
        && len > max_bytes
    {
        return Err(too_large(format!("{len} bytes")));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| connection(error_chain(&e)))?
    {
        if (body.len() + chunk.len()) as u64 > max_bytes {
            return Err(too_large(format!("more than {max_bytes} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// An error with its sources ("error sending request: connection refused"), which reqwest's
/// Display alone leaves out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// A download error as a condition: the reason, and a message naming module.url and the fix.
pub fn url_failure(e: &UrlError, url: &str) -> Failure {
    let (reason, hint, transient) = match e {
        UrlError::Connection { .. } => (
            reason::DOWNLOAD_FAILED,
            "retrying with backoff; the running version (if any) is kept".to_string(),
            true,
        ),
        UrlError::Status { status, .. } if *status == 408 || *status == 429 || *status >= 500 => (
            reason::DOWNLOAD_FAILED,
            "retrying with backoff; the running version (if any) is kept".to_string(),
            true,
        ),
        UrlError::Status { status, text, .. } => (
            reason::DOWNLOAD_FAILED,
            format!(
                "({status} {text}) check module.url: it must serve the .wasm file to an \
                 anonymous GET"
            ),
            false,
        ),
        UrlError::Resolve(ResolveError::InvalidPin(_)) => (
            reason::INVALID_SPEC,
            "fix module.sha256: 64 hex digits".to_string(),
            false,
        ),
        UrlError::Resolve(ResolveError::TooLarge { .. }) => (
            reason::MODULE_TOO_LARGE,
            "use a smaller module".to_string(),
            false,
        ),
        UrlError::Resolve(ResolveError::DigestMismatch { .. }) => (
            reason::DIGEST_MISMATCH,
            format!(
                "module.sha256 does not match the file at {url}: fix module.sha256 (sha256sum \
                 filter.wasm) or the file; nothing was rolled out"
            ),
            false,
        ),
        UrlError::Resolve(ResolveError::ModuleCheck(_)) => (
            reason::INVALID_MODULE,
            format!("{url} is not a proxy-wasm module this dataplane can run"),
            false,
        ),
        UrlError::Resolve(_) => (
            reason::RESOLVE_FAILED,
            "the operator's module cache failed; retrying".to_string(),
            true,
        ),
    };
    Failure {
        reason,
        message: format!("{e}; {hint}"),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_url_the_status_and_the_fix() {
        let url = "http://files.test/f.wasm";
        let f = url_failure(
            &UrlError::Status {
                url: url.into(),
                status: 404,
                text: "Not Found".into(),
            },
            url,
        );
        assert_eq!((f.reason, f.transient), ("DownloadFailed", false));
        assert!(
            f.message.contains(url) && f.message.contains("404 Not Found"),
            "{}",
            f.message
        );
        assert!(f.message.contains("check module.url"), "{}", f.message);
        let f = url_failure(
            &UrlError::Status {
                url: url.into(),
                status: 503,
                text: "Service Unavailable".into(),
            },
            url,
        );
        assert!(f.transient);
        let f = url_failure(
            &UrlError::Connection {
                url: url.into(),
                detail: "connection refused".into(),
            },
            url,
        );
        assert_eq!((f.reason, f.transient), ("DownloadFailed", true));
    }
}
