//! The Primary's write path, as part of the [`Core`] (a child module): every NBD
//! write and flush, the ack table of SPEC §4 for protocols A, B and C (FUA and
//! FLUSH included), overlapping writes serialized through the in-flight table,
//! epochs closed by barriers when a write may depend on an acknowledged one, the
//! bounded send buffer of protocol A, and the transfer log: every range sent stays
//! there until a flush barrier's ack says the peer has it durably; a lost link puts
//! all of it in the bitmap.
//!
//! Every path that acknowledges a write answers for where its data is
//! (`ARCHITECTURE.md`, "Acknowledgements"): a reply goes out only when the local
//! part is done, the peer part is as the protocol asks (or the peer is gone and the
//! range is in the bitmap under a durable new generation), and no fence-peer
//! handler runs.

use super::*;

/// Writes per epoch before a barrier is forced (DRBD's `max-epoch-size` default), so
/// the transfer log is trimmed regularly even under a stream of independent writes.
pub(super) const MAX_EPOCH_WRITES: u64 = 2048;

/// How a Primary write is covered against a crash (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Intent {
    /// Holds two activity-log references (local part, peer part).
    Log,
    /// Its range was set in the bitmap and written before the write started; the
    /// bits are cleared once both the local disk and the peer have it.
    Bitmap,
}

/// A range the peer has not confirmed yet (DRBD's transfer log entry).
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) epoch: u64,
    pub(super) job: JobId,
    pub(super) range: std::ops::Range<u64>,
    pub(super) intent: Intent,
}

/// What a Primary write still waits for from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerPart {
    /// Not replicated (disconnected): the range is dirty.
    NotSent,
    /// Sent; waiting for `RecvAck` (B) or `WriteAck` (C).
    Awaiting,
    /// Protocol A: queued; acknowledged once the send buffer has drained below the
    /// bound past this frame's end (in bytes ever queued).
    Queued { queued_end_bytes: u64 },
    /// Done (acked, or the peer was lost and the range marked dirty).
    Done,
}

#[derive(Debug)]
pub(super) struct WriteJob {
    pub(super) range: std::ops::Range<u64>,
    pub(super) op: Option<IoOp>,
    pub(super) message: Option<Message>,
    pub(super) local: Option<Result<(), Errno>>,
    pub(super) peer: PeerPart,
    pub(super) epoch: u64,
    /// Started while the new generation was not yet durable.
    pub(super) needs_durable_gens: bool,
    pub(super) intent: Option<Intent>,
    /// The peer confirmed this write's epoch before the write finished locally.
    pub(super) peer_settled: bool,
    /// Only the peer's confirmation counts (a diskless Primary, `repl::diskless`):
    /// it came, or the peer failed it (EIO).
    pub(super) needs_peer: bool,
    pub(super) peer_confirmed: bool,
    pub(super) peer_failed: bool,
}

#[derive(Debug)]
pub(super) struct FlushJob {
    pub(super) local: Option<Result<(), Errno>>,
    /// The barrier epoch whose ack this flush waits for (B and C while connected).
    pub(super) barrier: Option<u64>,
    /// A diskless Primary's flush: done when `barrier` is acked (`local` says EIO
    /// if the link went first).
    pub(super) needs_peer: bool,
}

impl Core {
    /// Before the process stops (after the last event): everything the peer has not
    /// confirmed goes into the bitmap, and the changed bitmap blocks are returned to
    /// be written; after that the activity log may be emptied.
    pub fn stop_dirty(&mut self) -> Vec<BitmapBlock> {
        for sent in std::mem::take(&mut self.transfer_log) {
            self.mark_dirty(sent.range);
        }
        encode_changed(&mut self.bitmap)
    }

    /// Payload bytes of application writes sent to the peer since start.
    pub fn replicated_bytes(&self) -> u64 {
        self.replicated_bytes
    }

    /// Frames queued for the peer and not yet written to its socket.
    pub fn unsent_bytes(&self) -> u64 {
        self.queued_bytes_total - self.sent_bytes_total
    }

