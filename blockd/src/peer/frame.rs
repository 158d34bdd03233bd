//! Frames: the 24-byte header, the reader that turns a byte stream into checked
//! [`Message`]s, and the writer that batches frames into vectored writes.
//!
//! Header (big-endian): `magic u32` (`BLKD`), `type u16`, `flags u16` (0),
//! `seq u64`, `payload_len u32`, `crc32c u32`. The crc covers the header with the
//! crc field zeroed, then the whole payload (fixed part and data). Sequence numbers
//! count frames per direction from 0 (the Hello).
//!
//! The reader checks in the order that lets it read safely: magic, length limit, type,
//! the type's length bounds (all needed to know how much to read and where to put
//! it), then reads the payload and checks the crc, and only then flags, sequence and
//! fields. So a bit flipped anywhere past the magic and the layout-deciding fields
//! shows up as a crc error rather than as a misleading field error. The data of
//! every data-carrying type (`Write`, `ResyncData`, `BitmapBlock`, `Digests`,
//! `ReadData`) is read straight into a pool buffer, after its bytes were taken from
//! the link's receive budget when it has one ([`FrameReader::set_receive_budget`]);
//! the writer sends data from the caller's [`Buf`] in the same `writev` as the
//! headers around it.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nbd_server::buf::{Buf, BufPool, footprint_bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::budget::ByteBudget;
use super::error::bump;
use super::msg::{Kind, Layout, MAX_DATA_BYTES, Message};
use super::{LinkError, PeerStats};

/// `BLKD`.
pub const FRAME_MAGIC: u32 = 0x424C_4B44;
/// Size of the frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Largest payload a frame may declare: 32 MiB of data and room for any fixed part.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = (32 << 20) + (64 << 10);

const CRC_AT: usize = 20;
/// Read-side buffering for small frames; larger data reads bypass it.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// A batch is flushed once it holds this many header bytes...
const MAX_BATCH_HEAD_BYTES: usize = 256 << 10;
/// ... or this many segments (well below Linux's 1024-iovec limit per `writev`).
const MAX_BATCH_SEGMENTS: usize = 256;

fn header(code: u16, seq: u64, payload_len: u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&code.to_be_bytes());
    // flags (6..8) stay 0: none are defined in version 1.
    h[8..16].copy_from_slice(&seq.to_be_bytes());
    h[16..20].copy_from_slice(&payload_len.to_be_bytes());
    h
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads and checks frames from one direction of a connection.
pub struct FrameReader<R> {
    inner: BufReader<IdleTimeout<R>>,
    next_seq: u64,
    pool: BufPool,
    stats: Arc<PeerStats>,
    /// Reused for fixed parts (at most a few hundred bytes).
    fixed: Vec<u8>,
    /// Where the bytes of received data come from (see `peer::budget`).
    budget: Option<ByteBudget>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader expecting the stream's first frame (sequence 0).
    pub fn new(reader: R, pool: BufPool, stats: Arc<PeerStats>) -> FrameReader<R> {
        FrameReader {
            inner: BufReader::with_capacity(READ_BUFFER_BYTES, IdleTimeout::new(reader)),
            next_seq: 0,
            pool,
            stats,
            fixed: Vec::new(),
            budget: None,
        }
    }

    /// Takes every data frame's bytes from `budget` before reading its payload,
    /// waiting (and so reading nothing) while they are not free; the bytes are
    /// released when the last handle of the message's buffer drops. `None`: no
    /// bound (the handshake's frames carry no data).
    pub fn set_receive_budget(&mut self, budget: Option<ByteBudget>) {
        self.budget = budget;
    }

