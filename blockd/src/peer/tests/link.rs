//! The link over in-memory pipes: delivery, `Sent` accounting, keepalive (on tokio's
//! paused clock), back-pressure, and how it closes.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::buf::BufPool;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;

use super::*;
use crate::peer::handshake::{HandshakeParams, handshake};
use crate::peer::link::{LinkEvent, LinkHandle, LinkSettings, PeerConn, spawn_link};
use crate::peer::msg::Kind;

pub(super) type Reader = ReadHalf<DuplexStream>;
pub(super) type Writer = WriteHalf<DuplexStream>;

fn params(node: &str, peer: &str) -> HandshakeParams {
    HandshakeParams {
        local: hello(node),
        expected_peer: peer.into(),
        timeout: Duration::from_secs(5),
        remote_addr: "test".into(),
        secret: None,
    }
}

pub(super) struct Side {
    pub(super) conn: PeerConn,
    pub(super) handle: LinkHandle,
    pub(super) stats: Arc<PeerStats>,
}

/// Two links joined by an in-memory pipe, after a real handshake.
async fn linked_pair() -> (Side, Side) {
    linked_pair_with(&LinkSettings::default(), &LinkSettings::default()).await
}

/// [`linked_pair`] with each side's link settings (alpha's, beta's).
pub(super) async fn linked_pair_with(settings_a: &LinkSettings, settings_b: &LinkSettings) -> (Side, Side) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let (sa, sb) = (Arc::new(PeerStats::default()), Arc::new(PeerStats::default()));
    let (pa, pb) = (params("alpha", "beta"), params("beta", "alpha"));
    let (ea, eb) = tokio::join!(
        handshake(ar, aw, &pa, BufPool::default(), sa.clone()),
        handshake(br, bw, &pb, BufPool::default(), sb.clone()),
    );
    let (ea, eb) = (ea.expect("alpha's handshake"), eb.expect("beta's handshake"));
    assert_eq!(ea.remote.node, "beta");
    let (ca, ha) = spawn_link(ea.reader, ea.writer, ea.remote, settings_a, sa.clone());
    let (cb, hb) = spawn_link(eb.reader, eb.writer, eb.remote, settings_b, sb.clone());
    (Side { conn: ca, handle: ha, stats: sa }, Side { conn: cb, handle: hb, stats: sb })
}

/// A link on one end of a pipe whose other end the test drives frame by frame.
pub(super) fn raw_peer(
    settings: &LinkSettings,
    pipe_bytes: usize,
) -> (Side, FrameReader<Reader>, FrameWriter<Writer>) {
    let (a, b) = tokio::io::duplex(pipe_bytes);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let stats = Arc::new(PeerStats::default());
    let reader = FrameReader::new(ar, BufPool::default(), stats.clone());
    let (conn, handle) = spawn_link(reader, FrameWriter::new(aw), hello("beta"), settings, stats.clone());
    let raw_reader = FrameReader::new(br, BufPool::default(), Arc::new(PeerStats::default()));
    (Side { conn, handle, stats }, raw_reader, FrameWriter::new(bw))
}

pub(super) async fn next(side: &mut Side) -> LinkEvent {
    within(side.conn.incoming.recv()).await.expect("an event before the channel closes")
}

/// Receives until the caller's messages' `Sent` bytes reach `want`; anything else
/// is a failure.
pub(super) async fn expect_sent(side: &mut Side, want: u64) {
    let mut sent = 0;
    while sent < want {
        match next(side).await {
            LinkEvent::Sent { bytes } => sent += bytes,
            other => panic!("expected Sent, got {other:?}"),
        }
    }
    assert_eq!(sent, want, "Sent adds up to the frames' bytes exactly");
}

