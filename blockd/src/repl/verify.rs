//! Digests of granules, a sub-machine of the core that owns its state: online
//! verify, and the digest requests a node serves for its peer (verify, checksum
//! resync).
//!
//! - Verify (`blockctl verify`): the node that runs it walks the whole device in
//!   chunks of [`VERIFY_CHUNK_BYTES`]. The core puts each chunk through the
//!   [`InFlight`](super::inflight::InFlight) table like a write, so no application
//!   write to it runs meanwhile; once admitted it is read locally and its digests
//!   are asked of the peer. On a Primary the open epoch is closed first and the
//!   request carries its number: the peer answers only after every write sent
//!   before was applied, so a write still queued on the peer is never reported as a
//!   difference. Granules whose digests differ are reported to the core, which sets
//!   them in the bitmap; with `--repair` a resync of them follows (the peer becomes
//!   the sync target), else the next resync copies them.
//! - Digest server: a `DigestReq` is served (read, digest each granule, `Digests`)
//!   once the applier has finished the epoch it names.
//!
//! A digest is xxh3-128 of one granule: 16 bytes, fast enough to keep up with a
//! sequential read, and a collision between two different granules is practically
//! impossible (this is not a defence against an adversary who controls the data).

use std::collections::HashMap;
use std::ops::Range;

use nbd_server::buf::{Buf, BufMut, BufPool};
use nix::errno::Errno;

use crate::peer::msg::Message;
use crate::repl::core::ctx::Ctx;
use crate::repl::core::{AbandonedChunks, RESYNC_CHUNK_BYTES};
use crate::repl::job::{JobId, JobKind};
use crate::storage::IoOp;

/// Bytes of one granule's digest.
pub const DIGEST_BYTES: usize = 16;
/// Verify chunk size and parallelism.
pub const VERIFY_CHUNK_BYTES: u64 = 1 << 20;
pub const VERIFY_PARALLEL: usize = 8;

/// The digests of `data`'s granules, in order (the last may be short).
pub fn digests_of(data: &[u8], granularity_bytes: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(granularity_bytes as usize) * DIGEST_BYTES);
    for granule in data.chunks(granularity_bytes as usize) {
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(granule).to_le_bytes());
    }
    out
}

#[derive(Debug)]
struct VerifyChunk {
    range: Range<u64>,
    /// Admitted by the in-flight table (its local read was issued).
    started: bool,
    local: Option<Vec<u8>>,
    remote: Option<Buf>,
}

/// A verify run, and its result once finished (for status).
#[derive(Debug)]
struct VerifyRun {
    cursor: u64,
    size_bytes: u64,
    chunks: HashMap<JobId, VerifyChunk>,
    by_offset: HashMap<u64, JobId>,
    repair: bool,
    finished: bool,
    done_bytes: u64,
    out_of_sync_bytes: u64,
}

/// Verify status for `blockctl status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStatus {
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub out_of_sync_bytes: u64,
}

/// A verify chunk that is done: its range goes back to the in-flight table.
#[derive(Debug)]
pub(super) struct ChunkDone {
    pub job: JobId,
    pub range: Range<u64>,
    /// Granules that differ from the peer's.
    pub differing: Vec<Range<u64>>,
}

/// How a verify ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct VerifyEnd {
    pub verified_bytes: u64,
    pub out_of_sync_bytes: u64,
    /// `Some` if it was cut short, and why.
    pub error: Option<String>,
    /// `--repair` was asked and something differs.
    pub repair: bool,
}

/// Online verify and the digest server.
#[derive(Debug, Default)]
pub(super) struct Verifier {
    run: Option<VerifyRun>,
    /// Digest requests from the peer waiting for their epoch: (offset, len, epoch).
    held: Vec<(u64, u64, u64)>,
    /// Digest reads in flight.
    reads: HashMap<JobId, (u64, u64)>,
}

impl Verifier {
    /// A verify is running.
    pub fn running(&self) -> bool {
        self.run.as_ref().is_some_and(|v| !v.finished)
    }

    pub fn start(&mut self, size_bytes: u64, repair: bool) {
        tracing::info!(bytes = size_bytes, repair, "online verify started");
        self.run = Some(VerifyRun {
            cursor: 0,
            size_bytes,
            chunks: HashMap::new(),
            by_offset: HashMap::new(),
            repair,
            finished: false,
            done_bytes: 0,
            out_of_sync_bytes: 0,
        });
    }

