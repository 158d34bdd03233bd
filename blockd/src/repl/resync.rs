//! Connecting and resync, as part of the [`Core`] (a child module, so it shares the
//! core's state and invariants).
//!
//! On connect the core runs [`decide`] and becomes Established, SyncSource or
//! SyncTarget (or refuses). While syncing, replication of application writes runs as
//! usual; resync copies the rest in disk order:
//!
//! - Source: the regions to copy are every byte (full sync) or the dirty set (when it
//!   is known to cover every change since the peer's generation). Chunks of at most
//!   [`RESYNC_CHUNK_BYTES`] go through the same [`InFlight`] table as application
//!   writes, so a chunk never races an overlapping write: the chunk is read locally,
//!   sent as `ResyncData` (or `ResyncZeroes` when it reads as zero — no data on the
//!   wire), and its range is released only when the target acknowledges it. At most
//!   [`RESYNC_PARALLEL`] chunks are in flight. When all are acknowledged the source
//!   clears its bitmap generation and sends `ResyncDone` with its generations.
//! - Target: first its disk becomes Inconsistent, durably (a crash mid-resync must
//!   never leave a half-copied disk that claims to be consistent); resync messages
//!   wait for that. Each chunk is written and acknowledged. On `ResyncDone` it
//!   flushes, adopts the source's generations, and is UpToDate again.
//!
//! A lost link drops the resync: the source keeps its dirty set (so the next connect
//! resumes from it while this process lives), the target stays Inconsistent.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use super::*;
use crate::repl::decide::{Decision, SideState, SyncScope, decide};

/// Largest resync chunk.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync chunks in flight at once (bounds the memory and the peer's queue).
pub const RESYNC_PARALLEL: usize = 4;
/// The target's flush before it declares its disk UpToDate.
const TARGET_FLUSH_JOB: JobId = u64::MAX - 1;

/// Where a source chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Waiting in the in-flight table behind an overlapping write.
    Waiting,
    /// Being read locally.
    Reading,
    /// Sent; waiting for the target's ack.
    Sent,
}

/// Resync progress on the source.
#[derive(Debug, Default)]
pub struct SourceSync {
    pending: VecDeque<Range<u64>>,
    chunks: HashMap<JobId, (Range<u64>, Chunk)>,
    by_offset: HashMap<u64, JobId>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub sent_bytes: u64,
    /// A chunk failed on the target: it stays dirty and the sync is not complete.
    failed: bool,
}

impl SourceSync {
    pub(super) fn is_chunk(&self, job: JobId) -> bool {
        self.chunks.contains_key(&job)
    }
}

/// Resync state on the target.
#[derive(Debug, Default)]
pub struct TargetSync {
    /// The metadata update marking the disk Inconsistent; resync data waits for it.
    inconsistent_seq: u64,
    ready: bool,
    held: VecDeque<Message>,
    writes: HashMap<JobId, (u64, u64)>,
    done: Option<Generations>,
    pub received_bytes: u64,
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
    /// A link is up: decide from both sides' state whether and how to replicate.
    /// `Err` is the reason to refuse (the caller closes the link; status shows it).
    pub fn connect(&mut self, remote: SideState) -> Result<Vec<Action>, String> {
        let me = SideState {
            gens: self.gens,
            disk: self.disk,
            role: self.role,
            crashed_primary: self.crashed_primary,
        };
        let decision = decide(&me, &remote);
        let mut out = Vec::new();
        match decision {
            Decision::InSync => {
                self.start_link();
                self.repl = ReplState::Established;
                // Same generation, nothing to copy: tracking starts from nothing.
                self.dirty.clear();
                self.dirty_complete = true;
            }
            Decision::SyncSource(scope) => {
                self.start_link();
                self.start_source(scope, &mut out);
            }
            Decision::SyncTarget(_) => {
                self.start_link();
                self.repl = ReplState::SyncTarget;
                self.disk = DiskState::Inconsistent;
                let seq = self.persist(&mut out);
                self.target = Some(TargetSync { inconsistent_seq: seq, ..TargetSync::default() });
                // The source's view of this disk (status, promotion decisions).
                self.send(Message::State { role: self.role, disk: self.disk }, &mut out);
            }
            Decision::WaitForPromotion => {
                return Err("both disks are Inconsistent; promote one with `blockctl primary --force`".into());
            }
            Decision::Refuse(r) => return Err(r.to_string()),
        }
        Ok(out)
    }

    /// The replication state toward the peer.
    pub fn repl_state(&self) -> ReplState {
        self.repl
    }

    /// (done, total, sent) bytes of the resync in progress, if any.
    pub fn resync_progress(&self) -> Option<(u64, u64, u64)> {
        if let Some(s) = &self.source {
            return Some((s.done_bytes, s.total_bytes, s.sent_bytes));
        }
        self.target.as_ref().map(|t| (t.received_bytes, 0, 0))
    }

