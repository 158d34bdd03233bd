//! Write intent and metadata, as part of the [`Core`] (a child module): the
//! activity-log gate in front of every Primary write, the bitmap used as intent for
//! ranges too large for the log, lazy bitmap writes on ticks, and what happens when
//! a metadata action is durable.
//!
//! Order matters and is kept by the shell's metadata thread, which carries out
//! metadata actions in the order given: the changed bitmap blocks are queued before
//! an activity-log transaction that evicts an extent, so nothing is ever covered by
//! neither. And durability: a transaction that evicts an extent, and a bitmap
//! write recording bits cleared because a local write completed, come only after a
//! local data flush (a completed write may still be in a volatile cache; a crash
//! would lose it here while nothing says its range differs from the peer).

use super::*;

/// At most this many ticks (100 ms each) between flush barriers while the transfer
/// log holds writes: the peer flushes about once a second under a steady load.
const FLUSH_BARRIER_TICKS: u32 = 10;

/// The write-intent layer's state. Its fields are private to this module: only
/// the code here reads or changes them.
pub(super) struct WriteIntent {
    /// The write-intent log, and writes waiting for their extents to be durable.
    al: ActivityLog,
    al_waiting: VecDeque<JobId>,
    /// Writes whose bitmap intent must be durable first: they start once a bitmap
    /// write covering this intent generation is.
    intent_waiting: Vec<(JobId, u64)>,
    /// A bitmap write is queued and not yet durable: its sequence, and the intent
    /// generation it covers (every bitmap intent set before it was encoded).
    bitmap_write: Option<(u64, u64)>,
    /// Bitmap intents set so far, and those a durable bitmap write covers.
    intent_gen: u64,
    bitmap_durable_gen: u64,
    /// A local data flush before metadata that relies on it is in flight, and what
    /// waits for it: a bitmap write (bits cleared because a local write completed
    /// must not be recorded before that write is durable), and an activity-log
    /// transaction that forgets an extent (its completed writes must be durable
    /// first, or a crash could lose them locally while nothing marks them).
    meta_flush: Option<JobId>,
    bitmap_after_flush: bool,
    al_after_flush: Option<Vec<u32>>,
    /// Bits were cleared on the strength of a local write since the last meta flush
    /// was submitted.
    local_clears: bool,
    ms_since_bitmap_write: u64,
}

impl WriteIntent {
    pub fn new(al: ActivityLog) -> WriteIntent {
        WriteIntent {
            al,
            al_waiting: VecDeque::new(),
            intent_waiting: Vec::new(),
            bitmap_write: None,
            intent_gen: 0,
            bitmap_durable_gen: 0,
            meta_flush: None,
            bitmap_after_flush: false,
            al_after_flush: None,
            local_clears: false,
            ms_since_bitmap_write: 0,
        }
    }

    /// (hot extents, transactions made durable since start) of the activity log.
    pub fn al_stats(&self) -> (usize, u64) {
        (self.al.hot_count(), self.al.transactions())
    }

    /// The writes waiting for metadata (they never start after a disk failure).
    pub fn take_waiting(&mut self) -> Vec<JobId> {
        self.al_waiting.drain(..).chain(self.intent_waiting.drain(..).map(|(j, _)| j)).collect()
    }

    /// Bits were cleared because a local write completed: the next bitmap write
    /// waits for a local flush.
    pub fn cleared_by_local_write(&mut self) {
        self.local_clears = true;
    }
}

