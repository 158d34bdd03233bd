//! The Secondary's side of replication, as part of the [`Core`] (a child module):
//! replicated writes are applied concurrently within an epoch, and no write of epoch
//! N+1 starts before every write of epoch N completed (and was flushed if the
//! barrier asked); then `BarrierAck(N)` goes back. So the Secondary's disk is
//! crash-consistent at every instant.

use super::*;

impl Core {
    pub(super) fn on_replicated(&mut self, msg: Message, out: &mut Vec<Action>) {
        let epoch = match &msg {
            Message::Write { epoch, .. }
            | Message::Trim { epoch, .. }
            | Message::WriteZeroes { epoch, .. } => *epoch,
            Message::Barrier { epoch, .. } => *epoch,
            _ => return,
        };
        let rx = if matches!(msg, Message::Barrier { .. }) {
            0
        } else {
            self.applier.received += 1;
            self.applier.received
        };
        let later_epoch = self.applier.closing.is_some() || epoch > self.applier.epoch;
        let write = !matches!(msg, Message::Barrier { .. });
        if later_epoch && !(self.cfg.bugs.apply_out_of_order && write) {
            // Epoch N+1 must not start before epoch N is complete.
            self.applier.held.push_back((rx, msg));
            return;
        }
        self.apply_now(rx, msg, out);
    }

    pub(super) fn apply_now(&mut self, rx: u64, msg: Message, out: &mut Vec<Action>) {
        let (peer_id, op) = match msg {
            Message::Barrier { epoch, flush } => {
                debug_assert_eq!(epoch, self.applier.epoch);
                self.applier.closing = Some(flush);
                self.maybe_close_epoch(out);
                return;
            }
            Message::Write { id, offset, fua, data, .. } => (id, IoOp::Write { offset, buf: data, fua }),
            Message::Trim { id, offset, len, fua, .. } => (id, IoOp::Trim { offset, len, fua }),
            Message::WriteZeroes { id, offset, len, may_trim, fua, .. } => {
                (id, IoOp::WriteZeroes { offset, len, may_trim, fast_only: false, fua })
            }
            _ => return,
        };
        if self.cfg.protocol == Protocol::B {
            self.send(Message::RecvAck { id: peer_id }, out);
        }
        if self.cfg.bugs.ack_before_write && self.cfg.protocol == Protocol::C {
            self.send(Message::WriteAck { id: peer_id, errno: 0 }, out);
        }
        let job = self.ids.next(JobKind::Apply, self.link_gen);
        self.peer_write_started(job);
        self.applier.outstanding += 1;
        self.applying.insert(job, ApplyJob { peer_id, epoch: self.applier.epoch, rx });
        out.push(Action::Local { job, op });
    }

    pub(super) fn on_applied(&mut self, apply: ApplyJob, result: Result<(), Errno>, out: &mut Vec<Action>) {
        debug_assert_eq!(apply.epoch, self.applier.epoch);
        if self.cfg.protocol == Protocol::C && !self.cfg.bugs.ack_before_write {
            let errno = result.err().map_or(0, |e| e as i32);
            self.send(Message::WriteAck { id: apply.peer_id, errno }, out);
        }
        self.applier.outstanding -= 1;
        if self.applier.drain_mark.is_some_and(|mark| apply.rx <= mark) {
            self.applier.undrained -= 1;
            self.maybe_start_target_flush(out);
        }
        self.maybe_close_epoch(out);
    }

    /// Marks the writes received so far: `drained` says when all have completed.
    pub(super) fn mark_drain(&mut self) {
        let a = &mut self.applier;
        let held_writes = a.held.iter().filter(|(_, m)| !matches!(m, Message::Barrier { .. })).count() as u64;
        a.drain_mark = Some(a.received);
        a.undrained = a.outstanding + held_writes;
    }

    /// Every write received before the mark has completed.
    pub(super) fn drained(&self) -> bool {
        self.applier.undrained == 0
    }

    pub(super) fn maybe_close_epoch(&mut self, out: &mut Vec<Action>) {
        let Some(flush) = self.applier.closing else { return };
        if self.applier.outstanding > 0 || self.applier.flushing {
            return;
        }
        if flush {
            self.applier.flushing = true;
            let job = self.ids.next(JobKind::ApplyFlush, self.link_gen);
            out.push(Action::Local { job, op: IoOp::Flush });
            return;
        }
        self.finish_epoch(0, out);
    }

    pub(super) fn on_applier_flushed(&mut self, result: Result<(), Errno>, out: &mut Vec<Action>) {
        self.applier.flushing = false;
        self.finish_epoch(result.err().map_or(0, |e| e as i32), out);
    }

    pub(super) fn finish_epoch(&mut self, errno: i32, out: &mut Vec<Action>) {
        let epoch = self.applier.epoch;
        self.send(Message::BarrierAck { epoch, errno }, out);
        self.applier.epoch += 1;
        self.applier.closing = None;
        self.release_digest_reqs(out);
        // Release the next epoch's writes, up to its own barrier.
        while self.applier.closing.is_none() {
            let Some((rx, msg)) = self.applier.held.pop_front() else { break };
            self.apply_now(rx, msg, out);
        }
    }
}