    fn start_link(&mut self) {
        // Both sides number the epochs of a link from 1.
        self.link = Link::Replicating;
        self.epoch = 1;
        self.epoch_acked = false;
        self.epoch_writes = 0;
        self.applier = Applier { epoch: 1, ..Applier::default() };
    }

    fn start_source(&mut self, scope: SyncScope, out: &mut Vec<Action>) {
        let regions: Vec<Range<u64>> = if scope == SyncScope::Bitmap && self.dirty_complete {
            self.dirty
                .runs()
                .map(|r| r.start..r.end.min(self.cfg.size_bytes))
                .filter(|r| !r.is_empty())
                .collect()
        } else {
            // One region: the whole device.
            std::iter::once(0..self.cfg.size_bytes).collect()
        };
        let mut sync = SourceSync::default();
        for region in regions {
            let mut at = region.start;
            while at < region.end {
                let end = (at + RESYNC_CHUNK_BYTES).min(region.end);
                sync.pending.push_back(at..end);
                sync.total_bytes += end - at;
                at = end;
            }
        }
        tracing::info!(bytes = sync.total_bytes, full = scope == SyncScope::Full, "resync as source");
        self.repl = ReplState::SyncSource;
        self.source = Some(sync);
        self.pump_source(out);
    }

    /// Starts chunks up to the parallelism bound; finishes when nothing is left.
    fn pump_source(&mut self, out: &mut Vec<Action>) {
        loop {
            let Some(sync) = self.source.as_mut() else { return };
            if sync.chunks.len() >= RESYNC_PARALLEL {
                return;
            }
            let Some(range) = sync.pending.pop_front() else {
                if sync.chunks.is_empty() {
                    self.finish_source(out);
                }
                return;
            };
            let job = self.next_internal;
            self.next_internal += 1;
            let sync = self.source.as_mut().expect("checked");
            sync.chunks.insert(job, (range.clone(), Chunk::Waiting));
            if self.inflight.admit(job, range) {
                self.read_chunk(job, out);
            }
        }
    }

    fn read_chunk(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some((range, state)) = self.source.as_mut().and_then(|s| s.chunks.get_mut(&job)) else { return };
        *state = Chunk::Reading;
        let buf = self.pool.get((range.end - range.start) as usize);
        out.push(Action::Local { job, op: IoOp::Read { offset: range.start, buf } });
    }

    /// Jobs the in-flight table released: application writes or resync chunks. A
    /// chunk of an abandoned resync gives its range back at once.
    pub(super) fn start_released(&mut self, jobs: Vec<JobId>, out: &mut Vec<Action>) {
        for job in jobs {
            if self.writes.contains_key(&job) {
                self.dispatch_write(job, out);
            } else if self.source.as_ref().is_some_and(|s| s.chunks.contains_key(&job)) {
                self.read_chunk(job, out);
            } else if let Some(range) = self.abandoned_chunks.remove(&job) {
                let next = self.inflight.complete(job, range.start);
                self.start_released(next, out);
            }
        }
    }

    /// A chunk's local read finished: send it (or its zeroes).
    pub(super) fn on_chunk_read(
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
        let Some((range, _)) = self.source.as_ref().and_then(|s| s.chunks.get(&job)) else { return };
        let (offset, len) = (range.start, range.end - range.start);
        let data = match (result, buf) {
            (Ok(()), Some(data)) => data,
            (result, _) => {
                // A source that cannot read its own disk cannot sync.
                tracing::error!(offset, len, ?result, "resync read failed; resync stops");
                self.abandon_source(out);
                return;
            }
        };
        let sync = self.source.as_mut().expect("checked");
        sync.chunks.insert(job, (offset..offset + len, Chunk::Sent));
        sync.by_offset.insert(offset, job);
        let message = if data.iter().all(|&b| b == 0) {
            // Zero regions cost no data on the wire.
            Message::ResyncZeroes { offset, len }
        } else {
            sync.sent_bytes += len;
            Message::ResyncData { offset, data: data.freeze() }
        };
        self.send(message, out);
    }

    pub(super) fn on_resync_ack(&mut self, offset: u64, len: u64, errno: i32, out: &mut Vec<Action>) {
        let Some(sync) = self.source.as_mut() else { return };
        let Some(job) = sync.by_offset.remove(&offset) else { return };
        let Some((range, _)) = sync.chunks.remove(&job) else { return };
        if errno != 0 {
            tracing::warn!(offset, len, errno, "the sync target failed a chunk; it stays out of sync");
            sync.failed = true;
            self.dirty.insert(range.clone());
        } else {
            sync.done_bytes += range.end - range.start;
        }
        let next = self.inflight.complete(job, range.start);
        self.start_released(next, out);
        self.pump_source(out);
    }

