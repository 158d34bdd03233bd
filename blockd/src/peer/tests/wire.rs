//! Wire format: round trips of every message, and every kind of corruption ending
//! the stream with the right error and counter and nothing delivered.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nbd_server::buf::{BufMut, BufPool, MAX_BUF_BYTES};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::peer::msg::{Kind, MAX_REASON_BYTES};
use crate::peer::{MAX_FRAME_PAYLOAD_BYTES, PeerStatsSnapshot};

#[tokio::test]
async fn every_message_round_trips_with_random_fields() {
    let mut rng = StdRng::seed_from_u64(0x5eed_b10c);
    let mut sent = Vec::new();
    for len in [0, 1, 511, 4096, 65_539, 1 << 20] {
        sent.extend(random_messages(&mut rng, len));
    }
    for _ in 0..20 {
        let len = rng.random_range(0..300_000);
        sent.extend(random_messages(&mut rng, len));
    }
    let bytes = encode(sent.clone()).await;
    assert_eq!(bytes.len() as u64, sent.iter().map(Message::wire_len).sum::<u64>());

    let (got, end, stats) = decode_all(&bytes).await;
    assert!(matches!(end, LinkError::Eof), "{end}");
    assert_eq!(stats, PeerStatsSnapshot::default(), "a clean stream counts nothing");
    assert_eq!(got.len(), sent.len());
    for (g, w) in got.iter().zip(&sent) {
        assert_same(g, w);
    }
    let kinds: std::collections::HashSet<Kind> = got.iter().map(Message::kind).collect();
    assert_eq!(kinds.len(), Kind::ALL.len(), "every type was exercised");
}

#[tokio::test]
async fn largest_data_round_trips() {
    let mut rng = StdRng::seed_from_u64(32);
    let data = random_data(&mut rng, MAX_BUF_BYTES);
    for msg in [
        Message::Write { id: 1, epoch: 2, offset: 3 << 40, fua: true, data: data.clone() },
        Message::ResyncData { offset: u64::MAX - 7, data: data.clone() },
    ] {
        let bytes = encode(vec![msg.clone()]).await;
        let (got, end, _) = decode_all(&bytes).await;
        assert!(matches!(end, LinkError::Eof), "{end}");
        assert_eq!(got.len(), 1);
        assert_same(&got[0], &msg);
    }
}

#[tokio::test]
async fn names_and_reasons_are_bounded() {
    let long = "x".repeat(2000);
    let bytes = encode(vec![Message::Bye { reason: long }]).await;
    let (got, _, _) = decode_all(&bytes).await;
    let Message::Bye { reason } = &got[0] else { panic!("{got:?}") };
    assert_eq!(reason.len(), MAX_REASON_BYTES, "a long reason is cut, not refused");
    // A cut never splits a character: byte 1024 is inside an `é` here.
    let bytes = encode(vec![Message::Bye { reason: format!("a{}", "é".repeat(600)) }]).await;
    let (got, _, _) = decode_all(&bytes).await;
    let Message::Bye { reason } = &got[0] else { panic!("{got:?}") };
    assert_eq!(reason.len(), 1023);
}

/// Reads `bytes`, expecting `delivered` good messages and then an error for which
/// `is` holds; the counters must show exactly `counted`.
async fn expect_error(
    bytes: &[u8],
    delivered: usize,
    is: impl Fn(&LinkError) -> bool,
    counted: impl Fn(&mut PeerStatsSnapshot),
) {
    let (got, end, stats) = decode_all(bytes).await;
    assert_eq!(got.len(), delivered, "messages before the error: {got:?}");
    assert!(is(&end), "unexpected error: {end:?}");
    let mut want = PeerStatsSnapshot::default();
    counted(&mut want);
    assert_eq!(stats, want, "after {end}");
}

fn ping(seq: u64) -> Vec<u8> {
    raw_frame(Kind::Ping.code(), 0, seq, &7u64.to_be_bytes())
}

