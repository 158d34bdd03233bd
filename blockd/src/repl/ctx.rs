//! What a sub-machine of the core may touch while it handles an event: where its
//! actions go (peer sends counted against the send buffer), the ids of the jobs it
//! starts (typed by owner, on the current link), and the fixed settings. The core
//! lends one for each call ([`ctx!`]), from fields disjoint from the sub-machine's
//! own, so each sub-machine owns its state and reaches nothing else.

use crate::peer::msg::Message;
use crate::repl::core::{Action, CoreConfig};
use crate::repl::job::{JobId, JobIds, JobKind};
use crate::storage::IoOp;

pub(crate) struct Ctx<'a> {
    pub out: &'a mut Vec<Action>,
    /// Frame bytes ever queued for the peer (the protocol A send buffer counts them).
    queued_bytes: &'a mut u64,
    ids: &'a mut JobIds,
    /// The current link's generation (link-bound job ids carry it).
    pub link_gen: u32,
    pub cfg: &'a CoreConfig,
}

impl<'a> Ctx<'a> {
    pub fn new(
        out: &'a mut Vec<Action>,
        queued_bytes: &'a mut u64,
        ids: &'a mut JobIds,
        link_gen: u32,
        cfg: &'a CoreConfig,
    ) -> Ctx<'a> {
        Ctx { out, queued_bytes, ids, link_gen, cfg }
    }

    /// Queues `msg` for the peer.
    pub fn send(&mut self, msg: Message) {
        *self.queued_bytes += msg.wire_len();
        self.out.push(Action::Send(msg));
    }

    /// A new job id of `kind` on the current link.
    pub fn job(&mut self, kind: JobKind) -> JobId {
        self.ids.next(kind, self.link_gen)
    }

    /// Submits `op` to the local disk as a new job of `kind`; returns its id.
    pub fn local(&mut self, kind: JobKind, op: IoOp) -> JobId {
        let job = self.job(kind);
        self.out.push(Action::Local { job, op });
        job
    }
}

/// A [`Ctx`] from the core's fields (disjoint from any sub-machine's).
macro_rules! ctx {
    ($core:expr, $out:expr) => {
        $crate::repl::core::ctx::Ctx::new(
            $out,
            &mut $core.queued_bytes_total,
            &mut $core.ids,
            $core.link_gen,
            &$core.cfg,
        )
    };
}
pub(crate) use ctx;