    fn finish_source(&mut self, out: &mut Vec<Action>) {
        let sync = self.source.take().expect("finishing a resync");
        tracing::info!(bytes = sync.done_bytes, sent_bytes = sync.sent_bytes, "resync done (source)");
        if sync.failed {
            // Some chunk failed on the target: keep it dirty, do not declare sync.
            self.repl = ReplState::Established;
            return;
        }
        // In sync: the bitmap generation is no longer needed.
        if self.gens.bitmap != 0 {
            self.gens.history.rotate_right(1);
            self.gens.history[0] = self.gens.bitmap;
            self.gens.bitmap = 0;
        }
        self.dirty.clear();
        self.dirty_complete = true;
        self.crashed_primary = false;
        self.persist(out);
        self.send(Message::ResyncDone { gens: self.gens }, out);
        self.repl = ReplState::Established;
    }

    fn abandon_source(&mut self, out: &mut Vec<Action>) {
        let Some(sync) = self.source.take() else { return };
        for (job, (range, state)) in sync.chunks {
            match state {
                // Never admitted: it comes back from the in-flight table later.
                Chunk::Waiting | Chunk::Reading => {
                    self.abandoned_chunks.insert(job, range);
                }
                Chunk::Sent => {
                    let next = self.inflight.complete(job, range.start);
                    self.start_released(next, out);
                }
            }
        }
        if self.repl == ReplState::SyncSource {
            self.repl = ReplState::Off;
        }
    }

    /// Target: until the Inconsistent state is durable, every data-path message
    /// (application writes and barriers too, not just resync data) waits: applying
    /// anything newer first could leave, after a crash, a disk that mixes generations
    /// while its metadata still claims the old one is consistent. True if held.
    pub(super) fn hold_for_target(&mut self, msg: &Message) -> bool {
        let Some(t) = self.target.as_mut() else { return false };
        if t.ready {
            return false;
        }
        let data_path = matches!(
            msg,
            Message::Write { .. }
                | Message::Trim { .. }
                | Message::WriteZeroes { .. }
                | Message::Barrier { .. }
                | Message::ResyncData { .. }
                | Message::ResyncZeroes { .. }
                | Message::ResyncDone { .. }
        );
        if data_path {
            t.held.push_back(msg.clone());
        }
        data_path
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
                (offset, len, IoOp::WriteZeroes { offset, len, may_trim: true, fast_only: false, fua: false })
            }
            Message::ResyncDone { gens } => {
                t.done = Some(gens);
                if t.writes.is_empty() {
                    out.push(Action::Local { job: TARGET_FLUSH_JOB, op: IoOp::Flush });
                }
                return;
            }
            _ => return,
        };
        let job = self.next_internal;
        self.next_internal += 1;
        let t = self.target.as_mut().expect("checked");
        t.writes.insert(job, (offset, len));
        out.push(Action::Local { job, op });
    }

    /// Target: the metadata saying Inconsistent is durable; apply what waited.
    pub(super) fn on_target_durable(&mut self, seq: u64, out: &mut Vec<Action>) {
        let Some(t) = self.target.as_mut() else { return };
        if t.ready || seq < t.inconsistent_seq {
            return;
        }
        t.ready = true;
        let held: Vec<Message> = t.held.drain(..).collect();
        for m in held {
            self.on_peer_message(m, out);
        }
    }

    /// Target: a local op finished; true if it was a resync op.
    pub(super) fn on_target_local(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        out: &mut Vec<Action>,
    ) -> bool {
        if job == TARGET_FLUSH_JOB {
            self.finish_target(result, out);
            return true;
        }
        let Some(t) = self.target.as_mut() else { return false };
        let Some((offset, len)) = t.writes.remove(&job) else { return false };
        let errno = result.err().map_or(0, |e| e as i32);
        let last = t.done.is_some() && t.writes.is_empty();
        self.send(Message::ResyncAck { offset, len, errno }, out);
        if last {
            out.push(Action::Local { job: TARGET_FLUSH_JOB, op: IoOp::Flush });
        }
        true
    }

    fn finish_target(&mut self, result: Result<(), Errno>, out: &mut Vec<Action>) {
        let Some(t) = self.target.take() else { return };
        if let Err(e) = result {
            tracing::error!(error = %e, "flush after resync failed; the disk stays Inconsistent");
            return;
        }
        let gens = t.done.expect("flush only after ResyncDone");
        tracing::info!(bytes = t.received_bytes, "resync done (target); disk UpToDate");
        self.gens = gens;
        self.disk = DiskState::UpToDate;
        self.crashed_primary = false;
        self.dirty.clear();
        self.repl = ReplState::Established;
        self.persist(out);
        self.send(Message::State { role: self.role, disk: self.disk }, out);
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
