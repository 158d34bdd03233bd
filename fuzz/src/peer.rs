//! The peer link's bytes: frames and message payloads.
//!
//! - `peer_frames`: the input is a byte stream from the peer, read by
//!   [`FrameReader`] frame after frame until it fails (or ends).
//! - `peer_link`: the same bytes after a handshake, through an established link
//!   (`spawn_link`) to the core's side: keepalive and `Bye` stay inside the link,
//!   nothing outside the device gets through, nor a read request no node would
//!   answer; the harness answers read requests as the core does (the link's request
//!   budget).
//! - `peer_msg`: the input is a type code (2 bytes, big-endian) and a payload; the
//!   harness wraps them in a frame with a correct header and crc, so every input
//!   reaches the payload decoder of its message kind. Codes that name no kind are
//!   mapped onto [`Kind::ALL`], so kinds added later are fuzzed without a change
//!   here. The code's top bit sets the frame's compressed flag
//!   ([`FLAG_COMPRESSED`]): the payload is then a compressed frame's (fixed part,
//!   declared length, zstd bytes).
//!
//! Every reader here accepts compressed frames (as on a link that agreed on zstd),
//! so the decompression path (declared lengths, corrupt data, bombs) is fuzzed by
//! all three targets.
//!
//! Checks: no panic; every frame read is consumed whole; and encoding the decoded
//! messages again ([`FrameWriter`]) gives back exactly the bytes that were read, so
//! the decoder accepts nothing the encoder would not write (one meaning per frame).
//! A compressed frame cannot be compared byte for byte (zstd has many encodings of
//! the same data): its header but flags, length and crc, its fixed part, and its
//! declared length against the decoded data are compared instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockd::config::Protocol;
use blockd::peer::msg::{AUTH_BYTES, PROTOCOL_VERSION, StateChange};
use blockd::peer::{
    FLAG_COMPRESSED, FRAME_HEADER_BYTES, FRAME_MAGIC, FrameReader, FrameWriter, Hello, Kind, LinkEvent,
    LinkSettings, Message, PeerStats, spawn_link,
};
use blockd::state::{DiskState, Generations, Role};
use nbd_server::buf::{Buf, BufMut, BufPool};

use crate::{Bytes, Seed};

/// Target `peer_frames`.
pub fn peer_frames(data: &[u8]) {
    let read = crate::block_on(read_frames(data));
    check_reencodes(data, read);
}

/// Target `peer_msg`.
pub fn peer_msg(data: &[u8]) {
    let Some((code, payload)) = data.split_first_chunk::<2>() else { return };
    let code = u16::from_be_bytes(*code);
    let flags = if code & COMPRESSED_CODE != 0 { FLAG_COMPRESSED } else { 0 };
    let code = code & !COMPRESSED_CODE;
    let kind = Kind::from_code(code).unwrap_or(Kind::ALL[usize::from(code) % Kind::ALL.len()]);
    let frame = frame(kind, flags, payload);
    let read = crate::block_on(read_frames(&frame));
    if let Some(msg) = read.first() {
        assert_eq!(msg.kind(), kind, "a {} frame decoded as {:?}", kind.name(), msg.kind());
    }
    check_reencodes(&frame, read);
}

/// The bit of a `peer_msg` code that sets the compressed flag (no kind's code has it).
const COMPRESSED_CODE: u16 = 0x8000;
/// The zstd level the seeds are compressed at.
const LEVEL: i32 = 3;

/// Target `peer_link`: a peer's bytes after the handshake, through an established
/// link (`spawn_link`: keepalive, `Bye`, the range check) to what the core gets.
pub fn peer_link(data: &[u8]) {
    let stats = Arc::new(PeerStats::default());
    let reader = FrameReader::new(std::io::Cursor::new(data.to_vec()), pool(), stats.clone());
    let writer = FrameWriter::new(tokio::io::sink());
    // Keepalive timers that never fire within an input (real time would make runs
    // differ); a small queue, so the reader waits for the core now and then.
    let hour_ms = 3_600_000;
    let settings = LinkSettings {
        ping_interval_ms: hour_ms,
        ping_timeout_ms: hour_ms,
        incoming_capacity: 2,
        compression_level: Some(LEVEL),
        ..LinkSettings::default()
    };
    let size_bytes = remote_hello().size_bytes;
    crate::block_on(async {
        let (mut conn, mut handle) = spawn_link(reader, writer, remote_hello(), &settings, stats);
        while let Some(event) = conn.incoming.recv().await {
            match event {
                LinkEvent::Message(msg) => {
                    check_for_core(&msg, size_bytes);
                    // Answer read requests as the core does: an unanswered one keeps
                    // its share of the link's request budget, and enough of them
                    // would stop the reader for good.
                    if let Some(answer) = answer(&msg) {
                        let _ = conn.outgoing.send(answer);
                    }
                }
                LinkEvent::Sent { .. } => {}
                LinkEvent::Closed(_) => break,
            }
        }
        handle.closed().await;
    });
}

