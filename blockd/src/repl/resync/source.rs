//! The resync source, a sub-machine of the core that owns its state.
//!
//! A cursor walks the dirty runs of the bitmap; chunks of at most
//! [`RESYNC_CHUNK_BYTES`] are handed to the core, which puts each through the
//! in-flight table (so a chunk never races an overlapping application write) and,
//! once admitted, has it read here. A chunk goes as `ResyncData`, or `ResyncZeroes`
//! where it reads as zero (no data on the wire); with `resync-checksum` the target's
//! digests of its granules are asked first and only differing granules go. At most
//! [`RESYNC_INFLIGHT_BYTES`] of chunks (and [`RESYNC_MAX_CHUNKS`] of them, however
//! small) are in flight, and the rate is bounded by [`RateCtl`].
//!
//! A chunk the target acknowledged is done (its range goes back to the in-flight
//! table), but its bits are cleared only once the target has flushed it
//! (`ResyncFlush` … `ResyncFlushed`): a crash of the target would otherwise lose it
//! while the bitmap here says it was copied. Bits marked dirty again meanwhile (a
//! later write the target failed) keep their bits: the copy is older.

use std::collections::HashMap;
use std::ops::Range;

use bitmap::Bitmap;
use nbd_server::buf::{Buf, BufMut, BufPool};
use nix::errno::Errno;

use super::rate::RateCtl;
use super::{RESYNC_CHUNK_BYTES, RESYNC_INFLIGHT_BYTES, RESYNC_MAX_CHUNKS};
use crate::peer::msg::Message;
use crate::repl::core::ctx::Ctx;
use crate::repl::core::verify::{DIGEST_BYTES, digests_of};
use crate::repl::core::{AbandonedChunks, Action};
use crate::repl::job::{JobId, JobKind};
use crate::storage::IoOp;

/// Where a source chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Waiting in the in-flight table behind an overlapping write.
    Waiting,
    /// Being read locally (and, with checksums, its digests asked of the target).
    Reading,
    /// Sent; waiting for this many acks from the target.
    Sent { acks: u32 },
}

#[derive(Debug)]
struct SourceChunk {
    range: Range<u64>,
    state: Chunk,
    /// Checksum resync: the local data, and the target's digests, until both came.
    data: Option<BufMut>,
    remote: Option<Buf>,
    /// The target failed a piece: the chunk's bits stay set.
    failed: bool,
}

/// A chunk that is done: its range goes back to the in-flight table.
#[derive(Debug)]
pub(in crate::repl) struct ChunkDone {
    pub job: JobId,
    pub range: Range<u64>,
}

/// What the source does next.
#[derive(Debug)]
pub(in crate::repl) enum NextChunk {
    /// A new chunk: put it through the in-flight table, then `read_chunk`.
    Start(JobId, Range<u64>),
    /// Nothing now (parallelism, rate, pause, the target's bitmap, or chunks in
    /// flight at the end of a pass).
    Wait,
    /// The cursor reached the end and no chunk is in flight.
    PassDone,
}

#[derive(Debug, Default)]
pub(in crate::repl) struct Source {
    /// Next byte to look for dirty runs at.
    cursor: u64,
    /// Waiting for the target's bitmap (`BitmapDone`) before starting.
    awaiting_bitmap: bool,
    chunks: HashMap<JobId, SourceChunk>,
    /// Bytes of the ranges of `chunks`.
    inflight_bytes: u64,
    /// Sent piece offset → its chunk; digest request offset → its chunk.
    by_offset: HashMap<u64, JobId>,
    by_digest: HashMap<u64, JobId>,
    done_bytes: u64,
    total_bytes: u64,
    /// The (done, total) last sent to the target in `ResyncInfo`.
    info_sent: Option<(u64, u64)>,
    /// Chunks the target acknowledged but has not flushed yet, each tagged with the
    /// id of the `ResyncFlush` that will cover it.
    unflushed: Vec<(Range<u64>, u64)>,
    next_flush_id: u64,
    flush_in_flight: Option<u64>,
    /// The target failed a chunk in this pass.
    failed_chunks: bool,
    /// The next pass waits for a tick (after a failed chunk: no spinning).
    paused_until_tick: bool,
}

