//! Resync, as the core drives it. The sub-machines own their state: [`Source`]
//! (`source.rs`), [`Target`] (`target.rs`) and [`RateCtl`] (`rate.rs`); this module
//! is the glue that lends them the core's shared pieces (the in-flight table, the
//! bitmap, metadata) and acts on what they report.
//!
//! - What to copy is the source's bitmap: for a bitmap resync, united with the
//!   target's (the target sends its non-zero bitmap blocks first, `BitmapBlock` …
//!   `BitmapDone`: after a failover or a split brain both sides changed regions);
//!   for a full sync, every bit is set first. Either way the bits are persistent,
//!   so an interrupted resync (link loss, either node killed) continues where it
//!   stopped.
//! - A pass that ends with bits left (a chunk the target failed, ranges marked
//!   dirty behind the cursor meanwhile) starts another; only a pass that leaves
//!   nothing retires the bitmap generation and sends `ResyncDone`.
//! - The target's disk is Inconsistent until `ResyncDone` and its final flush; then
//!   it adopts the source's generations and is UpToDate.

mod rate;
mod source;
mod target;

use super::*;
use crate::repl::decide::SyncScope;

pub(super) use rate::RateCtl;
pub(super) use source::{ChunkDone, NextChunk, Source};
pub(super) use target::{Target, TargetDone};

/// Largest resync chunk.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Full-size resync chunks in flight at once: the bytes in flight are bounded by
/// this many chunks' worth (the memory and the peer's queue).
pub const RESYNC_PARALLEL: usize = 4;
/// Bytes of resync chunks in flight at once.
pub const RESYNC_INFLIGHT_BYTES: u64 = RESYNC_PARALLEL as u64 * RESYNC_CHUNK_BYTES;
/// Chunks in flight at once, whatever their size. Scattered dirty granules make
/// small chunks; bounding only their count (4) made a catch-up over a 40 ms link
/// copy 4 granules per round trip (0.4 MiB/s, measured by `bench --preset wan`).
pub const RESYNC_MAX_CHUNKS: usize = 256;

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

/// Replication state toward the peer (SPEC §2 words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    /// Pull-ahead: this Primary ships no writes (they go to the bitmap).
    Ahead,
    /// Its Primary pulled ahead: this node is Outdated until a resync.
    Behind,
}

impl ReplState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplState::Off => "Off",
            ReplState::Established => "Established",
            ReplState::SyncSource => "SyncSource",
            ReplState::SyncTarget => "SyncTarget",
            ReplState::Ahead => "Ahead",
            ReplState::Behind => "Behind",
        }
    }
}

