//! Content-addressed on-disk module cache: `<dir>/sha256/<hex>.wasm`.
//!
//! Files are written to a temporary name in the same directory and renamed into place, so a
//! reader never sees a partial module. Reads re-hash the file and drop it if it no longer
//! matches its name. [`ModuleCache::get_or_fetch`] makes concurrent resolves of the same key
//! share one fetch.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The 64 lowercase hex digits of a `sha256:<hex>` (or bare `<hex>`) digest, if well formed.
pub fn digest_hex(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("not a sha256 digest: {0:?} (expected sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("module cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A module held in (or just added to) the cache.
#[derive(Clone, Debug)]
pub struct CachedModule {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Bytes,
}

type InFlight = Arc<OnceCell<CachedModule>>;

#[derive(Debug)]
pub struct ModuleCache {
    dir: PathBuf,
    inflight: Mutex<HashMap<String, InFlight>>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl ModuleCache {
    /// Opens (creating if needed) the cache rooted at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<ModuleCache, CacheError> {
        let dir = dir.into();
        let sub = dir.join("sha256");
        std::fs::create_dir_all(&sub).map_err(io_err(&sub))?;
        Ok(ModuleCache {
            dir,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the module with `digest` is (or would be) stored.
    pub fn path_for(&self, digest: &str) -> Result<PathBuf, CacheError> {
        let hex = digest_hex(digest).ok_or_else(|| CacheError::BadDigest(digest.to_string()))?;
        Ok(self.dir.join("sha256").join(format!("{hex}.wasm")))
    }

    /// The module with `digest`, if cached. A file whose content no longer matches its name is
    /// removed and reported as absent.
    pub fn get(&self, digest: &str) -> Result<Option<Bytes>, CacheError> {
        let path = self.path_for(digest)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if digest_hex(&sha256_digest(&bytes)) != digest_hex(digest) {
            tracing::warn!(path = %path.display(), "cached module does not match its digest; removing it");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(Bytes::from(bytes)))
    }

    /// Stores `bytes` under their sha256 and returns the digest (`sha256:<hex>`).
    pub fn put(&self, bytes: &[u8]) -> Result<String, CacheError> {
        let digest = sha256_digest(bytes);
        let path = self.path_for(&digest)?;
        if path.exists() {
            return Ok(digest);
        }
        write_atomically(&path, bytes).map_err(io_err(&path))?;
        Ok(digest)
    }

    /// The module digest recorded for an image layer (a tar+gzip layer the module was extracted
    /// from), if any. Only a hint: the module itself is still looked up with [`ModuleCache::get`].
    pub fn layer_alias(&self, layer_digest: &str) -> Result<Option<String>, CacheError> {
        let path = self.alias_path(layer_digest)?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(digest_hex(s.trim()).map(|h| format!("sha256:{h}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Records that the layer `layer_digest` holds the module `module_digest`.
    pub fn set_layer_alias(
        &self,
        layer_digest: &str,
        module_digest: &str,
    ) -> Result<(), CacheError> {
        let hex = digest_hex(module_digest)
            .ok_or_else(|| CacheError::BadDigest(module_digest.to_string()))?;
        let path = self.alias_path(layer_digest)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        write_atomically(&path, format!("sha256:{hex}\n").as_bytes()).map_err(io_err(&path))
    }

    fn alias_path(&self, layer_digest: &str) -> Result<PathBuf, CacheError> {
        let hex = digest_hex(layer_digest)
            .ok_or_else(|| CacheError::BadDigest(layer_digest.to_string()))?;
        Ok(self.dir.join("layers").join("sha256").join(hex))
    }

    /// Returns the module for `key`, running `fetch` at most once at a time per key: concurrent
    /// callers with the same key wait for the one fetch in flight and share its result. `known`
    /// is the module digest when the caller knows it already; it is looked up on disk first.
    /// What `fetch` returns is stored with [`ModuleCache::put`] before anyone gets it, so `fetch`
    /// must do every check first. When a fetch fails, the next waiting caller tries its own.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        key: &str,
        known: Option<&str>,
        fetch: F,
    ) -> Result<CachedModule, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: From<CacheError>,
    {
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                if let Some(digest) = known
                    && let Some(bytes) = self.get(digest)?
                {
                    return Ok(CachedModule {
                        digest: sha256_digest(&bytes),
                        bytes,
                    });
                }
                let bytes = fetch().await?;
                let digest = self.put(&bytes)?;
                Ok(CachedModule { digest, bytes })
            })
            .await
            .cloned();
        {
            // Once settled the entry is only a waiting room; later callers find the disk copy.
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = map.get(key)
                && Arc::ptr_eq(c, &cell)
            {
                map.remove(key);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn put_then_get_round_trips_and_names_the_file_by_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(tmp.path()).unwrap();
        let digest = cache.put(b"\0asm\x01\0\0\0hello").unwrap();
        assert_eq!(digest, sha256_digest(b"\0asm\x01\0\0\0hello"));
        let path = cache.path_for(&digest).unwrap();
        assert_eq!(
            path,
            tmp.path()
                .join("sha256")
                .join(format!("{}.wasm", digest_hex(&digest).unwrap()))
        );
        assert!(path.exists());
        assert_eq!(
            cache.get(&digest).unwrap().unwrap().as_ref(),
            b"\0asm\x01\0\0\0hello"
        );
        // Bare hex works too; putting the same bytes again is a no-op.
        assert!(cache.get(&digest_hex(&digest).unwrap()).unwrap().is_some());
        assert_eq!(cache.put(b"\0asm\x01\0\0\0hello").unwrap(), digest);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn missing_bad_and_corrupt_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(tmp.path()).unwrap();
        assert!(cache.get(&sha256_digest(b"absent")).unwrap().is_none());
        assert!(matches!(
            cache.get("sha256:xyz"),
            Err(CacheError::BadDigest(_))
        ));
        assert!(matches!(
            cache.get("../../etc/passwd"),
            Err(CacheError::BadDigest(_))
        ));
        let digest = cache.put(b"original").unwrap();
        std::fs::write(cache.path_for(&digest).unwrap(), b"tampered").unwrap();
        assert!(cache.get(&digest).unwrap().is_none());
        assert!(!cache.path_for(&digest).unwrap().exists());
    }

    #[test]
    fn layer_aliases_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(tmp.path()).unwrap();
        let layer = sha256_digest(b"layer");
        assert_eq!(cache.layer_alias(&layer).unwrap(), None);
        let module = sha256_digest(b"module");
        cache.set_layer_alias(&layer, &module).unwrap();
        assert_eq!(cache.layer_alias(&layer).unwrap(), Some(module));
        assert!(cache.set_layer_alias(&layer, "nope").is_err());
        assert!(cache.layer_alias("../x").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_of_one_key_run_once() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Arc::new(ModuleCache::open(tmp.path()).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("layer-a", None, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, CacheError>(Bytes::from_static(b"module a"))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            let m = t.await.unwrap();
            assert_eq!(m.bytes.as_ref(), b"module a");
            assert_eq!(m.digest, sha256_digest(b"module a"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.get(&sha256_digest(b"module a")).unwrap().is_some());
        assert!(cache.inflight.lock().unwrap().is_empty());

        // A known digest already on disk is served without fetching.
        let m = cache
            .get_or_fetch("layer-b", Some(&sha256_digest(b"module a")), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, CacheError>(Bytes::from_static(b"other"))
            })
            .await
            .unwrap();
        assert_eq!(m.bytes.as_ref(), b"module a");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_stores_nothing_and_the_next_caller_retries() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(tmp.path()).unwrap();
        let err = cache
            .get_or_fetch("k", None, || async {
                Err::<Bytes, _>(CacheError::BadDigest("boom".into()))
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(
            std::fs::read_dir(tmp.path().join("sha256"))
                .unwrap()
                .count(),
            0
        );
        let m = cache
            .get_or_fetch("k", None, || async {
                Ok::<_, CacheError>(Bytes::from_static(b"second"))
            })
            .await
            .unwrap();
        assert_eq!(m.bytes.as_ref(), b"second");
    }
}