    /// Verify progress or the last result.
    pub fn status(&self) -> VerifyStatus {
        self.run.as_ref().map_or_else(VerifyStatus::default, |v| VerifyStatus {
            running: !v.finished,
            done_bytes: v.done_bytes,
            total_bytes: v.size_bytes,
            out_of_sync_bytes: v.out_of_sync_bytes,
        })
    }

    /// The next chunk to put through the in-flight table, up to the parallelism.
    pub fn next_chunk(&mut self, ctx: &mut Ctx<'_>) -> Option<(JobId, Range<u64>)> {
        let v = self.run.as_mut().filter(|v| !v.finished)?;
        if v.cursor >= v.size_bytes || v.chunks.len() >= VERIFY_PARALLEL {
            return None;
        }
        let range = v.cursor..(v.cursor + VERIFY_CHUNK_BYTES).min(v.size_bytes);
        v.cursor = range.end;
        let job = ctx.job(JobKind::VerifyRead);
        v.chunks.insert(job, VerifyChunk { range: range.clone(), started: false, local: None, remote: None });
        Some((job, range))
    }

    /// Every chunk was compared: the verify ends.
    pub fn finish_if_done(&mut self) -> Option<VerifyEnd> {
        let v = self.run.as_mut().filter(|v| !v.finished)?;
        if v.cursor < v.size_bytes || !v.chunks.is_empty() {
            return None;
        }
        v.finished = true;
        tracing::info!(
            verified_bytes = v.done_bytes,
            out_of_sync_bytes = v.out_of_sync_bytes,
            "online verify done"
        );
        Some(VerifyEnd {
            verified_bytes: v.done_bytes,
            out_of_sync_bytes: v.out_of_sync_bytes,
            error: None,
            repair: v.repair && v.out_of_sync_bytes > 0,
        })
    }

    /// An admitted chunk: read it here, ask the peer for its digests (answered
    /// after the peer applied epoch `after_epoch`).
    pub fn read_chunk(&mut self, job: JobId, after_epoch: u64, pool: &BufPool, ctx: &mut Ctx<'_>) {
        let Some(v) = self.run.as_mut() else { return };
        let Some(chunk) = v.chunks.get_mut(&job) else { return };
        chunk.started = true;
        let (offset, len) = (chunk.range.start, chunk.range.end - chunk.range.start);
        v.by_offset.insert(offset, job);
        ctx.send(Message::DigestReq { offset, len, after_epoch });
        ctx.out.push(crate::repl::core::Action::Local {
            job,
            op: IoOp::Read { offset, buf: pool.get(len as usize) },
        });
    }

