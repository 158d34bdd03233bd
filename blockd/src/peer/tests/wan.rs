//! Compression and pacing (issue 15): compressed frames round trip, data that does
//! not shrink goes raw, bad compressed frames end the stream (counted, nothing
//! delivered, no panic), a compressed link counts wire and uncompressed bytes, and
//! a paced link keeps flowing (no timeout) while `Sent` reports its pieces.

use std::time::Duration;

use nbd_server::buf::{BufMut, MAX_BUF_BYTES};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use super::link::{Side, expect_sent, linked_pair_with, next, raw_peer};
use super::*;
use crate::peer::frame::FLAG_COMPRESSED;
use crate::peer::link::{LinkEvent, LinkSettings};
use crate::peer::msg::Kind;

/// `len` bytes of text-like data (compresses well).
fn text(len: usize) -> Buf {
    let mut b = BufMut::unpooled(len);
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = b"replicated block device; "[i % 25].wrapping_add((i / 4096) as u8 % 3);
    }
    b.freeze()
}

/// The frames of `bytes`: (type code, flags, whole frame length).
fn frames_of(bytes: &[u8]) -> Vec<(u16, u16, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let h = &bytes[at..at + FRAME_HEADER_BYTES];
        let len = FRAME_HEADER_BYTES + u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        out.push((u16::from_be_bytes([h[4], h[5]]), u16::from_be_bytes([h[6], h[7]]), len));
        at += len;
    }
    out
}

async fn decode_compressed(bytes: &[u8]) -> (Vec<Message>, LinkError, PeerStatsSnapshot) {
    decode_all_with(bytes, true).await
}

async fn encode_compressed(msgs: Vec<Message>, level: i32) -> Vec<u8> {
    encode_at(msgs, Some(level)).await
}

#[tokio::test]
async fn compressed_frames_round_trip_and_what_does_not_shrink_goes_raw() {
    let mut rng = StdRng::seed_from_u64(15);
    let sent = vec![
        Message::Write { id: 1, epoch: 2, offset: 4096, fua: true, data: text(64 << 10) },
        Message::ResyncData { offset: 1 << 20, data: text(1 << 20) },
        Message::Write { id: 2, epoch: 2, offset: 0, fua: false, data: random_data(&mut rng, 64 << 10) },
        Message::BitmapBlock { index: 3, data: text(4096) },
        Message::Write { id: 3, epoch: 2, offset: 0, fua: false, data: text(100) },
        Message::Barrier { epoch: 2, flush: true },
        Message::Write { id: 4, epoch: 3, offset: 0, fua: false, data: text(MAX_BUF_BYTES) },
        Message::ResyncData { offset: 0, data: BufMut::unpooled(0).freeze() },
    ];
    for level in [1, 3, 19] {
        let bytes = encode_compressed(sent.clone(), level).await;
        let flags: Vec<(u16, u16)> =
            frames_of(&bytes).iter().map(|&(code, flags, _)| (code, flags)).collect();
        let c = FLAG_COMPRESSED;
        let (w, r, b, bar) =
            (Kind::Write.code(), Kind::ResyncData.code(), Kind::BitmapBlock.code(), Kind::Barrier.code());
        assert_eq!(
            flags,
            [(w, c), (r, c), (w, 0), (b, 0), (w, 0), (bar, 0), (w, c), (r, 0)],
            "level {level}"
        );
        let logical: u64 = sent.iter().map(Message::wire_len).sum();
        assert!((bytes.len() as u64) * 10 < logical, "level {level}: {} of {logical}", bytes.len());
        // The random write went raw: exactly its uncompressed length.
        assert_eq!(frames_of(&bytes)[2].2 as u64, sent[2].wire_len());

        let (got, end, stats) = decode_compressed(&bytes).await;
        assert!(matches!(end, LinkError::Eof), "{end}");
        assert_eq!(stats, PeerStatsSnapshot::default());
        assert_eq!(got.len(), sent.len());
        for (g, w) in got.iter().zip(&sent) {
            assert_same(g, w);
        }
    }
    // A reader that did not agree to compression refuses the first compressed frame.
    let bytes = encode_compressed(sent[..1].to_vec(), 3).await;
    let (got, end, stats) = decode_all(&bytes).await;
    assert!(got.is_empty() && matches!(end, LinkError::BadFlags { flags: 1 }), "{end}");
    assert_eq!(stats.bad_flags, 1);
}

/// A `Write` frame (id 1, epoch 1, offset 0) with `flags`, declaring `raw_len`
/// bytes that `packed` decompresses to.
fn packed_write(flags: u16, raw_len: u32, packed: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: BufMut::unpooled(0).freeze() }
        .encode_fixed(&mut payload);
    payload.extend_from_slice(&raw_len.to_be_bytes());
    payload.extend_from_slice(packed);
    raw_frame(Kind::Write.code(), flags, 0, &payload)
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("compress")
}