#[tokio::test]
async fn bad_magic() {
    let mut f = ping(0);
    f[0] ^= 0x20;
    expect_error(&f, 0, |e| matches!(e, LinkError::BadMagic { found: 0x624C_4B44 }), |s| s.bad_magic = 1)
        .await;
}

#[tokio::test]
async fn every_header_bit_flip_is_caught() {
    let mut rng = StdRng::seed_from_u64(1);
    let msg = Message::Write { id: 9, epoch: 1, offset: 4096, fua: false, data: random_data(&mut rng, 100) };
    let good = encode(vec![msg]).await;
    for bit in 0..FRAME_HEADER_BYTES * 8 {
        let mut f = good.clone();
        f[bit / 8] ^= 0x80 >> (bit % 8);
        let (got, end, stats) = decode_all(&f).await;
        assert!(got.is_empty(), "bit {bit}: delivered {got:?}");
        let field_ok = match bit {
            0..32 => matches!(end, LinkError::BadMagic { .. }) && stats.bad_magic == 1,
            // Type and length decide how the payload is read, so they are checked
            // first and can fail in several ways; all of them end the stream.
            32..48 | 128..160 => !matches!(end, LinkError::Eof),
            // Flags, sequence and the crc itself: only the crc can tell.
            _ => matches!(end, LinkError::BadCrc { .. }) && stats.bad_crc == 1,
        };
        assert!(field_ok, "bit {bit}: {end:?}");
    }
}

#[tokio::test]
async fn every_payload_bit_flip_is_a_crc_error() {
    let mut rng = StdRng::seed_from_u64(2);
    let data = random_data(&mut rng, 64);
    let msgs = [
        Message::Write { id: 1, epoch: 2, offset: 3, fua: true, data: data.clone() },
        Message::Hello(hello("alpha")),
        Message::Barrier { epoch: 5, flush: true },
    ];
    for msg in msgs {
        let good = encode(vec![msg.clone()]).await;
        for bit in FRAME_HEADER_BYTES * 8..good.len() * 8 {
            let mut f = good.clone();
            f[bit / 8] ^= 0x80 >> (bit % 8);
            expect_error(&f, 0, |e| matches!(e, LinkError::BadCrc { .. }), |s| s.bad_crc = 1).await;
        }
    }
}

#[tokio::test]
async fn unknown_type() {
    let f = raw_frame(0x0099, 0, 0, &[0; 8]);
    expect_error(&f, 0, |e| matches!(e, LinkError::BadType { code: 0x99 }), |s| s.bad_type = 1).await;
}

#[tokio::test]
async fn oversize_length_is_refused_before_reading_the_payload() {
    let mut f = raw_frame(Kind::Write.code(), 0, 0, &[]);
    f[16..20].copy_from_slice(&(MAX_FRAME_PAYLOAD_BYTES as u32 + 1).to_be_bytes());
    // Only the header is there: reading on would end in `Truncated` instead.
    let want = (MAX_FRAME_PAYLOAD_BYTES + 1) as u64;
    expect_error(&f, 0, |e| matches!(e, LinkError::Oversize { len } if *len == want), |s| s.oversize = 1)
        .await;
}

#[tokio::test]
async fn data_over_32_mib_is_a_length_error() {
    // Within the frame limit, but the data part would exceed the largest buffer.
    let mut f = raw_frame(Kind::ResyncData.code(), 0, 0, &[]);
    f[16..20].copy_from_slice(&(8 + MAX_BUF_BYTES as u32 + 1).to_be_bytes());
    expect_error(
        &f,
        0,
        |e| matches!(e, LinkError::BadLength { kind: "ResyncData", .. }),
        |s| s.bad_length = 1,
    )
    .await;
}

#[tokio::test]
async fn truncated_frame_at_every_length() {
    let mut rng = StdRng::seed_from_u64(3);
    let msg = Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: random_data(&mut rng, 40) };
    let good = encode(vec![Message::Ping { nonce: 1 }, msg]).await;
    let first = FRAME_HEADER_BYTES + 8;
    expect_error(&good[..first], 1, |e| matches!(e, LinkError::Eof), |_| {}).await;
    for cut in first + 1..good.len() {
        expect_error(&good[..cut], 1, |e| matches!(e, LinkError::Truncated), |s| s.truncated = 1).await;
    }
}

