//! The link: one established connection as channels the replication core uses
//! ([`PeerConn`]), driven by a reader task, a writer task and a small coordinator.
//!
//! - The **writer** drains `outgoing`, batching everything that is ready into one
//!   vectored write and one flush, then reports `Sent { bytes }` for the batch (only
//!   the caller's messages: keepalive frames are the link's own business). When
//!   nothing was sent for `ping_interval` it sends a Ping; it answers Pings with Pongs.
//!   On a link that agreed on compression it compresses the data of `Write` and
//!   `ResyncData` frames as it queues them (the reader decompresses); with a
//!   `replication-rate` it writes the frames of application writes in pieces as
//!   the token bucket allows (`peer::pace`) and reports `Sent` per piece, so the
//!   core sees the socket take bytes. It counts what it writes in
//!   [`PeerStats::sent_wire_bytes`] (as sent) and `sent_uncompressed_bytes`.
//! - The **reader** decodes frames into `LinkEvent::Message`. Ping, Pong and Bye stay
//!   inside the link. It waits for room in `incoming` before reading on, so a slow
//!   core slows the peer through TCP instead of growing a queue. If nothing at all
//!   arrives for `ping_timeout`, the read fails with [`LinkError::Timeout`].
//! - **Bounds** (issue 13 §6, `peer::budget`): the reader takes the memory each
//!   data frame's payload will occupy from the receive budget
//!   (`receive_budget_bytes`) before reading it; it comes back when the core (or
//!   whoever it handed the buffer to) drops the last handle of that buffer. Read
//!   requests (`DigestReq`, `ReadReq`) take the memory of the buffer they make this
//!   node read into from the request budget (`request_budget_bytes`) and give it
//!   back when the writer queues the answer.
//!   A spent budget stops the reader, so the peer's sends back up into its own
//!   send buffer. So the memory of received data, wherever it is held (`incoming`,
//!   the core's queues, the disk engine), is at most the receive budget. Frames
//!   without data (at most a few hundred bytes each) are bounded in number by
//!   `incoming_capacity` while the link holds them; those the core keeps (trims,
//!   barriers waiting for an epoch) are the core's to bound.
//! - **Liveness while a budget is spent**: the reader does not read, so it does not
//!   see the peer's Pings either, but it does not time out: the idle timer only runs
//!   while the reader waits for bytes, and restarts when it resumes after a budget
//!   wait. The peer does not time out either: this node's writer is not held up and
//!   keeps sending acks and Pings. A node whose disk makes no progress at all keeps
//!   its budget spent and the link up; the Primary's ack timeout is what ends that.
//! - The **coordinator** waits for the first of the two to end (or for
//!   [`LinkHandle::close`]), stops the other, closes the socket by dropping both
//!   halves, and only then sends `Closed`: so `Closed` is delivered exactly once and
//!   nothing follows it. Its task ending is what [`LinkHandle::closed`] waits for.
//!
//! Reader and writer are separate tasks so that receiving and sending (each with a
//! crc over up to 32 MiB) use both cores.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::budget::{Asked, ByteBudget};
use super::error::bump;
use super::frame::{FrameReader, FrameWriter};
use super::msg::{Hello, MAX_DATA_BYTES, MAX_DIGEST_REQ_BYTES, Message};
use super::{LinkError, PeerStats};

/// Default of [`LinkSettings::receive_budget_bytes`]: twice the largest frame, and
/// thousands of writes for the disk to work on (8192 of 4 KiB, whose buffers take
/// 8 KiB each), while a Primary faster than this node's disk costs it no more.
pub const DEFAULT_RECEIVE_BUDGET_BYTES: u64 = 64 << 20;
/// Default of [`LinkSettings::request_budget_bytes`]: a verify (8 × 1 MiB) and a
/// checksum resync (4 × 1 MiB) at once fit many times over.
pub const DEFAULT_REQUEST_BUDGET_BYTES: u64 = 64 << 20;