impl Source {
    /// A pass over `total_bytes` of dirty data; `awaiting_bitmap`: the target's
    /// bitmap comes first. `next_flush_id` continues a previous pass's numbering.
    pub fn new(total_bytes: u64, awaiting_bitmap: bool, next_flush_id: u64) -> Source {
        Source { total_bytes, awaiting_bitmap, next_flush_id, ..Source::default() }
    }

    pub fn awaiting_bitmap(&self) -> bool {
        self.awaiting_bitmap
    }

    /// The target's bitmap is merged: the pass can start.
    pub fn bitmap_merged(&mut self, total_bytes: u64) {
        self.awaiting_bitmap = false;
        self.total_bytes = total_bytes;
    }

    pub fn is_chunk(&self, job: JobId) -> bool {
        self.chunks.contains_key(&job)
    }

    /// (done, total) bytes of this pass.
    /// Chunks or a flush are in flight: the target owes an answer.
    pub fn awaiting_peer(&self) -> bool {
        !self.chunks.is_empty() || self.flush_in_flight.is_some()
    }

    /// Bytes marked dirty during the pass: more to copy.
    pub fn grow_total(&mut self, bytes: u64) {
        self.total_bytes += bytes;
    }

    pub fn progress(&self) -> (u64, u64) {
        (self.done_bytes, self.total_bytes)
    }

    pub fn failed_chunks(&self) -> bool {
        self.failed_chunks
    }

    pub fn next_flush_id(&self) -> u64 {
        self.next_flush_id
    }

    /// A tick: a pass held after a failed chunk may go on.
    pub fn tick(&mut self) {
        self.paused_until_tick = false;
    }

    pub fn pause_until_tick(&mut self) {
        self.paused_until_tick = true;
    }

    /// The next chunk of dirty data, if one may start now.
    pub fn next_chunk(
        &mut self,
        bitmap: &Bitmap,
        rate: &mut RateCtl,
        paused: bool,
        ctx: &mut Ctx<'_>,
    ) -> NextChunk {
        let full = self.chunks.len() >= RESYNC_MAX_CHUNKS || self.inflight_bytes >= RESYNC_INFLIGHT_BYTES;
        if self.awaiting_bitmap || self.paused_until_tick || full || paused {
            // With a pause, the chunks in flight finish; no new ones start.
            return NextChunk::Wait;
        }
        let Some(run) = bitmap.runs_from(self.cursor).next() else {
            return if self.chunks.is_empty() { NextChunk::PassDone } else { NextChunk::Wait };
        };
        let range = run.start..run.end.min(run.start + RESYNC_CHUNK_BYTES);
        if !rate.take(range.end - range.start) {
            return NextChunk::Wait;
        }
        let job = ctx.job(JobKind::ResyncRead);
        self.cursor = range.end;
        let chunk = SourceChunk {
            range: range.clone(),
            state: Chunk::Waiting,
            data: None,
            remote: None,
            failed: false,
        };
        self.chunks.insert(job, chunk);
        self.inflight_bytes += range.end - range.start;
        NextChunk::Start(job, range)
    }

    /// An admitted chunk: read it (and with checksums, ask for the target's
    /// digests). Done at once only with the injected `skip_chunk` bug.
    pub fn read_chunk(
        &mut self,
        job: JobId,
        pool: &BufPool,
        rate: &mut RateCtl,
        ctx: &mut Ctx<'_>,
    ) -> Option<ChunkDone> {
        let chunk = self.chunks.get_mut(&job)?;
        chunk.state = Chunk::Reading;
        let (offset, len) = (chunk.range.start, chunk.range.end - chunk.range.start);
        if ctx.cfg.bugs.skip_chunk && (offset / RESYNC_CHUNK_BYTES) % 3 == 1 {
            return self.chunk_done(job, rate);
        }
        if ctx.cfg.resync_checksum {
            self.by_digest.insert(offset, job);
            ctx.send(Message::DigestReq { offset, len, after_epoch: 0 });
        }
        ctx.out.push(Action::Local { job, op: IoOp::Read { offset, buf: pool.get(len as usize) } });
        None
    }

