//! TLS settings of a resource (issue 14; SPEC §8.2 keys):
//!
//! - Peer link: `[resource] tls-ca = "PATH"` turns mutual TLS 1.3 on; then every
//!   `[[node]]` has `tls-cert` and `tls-key`. A peer's certificate must chain to
//!   `tls-ca` and carry the peer's node name as a **DNS-name subjectAltName** (so
//!   node names must be valid DNS names when TLS is on).
//! - NBD clients: `[[node]] nbd-tls = "off" | "on" | "require"` (default `"off"`),
//!   with `nbd-tls-cert` and `nbd-tls-key` when not off, and an optional
//!   `nbd-tls-ca` that makes client certificates (signed by it) mandatory. The mode
//!   applies to the node's TCP `nbd` listeners; its Unix-socket listeners accept
//!   STARTTLS but never require it (only local processes the socket's permissions
//!   let in reach them: the plaintext path for a kernel client on the same host).
//!
//! The files are only named here; they are read when a connection is made
//! (`crate::tls`), so replacing them rotates certificates without a restart.

use std::fmt;
use std::path::PathBuf;

/// A certificate chain and its private key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What this node needs for TLS on the peer link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// `resource.tls-ca`: the CA every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This node's `tls-cert` and `tls-key`.
    pub own: TlsFiles,
}

/// `nbd-tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NbdTlsMode {
    /// STARTTLS is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// Clients may upgrade with STARTTLS; plaintext clients are served too.
    On,
    /// TCP clients must upgrade first: every other option before STARTTLS is
    /// answered `NBD_REP_ERR_TLS_REQD`.
    Require,
}

impl fmt::Display for NbdTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NbdTlsMode::Off => "off",
            NbdTlsMode::On => "on",
            NbdTlsMode::Require => "require",
        })
    }
}

/// A node's NBD TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdTls {
    /// `nbd-tls`.
    pub mode: NbdTlsMode,
    /// `nbd-tls-cert` / `nbd-tls-key`; present whenever `mode` is not `Off`.
    pub files: Option<TlsFiles>,
    /// `nbd-tls-ca`: when set, clients must present a certificate signed by it.
    pub client_ca: Option<PathBuf>,
}
