//! Peer protocol messages (version 3) and the encoding of their payloads.
//!
//! A frame's payload is the message's fixed fields, big-endian, then (for `Write`
//! and `ResyncData` only) the data bytes. The data never passes through this module:
//! encoding writes the fixed part and hands the [`Buf`] to the frame writer, and
//! decoding gets the data already read into a pool buffer by the frame reader.
//!
//! Layout of each type's fixed part (sizes in bytes):
//!
//! | type | code | fixed part |
//! |---|---|---|
//! | Hello | 0x01 | version 4, features 8, size 8, granularity 4, protocol 1 (`A`/`B`/`C`), role 1, disk 1, gens 48, flags 4, resource str, node str |
//! | Ping / Pong | 0x02 / 0x03 | nonce 8 |
//! | Bye | 0x04 | reason str |
//! | AuthChallenge | 0x05 | nonce 32 (right after the Hellos, when both have [`FEATURE_AUTH`]) |
//! | AuthResponse | 0x06 | HMAC-SHA256 32 (see `peer::auth`) |
//! | Write | 0x10 | id 8, epoch 8, offset 8, flags 1 (bit 0 fua) + data |
//! | Trim | 0x11 | id 8, epoch 8, offset 8, len 8, flags 1 (bit 0 fua) |
//! | WriteZeroes | 0x12 | id 8, epoch 8, offset 8, len 8, flags 1 (bit 0 fua, bit 1 may_trim) |
//! | RecvAck | 0x13 | id 8 |
//! | WriteAck | 0x14 | id 8, errno 4 |
//! | Barrier | 0x15 | epoch 8, flags 1 (bit 0 flush) |
//! | BarrierAck | 0x16 | epoch 8, errno 4 |
//! | State | 0x17 | role 1, disk 1 |
//! | ResyncData | 0x20 | offset 8 + data |
//! | ResyncAck | 0x21 | offset 8, len 8, errno 4 |
//! | ResyncDone | 0x22 | gens 48 |
//! | ResyncZeroes | 0x23 | offset 8, len 8 |
//! | BitmapBlock | 0x24 | index 8 + 4 KiB of bitmap (sync target → source at connect) |
//! | BitmapDone | 0x25 | blocks 8 (how many `BitmapBlock`s came before) |
//! | DigestReq | 0x26 | offset 8, len 8, after_epoch 8 |
//! | Digests | 0x27 | offset 8, len 8 + one 16-byte xxh3-128 digest per granule |
//! | StartRepair | 0x28 | out-of-sync bytes 8 (verify --repair: become sync target) |
//! | Invalidate | 0x29 | reserved 8 (zero): the sender discards its data; resync it in full |
//! | SyncPause | 0x2a | flags 1 (bit 0 paused): the sender paused or resumed resync |
//! | ResyncInfo | 0x2b | done 8, total 8 (source → target, bytes of the resync) |
//! | ResyncFlush | 0x2c | id 8 (source → target: make the resync writes acknowledged so far durable) |
//! | ResyncFlushed | 0x2d | id 8 (target → source: they are) |
//! | ReadReq | 0x2e | id 8, offset 8, len 8, after_epoch 8 (a Primary without a disk reads from its peer) |
//! | ReadData | 0x2f | id 8, errno 4 + data (the answer: `len` bytes, or none with an errno) |
//! | ConnectState | 0x30 | gens 48, role 1, disk 1, flags 4 (each side's state once the link is up; the connect decision uses these) |
//! | StatePrepare | 0x31 | tid 8, change 1 (1 = promote the sender), flags 1 (bit 0 force) |
//! | StateReply | 0x32 | tid 8, flags 1 (bit 0 yes), reason str |
//! | StateCommit | 0x33 | tid 8 |
//! | StateAbort | 0x34 | tid 8 |
//! | Ahead | 0x35 | queued bytes 8 (protocol A, pull-ahead: the sender stops shipping writes; the receiver is Behind) |
//!
//! A string is a u16 byte length and UTF-8 bytes; gens are current, bitmap and the
//! four history ids, 8 bytes each. Unknown enum codes and unknown flag bits are
//! rejected, never ignored: a newer peer must bump the version or a feature bit.
//!
//! **Compressed data** (on a link where both Hellos carry [`FEATURE_ZSTD`]): the
//! data of a `Write` or `ResyncData` may travel as one or more zstd frames, marked
//! by the frame header's flag [`FLAG_COMPRESSED`](super::frame::FLAG_COMPRESSED).
//! The payload is then the fixed part, the data's length before compression (u32),
//! and the compressed bytes, which must be fewer than that length minus 4 (a
//! compressed frame is always smaller than the same frame raw). The receiver
//! decompresses into a buffer of exactly the declared length; anything else is a
//! bad frame. Nothing changes in the message: `Message::wire_len` stays the
//! uncompressed length, the one the replication core accounts in.