/// Keepalive timing and bounds of a link.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Send a Ping after this long without sending anything.
    pub ping_interval_ms: u64,
    /// Close the link after this long without receiving anything.
    pub ping_timeout_ms: u64,
    /// Capacity of `PeerConn::incoming`, in events.
    pub incoming_capacity: usize,
    /// Memory that received data (the payload buffers of data frames) may occupy
    /// on this node before it stops reading (see the module doc).
    pub receive_budget_bytes: u64,
    /// Memory the buffers of the peer's unanswered read requests may occupy (what
    /// they make this node read into).
    pub request_budget_bytes: u64,
    /// zstd level when this link compresses (both nodes configured it: the
    /// supervisor decides from the Hellos); `None`: no compression either way.
    pub compression_level: Option<i32>,
    /// `replication-rate`: wire bytes per second for application-write frames.
    pub replication_rate_bytes_per_sec: Option<u64>,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            incoming_capacity: 1024,
            receive_budget_bytes: DEFAULT_RECEIVE_BUDGET_BYTES,
            request_budget_bytes: DEFAULT_REQUEST_BUDGET_BYTES,
            compression_level: None,
            replication_rate_bytes_per_sec: None,
        }
    }
}

/// An established connection to the peer, as the core sees it.
#[derive(Debug)]
pub struct PeerConn {
    /// The peer's Hello (the core decides the sync direction from `remote.gens`).
    pub remote: Hello,
    /// Messages to send. Unbounded here because the caller bounds it by bytes, using
    /// `Sent`. Dropping it (after queuing, say, a `Bye`) sends what is queued and
    /// closes the connection.
    pub outgoing: mpsc::UnboundedSender<Message>,
    /// What happened on the link, in order; `Closed` comes exactly once, last.
    pub incoming: mpsc::Receiver<LinkEvent>,
}

/// One thing that happened on a link.
#[derive(Debug)]
pub enum LinkEvent {
    /// A message from the peer (never Hello, Ping, Pong or Bye).
    Message(Message),
    /// This many bytes of the caller's frames (see [`Message::wire_len`]: always the
    /// uncompressed length) were written to the socket, summed per flush (per piece
    /// of a paced batch, a frame in pieces counting its share). Bytes of a batch
    /// the link died writing are never reported: after `Closed` the accounting
    /// starts over.
    Sent {
        /// Frame bytes, headers included.
        bytes: u64,
    },
    /// The link is down; nothing follows. A peer's `Bye` arrives as
    /// [`LinkError::Bye`].
    Closed(LinkError),
}

/// The supervisor's side of a link: wait for it to end, or end it. Dropping it
/// leaves the link running.
#[derive(Debug)]
pub struct LinkHandle {
    task: JoinHandle<()>,
    close: Option<oneshot::Sender<()>>,
    done: bool,
}

impl LinkHandle {
    /// Asks the link to close; the core still gets `Closed(LocalClosed)`.
    pub fn close(&mut self) {
        if let Some(tx) = self.close.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the link is down: socket closed and `Closed` handed to the core
    /// (or the core dropped `incoming`). Safe to use in `select!` and to call again.
    pub async fn closed(&mut self) {
        if !self.done {
            let _ = (&mut self.task).await;
            self.done = true;
        }
    }

    /// True once [`LinkHandle::closed`] would return at once.
    pub fn is_closed(&self) -> bool {
        self.done || self.task.is_finished()
    }
}

/// Starts a link over a connection whose handshake is done (`reader`/`writer` carry
/// on with the sequence numbers after the Hellos).
pub fn spawn_link<R, W>(
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    remote: Hello,
    settings: &LinkSettings,
    stats: Arc<PeerStats>,
) -> (PeerConn, LinkHandle)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::channel(settings.incoming_capacity.max(1));
    let (close_tx, close_rx) = oneshot::channel();
    reader.set_idle_timeout(Some(Duration::from_millis(settings.ping_timeout_ms)));
    reader.set_receive_budget(Some(ByteBudget::new(settings.receive_budget_bytes)));
    reader.set_decompression(settings.compression_level.is_some());
    writer.set_compression(settings.compression_level);
    writer.set_pacing(settings.replication_rate_bytes_per_sec);
    stats.compressing.store(settings.compression_level.is_some(), Ordering::Relaxed);
    let asked = Arc::new(Asked::new(ByteBudget::new(settings.request_budget_bytes)));
    let ping_interval = Duration::from_millis(settings.ping_interval_ms);
    // The reader records a Ping's nonce here; the writer answers the latest one. A
    // watch never blocks the reader, and a burst of Pings collapses into one Pong.
    let (pong_tx, pong_rx) = watch::channel(0u64);
    let size_bytes = remote.size_bytes;
    let read_task = tokio::spawn(read_loop(
        reader,
        events_tx.clone(),
        pong_tx,
        stats.clone(),
        size_bytes,
        Arc::clone(&asked),
    ));
    let write_task = tokio::spawn(write_loop(
        writer,
        out_rx,
        events_tx.clone(),
        pong_rx,
        ping_interval,
        asked,
        stats.clone(),
    ));
    let peer = remote.node.clone();
    let task = tokio::spawn(coordinate(read_task, write_task, events_tx, close_rx, stats, peer));
    let conn = PeerConn { remote, outgoing: out_tx, incoming: events_rx };
    (conn, LinkHandle { task, close: Some(close_tx), done: false })
}

