//! The TLS hook (`NBD_OPT_STARTTLS`). The server only runs the protocol: the caller
//! brings the acceptor (certificates, client verification, crypto provider), and
//! chooses per kind of listener whether TLS is off, offered or required.

use std::fmt;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

/// What a listener does about TLS (the NBD spec's NOTLS, SELECTIVETLS with no
/// TLS-only export, FORCEDTLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// STARTTLS upgrades the connection; plaintext clients are served too.
    On,
    /// Every option before STARTTLS except ABORT is answered `NBD_REP_ERR_TLS_REQD`
    /// (`EXPORT_NAME`, which has no error reply, closes the connection).
    Require,
}

/// Makes the acceptor for one STARTTLS; an error is told to the client
/// (`NBD_REP_ERR_POLICY`) and logged. Called for every upgrade, so a caller that
/// reads its certificate files here rotates them without a restart.
pub type AcceptorSource = Arc<dyn Fn() -> Result<TlsAcceptor, String> + Send + Sync>;

/// TLS for an NBD server.
#[derive(Clone)]
pub struct TlsConfig {
    /// Builds the acceptor at each STARTTLS.
    pub acceptor: AcceptorSource,
    /// The mode of TCP listeners.
    pub tcp: TlsMode,
    /// The mode of Unix-socket listeners.
    pub unix: TlsMode,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("tcp", &self.tcp).field("unix", &self.unix).finish_non_exhaustive()
    }
}

/// What one connection's handshake knows about TLS.
#[derive(Clone, Copy)]
pub(crate) struct TlsPolicy<'a> {
    pub source: Option<&'a AcceptorSource>,
    pub mode: TlsMode,
    /// The connection already runs over TLS.
    pub active: bool,
}

impl TlsPolicy<'_> {
    /// True while an option other than STARTTLS/ABORT must be refused.
    pub fn required_now(&self) -> bool {
        self.mode == TlsMode::Require && !self.active
    }
}
