//! The reference model: every write the clients submitted, in submission order,
//! and per node the acknowledged writes it must hold.
//!
//! A write acknowledged by a Primary must be on that Primary; under protocol C (B)
//! it must also be on the peer whose `WriteAck` (`RecvAck`) it waited for. Such a
//! requirement survives a crash of the node only once a FLUSH that was submitted
//! after the acknowledgement was itself acknowledged with that node's part in it
//! (or the write was FUA): a crash may lose anything not flushed, as a disk may.
//!
//! A block satisfies a requirement if each of its sectors holds the required write
//! or any write submitted after it (later writes, acknowledged or not, may have
//! landed), or zeroes where such a write was a trim or zeroing. Sectors of two
//! writes in one block are a torn write, which is fine sector by sector; a sector
//! that is no whole write of this block is corruption.

use std::collections::{BTreeMap, HashMap};

use crate::pattern::{SectorContent, Tag};

/// Write numbers: the index in submission order.
pub type WriteNo = u32;

#[derive(Debug)]
pub struct WriteRec {
    pub tag: Tag,
    /// A trim or write-zeroes: the blocks read back as zeroes.
    pub zero: bool,
    pub first_block: u64,
    pub blocks: u64,
}

/// One required write on one node.
#[derive(Debug, Clone, Copy)]
struct Req {
    no: WriteNo,
    /// Its acknowledgement number.
    ack: u64,
    /// Durable at once (FUA), or covered by a flush since.
    durable: bool,
    /// Acknowledged with another node holding it too (protocol B/C while linked).
    shared: bool,
}

impl Req {
    /// `other` makes this one irrelevant: newer, at least as shared, and already
    /// durable (while it is not, a later flush may cover this one and not it).
    fn dominated_by(&self, other: &Req) -> bool {
        other.no > self.no && other.shared >= self.shared && other.durable
    }
}

/// Which requirements a check enforces.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Everything acknowledged (the node did not crash).
    All,
    /// What survives a crash: FUA or flushed.
    Durable,
    /// What a resync may not overwrite: durable, and either shared with the source
    /// or acknowledged after the source was last promoted (before that, the
    /// source's later history legitimately wins: protocol A's failover window).
    AgainstSource { source_promoted_at_ack: u64 },
}

#[derive(Debug, Default, Clone)]
struct BlockReq {
    reqs: Vec<Req>,
}

impl BlockReq {
    /// The newest write this check requires.
    fn floor(&self, need: Need, flush_mark: u64) -> Option<WriteNo> {
        let durable = |r: &Req| r.durable || r.ack <= flush_mark;
        self.reqs
            .iter()
            .filter(|r| match need {
                Need::All => true,
                Need::Durable => durable(r),
                Need::AgainstSource { source_promoted_at_ack } => {
                    durable(r) && (r.shared || r.ack > source_promoted_at_ack)
                }
            })
            .map(|r| r.no)
            .max()
    }

    fn add(&mut self, req: Req) {
        if self.reqs.iter().any(|r| req.dominated_by(r)) {
            return;
        }
        self.reqs.retain(|r| !r.dominated_by(&req));
        self.reqs.push(req);
    }
}

/// What one node must hold.
#[derive(Debug, Default, Clone)]
struct NodeReq {
    blocks: BTreeMap<u64, BlockReq>,
    /// Acknowledgements numbered up to here are covered by a completed flush.
    flush_mark: u64,
}

#[derive(Debug)]
pub struct Model {
    writes: Vec<WriteRec>,
    by_tag: HashMap<Tag, WriteNo>,
    /// Per block: the writes that touched it, in submission order.
    history: HashMap<u64, Vec<WriteNo>>,
    ack_counter: u64,
    nodes: Vec<NodeReq>,
    /// The acknowledgement count when each node was last promoted.
    promoted_at_ack: Vec<u64>,
}

impl Model {
    pub fn new(nodes: usize) -> Model {
        Model {
            writes: Vec::new(),
            by_tag: HashMap::new(),
            history: HashMap::new(),
            ack_counter: 0,
            nodes: vec![NodeReq::default(); nodes],
            promoted_at_ack: vec![0; nodes],
        }
    }

