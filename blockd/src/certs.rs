//! Certificates for `blockctl gen-certs` and the tests, made with rcgen: a CA, one
//! certificate per node (peer link and NBD server) and one for NBD clients.
//!
//! - **CA**: self-signed, may sign (key usage keyCertSign, cRLSign).
//! - **Node**: subjectAltName DNS = the node name (what the peer link checks), plus
//!   the hosts its NBD clients connect to (an IP address as an IP SAN, a name as a
//!   DNS SAN: what libnbd and qemu check); extended key usage serverAuth and
//!   clientAuth (a node is the TLS server or the client depending on who dials).
//! - **NBD client**: no subjectAltName at all (so it can never pass as a node on
//!   the peer link), common name only, extended key usage clientAuth.
//!
//! Keys are ECDSA P-256; the signing algorithm ECDSA-SHA256 (GnuTLS, used by libnbd
//! and qemu, and rustls all accept it).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a day ago (clocks of two nodes differ a little) for `days` days.
    pub fn days_from_now(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::days(1), not_after: now + Duration::days(i64::from(days)) }
    }

    /// A certificate that expired a day ago (tests).
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::days(30), not_after: now - Duration::days(1) }
    }
}

/// A certificate authority that issues node and client certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

fn params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    p
}

impl Ca {
    /// A new CA named `common_name` (e.g. "blockd r0 CA").
    pub fn new(common_name: &str, validity: Validity) -> Result<Ca, rcgen::Error> {
        let mut p = params(common_name, validity);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        Ok(Ca { issuer: CertifiedIssuer::self_signed(p, key)?, key_pem })
    }

    /// The CA certificate (what `tls-ca` and `nbd-tls-ca` name).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    fn issue(&self, mut p: CertificateParams) -> Result<Pem, rcgen::Error> {
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A node's certificate: DNS SAN `node`, then `hosts` (IP or DNS SANs).
    pub fn node(&self, node: &str, hosts: &[String], validity: Validity) -> Result<Pem, rcgen::Error> {
        let mut p = params(node, validity);
        let mut sans = vec![SanType::DnsName(node.try_into()?)];
        for host in hosts.iter().filter(|h| h.as_str() != node) {
            sans.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into()?),
            });
        }
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p)
    }

    /// A certificate for NBD clients (no SAN: never valid as a node).
    pub fn client(&self, common_name: &str, validity: Validity) -> Result<Pem, rcgen::Error> {
        let mut p = params(common_name, validity);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p)
    }
}