impl Core {
    pub(super) fn on_meta_durable(&mut self, seq: u64, out: &mut Vec<Action>) {
        self.on_target_durable(seq, out);
        self.durable_seq = self.durable_seq.max(seq);
        if let Some((s, covers)) = self.intent.bitmap_write.filter(|(s, _)| *s <= seq) {
            debug_assert!(s <= seq);
            self.intent.bitmap_write = None;
            self.intent.bitmap_durable_gen = self.intent.bitmap_durable_gen.max(covers);
        }
        if self.intent.al.committed(seq) {
            self.retry_al_waiters(out);
        }
        if !self.intent.intent_waiting.is_empty() {
            let durable = self.intent.bitmap_durable_gen;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                self.intent.intent_waiting.drain(..).partition(|(_, gen_)| *gen_ <= durable);
            self.intent.intent_waiting = waiting;
            for (job, _) in ready {
                self.send_write(job, out);
            }
        }
        if self.gens_pending && seq >= self.last_persist_seq {
            self.gens_pending = false;
            let ready: Vec<JobId> = self.writes.keys().copied().collect();
            for job in ready {
                self.try_finish_write(job, out);
            }
            // A Secondary held a diskless Primary's writes for this (`diskless`).
            self.release_ingress(out);
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        let seq = self.next_meta_seq;
        self.next_meta_seq += 1;
        seq
    }

    /// Queues a write of the changed bitmap blocks: at once, or after a local flush
    /// if bits were cleared because a local write completed (the write must be
    /// durable before the bitmap says its range is in sync).
    pub(super) fn write_bitmap(&mut self, out: &mut Vec<Action>) {
        if self.detached() {
            // No metadata is written to a detached disk.
            return;
        }
        if self.intent.local_clears {
            self.intent.bitmap_after_flush = true;
            self.start_meta_flush(out);
            return;
        }
        self.emit_bitmap_write(out);
    }

    pub(super) fn emit_bitmap_write(&mut self, out: &mut Vec<Action>) {
        let blocks = encode_changed(&mut self.bitmap);
        let seq = self.next_seq();
        self.intent.bitmap_write = Some((seq, self.intent.intent_gen));
        self.intent.ms_since_bitmap_write = 0;
        out.push(Action::WriteBitmap { seq, blocks });
    }

    fn start_meta_flush(&mut self, out: &mut Vec<Action>) {
        if self.intent.meta_flush.is_some() {
            return;
        }
        let job = self.ids.next(JobKind::MetaFlush, self.link_gen);
        self.intent.meta_flush = Some(job);
        self.intent.local_clears = false;
        out.push(Action::Local { job, op: IoOp::Flush });
    }

    /// The local flush before metadata finished: write what waited for it.
    pub(super) fn on_meta_flushed(&mut self, job: JobId, result: Result<(), Errno>, out: &mut Vec<Action>) {
        if self.intent.meta_flush != Some(job) {
            return;
        }
        self.intent.meta_flush = None;
        if result.is_err() {
            // The disk was detached (`local_io_failed`): the update that depends on
            // it is never made.
            return;
        }
        if self.intent.local_clears
            && (self.intent.bitmap_after_flush || self.intent.al_after_flush.is_some())
        {
            // More bits were cleared after this flush was submitted: flush again.
            return self.start_meta_flush(out);
        }
        let evicting = self.intent.al_after_flush.is_some();
        if std::mem::take(&mut self.intent.bitmap_after_flush)
            || (evicting && self.bitmap.changed_blocks().next().is_some())
        {
            // Before a transaction that forgets an extent: its bits go first.
            self.emit_bitmap_write(out);
        }
        if let Some(extents) = self.intent.al_after_flush.take() {
            let seq = self.next_seq();
            self.intent.al.begin(seq);
            out.push(Action::WriteAl { seq, extents });
        }
    }

    pub(super) fn on_tick(&mut self, elapsed_ms: u64, app_requests: u64, out: &mut Vec<Action>) {
        self.rate.tick(elapsed_ms, app_requests);
        self.ackwatch_tick(elapsed_ms, out);
        self.intent.ms_since_bitmap_write += elapsed_ms;
        // Lazily: the activity log covers what is not written yet. During a resync
        // more often, so that a crashed source redoes little.
        let interval_ms = if self.source.is_some() { 100 } else { 1000 };
        if self.intent.ms_since_bitmap_write >= interval_ms
            && self.intent.bitmap_write.is_none()
            && self.bitmap.changed_blocks().next().is_some()
        {
            self.write_bitmap(out);
        }
        self.negotiation_tick(out);
        self.twophase_tick(out);
        self.source_tick(out);
        self.repair_tick(out);
        self.check_drained(out);
        self.idle_housekeeping(out);
    }

    /// An idle Primary closes its open epoch (the peer confirms it, so the transfer
    /// log drains and extents can cool); a Secondary cools the whole activity log
    /// once nothing uses it, so a crash as Secondary replays nothing.
    fn idle_housekeeping(&mut self, out: &mut Vec<Action>) {
        let idle = self.dispatched_writes == self.dispatched_at_tick;
        self.dispatched_at_tick = self.dispatched_writes;
        self.ticks_since_flush_barrier = self.ticks_since_flush_barrier.saturating_add(1);
        // The transfer log (and the extents it holds hot) drains only by a flush
        // barrier's ack: one when idle, and at least every FLUSH_BARRIER_TICKS
        // while writes keep coming.
        let due = idle || self.ticks_since_flush_barrier >= FLUSH_BARRIER_TICKS;
        if due && self.role == Role::Primary {
            self.flush_barrier_if_needed(out);
        }
        if self.role == Role::Secondary
            && !self.detached()
            && self.intent.al_after_flush.is_none()
            && self.intent.al.cool_all()
        {
            if self.bitmap.changed_blocks().next().is_some() {
                self.write_bitmap(out);
            }
            let seq = self.next_seq();
            self.intent.al.begin(seq);
            out.push(Action::WriteAl { seq, extents: Vec::new() });
        }
    }

    /// An admitted write: first its write intent (activity log, or the bitmap for a
    /// range too large for the log), then [`Core::send_write`].
    pub(super) fn dispatch_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        if self.detached() {
            return self.send_write_diskless(job, out);
        }
        let range = self.writes[&job].range.clone();
        if ActivityLog::span(&range) > self.intent.al.max_span() {
            self.mark_dirty(range);
            self.intent.intent_gen += 1;
            self.writes.get_mut(&job).expect("known").intent = Some(Intent::Bitmap);
            self.intent.intent_waiting.push((job, self.intent.intent_gen));
            self.write_bitmap(out);
            return;
        }
        if self.intent.al.try_acquire(&range, 2) {
            self.writes.get_mut(&job).expect("known").intent = Some(Intent::Log);
            return self.send_write(job, out);
        }
        self.intent.al.want(&range);
        self.intent.al_waiting.push_back(job);
        self.pump_al(out);
    }

