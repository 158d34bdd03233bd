//! A sync target's fallback image (issue 15 item 4), as the core sees it; a
//! child module of [`Core`]. The undo journal itself is the shell's
//! (`crate::undo`, `repl::shell`).
//!
//! A bitmap resync copies blocks in bitmap order, not in the order they were
//! written, so its target is not crash-consistent until it ends. Before the first
//! resync write lands on a target whose image was consistent (UpToDate, Outdated
//! or Consistent), the core asks for an undo journal (`CatchUpBegin`): from then
//! on every write on this disk first saves the old contents of what it overwrites,
//! durably. If the source is lost for good, `primary --force` first rolls the disk
//! back to that image (`RollBack`), which is a consistent prefix of the old
//! Primary's writes, and promotes it as any forced promotion does (a generation
//! of its own). The restored ranges are set in the bitmap: the old Primary may
//! believe this node holds writes the rollback removed.
//!
//! A journal that fills up (`undo-size`) or fails is dropped (`FallbackLost`): the
//! catch-up goes on in place, as DRBD's does, and status says there is no
//! fallback. After a split brain resolved with `connect --discard-my-data`, the
//! journal holds this node's discarded blocks and is kept.

use super::*;

impl Core {
    /// At the start of a sync target, before its Inconsistent state is persisted.
    pub(super) fn begin_catch_up(&mut self, out: &mut Vec<Action>) {
        if matches!(self.disk, DiskState::UpToDate | DiskState::Outdated | DiskState::Consistent) {
            out.push(Action::CatchUpBegin { discarded: self.discard_my_data });
            self.fallback = true;
            self.fallback_lost = None;
        }
        // Inconsistent already: a journal of the interrupted catch-up (if it is
        // still there) keeps holding the older image; nothing to begin.
    }

    /// The target is UpToDate (its persist is queued): the journal may go once
    /// that is durable.
    pub(super) fn end_catch_up(&mut self, out: &mut Vec<Action>) {
        self.fallback = false;
        out.push(Action::CatchUpEnd { after_seq: self.last_persist_seq });
    }

    /// The replicated device's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.cfg.size_bytes
    }

    /// Whether a consistent image from before the running catch-up exists (status).
    pub fn fallback(&self) -> bool {
        self.fallback
    }

    /// Why the fallback of the running (or last) catch-up was dropped.
    pub fn fallback_lost(&self) -> Option<&str> {
        self.fallback_lost.as_deref()
    }

    /// At start: an undo journal of an interrupted catch-up was found and read.
    pub fn set_fallback(&mut self, available: bool) {
        self.fallback = available;
    }

    pub(super) fn on_fallback_lost(&mut self, reason: String) {
        tracing::warn!(%reason, "the catch-up's fallback image is gone; the resync continues in place");
        self.fallback = false;
        self.fallback_lost = Some(reason);
    }

    /// `primary --force` on an Inconsistent disk with a fallback, disconnected:
    /// roll back first. `Some` if it did (the command is answered later).
    pub(super) fn roll_back_for_promotion(&mut self, id: CmdId, force: bool, out: &mut Vec<Action>) -> bool {
        if !force || !self.fallback || self.disk != DiskState::Inconsistent || self.link != Link::Disconnected
        {
            return false;
        }
        if self.rollback_cmd.is_some() {
            out.push(Action::Done { id, result: Err("a rollback to the fallback image is running".into()) });
            return true;
        }
        tracing::warn!("primary --force on a sync target: rolling back to the image from before the resync");
        self.rollback_cmd = Some(id);
        out.push(Action::RollBack);
        true
    }

    /// No link is set up while the disk is rolled back (`on_link_up` drops it):
    /// a peer that came back meanwhile would make this node its sync target (data
    /// written under the rollback) and then see it promoted while connected.
    /// Found by the simulator (seed 300: two Primaries while connected).
    pub(super) fn rolling_back(&self) -> bool {
        self.rollback_cmd.is_some()
    }

    pub(super) fn on_rolled_back(
        &mut self,
        result: Result<Vec<std::ops::Range<u64>>, String>,
        out: &mut Vec<Action>,
    ) {
        let Some(id) = self.rollback_cmd.take() else { return };
        let ranges = match result {
            Ok(ranges) => ranges,
            Err(e) => {
                let why =
                    format!("rolling back to the fallback image failed: {e}; the disk stays Inconsistent");
                tracing::error!("{why}");
                out.push(Action::Done { id, result: Err(why) });
                return;
            }
        };
        let restored: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        tracing::warn!(restored_bytes = restored, "rolled back to the image from before the resync");
        for r in ranges {
            self.mark_dirty(r);
        }
        // The image of its generation again: Outdated (it misses the writes of the
        // catch-up), promoted by the operator's --force below.
        self.target = None;
        self.disk = DiskState::Outdated;
        self.fallback = false;
        let first_new = out.len();
        match self.promote_now(true, out) {
            Ok(()) => {
                self.write_bitmap(out);
                self.reply_when_durable(id, out, first_new);
                self.end_catch_up(out);
            }
            Err(e) => out.push(Action::Done { id, result: Err(e) }),
        }
    }
}
