//! A Primary without a disk, as part of the [`Core`] (a child module): after its
//! disk was detached (`repl::failure`), or when a diskless node was promoted, a
//! Primary keeps serving through its peer as long as the peer is connected and
//! UpToDate:
//!
//! - **Reads** go to the peer (`ReadReq`, answered by its `serve::ReadServer` once
//!   the epoch named in the request is applied there, so every write acknowledged
//!   before the read was asked is seen).
//! - **Writes** are sent only to the peer and acknowledged when the peer has
//!   written them, with protocol C semantics whatever the configured protocol: the
//!   peer sends `WriteAck` for every write while its peer is diskless, and a
//!   barrier's ack confirms the writes of its epoch and before.
//! - **Flushes** are flush barriers; the answer is the barrier's ack.
//! - Writes and flushes in flight when the disk failed are answered the same way:
//!   from the peer's confirmation, whatever their local result (the epoch open at
//!   the failure is closed at once, so a barrier ack covers them).
//! - Without a usable peer (not connected, not UpToDate, or the link lost while a
//!   request waits) every request is answered EIO: a diskless node never serves
//!   data it cannot vouch for.

use super::*;

impl Core {
    /// The peer can serve a diskless Primary: connected, UpToDate, with a disk.
    pub(super) fn peer_serves(&self) -> bool {
        self.link == Link::Replicating && self.peer_disk == Some(DiskState::UpToDate)
    }

    /// A client read that the local disk cannot serve (detached, or it failed the
    /// read): from the peer, or EIO.
    pub(super) fn read_via_peer(&mut self, job: JobId, offset: u64, buf: BufMut, out: &mut Vec<Action>) {
        if self.role != Role::Primary || !self.detached() || !self.peer_serves() {
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
            return;
        }
        // Everything sent so far is in an epoch up to this one once it is closed.
        let after_epoch = if self.epoch_writes > 0 || self.epoch_acked {
            self.close_epoch(false, out)
        } else {
            self.epoch - 1
        };
        let len = buf.len() as u64;
        self.send(Message::ReadReq { id: job.raw(), offset, len, after_epoch }, out);
        self.peer_reads.insert(job, buf);
    }

    /// A Secondary whose Primary just lost its disk: from now on this node holds
    /// writes that disk lacks. A generation of its own (durable before any of
    /// those writes is applied and acknowledged) says so, and the whole device is
    /// recorded as out of sync for that disk: which of the writes in flight at the
    /// failure reached it is unknown, and bits set per write would need a
    /// metadata write before each acknowledgement. A disk that comes back is
    /// resynced in full from here (a replaced one would be anyway).
    pub(super) fn track_for_diskless_primary(&mut self, out: &mut Vec<Action>) {
        if self.detached() || self.disk != DiskState::UpToDate || self.tracking_diskless_primary {
            return;
        }
        self.tracking_diskless_primary = true;
        tracing::warn!(
            "the Primary's disk was detached: this node now holds the only copy; its disk will be resynced in full"
        );
        if self.gens.bitmap == 0 {
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
        }
        self.bitmap.set_all();
        // At once, before the persist (no flush first: it records no cleared bit).
        self.emit_bitmap_write(out);
        self.gens_pending = true;
        self.persist(out);
    }

    /// The peer (a diskless Primary) asks for a read.
    pub(super) fn on_read_req(
        &mut self,
        id: u64,
        offset: u64,
        len: u64,
        after_epoch: u64,
        out: &mut Vec<Action>,
    ) {
        if self.detached() || self.role == Role::Primary || self.disk != DiskState::UpToDate {
            tracing::warn!(offset, len, disk = %self.disk, "read request from the peer that this node cannot serve");
            let data = nbd_server::buf::BufMut::unpooled(0).freeze();
            return self.send(Message::ReadData { id, errno: Errno::EIO as i32, data }, out);
        }
        let through = self.applier.applied_through();
        let req = serve::ReadReq { id, offset, len, after_epoch };
        self.server.on_request(req, through, &self.pool, &mut ctx!(self, out));
    }