    /// A client submitted a write (or trim/zeroes) of `blocks` blocks.
    pub fn submit(&mut self, tag: Tag, zero: bool, first_block: u64, blocks: u64) -> WriteNo {
        let no = WriteNo::try_from(self.writes.len()).expect("fewer than 2^32 writes per seed");
        self.writes.push(WriteRec { tag, zero, first_block, blocks });
        if !zero {
            self.by_tag.insert(tag, no);
        }
        for b in first_block..first_block + blocks {
            self.history.entry(b).or_default().push(no);
        }
        no
    }

    pub fn write(&self, no: WriteNo) -> &WriteRec {
        &self.writes[no as usize]
    }

    /// The acknowledgement number a FLUSH submitted now covers.
    pub fn ack_mark(&self) -> u64 {
        self.ack_counter
    }

    /// Write `no` was acknowledged to the client: `holders` must hold it from now
    /// on, durably at once where `durable` (FUA).
    pub fn acked(&mut self, no: WriteNo, holders: &[(usize, bool)]) {
        self.ack_counter += 1;
        let ack = self.ack_counter;
        let shared = holders.len() > 1;
        let (first, n) = (self.writes[no as usize].first_block, self.writes[no as usize].blocks);
        for &(node, durable) in holders {
            for b in first..first + n {
                self.nodes[node].blocks.entry(b).or_default().add(Req { no, ack, durable, shared });
            }
        }
    }

    /// `node` became Primary.
    pub fn promoted(&mut self, node: usize) {
        self.promoted_at_ack[node] = self.ack_counter;
    }

    pub fn promoted_at_ack(&self, node: usize) -> u64 {
        self.promoted_at_ack[node]
    }

    /// A FLUSH that covers acknowledgements up to `mark` completed with `node`'s
    /// part in it.
    pub fn flushed(&mut self, node: usize, mark: u64) {
        let n = &mut self.nodes[node];
        n.flush_mark = n.flush_mark.max(mark);
        let mark = n.flush_mark;
        for block in n.blocks.values_mut() {
            let entries = std::mem::take(&mut block.reqs);
            for r in entries {
                block.add(Req { durable: r.durable || r.ack <= mark, ..r });
            }
        }
    }

    /// `node` lost power: only what was flushed is still required.
    pub fn crashed(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let mark = n.flush_mark;
        for block in n.blocks.values_mut() {
            let kept: Vec<Req> = block.reqs.iter().filter(|r| r.durable || r.ack <= mark).copied().collect();
            block.reqs.clear();
            for r in kept {
                block.add(Req { durable: true, ..r });
            }
        }
    }

    /// `node` became a sync target: its data is being replaced by the source's, so
    /// only what it held durably is still its own requirement (the stale-side check
    /// at the end uses it); a later flush must not vouch for what the resync may
    /// have overwritten.
    pub fn resync_started(&mut self, node: usize) {
        self.crashed(node);
    }

    /// `target` now holds a copy of `source`'s data (a resync finished). Its final
    /// flush made durable what the source had acknowledged before it sent
    /// `ResyncDone` (acknowledgement count `done_mark`).
    pub fn copied(&mut self, target: usize, source: usize, done_mark: u64) {
        let mut copy = self.nodes[source].clone();
        for block in copy.blocks.values_mut() {
            // A write the source acknowledged on its own (protocol A) after the
            // resync's done mark may still be queued for the target, or dropped
            // with the link: protocol A never promised it there (as for any link).
            block.reqs.retain(|r| r.ack <= done_mark || r.shared);
            for r in &mut block.reqs {
                // Durable on the target only through its final flush (a FUA on
                // the source says nothing about the target's disk).
                r.durable = r.ack <= done_mark;
                r.shared = true;
            }
        }
        copy.flush_mark = 0;
        self.nodes[target] = copy;
    }