use nbd_server::buf::Buf;

use super::LinkError;
pub use super::kind::Kind;
pub(crate) use super::kind::Layout;
use crate::config::Protocol;
use crate::state::{DiskState, Generations, HISTORY_LEN, Role};

/// The protocol version this node speaks (2: the connect decision from
/// `ConnectState`, state changes agreed with the peer, resync flushes; 3: reads
/// from the peer, and every failed replicated write reported; 4: `Ahead`).
pub const PROTOCOL_VERSION: u32 = 4;
/// Hello feature bit: this node has a `shared-secret` and requires the peer to prove
/// it knows it (AuthChallenge / AuthResponse) before anything else.
pub const FEATURE_AUTH: u64 = 1 << 0;
/// Hello feature bit: this node has `compression = "zstd"`. When both Hellos carry
/// it, each side may send compressed data (see the module doc); when only one
/// does, the link runs uncompressed (both sides warn) and is not refused. A node
/// that predates the bit ignores it, so it never receives a compressed frame.
pub const FEATURE_ZSTD: u64 = 1 << 1;
/// Bytes of an auth nonce and of an HMAC-SHA256.
pub const AUTH_BYTES: usize = 32;
/// Longest resource or node name on the wire, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest `Bye` reason on the wire, in bytes (longer reasons are cut when sent).
pub const MAX_REASON_BYTES: usize = 1024;
/// Largest data part of a `Write` or `ResyncData` (the buffer pool's largest size).
pub const MAX_DATA_BYTES: usize = nbd_server::buf::MAX_BUF_BYTES;
/// Longest range one `DigestReq` may ask about: a verify or resync chunk (1 MiB).
/// The link refuses longer ones (the core would ignore them, and an unanswered
/// request holds its share of the link's request budget).
pub const MAX_DIGEST_REQ_BYTES: u64 = 1 << 20;

pub(super) const GENS_BYTES: usize = 8 * (2 + HISTORY_LEN);
/// Hello's fixed part without the two strings' bytes (but with their length prefixes).
pub(super) const HELLO_MIN_BYTES: usize = 4 + 8 + 8 + 4 + 1 + 1 + 1 + GENS_BYTES + 4 + 2 + 2;

/// The first frame each way: who this node is and what it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Optional-feature bits: [`FEATURE_AUTH`], [`FEATURE_ZSTD`].
    pub features: u64,
    /// Resource name (≤ 255 bytes).
    pub resource: String,
    /// This node's name (≤ 255 bytes).
    pub node: String,
    /// Device size in bytes.
    pub size_bytes: u64,
    /// Bitmap granularity in bytes.
    pub granularity_bytes: u32,
    /// Replication protocol; the wire carries the letter.
    pub protocol: Protocol,
    /// The sender's role now.
    pub role: Role,
    /// The sender's disk state now.
    pub disk: DiskState,
    /// The sender's generation ids (the core decides the sync direction from them).
    pub gens: Generations,
    /// Flags for the core; carried, not interpreted, here.
    pub flags: u32,
}

