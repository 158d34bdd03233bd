//! Connecting, as part of the [`Core`] (a child module): once a link is up, each
//! side sends its state as it is *now* (`ConnectState`: generations, role, disk,
//! flags) and decides from the pair of them with [`decide`] — both sides see the
//! same two states, and `decide` is symmetric, so they reach mirror decisions. A
//! snapshot taken earlier (the handshake's `Hello`) could be stale: a role change
//! between the Hello and the link's acceptance gave the two sides different
//! decisions (one waiting as source for a bitmap that never came, the other in
//! sync).
//!
//! Between sending its state and deciding, a node changes nothing the decision
//! depends on: operator commands that change role, disk or generations wait
//! (`deferred`) and run after the decision. A Primary keeps serving writes; not
//! replicating yet, they are recorded in its bitmap (it always has a generation of
//! its own then, so they are resynced; if the decision is nevertheless "in sync",
//! a repair resync sends them).

use super::*;
use crate::repl::decide::{Decision, Refusal, SideState, SyncScope, decide};

/// `ConnectState.flags` bit: the sender crashed while Primary and was not resynced
/// since.
pub const STATE_CRASHED_PRIMARY: u32 = 1 << 0;
/// `ConnectState.flags` bit: the sender's bitmap has bits set.
pub const STATE_DIRTY: u32 = 1 << 1;
/// `ConnectState.flags` bit: `connect --discard-my-data` was given on the sender.
pub const STATE_DISCARD_MY_DATA: u32 = 1 << 2;

/// Ticks (100 ms) a link may stay undecided before it is dropped.
const NEGOTIATION_TICKS: u32 = 50;

/// A link that is up but not decided yet.
#[derive(Debug)]
pub(super) struct Negotiation {
    /// What this node sent (the decision uses it, not the state now).
    sent: SideState,
    ticks: u32,
    /// Commands that wait for the decision.
    pub(super) deferred: VecDeque<(CmdId, Command)>,
}

impl Core {
    /// A link is up: tell the peer this node's state and wait for the peer's.
    pub(super) fn on_link_up(&mut self, out: &mut Vec<Action>) {
        if self.standalone {
            out.push(Action::DropLink { reason: "the peer is StandAlone".into() });
            return;
        }
        if self.rolling_back() {
            out.push(Action::DropLink { reason: "the peer is rolling back to its fallback image".into() });
            return;
        }
        let sent = self.own_state(self.cfg.name_sorts_first);
        let flags = flag(sent.crashed_primary, STATE_CRASHED_PRIMARY)
            | flag(sent.dirty, STATE_DIRTY)
            | flag(sent.discard_my_data, STATE_DISCARD_MY_DATA);
        // Counted from now: the peer's answer comes on this link.
        self.link = Link::Negotiating;
        self.queued_bytes_total = self.sent_bytes_total;
        self.send(Message::ConnectState { gens: sent.gens, role: sent.role, disk: sent.disk, flags }, out);
        self.negotiation = Some(Negotiation { sent, ticks: 0, deferred: VecDeque::new() });
    }

    /// The peer's state: decide.
    pub(super) fn on_connect_state(
        &mut self,
        gens: Generations,
        role: Role,
        disk: DiskState,
        flags: u32,
        out: &mut Vec<Action>,
    ) {
        let Some(negotiation) = self.negotiation.take() else {
            tracing::warn!("connect state from the peer while not negotiating; ignored");
            return;
        };
        let remote = SideState {
            gens,
            disk,
            role,
            crashed_primary: flags & STATE_CRASHED_PRIMARY != 0,
            dirty: flags & STATE_DIRTY != 0,
            discard_my_data: flags & STATE_DISCARD_MY_DATA != 0,
            lower_name: !self.cfg.name_sorts_first,
        };
        self.peer_role = Some(role);
        self.peer_disk = Some(disk);
        match self.decide_with(&negotiation.sent, remote, out) {
            Ok(()) => {
                tracing::info!(state = self.repl.as_str(), "connected to the peer");
                self.conn = ConnState::Connected;
                self.refusal = None;
            }
            Err(refusal) => {
                tracing::warn!(reason = %refusal.reason, "not replicating");
                self.link = Link::Disconnected;
                self.peer_role = None;
                self.peer_disk = None;
                self.conn = ConnState::StandAlone;
                self.refusal = Some(refusal.reason);
                if refusal.standalone {
                    self.set_standalone(true, out);
                }
                out.push(Action::DropLink { reason: "not replicating".into() });
            }
        }
        for (id, cmd) in negotiation.deferred {
            self.on_command(id, cmd, out);
        }
    }