/// The answer the core sends to a read request (an error: the harness has no disk).
fn answer(msg: &Message) -> Option<Message> {
    let no_data = BufMut::unpooled(0).freeze();
    match *msg {
        Message::DigestReq { offset, len, .. } => Some(Message::Digests { offset, len, data: no_data }),
        Message::ReadReq { id, .. } => Some(Message::ReadData { id, errno: libc::EIO, data: no_data }),
        _ => None,
    }
}

/// Messages links handed to the core (the seeds' test checks that they get that far).
static DELIVERED: AtomicU64 = AtomicU64::new(0);

/// What the link promises the core: no handshake or keepalive frames, and data-path
/// messages only inside the device. Restated here on purpose rather than calling the
/// link's own check: an oracle that shares the code under test checks nothing.
fn check_for_core(msg: &Message, size_bytes: u64) {
    DELIVERED.fetch_add(1, Ordering::Relaxed);
    let (offset, len) = match msg {
        Message::Hello(_)
        | Message::Ping { .. }
        | Message::Pong { .. }
        | Message::Bye { .. }
        | Message::AuthChallenge { .. }
        | Message::AuthResponse { .. } => panic!("the link passed a {} on to the core", msg.kind().name()),
        Message::Write { offset, data, .. } | Message::ResyncData { offset, data } => {
            (*offset, data.len() as u64)
        }
        Message::Trim { offset, len, .. }
        | Message::WriteZeroes { offset, len, .. }
        | Message::ResyncZeroes { offset, len }
        | Message::ResyncAck { offset, len, .. }
        | Message::Digests { offset, len, .. } => (*offset, *len),
        // A read request asks for what one answer carries (1 MiB of digests, one
        // frame of data), or no node would answer it.
        Message::DigestReq { offset, len, .. } => {
            assert!((1..=1 << 20).contains(len), "DigestReq of {len} bytes");
            (*offset, *len)
        }
        Message::ReadReq { offset, len, .. } => {
            assert!(*len <= 32 << 20, "ReadReq of {len} bytes");
            (*offset, *len)
        }
        _ => return,
    };
    let end = offset.checked_add(len);
    assert!(
        end.is_some_and(|e| e <= size_bytes),
        "{} of {offset}+{len} past {size_bytes}",
        msg.kind().name()
    );
}

/// The messages `FrameReader` gets from `bytes` before its first error.
async fn read_frames(bytes: &[u8]) -> Vec<Message> {
    let mut reader = FrameReader::new(bytes, pool(), Arc::new(PeerStats::default()));
    reader.set_decompression(true);
    let mut read = Vec::new();
    while let Ok(msg) = reader.read().await {
        read.push(msg);
    }
    read
}

/// Encodes `read` again (uncompressed) and compares with the start of `input`,
/// frame by frame.
fn check_reencodes(input: &[u8], read: Vec<Message>) {
    let frame_bytes: u64 = read.iter().map(Message::wire_len).sum();
    let mut writer = FrameWriter::new(Vec::new());
    for msg in &read {
        let name = msg.kind().name();
        writer.queue(msg.clone()).unwrap_or_else(|e| panic!("a decoded {name} does not encode again: {e}"));
    }
    crate::block_on(writer.flush()).expect("writing to memory");
    let out = writer.get_ref();
    assert_eq!(out.len() as u64, frame_bytes, "wire_len disagrees with the encoding");
    let (mut i_at, mut o_at) = (0, 0);
    for msg in &read {
        let o = &out[o_at..o_at + msg.wire_len() as usize];
        let h = &input[i_at..i_at + FRAME_HEADER_BYTES];
        let i_len = FRAME_HEADER_BYTES + u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        let i = &input[i_at..i_at + i_len];
        let flags = u16::from_be_bytes([h[6], h[7]]);
        if flags & FLAG_COMPRESSED != 0 {
            let data_len = msg.data().map_or(0, |d| d.len());
            let fixed_end = o.len() - data_len;
            assert!(i[..6] == o[..6] && i[8..16] == o[8..16], "a compressed frame's header changed");
            assert!(
                i[FRAME_HEADER_BYTES..fixed_end] == o[FRAME_HEADER_BYTES..fixed_end],
                "its fixed part changed"
            );
            let declared = u32::from_be_bytes(i[fixed_end..fixed_end + 4].try_into().expect("4 bytes"));
            assert_eq!(declared as usize, data_len, "decoded data of another length than declared");
            assert!(i.len() < o.len(), "a compressed frame not smaller than raw");
        } else if i != o {
            let at = o.iter().zip(i).position(|(a, b)| a != b).unwrap_or(o.len());
            panic!("decoding then encoding changed the frames at byte {}", i_at + at);
        }
        i_at += i_len;
        o_at += o.len();
    }
}

