//! Connecting and resync, as part of the [`Core`] (a child module, so it shares the
//! core's state and invariants).
//!
//! On connect the core runs [`decide`] and becomes Established, SyncSource or
//! SyncTarget (or refuses). While syncing, replication of application writes runs as
//! usual; resync copies the rest in disk order:
//!
//! - What to copy is the source's bitmap: for a bitmap resync, united with the
//!   target's (the target sends its non-zero bitmap blocks first, `BitmapBlock` …
//!   `BitmapDone`: after a failover or a split brain both sides changed regions); for
//!   a full sync, every bit is set first. Either way the bits are persistent, so an
//!   interrupted resync (link loss, either node killed) continues where it stopped.
//! - Source: a cursor walks the dirty runs; chunks of at most [`RESYNC_CHUNK_BYTES`]
//!   go through the same [`InFlight`] table as application writes, so a chunk never
//!   races an overlapping write: the chunk is read locally, sent as `ResyncData` (or
//!   `ResyncZeroes` when it reads as zero — no data on the wire), and its bits are
//!   cleared and its range released only when the target acknowledges it. With
//!   `resync-checksum`, the target is asked for the digests of the chunk's granules
//!   first and only differing granules are sent. At most [`RESYNC_PARALLEL`] chunks
//!   are in flight, and a token bucket fed by ticks bounds the rate. When all are
//!   acknowledged the source clears its bitmap generation and sends `ResyncDone`.
//! - Target: first its disk becomes Inconsistent, durably (a crash mid-resync must
//!   never leave a half-copied disk that claims to be consistent); resync messages
//!   wait for that. Each chunk is written and acknowledged. On `ResyncDone` it
//!   flushes, adopts the source's generations, clears its bitmap, and is UpToDate.

use std::collections::HashMap;
use std::ops::Range;

use super::verify::{DIGEST_BYTES, digests_of};
use super::*;
use crate::repl::decide::{SideState, SyncScope};

/// Largest resync chunk.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync chunks in flight at once (bounds the memory and the peer's queue).
pub const RESYNC_PARALLEL: usize = 4;

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

/// Resync progress on the source.
#[derive(Debug, Default)]
pub struct SourceSync {
    /// Next byte to look for dirty runs at.
    cursor: u64,
    /// Waiting for the target's bitmap (`BitmapDone`) before starting.
    awaiting_bitmap: bool,
    chunks: HashMap<JobId, SourceChunk>,
    /// Sent piece offset → its chunk; digest request offset → its chunk.
    by_offset: HashMap<u64, JobId>,
    by_digest: HashMap<u64, JobId>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// The (done, total) last sent to the target in `ResyncInfo`.
    info_sent: Option<(u64, u64)>,
    /// Chunks the target acknowledged but has not flushed yet: their bits stay set
    /// until the `ResyncFlushed` answering the request with the tagged id (a crash
    /// of the target would lose them while the bitmap here says they are copied).
    unflushed: Vec<(Range<u64>, u64)>,
    /// The id the next `ResyncFlush` carries, and the one awaiting its answer.
    next_flush_id: u64,
    flush_in_flight: Option<u64>,
    /// The target failed a chunk in this pass; the next pass waits for a tick.
    failed_chunks: bool,
    pub(super) paused_until_tick: bool,
}

impl SourceSync {
    pub(super) fn is_chunk(&self, job: JobId) -> bool {
        self.chunks.contains_key(&job)
    }

