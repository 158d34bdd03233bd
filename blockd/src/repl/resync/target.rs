//! The resync target, a sub-machine of the core that owns its state.
//!
//! Its disk is Inconsistent, durably, before anything is written (the core holds
//! every data-path message until `ready`): a crash mid-resync must never leave a
//! half-copied disk that claims to be consistent. Each chunk is written and
//! acknowledged; a flush the source asks for is answered once done. On
//! `ResyncDone`, once its writes and every replicated write received before it have
//! completed, the final flush; then the core adopts the source's generations and
//! declares the disk UpToDate.

use std::collections::HashMap;

use nix::errno::Errno;

use super::rate::RateCtl;
use crate::peer::msg::Message;
use crate::repl::core::ctx::Ctx;
use crate::repl::job::{JobId, JobKind};
use crate::state::Generations;
use crate::storage::IoOp;

#[derive(Debug, Default)]
pub(in crate::repl) struct Target {
    /// The metadata update marking the disk Inconsistent; resync data waits for it.
    inconsistent_seq: u64,
    ready: bool,
    /// Resync writes in flight: job → (offset, len).
    writes: HashMap<JobId, (u64, u64)>,
    /// Flushes the source asked for: job → the request's id.
    flush_reqs: HashMap<JobId, u64>,
    /// The final flush, once started.
    final_flush: Option<JobId>,
    /// `ResyncDone` came: the generations to adopt.
    done: Option<Generations>,
    received_bytes: u64,
    /// The source's view of the resync (`ResyncInfo`): done and total bytes.
    source_done_bytes: u64,
    source_total_bytes: u64,
}

/// What the core does when a target's job finished.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::repl) enum TargetDone {
    Nothing,
    /// The final flush finished: adopt these generations (or it failed).
    Finished(Result<Generations, Errno>),
}

impl Target {
    /// A target whose Inconsistent state becomes durable with metadata `seq`.
    pub fn new(inconsistent_seq: u64) -> Target {
        Target { inconsistent_seq, ..Target::default() }
    }

    /// Data may be written (the Inconsistent state is durable).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Metadata is durable up to `seq`; true if that made the target ready.
    pub fn on_durable(&mut self, seq: u64) -> bool {
        if self.ready || seq < self.inconsistent_seq {
            return false;
        }
        self.ready = true;
        true
    }

    /// Resync data or zeroes: written; the returned job counts as a write on the
    /// peer's behalf.
    pub fn on_data(&mut self, msg: Message, ctx: &mut Ctx<'_>) -> Option<JobId> {
        let (offset, len, op) = match msg {
            Message::ResyncData { offset, data } => {
                let len = data.len() as u64;
                (offset, len, IoOp::Write { offset, buf: data, fua: false })
            }
            Message::ResyncZeroes { offset, len } => {
                (offset, len, IoOp::WriteZeroes { offset, len, may_trim: true, fast_only: false, fua: false })
            }
            _ => return None,
        };
        self.received_bytes += len;
        let job = ctx.local(JobKind::ResyncWrite, op);
        self.writes.insert(job, (offset, len));
        Some(job)
    }

    /// `ResyncDone`: the generations to adopt once everything is durable.
    pub fn on_done_msg(&mut self, gens: Generations) {
        self.done = Some(gens);
    }

    /// A resync write finished: acknowledged to the source.
    pub fn on_write_done(&mut self, job: JobId, result: Result<(), Errno>, ctx: &mut Ctx<'_>) {
        let Some((offset, len)) = self.writes.remove(&job) else { return };
        let errno = result.err().map_or(0, |e| e as i32);
        ctx.send(Message::ResyncAck { offset, len, errno });
    }

    /// The source asks for a flush of what was acknowledged.
    pub fn on_flush_req(&mut self, id: u64, ctx: &mut Ctx<'_>) {
        let job = ctx.local(JobKind::ResyncFlush, IoOp::Flush);
        self.flush_reqs.insert(job, id);
    }

    /// After `ResyncDone`, once its writes (and, `drained`, every replicated write
    /// received before it) completed: the final flush.
    pub fn maybe_final_flush(&mut self, drained: bool, ctx: &mut Ctx<'_>) {
        if self.done.is_none() || !self.writes.is_empty() || !drained || self.final_flush.is_some() {
            return;
        }
        self.final_flush = Some(ctx.local(JobKind::ResyncFlush, IoOp::Flush));
    }

    /// A flush of this target's finished.
    pub fn on_flush_done(&mut self, job: JobId, result: Result<(), Errno>, ctx: &mut Ctx<'_>) -> TargetDone {
        if let Some(id) = self.flush_reqs.remove(&job) {
            match result {
                Ok(()) => ctx.send(Message::ResyncFlushed { id }),
                // Unanswered: the source keeps the bits (fail closed).
                Err(e) => tracing::error!(errno = %e, "flush for the sync source failed"),
            }
            return TargetDone::Nothing;
        }
        if self.final_flush != Some(job) {
            return TargetDone::Nothing;
        }
        let gens = self.done.expect("the final flush only after ResyncDone");
        TargetDone::Finished(result.map(|()| gens))
    }

    /// The source's progress (status, events, the measured rate and ETA).
    pub fn on_info(&mut self, done_bytes: u64, total_bytes: u64, rate: &mut RateCtl) {
        rate.progressed(done_bytes.saturating_sub(self.source_done_bytes));
        self.source_done_bytes = done_bytes;
        self.source_total_bytes = total_bytes;
    }

    /// (done, total) bytes as the source reported them.
    pub fn progress(&self) -> (u64, u64) {
        (self.source_done_bytes, self.source_total_bytes)
    }

    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }
}
