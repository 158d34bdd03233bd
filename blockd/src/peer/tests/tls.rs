//! Mutual TLS on the peer link over real loopback TCP: who is accepted, who is
//! refused by which side and why, and that the halves carry data both ways.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::within;
use crate::certs::{Ca, Validity};
use crate::config::{PeerTlsFiles, TlsFiles};
use crate::peer::tls::{self, Accepted, PeerRead, PeerWrite, TlsError};

const T: Duration = Duration::from_secs(10);

/// A directory of PEM files, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(label: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("blockd-peer-tls-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Files(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    }

    /// `node`'s files: a certificate naming `named` signed by `ca`, and `trust` as tls-ca.
    fn node(&self, node: &str, named: &str, ca: &Ca, trust: &Path, validity: Validity) -> PeerTlsFiles {
        let pem = ca.node(named, &[], validity).expect("issue");
        PeerTlsFiles {
            ca: trust.to_owned(),
            own: TlsFiles {
                cert: self.write(&format!("{node}-cert.pem"), &pem.cert),
                key: self.write(&format!("{node}-key.pem"), &pem.key),
            },
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// alpha dials beta; returns each side's result. The dialer's result includes its
/// first read, where a refusal of its own certificate shows up (TLS 1.3 finishes
/// the client before the server has checked it).
async fn dial(alpha: &PeerTlsFiles, beta: &PeerTlsFiles) -> (Result<(), TlsError>, Result<(), TlsError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let beta_side = async {
        let (stream, _) = listener.accept().await.expect("accept");
        match tls::accept(stream, beta, "alpha", T).await? {
            Accepted::Tls(r, w) => echo(r, w).await,
            Accepted::Plaintext(_) => Err(TlsError::PlaintextPeer),
        }
    };
    let alpha_side = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = tls::connect(stream, alpha, "beta", T).await?;
        w.write_all(b"hello").await.map_err(TlsError::from_io)?;
        w.flush().await.map_err(TlsError::from_io)?;
        let mut back = [0u8; 5];
        r.read_exact(&mut back).await.map_err(TlsError::from_io)?;
        assert_eq!(&back, b"HELLO");
        Ok(())
    };
    within(async { tokio::join!(alpha_side, beta_side) }).await
}

async fn echo(mut r: PeerRead, mut w: PeerWrite) -> Result<(), TlsError> {
    let mut got = [0u8; 5];
    r.read_exact(&mut got).await.map_err(TlsError::from_io)?;
    w.write_all(&got.to_ascii_uppercase()).await.map_err(TlsError::from_io)?;
    w.flush().await.map_err(TlsError::from_io)?;
    Ok(())
}

struct Setup {
    files: Files,
    ca: Ca,
    trust: PathBuf,
}

fn setup(label: &str) -> Setup {
    let files = Files::new(label);
    let ca = Ca::new("test CA", Validity::days_from_now(10)).expect("ca");
    let trust = files.write("ca.pem", &ca.cert_pem());
    Setup { files, ca, trust }
}

fn refused_cert(r: &Result<(), TlsError>, what: &str) {
    match r {
        Err(e @ TlsError::PeerCertificate(_)) => {
            assert!(e.is_refusal());
            assert!(e.to_string().contains(what), "{e}");
        }
        other => panic!("expected a refused certificate ({what}), got {other:?}"),
    }
}

fn peer_refused(r: &Result<(), TlsError>) {
    match r {
        Err(e @ TlsError::PeerRefused(_)) => assert!(!e.is_refusal()),
        other => panic!("expected the peer's refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn nodes_with_certificates_of_their_names_connect() {
    let s = setup("ok");
    let v = Validity::days_from_now(10);
    let (a, b) = dial(
        &s.files.node("alpha", "alpha", &s.ca, &s.trust, v),
        &s.files.node("beta", "beta", &s.ca, &s.trust, v),
    )
    .await;
    a.expect("alpha");
    b.expect("beta");
}

#[tokio::test]
async fn a_certificate_for_another_node_is_refused_by_the_side_that_checks_it() {
    let s = setup("name");
    let v = Validity::days_from_now(10);
    let good_beta = s.files.node("beta", "beta", &s.ca, &s.trust, v);
    // alpha presents a certificate naming gamma: beta refuses, alpha hears the alert.
    let (a, b) = dial(&s.files.node("alpha", "gamma", &s.ca, &s.trust, v), &good_beta).await;
    refused_cert(&b, "alpha");
    peer_refused(&a);
    // beta presents gamma's: alpha refuses it as the server's name, beta hears it.
    let good_alpha = s.files.node("alpha2", "alpha", &s.ca, &s.trust, v);
    let (a, b) = dial(&good_alpha, &s.files.node("beta2", "gamma", &s.ca, &s.trust, v)).await;
    refused_cert(&a, "beta");
    peer_refused(&b);
}

#[tokio::test]
async fn another_ca_and_an_expired_certificate_are_refused() {
    let s = setup("ca");
    let v = Validity::days_from_now(10);
    let other = Ca::new("other CA", v).expect("ca");
    let beta = s.files.node("beta", "beta", &s.ca, &s.trust, v);
    let (a, b) = dial(&s.files.node("alpha", "alpha", &other, &s.trust, v), &beta).await;
    refused_cert(&b, "UnknownIssuer");
    peer_refused(&a);
    let (a, b) = dial(&s.files.node("alpha2", "alpha", &s.ca, &s.trust, Validity::expired()), &beta).await;
    refused_cert(&b, "expired");
    peer_refused(&a);
}

#[tokio::test]
async fn a_plaintext_dialer_is_recognised() {
    let s = setup("plain");
    let beta = s.files.node("beta", "beta", &s.ca, &s.trust, Validity::days_from_now(10));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain.write_all(&crate::peer::FRAME_MAGIC.to_be_bytes()).await.expect("write");
    let (stream, _) = listener.accept().await.expect("accept");
    let got = within(tls::accept(stream, &beta, "alpha", T)).await.expect("accept");
    assert!(matches!(got, Accepted::Plaintext(_)));
}

#[tokio::test]
async fn unusable_files_name_the_key_and_path() {
    let s = setup("files");
    let mut files = s.files.node("alpha", "alpha", &s.ca, &s.trust, Validity::days_from_now(10));
    files.own.key = s.files.0.join("missing.pem");
    let e = tls::check_files(&files, "beta").expect_err("missing key");
    assert!(e.to_string().contains("tls-key") && e.to_string().contains("missing.pem"), "{e}");
    files.own.key = s.trust.clone();
    let e = tls::check_files(&files, "beta").expect_err("a certificate is no key");
    assert!(e.to_string().contains("no PEM private key"), "{e}");
}