impl Core {
    /// Resync progress (zeros when idle; `sent_bytes` counts since start).
    pub fn resync_progress(&self) -> ResyncProgress {
        let (done_bytes, total_bytes) = match (&self.source, &self.target) {
            (Some(s), _) => s.progress(),
            (None, Some(t)) => t.progress(),
            (None, None) => (0, 0),
        };
        let rate = self.rate.measured_bytes_per_sec();
        let running = self.source.is_some() || self.target.is_some();
        let eta_secs = (running && rate > 0).then(|| total_bytes.saturating_sub(done_bytes).div_ceil(rate));
        ResyncProgress {
            done_bytes,
            total_bytes,
            sent_bytes: self.rate.sent_bytes(),
            rate_bytes_per_sec: if running { rate } else { 0 },
            eta_secs,
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
        if !self.source.as_ref().is_some_and(Source::awaiting_bitmap) {
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
        let Some(sync) = self.source.as_mut().filter(|s| s.awaiting_bitmap()) else { return };
        sync.bitmap_merged(total);
        tracing::info!(peer_blocks = blocks, bytes = total, "peer bitmap merged; resync as source");
        self.pump_source(out);
    }

    /// Becomes a sync target: the disk is Inconsistent (durably) until `ResyncDone`.
    pub(super) fn start_target(&mut self, out: &mut Vec<Action>) {
        self.repl = ReplState::SyncTarget;
        self.behind = false;
        self.begin_catch_up(out);
        self.disk = DiskState::Inconsistent;
        let seq = self.persist(out);
        self.target = Some(Target::new(seq));
        // The source's view of this disk (status, promotion decisions).
        self.send(Message::State { role: self.role, disk: self.disk }, out);
    }

    /// `verify --repair` or the end of a pull-ahead (`repl::ahead`) on the peer:
    /// become its sync target.
    pub(super) fn on_start_repair(&mut self, bytes: u64, out: &mut Vec<Action>) {
        if self.role == Role::Primary || self.source.is_some() || self.target.is_some() {
            tracing::warn!(bytes, "resync request refused: this node is Primary or already syncing");
            return;
        }
        tracing::info!(bytes, "the peer starts a resync (repair or catch-up): resync as target");
        self.start_target(out);
        // Writes received before this on the same link may still be on their way
        // to the disk: a resync chunk of the same block must not race them (it
        // holds newer data; the older write landing last would lose it). Found by
        // the simulator with pull-ahead (seed 168).
        self.target_after_drain = !self.applier.mark_drain();
    }

    /// Verify `--repair`: resync what the verify found, as source.
    pub(super) fn start_repair(&mut self, bytes: u64, out: &mut Vec<Action>) {
        self.send(Message::StartRepair { bytes }, out);
        self.start_source(SyncScope::Bitmap, false, out);
    }

    /// `exchange`: wait for the target's bitmap before starting.
    pub(super) fn start_source(&mut self, scope: SyncScope, exchange: bool, out: &mut Vec<Action>) {
        if scope == SyncScope::Full {
            // Every bit set: a full sync is as resumable as a bitmap one.
            self.bitmap.set_all();
        }
        let total = self.bitmap.dirty_bytes();
        tracing::info!(bytes = total, full = scope == SyncScope::Full, exchange, "resync as source");
        self.repl = ReplState::SyncSource;
        self.source = Some(Source::new(total, exchange, 0));
        self.pump_source(out);
    }

    /// Starts chunks up to the parallelism and rate bounds; ends the pass when
    /// nothing is left.
    pub(super) fn pump_source(&mut self, out: &mut Vec<Action>) {
        if self.chunks_wait_for_ahead_barrier() {
            return;
        }
        loop {
            let paused = self.sync_paused();
            let Some(source) = self.source.as_mut() else { return };
            let mut ctx = ctx!(self, out);
            match source.next_chunk(&self.bitmap, &mut self.rate, paused, &mut ctx) {
                NextChunk::Wait => return,
                NextChunk::PassDone if source.flush_pending() => {
                    // The last chunks wait for the target's flush.
                    return source.request_flush(&mut ctx);
                }
                NextChunk::PassDone => return self.finish_pass(out),
                NextChunk::Start(job, range) => {
                    if self.inflight.admit(job, range) {
                        self.read_chunk(job, out);
                    }
                }
            }
        }
    }

    /// An admitted chunk of the source.
    pub(super) fn read_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(source) = self.source.as_mut() else { return };
        let done = source.read_chunk(job, &self.pool, &mut self.rate, &mut ctx!(self, out));
        self.chunk_finished(done, out);
    }

    /// A chunk's local read (of this resync, or of one that was dropped).
    pub(super) fn on_chunk_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        if self.release_abandoned(job, out) {
            return;
        }
        let Some(source) = self.source.as_mut().filter(|s| s.is_chunk(job)) else { return };
        match source.on_read(job, result, buf, &self.pool, &mut self.rate, &mut ctx!(self, out)) {
            Ok(done) => self.chunk_finished(done, out),
            // A source that cannot read its own disk cannot sync.
            Err(()) => self.abandon_source(out),
        }
    }

