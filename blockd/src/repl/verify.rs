//! Digests of granules, as part of the [`Core`] (a child module): online verify, and
//! the digest requests a node serves for its peer (verify, checksum resync).
//!
//! - Verify (`blockctl verify`): the node that runs it walks the whole device in
//!   chunks of [`VERIFY_CHUNK_BYTES`]. Each chunk goes through the [`InFlight`] table
//!   like a write, so no application write to it runs meanwhile; it is read locally
//!   and its digests are asked of the peer. On a Primary the open epoch is closed
//!   first and the request carries its number: the peer answers only after every
//!   write sent before was applied, so a write still queued on the peer is never
//!   reported as a difference. Granules whose digests differ are set in the bitmap
//!   and counted; with `--repair` a resync of them follows (the peer becomes the
//!   sync target), else the next resync copies them.
//! - Digest server: a `DigestReq` is served (read, digest each granule, `Digests`)
//!   once the applier has finished the epoch it names.
//!
//! A digest is xxh3-128 of one granule: 16 bytes, fast enough to keep up with a
//! sequential read, and a collision between two different granules is practically
//! impossible (this is not a defence against an adversary who controls the data).

use std::collections::HashMap;
use std::ops::Range;

use super::*;

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
pub struct VerifyRun {
    cursor: u64,
    chunks: HashMap<JobId, VerifyChunk>,
    by_offset: HashMap<u64, JobId>,
    repair: bool,
    pub finished: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub out_of_sync_bytes: u64,
}

impl VerifyRun {
    pub(super) fn is_chunk(&self, job: JobId) -> bool {
        self.chunks.contains_key(&job)
    }
}

/// Digest requests from the peer: waiting for their epoch, or being read.
#[derive(Debug, Default)]
pub struct DigestServer {
    held: Vec<(u64, u64, u64)>,
    reads: HashMap<JobId, (u64, u64)>,
}

impl DigestServer {
    /// The link is gone: nobody waits for the answers.
    pub(super) fn clear(&mut self) {
        self.held.clear();
        self.reads.clear();
    }
}

/// Verify status for `blockctl status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStatus {
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub out_of_sync_bytes: u64,
}

impl Core {
    /// `blockctl verify [--repair]`. `peer_primary`: a repair would make the peer a
    /// sync target, which a Primary never is.
    pub(super) fn start_verify(&mut self, repair: bool, out: &mut Vec<Action>) -> Result<(), String> {
        let peer_primary = self.peer_role == Some(Role::Primary);
        if self.link != Link::Replicating {
            return Err("not connected to the peer".into());
        }
        if self.repl != ReplState::Established {
            return Err(format!("a resync is running ({}); verify after it", self.repl.as_str()));
        }
        if self.verify.as_ref().is_some_and(|v| !v.finished) {
            return Err("a verify is already running".into());
        }
        if repair && peer_primary {
            return Err("the peer is Primary: run `verify --repair` on the Primary".into());
        }
        if self.disk != DiskState::UpToDate {
            return Err(format!("the local disk is {}; verify from an UpToDate node", self.disk));
        }
        tracing::info!(bytes = self.cfg.size_bytes, repair, "online verify started");
        self.verify = Some(VerifyRun {
            cursor: 0,
            chunks: HashMap::new(),
            by_offset: HashMap::new(),
            repair,
            finished: false,
            done_bytes: 0,
            total_bytes: self.cfg.size_bytes,
            out_of_sync_bytes: 0,
        });
        self.pump_verify(out);
        Ok(())
    }

    /// Verify progress or the last result.
    pub fn verify_status(&self) -> VerifyStatus {
        self.verify.as_ref().map_or_else(VerifyStatus::default, |v| VerifyStatus {
            running: !v.finished,
            done_bytes: v.done_bytes,
            total_bytes: v.total_bytes,
            out_of_sync_bytes: v.out_of_sync_bytes,
        })
    }

    fn pump_verify(&mut self, out: &mut Vec<Action>) {
        loop {
            let size = self.cfg.size_bytes;
            let Some(v) = self.verify.as_mut().filter(|v| !v.finished) else { return };
            if v.cursor >= size {
                if v.chunks.is_empty() {
                    self.finish_verify(out);
                }
                return;
            }
            if v.chunks.len() >= VERIFY_PARALLEL {
                return;
            }
            let range = v.cursor..(v.cursor + VERIFY_CHUNK_BYTES).min(size);
            v.cursor = range.end;
            let job = self.ids.next(JobKind::VerifyRead, self.link_gen);
            let chunk = VerifyChunk { range: range.clone(), started: false, local: None, remote: None };
            self.verify.as_mut().expect("checked").chunks.insert(job, chunk);
            if self.inflight.admit(job, range) {
                self.read_verify_chunk(job, out);
            }
        }
    }

