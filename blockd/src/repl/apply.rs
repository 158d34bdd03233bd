//! The Secondary's side of replication, a sub-machine of the core that owns its
//! state: replicated writes are applied concurrently within an epoch, and no write
//! of epoch N+1 starts before every write of epoch N completed (and was flushed if
//! the barrier asked); then `BarrierAck(N)` goes back. So the Secondary's disk holds
//! a prefix of the Primary's epochs at every instant.
//!
//! It also keeps count of the writes made on the peer's behalf (its own and the
//! sync target's) per link generation: while one of an earlier link is in flight,
//! nothing of the current link may be written over it (the core holds the current
//! link's data-path messages until then).

use std::collections::{HashMap, VecDeque};

use nix::errno::Errno;

use crate::config::Protocol;
use crate::peer::msg::Message;
use crate::repl::core::ctx::Ctx;
use crate::repl::job::{JobId, JobKind};
use crate::storage::IoOp;

/// A replicated write being applied.
#[derive(Debug)]
struct ApplyJob {
    /// The Primary's id for it (its acks carry it).
    peer_id: u64,
    epoch: u64,
    /// Its place in receive order.
    rx: u64,
    /// Where it writes (for the report when it fails).
    offset: u64,
}

#[derive(Debug, Default)]
pub(super) struct Applier {
    /// The epoch whose writes are being applied.
    epoch: u64,
    /// Writes of `epoch` not yet complete.
    outstanding: u64,
    /// The barrier closing `epoch` arrived: (flush asked).
    closing: Option<bool>,
    /// A flush for the closing barrier is running.
    flushing: bool,
    /// Messages of later epochs, held until `epoch` is closed, each with its place
    /// in receive order.
    held: VecDeque<(u64, Message)>,
    /// Writes received on this link (their receive order).
    received: u64,
    /// A sync target waits for every write received before `ResyncDone` (receive
    /// order up to this) to complete before its final flush: this many still have
    /// not.
    drain_mark: Option<u64>,
    undrained: u64,
    jobs: HashMap<JobId, ApplyJob>,
    /// Writes on the peer's behalf in flight, per link generation.
    peer_writes: HashMap<u32, u32>,
    /// The peer is a Primary without a disk: every write gets a `WriteAck` when
    /// written, whatever the protocol (`repl::diskless`).
    ack_every_write: bool,
}

/// What applying something meant for the rest of the core.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Applied {
    /// An epoch finished (digest requests waiting for it may be served).
    pub epoch_done: bool,
    /// Every write received before the drain mark has completed.
    pub drained: bool,
}

impl Applier {
    /// A new link: its epochs are numbered from 1. Writes of the old link still in
    /// flight keep counting (under their link generation) until they land; with
    /// `keep_jobs` (an injected bug) their jobs are kept as if they were current.
    pub fn start_link(&mut self, keep_jobs: bool) {
        let peer_writes = std::mem::take(&mut self.peer_writes);
        let jobs = if keep_jobs { std::mem::take(&mut self.jobs) } else { HashMap::new() };
        *self = Applier { epoch: 1, peer_writes, jobs, ..Applier::default() };
    }

    /// The link is gone: what was not applied is dropped (the Primary resyncs it).
    pub fn link_lost(&mut self) {
        self.held.clear();
    }

    /// A replicated write, trim, zeroing or barrier of the current link.
    pub fn on_message(&mut self, msg: Message, ctx: &mut Ctx<'_>) -> Applied {
        let epoch = match &msg {
            Message::Write { epoch, .. }
            | Message::Trim { epoch, .. }
            | Message::WriteZeroes { epoch, .. }
            | Message::Barrier { epoch, .. } => *epoch,
            _ => return Applied::default(),
        };
        let write = !matches!(msg, Message::Barrier { .. });
        let rx = if write {
            self.received += 1;
            self.received
        } else {
            0
        };
        let later_epoch = self.closing.is_some() || epoch > self.epoch;
        if later_epoch && !(ctx.cfg.bugs.apply_out_of_order && write) {
            // Epoch N+1 must not start before epoch N is complete.
            self.held.push_back((rx, msg));
            return Applied::default();
        }
        self.apply_now(rx, msg, ctx)
    }

    fn apply_now(&mut self, rx: u64, msg: Message, ctx: &mut Ctx<'_>) -> Applied {
        let (peer_id, offset, op) = match msg {
            Message::Barrier { flush, .. } => {
                self.closing = Some(flush);
                return self.maybe_close_epoch(ctx);
            }
            Message::Write { id, offset, fua, data, .. } => {
                (id, offset, IoOp::Write { offset, buf: data, fua })
            }
            Message::Trim { id, offset, len, fua, .. } => (id, offset, IoOp::Trim { offset, len, fua }),
            Message::WriteZeroes { id, offset, len, may_trim, fua, .. } => {
                (id, offset, IoOp::WriteZeroes { offset, len, may_trim, fast_only: false, fua })
            }
            _ => return Applied::default(),
        };
        if ctx.cfg.protocol == Protocol::B && !self.ack_every_write {
            ctx.send(Message::RecvAck { id: peer_id });
        }
        if ctx.cfg.bugs.ack_before_write && ctx.cfg.protocol == Protocol::C {
            ctx.send(Message::WriteAck { id: peer_id, errno: 0 });
        }
        let job = ctx.local(JobKind::Apply, op);
        self.peer_write_started(job);
        self.outstanding += 1;
        self.jobs.insert(job, ApplyJob { peer_id, epoch: self.epoch, rx, offset });
        Applied::default()
    }

