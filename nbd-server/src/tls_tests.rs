//! STARTTLS over loopback: what `require` answers before the upgrade, the upgrade
//! itself with a real TLS client, a clean state afterwards, and a second STARTTLS.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::client::{Client, go};
use crate::proto::{opt, rep};
use crate::tests::{greet, opt_reply, send_opt, start_with};
use crate::{ServerConfig, TlsConfig, TlsMode};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config with a self-signed certificate for "localhost", and a client
/// config trusting it.
fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let der = CertificateDer::from(cert.der().to_vec());
    let pk = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], pk)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

fn config(mode: TlsMode, server: Arc<rustls::ServerConfig>) -> ServerConfig {
    let mut c = ServerConfig::new("r0");
    let acceptor = move || Ok(TlsAcceptor::from(server.clone()));
    c.tls = Some(TlsConfig { acceptor: Arc::new(acceptor), tcp: mode, unix: mode });
    c
}

#[tokio::test]
async fn require_answers_tls_reqd_until_starttls_then_serves_over_tls() {
    let (server, client) = tls_pair();
    let srv = start_with(None, config(TlsMode::Require, server)).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    greet(&mut s).await;
    for option in [opt::LIST, opt::INFO, opt::GO, opt::STRUCTURED_REPLY, opt::SET_META_CONTEXT, 99] {
        send_opt(&mut s, option, b"ignored").await;
        assert_eq!(opt_reply(&mut s).await.0, rep::ERR_TLS_REQD, "option {option}");
    }
    send_opt(&mut s, opt::STARTTLS, b"x").await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_INVALID, "STARTTLS takes no data");
    send_opt(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(client).connect(name, s).await.expect("TLS handshake");
    send_opt(&mut tls, opt::STARTTLS, &[]).await;
    assert_eq!(opt_reply(&mut tls).await.0, rep::ERR_INVALID, "a second STARTTLS");
    send_opt(&mut tls, opt::LIST, &[]).await;
    assert_eq!(opt_reply(&mut tls).await.0, rep::SERVER);
    assert_eq!(opt_reply(&mut tls).await.0, rep::ACK);
    // The crate's client negotiates GO inside the session (no greeting again: it
    // continues right at the options), then transmission runs over TLS.
    let details = go(&mut tls, "r0").await.expect("GO over TLS");
    let mut c = Client::negotiated(tls, details);
    c.write(4096, b"over TLS", 0).await.expect("write").expect("written");
    assert_eq!(c.read(4096, 8).await.expect("read").expect("data"), b"over TLS");
    drop(c);
    srv.shutdown().await;
}

#[tokio::test]
async fn require_closes_on_export_name_and_off_refuses_starttls() {
    let (server, _) = tls_pair();
    let srv = start_with(None, config(TlsMode::Require, server.clone())).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    greet(&mut s).await;
    send_opt(&mut s, opt::EXPORT_NAME, b"r0").await;
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0, "closed without a reply");
    srv.shutdown().await;

    let srv = start_with(None, config(TlsMode::Off, server)).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    greet(&mut s).await;
    send_opt(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_POLICY);
    send_opt(&mut s, opt::ABORT, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    srv.shutdown().await;
}