/// The feature bits of this node's Hello for `resource`'s config.
pub fn local_features(resource: &crate::config::ResourceConfig) -> u64 {
    let auth = if resource.shared_secret.is_some() { FEATURE_AUTH } else { 0 };
    let zstd = if resource.compression == crate::config::Compression::Zstd { FEATURE_ZSTD } else { 0 };
    auth | zstd
}

/// One peer protocol message.
#[derive(Clone, Debug)]
#[allow(missing_docs)] // the fields are described in the module table
pub enum Message {
    /// First frame each way.
    Hello(Hello),
    /// Keepalive probe; handled inside the link.
    Ping { nonce: u64 },
    /// Keepalive answer; handled inside the link.
    Pong { nonce: u64 },
    /// Application write: `data` at `offset`, in epoch `epoch`.
    Write { id: u64, epoch: u64, offset: u64, fua: bool, data: Buf },
    /// Discard `len` bytes at `offset`.
    Trim { id: u64, epoch: u64, offset: u64, len: u64, fua: bool },
    /// Zero `len` bytes at `offset` (by discarding if `may_trim`).
    WriteZeroes { id: u64, epoch: u64, offset: u64, len: u64, may_trim: bool, fua: bool },
    /// Protocol B: write `id` was received.
    RecvAck { id: u64 },
    /// Protocol C: write `id` was written; `errno` 0 means success.
    WriteAck { id: u64, errno: i32 },
    /// Closes epoch `epoch`; `flush` asks for a flush before the ack.
    Barrier { epoch: u64, flush: bool },
    /// Every write of `epoch` is done (and flushed if asked).
    BarrierAck { epoch: u64, errno: i32 },
    /// Role or disk state changed.
    State { role: Role, disk: DiskState },
    /// Sync source → target: `data` at `offset`.
    ResyncData { offset: u64, data: Buf },
    /// Sync target → source: the range was written (`errno` 0) or not.
    ResyncAck { offset: u64, len: u64, errno: i32 },
    /// Sync source → target: resync finished; adopt these generations.
    ResyncDone { gens: Generations },
    /// Sync source → target: the range reads as zero on the source (no data sent).
    ResyncZeroes { offset: u64, len: u64 },
    /// Sync target → source at connect: a non-zero 4 KiB block of its bitmap.
    BitmapBlock { index: u64, data: Buf },
    /// Sync target → source: every non-zero bitmap block was sent.
    BitmapDone { blocks: u64 },
    /// Digests of the granules of `[offset, offset + len)`, computed once every
    /// replicated write of epochs up to `after_epoch` is applied (0: at once).
    DigestReq { offset: u64, len: u64, after_epoch: u64 },
    /// The answer to `DigestReq`: 16 bytes per granule, in order.
    Digests { offset: u64, len: u64, data: Buf },
    /// A Primary without a disk reads `[offset, offset + len)` from its peer, once
    /// every replicated write of epochs up to `after_epoch` is applied there.
    ReadReq { id: u64, offset: u64, len: u64, after_epoch: u64 },
    /// The answer to `ReadReq { id }`: the data (`errno` 0), or no data and why not.
    ReadData { id: u64, errno: i32, data: Buf },
    /// Verify `--repair`: the sender found `bytes` out of sync and starts a resync
    /// as source; the receiver becomes its sync target.
    StartRepair { bytes: u64 },
    /// `blockctl invalidate` on the sender: it discards its data; the receiver
    /// becomes the source of a full resync.
    Invalidate,
    /// `blockctl pause-sync` / `resume-sync` on the sender.
    SyncPause { paused: bool },
    /// Sync source → target: progress of the resync (the target's status shows it).
    ResyncInfo { done_bytes: u64, total_bytes: u64 },
    /// Sync source → target: flush, then answer `ResyncFlushed` with this id.
    ResyncFlush { id: u64 },
    /// Sync target → source: every resync write acknowledged before the
    /// `ResyncFlush` with this id is durable.
    ResyncFlushed { id: u64 },
    /// The sender's state once the link is up; both sides decide from the pair of
    /// these (`repl::decide`), never from a snapshot taken earlier.
    ConnectState { gens: Generations, role: Role, disk: DiskState, flags: u32 },
    /// A state change the sender wants and the receiver must agree to (two-phase:
    /// `StateReply`, then `StateCommit` or `StateAbort`).
    StatePrepare { tid: u64, change: StateChange },
    /// The receiver's vote on `StatePrepare { tid }` (`reason` when refused).
    StateReply { tid: u64, yes: bool, reason: String },
    /// The change `tid` takes effect.
    StateCommit { tid: u64 },
    /// The change `tid` is dropped.
    StateAbort { tid: u64 },
    /// Protocol A with `on-congestion = "pull-ahead"`: more than `congestion-fill`
    /// was queued (`queued_bytes`); the sender (Primary) stops shipping writes and
    /// records them in its bitmap until a resync catches the receiver up. The
    /// receiver is Behind: Outdated until then.
    Ahead { queued_bytes: u64 },
    /// Orderly close with a reason (≤ 1 KiB).
    Bye { reason: String },
    /// Authentication: a fresh random nonce the peer must answer.
    AuthChallenge { nonce: [u8; AUTH_BYTES] },
    /// Authentication: the HMAC over the peer's nonce (see `peer::auth`).
    AuthResponse { mac: [u8; AUTH_BYTES] },
}

