//! The versioned handshake: each side sends its Hello, reads the peer's (bounded in
//! time), and checks that the two describe the same resource seen from two different,
//! expected nodes ([`check_compatible`]).
//!
//! Both sides write before they read; a Hello is a few hundred bytes, far below any
//! socket buffer, so the exchange cannot deadlock. A refusal is logged (naming both
//! values), counted, told to the peer in a `Bye` when possible, and the connection is
//! closed: nothing the peer sent is ever applied. With a `shared-secret` (a Hello
//! feature bit both must have), the Hellos are followed by the [`super::auth`]
//! challenge both ways; a peer that fails it is refused like an incompatible one.
//! Which way to resync is not decided here; the core reads `remote.gens`.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::buf::BufPool;
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth;
use super::error::bump;
use super::frame::{FrameReader, FrameWriter};
use super::msg::{FEATURE_AUTH, FEATURE_ZSTD, Hello, MAX_NAME_BYTES, Message, PROTOCOL_VERSION};
use super::{LinkError, PeerStats};
use crate::config::{Protocol, SharedSecret};

/// Why this node will not talk to a peer. The text names both sides' values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("peer speaks protocol version {remote}, this node {local}")]
    Version { local: u32, remote: u32 },
    #[error("peer serves resource `{remote}`, this node `{local}`")]
    Resource { local: String, remote: String },
    #[error("peer calls itself `{name}`, which is this node's own name")]
    SameNode { name: String },
    #[error("peer calls itself `{remote}`, but the config names the peer `{expected}`")]
    UnexpectedPeer { expected: String, remote: String },
    #[error("peer's device is {remote} bytes, this node's is {local} bytes")]
    Size { local: u64, remote: u64 },
    #[error("peer's bitmap granularity is {remote} bytes, this node's is {local} bytes")]
    Granularity { local: u32, remote: u32 },
    #[error("peer uses replication protocol {remote}, this node protocol {local}")]
    Protocol { local: Protocol, remote: Protocol },
    #[error(
        "{} requires peer authentication (resource.shared-secret) but {} has none; set the same \
         shared-secret on both nodes",
        if *local { "this node" } else { "the peer" },
        if *local { "the peer" } else { "this node" }
    )]
    AuthMismatch { local: bool },
    #[error(
        "peer failed authentication: it does not know this node's shared-secret (a different secret, \
         or not the configured peer)"
    )]
    AuthFailed,
    #[error(
        "peer speaks TLS but this node has no resource.tls-ca; set tls-ca, tls-cert and tls-key on every \
         node (or on none)"
    )]
    PeerUsesTls,
}