    /// An admitted verify chunk: read it here, ask the peer for its digests.
    pub(super) fn read_verify_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        // On a Primary, the peer must first apply every write sent so far.
        let after_epoch = if self.role == Role::Primary {
            if self.epoch_writes > 0 { self.close_epoch(false, out) } else { self.epoch - 1 }
        } else {
            0
        };
        let Some(v) = self.verify.as_mut() else { return };
        let Some(chunk) = v.chunks.get_mut(&job) else { return };
        chunk.started = true;
        let (offset, len) = (chunk.range.start, chunk.range.end - chunk.range.start);
        v.by_offset.insert(offset, job);
        self.send(Message::DigestReq { offset, len, after_epoch }, out);
        let buf = self.pool.get(len as usize);
        out.push(Action::Local { job, op: IoOp::Read { offset, buf } });
    }

    /// A verify chunk's local read (or one of a verify that was cut short).
    pub(super) fn on_verify_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        if let Some(range) = self.abandoned_chunks.remove(&job) {
            let next = self.inflight.complete(job, range.start);
            return self.start_released(next, out);
        }
        let granularity = self.cfg.granularity_bytes;
        let digests = match (result, buf) {
            (Ok(()), Some(data)) => digests_of(&data, granularity),
            (result, _) => {
                tracing::error!(%job, ?result, "verify read failed; verify stops");
                return self.abandon_verify("a local read failed", out);
            }
        };
        let Some(chunk) = self.verify.as_mut().and_then(|v| v.chunks.get_mut(&job)) else { return };
        chunk.local = Some(digests);
        self.compare_verify_chunk(job, out);
    }

    /// Digests from the peer: for a verify chunk, or a checksum-resync chunk.
    pub(super) fn on_digests(&mut self, offset: u64, len: u64, data: Buf, out: &mut Vec<Action>) {
        if let Some(job) = self.verify.as_mut().and_then(|v| v.by_offset.remove(&offset)) {
            if let Some(chunk) = self.verify.as_mut().and_then(|v| v.chunks.get_mut(&job)) {
                chunk.remote = Some(data);
                self.compare_verify_chunk(job, out);
            }
            return;
        }
        if !self.on_resync_digests(offset, data, out) {
            tracing::debug!(offset, len, "digests nobody waits for (a run that ended)");
        }
    }

    fn compare_verify_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        let granularity = self.cfg.granularity_bytes;
        let Some(v) = self.verify.as_ref() else { return };
        let Some(chunk) = v.chunks.get(&job) else { return };
        let (Some(local), Some(remote)) = (&chunk.local, &chunk.remote) else { return };
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
        for r in differing {
            self.mark_dirty(r);
        }
        if differing_bytes > 0 {
            tracing::warn!(offset = range.start, bytes = differing_bytes, "verify: out of sync");
        }
        let Some(v) = self.verify.as_mut() else { return };
        v.out_of_sync_bytes += differing_bytes;
        v.done_bytes += range.end - range.start;
        v.chunks.remove(&job);
        let next = self.inflight.complete(job, range.start);
        self.start_released(next, out);
        self.pump_verify(out);
    }

    fn finish_verify(&mut self, out: &mut Vec<Action>) {
        let Some(v) = self.verify.as_mut() else { return };
        v.finished = true;
        let (done, oos, repair) = (v.done_bytes, v.out_of_sync_bytes, v.repair);
        tracing::info!(verified_bytes = done, out_of_sync_bytes = oos, "online verify done");
        self.verify_ended(done, oos, None, out);
        if oos > 0 {
            if repair {
                self.start_repair(oos, out);
            } else {
                // Recorded for the next resync.
                self.write_bitmap(out);
            }
        }
    }

    /// Stops a running verify (link lost, read error); what it found stays set.
    pub(super) fn abandon_verify(&mut self, why: &str, out: &mut Vec<Action>) {
        let Some(v) = self.verify.as_mut().filter(|v| !v.finished) else { return };
        v.finished = true;
        let (done, oos) = (v.done_bytes, v.out_of_sync_bytes);
        let chunks: Vec<(JobId, VerifyChunk)> = v.chunks.drain().collect();
        v.by_offset.clear();
        for (job, chunk) in chunks {
            if chunk.started && chunk.local.is_some() {
                let next = self.inflight.complete(job, chunk.range.start);
                self.start_released(next, out);
            } else {
                // Its read, or its admission, comes back later.
                self.abandoned_chunks.insert(job, chunk.range);
            }
        }
        tracing::warn!(verified_bytes = done, why, "online verify stopped");
        self.verify_ended(done, oos, Some(format!("verify stopped after {done} bytes: {why}")), out);
    }

    /// The peer asks for digests: served once its `after_epoch` is applied here.
    pub(super) fn on_digest_req(&mut self, offset: u64, len: u64, after_epoch: u64, out: &mut Vec<Action>) {
        if len == 0 || len > VERIFY_CHUNK_BYTES.max(RESYNC_CHUNK_BYTES) {
            tracing::warn!(offset, len, "digest request of a bad length; ignored");
            return;
        }
        self.digests.held.push((offset, len, after_epoch));
        self.release_digest_reqs(out);
    }

    /// Starts the held digest requests whose epoch is complete.
    pub(super) fn release_digest_reqs(&mut self, out: &mut Vec<Action>) {
        if self.digests.held.is_empty() {
            return;
        }
        let applied_through = self.applier.epoch - 1;
        let (ready, held): (Vec<_>, Vec<_>) =
            self.digests.held.drain(..).partition(|(_, _, after)| *after <= applied_through);
        self.digests.held = held;
        for (offset, len, _) in ready {
            let job = self.ids.next(JobKind::DigestRead, self.link_gen);
            self.digests.reads.insert(job, (offset, len));
            let buf = self.pool.get(len as usize);
            out.push(Action::Local { job, op: IoOp::Read { offset, buf } });
        }
    }

    pub(super) fn on_digest_read(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        let Some((offset, len)) = self.digests.reads.remove(&job) else { return };
        let digests = match (result, buf) {
            (Ok(()), Some(data)) => digests_of(&data, self.cfg.granularity_bytes),
            // Unreadable here: digests that match nothing, so the range is copied.
            (result, _) => {
                tracing::warn!(offset, len, ?result, "read for a digest request failed");
                vec![0xff; (len.div_ceil(self.cfg.granularity_bytes) as usize) * DIGEST_BYTES]
            }
        };
        let mut data = self.pool.get(digests.len());
        data.copy_from_slice(&digests);
        self.send(Message::Digests { offset, len, data: data.freeze() }, out);
    }
}