/// Ends the link once: stops the surviving task, then reports `Closed` last.
async fn coordinate(
    mut read_task: JoinHandle<LinkError>,
    mut write_task: JoinHandle<LinkError>,
    events: mpsc::Sender<LinkEvent>,
    close: oneshot::Receiver<()>,
    stats: Arc<PeerStats>,
    peer: String,
) {
    let error = tokio::select! {
        r = &mut read_task => {
            write_task.abort();
            let _ = write_task.await;
            joined(r)
        }
        w = &mut write_task => {
            read_task.abort();
            let _ = read_task.await;
            joined(w)
        }
        Ok(()) = close => {
            read_task.abort();
            write_task.abort();
            let _ = read_task.await;
            let _ = write_task.await;
            LinkError::LocalClosed
        }
    };
    // Both tasks are gone, and with them both socket halves: the connection is closed.
    bump(&stats.disconnects);
    stats.compressing.store(false, Ordering::Relaxed);
    match &error {
        LinkError::LocalClosed => tracing::info!(%peer, "peer link closed locally"),
        LinkError::Bye { reason } => tracing::info!(%peer, %reason, "peer closed the link"),
        e => tracing::warn!(%peer, "peer link failed: {e}"),
    }
    let _ = events.send(LinkEvent::Closed(error)).await;
}

fn joined(r: Result<LinkError, tokio::task::JoinError>) -> LinkError {
    r.unwrap_or_else(|e| LinkError::Io(std::io::Error::other(format!("peer link task failed: {e}"))))
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    events: mpsc::Sender<LinkEvent>,
    pong: watch::Sender<u64>,
    stats: Arc<PeerStats>,
    size_bytes: u64,
    asked: Arc<Asked>,
) -> LinkError {
    loop {
        let msg = match reader.read().await {
            Ok(msg) => msg,
            Err(e) => return e,
        };
        // A range outside the device would be applied into the metadata area or
        // past the end of the backing file; a request of a length no node asks
        // would never be answered and so hold its budget for good.
        if let Err(e) = check_range(&msg, size_bytes).and_then(|()| check_request(&msg)) {
            stats.record(&e);
            return e;
        }
        if asked.charge(&msg).await {
            bump(&stats.request_budget_waits);
            reader.restart_idle_timer();
        }
        match msg {
            Message::Ping { nonce } => {
                pong.send_replace(nonce);
            }
            // Its arrival already reset the idle timer; nothing else to do.
            Message::Pong { .. } => {}
            Message::Bye { reason } => return LinkError::Bye { reason },
            // Handshake-only frames.
            Message::Hello(_) | Message::AuthChallenge { .. } | Message::AuthResponse { .. } => {
                let e = LinkError::Unexpected { kind: msg.kind().name() };
                stats.record(&e);
                return e;
            }
            msg => match events.try_send(LinkEvent::Message(msg)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    if events.send(event).await.is_err() {
                        return LinkError::LocalClosed;
                    }
                    // As after a budget wait: the pause was ours.
                    reader.restart_idle_timer();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return LinkError::LocalClosed,
            },
        }
    }
}