    /// Where the write `job` writes, if it is one of the current link.
    pub fn offset_of(&self, job: JobId) -> Option<u64> {
        self.jobs.get(&job).map(|j| j.offset)
    }

    /// Whether every write is acknowledged when written (the peer is diskless).
    pub fn ack_every_write(&mut self, on: bool) {
        self.ack_every_write = on;
    }

    /// A write of the current link completed.
    pub fn on_done(&mut self, job: JobId, result: Result<(), Errno>, ctx: &mut Ctx<'_>) -> Applied {
        self.peer_write_done(job);
        let Some(apply) = self.jobs.remove(&job) else { return Applied::default() };
        debug_assert_eq!(apply.epoch, self.epoch);
        if (ctx.cfg.protocol == Protocol::C || self.ack_every_write) && !ctx.cfg.bugs.ack_before_write {
            let errno = result.err().map_or(0, |e| e as i32);
            ctx.send(Message::WriteAck { id: apply.peer_id, errno });
        }
        self.outstanding -= 1;
        let mut applied = Applied::default();
        if self.drain_mark.is_some_and(|mark| apply.rx <= mark) {
            self.undrained -= 1;
            applied.drained = self.undrained == 0;
        }
        let closed = self.maybe_close_epoch(ctx);
        Applied { epoch_done: closed.epoch_done, drained: applied.drained || closed.drained }
    }

    fn maybe_close_epoch(&mut self, ctx: &mut Ctx<'_>) -> Applied {
        let Some(flush) = self.closing else { return Applied::default() };
        if self.outstanding > 0 || self.flushing {
            return Applied::default();
        }
        if flush {
            self.flushing = true;
            ctx.local(JobKind::ApplyFlush, IoOp::Flush);
            return Applied::default();
        }
        self.finish_epoch(0, ctx)
    }

    /// The flush of a closing epoch (current link) finished.
    pub fn on_flushed(&mut self, result: Result<(), Errno>, ctx: &mut Ctx<'_>) -> Applied {
        self.flushing = false;
        self.finish_epoch(result.err().map_or(0, |e| e as i32), ctx)
    }

    fn finish_epoch(&mut self, errno: i32, ctx: &mut Ctx<'_>) -> Applied {
        ctx.send(Message::BarrierAck { epoch: self.epoch, errno });
        self.epoch += 1;
        self.closing = None;
        let mut applied = Applied { epoch_done: true, drained: false };
        // Release the next epoch's writes, up to its own barrier.
        while self.closing.is_none() {
            let Some((rx, msg)) = self.held.pop_front() else { break };
            let a = self.apply_now(rx, msg, ctx);
            applied.epoch_done |= a.epoch_done;
            applied.drained |= a.drained;
        }
        applied
    }

    /// Epochs up to this are fully applied.
    pub fn applied_through(&self) -> u64 {
        self.epoch.saturating_sub(1)
    }

    /// Marks the writes received so far: [`Applied::drained`] says when all have
    /// completed (at once if none is pending).
    pub fn mark_drain(&mut self) -> bool {
        let held_writes =
            self.held.iter().filter(|(_, m)| !matches!(m, Message::Barrier { .. })).count() as u64;
        self.drain_mark = Some(self.received);
        self.undrained = self.outstanding + held_writes;
        self.undrained == 0
    }

    pub fn drained(&self) -> bool {
        self.undrained == 0
    }

    pub fn clear_drain(&mut self) {
        self.drain_mark = None;
        self.undrained = 0;
    }

    /// A write on the peer's behalf (applied or resync) was submitted.
    pub fn peer_write_started(&mut self, job: JobId) {
        *self.peer_writes.entry(job.link()).or_default() += 1;
    }

    /// One finished (of any link).
    pub fn peer_write_done(&mut self, job: JobId) {
        if let Some(n) = self.peer_writes.get_mut(&job.link()) {
            *n -= 1;
            if *n == 0 {
                self.peer_writes.remove(&job.link());
            }
        }
    }

    /// Writes on the peer's behalf are in flight (of any link).
    pub fn peer_writes_in_flight(&self) -> bool {
        !self.peer_writes.is_empty()
    }

    /// Writes of an earlier link than `link_gen` are still in flight.
    pub fn stale_writes(&self, link_gen: u32) -> bool {
        self.peer_writes.keys().any(|link| *link != link_gen)
    }
}