    /// Nothing is required of `node` any more (its data was discarded by an
    /// operator's choice, or forced to be the reference).
    pub fn forget(&mut self, node: usize) {
        self.nodes[node] = NodeReq { flush_mark: self.ack_counter, ..NodeReq::default() };
    }

    /// Block `block` holds write `no` or a later one (sector by sector).
    pub fn check_written(&self, no: WriteNo, block: u64, sectors: &[SectorContent]) -> Result<(), String> {
        self.check_floor(Some(no), block, sectors)
    }

    /// Blocks with a requirement on `node` under `need`, in order.
    pub fn required_blocks(&self, node: usize, need: Need) -> Vec<u64> {
        let mark = self.nodes[node].flush_mark;
        self.nodes[node]
            .blocks
            .iter()
            .filter(|(_, r)| r.floor(need, mark).is_some())
            .map(|(b, _)| *b)
            .collect()
    }

    /// Every block a client ever wrote, in order.
    pub fn touched_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.history.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Checks block `block` of `node` (its sectors' contents) against what the node
    /// must hold; `Err` says what is wrong.
    pub fn check_block(
        &self,
        node: usize,
        block: u64,
        sectors: &[SectorContent],
        need: Need,
    ) -> Result<(), String> {
        let floor =
            self.nodes[node].blocks.get(&block).and_then(|r| r.floor(need, self.nodes[node].flush_mark));
        self.check_floor(floor, block, sectors)
    }

    /// Each sector of `block` holds write `floor` or a later one (anything without
    /// a floor), and never garbage.
    fn check_floor(
        &self,
        floor: Option<WriteNo>,
        block: u64,
        sectors: &[SectorContent],
    ) -> Result<(), String> {
        let later = |w: WriteNo| floor.is_none_or(|f| w >= f);
        for (i, s) in sectors.iter().enumerate() {
            let ok = match *s {
                SectorContent::Garbage => false,
                SectorContent::Written(tag) => match self.by_tag.get(&tag) {
                    Some(&w) => {
                        let rec = &self.writes[w as usize];
                        (rec.first_block..rec.first_block + rec.blocks).contains(&block) && later(w)
                    }
                    None => false,
                },
                SectorContent::Zeroes => match floor {
                    None => true,
                    Some(f) => self.history[&block].iter().any(|&w| w >= f && self.writes[w as usize].zero),
                },
            };
            if !ok {
                let required = floor.map(|f| self.writes[f as usize].tag);
                return Err(format!(
                    "block {block} sector {i} holds {} but must hold write {} or a later one",
                    describe(s),
                    required.map_or("(none)".to_string(), |t| format!("#{t}"))
                ));
            }
        }
        Ok(())
    }
}

fn describe(s: &SectorContent) -> String {
    match s {
        SectorContent::Zeroes => "zeroes".into(),
        SectorContent::Written(t) => format!("write #{t}"),
        SectorContent::Garbage => "garbage".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unflushed_acknowledgement_is_not_required_after_a_crash() {
        let mut m = Model::new(2);
        let w1 = m.submit(1, false, 0, 1);
        m.acked(w1, &[(0, false), (1, false)]);
        let mark = m.ack_mark();
        m.flushed(0, mark);
        let w2 = m.submit(2, false, 0, 1);
        m.acked(w2, &[(0, false), (1, false)]);
        let old = [SectorContent::Written(1); 8];
        assert!(m.check_block(0, 0, &old, Need::All).is_err(), "w2 is required while node 0 runs");
        assert!(m.check_block(0, 0, &old, Need::Durable).is_ok(), "w2 was not flushed");
        m.crashed(0);
        assert!(m.check_block(0, 0, &old, Need::All).is_ok(), "w1 was flushed; w2 may be lost");
        assert!(m.check_block(0, 0, &[SectorContent::Zeroes; 8], Need::All).is_err(), "w1 must survive");
        m.crashed(1);
        assert!(m.check_block(1, 0, &[SectorContent::Zeroes; 8], Need::All).is_ok(), "node 1 never flushed");
    }
}
