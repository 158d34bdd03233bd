//! Mutual TLS 1.3 on the peer link (`resource.tls-ca`, node `tls-cert`/`tls-key`).
//!
//! Right after the TCP connection, before any frame: the dialer is the TLS client,
//! the acceptor the TLS server, and both present their certificate. A peer's
//! certificate must chain to `tls-ca`, be valid now, and carry the **peer's node
//! name as a DNS-name subjectAltName**: the dialer checks it as the server name
//! (rustls' WebPKI verifier), the acceptor with [`NamedPeer`] around WebPKI's
//! client verifier. A failure ends the handshake with a TLS alert, so nothing the
//! peer sends is ever decoded, and each side reports why ([`TlsError`]).
//!
//! A plaintext blockd on the other end is recognised and named: the acceptor peeks
//! at the first byte (a TLS ClientHello starts with 0x16, a frame with `B`) and
//! answers a plaintext Hello with a plaintext `Bye` saying TLS is required; the
//! dialer sees a non-TLS answer to its ClientHello. The plaintext side's handshake
//! recognises a ClientHello where it wanted a frame (`Refusal::PeerUsesTls`).
//!
//! The files are read for every connection (rotation without restart). Sessions are
//! never resumed: every connection verifies the certificates in full.
//!
//! The link's reader and writer tasks each own one half. Plain TCP splits into
//! independent halves; a TLS session is one state machine for both directions, so
//! its halves share it through `tokio::io::split` (a mutex held only while a
//! record is sealed or opened: at most rustls' 64 KiB send buffer). [`PeerRead`] and
//! [`PeerWrite`] are enums, so a plaintext link pays one branch per call, no lock
//! and no copy.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::{TlsConnector, TlsStream};

use crate::config::PeerTlsFiles;
use crate::tls::{TlsFileError, load_identity, load_roots, provider};

/// The first byte of a TLS record carrying a handshake message (ClientHello).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a TLS handshake on the peer link did not give a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// This node's own files cannot be used (read at each connection).
    #[error("this node's TLS files cannot be used: {0}")]
    Files(#[from] TlsFileError),
    /// This node refused the peer's certificate (another node, another CA,
    /// expired, none).
    #[error("refused the peer's certificate: {0}")]
    PeerCertificate(rustls::Error),
    /// The peer speaks the plaintext protocol to this TLS node.
    #[error(
        "the peer speaks plaintext but this node requires TLS on the peer link (resource.tls-ca); set \
         tls-ca, tls-cert and tls-key on every node"
    )]
    PlaintextPeer,
    /// The peer refused this node's TLS handshake (its alert).
    #[error(
        "the peer refused this node's TLS handshake ({0}); check this node's tls-cert (signed by the \
         peer's tls-ca, naming this node, not expired)"
    )]
    PeerRefused(rustls::Error),
    /// The peer did not answer in TLS.
    #[error("the peer does not speak TLS on the peer link (a node without resource.tls-ca?): {0}")]
    NotTls(rustls::Error),
    /// Anything else (I/O, a protocol error).
    #[error("TLS handshake failed: {0}")]
    Io(io::Error),
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake did not finish within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
}

impl TlsError {
    /// True when this node refused the peer (counted as `handshake_refused`);
    /// otherwise the attempt failed (`handshake_failed`).
    pub fn is_refusal(&self) -> bool {
        matches!(self, TlsError::PeerCertificate(_) | TlsError::PlaintextPeer)
    }

    /// Sorts an error out of a TLS stream by the rustls error inside it.
    pub fn from_io(e: io::Error) -> TlsError {
        let Some(tls) = rustls_error(&e) else {
            return TlsError::Io(e);
        };
        match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                TlsError::PeerCertificate(tls.clone())
            }
            rustls::Error::AlertReceived(_) => TlsError::PeerRefused(tls.clone()),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                TlsError::NotTls(tls.clone())
            }
            _ => TlsError::Io(e),
        }
    }
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// True when an I/O error of a stream is TLS's (tokio-rustls carries the rustls
/// error inside).
pub fn is_tls_error(e: &io::Error) -> bool {
    rustls_error(e).is_some()
}

/// The read half of a peer connection.
pub enum PeerRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a peer connection.
pub enum PeerWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// A plaintext connection's halves.
pub fn plain(stream: TcpStream) -> (PeerRead, PeerWrite) {
    let (r, w) = stream.into_split();
    (PeerRead::Plain(r), PeerWrite::Plain(w))
}

fn halves(stream: TlsStream<TcpStream>) -> (PeerRead, PeerWrite) {
    let (r, w) = tokio::io::split(stream);
    (PeerRead::Tls(r), PeerWrite::Tls(w))
}

