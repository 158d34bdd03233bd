//! Pull-ahead (protocol A with `on-congestion = "pull-ahead"`), as part of the
//! [`Core`] (a child module).
//!
//! When more than `congestion-fill` bytes are queued for the peer, the Primary goes
//! **Ahead**: it closes the open epoch with a flush barrier (the peer's image is
//! then the prefix up to it), tells the peer (`Ahead`), starts a new generation
//! (as for a lost peer: durable before any write is acknowledged without the
//! peer), and from then on ships no writes: they are recorded in the bitmap
//! (`replicating_data` is false). The peer is **Behind**: it records its disk
//! Outdated, so it is promoted only with `--force` and a reconnect after any
//! crash resyncs it by generation (bitmap), never as if it were current.
//!
//! When the queue has drained to half the fill, a bitmap resync catches the peer
//! up (`StartRepair`, the same path as `verify --repair`), and replication of new
//! writes continues with it. If the Primary goes Ahead again while that resync
//! runs, new writes go to the bitmap behind the resync's cursor and the resync
//! makes another pass: the resync is never stopped and restarted, so it cannot
//! loop between Ahead and a paused sync (DRBD's LINBIT/drbd#46).
//!
//! A resync chunk read while Ahead holds writes that were never shipped; so no
//! chunk is read until the peer acknowledged the barrier that closed the last
//! shipped epoch (every shipped write is then applied there): otherwise an older
//! shipped write still queued on the peer could land after the chunk and undo
//! them. After the pull-ahead, shipped writes are newer than any chunk holding
//! the same block, so the order they land in does not matter.
//!
//! Why acknowledged writes stay safe: an Ahead write is a write with the peer
//! lost (`ARCHITECTURE.md`, "Acknowledgements"): the activity log covers it
//! locally and its bits are set before the next bitmap write; the peer's part is
//! the bitmap under a durable new generation. Protocol A promises nothing more.

use super::primary::PeerPart;
use super::*;
use crate::repl::decide::SyncScope;

impl Core {
    /// After a frame is queued: too much queued for the peer → Ahead.
    pub(super) fn check_congestion(&mut self, out: &mut Vec<Action>) {
        let Some(fill) = self.cfg.pull_ahead_fill_bytes else { return };
        if self.ahead || self.role != Role::Primary || !self.replicating_data() || self.unsent_bytes() <= fill
        {
            return;
        }
        let queued_bytes = self.unsent_bytes();
        tracing::warn!(queued_bytes, fill, "congestion: pulling ahead of the peer (writes go to the bitmap)");
        self.ahead_barrier = Some(self.close_epoch(true, out));
        self.send(Message::Ahead { queued_bytes }, out);
        self.ahead = true;
        self.ahead_count += 1;
        if self.gens.bitmap == 0 {
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.gens_pending = true;
            self.persist(out);
        }
        // Nothing more is queued while Ahead, so the writers waiting for the send
        // buffer need not: the buffer's bound on memory holds.
        for job in std::mem::take(&mut self.send_waiters) {
            if let Some(w) = self.writes.get_mut(&job)
                && matches!(w.peer, PeerPart::Queued { .. })
            {
                w.peer = PeerPart::Done;
                self.try_finish_write(job, out);
            }
        }
    }

    /// After the socket took bytes, or on a tick: drained → catch the peer up.
    pub(super) fn check_drained(&mut self, out: &mut Vec<Action>) {
        let Some(fill) = self.cfg.pull_ahead_fill_bytes else { return };
        if !self.ahead || self.unsent_bytes() > fill / 2 {
            return;
        }
        self.ahead = false;
        if self.link != Link::Replicating {
            return;
        }
        if self.source.is_some() {
            // The running resync covers what was recorded meanwhile (another pass).
            tracing::info!("congestion over: shipping writes again; the resync continues");
            return;
        }
        let bytes = self.bitmap.dirty_bytes();
        tracing::info!(bytes, "congestion over: catching the peer up (bitmap resync)");
        self.send(Message::StartRepair { bytes }, out);
        self.start_source(SyncScope::Bitmap, false, out);
    }

    /// The peer pulled ahead: this node is Behind, Outdated until a resync.
    pub(super) fn on_peer_ahead(&mut self, queued_bytes: u64, out: &mut Vec<Action>) {
        if self.role != Role::Secondary || self.detached() {
            tracing::warn!(
                queued_bytes,
                "Ahead from the peer ignored: this node is not a Secondary with a disk"
            );
            return;
        }
        if self.target.is_some() {
            // Already a sync target (Inconsistent): the running resync takes
            // another pass over what the peer records meanwhile.
            tracing::info!(queued_bytes, "the peer pulled ahead during the resync; it continues");
            return;
        }
        tracing::warn!(
            queued_bytes,
            "the peer pulled ahead: this node is Behind (Outdated until it catches up)"
        );
        self.behind = true;
        if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
            self.disk = DiskState::Outdated;
            self.persist(out);
            self.announce_state(out);
        }
    }

    /// The peer acknowledged barrier `epoch`: once the barrier that closed the
    /// last shipped epoch is acknowledged, every write shipped before is applied
    /// there and resync chunks may go again.
    pub(super) fn ahead_barrier_acked(&mut self, epoch: u64, out: &mut Vec<Action>) {
        if self.ahead_barrier.is_some_and(|e| e <= epoch) {
            self.ahead_barrier = None;
            self.pump_source(out);
        }
    }

    /// No resync chunk is read while writes shipped before the pull-ahead may
    /// still be on their way to the peer's disk: a chunk carries the writes made
    /// while Ahead (never shipped), and an older shipped write of the same block
    /// landing after it there would undo them (found by the simulator, seed 841).
    pub(super) fn chunks_wait_for_ahead_barrier(&self) -> bool {
        self.ahead_barrier.is_some()
    }

    /// Ahead/Behind as status and events show them (over Established/SyncSource).
    pub(super) fn congestion_state(&self) -> Option<ReplState> {
        if self.ahead && self.link == Link::Replicating {
            Some(ReplState::Ahead)
        } else if self.behind && self.repl == ReplState::Established {
            Some(ReplState::Behind)
        } else {
            None
        }
    }

    /// Times this node pulled ahead of its peer since start.
    pub fn ahead_count(&self) -> u64 {
        self.ahead_count
    }
}
