//! The prefix invariant: a Secondary applies the Primary's epochs in order, so at
//! any moment its disk holds every write of the epochs before some epoch E, some
//! writes of E, and nothing later (whatever the protocol; under protocol A this is
//! all a failover can count on).
//!
//! For a session that starts in sync, the simulator records each replicated write
//! (epoch, tag, blocks) in send order, and the receiver's content of a block just
//! before the session's first write to it. When the receiver loses the link or is
//! promoted, each block it holds narrows E to an interval: at least the epoch of the
//! write it shows (0 for the content before the session), at most the epoch of the
//! next write to that block. The intersection must not be empty. A session with a
//! resync in it (its writes do not follow epochs) is not checked, nor a receiver
//! that crashed (only what was flushed is kept then: the crash invariant's business).
//! Blocks holding zeroes are skipped (a trim is not told from the content before).

use std::collections::HashMap;

use crate::pattern::{SectorContent, Tag};

/// One replicated write of a session.
#[derive(Debug, Clone, Copy)]
struct Sent {
    epoch: u64,
    /// 0 for trims and zeroes.
    tag: Tag,
}

/// What the simulator knows of one session's replication toward one receiver.
#[derive(Debug, Default)]
pub struct SessionLog {
    /// Writes per block, in send order.
    writes: HashMap<u64, Vec<Sent>>,
    /// The receiver's content (tag of the first sector) before the session's first
    /// write to the block.
    before: HashMap<u64, Option<Tag>>,
    /// A resync ran in this session, or it did not start in sync.
    pub tainted: bool,
}

impl SessionLog {
    /// Whether `block` has no write of this session yet (its content before must be
    /// recorded first).
    pub fn first_write_to(&self, block: u64) -> bool {
        !self.before.contains_key(&block)
    }

    pub fn record_before(&mut self, block: u64, content: SectorContent) {
        let tag = match content {
            SectorContent::Written(t) => Some(t),
            SectorContent::Zeroes => Some(0),
            SectorContent::Garbage => None,
        };
        self.before.insert(block, tag);
    }

    pub fn sent(&mut self, block: u64, epoch: u64, tag: Tag) {
        self.writes.entry(block).or_default().push(Sent { epoch, tag });
    }

    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.writes.keys().copied()
    }

    /// Checks the receiver's contents (`content(block)`: first-sector content)
    /// against some epoch boundary; `Err` names a block that cannot fit.
    pub fn check(&self, mut content: impl FnMut(u64) -> SectorContent) -> Result<(), String> {
        let (mut low, mut high) = (0u64, u64::MAX);
        let mut blocks: Vec<u64> = self.writes.keys().copied().collect();
        blocks.sort_unstable();
        for b in blocks {
            let writes = &self.writes[&b];
            let shown = match content(b) {
                SectorContent::Written(t) => t,
                // A trim is not told from the content before; a torn sector cannot be
                // here (no crash in a checked session).
                SectorContent::Zeroes | SectorContent::Garbage => continue,
            };
            // The latest write of this session showing `shown`, else the content
            // before the session.
            let (at, epoch) = match writes.iter().rposition(|w| w.tag == shown) {
                Some(i) => (Some(i), writes[i].epoch),
                None if self.before.get(&b) == Some(&Some(shown)) => (None, 0),
                None => return Err(format!("block {b} shows write #{shown}, which this session never sent")),
            };
            let next = match at {
                Some(i) => writes.get(i + 1),
                None => writes.first(),
            };
            low = low.max(epoch);
            if let Some(n) = next {
                high = high.min(n.epoch);
            }
            if low > high {
                return Err(format!(
                    "block {b} shows write #{shown} of epoch {epoch}, but another block shows a write of epoch \
                     {low} or later while this block lacks its write of epoch {high}: not a prefix of the epochs"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> SessionLog {
        let mut l = SessionLog::default();
        for b in 0..2 {
            l.record_before(b, SectorContent::Written(100 + b));
        }
        l.sent(0, 1, 1);
        l.sent(1, 2, 2);
        l.sent(0, 3, 3);
        l
    }

    #[test]
    fn prefixes_pass_and_a_hole_does_not() {
        let at = |a: u64, b: u64| move |block| SectorContent::Written(if block == 0 { a } else { b });
        assert!(log().check(at(100, 101)).is_ok(), "nothing applied");
        assert!(log().check(at(1, 101)).is_ok(), "epoch 1");
        assert!(log().check(at(1, 2)).is_ok(), "epochs 1-2");
        assert!(log().check(at(3, 2)).is_ok(), "epochs 1-3");
        assert!(log().check(at(100, 2)).is_err(), "epoch 2 without epoch 1");
        assert!(log().check(at(3, 101)).is_err(), "epoch 3 without epoch 2");
    }
}