    /// `range` was marked dirty again after its chunk was copied: the copy is
    /// older than the data, so the target's flush must not clear its bits.
    pub(super) fn keep_dirty(&mut self, range: &Range<u64>) {
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
}

/// Resync rate control (a token bucket fed by ticks) and the measured rate.
#[derive(Debug)]
pub struct RateCtl {
    fixed_bytes_per_sec: Option<u64>,
    min_bytes_per_sec: u64,
    /// The limit in force: `None` is full speed.
    limit_bytes_per_sec: Option<u64>,
    tokens_bytes: i64,
    /// Resync bytes done in this process (both directions), and at the last tick.
    pub(super) progress_bytes: u64,
    progress_at_tick: u64,
    /// Smoothed bytes per second over recent ticks.
    measured_bytes_per_sec: f64,
    /// Payload bytes sent for resync since start (status `resync_sent_bytes`).
    pub(super) sent_bytes: u64,
}

impl RateCtl {
    pub(super) fn new(cfg: &CoreConfig) -> RateCtl {
        RateCtl {
            fixed_bytes_per_sec: cfg.resync_rate_bytes_per_sec,
            min_bytes_per_sec: cfg.resync_min_rate_bytes_per_sec,
            limit_bytes_per_sec: cfg.resync_rate_bytes_per_sec,
            tokens_bytes: RESYNC_CHUNK_BYTES as i64,
            progress_bytes: 0,
            progress_at_tick: 0,
            measured_bytes_per_sec: 0.0,
            sent_bytes: 0,
        }
    }

    /// Whether a chunk of `len` bytes may start now; takes its tokens if so.
    fn take(&mut self, len: u64) -> bool {
        if self.limit_bytes_per_sec.is_none() {
            return true;
        }
        if self.tokens_bytes <= 0 {
            return false;
        }
        self.tokens_bytes -= len as i64;
        true
    }
}

/// Why a connection is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub reason: String,
    /// Stop connecting until `blockctl connect` (split brain, unrelated data).
    pub standalone: bool,
}

/// Resync progress for status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub sent_bytes: u64,
    pub rate_bytes_per_sec: u64,
    /// Seconds left at the measured rate, while a resync runs.
    pub eta_secs: Option<u64>,
}

/// Resync state on the target.
#[derive(Debug, Default)]
pub struct TargetSync {
    /// The metadata update marking the disk Inconsistent; resync data waits for it.
    inconsistent_seq: u64,
    pub(super) ready: bool,
    writes: HashMap<JobId, (u64, u64)>,
    /// Flushes the source asked for (job → the request's id).
    flush_reqs: HashMap<JobId, u64>,
    /// The final flush was started.
    final_flush: bool,
    done: Option<Generations>,
    pub received_bytes: u64,
    /// The source's view of the resync (`ResyncInfo`): done and total bytes.
    source_done_bytes: u64,
    source_total_bytes: u64,
}

/// Replication state toward the peer (SPEC §2 words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
}

impl ReplState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplState::Off => "Off",
            ReplState::Established => "Established",
            ReplState::SyncSource => "SyncSource",
            ReplState::SyncTarget => "SyncTarget",
        }
    }
}

impl Core {
    /// The replication state toward the peer.
    pub fn repl_state(&self) -> ReplState {
        self.repl
    }

    /// This node's side for [`decide`], given the peer's.
    pub fn side_state(&self, remote: &SideState) -> SideState {
        self.own_state(!remote.lower_name)
    }

    /// This node's state as it announces it to a peer (`lower_name`: its name sorts
    /// before the peer's).
    pub fn own_state(&self, lower_name: bool) -> SideState {
        SideState {
            gens: self.gens,
            disk: self.disk,
            role: self.role,
            crashed_primary: self.crashed_primary,
            dirty: self.bitmap.count_bits() > 0,
            discard_my_data: self.discard_my_data,
            lower_name,
        }
    }

    /// Resync progress (zeros when idle; `sent_bytes` counts since start).
    pub fn resync_progress(&self) -> ResyncProgress {
        let (done_bytes, total_bytes) = match (&self.source, &self.target) {
            (Some(s), _) => (s.done_bytes, s.total_bytes),
            (None, Some(t)) => (t.source_done_bytes, t.source_total_bytes),
            (None, None) => (0, 0),
        };
        let rate = self.rate.measured_bytes_per_sec as u64;
        let running = self.source.is_some() || self.target.is_some();
        let eta_secs = (running && rate > 0).then(|| total_bytes.saturating_sub(done_bytes).div_ceil(rate));
        ResyncProgress {
            done_bytes,
            total_bytes,
            sent_bytes: self.rate.sent_bytes,
            rate_bytes_per_sec: if running { rate } else { 0 },
            eta_secs,
        }
    }

