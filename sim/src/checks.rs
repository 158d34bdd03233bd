//! The invariants, checked after every step and at quiescence:
//!
//! - never two Primaries while connected (both hold the same live session);
//! - a Primary never writes data for its peer;
//! - a promoted node holds every write acknowledged with its part in it (protocol C:
//!   its `WriteAck`; B: its `RecvAck`), and anything it serves is no older;
//! - after a crash, a node still holds every write a completed FLUSH covered;
//! - a finished resync never overwrote, on its target, data the target durably
//!   held and the source lacked (no resync from the stale side), unless an operator
//!   chose to discard the target's data;
//! - at quiescence (healed, connected, in sync, idle), every node that claims
//!   UpToDate holds exactly the Primary's data;
//! - no panic (caught where the core is called).

use blockd::repl::core::{Core, Link, ReplState};
use blockd::state::{DiskState, Role};

use crate::disk::BLOCK_BYTES;
use crate::model::Need;
use crate::pattern::sectors;
use crate::world::World;

/// What the checks compare before and after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    pub role: Role,
    pub disk: DiskState,
    pub repl: ReplState,
    pub link: Link,
}

impl Observed {
    pub fn of(core: &Core) -> Observed {
        Observed { role: core.role(), disk: core.disk(), repl: core.repl_state(), link: core.link() }
    }
}

impl World {
    /// After every step.
    pub fn check_always(&mut self) {
        let primaries: Vec<(usize, u64)> = (0..self.nodes.len())
            .filter_map(|n| {
                let run = self.nodes[n].run.as_ref()?;
                let linked = run.core.link() == Link::Replicating;
                (run.core.role() == Role::Primary && linked).then_some((n, run.session?))
            })
            .collect();
        for (i, (a, sa)) in primaries.iter().enumerate() {
            for (b, sb) in &primaries[i + 1..] {
                if sa == sb {
                    let detail = format!(
                        "{} and {} are both Primary on session {sa}",
                        self.nodes[*a].name, self.nodes[*b].name
                    );
                    self.fail("never two Primaries while connected", detail);
                }
            }
        }
    }

    /// What an event changed on `node`.
    pub fn transition(&mut self, node: usize, before: Observed, after: Observed) {
        if before == after {
            return;
        }
        let name = self.nodes[node].name.clone();
        self.log(format!(
            "{name}: {:?} {} {:?} {:?} -> {:?} {} {:?} {:?}",
            before.role,
            before.disk,
            before.repl,
            before.link,
            after.role,
            after.disk,
            after.repl,
            after.link
        ));
        if before.role == Role::Secondary && after.role == Role::Primary {
            self.model.promoted(node);
            if after.disk.is_detached() {
                // Without a disk: it serves through its UpToDate peer (checked
                // there); its own disk holds nothing it serves.
            } else if before.disk != DiskState::UpToDate {
                // `primary --force`: this node's data is the reference now; what the
                // others hold may be overwritten by the operator's choice.
                self.model.forget(node);
                for other in 0..self.nodes.len() {
                    if other != node {
                        self.discarding[other] = true;
                    }
                }
            } else if let Err(e) = self.check_node(node, Need::All) {
                self.fail("a promoted node holds every acknowledged write", format!("{name} promoted: {e}"));
            }
        }
        if after.repl == ReplState::SyncTarget && before.repl != ReplState::SyncTarget {
            self.model.resync_started(node);
        }
        if let Some(session) = self.session_of(node) {
            let syncing = matches!(after.repl, ReplState::SyncSource | ReplState::SyncTarget);
            if before.link == Link::Negotiating && after.link == Link::Replicating && !syncing {
                // In sync from the start: the peer's writes follow the epochs.
                let other = self.net.get(session).map(|s| s.other(node));
                if let Some(other) = other {
                    self.prefix_logs.entry((session, other)).or_default();
                    self.prefix_logs.entry((session, node)).or_default();
                }
            }
            if before.role != after.role {
                // A role switch within the session: the receiver changes; each log
                // starts over (what a node wrote as Primary is its own).
                for ((s, _), log) in self.prefix_logs.iter_mut() {
                    if *s == session && !log.tainted {
                        *log = Default::default();
                    }
                }
            }
            if syncing {
                for ((s, _), log) in self.prefix_logs.iter_mut() {
                    if *s == session {
                        log.tainted = true;
                    }
                }
            }
        }
        let finished_target = before.repl == ReplState::SyncTarget
            && after.repl == ReplState::Established
            && after.disk == DiskState::UpToDate;
        if finished_target {
            let source = self.session_of(node).and_then(|s| self.net.get(s)).map(|s| s.other(node));
            let need = Need::AgainstSource {
                source_promoted_at_ack: source.map_or(0, |s| self.model.promoted_at_ack(s)),
            };
            if std::mem::take(&mut self.discarding[node]) {
                self.log(format!("{name}: resync done; its own data was discarded by choice"));
            } else if let Err(e) = self.check_node(node, need) {
                self.fail("no resync from the stale side", format!("{name} finished a resync: {e}"));
            }
            if let Some(source) = source {
                let done_mark = self.resync_done_mark[source];
                self.model.copied(node, source, done_mark);
            }
        }
    }

