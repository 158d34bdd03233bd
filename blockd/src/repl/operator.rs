//! Operator requests that change what is in sync, as part of the [`Core`] (a child
//! module): `invalidate`, `invalidate-remote`, `pause-sync` / `resume-sync`. Each
//! either acts (returning actions) or refuses with a reason that says what to do.

use super::*;
use crate::repl::decide::SyncScope;

impl Core {
    /// `blockctl invalidate`: this node's data is discarded and copied in full from
    /// the peer. Connected: the peer starts the resync at once (`Invalidate`).
    /// Disconnected: the disk becomes Inconsistent (durably), so the next connect
    /// makes it the target of a full sync.
    pub(super) fn invalidate(&mut self, out: &mut Vec<Action>) -> Result<(), String> {
        if self.role == Role::Primary {
            return Err("this node is Primary: its data is what clients see; demote it first \
                        (`blockctl secondary`), or use `invalidate-remote` on this node to resync the peer"
                .into());
        }
        if self.source.is_some() || self.target.is_some() {
            return Err(format!("a resync is running ({}); retry when it is done", self.repl.as_str()));
        }
        if let Some(why) = self.peer_diskless() {
            return Err(format!("{why}: it cannot be the source of a resync"));
        }
        if self.detached() {
            return Err(format!(
                "the local disk is {}: attach a disk first (`blockctl attach-disk`)",
                self.disk
            ));
        }
        if self.link == Link::Replicating {
            tracing::info!("invalidate: asking the peer for a full resync");
            self.send(Message::Invalidate, out);
        } else {
            tracing::info!("invalidate while disconnected: the disk is Inconsistent until the next resync");
            self.disk = DiskState::Inconsistent;
            self.persist(out);
        }
        Ok(())
    }

    /// `blockctl invalidate-remote`: the peer's data is discarded and copied in full
    /// from this node. Needs the link, an UpToDate disk here, and a peer that is not
    /// Primary (a Primary is never a sync target).
    pub(super) fn invalidate_remote(&mut self, out: &mut Vec<Action>) -> Result<(), String> {
        if self.link != Link::Replicating {
            return Err("not connected to the peer; `connect` first".into());
        }
        if self.peer_role == Some(Role::Primary) {
            return Err("the peer is Primary; demote it first (`blockctl secondary` there)".into());
        }
        if let Some(why) = self.peer_diskless() {
            return Err(format!("{why}: nothing can be written there"));
        }
        if self.disk != DiskState::UpToDate {
            return Err(format!("the local disk is {}; only an UpToDate node can be the source", self.disk));
        }
        if self.source.is_some() || self.target.is_some() {
            return Err(format!("a resync is running ({}); retry when it is done", self.repl.as_str()));
        }
        self.start_full_repair(out);
        Ok(())
    }

    /// The peer ran `invalidate`: resync it in full if this node can be the source.
    pub(super) fn on_invalidate(&mut self, out: &mut Vec<Action>) {
        if self.disk != DiskState::UpToDate
            || self.source.is_some()
            || self.target.is_some()
            || self.peer_diskless().is_some()
        {
            tracing::warn!(disk = %self.disk, "the peer asked for a full resync but this node cannot be its source now");
            return;
        }
        tracing::info!("the peer invalidated its data: full resync as source");
        self.start_full_repair(out);
    }

    fn start_full_repair(&mut self, out: &mut Vec<Action>) {
        self.bitmap.set_all();
        let bytes = self.bitmap.dirty_bytes();
        self.send(Message::StartRepair { bytes }, out);
        self.start_source(SyncScope::Bitmap, false, out);
    }

    /// `blockctl pause-sync` (`paused`) / `resume-sync`: holds resync (this one and
    /// later ones) until resumed on the same node. The peer is told, so a pause on the
    /// target holds the source too.
    pub(super) fn set_sync_paused(&mut self, paused: bool, out: &mut Vec<Action>) {
        if self.sync_paused_here == paused {
            return;
        }
        self.sync_paused_here = paused;
        tracing::info!(paused, "resync pause set by the operator");
        if self.link == Link::Replicating {
            self.send(Message::SyncPause { paused }, out);
        }
        if !paused {
            self.pump_source(out);
        }
    }

    pub(super) fn on_sync_pause(&mut self, paused: bool, out: &mut Vec<Action>) {
        self.sync_paused_by_peer = paused;
        if !paused {
            self.pump_source(out);
        }
    }

    /// Resync is held by a pause on either node.
    pub fn sync_paused(&self) -> bool {
        self.sync_paused_here || self.sync_paused_by_peer
    }
}