    /// Fails reads with [`LinkError::Timeout`] once nothing at all arrived for
    /// `timeout` (counted from now, then from the last bytes received); `None` turns
    /// the timer off.
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.get_mut().set_timeout(timeout);
    }

    /// Counts the idle timeout from now, as if bytes had just arrived: for a reader
    /// that chose not to read for a while.
    pub(crate) fn restart_idle_timer(&mut self) {
        self.inner.get_mut().restart();
    }

    /// The next frame's message. Every error is counted in [`PeerStats`] here; after
    /// an error the stream is out of step and must be dropped. Not cancel-safe: a
    /// frame read halfway is lost, so drop the reader with the future (a handshake
    /// timeout does).
    pub async fn read(&mut self) -> Result<Message, LinkError> {
        let result = self.read_frame().await;
        if let Err(e) = &result {
            self.stats.record(e);
        }
        result
    }

    async fn read_frame(&mut self) -> Result<Message, LinkError> {
        let mut h = [0u8; FRAME_HEADER_BYTES];
        let got = read_full(&mut self.inner, &mut h).await.map_err(|e| self.io_error(e))?;
        if got == 0 {
            return Err(LinkError::Eof);
        } else if got < h.len() {
            return Err(LinkError::Truncated);
        }
        let magic = be_u32(&h[0..4]);
        if magic != FRAME_MAGIC {
            return Err(LinkError::BadMagic { found: magic });
        }
        let len = be_u32(&h[16..20]) as usize;
        if len > MAX_FRAME_PAYLOAD_BYTES {
            return Err(LinkError::Oversize { len: len as u64 });
        }
        let code = be_u16(&h[4..6]);
        let kind = Kind::from_code(code).ok_or(LinkError::BadType { code })?;
        let (min, max) = kind.payload_bounds();
        if !(min..=max).contains(&len) {
            let (kind, len, min, max) = (kind.name(), len as u64, min as u64, max as u64);
            return Err(LinkError::BadLength { kind, len, min, max });
        }

        let fixed_len = match kind.layout() {
            Layout::Data { fixed } => fixed,
            Layout::Fixed(_) | Layout::Var { .. } => len,
        };
        self.fixed.resize(fixed_len, 0);
        self.inner.read_exact(&mut self.fixed).await.map_err(|e| self.io_error(e))?;
        let data = match kind.layout() {
            Layout::Data { .. } => {
                let data_len = len - fixed_len;
                debug_assert!(data_len <= MAX_DATA_BYTES, "bounded by payload_bounds");
                // The bytes first, the buffer after: memory is what the budget bounds,
                // so it is charged what the buffer occupies, not only its payload.
                let permit = match &self.budget {
                    Some(budget) if data_len > 0 => Some(budget.take(footprint_bytes(data_len) as u64).await),
                    _ => None,
                };
                let mut buf = self.pool.get(data_len);
                if let Some((permit, waited)) = permit {
                    buf.hold_permit(permit);
                    if waited {
                        bump(&self.stats.receive_budget_waits);
                        // Not reading was this node's choice, not the peer's silence.
                        self.restart_idle_timer();
                    }
                }
                self.inner.read_exact(&mut buf).await.map_err(|e| self.io_error(e))?;
                Some(buf.freeze())
            }
            _ => None,
        };

        let expected = be_u32(&h[CRC_AT..]);
        h[CRC_AT..].fill(0);
        let mut computed = crc32c::crc32c_append(crc32c::crc32c(&h), &self.fixed);
        if let Some(d) = &data {
            computed = crc32c::crc32c_append(computed, d);
        }
        let seq = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        if computed != expected {
            return Err(LinkError::BadCrc { kind: kind.name(), seq, expected, computed });
        }
        let flags = be_u16(&h[6..8]);
        if flags != 0 {
            return Err(LinkError::BadFlags { flags });
        }
        if seq != self.next_seq {
            return Err(LinkError::SeqGap { expected: self.next_seq, got: seq });
        }
        self.next_seq += 1;
        Message::decode(kind, &self.fixed, data)
    }

    /// Reads and drops input until the peer closes (at most 1 MiB), so that closing
    /// this side afterwards does not reset the connection under a `Bye` just sent.
    pub(crate) async fn discard_to_end(&mut self) {
        let mut scratch = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match self.inner.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    fn io_error(&self, e: io::Error) -> LinkError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            LinkError::Truncated
        } else if let Some(timeout) = self.inner.get_ref().elapsed(&e) {
            LinkError::Timeout { timeout_ms: timeout.as_millis() as u64 }
        } else {
            LinkError::Io(e)
        }
    }
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read (0 is
/// a clean end between frames).
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// An `AsyncRead` that fails with `TimedOut` when no bytes arrived for a while.
///
/// The timer lives in the read path itself (rather than around a frame read in a
/// `select!`) so a partly read frame is never cancelled, and a frame that takes long
/// but keeps arriving (32 MiB over a slow link) never times out.
pub(crate) struct IdleTimeout<R> {
    inner: R,
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// Marks the `TimedOut` error as ours (not the socket's).
#[derive(Debug, thiserror::Error)]
#[error("idle timeout")]
struct IdleElapsed;

impl<R> IdleTimeout<R> {
    fn new(inner: R) -> IdleTimeout<R> {
        IdleTimeout { inner, timeout: None, sleep: None }
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
        self.sleep = timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    }

    fn restart(&mut self) {
        if let (Some(t), Some(sleep)) = (self.timeout, self.sleep.as_mut()) {
            sleep.as_mut().reset(Instant::now() + t);
        }
    }

    /// The configured timeout if `e` is this timer's error.
    fn elapsed(&self, e: &io::Error) -> Option<Duration> {
        e.get_ref().filter(|inner| inner.is::<IdleElapsed>()).and(self.timeout)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for IdleTimeout<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.restart();
                Poll::Ready(result)
            }
            Poll::Pending => {
                let elapsed = this.sleep.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if elapsed {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, IdleElapsed)))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

/// Encodes frames into a batch and writes the batch with vectored writes.
pub struct FrameWriter<W> {
    inner: W,
    next_seq: u64,
    /// Headers and fixed parts of the batch, back to back.
    head: Vec<u8>,
    /// Where in `head` the bytes not yet covered by a segment start.
    head_mark: usize,
    /// The batch in wire order: runs of `head` and data buffers between them.
    segments: Vec<Segment>,
}

enum Segment {
    Head(std::ops::Range<usize>),
    Data(Buf),
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer whose first frame gets sequence 0.
    pub fn new(writer: W) -> FrameWriter<W> {
        FrameWriter { inner: writer, next_seq: 0, head: Vec::new(), head_mark: 0, segments: Vec::new() }
    }

    /// Adds `msg` to the batch; returns its frame length in bytes. A message too
    /// large for a frame is refused and nothing is queued.
    pub fn queue(&mut self, msg: Message) -> Result<u64, LinkError> {
        let kind = msg.kind();
        let data_len = msg.data().map_or(0, |d| d.len());
        let payload_len = msg.fixed_len() + data_len;
        if data_len > MAX_DATA_BYTES {
            let max = (kind.payload_bounds().1) as u64;
            return Err(LinkError::TooLarge { kind: kind.name(), len: payload_len as u64, max });
        }
        let start = self.head.len();
        // payload_len ≤ 32 MiB + a few hundred bytes: fits in u32.
        self.head.extend_from_slice(&header(kind.code(), self.next_seq, payload_len as u32));
        msg.encode_fixed(&mut self.head);
        let mut crc = crc32c::crc32c(&self.head[start..]);
        if let Some(data) = msg.data() {
            crc = crc32c::crc32c_append(crc, data);
        }
        self.head[start + CRC_AT..start + FRAME_HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        self.next_seq += 1;
        if let Some(data) = msg.into_data()
            && !data.is_empty()
        {
            self.segments.push(Segment::Head(self.head_mark..self.head.len()));
            self.segments.push(Segment::Data(data));
            self.head_mark = self.head.len();
        }
        Ok((FRAME_HEADER_BYTES + payload_len) as u64)
    }

    /// True when the batch is big enough that it should be written before more is
    /// queued.
    pub fn batch_full(&self) -> bool {
        self.head.len() >= MAX_BATCH_HEAD_BYTES || self.segments.len() >= MAX_BATCH_SEGMENTS
    }

    /// Writes the whole batch (one `writev` loop, no copies of data) and flushes.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.head_mark < self.head.len() {
            self.segments.push(Segment::Head(self.head_mark..self.head.len()));
        }
        let FrameWriter { inner, head, segments, .. } = self;
        let mut slices: Vec<IoSlice<'_>> = segments
            .iter()
            .map(|s| match s {
                Segment::Head(range) => IoSlice::new(&head[range.clone()]),
                Segment::Data(buf) => IoSlice::new(buf),
            })
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = inner.write_vectored(rest).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        inner.flush().await?;
        // Dropping the data segments returns their buffers to the pool.
        self.segments.clear();
        self.head.clear();
        self.head_mark = 0;
        Ok(())
    }

    /// Queues `msg` and writes it at once.
    pub async fn send(&mut self, msg: Message) -> Result<u64, LinkError> {
        let n = self.queue(msg)?;
        self.flush().await?;
        Ok(n)
    }

    /// Shuts the write direction down (FIN; a TLS close later).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }

    /// The underlying writer (tests look at the bytes).
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer. Bytes written here bypass framing (tests inject
    /// corrupt frames this way).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}