    /// Protocol C: a peer acknowledges a write only once it is on its disk.
    pub fn check_write_ack(&mut self, peer: usize, primary: usize, job: blockd::repl::core::JobId) {
        let Some(no) = self.client.write_of(primary, job) else { return };
        let rec = self.model.write(no);
        let (first, blocks) = (rec.first_block, rec.blocks);
        let mut buf = vec![0u8; BLOCK_BYTES];
        for b in first..first + blocks {
            self.nodes[peer].disk.read(b * BLOCK_BYTES as u64, &mut buf);
            if let Err(e) = self.model.check_written(no, b, &sectors(&buf, b)) {
                let name = self.nodes[peer].name.clone();
                self.fail(
                    "a peer acknowledges only what it has written",
                    format!("{name} acknowledged: {e}"),
                );
                return;
            }
        }
    }

    /// Replicated writes sent on `session` to `to`, for the prefix invariant.
    pub fn log_for_prefix(&mut self, session: u64, to: usize, msg: &blockd::peer::msg::Message) {
        use blockd::peer::msg::Message;
        let (epoch, offset, len, tag) = match msg {
            Message::Write { epoch, offset, data, .. } => (
                *epoch,
                *offset,
                data.len() as u64,
                u64::from_le_bytes(data[0..8].try_into().expect("8 bytes")),
            ),
            Message::Trim { epoch, offset, len, .. } | Message::WriteZeroes { epoch, offset, len, .. } => {
                (*epoch, *offset, *len, 0)
            }
            _ => return,
        };
        let Some(log) = self.prefix_logs.get_mut(&(session, to)) else { return };
        if log.tainted {
            return;
        }
        let mut buf = vec![0u8; BLOCK_BYTES];
        let block_bytes = BLOCK_BYTES as u64;
        for b in offset / block_bytes..(offset + len).div_ceil(block_bytes) {
            if log.first_write_to(b) {
                self.nodes[to].disk.read(b * block_bytes, &mut buf);
                log.record_before(b, sectors(&buf, b)[0]);
            }
            log.sent(b, epoch, tag);
        }
    }

    /// The receiver of `session` leaves it: its disk must hold a prefix of the
    /// epochs it was sent.
    pub fn check_prefix(&mut self, node: usize, session: u64) {
        let Some(log) = self.prefix_logs.remove(&(session, node)) else { return };
        if log.tainted {
            return;
        }
        let disk = &self.nodes[node].disk;
        let mut buf = vec![0u8; BLOCK_BYTES];
        let result = log.check(|b| {
            disk.read(b * BLOCK_BYTES as u64, &mut buf);
            sectors(&buf, b)[0]
        });
        if let Err(e) = result {
            let name = self.nodes[node].name.clone();
            self.fail(
                "a Secondary holds a prefix of the epochs",
                format!("{name} left session {session}: {e}"),
            );
        }
    }

    /// A node started from its disk: what was flushed must be there (unless its
    /// disk is Inconsistent: a resync target that stopped midway).
    pub fn check_restarted(&mut self, node: usize) {
        let Some(core) = self.core(node) else { return };
        if core.disk() == DiskState::Inconsistent {
            return;
        }
        if let Err(e) = self.check_node(node, Need::All) {
            let name = self.nodes[node].name.clone();
            self.fail("flushed data survives any crash", format!("{name} restarted: {e}"));
        }
    }

    /// Checks every block with a requirement on `node` (under `need`) against its
    /// disk.
    fn check_node(&mut self, node: usize, need: Need) -> Result<(), String> {
        self.checks_passed += 1;
        let blocks = self.model.required_blocks(node, need);
        let mut buf = vec![0u8; BLOCK_BYTES];
        for b in blocks {
            self.nodes[node].disk.read(b * BLOCK_BYTES as u64, &mut buf);
            self.model.check_block(node, b, &sectors(&buf, b), need)?;
        }
        Ok(())
    }

    /// At quiescence: every UpToDate node holds the Primary's data, byte for byte.
    pub fn check_identical(&mut self) {
        let Some(primary) =
            (0..self.nodes.len()).find(|&n| self.core(n).is_some_and(|c| c.role() == Role::Primary))
        else {
            return;
        };
        let size = self.nodes[primary].size_bytes;
        let chunk = 1usize << 20;
        let (mut a, mut b) = (vec![0u8; chunk], vec![0u8; chunk]);
        for other in 0..self.nodes.len() {
            if other == primary || self.core(other).is_none_or(|c| c.disk() != DiskState::UpToDate) {
                continue;
            }
            let mut offset = 0u64;
            while offset < size {
                let len = chunk.min((size - offset) as usize);
                self.nodes[primary].disk.read(offset, &mut a[..len]);
                self.nodes[other].disk.read(offset, &mut b[..len]);
                if a[..len] != b[..len] {
                    let at = (0..len).find(|&i| a[i] != b[i]).expect("differs") as u64 + offset;
                    let block = at / BLOCK_BYTES as u64;
                    let detail = format!(
                        "{} claims UpToDate but differs from the Primary {} at byte {at} (block {block}): {:?} vs {:?}",
                        self.nodes[other].name,
                        self.nodes[primary].name,
                        self.block_sectors(other, block),
                        self.block_sectors(primary, block)
                    );
                    self.fail("UpToDate means the Primary's data", detail);
                    return;
                }
                offset += len as u64;
            }
        }
        self.checks_passed += 1;
    }

    fn block_sectors(&self, node: usize, block: u64) -> Vec<crate::pattern::SectorContent> {
        let mut buf = vec![0u8; BLOCK_BYTES];
        self.nodes[node].disk.read(block * BLOCK_BYTES as u64, &mut buf);
        sectors(&buf, block).to_vec()
    }
}