#[tokio::test]
async fn write_of_1_mib_arrives_intact_and_sent_adds_up() {
    let (mut a, mut b) = linked_pair().await;
    let mut rng = StdRng::seed_from_u64(11);
    let msgs = vec![
        Message::Write { id: 1, epoch: 7, offset: 1 << 20, fua: true, data: random_data(&mut rng, 1 << 20) },
        Message::Barrier { epoch: 7, flush: true },
        Message::ResyncData { offset: 0, data: random_data(&mut rng, 4096) },
        Message::State { role: Role::Primary, disk: DiskState::UpToDate },
    ];
    let want: u64 = msgs.iter().map(Message::wire_len).sum();
    for m in &msgs {
        a.conn.outgoing.send(m.clone()).expect("link is up");
    }
    for m in &msgs {
        match next(&mut b).await {
            LinkEvent::Message(got) => assert_same(&got, m),
            other => panic!("expected {:?}, got {other:?}", m.kind()),
        }
    }
    expect_sent(&mut a, want).await;
    assert!(matches!(a.conn.incoming.try_recv(), Err(TryRecvError::Empty)));
}

#[tokio::test]
async fn many_small_messages_arrive_in_order() {
    let (mut a, mut b) = linked_pair().await;
    let msgs: Vec<Message> = (0..5000).map(|id| Message::WriteAck { id, errno: 0 }).collect();
    let want: u64 = msgs.iter().map(Message::wire_len).sum();
    for m in msgs {
        a.conn.outgoing.send(m).unwrap();
    }
    for id in 0..5000 {
        match next(&mut b).await {
            LinkEvent::Message(Message::WriteAck { id: got, errno: 0 }) => assert_eq!(got, id),
            other => panic!("{other:?}"),
        }
    }
    expect_sent(&mut a, want).await;
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out() {
    let settings = LinkSettings::default();
    let (mut side, _silent_reader, _silent_writer) = raw_peer(&settings, 64 << 10);
    let start = Instant::now();
    let event = next(&mut side).await;
    let elapsed = start.elapsed();
    assert!(matches!(event, LinkEvent::Closed(LinkError::Timeout { timeout_ms: 5000 })), "{event:?}");
    // On the paused clock this is exact: the timer fires at the timeout, and the next
    // ping tick (a second later) has not come.
    assert!(elapsed >= Duration::from_millis(5000) && elapsed < Duration::from_millis(6000), "{elapsed:?}");
    assert!(within(side.conn.incoming.recv()).await.is_none(), "Closed is the last event");
    within(side.handle.closed()).await;
    let stats = side.stats.snapshot();
    assert_eq!((stats.timeouts, stats.disconnects), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn idle_link_is_kept_alive_by_pings() {
    let (mut a, mut b) = linked_pair().await;
    let quiet = tokio::time::timeout(Duration::from_secs(60), a.conn.incoming.recv()).await;
    assert!(quiet.is_err(), "a minute without traffic produced {quiet:?}");
    assert!(matches!(b.conn.incoming.try_recv(), Err(TryRecvError::Empty)));
    a.conn.outgoing.send(Message::RecvAck { id: 5 }).unwrap();
    assert!(matches!(next(&mut b).await, LinkEvent::Message(Message::RecvAck { id: 5 })));
    assert_eq!(a.stats.snapshot().timeouts + b.stats.snapshot().timeouts, 0);
}

#[tokio::test]
async fn ping_is_answered_and_not_delivered() {
    let (mut side, mut raw_r, mut raw_w) = raw_peer(&LinkSettings::default(), 64 << 10);
    raw_w.send(Message::Ping { nonce: 42 }).await.unwrap();
    loop {
        match within(raw_r.read()).await.expect("frames from the link") {
            Message::Pong { nonce: 42 } => break,
            Message::Ping { .. } => {} // the link's own keepalive
            other => panic!("{other:?}"),
        }
    }
    raw_w.send(Message::RecvAck { id: 3 }).await.unwrap();
    assert!(matches!(next(&mut side).await, LinkEvent::Message(Message::RecvAck { id: 3 })));
}

#[tokio::test(start_paused = true)]
async fn reader_waits_for_room_in_incoming() {
    let settings = LinkSettings { incoming_capacity: 4, ..LinkSettings::default() };
    let (mut side, _raw_r, mut raw_w) = raw_peer(&settings, 256);
    let writer = tokio::spawn(async move {
        for id in 0..100 {
            raw_w.queue(Message::RecvAck { id }).unwrap();
        }
        raw_w.flush().await.unwrap();
        raw_w
    });
    // On the paused clock, time only moves when every task is blocked: the writer is
    // stuck because the link stopped reading, not because it is slow.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!writer.is_finished(), "a full `incoming` must stop the reader");
    for id in 0..100 {
        match next(&mut side).await {
            LinkEvent::Message(Message::RecvAck { id: got }) => assert_eq!(got, id),
            other => panic!("{other:?}"),
        }
    }
    let _raw_w = within(writer).await.expect("the writer finishes once the core drains");
}

#[tokio::test]
async fn dropping_the_conn_closes_the_socket() {
    let (a, mut b) = linked_pair().await;
    let (mut a_handle, a_stats) = (a.handle, a.stats);
    drop(a.conn);
    within(a_handle.closed()).await;
    assert!(a_handle.is_closed());
    let event = next(&mut b).await;
    assert!(matches!(event, LinkEvent::Closed(LinkError::Eof)), "{event:?}");
    assert!(within(b.conn.incoming.recv()).await.is_none());
    within(b.handle.closed()).await;
    assert_eq!((a_stats.snapshot().disconnects, b.stats.snapshot().disconnects), (1, 1));
}

#[tokio::test]
async fn bye_reaches_the_peer_as_its_close_reason() {
    let (a, mut b) = linked_pair().await;
    a.conn.outgoing.send(Message::RecvAck { id: 1 }).unwrap();
    a.conn.outgoing.send(Message::Bye { reason: "going down for maintenance".into() }).unwrap();
    drop(a.conn.outgoing);
    assert!(matches!(next(&mut b).await, LinkEvent::Message(Message::RecvAck { id: 1 })));
    match next(&mut b).await {
        LinkEvent::Closed(LinkError::Bye { reason }) => assert_eq!(reason, "going down for maintenance"),
        other => panic!("{other:?}"),
    }
    assert!(within(b.conn.incoming.recv()).await.is_none());
}

#[tokio::test]
async fn close_handle_ends_the_link_with_local_closed() {
    let (mut a, mut b) = linked_pair().await;
    a.handle.close();
    assert!(matches!(next(&mut a).await, LinkEvent::Closed(LinkError::LocalClosed)));
    assert!(within(a.conn.incoming.recv()).await.is_none());
    assert!(matches!(next(&mut b).await, LinkEvent::Closed(LinkError::Eof)));
}

#[tokio::test]
async fn corrupt_frame_ends_the_link_and_is_not_delivered() {
    let (mut side, _raw_r, mut raw_w) = raw_peer(&LinkSettings::default(), 64 << 10);
    raw_w.send(Message::RecvAck { id: 1 }).await.unwrap();
    let mut bad = raw_frame(Kind::Trim.code(), 0, 1, &[0; 33]);
    bad[30] ^= 1;
    raw_w.get_mut().write_all(&bad).await.unwrap();
    assert!(matches!(next(&mut side).await, LinkEvent::Message(Message::RecvAck { id: 1 })));
    let event = next(&mut side).await;
    assert!(matches!(event, LinkEvent::Closed(LinkError::BadCrc { kind: "Trim", seq: 1, .. })), "{event:?}");
    assert!(within(side.conn.incoming.recv()).await.is_none());
    assert_eq!(side.stats.snapshot().bad_crc, 1);
}

#[tokio::test]
async fn second_hello_ends_the_link() {
    let (mut side, _raw_r, mut raw_w) = raw_peer(&LinkSettings::default(), 64 << 10);
    raw_w.send(Message::Hello(hello("beta"))).await.unwrap();
    let event = next(&mut side).await;
    assert!(matches!(event, LinkEvent::Closed(LinkError::Unexpected { kind: "Hello" })), "{event:?}");
    assert_eq!(side.stats.snapshot().malformed, 1);
}

#[tokio::test]
async fn data_path_frames_beyond_the_device_end_end_the_link() {
    let size = hello("beta").size_bytes;
    let cases = [
        Message::Write {
            id: 1,
            epoch: 1,
            offset: size - 512,
            fua: false,
            data: random_data(&mut StdRng::seed_from_u64(1), 1024),
        },
        Message::Trim { id: 2, epoch: 1, offset: size, len: 1, fua: false },
        Message::WriteZeroes { id: 3, epoch: 1, offset: u64::MAX, len: u64::MAX, may_trim: true, fua: false },
        Message::ResyncZeroes { offset: size - 4096, len: 8192 },
    ];
    for bad in cases {
        let (mut side, _raw_r, mut raw_w) = raw_peer(&LinkSettings::default(), 64 << 10);
        // The last byte of the device is fine...
        raw_w.send(Message::Trim { id: 9, epoch: 1, offset: size - 1, len: 1, fua: false }).await.unwrap();
        assert!(matches!(next(&mut side).await, LinkEvent::Message(Message::Trim { id: 9, .. })));
        // ...one past it is not, and never reaches the core.
        let kind = bad.kind().name();
        let error = refused(side, raw_w, bad).await;
        assert!(matches!(&error, LinkError::OutOfRange { kind: k, .. } if *k == kind), "{error:?}");
    }
}

/// Sends `bad` and checks that it ends the link, counted as malformed and never
/// delivered; returns why the link ended.
async fn refused(mut side: Side, mut raw_w: FrameWriter<Writer>, bad: Message) -> LinkError {
    raw_w.send(bad).await.unwrap();
    let LinkEvent::Closed(error) = next(&mut side).await else { panic!("a refused frame was delivered") };
    assert!(within(side.conn.incoming.recv()).await.is_none());
    assert_eq!(side.stats.snapshot().malformed, 1);
    error
}

/// The next message, skipping the `Sent` reports of what the test sent.
async fn next_message(side: &mut Side) -> Message {
    loop {
        match next(side).await {
            LinkEvent::Message(m) => return m,
            LinkEvent::Sent { .. } => {}
            closed => panic!("expected a message, got {closed:?}"),
        }
    }
}

fn write_of(id: u64, len: usize) -> Message {
    let data = random_data(&mut StdRng::seed_from_u64(id), len);
    Message::Write { id, epoch: 1, offset: id * len as u64, fua: false, data }
}

#[tokio::test(start_paused = true)]
async fn a_spent_receive_budget_stops_the_reader_without_timing_out() {
    // Room for two 2 KiB writes: the budget counts the memory their buffers occupy.
    let two = 2 * nbd_server::buf::footprint_bytes(2048) as u64;
    let settings = LinkSettings { receive_budget_bytes: two, ..LinkSettings::default() };
    let (mut side, _raw_r, mut raw_w) = raw_peer(&settings, 1 << 20);
    for id in 0..3 {
        raw_w.queue(write_of(id, 2048)).unwrap();
    }
    raw_w.flush().await.unwrap();
    let mut held: Vec<Message> = Vec::new();
    for id in 0..2 {
        let m = next_message(&mut side).await;
        assert!(matches!(m, Message::Write { id: got, .. } if got == id), "{m:?}");
        held.push(m);
    }
    // Far longer than the ping timeout, and the peer sends nothing more: the reader
    // is waiting for its budget, which is not the peer's silence.
    let quiet = tokio::time::timeout(Duration::from_secs(30), side.conn.incoming.recv()).await;
    assert!(quiet.is_err(), "a spent budget delivered {quiet:?}");
    // The core lets go of one write's buffer: its bytes come back, the third arrives.
    drop(held.remove(0));
    assert!(matches!(next_message(&mut side).await, Message::Write { id: 2, .. }));
    assert_eq!(side.stats.snapshot().receive_budget_waits, 1);
    // The idle timeout counts from when the reader resumed, not from the last bytes
    // before its wait: the silent peer times out a full timeout later.
    let resumed = Instant::now();
    let event = next(&mut side).await;
    assert!(matches!(event, LinkEvent::Closed(LinkError::Timeout { .. })), "{event:?}");
    assert!(resumed.elapsed() >= Duration::from_millis(settings.ping_timeout_ms), "{:?}", resumed.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_frame_larger_than_the_budget_waits_for_all_of_it() {
    let settings = LinkSettings { receive_budget_bytes: 4096, ..LinkSettings::default() };
    let (mut side, _raw_r, mut raw_w) = raw_peer(&settings, 1 << 20);
    raw_w.queue(write_of(0, 8192)).unwrap();
    raw_w.queue(write_of(1, 8192)).unwrap();
    raw_w.flush().await.unwrap();
    let first = next_message(&mut side).await;
    let quiet = tokio::time::timeout(Duration::from_secs(10), side.conn.incoming.recv()).await;
    assert!(quiet.is_err(), "the second frame needs the whole budget: {quiet:?}");
    drop(first);
    assert!(matches!(next_message(&mut side).await, Message::Write { id: 1, .. }));
}

#[tokio::test(start_paused = true)]
async fn unanswered_read_requests_stop_the_reader_until_answered() {
    const MIB: u64 = 1 << 20;
    // Room for two 1 MiB reads (the budget counts the buffers they read into).
    let two = 2 * nbd_server::buf::footprint_bytes(MIB as usize) as u64;
    let settings = LinkSettings { request_budget_bytes: two, ..LinkSettings::default() };
    let (mut side, _raw_r, mut raw_w) = raw_peer(&settings, 1 << 20);
    for m in [
        Message::DigestReq { offset: 0, len: MIB, after_epoch: 0 },
        Message::ReadReq { id: 7, offset: MIB, len: MIB, after_epoch: 0 },
        Message::DigestReq { offset: 2 * MIB, len: MIB, after_epoch: 0 },
        Message::RecvAck { id: 1 },
    ] {
        raw_w.queue(m).unwrap();
    }
    raw_w.flush().await.unwrap();
    assert!(matches!(next_message(&mut side).await, Message::DigestReq { offset: 0, .. }));
    assert!(matches!(next_message(&mut side).await, Message::ReadReq { id: 7, .. }));
    let quiet = tokio::time::timeout(Duration::from_secs(30), side.conn.incoming.recv()).await;
    assert!(quiet.is_err(), "2 MiB of reads are asked and unanswered: {quiet:?}");
    // Answering the read (even with an error and no data) gives its bytes back.
    let no_data = BufMut::unpooled(0).freeze();
    side.conn.outgoing.send(Message::ReadData { id: 7, errno: libc::EIO, data: no_data }).unwrap();
    assert!(matches!(next_message(&mut side).await, Message::DigestReq { offset, .. } if offset == 2 * MIB));
    assert!(matches!(next_message(&mut side).await, Message::RecvAck { id: 1 }));
    assert_eq!(side.stats.snapshot().request_budget_waits, 1);
}

#[tokio::test]
async fn read_requests_no_node_answers_end_the_link() {
    for bad in [
        Message::DigestReq { offset: 0, len: 0, after_epoch: 0 },
        Message::DigestReq { offset: 0, len: (1 << 20) + 4096, after_epoch: 0 },
        Message::ReadReq { id: 1, offset: 0, len: 64 << 20, after_epoch: 0 },
    ] {
        let (side, _raw_r, raw_w) = raw_peer(&LinkSettings::default(), 64 << 10);
        let kind = bad.kind().name();
        let error = refused(side, raw_w, bad).await;
        assert!(matches!(&error, LinkError::Malformed { kind: k, .. } if *k == kind), "{error:?}");
    }
}