    /// Checksum resync: the target's digests; false if no chunk waits for them.
    pub(super) fn on_resync_digests(&mut self, offset: u64, digests: Buf, out: &mut Vec<Action>) -> bool {
        let Some(source) = self.source.as_mut() else { return false };
        match source.on_digests(offset, digests, &self.pool, &mut self.rate, &mut ctx!(self, out)) {
            Ok(done) => {
                self.chunk_finished(done, out);
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn on_resync_ack(&mut self, offset: u64, len: u64, errno: i32, out: &mut Vec<Action>) {
        let Some(source) = self.source.as_mut() else { return };
        let done = source.on_ack(offset, len, errno, &mut self.rate);
        self.chunk_finished(done, out);
        if errno != 0 {
            // The target's disk failed: it detaches (see `peer_failed_write`).
            self.peer_failed_write(out);
        }
    }

    /// A chunk is on the target (its bits wait for the target's flush): its range
    /// goes back to the in-flight table, and the next chunks start.
    fn chunk_finished(&mut self, done: Option<ChunkDone>, out: &mut Vec<Action>) {
        let Some(ChunkDone { job, range }) = done else { return };
        let next = self.inflight.complete(job, range.start);
        self.start_released(next, out);
        self.pump_source(out);
    }

    /// Source, on ticks: the target flushes what it acknowledged.
    pub(super) fn source_tick(&mut self, out: &mut Vec<Action>) {
        let Some(source) = self.source.as_mut() else { return };
        source.tick();
        let mut ctx = ctx!(self, out);
        source.request_flush(&mut ctx);
        source.send_info(&mut ctx);
        self.pump_source(out);
    }

    /// Source: the target flushed; those chunks' bits are cleared.
    pub(super) fn on_resync_flushed(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(source) = self.source.as_mut() else { return };
        for range in source.on_flushed(id) {
            self.bitmap.clear_range(range);
        }
        self.pump_source(out);
    }

    /// The cursor reached the end, every chunk acknowledged and flushed.
    fn finish_pass(&mut self, out: &mut Vec<Action>) {
        let source = self.source.take().expect("finishing a pass");
        if self.bitmap.count_bits() > 0 {
            // Bits are left: a chunk the target failed, or ranges marked dirty
            // behind the cursor meanwhile. Not in sync: another pass (stopping here
            // left the target Inconsistent until some later reconnect).
            let total = self.bitmap.dirty_bytes();
            tracing::info!(bytes = total, "resync pass done with bits left; another pass");
            let mut next = Source::new(total, false, source.next_flush_id());
            if source.failed_chunks() {
                // The target failed a write: do not spin on it; the next tick resumes.
                next.pause_until_tick();
            }
            self.source = Some(next);
            return self.pump_source(out);
        }
        tracing::info!(
            bytes = source.progress().0,
            sent_bytes = self.rate.sent_bytes(),
            "resync done (source)"
        );
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
        let Some(source) = self.source.take() else { return };
        self.take_back(source.abandon(), out);
        if self.repl == ReplState::SyncSource {
            self.repl = ReplState::Off;
        }
    }

    /// The link is gone: resync stops (resumable as long as this process keeps its
    /// dirty set; the target stays Inconsistent).
    pub(super) fn abandon_resync(&mut self, out: &mut Vec<Action>) {
        self.abandon_source(out);
        if let Some(t) = self.target.take() {
            // Writes in flight finish on their own; their acks have nowhere to go.
            tracing::warn!(bytes = t.received_bytes(), "link lost during resync; disk stays Inconsistent");
        }
        self.repl = ReplState::Off;
    }

    /// Target: resync data, zeroes and the end of the resync.
    pub(super) fn on_resync_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        let Some(target) = self.target.as_mut() else {
            tracing::warn!("resync message while not a sync target; ignored");
            return;
        };
        if let Message::ResyncDone { gens } = msg {
            // UpToDate only once everything received before this is durable: the
            // resync writes, and the replicated writes too.
            target.on_done_msg(gens);
            self.applier.mark_drain();
            return self.maybe_start_target_flush(out);
        }
        if let Some(job) = target.on_data(msg, &mut ctx!(self, out)) {
            self.applier.peer_write_started(job);
        }
    }

    /// Target: the source asks for a flush of what was acknowledged.
    pub(super) fn on_resync_flush_req(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(target) = self.target.as_mut() else {
            tracing::warn!(id, "resync flush request while not a sync target; ignored");
            return;
        };
        target.on_flush_req(id, &mut ctx!(self, out));
    }

    /// Target: a resync write of the current link finished.
    pub(super) fn on_target_write(&mut self, job: JobId, result: Result<(), Errno>, out: &mut Vec<Action>) {
        self.applier.peer_write_done(job);
        let Some(target) = self.target.as_mut() else { return };
        target.on_write_done(job, result, &mut ctx!(self, out));
        self.maybe_start_target_flush(out);
    }

    /// Target: a flush of the current link finished.
    pub(super) fn on_target_flush(&mut self, job: JobId, result: Result<(), Errno>, out: &mut Vec<Action>) {
        let Some(target) = self.target.as_mut() else { return };
        if let TargetDone::Finished(result) = target.on_flush_done(job, result, &mut ctx!(self, out)) {
            self.finish_target(result, out);
        }
    }

    /// Target: after `ResyncDone`, the final flush once everything before it is done.
    pub(super) fn maybe_start_target_flush(&mut self, out: &mut Vec<Action>) {
        let drained = self.applier.drained();
        let Some(target) = self.target.as_mut() else { return };
        target.maybe_final_flush(drained, &mut ctx!(self, out));
    }

    fn finish_target(&mut self, result: Result<Generations, Errno>, out: &mut Vec<Action>) {
        let Some(target) = self.target.take() else { return };
        self.applier.clear_drain();
        let gens = match result {
            Ok(gens) => gens,
            Err(e) => {
                tracing::error!(error = %e, "flush after resync failed; the disk stays Inconsistent");
                return;
            }
        };
        tracing::info!(bytes = target.received_bytes(), "resync done (target); disk UpToDate");
        self.gens = gens;
        self.disk = DiskState::UpToDate;
        self.crashed_primary = false;
        // What this node had changed was merged into the source's resync.
        self.bitmap.clear_all();
        self.repl = ReplState::Established;
        self.behind = false;
        self.persist(out);
        self.write_bitmap(out);
        self.end_catch_up(out);
        self.send(Message::State { role: self.role, disk: self.disk }, out);
        if self.peer_role == Some(Role::Primary) && !self.peer_takes_writes() {
            // The source lost its disk at the end of the resync: this is the only
            // copy from now on (`repl::diskless`).
            self.track_for_diskless_primary(out);
        }
        // E.g. remove the constraint a fence-peer handler placed against this node.
        out.push(Action::AfterResyncTarget);
    }

    /// Target: the source's progress.
    pub(super) fn on_resync_info(&mut self, done_bytes: u64, total_bytes: u64) {
        if let Some(target) = self.target.as_mut() {
            target.on_info(done_bytes, total_bytes, &mut self.rate);
        }
    }

    /// Target: the metadata saying Inconsistent is durable; apply what waited.
    pub(super) fn on_target_durable(&mut self, seq: u64, out: &mut Vec<Action>) {
        // Until the Inconsistent state is durable, every data-path message waited
        // (`must_hold`): applying anything newer first could leave, after a crash, a
        // disk that mixes generations while its metadata still claims the old one is
        // consistent.
        if self.target.as_mut().is_some_and(|t| t.on_durable(seq)) {
            self.release_ingress(out);
        }
    }
}