/// Why a handshake did not produce a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's Hello did not arrive in time.
    #[error("no Hello from the peer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The frame stream failed (bad frame, I/O error, closed).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The peer's first frame was something other than a Hello.
    #[error("peer sent a {kind} frame before its Hello")]
    NotHello { kind: &'static str },
    /// The peer sent something else where its authentication belonged.
    #[error("peer sent a {kind} frame instead of its {wanted}")]
    NotAuth { kind: &'static str, wanted: &'static str },
    /// The peer refused this node (its `Bye` reason).
    #[error("peer refused the connection: {reason}")]
    PeerRefused { reason: String },
    /// This node refused the peer.
    #[error("refused the peer: {0}")]
    Refused(#[from] Refusal),
    /// The TLS layer under the frames failed (see [`super::tls`]).
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    /// This node's own Hello cannot be sent (a name over 255 bytes).
    #[error("this node's Hello is invalid: {0}")]
    InvalidLocal(&'static str),
}

/// The end of a successful handshake: the frame stream (sequence numbers carry on)
/// and the peer's Hello. Hand it to [`super::spawn_link`].
pub struct Established<R, W> {
    /// Reads frames after the peer's Hello.
    pub reader: FrameReader<R>,
    /// Writes frames after this node's Hello.
    pub writer: FrameWriter<W>,
    /// The peer's Hello, already checked.
    pub remote: Hello,
}

/// What a handshake needs to know besides the connection.
#[derive(Clone, Debug)]
pub struct HandshakeParams {
    /// This node's Hello.
    pub local: Hello,
    /// The peer's node name as the config has it.
    pub expected_peer: String,
    /// Bound on sending our Hello and receiving theirs.
    pub timeout: Duration,
    /// The peer's address, for log lines.
    pub remote_addr: String,
    /// `resource.shared-secret`: when set, the peer must prove it knows it.
    pub secret: Option<SharedSecret>,
}

/// Checks that `remote` may be connected with. `expected_peer` is the node name the
/// config gives the peer.
pub fn check_compatible(local: &Hello, remote: &Hello, expected_peer: &str) -> Result<(), Refusal> {
    if remote.version != local.version {
        return Err(Refusal::Version { local: local.version, remote: remote.version });
    }
    if remote.resource != local.resource {
        return Err(Refusal::Resource { local: local.resource.clone(), remote: remote.resource.clone() });
    }
    if remote.node == local.node {
        return Err(Refusal::SameNode { name: remote.node.clone() });
    }
    if remote.node != expected_peer {
        return Err(Refusal::UnexpectedPeer {
            expected: expected_peer.to_owned(),
            remote: remote.node.clone(),
        });
    }
    if remote.size_bytes != local.size_bytes {
        return Err(Refusal::Size { local: local.size_bytes, remote: remote.size_bytes });
    }
    if remote.granularity_bytes != local.granularity_bytes {
        return Err(Refusal::Granularity {
            local: local.granularity_bytes,
            remote: remote.granularity_bytes,
        });
    }
    if remote.protocol != local.protocol {
        return Err(Refusal::Protocol { local: local.protocol, remote: remote.protocol });
    }
    let auth = |h: &Hello| h.features & FEATURE_AUTH != 0;
    if auth(local) != auth(remote) {
        return Err(Refusal::AuthMismatch { local: auth(local) });
    }
    Ok(())
}

/// Whether a link between these Hellos compresses: only if both nodes configured
/// `compression = "zstd"`. A mismatch is not a refusal (the link runs
/// uncompressed): [`compression_mismatch`] says what to log.
pub fn compression_agreed(local: &Hello, remote: &Hello) -> bool {
    (local.features & remote.features) & FEATURE_ZSTD != 0
}

/// The warning for a link on which only one node configured compression, naming
/// both settings; `None` when they agree.
pub fn compression_mismatch(local: &Hello, remote: &Hello) -> Option<String> {
    let setting = |h: &Hello| if h.features & FEATURE_ZSTD != 0 { "zstd" } else { "off" };
    let (ours, theirs) = (setting(local), setting(remote));
    (ours != theirs).then(|| {
        format!(
            "this node has compression = \"{ours}\" but the peer `{}` has \"{theirs}\": the link runs \
             uncompressed; set the same compression on both nodes",
            remote.node
        )
    })
}

/// Runs the handshake over a fresh connection's halves. Counts the outcome in
/// `stats` (`handshake_refused` or `handshake_failed`; `connects` is the caller's,
/// once the link is up).
pub async fn handshake<R, W>(
    reader: R,
    writer: W,
    params: &HandshakeParams,
    pool: BufPool,
    stats: Arc<PeerStats>,
) -> Result<Established<R, W>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FrameReader::new(reader, pool, stats.clone());
    let mut writer = FrameWriter::new(writer);
    let result = exchange(&mut reader, &mut writer, params).await;
    match result {
        Ok(remote) => Ok(Established { reader, writer, remote }),
        Err(HandshakeError::Refused(refusal)) => {
            bump(&stats.handshake_refused);
            tracing::warn!(
                peer = %params.remote_addr,
                "refusing peer connection: {refusal}"
            );
            let reason = refusal.to_string();
            let _ = tokio::time::timeout(params.timeout, say_bye(&mut reader, &mut writer, reason)).await;
            Err(HandshakeError::Refused(refusal))
        }
        Err(e) => {
            bump(&stats.handshake_failed);
            Err(e)
        }
    }
}

async fn exchange<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    params: &HandshakeParams,
) -> Result<Hello, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let local = &params.local;
    if local.resource.len() > MAX_NAME_BYTES || local.node.len() > MAX_NAME_BYTES {
        return Err(HandshakeError::InvalidLocal("resource or node name longer than 255 bytes"));
    }
    let timeout_ms = params.timeout.as_millis() as u64;
    let first = tokio::time::timeout(params.timeout, async {
        writer.send(Message::Hello(local.clone())).await?;
        reader.read().await
    })
    .await
    .map_err(|_| HandshakeError::Timeout { timeout_ms })?;
    let remote = match first {
        Ok(Message::Hello(remote)) => remote,
        Ok(Message::Bye { reason }) => return Err(HandshakeError::PeerRefused { reason }),
        Ok(other) => return Err(HandshakeError::NotHello { kind: other.kind().name() }),
        // A Hello of another version is not decoded past its version field: that is
        // a refusal like any other incompatibility, not a broken stream.
        Err(LinkError::Version { remote }) => {
            return Err(Refusal::Version { local: PROTOCOL_VERSION, remote }.into());
        }
        // A TLS ClientHello where a frame belongs: a TLS node dialed this plaintext one.
        Err(LinkError::BadMagic { found }) if (found >> 24) as u8 == super::tls::TLS_HANDSHAKE_RECORD => {
            return Err(Refusal::PeerUsesTls.into());
        }
        // On a TLS link, a peer that refuses this node's certificate says so with an
        // alert that arrives here, in place of its Hello.
        Err(LinkError::Io(e)) if super::tls::is_tls_error(&e) => {
            return Err(super::tls::TlsError::from_io(e).into());
        }
        Err(e) => return Err(e.into()),
    };
    check_compatible(local, &remote, &params.expected_peer)?;
    if let Some(warning) = compression_mismatch(local, &remote) {
        tracing::warn!(peer = %params.remote_addr, "{warning}");
    }
    if let Some(secret) = &params.secret {
        tokio::time::timeout(params.timeout, authenticate(reader, writer, secret.as_bytes(), local, &remote))
            .await
            .map_err(|_| HandshakeError::Timeout { timeout_ms })??;
    }
    Ok(remote)
}