    /// A tick: refill the rate bucket (`auto`: full speed unless the application did
    /// I/O since the last tick) and update the measured rate.
    pub(super) fn rate_tick(&mut self, elapsed_ms: u64, app_requests: u64) {
        let r = &mut self.rate;
        r.limit_bytes_per_sec = match r.fixed_bytes_per_sec {
            Some(fixed) => Some(fixed),
            None if app_requests > 0 => Some(r.min_bytes_per_sec),
            None => None,
        };
        if let Some(limit) = r.limit_bytes_per_sec {
            let add = limit.saturating_mul(elapsed_ms) / 1000;
            // A burst of at most a fifth of a second (but one chunk at least).
            let burst = (limit / 5).max(RESYNC_CHUNK_BYTES);
            r.tokens_bytes = (r.tokens_bytes + add as i64).min(burst as i64);
        }
        if elapsed_ms > 0 {
            let delta = r.progress_bytes - r.progress_at_tick;
            r.progress_at_tick = r.progress_bytes;
            let now = delta as f64 * 1000.0 / elapsed_ms as f64;
            r.measured_bytes_per_sec = 0.8 * r.measured_bytes_per_sec + 0.2 * now;
        }
    }

    /// Target side of a bitmap resync: what this node changed goes to the source.
    pub(super) fn send_bitmap(&mut self, out: &mut Vec<Action>) {
        let mut block = [0u8; bitmap::BLOCK_BYTES];
        let mut sent = 0;
        for index in 0..self.bitmap.blocks() {
            self.bitmap.encode_block(index, &mut block);
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            let mut data = self.pool.get(bitmap::BLOCK_BYTES);
            data.copy_from_slice(&block);
            self.send(Message::BitmapBlock { index, data: data.freeze() }, out);
            sent += 1;
        }
        self.send(Message::BitmapDone { blocks: sent }, out);
    }

    /// Source: a block of the target's bitmap.
    pub(super) fn on_bitmap_block(&mut self, index: u64, data: &Buf) {
        if !self.source.as_ref().is_some_and(|s| s.awaiting_bitmap) {
            tracing::warn!(index, "bitmap block outside a bitmap exchange; ignored");
            return;
        }
        match <&[u8; bitmap::BLOCK_BYTES]>::try_from(&data[..]) {
            Ok(block) if self.bitmap.or_block(index, block) => {}
            _ => tracing::warn!(index, len = data.len(), "malformed bitmap block from the peer; ignored"),
        }
    }

    /// Source: the target's bitmap is merged; the resync starts.
    pub(super) fn on_bitmap_done(&mut self, blocks: u64, out: &mut Vec<Action>) {
        let total = self.bitmap.dirty_bytes();
        let Some(sync) = self.source.as_mut().filter(|s| s.awaiting_bitmap) else { return };
        sync.awaiting_bitmap = false;
        sync.total_bytes = total;
        tracing::info!(peer_blocks = blocks, bytes = total, "peer bitmap merged; resync as source");
        self.pump_source(out);
    }

    /// Becomes a sync target: the disk is Inconsistent (durably) until `ResyncDone`.
    pub(super) fn start_target(&mut self, out: &mut Vec<Action>) {
        self.repl = ReplState::SyncTarget;
        self.disk = DiskState::Inconsistent;
        let seq = self.persist(out);
        self.target = Some(TargetSync { inconsistent_seq: seq, ..TargetSync::default() });
        // The source's view of this disk (status, promotion decisions).
        self.send(Message::State { role: self.role, disk: self.disk }, out);
    }

    /// `verify --repair` from the peer: become its sync target.
    pub(super) fn on_start_repair(&mut self, bytes: u64, out: &mut Vec<Action>) {
        if self.role == Role::Primary || self.source.is_some() || self.target.is_some() {
            tracing::warn!(bytes, "repair request refused: this node is Primary or already syncing");
            return;
        }
        tracing::info!(bytes, "verify repair: resync as target");
        self.start_target(out);
    }