/// One shared pool per thread, as a link has one for its whole life.
fn pool() -> BufPool {
    thread_local!(static POOL: BufPool = BufPool::default());
    POOL.with(BufPool::clone)
}

/// A frame of `kind` around `payload`, sequence 0, with a correct crc32c.
fn frame(kind: Kind, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut f =
        Bytes::default().u32(FRAME_MAGIC).u16(kind.code()).u16(flags).u64(0).u32(len).u32(0).raw(payload).0;
    let crc = crc32c::crc32c(&f);
    f[FRAME_HEADER_BYTES - 4..FRAME_HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
    f
}

fn buf(bytes: &[u8]) -> Buf {
    let mut b = pool().get(bytes.len());
    b.copy_from_slice(bytes);
    b.freeze()
}

const GENS: Generations = Generations { current: 0x1111, bitmap: 0x2222, history: [0x3333, 0x4444, 0, 0] };

/// A peer's Hello: a 64 MiB device.
fn remote_hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: blockd::peer::msg::FEATURE_AUTH,
        resource: "r0".into(),
        node: "alpha".into(),
        size_bytes: 64 << 20,
        granularity_bytes: 4096,
        protocol: Protocol::C,
        role: Role::Primary,
        disk: DiskState::UpToDate,
        gens: GENS,
        flags: 0,
    }
}

/// One message of every kind, as a node sends them.
pub fn sample_messages() -> Vec<Message> {
    let gens = GENS;
    let mut bitmap_block = [0u8; bitmap::BLOCK_BYTES];
    bitmap_block[..4].copy_from_slice(&[0xff, 0x0f, 0, 0x80]);
    vec![
        Message::Hello(remote_hello()),
        Message::AuthChallenge { nonce: [7; AUTH_BYTES] },
        Message::AuthResponse { mac: [9; AUTH_BYTES] },
        Message::Ping { nonce: 1 },
        Message::Pong { nonce: 1 },
        Message::Write { id: 1, epoch: 1, offset: 4096, fua: true, data: buf(&[0x5a; 512]) },
        Message::Trim { id: 2, epoch: 1, offset: 0, len: 8192, fua: false },
        Message::WriteZeroes { id: 3, epoch: 1, offset: 8192, len: 4096, may_trim: true, fua: true },
        Message::RecvAck { id: 1 },
        Message::WriteAck { id: 1, errno: 0 },
        Message::Barrier { epoch: 1, flush: true },
        Message::BarrierAck { epoch: 1, errno: 5 },
        Message::State { role: Role::Secondary, disk: DiskState::Outdated },
        Message::BitmapBlock { index: 0, data: buf(&bitmap_block) },
        Message::BitmapDone { blocks: 1 },
        Message::ResyncInfo { done_bytes: 0, total_bytes: 1 << 20 },
        Message::ResyncData { offset: 0, data: buf(&[1; 4096]) },
        Message::ResyncZeroes { offset: 4096, len: 1 << 16 },
        Message::ResyncAck { offset: 0, len: 4096, errno: 0 },
        Message::SyncPause { paused: true },
        Message::ResyncDone { gens },
        Message::DigestReq { offset: 0, len: 8192, after_epoch: 1 },
        Message::Digests { offset: 0, len: 8192, data: buf(&[0xd1; 32]) },
        Message::StartRepair { bytes: 4096 },
        Message::Invalidate,
        Message::ReadReq { id: 4, offset: 8192, len: 4096, after_epoch: 1 },
        Message::ReadData { id: 4, errno: 0, data: buf(&[0x6b; 4096]) },
        Message::ResyncFlush { id: 3 },
        Message::ResyncFlushed { id: 3 },
        Message::ConnectState { gens, role: Role::Secondary, disk: DiskState::UpToDate, flags: 1 },
        Message::StatePrepare { tid: 9, change: StateChange::Promote { force: false } },
        Message::StateReply { tid: 9, yes: false, reason: "the peer is Primary".into() },
        Message::StateCommit { tid: 9 },
        Message::StateAbort { tid: 10 },
        Message::Ahead { queued_bytes: 64 << 20 },
        Message::Bye { reason: "shutting down".into() },
    ]
}