    /// A chunk's local read finished. `Err` stops the verify: a local read failed.
    pub fn on_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        granularity_bytes: u64,
    ) -> Result<Option<ChunkDone>, String> {
        let digests = match (result, buf) {
            (Ok(()), Some(data)) => digests_of(&data, granularity_bytes),
            (result, _) => {
                tracing::error!(%job, ?result, "verify read failed; verify stops");
                return Err("a local read failed".into());
            }
        };
        let Some(chunk) = self.run.as_mut().and_then(|v| v.chunks.get_mut(&job)) else { return Ok(None) };
        chunk.local = Some(digests);
        Ok(self.compare(job, granularity_bytes))
    }

    /// The peer's digests for a verify chunk; false if no verify chunk waits for
    /// them (they may be a checksum resync's).
    pub fn on_digests(
        &mut self,
        offset: u64,
        data: Buf,
        granularity_bytes: u64,
    ) -> Result<Option<ChunkDone>, Buf> {
        let Some(job) = self.run.as_mut().and_then(|v| v.by_offset.remove(&offset)) else { return Err(data) };
        let Some(chunk) = self.run.as_mut().and_then(|v| v.chunks.get_mut(&job)) else { return Ok(None) };
        chunk.remote = Some(data);
        Ok(self.compare(job, granularity_bytes))
    }

    fn compare(&mut self, job: JobId, granularity: u64) -> Option<ChunkDone> {
        let v = self.run.as_mut()?;
        let chunk = v.chunks.get(&job)?;
        let (Some(local), Some(remote)) = (&chunk.local, &chunk.remote) else { return None };
        let range = chunk.range.clone();
        let mut differing = Vec::new();
        for (i, ours) in local.chunks_exact(DIGEST_BYTES).enumerate() {
            if remote.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES) == Some(ours) {
                continue;
            }
            let start = range.start + i as u64 * granularity;
            differing.push(start..(start + granularity).min(range.end));
        }
        let differing_bytes: u64 = differing.iter().map(|r| r.end - r.start).sum();
        if differing_bytes > 0 {
            tracing::warn!(offset = range.start, bytes = differing_bytes, "verify: out of sync");
        }
        v.out_of_sync_bytes += differing_bytes;
        v.done_bytes += range.end - range.start;
        v.chunks.remove(&job);
        Some(ChunkDone { job, range, differing })
    }

    /// Stops a running verify (link lost, read error); what it found stays set.
    /// Returns how it ended, chunks whose range can go back to the in-flight table
    /// now, and chunks whose read or admission comes back later.
    pub fn abandon(&mut self, why: &str) -> Option<(VerifyEnd, AbandonedChunks)> {
        let v = self.run.as_mut().filter(|v| !v.finished)?;
        v.finished = true;
        v.by_offset.clear();
        let mut chunks = AbandonedChunks { now: Vec::new(), later: Vec::new() };
        for (job, chunk) in v.chunks.drain() {
            if chunk.started && chunk.local.is_some() {
                chunks.now.push((job, chunk.range));
            } else {
                chunks.later.push((job, chunk.range));
            }
        }
        let done = v.done_bytes;
        tracing::warn!(verified_bytes = done, why, "online verify stopped");
        let end = VerifyEnd {
            verified_bytes: done,
            out_of_sync_bytes: v.out_of_sync_bytes,
            error: Some(format!("verify stopped after {done} bytes: {why}")),
            repair: false,
        };
        Some((end, chunks))
    }

    /// The peer asks for digests: served once its `after_epoch` is applied here
    /// (`applied_through`).
    pub fn on_digest_req(
        &mut self,
        offset: u64,
        len: u64,
        after_epoch: u64,
        applied_through: u64,
        pool: &BufPool,
        ctx: &mut Ctx<'_>,
    ) {
        if len == 0 || len > VERIFY_CHUNK_BYTES.max(RESYNC_CHUNK_BYTES) {
            tracing::warn!(offset, len, "digest request of a bad length; ignored");
            return;
        }
        self.held.push((offset, len, after_epoch));
        self.release_digest_reqs(applied_through, pool, ctx);
    }

    /// Starts the held digest requests whose epoch is complete.
    pub fn release_digest_reqs(&mut self, applied_through: u64, pool: &BufPool, ctx: &mut Ctx<'_>) {
        if self.held.is_empty() {
            return;
        }
        let (ready, held): (Vec<_>, Vec<_>) =
            self.held.drain(..).partition(|(_, _, after)| *after <= applied_through);
        self.held = held;
        for (offset, len, _) in ready {
            let job = ctx.local(JobKind::DigestRead, IoOp::Read { offset, buf: pool.get(len as usize) });
            self.reads.insert(job, (offset, len));
        }
    }

    /// A digest read of the current link finished: answer the peer.
    pub fn on_digest_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        pool: &BufPool,
        ctx: &mut Ctx<'_>,
    ) {
        let Some((offset, len)) = self.reads.remove(&job) else { return };
        let granularity = ctx.cfg.granularity_bytes;
        let digests = match (result, buf) {
            (Ok(()), Some(data)) => digests_of(&data, granularity),
            // Unreadable here: digests that match nothing, so the range is copied.
            (result, _) => {
                tracing::warn!(offset, len, ?result, "read for a digest request failed");
                vec![0xff; (len.div_ceil(granularity) as usize) * DIGEST_BYTES]
            }
        };
        let mut data = pool.get(digests.len());
        data.copy_from_slice(&digests);
        ctx.send(Message::Digests { offset, len, data: data.freeze() });
    }

    /// The link is gone: nobody waits for the digest answers.
    pub fn link_lost(&mut self) {
        self.held.clear();
        self.reads.clear();
    }
}

use super::{Action as CoreAction, CmdOutput, Core, DiskState, Link, ReplState, Role};
use crate::repl::core::ctx::ctx;

/// The core's side of verify: the checks of `blockctl verify`, the in-flight table
/// for its chunks, the bitmap for what differs, and the repair that may follow.
impl Core {
    /// `blockctl verify [--repair]`.
    pub(super) fn start_verify(&mut self, repair: bool, out: &mut Vec<CoreAction>) -> Result<(), String> {
        if self.link != Link::Replicating {
            return Err("not connected to the peer".into());
        }
        if self.repl != ReplState::Established {
            return Err(format!("a resync is running ({}); verify after it", self.repl.as_str()));
        }
        if self.verifier.running() {
            return Err("a verify is already running".into());
        }
        if let Some(why) = self.peer_diskless() {
            return Err(format!("{why}: nothing to compare with"));
        }
        if repair && self.peer_role == Some(Role::Primary) {
            return Err("the peer is Primary: run `verify --repair` on the Primary".into());
        }
        if self.disk != DiskState::UpToDate {
            return Err(format!("the local disk is {}; verify from an UpToDate node", self.disk));
        }
        self.verifier.start(self.cfg.size_bytes, repair);
        self.pump_verify(out);
        Ok(())
    }