/// A state change that needs the peer's consent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// The sender becomes Primary (`primary [--force]`).
    Promote { force: bool },
}

impl Message {
    /// This message's type.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::Write { .. } => Kind::Write,
            Message::Trim { .. } => Kind::Trim,
            Message::WriteZeroes { .. } => Kind::WriteZeroes,
            Message::RecvAck { .. } => Kind::RecvAck,
            Message::WriteAck { .. } => Kind::WriteAck,
            Message::Barrier { .. } => Kind::Barrier,
            Message::BarrierAck { .. } => Kind::BarrierAck,
            Message::State { .. } => Kind::State,
            Message::ResyncData { .. } => Kind::ResyncData,
            Message::ResyncAck { .. } => Kind::ResyncAck,
            Message::ResyncDone { .. } => Kind::ResyncDone,
            Message::ResyncZeroes { .. } => Kind::ResyncZeroes,
            Message::BitmapBlock { .. } => Kind::BitmapBlock,
            Message::BitmapDone { .. } => Kind::BitmapDone,
            Message::DigestReq { .. } => Kind::DigestReq,
            Message::Digests { .. } => Kind::Digests,
            Message::ReadReq { .. } => Kind::ReadReq,
            Message::ReadData { .. } => Kind::ReadData,
            Message::StartRepair { .. } => Kind::StartRepair,
            Message::Invalidate => Kind::Invalidate,
            Message::SyncPause { .. } => Kind::SyncPause,
            Message::ResyncInfo { .. } => Kind::ResyncInfo,
            Message::ResyncFlush { .. } => Kind::ResyncFlush,
            Message::ResyncFlushed { .. } => Kind::ResyncFlushed,
            Message::ConnectState { .. } => Kind::ConnectState,
            Message::StatePrepare { .. } => Kind::StatePrepare,
            Message::StateReply { .. } => Kind::StateReply,
            Message::StateCommit { .. } => Kind::StateCommit,
            Message::StateAbort { .. } => Kind::StateAbort,
            Message::Ahead { .. } => Kind::Ahead,
            Message::Bye { .. } => Kind::Bye,
            Message::AuthChallenge { .. } => Kind::AuthChallenge,
            Message::AuthResponse { .. } => Kind::AuthResponse,
        }
    }

    /// The data part of a data-carrying message.
    pub fn data(&self) -> Option<&Buf> {
        match self {
            Message::Write { data, .. }
            | Message::ResyncData { data, .. }
            | Message::BitmapBlock { data, .. }
            | Message::Digests { data, .. }
            | Message::ReadData { data, .. } => Some(data),
            _ => None,
        }
    }

    /// [`Message::data`], by value (the frame writer sends it without a copy).
    pub fn into_data(self) -> Option<Buf> {
        match self {
            Message::Write { data, .. }
            | Message::ResyncData { data, .. }
            | Message::BitmapBlock { data, .. }
            | Message::Digests { data, .. }
            | Message::ReadData { data, .. } => Some(data),
            _ => None,
        }
    }

    /// Bytes this message takes on the wire (header, fixed part and data): what a
    /// `LinkEvent::Sent` counts for it.
    pub fn wire_len(&self) -> u64 {
        let data = self.data().map_or(0, |d| d.len());
        (super::frame::FRAME_HEADER_BYTES + self.fixed_len() + data) as u64
    }

    /// Length of the fixed part as [`Message::encode_fixed`] writes it.
    pub(crate) fn fixed_len(&self) -> usize {
        match self {
            Message::Hello(h) => {
                HELLO_MIN_BYTES + cut(&h.resource, MAX_NAME_BYTES).len() + cut(&h.node, MAX_NAME_BYTES).len()
            }
            Message::Bye { reason } => 2 + cut(reason, MAX_REASON_BYTES).len(),
            Message::StateReply { reason, .. } => 11 + cut(reason, MAX_REASON_BYTES).len(),
            _ => match self.kind().layout() {
                Layout::Fixed(n) | Layout::Data { fixed: n } => n,
                Layout::Var { .. } => unreachable!("only Hello, Bye and StateReply are variable"),
            },
        }
    }

    /// Appends the fixed part. Strings longer than their limit are cut at a character
    /// boundary (the handshake validates names first, so only a `Bye` reason is ever
    /// cut).
    pub(crate) fn encode_fixed(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Message::Hello(h) => {
                put(out, h.version);
                put(out, h.features);
                put(out, h.size_bytes);
                put(out, h.granularity_bytes);
                out.push(protocol_code(h.protocol));
                out.push(h.role.code());
                out.push(h.disk.code());
                put_gens(out, &h.gens);
                put(out, h.flags);
                put_str(out, &h.resource, MAX_NAME_BYTES);
                put_str(out, &h.node, MAX_NAME_BYTES);
            }
            Message::Ping { nonce } | Message::Pong { nonce } => put(out, *nonce),
            Message::Write { id, epoch, offset, fua, data: _ } => {
                put(out, *id);
                put(out, *epoch);
                put(out, *offset);
                out.push(u8::from(*fua));
            }
            Message::Trim { id, epoch, offset, len, fua } => {
                put(out, *id);
                put(out, *epoch);
                put(out, *offset);
                put(out, *len);
                out.push(u8::from(*fua));
            }
            Message::WriteZeroes { id, epoch, offset, len, may_trim, fua } => {
                put(out, *id);
                put(out, *epoch);
                put(out, *offset);
                put(out, *len);
                out.push(u8::from(*fua) | u8::from(*may_trim) << 1);
            }
            Message::RecvAck { id } => put(out, *id),
            Message::WriteAck { id, errno } => {
                put(out, *id);
                put(out, *errno);
            }
            Message::Barrier { epoch, flush } => {
                put(out, *epoch);
                out.push(u8::from(*flush));
            }
            Message::BarrierAck { epoch, errno } => {
                put(out, *epoch);
                put(out, *errno);
            }
            Message::State { role, disk } => {
                out.push(role.code());
                out.push(disk.code());
            }
            Message::ResyncData { offset, data: _ } => put(out, *offset),
            Message::ResyncAck { offset, len, errno } => {
                put(out, *offset);
                put(out, *len);
                put(out, *errno);
            }
            Message::ResyncDone { gens } => put_gens(out, gens),
            Message::ResyncZeroes { offset, len } => {
                put(out, *offset);
                put(out, *len);
            }
            Message::BitmapBlock { index, data: _ } => put(out, *index),
            Message::BitmapDone { blocks } => put(out, *blocks),
            Message::DigestReq { offset, len, after_epoch } => {
                put(out, *offset);
                put(out, *len);
                put(out, *after_epoch);
            }
            Message::Digests { offset, len, data: _ } => {
                put(out, *offset);
                put(out, *len);
            }
            Message::ReadReq { id, offset, len, after_epoch } => {
                put(out, *id);
                put(out, *offset);
                put(out, *len);
                put(out, *after_epoch);
            }
            Message::ReadData { id, errno, data: _ } => {
                put(out, *id);
                put(out, *errno);
            }
            Message::StartRepair { bytes } | Message::Ahead { queued_bytes: bytes } => put(out, *bytes),
            Message::Invalidate => put(out, 0u64),
            Message::SyncPause { paused } => out.push(u8::from(*paused)),
            Message::ResyncInfo { done_bytes, total_bytes } => {
                put(out, *done_bytes);
                put(out, *total_bytes);
            }
            Message::ResyncFlush { id }
            | Message::ResyncFlushed { id }
            | Message::StateCommit { tid: id }
            | Message::StateAbort { tid: id } => put(out, *id),
            Message::ConnectState { gens, role, disk, flags } => {
                put_gens(out, gens);
                out.push(role.code());
                out.push(disk.code());
                put(out, *flags);
            }
            Message::StatePrepare { tid, change } => {
                put(out, *tid);
                match change {
                    StateChange::Promote { force } => {
                        out.push(1);
                        out.push(u8::from(*force));
                    }
                }
            }
            Message::StateReply { tid, yes, reason } => {
                put(out, *tid);
                out.push(u8::from(*yes));
                put_str(out, reason, MAX_REASON_BYTES);
            }
            Message::Bye { reason } => put_str(out, reason, MAX_REASON_BYTES),
            Message::AuthChallenge { nonce: bytes } | Message::AuthResponse { mac: bytes } => {
                out.extend_from_slice(bytes)
            }
        }
        debug_assert_eq!(out.len() - start, self.fixed_len(), "{:?}", self.kind());
    }

    /// Decodes a payload whose length already fits `kind`'s layout. `data` is the
    /// data part for data-carrying types (already split off by the frame reader).
    pub(crate) fn decode(kind: Kind, fixed: &[u8], data: Option<Buf>) -> Result<Message, LinkError> {
        let mut c = Cursor { bytes: fixed };
        let msg = decode_fields(kind, &mut c, data).map_err(|e| e.into_link(kind, fixed.len()))?;
        if !c.bytes.is_empty() {
            return Err(Field::Length.into_link(kind, fixed.len()));
        }
        Ok(msg)
    }
}

