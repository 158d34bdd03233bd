//! Tests of the peer protocol: wire format and corruption (`wire`), the link over
//! in-memory pipes (`link`), the handshake (`handshake`), the supervisor over
//! real loopback TCP (`dial`), and compression and pacing (`wan`).

mod dial;
mod handshake;
mod link;
mod tls;
mod wan;
mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nbd_server::buf::{Buf, BufMut, BufPool};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use super::frame::{FRAME_HEADER_BYTES, FRAME_MAGIC, FrameReader, FrameWriter};
use super::msg::{Hello, Message, PROTOCOL_VERSION, StateChange};
use super::{LinkError, PeerStats, PeerStatsSnapshot};
use crate::config::Protocol;
use crate::state::{DiskState, Generations, Role};

/// Long enough for any healthy step on a loaded machine; a hang fails the test
/// instead of blocking the suite. (On the paused clock it is virtual time.)
const DEADLINE: Duration = Duration::from_secs(30);

/// `f`'s output, or a failure if it takes longer than [`DEADLINE`].
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f).await.expect("finished before the deadline")
}

/// A Hello for node `node` of resource `r0` (1 GiB, 4 KiB granularity, protocol C).
fn hello(node: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        resource: "r0".into(),
        node: node.into(),
        size_bytes: 1 << 30,
        granularity_bytes: 4096,
        protocol: Protocol::C,
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        gens: Generations { current: 0x1111, bitmap: 0, history: [0x2222, 0, 0, 0] },
        flags: 0,
    }
}

/// `len` bytes of seeded random data in a pool-less buffer.
fn random_data(rng: &mut StdRng, len: usize) -> Buf {
    let mut b = BufMut::unpooled(len);
    rng.fill_bytes(&mut b);
    b.freeze()
}

/// A frame built by hand: any type code, flags, sequence and payload, with a correct
/// crc (so the test reaches the check it aims at).
fn raw_frame(code: u16, flags: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    f.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f[20..24].copy_from_slice(&crc.to_be_bytes());
    f
}

/// The bytes a fresh [`FrameWriter`] produces for `msgs` (sequence from 0).
async fn encode(msgs: Vec<Message>) -> Vec<u8> {
    encode_at(msgs, None).await
}

/// [`encode`] with compression at `level`.
async fn encode_at(msgs: Vec<Message>, level: Option<i32>) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    w.set_compression(level);
    for m in msgs {
        w.queue(m).expect("encodable");
        if w.batch_full() {
            w.flush().await.expect("write to memory");
        }
    }
    w.flush().await.expect("write to memory");
    w.get_ref().clone()
}

/// Reads every frame from `bytes` until the first error; returns the messages, the
/// error and the counters.
async fn decode_all(bytes: &[u8]) -> (Vec<Message>, LinkError, PeerStatsSnapshot) {
    decode_all_with(bytes, false).await
}

/// [`decode_all`], accepting compressed frames if `decompress`.
async fn decode_all_with(bytes: &[u8], decompress: bool) -> (Vec<Message>, LinkError, PeerStatsSnapshot) {
    let stats = Arc::new(PeerStats::default());
    let mut r = FrameReader::new(bytes, BufPool::default(), stats.clone());
    r.set_decompression(decompress);
    let mut out = Vec::new();
    loop {
        match r.read().await {
            Ok(m) => out.push(m),
            Err(e) => return (out, e, stats.snapshot()),
        }
    }
}

/// Equal fields and equal data bytes (`Buf` has no `PartialEq`; its `Debug` shows the
/// length only, so fields compare through `Debug` and data byte by byte).
fn assert_same(got: &Message, want: &Message) {
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    match (got.data(), want.data()) {
        (Some(g), Some(w)) => assert!(g[..] == w[..], "{:?}: data differs", want.kind()),
        (None, None) => {}
        _ => panic!("data presence differs: {got:?} vs {want:?}"),
    }
}