#[tokio::test]
async fn bad_compressed_frames_end_the_stream_and_are_counted() {
    let zeros = zstd_of(&vec![0u8; 64 << 10]);
    let malformed = |what: &'static str| move |e: &LinkError| matches!(e, LinkError::Malformed { kind: "Write", what: w } if w.contains(what));
    type Is = Box<dyn Fn(&LinkError) -> bool>;
    let cases: Vec<(&str, Vec<u8>, Is)> = vec![
        // Declared 8 KiB, holds 64 KiB: a bomb against the declared buffer.
        ("bomb", packed_write(1, 8192, &zeros), Box::new(malformed("longer than its declared length"))),
        (
            "short",
            packed_write(1, 128 << 10, &zeros),
            Box::new(malformed("shorter than its declared length")),
        ),
        ("garbage", packed_write(1, 8192, &[0x5a; 100]), Box::new(malformed("corrupt"))),
        ("truncated", packed_write(1, 64 << 10, &zeros[..zeros.len() - 3]), Box::new(malformed("corrupt"))),
        (
            "over the limit",
            packed_write(1, MAX_BUF_BYTES as u32 + 1, &zeros),
            Box::new(malformed("over the frame limit")),
        ),
        ("does not shrink", packed_write(1, 20, &[1; 16]), Box::new(malformed("not smaller"))),
        (
            "unknown flag",
            packed_write(3, 64 << 10, &zeros),
            Box::new(|e: &LinkError| matches!(e, LinkError::BadFlags { flags: 3 })),
        ),
        (
            "no room for the length",
            raw_frame(Kind::Write.code(), 1, 0, &[0; 27]),
            Box::new(|e: &LinkError| matches!(e, LinkError::BadLength { .. })),
        ),
    ];
    for (name, bytes, is) in cases {
        let (got, end, stats) = decode_compressed(&bytes).await;
        assert!(got.is_empty(), "{name}: delivered {got:?}");
        assert!(is(&end), "{name}: {end}");
        assert_eq!(
            stats.malformed + stats.bad_flags + stats.bad_length,
            1,
            "{name}: counted once: {stats:?}"
        );
    }
    // The flag on a type that never compresses, with a crc that matches.
    let trim = raw_frame(Kind::Trim.code(), FLAG_COMPRESSED, 0, &[0; 33]);
    let (_, end, stats) = decode_compressed(&trim).await;
    assert!(matches!(end, LinkError::BadFlags { flags: 1 }) && stats.bad_flags == 1, "{end}");
    // A flipped flag bit on a raw frame is a crc error, found before any decompression.
    let mut raw =
        encode(vec![Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: text(4096) }]).await;
    raw[7] ^= 1;
    let (_, end, stats) = decode_compressed(&raw).await;
    assert!(matches!(end, LinkError::BadCrc { .. }) && stats.bad_crc == 1, "{end}");
    // And a good frame after all that still decodes.
    let (got, _, _) = decode_compressed(&packed_write(1, 64 << 10, &zeros)).await;
    assert!(
        matches!(&got[..], [Message::Write { data, .. }] if data.len() == 64 << 10 && data.iter().all(|&b| b == 0))
    );
}

fn zstd_link() -> LinkSettings {
    LinkSettings { compression_level: Some(3), ..LinkSettings::default() }
}

#[tokio::test]
async fn a_compressed_link_delivers_intact_and_counts_wire_and_uncompressed_bytes() {
    let (mut a, mut b) = linked_pair_with(&zstd_link(), &zstd_link()).await;
    assert!(a.stats.snapshot().compressing && b.stats.snapshot().compressing);
    let mut rng = StdRng::seed_from_u64(3);
    let msgs = vec![
        Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: text(1 << 20) },
        Message::ResyncData { offset: 1 << 20, data: text(256 << 10) },
        Message::Write { id: 2, epoch: 1, offset: 0, fua: false, data: random_data(&mut rng, 256 << 10) },
        Message::Barrier { epoch: 1, flush: false },
    ];
    let logical: u64 = msgs.iter().map(Message::wire_len).sum();
    for m in &msgs {
        a.conn.outgoing.send(m.clone()).unwrap();
    }
    for m in &msgs {
        match next(&mut b).await {
            LinkEvent::Message(got) => assert_same(&got, m),
            other => panic!("{other:?}"),
        }
    }
    // The core's accounting stays in uncompressed bytes.
    expect_sent(&mut a, logical).await;
    let s = a.stats.snapshot();
    assert_eq!(s.sent_uncompressed_bytes, logical, "no keepalive in so short a test");
    assert!(s.sent_wire_bytes < logical - (1 << 20), "{s:?}");
    assert!(s.sent_wire_bytes > 256 << 10, "the random write went raw: {s:?}");
    drop(a.conn);
    a.handle.closed().await;
    assert!(!a.stats.snapshot().compressing, "cleared when the link is down");
}