/// The challenge both ways (see [`super::auth`]). Both sides write before they
/// read, as with the Hellos.
async fn authenticate<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    secret: &[u8],
    local: &Hello,
    remote: &Hello,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ours = auth::nonce();
    writer.send(Message::AuthChallenge { nonce: ours }).await?;
    let theirs = match reader.read().await? {
        Message::AuthChallenge { nonce } => nonce,
        Message::Bye { reason } => return Err(HandshakeError::PeerRefused { reason }),
        other => return Err(HandshakeError::NotAuth { kind: other.kind().name(), wanted: "AuthChallenge" }),
    };
    let mac = auth::response(secret, &local.resource, &local.node, &theirs, &ours);
    writer.send(Message::AuthResponse { mac }).await?;
    let answer = match reader.read().await? {
        Message::AuthResponse { mac } => mac,
        Message::Bye { reason } => return Err(HandshakeError::PeerRefused { reason }),
        other => return Err(HandshakeError::NotAuth { kind: other.kind().name(), wanted: "AuthResponse" }),
    };
    if !auth::verify(secret, &local.resource, &remote.node, &ours, &theirs, &answer) {
        return Err(Refusal::AuthFailed.into());
    }
    Ok(())
}

/// Best effort: tell the peer why, end our direction, and read until the peer closes
/// too. Reading to the end matters: closing a socket with unread input makes TCP send
/// a reset, which can destroy the `Bye` before the peer reads it.
pub(crate) async fn say_bye<R, W>(reader: &mut FrameReader<R>, writer: &mut FrameWriter<W>, reason: String)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if writer.send(Message::Bye { reason }).await.is_ok() {
        let _ = writer.shutdown().await;
        reader.discard_to_end().await;
    }
}