/// A random valid message of every kind, with data of `data_len` bytes where the
/// type carries data.
fn random_messages(rng: &mut StdRng, data_len: usize) -> Vec<Message> {
    let roles = [Role::Primary, Role::Secondary];
    let disks = [
        DiskState::Diskless,
        DiskState::Failed,
        DiskState::Inconsistent,
        DiskState::Outdated,
        DiskState::Consistent,
        DiskState::UpToDate,
    ];
    let protocols = [Protocol::A, Protocol::B, Protocol::C];
    let gens = |rng: &mut StdRng| Generations {
        current: rng.random(),
        bitmap: rng.random(),
        history: [rng.random(), rng.random(), rng.random(), rng.random()],
    };
    let mut h = hello(&random_string(rng, 255));
    h.resource = random_string(rng, 255);
    h.features = rng.random();
    h.size_bytes = rng.random();
    h.granularity_bytes = rng.random();
    h.protocol = protocols[rng.random_range(0..3)];
    h.role = roles[rng.random_range(0..2)];
    h.disk = disks[rng.random_range(0..6)];
    h.gens = gens(rng);
    h.flags = rng.random();
    vec![
        Message::Hello(h),
        Message::Ping { nonce: rng.random() },
        Message::Pong { nonce: rng.random() },
        Message::AuthChallenge { nonce: rng.random() },
        Message::AuthResponse { mac: rng.random() },
        Message::Write {
            id: rng.random(),
            epoch: rng.random(),
            offset: rng.random(),
            fua: rng.random(),
            data: random_data(rng, data_len),
        },
        Message::Trim {
            id: rng.random(),
            epoch: rng.random(),
            offset: rng.random(),
            len: rng.random(),
            fua: rng.random(),
        },
        Message::WriteZeroes {
            id: rng.random(),
            epoch: rng.random(),
            offset: rng.random(),
            len: rng.random(),
            may_trim: rng.random(),
            fua: rng.random(),
        },
        Message::RecvAck { id: rng.random() },
        Message::WriteAck { id: rng.random(), errno: rng.random() },
        Message::Barrier { epoch: rng.random(), flush: rng.random() },
        Message::BarrierAck { epoch: rng.random(), errno: rng.random() },
        Message::State { role: roles[rng.random_range(0..2)], disk: disks[rng.random_range(0..6)] },
        Message::ResyncData { offset: rng.random(), data: random_data(rng, data_len) },
        Message::ResyncAck { offset: rng.random(), len: rng.random(), errno: rng.random() },
        Message::ResyncDone { gens: gens(rng) },
        Message::ResyncZeroes { offset: rng.random(), len: rng.random() },
        Message::BitmapBlock { index: rng.random(), data: random_data(rng, data_len) },
        Message::BitmapDone { blocks: rng.random() },
        Message::DigestReq { offset: rng.random(), len: rng.random(), after_epoch: rng.random() },
        Message::Digests { offset: rng.random(), len: rng.random(), data: random_data(rng, data_len) },
        Message::ReadReq {
            id: rng.random(),
            offset: rng.random(),
            len: rng.random(),
            after_epoch: rng.random(),
        },
        Message::ReadData { id: rng.random(), errno: rng.random(), data: random_data(rng, data_len) },
        Message::StartRepair { bytes: rng.random() },
        Message::Invalidate,
        Message::SyncPause { paused: rng.random() },
        Message::ResyncInfo { done_bytes: rng.random(), total_bytes: rng.random() },
        Message::ResyncFlush { id: rng.random() },
        Message::ResyncFlushed { id: rng.random() },
        Message::ConnectState {
            gens: gens(rng),
            role: roles[rng.random_range(0..2)],
            disk: disks[rng.random_range(0..6)],
            flags: rng.random(),
        },
        Message::StatePrepare { tid: rng.random(), change: StateChange::Promote { force: rng.random() } },
        Message::StateReply { tid: rng.random(), yes: rng.random(), reason: random_string(rng, 1024) },
        Message::StateCommit { tid: rng.random() },
        Message::StateAbort { tid: rng.random() },
        Message::Ahead { queued_bytes: rng.random() },
        Message::Bye { reason: random_string(rng, 1024) },
    ]
}

/// Random UTF-8 (ASCII, 2- and 3-byte characters) of at most `max_bytes` bytes.
fn random_string(rng: &mut StdRng, max_bytes: usize) -> String {
    const CHARS: [char; 6] = ['a', 'Z', '-', '.', 'é', '✓'];
    let target = rng.random_range(0..=max_bytes);
    let mut s = String::new();
    loop {
        let c = CHARS[rng.random_range(0..CHARS.len())];
        if s.len() + c.len_utf8() > target {
            return s;
        }
        s.push(c);
    }
}