    /// The peer's answer to a read.
    pub(super) fn on_read_data(&mut self, id: u64, errno: i32, data: Buf, out: &mut Vec<Action>) {
        let job = JobId::from_raw(id);
        let Some(mut buf) = self.peer_reads.remove(&job) else { return };
        self.peer_progress();
        if errno != 0 || data.len() != buf.len() {
            tracing::warn!(
                errno,
                len = data.len(),
                want = buf.len(),
                "the peer failed a read for this diskless Primary"
            );
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
            return;
        }
        buf.copy_from_slice(&data);
        out.push(Action::Reply { job, outcome: Outcome::Read(buf) });
    }

    /// A write with its range admitted, on a diskless Primary: to the peer only.
    pub(super) fn send_write_diskless(&mut self, job: JobId, out: &mut Vec<Action>) {
        if !self.peer_serves() {
            return self.fail_write(job, out);
        }
        if self.epoch_acked || self.epoch_writes >= primary::MAX_EPOCH_WRITES {
            self.close_epoch(false, out);
        }
        let epoch = self.epoch;
        self.dispatched_writes += 1;
        let w = self.writes.get_mut(&job).expect("dispatching a known job");
        w.epoch = epoch;
        w.needs_peer = true;
        w.local = Some(Ok(()));
        w.op = None;
        let mut message = w.message.take().expect("dispatched once");
        primary::set_epoch(&mut message, epoch);
        self.replicated_bytes += message.data().map_or(0, |d| d.len() as u64);
        self.send(message, out);
        self.epoch_writes += 1;
        self.writes.get_mut(&job).expect("known").peer = primary::PeerPart::Awaiting;
    }

    /// A flush on a diskless Primary: a flush barrier.
    pub(super) fn start_flush_diskless(&mut self, job: JobId, out: &mut Vec<Action>) {
        if !self.peer_serves() {
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
            return;
        }
        let epoch = self.close_epoch(true, out);
        self.flushes.insert(job, FlushJob { local: Some(Ok(())), barrier: Some(epoch), needs_peer: true });
    }

    /// The disk of this Primary was just detached: what is in flight is answered
    /// from the peer from now on (or EIO without one), and writes that waited for
    /// their write intent go to the peer only.
    pub(super) fn go_diskless(&mut self, out: &mut Vec<Action>) {
        let serves = self.peer_serves();
        for w in self.writes.values_mut() {
            if w.op.is_none() {
                // Sent (to the disk, maybe the peer): the peer's confirmation decides.
                w.needs_peer = true;
                w.peer_failed |= !serves || w.peer == primary::PeerPart::NotSent;
            }
        }
        let flush_epoch = if serves { Some(self.close_epoch(true, out)) } else { None };
        for f in self.flushes.values_mut() {
            f.needs_peer = true;
            if !serves {
                f.local = Some(Err(Errno::EIO));
                f.barrier = None;
            } else if f.barrier.is_none() {
                // Protocol A: the barrier just sent covers what it flushes.
                f.barrier = flush_epoch;
            }
        }
        for job in self.intent.take_waiting() {
            if self.writes.get(&job).is_some_and(|w| w.op.is_some()) {
                self.send_write_diskless(job, out);
            }
        }
        self.finish_all(out);
    }

    /// The peer confirmed the epochs up to `epoch`: writes of a diskless Primary
    /// in them are done.
    pub(super) fn confirm_epochs_diskless(&mut self, epoch: u64) {
        for w in self.writes.values_mut() {
            if w.needs_peer && w.op.is_none() && w.epoch <= epoch && w.peer != primary::PeerPart::NotSent {
                w.peer_confirmed = true;
            }
        }
    }

    /// The link is gone: whatever waits for the peer on a diskless Primary fails.
    pub(super) fn diskless_link_lost(&mut self, out: &mut Vec<Action>) {
        for (job, _) in self.peer_reads.drain() {
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
        }
        for w in self.writes.values_mut().filter(|w| w.needs_peer && !w.peer_confirmed) {
            w.peer_failed = true;
        }
        for f in self.flushes.values_mut().filter(|f| f.needs_peer && f.barrier.is_some()) {
            f.local = Some(Err(Errno::EIO));
        }
    }
}