#[tokio::test]
async fn one_side_compressing_alone_is_a_bad_frame_for_the_other() {
    // The supervisor never does this (both sides decide from the same two Hellos);
    // the reader still refuses what it did not agree to.
    let (a, mut b) = linked_pair_with(&zstd_link(), &LinkSettings::default()).await;
    a.conn
        .outgoing
        .send(Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: text(8192) })
        .unwrap();
    let end = loop {
        match next(&mut b).await {
            LinkEvent::Closed(e) => break e,
            LinkEvent::Sent { .. } => {}
            LinkEvent::Message(m) => panic!("delivered {m:?}"),
        }
    };
    assert!(matches!(end, LinkError::BadFlags { flags: 1 }), "{end}");
    assert_eq!(b.stats.snapshot().bad_flags, 1);
}

/// Drains `side`'s events until the caller's `Sent` bytes reach `want`; returns how
/// many `Sent` events that took and the longest time between two. Fails on
/// anything else.
async fn sent_pieces(side: &mut Side, want: u64) -> (usize, Duration) {
    let (mut sent, mut pieces, mut longest, mut last) = (0, 0, Duration::ZERO, Instant::now());
    while sent < want {
        match next(side).await {
            LinkEvent::Sent { bytes } => {
                sent += bytes;
                pieces += 1;
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            other => panic!("expected Sent, got {other:?}"),
        }
    }
    assert_eq!(sent, want);
    (pieces, longest)
}

#[tokio::test(start_paused = true)]
async fn a_paced_link_sends_in_pieces_and_never_times_out() {
    let rate = 1u64 << 20;
    let paced = LinkSettings { replication_rate_bytes_per_sec: Some(rate), ..LinkSettings::default() };
    let (mut a, mut b) = linked_pair_with(&paced, &LinkSettings::default()).await;
    let mut rng = StdRng::seed_from_u64(9);
    // 12 s of writes at this rate, far past the 5 s idle timeout, and past a 10 s
    // ack-timeout if progress were reported per batch; one 8 MiB frame among them.
    let mut msgs: Vec<Message> = (0..4)
        .map(|id| Message::Write {
            id,
            epoch: 1,
            offset: 0,
            fua: false,
            data: random_data(&mut rng, 1 << 20),
        })
        .collect();
    msgs.push(Message::Write {
        id: 4,
        epoch: 1,
        offset: 0,
        fua: false,
        data: random_data(&mut rng, 8 << 20),
    });
    msgs.push(Message::Barrier { epoch: 1, flush: true });
    let logical: u64 = msgs.iter().map(Message::wire_len).sum();
    let start = Instant::now();
    for m in &msgs {
        a.conn.outgoing.send(m.clone()).unwrap();
    }
    let receiving = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 6 {
            match next(&mut b).await {
                LinkEvent::Message(m) => got.push(m),
                other => panic!("{other:?}"),
            }
        }
        (got, b)
    });
    let (pieces, longest) = sent_pieces(&mut a, logical).await;
    let elapsed = start.elapsed();
    let (got, b) = receiving.await.unwrap();
    for (g, w) in got.iter().zip(&msgs) {
        assert_same(g, w);
    }
    // On tokio's virtual clock: the bucket's arithmetic, not this machine's speed.
    let floor = Duration::from_secs_f64((logical as f64 - rate as f64 / 10.0) / rate as f64);
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
    // The core hears of progress every few tens of ms (ack-timeout is 2 s at least).
    assert!(pieces > 100 && longest < Duration::from_millis(100), "{pieces} pieces, {longest:?} apart");
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    assert_eq!((sa.timeouts, sb.timeouts), (0, 0));
    assert!(sa.sent_wire_bytes >= logical && sa.sent_wire_bytes == sa.sent_uncompressed_bytes, "{sa:?}");
    println!(
        "paced at {rate} B/s: {logical} bytes in {elapsed:?}, {pieces} Sent events, at most {longest:?} apart"
    );
}

#[tokio::test(start_paused = true)]
async fn pacing_holds_only_application_writes() {
    let paced = LinkSettings { replication_rate_bytes_per_sec: Some(64 << 10), ..LinkSettings::default() };
    let (mut side, mut peer_r, _peer_w) = raw_peer(&paced, 4 << 20);
    // Resync data and acks are not paced: 2 MiB go at once at a 64 KiB/s rate.
    let mut rng = StdRng::seed_from_u64(4);
    let msgs: Vec<Message> = (0..2)
        .map(|i| Message::ResyncData { offset: i << 20, data: random_data(&mut rng, 1 << 20) })
        .chain([Message::WriteAck { id: 1, errno: 0 }, Message::BarrierAck { epoch: 1, errno: 0 }])
        .collect();
    let logical: u64 = msgs.iter().map(Message::wire_len).sum();
    let start = Instant::now();
    for m in &msgs {
        side.conn.outgoing.send(m.clone()).unwrap();
    }
    for _ in &msgs {
        within(peer_r.read()).await.unwrap();
    }
    expect_sent(&mut side, logical).await;
    assert_eq!(start.elapsed(), Duration::ZERO, "nothing waited for tokens");
}
