//! The peer protocol (SPEC §6): how two nodes of a resource talk.
//!
//! Layers, bottom up:
//! - [`frame`]: 24-byte headers with magic, type, sequence number and crc32c;
//!   [`FrameReader`] checks and decodes, [`FrameWriter`] batches and writes. Data
//!   travels in pool buffers ([`nbd_server::buf::Buf`]) and is never copied into a
//!   frame buffer.
//! - [`msg`]: the messages ([`Message`], [`Hello`]) and their payload layouts.
//! - `compress`: zstd for the data of `Write` and `ResyncData` frames when both
//!   nodes configured it (agreed in the Hello); `pace`: the token bucket of
//!   `replication-rate` in the writer.
//! - [`tls`]: with `resource.tls-ca`, mutual TLS 1.3 under everything above (the
//!   certificate must name the expected peer), and the stream halves the link runs on.
//! - [`handshake`](mod@handshake): Hello exchange with a timeout and [`check_compatible`],
//!   then, with a `shared-secret`, the [`auth`] challenge both ways.
//! - [`link`]: an established connection as channels ([`PeerConn`]): batching
//!   writer, back-pressured reader, keepalive, exactly one `Closed` at the end.
//! - [`budget`]: the byte budgets that bound what a link receives (data held, reads
//!   asked) and stop its reader while they are spent.
//! - [`dial`]: the supervisor that keeps one connection up (the lower name dials,
//!   the other accepts), reconnecting with backoff and re-resolving the peer's name.
//! - [`error`]: [`LinkError`] and the [`PeerStats`] counters.
//!
//! The replication core consumes [`PeerConn`]s from [`spawn_supervisor`]; it decides
//! sync direction, epochs and acks. Nothing here applies anything to a disk: a frame
//! that fails any check ends the link before it becomes a [`Message`].

pub mod auth;
pub mod budget;
mod compress;
pub mod dial;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod kind;
pub mod link;
pub mod msg;
mod pace;
pub mod tls;

#[cfg(test)]
mod tests;

pub use dial::{PeerSettings, spawn_supervisor};
pub use error::{LinkError, PeerStats, PeerStatsSnapshot};
pub use frame::{
    FLAG_COMPRESSED, FRAME_HEADER_BYTES, FRAME_MAGIC, FrameReader, FrameWriter, MAX_FRAME_PAYLOAD_BYTES,
    Progress,
};
pub use handshake::{
    Established, HandshakeError, HandshakeParams, Refusal, check_compatible, compression_agreed,
    compression_mismatch, handshake,
};
pub use kind::Kind;
pub use link::{LinkEvent, LinkHandle, LinkSettings, PeerConn, spawn_link};
pub use msg::{Hello, Message, PROTOCOL_VERSION};