    /// Verify `--repair`: resync what the verify found, as source.
    pub(super) fn start_repair(&mut self, bytes: u64, out: &mut Vec<Action>) {
        self.send(Message::StartRepair { bytes }, out);
        self.start_source(SyncScope::Bitmap, false, out);
    }

    pub(super) fn start_link(&mut self) {
        // A pause on the peer ended with its link; one here is told again (connect).
        self.sync_paused_by_peer = false;
        // Both sides number the epochs of a link from 1.
        self.link = Link::Replicating;
        self.epoch = 1;
        self.epoch_acked = false;
        self.epoch_writes = 0;
        // Completions of the previous link's jobs are recognised by this (their
        // writes still count in `peer_writes` until they land).
        self.link_gen = (self.link_gen + 1) & ((1 << 24) - 1);
        self.applier = Applier { epoch: 1, ..Applier::default() };
        if !self.cfg.bugs.accept_stale_completion {
            self.applying.clear();
        }
    }

    /// `exchange`: wait for the target's bitmap before starting.
    pub(super) fn start_source(&mut self, scope: SyncScope, exchange: bool, out: &mut Vec<Action>) {
        if scope == SyncScope::Full {
            // Every bit set: a full sync is as resumable as a bitmap one.
            self.bitmap.set_all();
        }
        let sync = SourceSync {
            awaiting_bitmap: exchange,
            total_bytes: self.bitmap.dirty_bytes(),
            ..SourceSync::default()
        };
        tracing::info!(
            bytes = sync.total_bytes,
            full = scope == SyncScope::Full,
            exchange,
            "resync as source"
        );
        self.repl = ReplState::SyncSource;
        self.source = Some(sync);
        self.pump_source(out);
    }

    /// Starts chunks up to the parallelism and rate bounds; finishes when nothing is
    /// left.
    pub(super) fn pump_source(&mut self, out: &mut Vec<Action>) {
        loop {
            let paused = self.sync_paused();
            let Some(sync) = self.source.as_mut() else { return };
            if sync.awaiting_bitmap || sync.paused_until_tick || sync.chunks.len() >= RESYNC_PARALLEL {
                return;
            }
            if paused {
                // The chunks in flight finish; no new ones start until resumed.
                return;
            }
            let next = self.bitmap.runs_from(sync.cursor).next();
            let Some(run) = next else {
                if sync.chunks.is_empty() {
                    if sync.unflushed.is_empty() && sync.flush_in_flight.is_none() {
                        self.finish_source(out);
                    } else {
                        self.request_resync_flush(out);
                    }
                }
                return;
            };
            let range = run.start..run.end.min(run.start + RESYNC_CHUNK_BYTES);
            if !self.rate.take(range.end - range.start) {
                return;
            }
            let job = self.ids.next(JobKind::ResyncRead, self.link_gen);
            let sync = self.source.as_mut().expect("checked");
            sync.cursor = range.end;
            let chunk = SourceChunk {
                range: range.clone(),
                state: Chunk::Waiting,
                data: None,
                remote: None,
                failed: false,
            };
            sync.chunks.insert(job, chunk);
            if self.inflight.admit(job, range) {
                self.read_chunk(job, out);
            }
        }
    }

