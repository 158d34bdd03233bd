//! Write intent and metadata, as part of the [`Core`] (a child module): the
//! activity-log gate in front of every Primary write, the bitmap used as intent for
//! ranges too large for the log, lazy bitmap writes on ticks, and what happens when
//! a metadata action is durable.
//!
//! Order matters and is kept by the shell's metadata thread, which carries out
//! metadata actions in the order given: the changed bitmap blocks are queued before
//! an activity-log transaction that evicts an extent, so nothing is ever covered by
//! neither.

use super::*;

impl Core {
    pub(super) fn on_meta_durable(&mut self, seq: u64, out: &mut Vec<Action>) {
        self.on_target_durable(seq, out);
        self.durable_seq = self.durable_seq.max(seq);
        if self.bitmap_write.is_some_and(|s| s <= seq) {
            self.bitmap_write = None;
        }
        if self.al.committed(seq) {
            self.retry_al_waiters(out);
        }
        if !self.intent_waiting.is_empty() {
            let (ready, waiting): (Vec<_>, Vec<_>) =
                self.intent_waiting.drain(..).partition(|(_, s)| *s <= seq);
            self.intent_waiting = waiting;
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
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        let seq = self.next_meta_seq;
        self.next_meta_seq += 1;
        seq
    }

    /// Queues a write of the changed bitmap blocks; returns its sequence.
    pub(super) fn write_bitmap(&mut self, out: &mut Vec<Action>) -> u64 {
        let blocks = encode_changed(&mut self.bitmap);
        let seq = self.next_seq();
        self.bitmap_write = Some(seq);
        self.ms_since_bitmap_write = 0;
        out.push(Action::WriteBitmap { seq, blocks });
        seq
    }

    pub(super) fn on_tick(&mut self, elapsed_ms: u64, app_requests: u64, out: &mut Vec<Action>) {
        self.rate_tick(elapsed_ms, app_requests);
        self.ms_since_bitmap_write += elapsed_ms;
        // Lazily: the activity log covers what is not written yet. During a resync
        // more often, so that a crashed source redoes little.
        let interval_ms = if self.source.is_some() { 100 } else { 1000 };
        if self.ms_since_bitmap_write >= interval_ms
            && self.bitmap_write.is_none()
            && self.bitmap.changed_blocks().next().is_some()
        {
            self.write_bitmap(out);
        }
        self.pump_source(out);
        self.send_resync_info(out);
        self.idle_housekeeping(out);
    }

    /// An idle Primary closes its open epoch (the peer confirms it, so the transfer
    /// log drains and extents can cool); a Secondary cools the whole activity log
    /// once nothing uses it, so a crash as Secondary replays nothing.
    fn idle_housekeeping(&mut self, out: &mut Vec<Action>) {
        let idle = self.dispatched_writes == self.dispatched_at_tick;
        self.dispatched_at_tick = self.dispatched_writes;
        if idle && self.link == Link::Replicating && self.epoch_writes > 0 && self.role == Role::Primary {
            self.close_epoch(false, out);
        }
        if self.role == Role::Secondary && self.al.cool_all() {
            if self.bitmap.changed_blocks().next().is_some() {
                self.write_bitmap(out);
            }
            let seq = self.next_seq();
            self.al.begin(seq);
            out.push(Action::WriteAl { seq, extents: Vec::new() });
        }
    }

    /// An admitted write: first its write intent (activity log, or the bitmap for a
    /// range too large for the log), then [`Core::send_write`].
    pub(super) fn dispatch_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        let range = self.writes[&job].range.clone();
        if ActivityLog::span(&range) > self.al.max_span() {
            self.bitmap.set_range(range);
            let seq = self.write_bitmap(out);
            self.writes.get_mut(&job).expect("known").intent = Some(Intent::Bitmap);
            self.intent_waiting.push((job, seq));
            return;
        }
        if self.al.try_acquire(&range, 2) {
            self.writes.get_mut(&job).expect("known").intent = Some(Intent::Log);
            return self.send_write(job, out);
        }
        self.al.want(&range);
        self.al_waiting.push_back(job);
        self.pump_al(out);
    }

    /// Starts the next activity-log transaction if one is needed and possible.
    pub(super) fn pump_al(&mut self, out: &mut Vec<Action>) {
        if let Some(t) = self.al.next_transaction() {
            if t.evicted && self.bitmap.changed_blocks().next().is_some() {
                // An evicted extent's bits must be on disk before the log forgets it.
                self.write_bitmap(out);
            }
            let seq = self.next_seq();
            self.al.begin(seq);
            out.push(Action::WriteAl { seq, extents: t.extents });
        } else if self.al.blocked() && self.link == Link::Replicating && self.epoch_writes > 0 {
            // Every hot extent waits for the peer to confirm an epoch: close the open
            // one, or nothing would ever release them.
            self.close_epoch(false, out);
        }
    }

    pub(super) fn retry_al_waiters(&mut self, out: &mut Vec<Action>) {
        for _ in 0..self.al_waiting.len() {
            let Some(job) = self.al_waiting.pop_front() else { break };
            let Some(w) = self.writes.get_mut(&job) else { continue };
            let range = w.range.clone();
            if self.al.try_acquire(&range, 2) {
                w.intent = Some(Intent::Log);
                self.send_write(job, out);
            } else {
                self.al.want(&range);
                self.al_waiting.push_back(job);
            }
        }
        self.pump_al(out);
    }

    /// Gives back one activity-log reference of a settled part of a write.
    pub(super) fn release_al(&mut self, range: &std::ops::Range<u64>, out: &mut Vec<Action>) {
        if self.al.release(range, 1) {
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
                None => self.bitmap.clear_range(range),
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