    /// Acts on the decision for `me` (as sent) and `remote`.
    fn decide_with(
        &mut self,
        me: &SideState,
        remote: SideState,
        out: &mut Vec<Action>,
    ) -> Result<(), ConnectRefusal> {
        let decision = decide(me, &remote);
        if self.disk == DiskState::Consistent
            && matches!(decision, Decision::InSync | Decision::SyncSource(_))
        {
            // Heard from the peer: nothing newer there (in sync), or this node's
            // data is the reference (source). A target becomes UpToDate at the end.
            tracing::info!("the peer is heard: the disk is UpToDate again");
            self.disk = DiskState::UpToDate;
            self.persist(out);
        }
        match decision {
            Decision::InSync => {
                self.start_link();
                self.repl = ReplState::Established;
                if self.role == Role::Primary && self.bitmap.count_bits() > 0 {
                    // Writes while the link was being set up: the peer lacks them.
                    tracing::warn!(
                        bytes = self.bitmap.dirty_bytes(),
                        "in sync but written meanwhile: repair resync"
                    );
                    let bytes = self.bitmap.dirty_bytes();
                    self.start_repair(bytes, out);
                }
            }
            Decision::SyncSource(scope) => {
                self.start_link();
                self.start_source(scope, scope == SyncScope::Bitmap, out);
            }
            Decision::SyncTarget(scope) => {
                self.start_link();
                if scope == SyncScope::Bitmap {
                    self.send_bitmap(out);
                }
                self.start_target(out);
            }
            Decision::Diskless => {
                self.start_link();
                self.repl = ReplState::Established;
                if remote.role == Role::Primary && self.role == Role::Secondary {
                    self.track_for_diskless_primary(out);
                }
            }
            Decision::WaitForPromotion => {
                let reason = "both disks are Inconsistent; promote one with `blockctl primary --force`";
                return Err(ConnectRefusal { reason: reason.into(), standalone: false });
            }
            Decision::Refuse(r) => {
                // As DRBD: after a split brain or with unrelated data the node stops
                // trying until an operator says `blockctl connect`.
                let standalone = matches!(r, Refusal::SplitBrain | Refusal::UnrelatedData);
                return Err(ConnectRefusal { reason: r.to_string(), standalone });
            }
        }
        // `--discard-my-data` holds for one connection.
        self.discard_my_data = false;
        if self.sync_paused_here {
            self.send(Message::SyncPause { paused: true }, out);
        }
        // A role or disk change since the state was sent is news to the peer.
        self.announce_state(out);
        Ok(())
    }

    /// A tick while negotiating: a peer that never answers is dropped.
    pub(super) fn negotiation_tick(&mut self, out: &mut Vec<Action>) {
        let Some(n) = self.negotiation.as_mut() else { return };
        n.ticks += 1;
        if n.ticks >= NEGOTIATION_TICKS {
            tracing::warn!("the peer did not send its state; dropping the link");
            self.abort_negotiation(out);
            out.push(Action::DropLink { reason: "no connect state received".into() });
        }
    }

    /// The link went before a decision: deferred commands run now (disconnected).
    pub(super) fn abort_negotiation(&mut self, out: &mut Vec<Action>) {
        let Some(n) = self.negotiation.take() else { return };
        self.link = Link::Disconnected;
        for (id, cmd) in n.deferred {
            self.on_command(id, cmd, out);
        }
    }

    /// Whether `cmd` must wait for the connect decision.
    pub(super) fn defer_while_negotiating(&mut self, id: CmdId, cmd: &Command) -> bool {
        let Some(n) = self.negotiation.as_mut() else { return false };
        let changes_state = matches!(
            cmd,
            Command::Promote { .. } | Command::Demote | Command::Invalidate | Command::InvalidateRemote
        );
        if changes_state {
            n.deferred.push_back((id, cmd.clone()));
        }
        changes_state
    }
}

impl Core {
    /// The link is decided: replication starts (epochs of a link count from 1).
    pub(super) fn start_link(&mut self) {
        // A pause on the peer ended with its link; one here is told again (connect).
        self.sync_paused_by_peer = false;
        self.link = Link::Replicating;
        self.epoch = 1;
        self.epoch_acked = false;
        self.epoch_writes = 0;
        // Completions of the previous link's jobs are recognised by this (their
        // writes still count, under their link, until they land).
        self.link_gen = (self.link_gen + 1) & ((1 << 24) - 1);
        self.applier.start_link(self.cfg.bugs.accept_stale_completion);
        // A diskless peer Primary needs every write acknowledged when written.
        self.applier.ack_every_write(!self.peer_takes_writes());
    }

    /// This node's state as it announces it to a peer (`lower_name`: its name sorts
    /// before the peer's).
    pub fn own_state(&self, lower_name: bool) -> SideState {
        SideState {
            gens: self.gens,
            disk: self.disk,
            role: self.role,
            crashed_primary: self.crashed_primary,
            dirty: self.bitmap.count_bits() > 0,
            discard_my_data: self.discard_my_data,
            lower_name,
        }
    }
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}
