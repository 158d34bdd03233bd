//! Frames: the 24-byte header, the reader that turns a byte stream into checked
//! [`Message`]s, and the writer that batches frames into vectored writes.
//!
//! Header (big-endian): `magic u32` (`BLKD`), `type u16`, `flags u16`, `seq u64`,
//! `payload_len u32`, `crc32c u32`. The crc covers the header with the crc field
//! zeroed, then the whole payload as sent (fixed part and data, compressed or not).
//! Sequence numbers count frames per direction from 0 (the Hello). One flag is
//! defined: [`FLAG_COMPRESSED`] (bit 0), on `Write` and `ResyncData` frames of a link
//! that agreed on compression (`peer::msg` has the layout, `peer::compress` the
//! rules); every other bit, and the flag anywhere else, is a bad frame.
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
//!
//! A compressed frame's layout depends on its flag, so the reader looks at the flag
//! before the payload, but only to decide where the bytes go: it reads the same
//! number of bytes either way and checks the crc before it decompresses anything,
//! so a flipped flag still shows up as a crc error. It charges the receive budget
//! with the *uncompressed* length, reads the compressed bytes into a pool buffer,
//! and decompresses into a buffer of exactly the declared length.
//!
//! The writer compresses as it queues (in the link's writer task) into one batch
//! buffer reused for the life of the link, and writes a batch in pieces when a
//! `replication-rate` paces it ([`FrameWriter::write_piece`], `peer::pace`).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nbd_server::buf::{Buf, BufMut, BufPool, footprint_bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::budget::ByteBudget;
use super::compress::{Packer, RAW_LEN_BYTES, Unpacker};
use super::error::bump;
use super::msg::{Kind, Layout, MAX_DATA_BYTES, Message};
use super::pace::TokenBucket;
use super::{LinkError, PeerStats};

/// `BLKD`.
pub const FRAME_MAGIC: u32 = 0x424C_4B44;
/// Size of the frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Largest payload a frame may declare: 32 MiB of data and room for any fixed part.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = (32 << 20) + (64 << 10);

/// Header flag: the frame's data is zstd-compressed (see the module doc).
pub const FLAG_COMPRESSED: u16 = 1 << 0;

const FLAGS_AT: usize = 6;
const LEN_AT: usize = 16;
const CRC_AT: usize = 20;
/// Read-side buffering for small frames; larger data reads bypass it.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// A batch is flushed once it holds this many header bytes...
const MAX_BATCH_HEAD_BYTES: usize = 256 << 10;
/// ... or this many segments (well below Linux's 1024-iovec limit per `writev`)...
const MAX_BATCH_SEGMENTS: usize = 256;
/// ... or this many bytes of compressed data (what the batch buffer grows to, plus
/// at most one frame).
const MAX_BATCH_PACKED_BYTES: usize = 4 << 20;