    /// A chunk's local read finished: send it (or its zeroes), or with checksums
    /// wait for the target's digests. `Err`: the read failed (the source cannot sync).
    pub fn on_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        pool: &BufPool,
        rate: &mut RateCtl,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<ChunkDone>, ()> {
        let data = match (result, buf) {
            (Ok(()), Some(data)) => data,
            (result, _) => {
                tracing::error!(%job, ?result, "resync read failed; resync stops");
                return Err(());
            }
        };
        let Some(chunk) = self.chunks.get_mut(&job) else { return Ok(None) };
        if ctx.cfg.resync_checksum {
            chunk.data = Some(data);
            return Ok(self.try_compare(job, pool, rate, ctx));
        }
        let range = chunk.range.clone();
        Ok(self.send_pieces(job, data, std::iter::once(range), pool, rate, ctx))
    }

    /// Checksum resync: the target's digests for a chunk (given back if no chunk
    /// of this source asked for them).
    pub fn on_digests(
        &mut self,
        offset: u64,
        digests: Buf,
        pool: &BufPool,
        rate: &mut RateCtl,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<ChunkDone>, Buf> {
        let Some(job) = self.by_digest.remove(&offset) else { return Err(digests) };
        let Some(chunk) = self.chunks.get_mut(&job) else { return Ok(None) };
        chunk.remote = Some(digests);
        Ok(self.try_compare(job, pool, rate, ctx))
    }

    /// Checksum resync: with both the local data and the target's digests, sends
    /// the granules that differ.
    fn try_compare(
        &mut self,
        job: JobId,
        pool: &BufPool,
        rate: &mut RateCtl,
        ctx: &mut Ctx<'_>,
    ) -> Option<ChunkDone> {
        let granularity = ctx.cfg.granularity_bytes;
        let chunk = self.chunks.get_mut(&job)?;
        if chunk.data.is_none() || chunk.remote.is_none() {
            return None;
        }
        let data = chunk.data.take().expect("checked");
        let remote = chunk.remote.take().expect("checked");
        let range = chunk.range.clone();
        let local = digests_of(&data, granularity);
        let mut differing: Vec<Range<u64>> = Vec::new();
        for (i, ours) in local.chunks_exact(DIGEST_BYTES).enumerate() {
            if remote.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES) == Some(ours) {
                continue;
            }
            let start = range.start + i as u64 * granularity;
            let end = (start + granularity).min(range.end);
            match differing.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => differing.push(start..end),
            }
        }
        self.send_pieces(job, data, differing.into_iter(), pool, rate, ctx)
    }

    /// Sends these parts of a chunk (zero parts without data); a chunk with nothing
    /// to send is done at once.
    fn send_pieces(
        &mut self,
        job: JobId,
        data: BufMut,
        pieces: impl Iterator<Item = Range<u64>>,
        pool: &BufPool,
        rate: &mut RateCtl,
        ctx: &mut Ctx<'_>,
    ) -> Option<ChunkDone> {
        let chunk = self.chunks.get(&job)?;
        let (base, whole) = (chunk.range.start, chunk.range.clone());
        let data = data.freeze();
        let mut acks = 0;
        for piece in pieces {
            let bytes = &data[(piece.start - base) as usize..(piece.end - base) as usize];
            let message = if bytes.iter().all(|&b| b == 0) {
                // Zero regions cost no data on the wire.
                Message::ResyncZeroes { offset: piece.start, len: piece.end - piece.start }
            } else if piece == whole {
                rate.sent(piece.end - piece.start);
                Message::ResyncData { offset: piece.start, data: data.clone() }
            } else {
                rate.sent(piece.end - piece.start);
                let mut part = pool.get(bytes.len());
                part.copy_from_slice(bytes);
                Message::ResyncData { offset: piece.start, data: part.freeze() }
            };
            self.by_offset.insert(piece.start, job);
            ctx.send(message);
            acks += 1;
        }
        if acks == 0 {
            // Identical on both sides: nothing to send.
            return self.chunk_done(job, rate);
        }
        self.chunks.get_mut(&job).expect("present").state = Chunk::Sent { acks };
        None
    }

    /// The target wrote (or failed) a piece.
    pub fn on_ack(&mut self, offset: u64, len: u64, errno: i32, rate: &mut RateCtl) -> Option<ChunkDone> {
        let job = self.by_offset.remove(&offset)?;
        let chunk = self.chunks.get_mut(&job)?;
        if errno != 0 {
            tracing::warn!(offset, len, errno, "the sync target failed a chunk; it stays out of sync");
            chunk.failed = true;
        }
        let Chunk::Sent { acks } = &mut chunk.state else { return None };
        *acks -= 1;
        if *acks > 0 {
            return None;
        }
        self.chunk_done(job, rate)
    }

    fn chunk_done(&mut self, job: JobId, rate: &mut RateCtl) -> Option<ChunkDone> {
        let chunk = self.chunks.remove(&job)?;
        let len = chunk.range.end - chunk.range.start;
        self.inflight_bytes -= len;
        if chunk.failed {
            self.failed_chunks = true;
        } else {
            // Cleared once the target flushed it (`on_flushed`).
            self.unflushed.push((chunk.range.clone(), self.next_flush_id));
        }
        self.done_bytes += len;
        rate.progressed(len);
        Some(ChunkDone { job, range: chunk.range })
    }

    /// Acknowledged chunks wait for the target's flush.
    pub fn flush_pending(&self) -> bool {
        !self.unflushed.is_empty() || self.flush_in_flight.is_some()
    }

    /// Asks the target to make what it acknowledged durable; one request at a time.
    pub fn request_flush(&mut self, ctx: &mut Ctx<'_>) {
        if self.flush_in_flight.is_some() || self.unflushed.is_empty() {
            return;
        }
        let id = self.next_flush_id;
        self.next_flush_id += 1;
        self.flush_in_flight = Some(id);
        ctx.send(Message::ResyncFlush { id });
    }

    /// The target flushed: the ranges whose bits may be cleared now.
    pub fn on_flushed(&mut self, id: u64) -> Vec<Range<u64>> {
        if self.flush_in_flight != Some(id) {
            return Vec::new();
        }
        self.flush_in_flight = None;
        let (done, left): (Vec<_>, Vec<_>) = self.unflushed.drain(..).partition(|(_, tag)| *tag <= id);
        self.unflushed = left;
        done.into_iter().map(|(range, _)| range).collect()
    }

    /// `range` was marked dirty again after its chunk was copied: the copy is
    /// older than the data, so the target's flush must not clear its bits.
    pub fn keep_dirty(&mut self, range: &Range<u64>) {
        let mut kept = Vec::with_capacity(self.unflushed.len());
        for (r, tag) in self.unflushed.drain(..) {
            if r.end <= range.start || range.end <= r.start {
                kept.push((r, tag));
                continue;
            }
            if r.start < range.start {
                kept.push((r.start..range.start, tag));
            }
            if range.end < r.end {
                kept.push((range.end..r.end, tag));
            }
        }
        self.unflushed = kept;
    }

    /// Tells the target how far the resync is (on ticks, when it moved).
    pub fn send_info(&mut self, ctx: &mut Ctx<'_>) {
        let info = (self.done_bytes, self.total_bytes);
        if self.awaiting_bitmap || self.info_sent == Some(info) {
            return;
        }
        self.info_sent = Some(info);
        ctx.send(Message::ResyncInfo { done_bytes: info.0, total_bytes: info.1 });
    }

    /// The resync stops: chunks whose range can go back to the in-flight table now,
    /// and chunks whose read or admission comes back later.
    pub fn abandon(self) -> AbandonedChunks {
        let mut chunks = AbandonedChunks { now: Vec::new(), later: Vec::new() };
        for (job, chunk) in self.chunks {
            match chunk.state {
                // Read, waiting for the target's digests that will not come; or sent.
                Chunk::Reading if chunk.data.is_some() => chunks.now.push((job, chunk.range)),
                Chunk::Sent { .. } => chunks.now.push((job, chunk.range)),
                // Still held by the in-flight table or a local read.
                Chunk::Waiting | Chunk::Reading => chunks.later.push((job, chunk.range)),
            }
        }
        chunks
    }
}