    fn read_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        let checksum = self.cfg.resync_checksum;
        let Some(sync) = self.source.as_mut() else { return };
        let Some(chunk) = sync.chunks.get_mut(&job) else { return };
        chunk.state = Chunk::Reading;
        let (offset, len) = (chunk.range.start, chunk.range.end - chunk.range.start);
        if self.cfg.bugs.skip_chunk && (offset / RESYNC_CHUNK_BYTES) % 3 == 1 {
            return self.chunk_done(job, out);
        }
        if checksum {
            sync.by_digest.insert(offset, job);
            self.send(Message::DigestReq { offset, len, after_epoch: 0 }, out);
        }
        let buf = self.pool.get(len as usize);
        out.push(Action::Local { job, op: IoOp::Read { offset, buf } });
    }

    /// Jobs the in-flight table released: application writes or resync chunks. A
    /// chunk of an abandoned resync gives its range back at once.
    pub(super) fn start_released(&mut self, jobs: Vec<JobId>, out: &mut Vec<Action>) {
        for job in jobs {
            if self.writes.contains_key(&job) {
                self.dispatch_write(job, out);
            } else if self.source.as_ref().is_some_and(|s| s.chunks.contains_key(&job)) {
                self.read_chunk(job, out);
            } else if self.verify.as_ref().is_some_and(|v| v.is_chunk(job)) {
                self.read_verify_chunk(job, out);
            } else if let Some(range) = self.abandoned_chunks.remove(&job) {
                let next = self.inflight.complete(job, range.start);
                self.start_released(next, out);
            }
        }
    }

    /// A chunk's local read finished: send it (or its zeroes), or with checksums
    /// wait for the target's digests.
    pub(super) fn on_chunk_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        if let Some(range) = self.abandoned_chunks.remove(&job) {
            // A chunk of a resync that was dropped: give its range back.
            let next = self.inflight.complete(job, range.start);
            return self.start_released(next, out);
        }
        if !self.source.as_ref().is_some_and(|s| s.is_chunk(job)) {
            return;
        }
        let data = match (result, buf) {
            (Ok(()), Some(data)) => data,
            (result, _) => {
                // A source that cannot read its own disk cannot sync.
                tracing::error!(%job, ?result, "resync read failed; resync stops");
                self.abandon_source(out);
                return;
            }
        };
        let checksum = self.cfg.resync_checksum;
        let Some(chunk) = self.source.as_mut().and_then(|s| s.chunks.get_mut(&job)) else { return };
        if checksum {
            chunk.data = Some(data);
            return self.try_compare_chunk(job, out);
        }
        let range = chunk.range.clone();
        self.send_pieces(job, data, std::iter::once(range), out);
    }

    /// Checksum resync: the target's digests for a chunk.
    pub(super) fn on_resync_digests(&mut self, offset: u64, digests: Buf, out: &mut Vec<Action>) -> bool {
        let Some(sync) = self.source.as_mut() else { return false };
        let Some(job) = sync.by_digest.remove(&offset) else { return false };
        if let Some(chunk) = sync.chunks.get_mut(&job) {
            chunk.remote = Some(digests);
            self.try_compare_chunk(job, out);
        }
        true
    }

    /// Checksum resync: with both the local data and the target's digests, sends
    /// the granules that differ.
    fn try_compare_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        let granularity = self.cfg.granularity_bytes;
        let Some(chunk) = self.source.as_mut().and_then(|s| s.chunks.get_mut(&job)) else { return };
        if chunk.data.is_none() || chunk.remote.is_none() {
            return;
        }
        let data = chunk.data.take().expect("checked");
        let remote = chunk.remote.take().expect("checked");
        let range = chunk.range.clone();
        let local = digests_of(&data, granularity);
        let mut differing: Vec<Range<u64>> = Vec::new();
        for (i, ours) in local.chunks_exact(DIGEST_BYTES).enumerate() {
            let theirs = remote.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES);
            if theirs == Some(ours) {
                continue;
            }
            let start = range.start + i as u64 * granularity;
            let end = (start + granularity).min(range.end);
            match differing.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => differing.push(start..end),
            }
        }
        self.send_pieces(job, data, differing.into_iter(), out);
    }

    /// Sends these parts of a chunk (zero parts without data); a chunk with nothing
    /// to send is done at once.
    fn send_pieces(
        &mut self,
        job: JobId,
        data: BufMut,
        pieces: impl Iterator<Item = Range<u64>>,
        out: &mut Vec<Action>,
    ) {
        let Some(chunk) = self.source.as_ref().and_then(|s| s.chunks.get(&job)) else { return };
        let base = chunk.range.start;
        let whole = chunk.range.clone();
        let data = data.freeze();
        let mut acks = 0;
        for piece in pieces {
            let bytes = &data[(piece.start - base) as usize..(piece.end - base) as usize];
            let message = if bytes.iter().all(|&b| b == 0) {
                // Zero regions cost no data on the wire.
                Message::ResyncZeroes { offset: piece.start, len: piece.end - piece.start }
            } else if piece == whole {
                self.rate.sent_bytes += piece.end - piece.start;
                Message::ResyncData { offset: piece.start, data: data.clone() }
            } else {
                self.rate.sent_bytes += piece.end - piece.start;
                let mut part = self.pool.get(bytes.len());
                part.copy_from_slice(bytes);
                Message::ResyncData { offset: piece.start, data: part.freeze() }
            };
            self.source.as_mut().expect("checked").by_offset.insert(piece.start, job);
            self.send(message, out);
            acks += 1;
        }
        let sync = self.source.as_mut().expect("checked");
        if acks == 0 {
            // Identical on both sides: nothing to send.
            self.chunk_done(job, out);
        } else {
            sync.chunks.get_mut(&job).expect("present").state = Chunk::Sent { acks };
        }
    }

    pub(super) fn on_resync_ack(&mut self, offset: u64, len: u64, errno: i32, out: &mut Vec<Action>) {
        let Some(sync) = self.source.as_mut() else { return };
        let Some(job) = sync.by_offset.remove(&offset) else { return };
        let Some(chunk) = sync.chunks.get_mut(&job) else { return };
        if errno != 0 {
            tracing::warn!(offset, len, errno, "the sync target failed a chunk; it stays out of sync");
            chunk.failed = true;
        }
        let Chunk::Sent { acks } = &mut chunk.state else { return };
        *acks -= 1;
        if *acks == 0 {
            self.chunk_done(job, out);
        }
    }

    /// Every piece of a chunk is on the target (or failed): clear its bits unless it
    /// failed, release its range, go on.
    fn chunk_done(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(sync) = self.source.as_mut() else { return };
        let Some(chunk) = sync.chunks.remove(&job) else { return };
        let len = chunk.range.end - chunk.range.start;
        if chunk.failed {
            sync.failed_chunks = true;
        } else {
            // Cleared once the target flushed it (`on_resync_flushed`).
            sync.unflushed.push((chunk.range.clone(), sync.next_flush_id));
        }
        sync.done_bytes += len;
        self.rate.progress_bytes += len;
        let next = self.inflight.complete(job, chunk.range.start);
        self.start_released(next, out);
        self.pump_source(out);
    }

    /// Source: asks the target to make what it acknowledged durable (on ticks, and
    /// when the last chunk is acknowledged); one request at a time.
    pub(super) fn request_resync_flush(&mut self, out: &mut Vec<Action>) {
        let Some(sync) = self.source.as_mut() else { return };
        if sync.flush_in_flight.is_some() || sync.unflushed.is_empty() {
            return;
        }
        let id = sync.next_flush_id;
        sync.next_flush_id += 1;
        sync.flush_in_flight = Some(id);
        self.send(Message::ResyncFlush { id }, out);
    }

    /// Source: the target flushed: the chunks it had acknowledged are durable there.
    pub(super) fn on_resync_flushed(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(sync) = self.source.as_mut() else { return };
        if sync.flush_in_flight != Some(id) {
            return;
        }
        sync.flush_in_flight = None;
        let (done, left): (Vec<_>, Vec<_>) = sync.unflushed.drain(..).partition(|(_, tag)| *tag <= id);
        sync.unflushed = left;
        for (range, _) in done {
            self.bitmap.clear_range(range);
        }
        self.pump_source(out);
    }

    /// Target: the source asks for a flush of what was acknowledged.
    pub(super) fn on_resync_flush_req(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(t) = self.target.as_mut() else {
            tracing::warn!(id, "resync flush request while not a sync target; ignored");
            return;
        };
        let job = self.ids.next(JobKind::ResyncFlush, self.link_gen);
        t.flush_reqs.insert(job, id);
        out.push(Action::Local { job, op: IoOp::Flush });
    }

    fn finish_source(&mut self, out: &mut Vec<Action>) {
        let sync = self.source.take().expect("finishing a resync");
        if self.bitmap.count_bits() > 0 {
            // Bits are left: a chunk the target failed, or ranges marked dirty
            // behind the cursor meanwhile. Not in sync: another pass (stopping here
            // left the target Inconsistent until some later reconnect).
            tracing::info!(
                bytes = self.bitmap.dirty_bytes(),
                "resync pass done with bits left; another pass"
            );
            let total = self.bitmap.dirty_bytes();
            let next =
                SourceSync { total_bytes: total, next_flush_id: sync.next_flush_id, ..SourceSync::default() };
            self.source = Some(next);
            if sync.failed_chunks {
                // The target failed a write: do not spin on it; the next tick resumes.
                self.source.as_mut().expect("set").paused_until_tick = true;
                return;
            }
            return self.pump_source(out);
        }
        tracing::info!(bytes = sync.done_bytes, sent_bytes = self.rate.sent_bytes, "resync done (source)");
        // In sync: the bitmap generation is no longer needed.
        if self.gens.bitmap != 0 {
            self.gens.history.rotate_right(1);
            self.gens.history[0] = self.gens.bitmap;
            self.gens.bitmap = 0;
        }
        self.crashed_primary = false;
        self.persist(out);
        self.write_bitmap(out);
        self.send(Message::ResyncDone { gens: self.gens }, out);
        self.repl = ReplState::Established;
    }

    fn abandon_source(&mut self, out: &mut Vec<Action>) {
        let Some(sync) = self.source.take() else { return };
        for (job, chunk) in sync.chunks {
            match chunk.state {
                // Read, waiting for the target's digests that will not come.
                Chunk::Reading if chunk.data.is_some() => {
                    let next = self.inflight.complete(job, chunk.range.start);
                    self.start_released(next, out);
                }
                // Still held by the in-flight table or a local read: given back later.
                Chunk::Waiting | Chunk::Reading => {
                    self.abandoned_chunks.insert(job, chunk.range);
                }
                Chunk::Sent { .. } => {
                    let next = self.inflight.complete(job, chunk.range.start);
                    self.start_released(next, out);
                }
            }
        }
        if self.repl == ReplState::SyncSource {
            self.repl = ReplState::Off;
        }
    }

    /// Target: resync data, zeroes and the end of the resync.
    pub(super) fn on_resync_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        let Some(t) = self.target.as_mut() else {
            tracing::warn!("resync message while not a sync target; ignored");
            return;
        };
        let (offset, len, op) = match msg {
            Message::ResyncData { offset, data } => {
                let len = data.len() as u64;
                t.received_bytes += len;
                (offset, len, IoOp::Write { offset, buf: data, fua: false })
            }
            Message::ResyncZeroes { offset, len } => {
                t.received_bytes += len;
                (offset, len, IoOp::WriteZeroes { offset, len, may_trim: true, fast_only: false, fua: false })
            }
            Message::ResyncDone { gens } => {
                // UpToDate only once everything received before this is durable:
                // the resync writes, and the replicated writes too.
                t.done = Some(gens);
                self.mark_drain();
                self.maybe_start_target_flush(out);
                return;
            }
            _ => return,
        };
        let job = self.ids.next(JobKind::ResyncWrite, self.link_gen);
        self.peer_write_started(job);
        let t = self.target.as_mut().expect("checked");
        t.writes.insert(job, (offset, len));
        out.push(Action::Local { job, op });
    }

    /// Target: the source's progress (status, events, the measured rate and ETA).
    pub(super) fn on_resync_info(&mut self, done_bytes: u64, total_bytes: u64) {
        let Some(t) = self.target.as_mut() else { return };
        self.rate.progress_bytes += done_bytes.saturating_sub(t.source_done_bytes);
        t.source_done_bytes = done_bytes;
        t.source_total_bytes = total_bytes;
    }

    /// Source: tells the target how far the resync is (on ticks, when it moved).
    pub(super) fn send_resync_info(&mut self, out: &mut Vec<Action>) {
        let Some(s) = self.source.as_mut() else { return };
        let info = (s.done_bytes, s.total_bytes);
        if s.awaiting_bitmap || s.info_sent == Some(info) {
            return;
        }
        s.info_sent = Some(info);
        self.send(Message::ResyncInfo { done_bytes: info.0, total_bytes: info.1 }, out);
    }

    /// Target: the metadata saying Inconsistent is durable; apply what waited.
    pub(super) fn on_target_durable(&mut self, seq: u64, out: &mut Vec<Action>) {
        let Some(t) = self.target.as_mut() else { return };
        if t.ready || seq < t.inconsistent_seq {
            return;
        }
        // Until the Inconsistent state is durable, every data-path message waited
        // (`must_hold`): applying anything newer first could leave, after a crash, a
        // disk that mixes generations while its metadata still claims the old one is
        // consistent.
        t.ready = true;
        self.release_ingress(out);
    }

    /// Target: a local op finished; true if it was a resync op.
    pub(super) fn on_target_local(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        out: &mut Vec<Action>,
    ) -> bool {
        if job.kind() == JobKind::ResyncFlush {
            if let Some(id) = self.target.as_mut().and_then(|t| t.flush_reqs.remove(&job)) {
                match result {
                    Ok(()) => self.send(Message::ResyncFlushed { id }, out),
                    // Unanswered: the source keeps the bits (fail closed).
                    Err(e) => tracing::error!(errno = %e, "flush for the sync source failed"),
                }
                return true;
            }
            self.finish_target(result, out);
            return true;
        }
        let Some(t) = self.target.as_mut() else { return false };
        let Some((offset, len)) = t.writes.remove(&job) else { return false };
        let errno = result.err().map_or(0, |e| e as i32);
        self.send(Message::ResyncAck { offset, len, errno }, out);
        self.maybe_start_target_flush(out);
        true
    }

    /// Target: after `ResyncDone`, once its writes and every replicated write
    /// received before it completed, the final flush.
    pub(super) fn maybe_start_target_flush(&mut self, out: &mut Vec<Action>) {
        let drained = self.drained();
        let Some(t) = self.target.as_mut() else { return };
        if t.done.is_none() || !t.writes.is_empty() || !drained || t.final_flush {
            return;
        }
        t.final_flush = true;
        let job = self.ids.next(JobKind::ResyncFlush, self.link_gen);
        out.push(Action::Local { job, op: IoOp::Flush });
    }

    fn finish_target(&mut self, result: Result<(), Errno>, out: &mut Vec<Action>) {
        let Some(t) = self.target.take() else { return };
        if let Err(e) = result {
            tracing::error!(error = %e, "flush after resync failed; the disk stays Inconsistent");
            return;
        }
        let gens = t.done.expect("flush only after ResyncDone");
        self.applier.drain_mark = None;
        tracing::info!(bytes = t.received_bytes, "resync done (target); disk UpToDate");
        self.gens = gens;
        self.disk = DiskState::UpToDate;
        self.crashed_primary = false;
        // What this node had changed was merged into the source's resync.
        self.bitmap.clear_all();
        self.repl = ReplState::Established;
        self.persist(out);
        self.write_bitmap(out);
        self.send(Message::State { role: self.role, disk: self.disk }, out);
        // E.g. remove the constraint a fence-peer handler placed against this node.
        out.push(Action::AfterResyncTarget);
    }

    /// The link is gone: resync stops (resumable as long as this process keeps its
    /// dirty set; the target stays Inconsistent).
    pub(super) fn abandon_resync(&mut self, out: &mut Vec<Action>) {
        self.abandon_source(out);
        if let Some(t) = self.target.take() {
            // Writes in flight finish on their own; their acks have nowhere to go.
            tracing::warn!(bytes = t.received_bytes, "link lost during resync; disk stays Inconsistent");
        }
        self.repl = ReplState::Off;
    }
}