    /// Verify progress or the last result.
    pub fn verify_status(&self) -> VerifyStatus {
        self.verifier.status()
    }

    fn pump_verify(&mut self, out: &mut Vec<CoreAction>) {
        while let Some((job, range)) = self.verifier.next_chunk(&mut ctx!(self, out)) {
            if self.inflight.admit(job, range) {
                self.read_verify_chunk(job, out);
            }
        }
        if let Some(end) = self.verifier.finish_if_done() {
            self.verify_finished(end, out);
        }
    }

    /// An admitted verify chunk: read it here, ask the peer for its digests. On a
    /// Primary, the peer must first apply every write sent so far.
    pub(super) fn read_verify_chunk(&mut self, job: JobId, out: &mut Vec<CoreAction>) {
        let after_epoch = if self.role == Role::Primary {
            if self.epoch_writes > 0 { self.close_epoch(false, out) } else { self.epoch - 1 }
        } else {
            0
        };
        self.verifier.read_chunk(job, after_epoch, &self.pool, &mut ctx!(self, out));
    }

    /// A verify chunk's local read (or one of a verify that was cut short).
    pub(super) fn on_verify_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<CoreAction>,
    ) {
        if self.release_abandoned(job, out) {
            return;
        }
        match self.verifier.on_read(job, result, buf, self.cfg.granularity_bytes) {
            Ok(done) => self.verify_chunk_done(done, out),
            Err(why) => self.abandon_verify(&why, out),
        }
    }

    /// Digests from the peer: for a verify chunk, or a checksum-resync chunk.
    pub(super) fn on_digests(&mut self, offset: u64, len: u64, data: Buf, out: &mut Vec<CoreAction>) {
        match self.verifier.on_digests(offset, data, self.cfg.granularity_bytes) {
            Ok(done) => self.verify_chunk_done(done, out),
            Err(data) => {
                if !self.on_resync_digests(offset, data, out) {
                    tracing::debug!(offset, len, "digests nobody waits for (a run that ended)");
                }
            }
        }
    }

    /// A chunk was compared: what differs goes into the bitmap, its range back to
    /// the in-flight table.
    fn verify_chunk_done(&mut self, done: Option<ChunkDone>, out: &mut Vec<CoreAction>) {
        let Some(ChunkDone { job, range, differing }) = done else { return };
        for r in differing {
            self.mark_dirty(r);
        }
        let next = self.inflight.complete(job, range.start);
        self.start_released(next, out);
        self.pump_verify(out);
    }

    fn verify_finished(&mut self, end: VerifyEnd, out: &mut Vec<CoreAction>) {
        let VerifyEnd { verified_bytes, out_of_sync_bytes, error, repair } = end;
        self.verify_ended(verified_bytes, out_of_sync_bytes, error, out);
        if out_of_sync_bytes > 0 {
            if repair {
                self.start_repair(out_of_sync_bytes, out);
            } else {
                // Recorded for the next resync.
                self.write_bitmap(out);
            }
        }
    }

    /// Stops a running verify (link lost, read error); what it found stays set.
    pub(super) fn abandon_verify(&mut self, why: &str, out: &mut Vec<CoreAction>) {
        let Some((end, chunks)) = self.verifier.abandon(why) else { return };
        self.take_back(chunks, out);
        self.verify_ended(end.verified_bytes, end.out_of_sync_bytes, end.error, out);
    }

    /// The peer asks for digests: served once its `after_epoch` is applied here.
    pub(super) fn on_digest_req(
        &mut self,
        offset: u64,
        len: u64,
        after_epoch: u64,
        out: &mut Vec<CoreAction>,
    ) {
        let through = self.applier.applied_through();
        self.verifier.on_digest_req(offset, len, after_epoch, through, &self.pool, &mut ctx!(self, out));
    }

    /// The verify this node runs ended (`error` if it was cut short).
    fn verify_ended(
        &mut self,
        verified_bytes: u64,
        out_of_sync_bytes: u64,
        error: Option<String>,
        out: &mut Vec<CoreAction>,
    ) {
        let Some(id) = self.verify_cmd.take() else { return };
        let result = match error {
            Some(e) => Err(e),
            None => Ok(CmdOutput::Verified { verified_bytes, out_of_sync_bytes }),
        };
        out.push(CoreAction::Done { id, result });
    }
}