/// This node's client config for dialing `peer`: its certificate, the CA, TLS 1.3.
fn client_config(files: &PeerTlsFiles) -> Result<ClientConfig, TlsError> {
    let roots = load_roots("tls-ca", &files.ca)?;
    let id = load_identity(("tls-cert", "tls-key"), &files.own)?;
    let key_error = |e: rustls::Error| TlsFileError {
        key: "tls-key",
        path: files.own.key.clone(),
        why: format!("does not fit the certificate: {e}"),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(key_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(id.chain, id.key)
        .map_err(key_error)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// This node's server config for a connection from `peer`.
fn server_config(files: &PeerTlsFiles, peer: ServerName<'static>) -> Result<ServerConfig, TlsError> {
    let roots = load_roots("tls-ca", &files.ca)?;
    let id = load_identity(("tls-cert", "tls-key"), &files.own)?;
    let provider = provider();
    let ca_error = |why: String| TlsFileError { key: "tls-ca", path: files.ca.clone(), why };
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| ca_error(e.to_string()))?;
    let key_error = |e: rustls::Error| TlsFileError {
        key: "tls-key",
        path: files.own.key.clone(),
        why: format!("does not fit the certificate: {e}"),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(key_error)?
        .with_client_cert_verifier(Arc::new(NamedPeer { webpki, peer }))
        .with_single_cert(id.chain, id.key)
        .map_err(key_error)?;
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Builds both configs from the files once (what a connection would do), so a
/// node with unusable files fails at start instead of at every attempt.
pub fn check_files(files: &PeerTlsFiles, peer: &str) -> Result<(), TlsError> {
    client_config(files)?;
    server_config(files, server_name(peer)?)?;
    Ok(())
}

fn server_name(peer: &str) -> Result<ServerName<'static>, TlsError> {
    // Config validation made sure node names are DNS names when TLS is on.
    ServerName::try_from(peer.to_owned())
        .map_err(|e| TlsError::Io(io::Error::other(format!("node name {peer:?} is not a DNS name: {e}"))))
}

async fn bounded<T>(timeout: Duration, f: impl Future<Output = Result<T, TlsError>>) -> Result<T, TlsError> {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or(Err(TlsError::Timeout { timeout_ms: timeout.as_millis() as u64 }))
}

/// The dialer's side: TLS client to `peer` (its certificate must name `peer`).
pub async fn connect(
    stream: TcpStream,
    files: &PeerTlsFiles,
    peer: &str,
    timeout: Duration,
) -> Result<(PeerRead, PeerWrite), TlsError> {
    let name = server_name(peer)?;
    let connector = TlsConnector::from(Arc::new(client_config(files)?));
    bounded(timeout, async {
        let tls = connector.connect(name, stream).await.map_err(TlsError::from_io)?;
        Ok(halves(TlsStream::Client(tls)))
    })
    .await
}

/// What arrived on an accepted connection before any TLS.
pub enum Accepted {
    /// A TLS handshake went through: the peer is who it should be.
    Tls(PeerRead, PeerWrite),
    /// The peer started in plaintext: the caller tells it to use TLS
    /// ([`TlsError::PlaintextPeer`]).
    Plaintext(TcpStream),
}

/// The acceptor's side: TLS server for a connection that must come from `peer`.
pub async fn accept(
    stream: TcpStream,
    files: &PeerTlsFiles,
    peer: &str,
    timeout: Duration,
) -> Result<Accepted, TlsError> {
    let config = Arc::new(server_config(files, server_name(peer)?)?);
    bounded(timeout, async {
        let mut first = [0u8; 1];
        let n = stream.peek(&mut first).await.map_err(TlsError::Io)?;
        if n == 1 && first[0] != TLS_HANDSHAKE_RECORD && first[0] == super::FRAME_MAGIC.to_be_bytes()[0] {
            return Ok(Accepted::Plaintext(stream));
        }
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(stream).await.map_err(TlsError::from_io)?;
        let (r, w) = halves(TlsStream::Server(tls));
        Ok(Accepted::Tls(r, w))
    })
    .await
}

/// WebPKI's client verification (chain to the CA, validity, client-auth usage),
/// then the one check it leaves out: the certificate names the expected peer.
#[derive(Debug)]
struct NamedPeer {
    webpki: Arc<dyn ClientCertVerifier>,
    peer: ServerName<'static>,
}

impl ClientCertVerifier for NamedPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.webpki.verify_client_cert(end_entity, intermediates, now)?;
        rustls::client::verify_server_name(&ParsedCertificate::try_from(end_entity)?, &self.peer)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

impl AsyncRead for PeerRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            PeerRead::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            PeerWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerWrite::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            PeerWrite::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerWrite::Plain(w) => w.is_write_vectored(),
            PeerWrite::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            PeerWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            PeerWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
