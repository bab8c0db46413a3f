//! Downstream TLS (rustls, ring): HTTP/1.1 and HTTP/2 negotiated by ALPN.
//!
//! **Certificate rotation.** Each TLS listener's certificate and key sit behind a
//! [`CertStore`], the acceptor's certificate resolver, which hands out whichever pair was
//! loaded last. A watcher thread ([`watch`]) looks at both files every
//! [`crate::config::CERT_POLL_INTERVAL`] (modification time, inode and size, through symlinks,
//! so a rewritten file and a swapped symlink, as cert-manager and Secret volumes do, are both
//! seen) and on a change loads the new pair; a reload of the configuration (SIGHUP) re-reads
//! them at once, from new paths if the configuration changed them. A new pair that does not
//! load (unreadable, not PEM, key and certificate that do not match) is refused: the old pair
//! keeps serving, an error naming the file is logged and
//! `wasmfilter_tls_certificate_reloads_total{result="error"}` counts it. Handshakes already
//! under way finish with the pair they started with; the next one gets the new pair.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{Config, ConfigError, Tls};

/// What identifies one version of a file: a rewrite or a symlink swap changes at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    inode: u64,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        inode: m.ino(),
        len: m.len(),
    })
}

/// Where one listener's pair comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    /// The configuration field of the listener's `tls` (`tls`, `listeners[1].tls`).
    field: String,
}

/// One TLS listener's certificate and key, swappable while it serves (module doc).
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// The files, and their stamps when last loaded (or last refused, so a bad pair is
    /// reported once, not on every poll).
    source: Mutex<(Source, Option<Stamp>, Option<Stamp>)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    metrics: Option<crate::metrics::TlsReloads>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads a certificate chain and key into a pair rustls can serve; errors name the field and
/// the file.
fn load_pair(
    file: &str,
    source: &Source,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, ConfigError> {
    let err = |field: &str, message: String| ConfigError {
        file: file.to_string(),
        field: format!("{}.{field}", source.field),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&source.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                "certFile",
                format!(
                    "{}: {e}: expected a PEM certificate chain",
                    source.cert.display()
                ),
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            "certFile",
            format!("{} holds no PEM certificate", source.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&source.key).map_err(|e| {
        err(
            "keyFile",
            format!("{}: {e}: expected a PEM private key", source.key.display()),
        )
    })?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        err(
            "keyFile",
            format!(
                "{} and {} do not form a usable pair: {e}",
                source.cert.display(),
                source.key.display()
            ),
        )
    })
}

impl CertStore {
    /// The field of the listener's `tls` this store serves.
    pub fn field(&self) -> String {
        self.source.lock().0.field.clone()
    }

    /// Loads the pair again if either file changed since it was last looked at, and serves
    /// it from the next handshake. Returns whether a new pair now serves. A pair that does not
    /// load leaves the old one serving (and is reported once per change of the files).
    pub fn refresh(&self, config_file: &Path) -> Result<bool, ConfigError> {
        let mut source = self.source.lock();
        let stamps = (stamp(&source.0.cert), stamp(&source.0.key));
        if (&stamps.0, &stamps.1) == (&source.1, &source.2) {
            return Ok(false);
        }
        let loaded = load_pair(
            &config_file.display().to_string(),
            &source.0,
            &self.provider,
        );
        // Remember what was looked at either way: a bad pair is reported once per change.
        source.1 = stamps.0;
        source.2 = stamps.1;
        self.count(loaded.is_ok());
        self.current.store(Arc::new(loaded?));
        Ok(true)
    }

    /// Loads the pair `tls` names (a reloaded configuration's, maybe new paths) without
    /// serving it yet: see [`CertStore::install`].
    pub fn prepare(&self, config_file: &Path, tls: &Tls) -> Result<PreparedPair, ConfigError> {
        let source = Source {
            cert: Config::module_path(config_file, &tls.cert_file),
            key: Config::module_path(config_file, &tls.key_file),
            field: self.field(),
        };
        let stamps = (stamp(&source.cert), stamp(&source.key));
        let loaded = load_pair(&config_file.display().to_string(), &source, &self.provider);
        self.count(loaded.is_ok());
        Ok(PreparedPair {
            pair: loaded?,
            source,
            stamps,
        })
    }

    /// Serves a prepared pair from the next handshake, and watches its files from now on.
    pub fn install(&self, prepared: PreparedPair) {
        let mut source = self.source.lock();
        *source = (prepared.source, prepared.stamps.0, prepared.stamps.1);
        self.current.store(Arc::new(prepared.pair));
    }

    fn count(&self, ok: bool) {
        if let Some(m) = &self.metrics {
            m.count(ok);
        }
    }
}

/// A certificate and key loaded by [`CertStore::prepare`], not serving yet.
pub struct PreparedPair {
    pair: CertifiedKey,
    source: Source,
    stamps: (Option<Stamp>, Option<Stamp>),
}

/// Builds the acceptor of the listener whose `tls` is `field` from the certificate and key
/// files (paths relative to the config file), and the store that lets its pair be swapped.
pub fn acceptor(
    config_file: &Path,
    tls: &Tls,
    field: &str,
    metrics: Option<crate::metrics::TlsReloads>,
) -> Result<(tokio_rustls::TlsAcceptor, Arc<CertStore>), ConfigError> {
    let file = config_file.display().to_string();
    let source = Source {
        cert: Config::module_path(config_file, &tls.cert_file),
        key: Config::module_path(config_file, &tls.key_file),
        field: field.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let stamps = (stamp(&source.cert), stamp(&source.key));
    let pair = load_pair(&file, &source, &provider)?;
    let store = Arc::new(CertStore {
        current: ArcSwap::from_pointee(pair),
        source: Mutex::new((source, stamps.0, stamps.1)),
        provider: provider.clone(),
        metrics,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError {
            file,
            field: field.into(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), store))
}

/// Starts the thread that refreshes `stores` when their files change (module doc). It holds
/// them weakly and ends once the listeners using them are gone.
pub fn watch(config_file: PathBuf, stores: &[Arc<CertStore>]) -> std::io::Result<()> {
    if stores.is_empty() {
        return Ok(());
    }
    let stores: Vec<Weak<CertStore>> = stores.iter().map(Arc::downgrade).collect();
    std::thread::Builder::new()
        .name("cert-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(crate::config::CERT_POLL_INTERVAL);
                let live: Vec<Arc<CertStore>> = stores.iter().filter_map(Weak::upgrade).collect();
                if live.is_empty() {
                    return;
                }
                for store in live {
                    match store.refresh(&config_file) {
                        Ok(true) => tracing::info!(
                            listener = %store.field(),
                            "certificate files changed: the new certificate serves from the next handshake"
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::error!(
                            error = %e,
                            "certificate files changed but the new pair does not load; the previous certificate keeps serving"
                        ),
                    }
                }
            }
        })?;
    Ok(())
}