fn decode_fields(kind: Kind, c: &mut Cursor<'_>, data: Option<Buf>) -> Result<Message, Field> {
    let data = || data.ok_or(Field::Length);
    Ok(match kind {
        Kind::Hello => {
            let version = c.u32()?;
            if version != PROTOCOL_VERSION {
                // A later version may lay the rest out differently: stop here.
                return Err(Field::Version(version));
            }
            Message::Hello(Hello {
                version,
                features: c.u64()?,
                size_bytes: c.u64()?,
                granularity_bytes: c.u32()?,
                protocol: protocol_from_code(c.u8()?)?,
                role: Role::from_code(c.u8()?).ok_or(Field::Bad("unknown role code"))?,
                disk: DiskState::from_code(c.u8()?).ok_or(Field::Bad("unknown disk state code"))?,
                gens: c.gens()?,
                flags: c.u32()?,
                resource: c.string(MAX_NAME_BYTES, "resource name longer than 255 bytes")?,
                node: c.string(MAX_NAME_BYTES, "node name longer than 255 bytes")?,
            })
        }
        Kind::Ping => Message::Ping { nonce: c.u64()? },
        Kind::Pong => Message::Pong { nonce: c.u64()? },
        Kind::Bye => Message::Bye { reason: c.string(MAX_REASON_BYTES, "reason longer than 1024 bytes")? },
        Kind::AuthChallenge => Message::AuthChallenge { nonce: c.take()? },
        Kind::AuthResponse => Message::AuthResponse { mac: c.take()? },
        Kind::Write => {
            let (id, epoch, offset) = (c.u64()?, c.u64()?, c.u64()?);
            let fua = c.flags(1)? & 1 != 0;
            Message::Write { id, epoch, offset, fua, data: data()? }
        }
        Kind::Trim => {
            let (id, epoch, offset, len) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
            Message::Trim { id, epoch, offset, len, fua: c.flags(1)? & 1 != 0 }
        }
        Kind::WriteZeroes => {
            let (id, epoch, offset, len) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
            let f = c.flags(0b11)?;
            Message::WriteZeroes { id, epoch, offset, len, fua: f & 1 != 0, may_trim: f & 2 != 0 }
        }
        Kind::RecvAck => Message::RecvAck { id: c.u64()? },
        Kind::WriteAck => Message::WriteAck { id: c.u64()?, errno: c.i32()? },
        Kind::Barrier => Message::Barrier { epoch: c.u64()?, flush: c.flags(1)? & 1 != 0 },
        Kind::BarrierAck => Message::BarrierAck { epoch: c.u64()?, errno: c.i32()? },
        Kind::State => Message::State {
            role: Role::from_code(c.u8()?).ok_or(Field::Bad("unknown role code"))?,
            disk: DiskState::from_code(c.u8()?).ok_or(Field::Bad("unknown disk state code"))?,
        },
        Kind::ResyncData => Message::ResyncData { offset: c.u64()?, data: data()? },
        Kind::ResyncAck => Message::ResyncAck { offset: c.u64()?, len: c.u64()?, errno: c.i32()? },
        Kind::ResyncDone => Message::ResyncDone { gens: c.gens()? },
        Kind::ResyncZeroes => Message::ResyncZeroes { offset: c.u64()?, len: c.u64()? },
        Kind::BitmapBlock => Message::BitmapBlock { index: c.u64()?, data: data()? },
        Kind::BitmapDone => Message::BitmapDone { blocks: c.u64()? },
        Kind::DigestReq => Message::DigestReq { offset: c.u64()?, len: c.u64()?, after_epoch: c.u64()? },
        Kind::Digests => Message::Digests { offset: c.u64()?, len: c.u64()?, data: data()? },
        Kind::ReadReq => {
            Message::ReadReq { id: c.u64()?, offset: c.u64()?, len: c.u64()?, after_epoch: c.u64()? }
        }
        Kind::ReadData => Message::ReadData { id: c.u64()?, errno: c.i32()?, data: data()? },
        Kind::StartRepair => Message::StartRepair { bytes: c.u64()? },
        Kind::Invalidate => {
            if c.u64()? != 0 {
                return Err(Field::Bad("reserved field is not zero"));
            }
            Message::Invalidate
        }
        Kind::SyncPause => Message::SyncPause { paused: c.flags(1)? & 1 != 0 },
        Kind::ResyncInfo => Message::ResyncInfo { done_bytes: c.u64()?, total_bytes: c.u64()? },
        Kind::ResyncFlush => Message::ResyncFlush { id: c.u64()? },
        Kind::ResyncFlushed => Message::ResyncFlushed { id: c.u64()? },
        Kind::ConnectState => Message::ConnectState {
            gens: c.gens()?,
            role: Role::from_code(c.u8()?).ok_or(Field::Bad("unknown role code"))?,
            disk: DiskState::from_code(c.u8()?).ok_or(Field::Bad("unknown disk state code"))?,
            flags: c.u32()?,
        },
        Kind::StatePrepare => {
            let tid = c.u64()?;
            let change = match c.u8()? {
                1 => StateChange::Promote { force: c.flags(1)? & 1 != 0 },
                _ => return Err(Field::Bad("unknown state change")),
            };
            Message::StatePrepare { tid, change }
        }
        Kind::StateReply => Message::StateReply {
            tid: c.u64()?,
            yes: c.flags(1)? & 1 != 0,
            reason: c.string(MAX_REASON_BYTES, "reason longer than 1024 bytes")?,
        },
        Kind::StateCommit => Message::StateCommit { tid: c.u64()? },
        Kind::StateAbort => Message::StateAbort { tid: c.u64()? },
        Kind::Ahead => Message::Ahead { queued_bytes: c.u64()? },
    })
}