#[tokio::test]
async fn sequence_gap_and_repeat() {
    let gap = [ping(0), ping(2)].concat();
    expect_error(&gap, 1, |e| matches!(e, LinkError::SeqGap { expected: 1, got: 2 }), |s| s.seq_gap = 1)
        .await;
    let repeat = [ping(0), ping(1), ping(1)].concat();
    expect_error(&repeat, 2, |e| matches!(e, LinkError::SeqGap { expected: 2, got: 1 }), |s| s.seq_gap = 1)
        .await;
    let late_start = ping(1);
    expect_error(
        &late_start,
        0,
        |e| matches!(e, LinkError::SeqGap { expected: 0, got: 1 }),
        |s| s.seq_gap = 1,
    )
    .await;
}

#[tokio::test]
async fn nonzero_flags() {
    let f = raw_frame(Kind::Ping.code(), 0x0100, 0, &[0; 8]);
    expect_error(&f, 0, |e| matches!(e, LinkError::BadFlags { flags: 0x0100 }), |s| s.bad_flags = 1).await;
}

#[tokio::test]
async fn wrong_fixed_lengths() {
    let hello_payload = {
        let bytes = encode(vec![Message::Hello(hello("alpha"))]).await;
        bytes[FRAME_HEADER_BYTES..].to_vec()
    };
    let mut hello_long_name = hello_payload.clone();
    let last_str_len_at = hello_payload.len() - "alpha".len() - 2;
    hello_long_name[last_str_len_at + 1] += 1; // the node name claims one byte more than there is
    let mut hello_trailing = hello_payload.clone();
    hello_trailing.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Ping", raw_frame(Kind::Ping.code(), 0, 0, &[0; 9])),
        ("Ping", raw_frame(Kind::Ping.code(), 0, 0, &[0; 7])),
        ("Write", raw_frame(Kind::Write.code(), 0, 0, &[0; 24])),
        ("State", raw_frame(Kind::State.code(), 0, 0, &[1])),
        ("ResyncDone", raw_frame(Kind::ResyncDone.code(), 0, 0, &[0; 49])),
        ("Bye", raw_frame(Kind::Bye.code(), 0, 0, &[0, 2, b'o', b'k', b'!'])),
        ("Bye", raw_frame(Kind::Bye.code(), 0, 0, &[0])),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &hello_long_name)),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &hello_trailing)),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &hello_payload[..hello_payload.len() - 1])),
    ];
    for (kind, f) in cases {
        expect_error(
            &f,
            0,
            |e| matches!(e, LinkError::BadLength { kind: k, .. } if *k == kind),
            |s| s.bad_length = 1,
        )
        .await;
    }
}

#[tokio::test]
async fn malformed_fields() {
    let hello_payload = {
        let bytes = encode(vec![Message::Hello(hello("alpha"))]).await;
        bytes[FRAME_HEADER_BYTES..].to_vec()
    };
    let mut bad_protocol = hello_payload.clone();
    bad_protocol[24] = b'D'; // version 4, features 8, size 8, granularity 4
    let mut bad_disk = hello_payload.clone();
    bad_disk[26] = 0;
    let mut bad_utf8 = hello_payload.clone();
    let at = hello_payload.len() - 1;
    bad_utf8[at] = 0xff;
    let mut write = vec![0u8; 25];
    write[24] = 0x02; // only bit 0 (fua) is defined
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("State", raw_frame(Kind::State.code(), 0, 0, &[9, 1])),
        ("State", raw_frame(Kind::State.code(), 0, 0, &[1, 0])),
        ("Write", raw_frame(Kind::Write.code(), 0, 0, &write)),
        ("WriteZeroes", raw_frame(Kind::WriteZeroes.code(), 0, 0, &[[0; 32].as_slice(), &[4]].concat())),
        ("Barrier", raw_frame(Kind::Barrier.code(), 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0, 3])),
        ("Bye", raw_frame(Kind::Bye.code(), 0, 0, &[0, 2, 0xc3, 0x28])),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &bad_protocol)),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &bad_disk)),
        ("Hello", raw_frame(Kind::Hello.code(), 0, 0, &bad_utf8)),
    ];
    for (kind, f) in cases {
        expect_error(
            &f,
            0,
            |e| matches!(e, LinkError::Malformed { kind: k, .. } if *k == kind),
            |s| s.malformed = 1,
        )
        .await;
    }
}