/// Data-path frames must stay inside the device whose size both sides agreed on.
fn check_range(msg: &Message, size_bytes: u64) -> Result<(), LinkError> {
    let (offset, len) = match msg {
        Message::Write { offset, data, .. } | Message::ResyncData { offset, data } => {
            (*offset, data.len() as u64)
        }
        Message::Trim { offset, len, .. }
        | Message::WriteZeroes { offset, len, .. }
        | Message::ResyncZeroes { offset, len }
        | Message::ResyncAck { offset, len, .. }
        | Message::DigestReq { offset, len, .. }
        | Message::ReadReq { offset, len, .. }
        | Message::Digests { offset, len, .. } => (*offset, *len),
        _ => return Ok(()),
    };
    let end = u128::from(offset) + u128::from(len);
    if end > u128::from(size_bytes) {
        return Err(LinkError::OutOfRange { kind: msg.kind().name(), offset, end, size_bytes });
    }
    Ok(())
}

/// Read requests must ask for what one answer can carry and the core serves: a
/// digest request for 1..=[`MAX_DIGEST_REQ_BYTES`], a read for at most one frame of
/// data.
fn check_request(msg: &Message) -> Result<(), LinkError> {
    let what = match *msg {
        Message::DigestReq { len, .. } if len == 0 || len > MAX_DIGEST_REQ_BYTES => "digest request length",
        Message::ReadReq { len, .. } if len > MAX_DATA_BYTES as u64 => "read request longer than a frame",
        _ => return Ok(()),
    };
    Err(LinkError::Malformed { kind: msg.kind().name(), what })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut outgoing: mpsc::UnboundedReceiver<Message>,
    events: mpsc::Sender<LinkEvent>,
    mut pong: watch::Receiver<u64>,
    ping_interval: Duration,
    asked: Arc<Asked>,
    stats: Arc<PeerStats>,
) -> LinkError {
    let w = Writing { events: &events, ping_interval, asked: &asked, stats: &stats };
    match write_batches(&mut writer, &mut outgoing, &mut pong, &w).await {
        Ok(()) => {
            // `outgoing` was dropped and everything queued is written: say we are done
            // (FIN) so the peer sees an orderly end rather than a reset.
            let _ = writer.shutdown().await;
            LinkError::LocalClosed
        }
        Err(e) => e,
    }
}

/// What the write loop needs besides the writer and its inputs.
struct Writing<'a> {
    events: &'a mpsc::Sender<LinkEvent>,
    ping_interval: Duration,
    asked: &'a Asked,
    stats: &'a PeerStats,
}

/// Returns `Ok` when `outgoing` is closed and drained.
async fn write_batches<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    outgoing: &mut mpsc::UnboundedReceiver<Message>,
    pong: &mut watch::Receiver<u64>,
    w: &Writing<'_>,
) -> Result<(), LinkError> {
    // A caller's message; an answer to a read request gives its budget back.
    let queue = |writer: &mut FrameWriter<W>, m: Message| {
        w.asked.answered(&m);
        writer.queue(m)
    };
    let mut last_sent = Instant::now();
    let mut ping_nonce = 0u64;
    loop {
        let mut closing = false;
        tokio::select! {
            // The caller's messages first: a keepalive never delays data.
            biased;
            m = outgoing.recv() => match m {
                Some(m) => {
                    queue(writer, m)?;
                }
                None => closing = true,
            },
            Ok(()) = pong.changed() => {
                let nonce = *pong.borrow_and_update();
                writer.queue_own(Message::Pong { nonce })?;
            }
            () = tokio::time::sleep_until(last_sent + w.ping_interval) => {
                ping_nonce += 1;
                writer.queue_own(Message::Ping { nonce: ping_nonce })?;
            }
        }
        // Gather whatever else is ready into the same write.
        while !closing && !writer.batch_full() {
            match outgoing.try_recv() {
                Ok(m) => {
                    queue(writer, m)?;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closing = true,
            }
        }
        if pong.has_changed().unwrap_or(false) {
            let nonce = *pong.borrow_and_update();
            writer.queue_own(Message::Pong { nonce })?;
        }
        while let Some(p) = writer.write_piece().await? {
            w.stats.sent_wire_bytes.fetch_add(p.wire_bytes, Ordering::Relaxed);
            w.stats.sent_uncompressed_bytes.fetch_add(p.frame_bytes, Ordering::Relaxed);
            let sent = LinkEvent::Sent { bytes: p.caller_frame_bytes };
            if p.caller_frame_bytes > 0 && w.events.send(sent).await.is_err() {
                // The core dropped `incoming`: it is not listening any more.
                return Err(LinkError::LocalClosed);
            }
        }
        last_sent = Instant::now();
        if closing {
            return Ok(());
        }
    }
}
