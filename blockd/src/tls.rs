//! TLS building blocks shared by the peer link ([`crate::peer::tls`]) and the NBD
//! server (`NBD_OPT_STARTTLS`): the crypto provider, reading PEM files into rustls
//! configs, and the NBD acceptor.
//!
//! **Provider: aws-lc-rs.** Measured on this machine kind (2 vCPUs, shared; rustls
//! 0.23 records in memory, one core encrypting and decrypting, TLS 1.3, three runs):
//! AES-128-GCM at 1 MiB writes 1750–2770 MiB/s with aws-lc-rs against 860–1010 MiB/s
//! with ring (AES-256-GCM 1420–2330 against 710–820); at 4 KiB writes both are
//! 1000–2100 MiB/s, within the noise. The replicated stream is made of writes up to
//! 1 MiB, so ring would spend about twice the CPU per byte where the CPU is
//! the bottleneck (a pair and its client share two cores). Build cost: aws-lc-sys
//! compiles its C with the C compiler alone here (no cmake, no nasm, no clang):
//! about 100 s once on a loaded machine against 13 s for ring.
//!
//! Files are read every time a config is built, which the callers do for every new
//! connection: replacing certificate files rotates them without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{NbdTls, TlsFiles};

/// A certificate file, key file or CA file that cannot be used, with the config key
/// that names it.
#[derive(Debug, thiserror::Error)]
#[error("{key} {}: {why}", path.display())]
pub struct TlsFileError {
    /// The config key (`tls-cert`, `nbd-tls-ca`, ...).
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub why: String,
}

/// The crypto provider of every TLS config blockd makes (see the module docs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its key, read from PEM files.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn file_error(key: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsFileError {
    TlsFileError { key, path: path.to_owned(), why: why.to_string() }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path, pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, pem_error(e)))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no PEM certificate (BEGIN CERTIFICATE) in the file"));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        other => format!("not a valid PEM file: {other:?}"),
    }
}

/// A CA file as a root store.
pub fn load_roots(key: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|e| file_error(key, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its private key; `keys` names the two config keys
/// (`("tls-cert", "tls-key")`).
pub fn load_identity(keys: (&'static str, &'static str), files: &TlsFiles) -> Result<Identity, TlsFileError> {
    let chain = load_certs(keys.0, &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in the file".to_owned(),
            other => pem_error(other),
        };
        file_error(keys.1, &files.key, why)
    })?;
    Ok(Identity { chain, key })
}

/// A server config for NBD clients: TLS 1.3 and 1.2 (the NBD spec requires 1.2),
/// the node's `nbd-tls-cert`/`nbd-tls-key`, and client certificates required when
/// `nbd-tls-ca` is set. Read from the files now.
pub fn nbd_server_config(tls: &NbdTls) -> Result<Arc<ServerConfig>, TlsFileError> {
    let files = tls.files.as_ref().ok_or_else(|| TlsFileError {
        key: "nbd-tls-cert",
        path: PathBuf::new(),
        why: "not set".into(),
    })?;
    let id = load_identity(("nbd-tls-cert", "nbd-tls-key"), files)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("nbd-tls-cert", &files.cert, e))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let roots = load_roots("nbd-tls-ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| file_error("nbd-tls-ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(id.chain, id.key)
        .map_err(|e| file_error("nbd-tls-key", &files.key, format!("does not fit the certificate: {e}")))?;
    // Clients reconnect rarely and the files may change: no resumption state.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The NBD server's TLS hook for a node: STARTTLS builds an acceptor from the files
/// at that moment (rotation without restart); `None` when `nbd-tls` is off. The
/// files are read once here, so a node with unusable files does not start.
pub fn nbd_hook(tls: &NbdTls) -> Result<Option<nbd_server::TlsConfig>, TlsFileError> {
    use crate::config::NbdTlsMode;
    use nbd_server::TlsMode;
    let tcp = match tls.mode {
        NbdTlsMode::Off => return Ok(None),
        NbdTlsMode::On => TlsMode::On,
        NbdTlsMode::Require => TlsMode::Require,
    };
    nbd_server_config(tls)?;
    let settings = tls.clone();
    let acceptor =
        move || nbd_server_config(&settings).map(tokio_rustls::TlsAcceptor::from).map_err(|e| e.to_string());
    // Unix sockets: only local processes the socket file lets in; never required,
    // so a kernel client (which has no TLS) on the same host can attach there.
    Ok(Some(nbd_server::TlsConfig { acceptor: Arc::new(acceptor), tcp, unix: TlsMode::On }))
}
