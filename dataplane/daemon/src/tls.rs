//! Downstream TLS (rustls, ring): HTTP/1.1 and HTTP/2 negotiated by ALPN.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError, Tls};

/// Builds the acceptor from the certificate and key files (paths relative to the config file).
pub fn acceptor(config_file: &Path, tls: &Tls) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    let file = config_file.display().to_string();
    let err = |field: &str, message: String| ConfigError {
        file: file.clone(),
        field: field.into(),
        message,
    };
    let cert_path = Config::module_path(config_file, &tls.cert_file);
    let key_path = Config::module_path(config_file, &tls.key_file);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                "tls.certFile",
                format!(
                    "{}: {e}: expected a PEM certificate chain",
                    cert_path.display()
                ),
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            "tls.certFile",
            format!("{} holds no PEM certificate", cert_path.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        err(
            "tls.keyFile",
            format!("{}: {e}: expected a PEM private key", key_path.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            err(
                "tls",
                format!("the certificate and key do not form a usable pair: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