    /// Starts the next activity-log transaction if one is needed and possible.
    pub(super) fn pump_al(&mut self, out: &mut Vec<Action>) {
        if self.intent.al_after_flush.is_some() || self.detached() {
            return;
        }
        if let Some(t) = self.intent.al.next_transaction() {
            if t.evicted {
                // Before the log forgets an extent, the writes to it that completed
                // must be durable here, and its bits on disk (`on_meta_flushed`).
                self.intent.al_after_flush = Some(t.extents);
                self.start_meta_flush(out);
                return;
            }
            let seq = self.next_seq();
            self.intent.al.begin(seq);
            out.push(Action::WriteAl { seq, extents: t.extents });
        } else if self.intent.al.blocked() {
            // Every hot extent waits for the peer to confirm an epoch durably: ask
            // for it, or nothing would ever release them.
            self.flush_barrier_if_needed(out);
        }
    }

    /// Sends a flush barrier if the transfer log holds writes no flush barrier
    /// sent so far covers.
    pub(super) fn flush_barrier_if_needed(&mut self, out: &mut Vec<Action>) {
        let covered = self.flush_barriers.back().copied();
        let uncovered = self.transfer_log.back().is_some_and(|s| covered.is_none_or(|e| s.epoch > e));
        if self.replicating_data() && (uncovered || self.epoch_writes > 0) {
            self.close_epoch(true, out);
        }
    }

    pub(super) fn retry_al_waiters(&mut self, out: &mut Vec<Action>) {
        for _ in 0..self.intent.al_waiting.len() {
            let Some(job) = self.intent.al_waiting.pop_front() else { break };
            let Some(w) = self.writes.get_mut(&job) else { continue };
            let range = w.range.clone();
            if self.intent.al.try_acquire(&range, 2) {
                w.intent = Some(Intent::Log);
                self.send_write(job, out);
            } else {
                self.intent.al.want(&range);
                self.intent.al_waiting.push_back(job);
            }
        }
        self.pump_al(out);
    }

    /// Gives back one activity-log reference of a settled part of a write.
    pub(super) fn release_al(&mut self, range: &std::ops::Range<u64>, out: &mut Vec<Action>) {
        if self.intent.al.release(range, 1) {
            self.pump_al(out);
        }
    }

    /// A settled part of a write (`local` or the peer's), for its intent.
    pub(super) fn settle_peer_part(
        &mut self,
        job: JobId,
        range: std::ops::Range<u64>,
        intent: Intent,
        out: &mut Vec<Action>,
    ) {
        match intent {
            Intent::Log => self.release_al(&range, out),
            Intent::Bitmap => match self.writes.get_mut(&job) {
                // Cleared when the local part finishes too.
                Some(w) => w.peer_settled = true,
                None => {
                    self.bitmap.clear_range(range);
                    self.intent.local_clears = true;
                }
            },
        }
    }
}

/// The changed blocks of `bitmap`, encoded for the metadata; they count as written
/// from here on (metadata actions are carried out in the order given).
pub fn encode_changed(bitmap: &mut Bitmap) -> Vec<BitmapBlock> {
    let blocks: Vec<u64> = bitmap.changed_blocks().collect();
    let encoded = blocks
        .into_iter()
        .map(|index| {
            let mut data = Box::new([0u8; bitmap::BLOCK_BYTES]);
            let crc = bitmap.encode_block(index, &mut data);
            BitmapBlock { index, data, crc }
        })
        .collect();
    bitmap.mark_persisted();
    encoded
}
