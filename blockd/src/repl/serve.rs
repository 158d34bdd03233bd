//! Reads served for a Primary without a disk, a sub-machine of the core that owns
//! its state: the peer's `ReadReq`s wait until the epoch they name is applied here
//! (so a write acknowledged before the read was asked is seen, even one the
//! Primary acknowledged under protocol A or B before its disk failed), then the
//! range is read and sent back in `ReadData` (or an errno).
//!
//! Bounded: at most [`MAX_READ_BYTES`] of requests held or being read; beyond that
//! a request is answered `EBUSY` at once (the Primary's clients are bounded by their
//! own in-flight budget, so only a misbehaving peer gets there).

use std::collections::HashMap;

use nbd_server::buf::{BufMut, BufPool, MAX_BUF_BYTES};
use nix::errno::Errno;

use crate::peer::msg::Message;
use crate::repl::core::ctx::Ctx;
use crate::repl::job::{JobId, JobKind};
use crate::storage::IoOp;

/// Bytes of reads held or in flight for the peer, at most.
pub(super) const MAX_READ_BYTES: u64 = 256 << 20;

/// A `ReadReq` from the peer.
#[derive(Debug)]
pub(super) struct ReadReq {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    /// Served once this epoch is applied here.
    pub after_epoch: u64,
}

#[derive(Debug, Default)]
pub(super) struct ReadServer {
    held: Vec<ReadReq>,
    /// Reads on the disk: job → the peer's id for it.
    reading: HashMap<JobId, (u64, u64)>,
    bytes: u64,
}

impl ReadServer {
    /// A request from the peer; `applied_through`: epochs complete here.
    pub fn on_request(&mut self, req: ReadReq, applied_through: u64, pool: &BufPool, ctx: &mut Ctx<'_>) {
        let ReadReq { id, offset, len, .. } = req;
        if len == 0 || len > MAX_BUF_BYTES as u64 || self.bytes + len > MAX_READ_BYTES {
            tracing::warn!(offset, len, held_bytes = self.bytes, "read request from the peer refused");
            let errno = if len == 0 || len > MAX_BUF_BYTES as u64 { Errno::EINVAL } else { Errno::EBUSY };
            return ctx.send(Message::ReadData {
                id,
                errno: errno as i32,
                data: BufMut::unpooled(0).freeze(),
            });
        }
        self.bytes += len;
        self.held.push(req);
        self.release(applied_through, pool, ctx);
    }

    /// Starts the held requests whose epoch is applied.
    pub fn release(&mut self, applied_through: u64, pool: &BufPool, ctx: &mut Ctx<'_>) {
        if self.held.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].after_epoch > applied_through {
                i += 1;
                continue;
            }
            let r = self.held.swap_remove(i);
            let job =
                ctx.local(JobKind::PeerRead, IoOp::Read { offset: r.offset, buf: pool.get(r.len as usize) });
            self.reading.insert(job, (r.id, r.len));
        }
    }

    /// A read of the current link finished: answer the peer. An error is the
    /// core's to act on too (it detaches the disk).
    pub fn on_read(&mut self, job: JobId, result: Result<(), Errno>, buf: Option<BufMut>, ctx: &mut Ctx<'_>) {
        let Some((id, len)) = self.reading.remove(&job) else { return };
        self.bytes -= len;
        let (errno, data) = match (result, buf) {
            (Ok(()), Some(data)) => (0, data.freeze()),
            (Ok(()), None) => (Errno::EIO as i32, BufMut::unpooled(0).freeze()),
            (Err(e), _) => (e as i32, BufMut::unpooled(0).freeze()),
        };
        ctx.send(Message::ReadData { id, errno, data });
    }

    /// The link is gone: nobody waits for the answers.
    pub fn link_lost(&mut self) {
        self.held.clear();
        self.reading.clear();
        self.bytes = 0;
    }
}