#[tokio::test]
async fn other_hello_version_is_reported_as_such() {
    let mut h = hello("alpha");
    h.version = 5;
    let bytes = encode(vec![Message::Hello(h)]).await;
    expect_error(&bytes, 0, |e| matches!(e, LinkError::Version { remote: 5 }), |s| s.malformed = 1).await;
}

#[tokio::test]
async fn writer_refuses_data_over_32_mib_and_sends_nothing() {
    let mut w = FrameWriter::new(Vec::new());
    let data = BufMut::unpooled(MAX_BUF_BYTES + 1).freeze();
    let err =
        w.queue(Message::Write { id: 1, epoch: 0, offset: 0, fua: false, data }).expect_err("too large");
    assert!(matches!(err, LinkError::TooLarge { kind: "Write", .. }), "{err}");
    w.flush().await.expect("flush");
    assert!(w.get_ref().is_empty());
    // The sequence number was not used up: the next frame is still frame 0.
    w.send(Message::Ping { nonce: 1 }).await.expect("send");
    let (got, end, _) = decode_all(w.get_ref()).await;
    assert_eq!(got.len(), 1);
    assert!(matches!(end, LinkError::Eof));
}

/// Records where each `writev` segment pointed, to prove data is not copied.
#[derive(Default)]
struct RecordingWriter {
    calls: Vec<Vec<(usize, usize)>>,
    bytes: Vec<u8>,
}

impl tokio::io::AsyncWrite for RecordingWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.calls.push(bufs.iter().map(|b| (b.as_ptr() as usize, b.len())).collect());
        let mut n = 0;
        for b in bufs {
            self.bytes.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn data_is_sent_from_the_callers_buffer_in_one_writev() {
    let mut rng = StdRng::seed_from_u64(4);
    let a = random_data(&mut rng, 8192);
    let b = random_data(&mut rng, 100);
    let mut w = FrameWriter::new(RecordingWriter::default());
    w.queue(Message::Write { id: 1, epoch: 0, offset: 0, fua: false, data: a.clone() }).unwrap();
    w.queue(Message::RecvAck { id: 0 }).unwrap();
    w.queue(Message::ResyncData { offset: 0, data: b.clone() }).unwrap();
    w.queue(Message::Barrier { epoch: 0, flush: true }).unwrap();
    w.flush().await.unwrap();
    let calls = &w.get_ref().calls;
    assert_eq!(calls.len(), 1, "one vectored write for the batch");
    let segs = &calls[0];
    assert_eq!(segs.len(), 5, "head, data, head, data, head: {segs:?}");
    assert_eq!(segs[1], (a.as_ptr() as usize, a.len()), "data segment is the caller's buffer");
    assert_eq!(segs[3], (b.as_ptr() as usize, b.len()));
    let (got, end, _) = decode_all(&w.get_ref().bytes).await;
    assert_eq!(got.len(), 4);
    assert!(matches!(end, LinkError::Eof));
}

#[tokio::test]
async fn data_is_received_into_a_pool_buffer() {
    let mut rng = StdRng::seed_from_u64(5);
    let bytes = encode(vec![Message::Write {
        id: 1,
        epoch: 0,
        offset: 0,
        fua: false,
        data: random_data(&mut rng, 65536),
    }])
    .await;
    let pool = BufPool::default();
    let mut r = FrameReader::new(&bytes[..], pool.clone(), Arc::new(PeerStats::default()));
    let msg = r.read().await.expect("a Write");
    let ptr = msg.data().expect("data").as_ptr();
    drop(msg);
    assert_eq!(pool.get(65536).as_ptr(), ptr, "the data buffer came from (and went back to) the pool");
}
