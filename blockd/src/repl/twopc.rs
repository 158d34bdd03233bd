//! State changes agreed with the peer, as part of the [`Core`] (a child module):
//! DRBD's cluster-wide state change, a two-phase exchange.
//!
//! A node that wants to become Primary while connected sends `StatePrepare { tid }`
//! and waits. The peer votes (`StateReply`): yes only if it is Secondary, not
//! syncing from the requester, and not already bound to another change; a yes binds
//! it: it will not become Primary itself until `StateCommit` or `StateAbort` comes
//! or the link goes. On yes the requester commits (becomes Primary, sends
//! `StateCommit`); on no it gives up with the peer's reason. So two connected nodes
//! are never both Primary: each promotion needs the other's vote, and a node that
//! voted yes is bound.
//!
//! Two requests at once: the lower `tid` wins. The node holding the higher one
//! drops its own request (its operator is told the peer's promotion went first) and
//! votes on the other; the node holding the lower one votes no on the other.
//!
//! Toward N peers and majority quorum: the requester sends the prepare to every
//! peer and commits once every connected peer (with quorum: a majority of the
//! members, counting itself) voted yes; any no, a timeout, or a lost link aborts
//! it. The messages already carry everything but the set of voters.

use super::*;
use crate::peer::msg::StateChange;

/// Ticks (100 ms) a prepared change may wait for the peer's vote.
const VOTE_TICKS: u32 = 100;

/// This node's own request, waiting for the vote.
#[derive(Debug)]
pub(super) struct OwnRequest {
    tid: u64,
    change: StateChange,
    cmd: CmdId,
    ticks: u32,
}

/// The exchange's state on this node.
#[derive(Debug, Default)]
pub(super) struct TwoPhase {
    own: Option<OwnRequest>,
    /// The peer's change this node voted yes to: bound until commit, abort or link
    /// loss.
    bound_to: Option<u64>,
}

impl Core {
    /// `primary` while connected: ask the peer first.
    pub(super) fn request_promotion(
        &mut self,
        id: CmdId,
        force: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        if self.twophase.bound_to.is_some() {
            return Err("the peer is being promoted (this node agreed to it); retry once that is done".into());
        }
        if self.twophase.own.is_some() {
            return Err("a promotion of this node is already in progress".into());
        }
        let tid = self.fresh_id();
        let change = StateChange::Promote { force };
        self.twophase.own = Some(OwnRequest { tid, change, cmd: id, ticks: 0 });
        self.send(Message::StatePrepare { tid, change }, out);
        Ok(())
    }

    /// The peer asks for a change: vote.
    pub(super) fn on_state_prepare(&mut self, tid: u64, change: StateChange, out: &mut Vec<Action>) {
        let vote = self.vote(tid, change, out);
        if vote.is_ok() {
            self.twophase.bound_to = Some(tid);
        }
        let (yes, reason) = match vote {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        tracing::info!(tid, ?change, yes, %reason, "vote on the peer's state change");
        self.send(Message::StateReply { tid, yes, reason }, out);
    }

    fn vote(&mut self, tid: u64, change: StateChange, out: &mut Vec<Action>) -> Result<(), String> {
        let StateChange::Promote { .. } = change;
        if self.role == Role::Primary {
            return Err("the peer is Primary".into());
        }
        if self.twophase.bound_to.is_some() {
            return Err("another state change is in progress on the peer".into());
        }
        if self.source.is_some() {
            return Err("the peer is syncing from this node; its data is not complete".into());
        }
        if let Some(own) = &self.twophase.own {
            if own.tid < tid {
                return Err("the peer is being promoted concurrently and its request goes first".into());
            }
            // The peer's request goes first: this node's own one is dropped.
            let own = self.twophase.own.take().expect("checked");
            let reason = "the peer's concurrent promotion went first".to_string();
            tracing::info!(tid = own.tid, "own promotion request dropped: the peer's goes first");
            out.push(Action::Done { id: own.cmd, result: Err(reason) });
        }
        Ok(())
    }

    /// The peer's vote on this node's request.
    pub(super) fn on_state_reply(&mut self, tid: u64, yes: bool, reason: String, out: &mut Vec<Action>) {
        if self.twophase.own.as_ref().is_none_or(|own| own.tid != tid) {
            // A request dropped meanwhile (the peer's went first, or it timed out).
            return;
        }
        let own = self.twophase.own.take().expect("checked");
        if !yes {
            out.push(Action::Done { id: own.cmd, result: Err(format!("the peer refused: {reason}")) });
            return;
        }
        let StateChange::Promote { force } = own.change;
        self.send(Message::StateCommit { tid }, out);
        // The peer is bound until it sees the commit: no one else can be Primary.
        let first_new = out.len();
        match self.promote_now(force, out) {
            Ok(()) => self.reply_when_durable(own.cmd, out, first_new),
            Err(e) => out.push(Action::Done { id: own.cmd, result: Err(e) }),
        }
    }

    pub(super) fn on_state_commit(&mut self, tid: u64) {
        if self.twophase.bound_to == Some(tid) {
            self.twophase.bound_to = None;
            // The peer's `State` follows; its role is known now.
            self.peer_role = Some(Role::Primary);
        }
    }

    pub(super) fn on_state_abort(&mut self, tid: u64) {
        if self.twophase.bound_to == Some(tid) {
            self.twophase.bound_to = None;
        }
    }

    /// The link went: any exchange in progress is off.
    pub(super) fn twophase_link_lost(&mut self, out: &mut Vec<Action>) {
        self.twophase.bound_to = None;
        if let Some(own) = self.twophase.own.take() {
            let reason = "the link to the peer was lost during the promotion; retry".to_string();
            out.push(Action::Done { id: own.cmd, result: Err(reason) });
        }
    }

    /// A tick: a request the peer does not answer is given up.
    pub(super) fn twophase_tick(&mut self, out: &mut Vec<Action>) {
        let Some(own) = self.twophase.own.as_mut() else { return };
        own.ticks += 1;
        if own.ticks >= VOTE_TICKS {
            let own = self.twophase.own.take().expect("checked");
            self.send(Message::StateAbort { tid: own.tid }, out);
            let reason = "the peer did not answer the promotion request in time".to_string();
            out.push(Action::Done { id: own.cmd, result: Err(reason) });
        }
    }
}
