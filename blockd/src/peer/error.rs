//! Why a peer link ended ([`LinkError`]) and the counters an operator reads to see
//! it happen ([`PeerStats`]).
//!
//! Every frame-level error is counted exactly once, where it is detected (the frame
//! reader), so a counter never double-counts an error that also travels on to the
//! core inside `LinkEvent::Closed`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a link (or the frame stream under a handshake) stopped. Frame errors mean
/// nothing from that frame was applied: it is rejected before it becomes a
/// [`super::Message`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The first four bytes of a frame header were not `BLKD`.
    #[error("bad frame magic {found:#010x} (expected {expected:#010x})", expected = super::frame::FRAME_MAGIC)]
    BadMagic { found: u32 },
    /// The crc32c over header and payload does not match the header's.
    #[error(
        "frame crc32c mismatch on a {kind} frame (seq {seq}): header says {expected:#010x}, computed {computed:#010x}"
    )]
    BadCrc { kind: &'static str, seq: u64, expected: u32, computed: u32 },
    /// The frame type code is not one this version knows.
    #[error("unknown frame type {code:#06x}")]
    BadType { code: u16 },
    /// The header's flags field is not zero (no flags are defined in version 1).
    #[error("unsupported frame flags {flags:#06x}")]
    BadFlags { flags: u16 },
    /// The payload length is over [`super::MAX_FRAME_PAYLOAD_BYTES`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes", max = super::MAX_FRAME_PAYLOAD_BYTES)]
    Oversize { len: u64 },
    /// The payload length does not fit the frame type's layout.
    #[error("{kind} frame with a {len}-byte payload; this type takes {min}..={max} bytes")]
    BadLength { kind: &'static str, len: u64, min: u64, max: u64 },
    /// The sequence number is not the next one (a lost, repeated or reordered frame).
    #[error("frame sequence gap: expected {expected}, got {got}")]
    SeqGap { expected: u64, got: u64 },
    /// A field holds a value the protocol does not allow (unknown enum code, bad
    /// UTF-8, unknown flag bits, an over-long name).
    #[error("malformed {kind} frame: {what}")]
    Malformed { kind: &'static str, what: &'static str },
    /// A data-path frame for bytes outside the device (the handshake fixed its size).
    #[error("{kind} frame for bytes {offset}..{end} beyond the device end ({size_bytes} bytes)")]
    OutOfRange { kind: &'static str, offset: u64, end: u128, size_bytes: u64 },
    /// The peer speaks another protocol version (its Hello could not be decoded).
    #[error("peer speaks protocol version {remote}, this node {local}", local = super::PROTOCOL_VERSION)]
    Version { remote: u32 },
    /// A message that is valid on the wire but not at this point (a second Hello).
    #[error("unexpected {kind} frame")]
    Unexpected { kind: &'static str },
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The peer closed the connection cleanly between frames, without a `Bye`.
    #[error("peer closed the connection")]
    Eof,
    /// The peer closed the connection with a `Bye`.
    #[error("peer closed the connection: {reason}")]
    Bye { reason: String },
    /// Nothing at all arrived for the keepalive timeout.
    #[error("nothing received from the peer for {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// This side asked for a message too large for one frame (a local bug; nothing
    /// was sent).
    #[error("refusing to send a {kind} message with a {len}-byte payload (limit {max} bytes)")]
    TooLarge { kind: &'static str, len: u64, max: u64 },
    /// This side closed the link: the `PeerConn` (or its sender) was dropped, or the
    /// supervisor shut it down.
    #[error("link closed locally")]
    LocalClosed,
    /// A socket error.
    #[error("peer connection I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Live counters of the peer connection; all monotonic but `compressing`, read
/// with [`PeerStats::snapshot`].
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Frames with a bad magic number.
    pub bad_magic: AtomicU64,
    /// Frames whose crc32c did not match.
    pub bad_crc: AtomicU64,
    /// Frames of an unknown type.
    pub bad_type: AtomicU64,
    /// Frames with nonzero header flags.
    pub bad_flags: AtomicU64,
    /// Frames longer than the limit.
    pub oversize: AtomicU64,
    /// Frames whose length does not fit their type.
    pub bad_length: AtomicU64,
    /// Frames out of sequence.
    pub seq_gap: AtomicU64,
    /// Frames with a field value the protocol does not allow, or not allowed at
    /// that point (includes version mismatches seen while decoding a Hello).
    pub malformed: AtomicU64,
    /// Connections that ended in the middle of a frame.
    pub truncated: AtomicU64,
    /// Links closed by the keepalive timeout.
    pub timeouts: AtomicU64,
    /// Handshakes this node refused (incompatible peer).
    pub handshake_refused: AtomicU64,
    /// Handshakes that failed otherwise (timeout, I/O, a bad first frame, the peer
    /// refused us).
    pub handshake_failed: AtomicU64,
    /// Connections refused because one is already up.
    pub busy_refused: AtomicU64,
    /// Dial attempts (each one resolves the peer's name again).
    pub dial_attempts: AtomicU64,
    /// Links established (handshake passed, `PeerConn` handed out).
    pub connects: AtomicU64,
    /// Links closed, for any reason.
    pub disconnects: AtomicU64,
    /// Data frames whose payload waited for the receive budget (this node had that
    /// many bytes received and not yet applied; see `peer::budget`).
    pub receive_budget_waits: AtomicU64,
    /// Read requests (`DigestReq`, `ReadReq`) that waited for the request budget.
    pub request_budget_waits: AtomicU64,
    /// Bytes of frames the links wrote to the socket (headers included, data as
    /// sent: compressed where it was), every frame after the handshake.
    pub sent_wire_bytes: AtomicU64,
    /// The same frames' bytes uncompressed ([`super::Message::wire_len`]): with
    /// `sent_wire_bytes`, what compression saved.
    pub sent_uncompressed_bytes: AtomicU64,
    /// The link that is up compresses (both nodes said zstd); false while down.
    pub compressing: AtomicBool,
}

/// A plain copy of [`PeerStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PeerStatsSnapshot {
    pub bad_magic: u64,
    pub bad_crc: u64,
    pub bad_type: u64,
    pub bad_flags: u64,
    pub oversize: u64,
    pub bad_length: u64,
    pub seq_gap: u64,
    pub malformed: u64,
    pub truncated: u64,
    pub timeouts: u64,
    pub handshake_refused: u64,
    pub handshake_failed: u64,
    pub busy_refused: u64,
    pub dial_attempts: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub receive_budget_waits: u64,
    pub request_budget_waits: u64,
    pub sent_wire_bytes: u64,
    pub sent_uncompressed_bytes: u64,
    pub compressing: bool,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl PeerStats {
    /// Counts a frame-stream error under its counter (errors that are not about bad
    /// input, like a local close or an I/O error, have none).
    pub(crate) fn record(&self, e: &LinkError) {
        let counter = match e {
            LinkError::BadMagic { .. } => &self.bad_magic,
            LinkError::BadCrc { .. } => &self.bad_crc,
            LinkError::BadType { .. } => &self.bad_type,
            LinkError::BadFlags { .. } => &self.bad_flags,
            LinkError::Oversize { .. } => &self.oversize,
            LinkError::BadLength { .. } => &self.bad_length,
            LinkError::SeqGap { .. } => &self.seq_gap,
            LinkError::Malformed { .. }
            | LinkError::OutOfRange { .. }
            | LinkError::Version { .. }
            | LinkError::Unexpected { .. } => &self.malformed,
            LinkError::Truncated => &self.truncated,
            LinkError::Timeout { .. } => &self.timeouts,
            _ => return,
        };
        bump(counter);
    }

    /// The current values.
    pub fn snapshot(&self) -> PeerStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PeerStatsSnapshot {
            bad_magic: g(&self.bad_magic),
            bad_crc: g(&self.bad_crc),
            bad_type: g(&self.bad_type),
            bad_flags: g(&self.bad_flags),
            oversize: g(&self.oversize),
            bad_length: g(&self.bad_length),
            seq_gap: g(&self.seq_gap),
            malformed: g(&self.malformed),
            truncated: g(&self.truncated),
            timeouts: g(&self.timeouts),
            handshake_refused: g(&self.handshake_refused),
            handshake_failed: g(&self.handshake_failed),
            busy_refused: g(&self.busy_refused),
            dial_attempts: g(&self.dial_attempts),
            connects: g(&self.connects),
            disconnects: g(&self.disconnects),
            receive_budget_waits: g(&self.receive_budget_waits),
            request_budget_waits: g(&self.request_budget_waits),
            sent_wire_bytes: g(&self.sent_wire_bytes),
            sent_uncompressed_bytes: g(&self.sent_uncompressed_bytes),
            compressing: self.compressing.load(Ordering::Relaxed),
        }
    }
}