/// A header with flags, length and crc still zero (the writer fills them in).
fn header(code: u16, seq: u64) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&code.to_be_bytes());
    h[8..16].copy_from_slice(&seq.to_be_bytes());
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
    /// Compressed frames are accepted (the link agreed on compression); the
    /// context is made at the first one.
    decompress: bool,
    unpacker: Option<Unpacker>,
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
            decompress: false,
            unpacker: None,
        }
    }

    /// Accepts frames with [`FLAG_COMPRESSED`] (both Hellos said zstd); off, such a
    /// frame is a bad frame.
    pub fn set_decompression(&mut self, on: bool) {
        self.decompress = on;
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

        let flags = be_u16(&h[FLAGS_AT..FLAGS_AT + 2]);
        // Only where the bytes go depends on the flag before the crc is checked.
        let packed = flags & FLAG_COMPRESSED != 0 && self.decompress && kind.compressible();
        let fixed_len = match kind.layout() {
            Layout::Data { fixed } if packed => fixed + RAW_LEN_BYTES,
            Layout::Data { fixed } => fixed,
            Layout::Fixed(_) | Layout::Var { .. } => len,
        };
        if len < fixed_len {
            let (min, max) = kind.payload_bounds();
            let (kind, len, min, max) = (kind.name(), len as u64, min as u64, max as u64);
            return Err(LinkError::BadLength { kind, len, min, max });
        }
        self.fixed.resize(fixed_len, 0);
        self.inner.read_exact(&mut self.fixed).await.map_err(|e| self.io_error(e))?;
        let data = match kind.layout() {
            Layout::Data { .. } if packed => Some(self.read_packed(len - fixed_len).await?),
            Layout::Data { .. } => {
                let data_len = len - fixed_len;
                debug_assert!(data_len <= MAX_DATA_BYTES, "bounded by payload_bounds");
                let mut buf = self.budgeted_buf(data_len).await;
                self.inner.read_exact(&mut buf).await.map_err(|e| self.io_error(e))?;
                Some(Data::Raw(buf.freeze()))
            }
            _ => None,
        };

        let expected = be_u32(&h[CRC_AT..]);
        h[CRC_AT..].fill(0);
        let mut computed = crc32c::crc32c_append(crc32c::crc32c(&h), &self.fixed);
        match &data {
            Some(Data::Raw(d)) => computed = crc32c::crc32c_append(computed, d),
            Some(Data::Packed { packed, .. }) => computed = crc32c::crc32c_append(computed, packed),
            None => {}
        }
        let seq = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        if computed != expected {
            return Err(LinkError::BadCrc { kind: kind.name(), seq, expected, computed });
        }
        let allowed = if packed { FLAG_COMPRESSED } else { 0 };
        if flags & !allowed != 0 {
            return Err(LinkError::BadFlags { flags });
        }
        if seq != self.next_seq {
            return Err(LinkError::SeqGap { expected: self.next_seq, got: seq });
        }
        self.next_seq += 1;
        let data = match data {
            Some(Data::Raw(d)) => Some(d),
            Some(Data::Packed { packed, out }) => {
                let malformed = |what| LinkError::Malformed { kind: kind.name(), what };
                let mut out = out.map_err(malformed)?;
                let unpacker = match &mut self.unpacker {
                    Some(u) => u,
                    None => self.unpacker.insert(Unpacker::new()?),
                };
                unpacker.unpack(&packed, &mut out).map_err(malformed)?;
                Some(out.freeze())
            }
            None => None,
        };
        let fixed = self.fixed.len() - if packed { RAW_LEN_BYTES } else { 0 };
        Message::decode(kind, &self.fixed[..fixed], data)
    }

    /// A pool buffer for `data_len` bytes of received data, its memory taken from
    /// the receive budget first (waiting while it is spent).
    async fn budgeted_buf(&mut self, data_len: usize) -> BufMut {
        // The bytes first, the buffer after: memory is what the budget bounds, so it
        // is charged what the buffer occupies, not only its payload.
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
        buf
    }

    /// The data of a compressed frame (`packed_len` bytes after the fixed part and
    /// the declared length, which ends `self.fixed`): the declared length is
    /// checked and charged to the budget, the compressed bytes read. Decompressed
    /// only after the crc matched; a declared length that is not allowed is
    /// reported then too (so a flipped flag bit is a crc error, not a strange
    /// length), and charges nothing.
    async fn read_packed(&mut self, packed_len: usize) -> Result<Data, LinkError> {
        let at = self.fixed.len() - RAW_LEN_BYTES;
        let raw_len = be_u32(&self.fixed[at..]) as usize;
        let out = if raw_len > MAX_DATA_BYTES {
            Err("declared uncompressed length over the frame limit")
        } else if packed_len + RAW_LEN_BYTES >= raw_len {
            // The sender compresses only when the frame shrinks: anything else is not
            // a frame a node sends, and would let compressed input outgrow its output.
            Err("compressed data not smaller than its declared length")
        } else {
            Ok(self.budgeted_buf(raw_len).await)
        };
        let mut packed = self.pool.get(packed_len);
        self.inner.read_exact(&mut packed).await.map_err(|e| self.io_error(e))?;
        Ok(Data::Packed { packed, out })
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

/// A data frame's payload as read, before the crc check.
enum Data {
    Raw(Buf),
    /// The compressed bytes, and the budgeted buffer of the declared length they
    /// decompress into (or why that length is not allowed).
    Packed {
        packed: BufMut,
        out: Result<BufMut, &'static str>,
    },
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
    /// Compressed data of the batch, back to back. Cleared after each batch but
    /// never shrunk: the link's one compression output buffer.
    packed: Vec<u8>,
    /// The batch in wire order: runs of `head`, data buffers and runs of `packed`.
    segments: Vec<Segment>,
    /// The batch's frames in order, for progress reports and pacing.
    frames: Vec<FrameMark>,
    /// Wire bytes queued in this batch, and how many of them are written.
    batch_bytes: u64,
    written: u64,
    /// The first frame not completely written, and how many of its uncompressed
    /// bytes were reported already (a paced frame goes out in pieces).
    cursor: usize,
    cursor_reported: u64,
    packer: Option<Packer>,
    pace: Option<TokenBucket>,
}

enum Segment {
    Head(std::ops::Range<usize>),
    Data(Buf),
    Packed(std::ops::Range<usize>),
}

/// One frame of a batch.
#[derive(Clone, Copy, Debug)]
struct FrameMark {
    /// Where it ends in the batch, and its length, on the wire.
    end: u64,
    wire: u64,
    /// Its uncompressed length ([`Message::wire_len`]).
    frame_bytes: u64,
    /// Queued by the caller ([`FrameWriter::queue`]), not the link's own.
    caller: bool,
    /// Paced by the replication rate ([`Kind::paced`]).
    paced: bool,
}

/// What one piece of a batch ([`FrameWriter::write_piece`]) wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes written to the stream (compressed data as compressed, headers included).
    pub wire_bytes: u64,
    /// The same frames' uncompressed length ([`Message::wire_len`]); a frame written
    /// in part counts its share.
    pub frame_bytes: u64,
    /// The part of `frame_bytes` in the caller's frames.
    pub caller_frame_bytes: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer whose first frame gets sequence 0 (no compression, no pacing).
    pub fn new(writer: W) -> FrameWriter<W> {
        FrameWriter {
            inner: writer,
            next_seq: 0,
            head: Vec::new(),
            head_mark: 0,
            packed: Vec::new(),
            segments: Vec::new(),
            frames: Vec::new(),
            batch_bytes: 0,
            written: 0,
            cursor: 0,
            cursor_reported: 0,
            packer: None,
            pace: None,
        }
    }

    /// Compresses the data of `Write` and `ResyncData` frames at this zstd level
    /// from now on (the link agreed on it); `None`: sends everything raw.
    pub fn set_compression(&mut self, level: Option<i32>) {
        self.packer = level.and_then(Packer::new);
    }

    /// Paces the frames of application writes ([`Kind::paced`]) to this many wire
    /// bytes per second (`peer::pace`); `None`: unpaced.
    pub fn set_pacing(&mut self, rate_bytes_per_sec: Option<u64>) {
        self.pace = rate_bytes_per_sec.map(|rate| TokenBucket::new(rate, Instant::now()));
    }

    /// Adds the caller's `msg` to the batch; returns its frame length in bytes
    /// (uncompressed: [`Message::wire_len`]). A message too large for a frame is
    /// refused and nothing is queued.
    pub fn queue(&mut self, msg: Message) -> Result<u64, LinkError> {
        self.push(msg, true)
    }

    /// [`FrameWriter::queue`] for the link's own frames (keepalive): written the
    /// same way, but not part of [`Progress::caller_frame_bytes`].
    pub(crate) fn queue_own(&mut self, msg: Message) -> Result<u64, LinkError> {
        self.push(msg, false)
    }

    fn push(&mut self, msg: Message, caller: bool) -> Result<u64, LinkError> {
        let kind = msg.kind();
        let data_len = msg.data().map_or(0, |d| d.len());
        let payload_len = msg.fixed_len() + data_len;
        if data_len > MAX_DATA_BYTES {
            let max = (kind.payload_bounds().1) as u64;
            return Err(LinkError::TooLarge { kind: kind.name(), len: payload_len as u64, max });
        }
        let start = self.head.len();
        self.head.extend_from_slice(&header(kind.code(), self.next_seq));
        msg.encode_fixed(&mut self.head);
        self.next_seq += 1;
        let data = msg.into_data().filter(|d| !d.is_empty());
        let packed_at = self.packed.len();
        let packed_len = match (&data, &mut self.packer) {
            (Some(d), Some(packer)) if kind.compressible() => packer.pack(d, &mut self.packed),
            _ => None,
        };
        let (flags, wire_payload_len) = match packed_len {
            Some(n) => {
                // data_len ≤ 32 MiB: fits in u32.
                self.head.extend_from_slice(&(data_len as u32).to_be_bytes());
                (FLAG_COMPRESSED, self.head.len() - start - FRAME_HEADER_BYTES + n)
            }
            None => (0, payload_len),
        };
        let h = &mut self.head[start..];
        h[FLAGS_AT..FLAGS_AT + 2].copy_from_slice(&flags.to_be_bytes());
        // payload ≤ 32 MiB + a few hundred bytes: fits in u32.
        h[LEN_AT..LEN_AT + 4].copy_from_slice(&(wire_payload_len as u32).to_be_bytes());
        let mut crc = crc32c::crc32c(h);
        match (packed_len, &data) {
            (Some(n), _) => crc = crc32c::crc32c_append(crc, &self.packed[packed_at..packed_at + n]),
            (None, Some(d)) => crc = crc32c::crc32c_append(crc, d),
            (None, None) => {}
        }
        self.head[start + CRC_AT..start + FRAME_HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        match (packed_len, data) {
            // The raw buffer is not needed any more: it goes back now.
            (Some(n), _) => self.push_segment(Segment::Packed(packed_at..packed_at + n)),
            (None, Some(d)) => self.push_segment(Segment::Data(d)),
            (None, None) => {}
        }
        let wire = (FRAME_HEADER_BYTES + wire_payload_len) as u64;
        let frame_bytes = (FRAME_HEADER_BYTES + payload_len) as u64;
        self.batch_bytes += wire;
        self.frames.push(FrameMark { end: self.batch_bytes, wire, frame_bytes, caller, paced: kind.paced() });
        Ok(frame_bytes)
    }

    /// Appends a data segment after the head bytes queued before it.
    fn push_segment(&mut self, segment: Segment) {
        self.cut_head();
        self.segments.push(segment);
    }

    fn cut_head(&mut self) {
        if self.head_mark < self.head.len() {
            self.segments.push(Segment::Head(self.head_mark..self.head.len()));
            self.head_mark = self.head.len();
        }
    }

    /// True when the batch is big enough that it should be written before more is
    /// queued.
    pub fn batch_full(&self) -> bool {
        self.head.len() >= MAX_BATCH_HEAD_BYTES
            || self.segments.len() >= MAX_BATCH_SEGMENTS
            || self.packed.len() >= MAX_BATCH_PACKED_BYTES
    }

    /// Writes the whole batch (vectored writes, no copies of data) and flushes.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        while self.write_piece().await?.is_some() {}
        Ok(())
    }

    /// Writes the next piece of the batch and flushes it: the whole batch, or with
    /// pacing, everything up to the next paced frame, or as much of the paced
    /// frames as the token bucket grants (waiting for it). `None` once the batch is
    /// written; the writer is then empty.
    pub async fn write_piece(&mut self) -> Result<Option<Progress>, LinkError> {
        if self.written == self.batch_bytes {
            if self.batch_bytes == 0 {
                self.inner.flush().await?;
            }
            self.clear();
            return Ok(None);
        }
        self.cut_head();
        let end = self.piece_end().await;
        let FrameWriter { inner, head, packed, segments, written, .. } = self;
        write_range(inner, head, packed, segments, *written, end).await?;
        inner.flush().await?;
        Ok(Some(self.advance(end)))
    }

    /// Where the next piece ends.
    async fn piece_end(&mut self) -> u64 {
        let Some(pace) = &mut self.pace else { return self.batch_bytes };
        let paced = self.frames[self.cursor].paced;
        let run = self.frames[self.cursor..].iter().take_while(|f| f.paced == paced);
        let run_end = run.last().map_or(self.batch_bytes, |f| f.end);
        if !paced {
            return run_end;
        }
        self.written + pace.take(run_end - self.written).await
    }

    /// Counts the batch as written up to `to`.
    fn advance(&mut self, to: u64) -> Progress {
        let mut p = Progress { wire_bytes: to - self.written, ..Progress::default() };
        while let Some(f) = self.frames.get(self.cursor) {
            let start = f.end - f.wire;
            let done = if to >= f.end { f.frame_bytes } else { f.frame_bytes * (to - start) / f.wire };
            let new = done - self.cursor_reported;
            p.frame_bytes += new;
            if f.caller {
                p.caller_frame_bytes += new;
            }
            if to < f.end {
                self.cursor_reported = done;
                break;
            }
            self.cursor += 1;
            self.cursor_reported = 0;
        }
        self.written = to;
        p
    }

    fn clear(&mut self) {
        // Dropping the data segments returns their buffers to the pool.
        self.segments.clear();
        self.head.clear();
        self.packed.clear();
        self.frames.clear();
        self.head_mark = 0;
        self.batch_bytes = 0;
        self.written = 0;
        self.cursor = 0;
        self.cursor_reported = 0;
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

/// Writes bytes `from..to` of the batch `segments` describe (one `writev` loop).
async fn write_range<W: AsyncWrite + Unpin>(
    inner: &mut W,
    head: &[u8],
    packed: &[u8],
    segments: &[Segment],
    from: u64,
    to: u64,
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(segments.len());
    let mut at = 0u64;
    for s in segments {
        let bytes: &[u8] = match s {
            Segment::Head(range) => &head[range.clone()],
            Segment::Data(buf) => buf,
            Segment::Packed(range) => &packed[range.clone()],
        };
        let (start, end) = (at, at + bytes.len() as u64);
        at = end;
        if end <= from {
            continue;
        }
        if start >= to {
            break;
        }
        let lo = from.saturating_sub(start) as usize;
        let hi = (to.min(end) - start) as usize;
        slices.push(IoSlice::new(&bytes[lo..hi]));
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = inner.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