    pub(super) fn on_request(&mut self, job: JobId, request: Request, out: &mut Vec<Action>) {
        debug_assert_eq!(job.kind(), JobKind::Nbd, "requests come with NBD job ids");
        if self.role != Role::Primary {
            // Only a client connected before a demotion can get here; a Secondary
            // never writes on its own behalf.
            tracing::warn!(%job, "write request on a Secondary refused");
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Perm) });
            return;
        }
        if self.detached() && !self.peer_serves() {
            // Nothing to serve from: never stale data, never a lost write.
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
            return;
        }
        match request {
            Request::Read { offset, buf } => self.read_via_peer(job, offset, buf, out),
            Request::Flush => self.start_flush(job, false, out),
            Request::Write { offset, data, fua } => {
                let range = offset..offset + data.len() as u64;
                let message = Message::Write { id: job.raw(), epoch: 0, offset, fua, data: data.clone() };
                self.start_write(job, range, IoOp::Write { offset, buf: data, fua }, message, out);
            }
            Request::Trim { offset, len, fua } => {
                let message = Message::Trim { id: job.raw(), epoch: 0, offset, len, fua };
                self.start_write(job, offset..offset + len, IoOp::Trim { offset, len, fua }, message, out);
            }
            Request::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
                let message = Message::WriteZeroes { id: job.raw(), epoch: 0, offset, len, may_trim, fua };
                let op = IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua };
                self.start_write(job, offset..offset + len, op, message, out);
            }
        }
    }

    pub(super) fn start_write(
        &mut self,
        job: JobId,
        range: std::ops::Range<u64>,
        op: IoOp,
        message: Message,
        out: &mut Vec<Action>,
    ) {
        let admitted = self.inflight.admit(job, range.clone());
        let w = WriteJob {
            range,
            op: Some(op),
            message: Some(message),
            local: None,
            peer: PeerPart::NotSent,
            epoch: 0,
            needs_durable_gens: false,
            intent: None,
            peer_settled: false,
            needs_peer: false,
            peer_confirmed: false,
            peer_failed: false,
        };
        self.writes.insert(job, w);
        if admitted {
            self.dispatch_write(job, out);
        }
    }

    /// Sends a write with its intent in place to the local disk and, when
    /// replicating, to the peer.
    pub(super) fn send_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        let replicating = self.replicating_data();
        if replicating && (self.epoch_acked || self.epoch_writes >= MAX_EPOCH_WRITES) {
            // This write may depend on one already acknowledged: close the epoch so
            // the Secondary cannot apply them out of order.
            self.close_epoch(false, out);
        }
        let epoch = self.epoch;
        let needs_durable_gens = self.gens_pending;
        self.dispatched_writes += 1;
        let w = self.writes.get_mut(&job).expect("dispatching a known job");
        w.epoch = epoch;
        w.needs_durable_gens = needs_durable_gens;
        let op = w.op.take().expect("dispatched once");
        let mut message = w.message.take().expect("dispatched once");
        out.push(Action::Local { job, op });
        if !replicating {
            // The bitmap records it: the peer part is settled.
            let (range, intent) = (w.range.clone(), w.intent);
            if !(self.ahead && self.cfg.bugs.ahead_forgets_writes) {
                self.mark_dirty(range.clone());
            }
            if intent == Some(Intent::Log) {
                self.release_al(&range, out);
            }
            return;
        }
        set_epoch(&mut message, epoch);
        self.replicated_bytes += message.data().map_or(0, |d| d.len() as u64);
        let frame_bytes = frame_bytes(&message);
        self.send(message, out);
        self.epoch_writes += 1;
        let w = &self.writes[&job];
        let intent = w.intent.expect("intent before sending");
        self.transfer_log.push_back(Sent { epoch, job, range: w.range.clone(), intent });
        let peer = match self.cfg.protocol {
            Protocol::A => PeerPart::Queued { queued_end_bytes: self.queued_bytes_total },
            Protocol::B | Protocol::C => PeerPart::Awaiting,
        };
        debug_assert!(frame_bytes > 0);
        self.writes.get_mut(&job).expect("known").peer = peer;
        if matches!(peer, PeerPart::Queued { .. }) {
            self.send_waiters.push_back(job);
            self.release_send_waiters(out);
            self.check_congestion(out);
        }
    }

    pub(super) fn send(&mut self, message: Message, out: &mut Vec<Action>) {
        self.queued_bytes_total += frame_bytes(&message);
        out.push(Action::Send(message));
    }

    /// Protocol A: writes whose frame is within the send-buffer bound count as sent.
    pub(super) fn release_send_waiters(&mut self, out: &mut Vec<Action>) {
        while let Some(&job) = self.send_waiters.front() {
            let Some(w) = self.writes.get_mut(&job) else {
                self.send_waiters.pop_front();
                continue;
            };
            let PeerPart::Queued { queued_end_bytes } = w.peer else {
                self.send_waiters.pop_front();
                continue;
            };
            if queued_end_bytes.saturating_sub(self.sent_bytes_total) > self.cfg.send_buffer_bytes {
                break;
            }
            w.peer = PeerPart::Done;
            self.send_waiters.pop_front();
            self.try_finish_write(job, out);
        }
    }

    /// A FLUSH (or, with `wait_peer`, a drain that waits for the peer under any
    /// protocol).
    pub(super) fn start_flush(&mut self, job: JobId, wait_peer: bool, out: &mut Vec<Action>) {
        if self.detached() {
            return self.start_flush_diskless(job, out);
        }
        let barrier = if self.replicating_data() {
            let epoch = self.close_epoch(true, out);
            // Protocol A only keeps the peer ordered; B and C wait for its flush.
            (wait_peer || self.cfg.protocol != Protocol::A).then_some(epoch)
        } else {
            None
        };
        self.flushes.insert(job, FlushJob { local: None, barrier, needs_peer: false });
        out.push(Action::Local { job, op: IoOp::Flush });
    }

    /// Marks `range` as (possibly) different from the peer. A resync copy of it
    /// that waits for the target's flush no longer clears it: it is older.
    pub(super) fn mark_dirty(&mut self, range: std::ops::Range<u64>) {
        let before = self.bitmap.dirty_bytes();
        if let Some(source) = self.source.as_mut() {
            source.keep_dirty(&range);
        }
        self.bitmap.set_range(range);
        if let Some(source) = self.source.as_mut() {
            // Newly dirty bytes (writes while pulled ahead, say) are part of this
            // resync's work: progress never passes 100%.
            source.grow_total(self.bitmap.dirty_bytes() - before);
        }
    }

    /// Sends the barrier closing the open epoch; returns that epoch. A flush barrier
    /// makes the peer flush: its ack retires the transfer log up to it.
    pub(super) fn close_epoch(&mut self, flush: bool, out: &mut Vec<Action>) -> u64 {
        let epoch = self.epoch;
        self.send(Message::Barrier { epoch, flush }, out);
        if flush {
            self.flush_barriers.push_back(epoch);
            self.ticks_since_flush_barrier = 0;
        }
        self.epoch += 1;
        self.epoch_acked = false;
        self.epoch_writes = 0;
        epoch
    }

    pub(super) fn try_finish_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get(&job) else { return };
        if w.needs_peer {
            // Diskless: the peer's confirmation is the whole answer.
            let outcome = match (w.peer_confirmed, w.peer_failed) {
                (true, _) => Outcome::Ok,
                (false, true) => Outcome::Error(NbdError::Io),
                (false, false) => return,
            };
            let w = self.writes.remove(&job).expect("present");
            if w.epoch == self.epoch {
                self.epoch_acked = true;
            }
            out.push(Action::Reply { job, outcome });
            let next = self.inflight.complete(job, w.range.start);
            return self.start_released(next, out);
        }
        let peer_done = matches!(w.peer, PeerPart::Done | PeerPart::NotSent);
        let gens_ok = !w.needs_durable_gens || !self.gens_pending;
        let Some(mut local) = w.local else { return };
        if self.disk_failure.is_some() {
            // Failed closed: answered with an error once off the disk.
            local = Err(Errno::EIO);
        } else if !(peer_done && gens_ok) || w.op.is_some() || self.fencing {
            return;
        }
        let w = self.writes.remove(&job).expect("present");
        if w.epoch == self.epoch {
            self.epoch_acked = true;
        }
        if w.intent == Some(Intent::Bitmap) && w.peer_settled {
            self.bitmap.clear_range(w.range.clone());
            self.intent.cleared_by_local_write();
        }
        let outcome = match local {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Error(NbdError::from_errno(e as i32, false)),
        };
        out.push(Action::Reply { job, outcome });
        let next = self.inflight.complete(job, w.range.start);
        self.start_released(next, out);
    }

    pub(super) fn try_finish_flush(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(f) = self.flushes.get(&job) else { return };
        let Some(mut local) = f.local else { return };
        if f.needs_peer {
            if f.barrier.is_some() {
                return;
            }
        } else if self.disk_failure.is_some() {
            local = Err(Errno::EIO);
        } else if f.barrier.is_some() || self.fencing {
            return;
        }
        self.flushes.remove(&job);
        let outcome = match local {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Error(NbdError::from_errno(e as i32, false)),
        };
        out.push(Action::Reply { job, outcome });
    }

    /// The peer's `WriteAck` (`written`) or `RecvAck` for a write.
    pub(super) fn on_peer_ack(&mut self, id: JobId, errno: i32, written: bool, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get_mut(&id) else { return };
        if w.peer != PeerPart::Awaiting || (w.needs_peer && !written) {
            // Only the peer's write counts for a diskless Primary.
            return;
        }
        w.peer = PeerPart::Done;
        if errno == 0 && w.needs_peer {
            w.peer_confirmed = true;
        }
        if errno != 0 {
            // The peer could not write it: its copy of the range is stale, and it
            // is not UpToDate any more. It detaches its disk (and leaves the link);
            // leaving the link here too puts everything it has not confirmed into
            // the bitmap under a new generation before this write is acknowledged.
            tracing::warn!(job = %id, errno, "peer failed a replicated write; range marked out of sync");
            let range = w.range.clone();
            self.mark_dirty(range);
            self.peer_failed_write(out);
        }
        self.try_finish_write(id, out);
    }

    pub(super) fn on_peer_down(&mut self, out: &mut Vec<Action>) {
        if self.link == Link::Disconnected {
            return;
        }
        if self.role == Role::Primary && self.detached() {
            self.diskless_link_lost(out);
        }
        self.tracking_diskless_primary = false;
        self.link = Link::Disconnected;
        // Ahead: the new generation and the bitmap already hold what was not
        // shipped; the next link resyncs by generation.
        self.ahead = false;
        self.behind = false;
        self.target_after_drain = false;
        self.ahead_barrier = None;
        self.abandon_resync(out);
        self.send_waiters.clear();
        self.queued_bytes_total = self.sent_bytes_total;
        if self.role == Role::Primary && self.cfg.fence_peer && self.cfg.protocol == Protocol::C {
            // DRBD's resource-and-stonith: the peer may be alive and about to be
            // promoted; nothing is acknowledged until the handler made sure it cannot.
            tracing::warn!("peer lost while Primary: running the fence-peer handler; write acks held");
            self.fencing = true;
            out.push(Action::FencePeer);
        }
        if self.role == Role::Primary && self.gens.bitmap == 0 && self.disk_failure.is_none() {
            // SPEC §5: a Primary that loses its peer starts a new generation, durable
            // before any write is acknowledged without the peer (unless one already
            // tracks changes since the peer's, e.g. during a resync).
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.gens_pending = true;
            self.persist(out);
        }
        // Everything sent whose epoch the peer has not confirmed may be missing there,
        // including writes already acknowledged under protocols A and B.
        let sent: Vec<Sent> = self.transfer_log.drain(..).collect();
        for s in sent {
            self.mark_dirty(s.range.clone());
            if s.intent == Intent::Log {
                self.release_al(&s.range, out);
            }
        }
        let gens_pending = self.gens_pending;
        for w in self.writes.values_mut() {
            if w.peer != PeerPart::NotSent {
                w.peer = PeerPart::Done;
            }
            w.needs_durable_gens = gens_pending;
        }
        let flushes: Vec<JobId> = self.flushes.keys().copied().collect();
        for job in flushes {
            self.flushes.get_mut(&job).expect("present").barrier = None;
            self.try_finish_flush(job, out);
        }
        let writes: Vec<JobId> = self.writes.keys().copied().collect();
        for job in writes {
            self.try_finish_write(job, out);
        }
        self.flush_barriers.clear();
        // A Secondary drops what it had not applied; the Primary resyncs it later.
        self.applier.link_lost();
        self.ingress_held.clear();
        self.abandon_verify("the peer link was lost", out);
        self.verifier.link_lost();
        self.server.link_lost();
    }

    pub(super) fn on_fence_done(&mut self, result: Result<i32, String>, out: &mut Vec<Action>) {
        if !self.fencing {
            return;
        }
        self.fencing = false;
        match &result {
            // DRBD's meanings: 3 peer not UpToDate, 4 peer outdated/fenced, 5 peer
            // unreachable, 7 peer stonithed.
            Ok(code @ (3 | 4 | 5 | 7)) => tracing::info!(code, "fence-peer handler: the peer is fenced"),
            Ok(code) => {
                tracing::error!(code, "fence-peer handler did not fence the peer; writes resume anyway")
            }
            Err(e) => tracing::error!(error = %e, "fence-peer handler failed; writes resume anyway"),
        }
        self.last_fence = Some(result);
        self.finish_all(out);
    }

    /// The peer finished an epoch (and flushed, for a flush barrier).
    pub(super) fn on_barrier_ack(&mut self, epoch: u64, errno: i32, out: &mut Vec<Action>) {
        if errno != 0 {
            tracing::warn!(epoch, errno, "peer failed to complete a barrier");
            // As for a failed write (`on_peer_ack`): the link goes, so the whole
            // transfer log (this epoch and later) is in the bitmap.
            return self.peer_failed_write(out);
        }
        // Acks come in epoch order. Only a flush barrier's ack says the writes
        // of its epoch and before are durable on the peer: a crash of the peer
        // loses anything else, so it stays in the transfer log (and its extents
        // hot) until then.
        self.ahead_barrier_acked(epoch, out);
        let mut flushed = false;
        while self.flush_barriers.front().is_some_and(|e| *e <= epoch) {
            flushed |= self.flush_barriers.pop_front() == Some(epoch);
        }
        while (flushed || errno != 0) && self.transfer_log.front().is_some_and(|s| s.epoch <= epoch) {
            let sent = self.transfer_log.pop_front().expect("checked");
            if errno != 0 {
                self.mark_dirty(sent.range.clone());
                if sent.intent == Intent::Log {
                    self.release_al(&sent.range, out);
                }
            } else {
                self.settle_peer_part(sent.job, sent.range, sent.intent, out);
            }
        }
        let waiting: Vec<JobId> =
            self.flushes.iter().filter(|(_, f)| f.barrier == Some(epoch)).map(|(j, _)| *j).collect();
        for job in waiting {
            self.flushes.get_mut(&job).expect("present").barrier = None;
            self.try_finish_flush(job, out);
        }
        if self.detached() {
            self.confirm_epochs_diskless(epoch);
            self.finish_all(out);
        }
    }

    /// The peer reported a failed write or barrier: leave the link (see
    /// `on_peer_ack`).
    pub(super) fn peer_failed_write(&mut self, out: &mut Vec<Action>) {
        if self.link == Link::Disconnected {
            return;
        }
        out.push(Action::DropLink { reason: "the peer failed a replicated write".into() });
        self.on_link_down(out);
    }

    /// Tries to answer every write and flush in flight.
    pub(super) fn finish_all(&mut self, out: &mut Vec<Action>) {
        let writes: Vec<JobId> = self.writes.keys().copied().collect();
        for job in writes {
            self.try_finish_write(job, out);
        }
        let flushes: Vec<JobId> = self.flushes.keys().copied().collect();
        for job in flushes {
            self.try_finish_flush(job, out);
        }
    }

    /// Whether the fence-peer handler runs now, and how the last one ended.
    pub fn fencing(&self) -> (bool, Option<&Result<i32, String>>) {
        (self.fencing, self.last_fence.as_ref())
    }
}

/// Bytes a message occupies in the send buffer: its whole frame, as the link counts
/// it in `Sent`.
pub(super) fn frame_bytes(m: &Message) -> u64 {
    m.wire_len()
}

pub(super) fn set_epoch(m: &mut Message, new: u64) {
    match m {
        Message::Write { epoch, .. } | Message::Trim { epoch, .. } | Message::WriteZeroes { epoch, .. } => {
            *epoch = new
        }
        _ => {}
    }
}