/// What went wrong inside a payload, before the frame context is attached.
enum Field {
    /// Ran out of bytes, or bytes were left over.
    Length,
    Bad(&'static str),
    Version(u32),
}

impl Field {
    fn into_link(self, kind: Kind, len: usize) -> LinkError {
        match self {
            Field::Length => {
                let (min, max) = kind.payload_bounds();
                LinkError::BadLength { kind: kind.name(), len: len as u64, min: min as u64, max: max as u64 }
            }
            Field::Bad(what) => LinkError::Malformed { kind: kind.name(), what },
            Field::Version(remote) => LinkError::Version { remote },
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Field> {
        let (head, rest) = self.bytes.split_first_chunk::<N>().ok_or(Field::Length)?;
        self.bytes = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, Field> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, Field> {
        self.take().map(u32::from_be_bytes)
    }
    fn i32(&mut self) -> Result<i32, Field> {
        self.take().map(i32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, Field> {
        self.take().map(u64::from_be_bytes)
    }
    /// A flags byte with only `allowed` bits set.
    fn flags(&mut self, allowed: u8) -> Result<u8, Field> {
        let f = self.u8()?;
        if f & !allowed != 0 {
            return Err(Field::Bad("unknown flag bits"));
        }
        Ok(f)
    }
    fn gens(&mut self) -> Result<Generations, Field> {
        let current = self.u64()?;
        let bitmap = self.u64()?;
        let mut history = [0; HISTORY_LEN];
        for h in &mut history {
            *h = self.u64()?;
        }
        Ok(Generations { current, bitmap, history })
    }
    fn string(&mut self, max: usize, too_long: &'static str) -> Result<String, Field> {
        let len = usize::from(u16::from_be_bytes(self.take()?));
        if len > max {
            return Err(Field::Bad(too_long));
        }
        let bytes = self.bytes.get(..len).ok_or(Field::Length)?;
        self.bytes = &self.bytes[len..];
        String::from_utf8(bytes.to_vec()).map_err(|_| Field::Bad("string is not UTF-8"))
    }
}

fn put<const N: usize>(out: &mut Vec<u8>, v: impl ToBe<N>) {
    out.extend_from_slice(&v.to_be());
}

trait ToBe<const N: usize> {
    fn to_be(self) -> [u8; N];
}
impl ToBe<4> for u32 {
    fn to_be(self) -> [u8; 4] {
        self.to_be_bytes()
    }
}
impl ToBe<4> for i32 {
    fn to_be(self) -> [u8; 4] {
        self.to_be_bytes()
    }
}
impl ToBe<8> for u64 {
    fn to_be(self) -> [u8; 8] {
        self.to_be_bytes()
    }
}

fn put_gens(out: &mut Vec<u8>, g: &Generations) {
    put(out, g.current);
    put(out, g.bitmap);
    for h in g.history {
        put(out, h);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = cut(s, max);
    // `cut` bounds the length by a limit far below u16::MAX.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn protocol_code(p: Protocol) -> u8 {
    match p {
        Protocol::A => b'A',
        Protocol::B => b'B',
        Protocol::C => b'C',
    }
}

fn protocol_from_code(code: u8) -> Result<Protocol, Field> {
    match code {
        b'A' => Ok(Protocol::A),
        b'B' => Ok(Protocol::B),
        b'C' => Ok(Protocol::C),
        _ => Err(Field::Bad("unknown replication protocol letter")),
    }
}