fn encode(messages: Vec<Message>) -> Vec<u8> {
    encode_at(messages, None)
}

/// [`encode`], compressing at `level` (what does not shrink goes raw).
fn encode_at(messages: Vec<Message>, level: Option<i32>) -> Vec<u8> {
    let mut writer = FrameWriter::new(Vec::new());
    writer.set_compression(level);
    for m in messages {
        writer.queue(m).expect("samples fit a frame");
    }
    crate::block_on(writer.flush()).expect("writing to memory");
    writer.get_ref().clone()
}

/// Seeds of `peer_frames`: a whole session in one stream, and its handshake alone.
pub fn frame_seeds() -> Vec<Seed> {
    let all = sample_messages();
    let handshake = all[..3].to_vec();
    vec![
        ("seed-session-zstd".into(), encode_at(all.clone(), Some(LEVEL))),
        ("seed-session".into(), encode(all)),
        ("seed-handshake".into(), encode(handshake)),
    ]
}

/// Seeds of `peer_link`: the data path and resync after a handshake, with a Ping.
pub fn link_seeds() -> Vec<Seed> {
    let after_handshake: Vec<Message> = sample_messages().into_iter().skip(3).collect();
    vec![
        ("seed-after-handshake-zstd".into(), encode_at(after_handshake.clone(), Some(LEVEL))),
        ("seed-after-handshake".into(), encode(after_handshake)),
    ]
}

/// Seeds of `peer_msg`: code and payload of one sample per kind. Fails if a kind has
/// no sample (add one to [`sample_messages`]).
pub fn msg_seeds() -> Vec<Seed> {
    let samples = sample_messages();
    for kind in Kind::ALL {
        assert!(samples.iter().any(|m| m.kind() == kind), "no sample message of kind {}", kind.name());
    }
    let compressed = samples.iter().filter(|m| m.kind().compressible()).cloned().collect::<Vec<_>>();
    let raw = samples.into_iter().map(|m| (m, None));
    raw.chain(compressed.into_iter().map(|m| (m, Some(LEVEL))))
        .map(|(m, level)| {
            let suffix = if level.is_some() { "-zstd" } else { "" };
            let name = format!("seed-{}{suffix}", m.kind().name());
            let frame = encode_at(vec![m], level);
            let flags = u16::from_be_bytes([frame[6], frame[7]]);
            assert_eq!(flags != 0, level.is_some(), "{name}: the sample compresses");
            let code =
                u16::from_be_bytes([frame[4], frame[5]]) | if flags != 0 { COMPRESSED_CODE } else { 0 };
            (name, Bytes::default().u16(code).raw(&frame[FRAME_HEADER_BYTES..]).0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_and_reencode() {
        for (_, s) in frame_seeds() {
            assert!(crate::block_on(read_frames(&s)).len() > 1);
            peer_frames(&s);
        }
        for (_, s) in link_seeds() {
            let before = DELIVERED.load(Ordering::Relaxed);
            peer_link(&s);
            // Everything but Ping, Pong and Bye reaches the core.
            assert_eq!(DELIVERED.load(Ordering::Relaxed) - before, Kind::ALL.len() as u64 - 6);
        }
        for (name, s) in msg_seeds() {
            let code = u16::from_be_bytes([s[0], s[1]]);
            let flags = if code & COMPRESSED_CODE != 0 { FLAG_COMPRESSED } else { 0 };
            let kind = Kind::from_code(code & !COMPRESSED_CODE).expect("a known code");
            assert_eq!(crate::block_on(read_frames(&frame(kind, flags, &s[2..]))).len(), 1, "{name}");
            peer_msg(&s);
        }
    }
}
