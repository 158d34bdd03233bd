//! The activity log (write-intent log, SPEC §5; DRBD's AL): the set of coarse
//! extents a Primary may be writing to, recorded durably before any write touches
//! the local disk, so that after a crash of the Primary the union of the persisted
//! bitmap and the hot extents covers every block that may differ from the peer.
//!
//! Pure bookkeeping, owned by the core. A write takes references on its extents
//! when it is dispatched ([`ActivityLog::try_acquire`]) and gives them back when it
//! is settled ([`ActivityLog::release`]): the core takes two per write, one for the
//! local disk and one for the peer (released when the peer confirmed its epoch, or
//! when the range went into the bitmap). An extent cools (can be evicted) only with
//! no references, and the core writes the bitmap before any transaction that evicts,
//! so nothing is ever covered by neither.
//!
//! Extents that are not hot yet are collected by [`ActivityLog::want`] and made
//! durable together by one transaction ([`ActivityLog::next_transaction`]: the whole
//! hot set is rewritten, see `meta` for the slot format); one transaction is in flight
//! at a time, so writes arriving meanwhile batch into the next one. The hot set never
//! exceeds the configured capacity: when it is full, the least recently used extent
//! without references is evicted; if every extent is referenced, wanted extents wait
//! for a release.

use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};

/// Bytes covered by one extent (DRBD's 4 MiB).
pub const AL_EXTENT_SHIFT: u32 = 22;

#[derive(Debug)]
struct Extent {
    refs: u32,
    last_use: u64,
    /// Its transaction is on disk.
    durable: bool,
}

/// A transaction to make durable: the whole new hot set.
#[derive(Debug, PartialEq, Eq)]
pub struct Transaction {
    pub extents: Vec<u32>,
    /// Some extent was dropped: the bitmap must be written before this transaction.
    pub evicted: bool,
}

/// The hot extents and who uses them.
#[derive(Debug)]
pub struct ActivityLog {
    capacity: usize,
    hot: HashMap<u32, Extent>,
    clock: u64,
    wanted: Vec<u32>,
    in_flight: Option<u64>,
    transactions: u64,
}

impl ActivityLog {
    /// An empty log of at most `capacity` hot extents (at least 16, see config).
    pub fn new(capacity: u32) -> ActivityLog {
        ActivityLog {
            capacity: capacity.max(1) as usize,
            hot: HashMap::new(),
            clock: 0,
            wanted: Vec::new(),
            in_flight: None,
            transactions: 0,
        }
    }

    /// The extents `range` touches.
    pub fn extents(range: &Range<u64>) -> RangeInclusive<u32> {
        let first = (range.start >> AL_EXTENT_SHIFT) as u32;
        let last = (range.end.max(range.start + 1) - 1) >> AL_EXTENT_SHIFT;
        first..=last as u32
    }

    /// How many extents `range` touches.
    pub fn span(range: &Range<u64>) -> usize {
        Self::extents(range).count()
    }

    /// The largest range (in extents) that can use the log; larger ranges use the
    /// bitmap as their write intent (see the core).
    pub fn max_span(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    /// Takes `refs` references on every extent of `range` if all are durably hot;
    /// false (nothing taken) otherwise.
    pub fn try_acquire(&mut self, range: &Range<u64>, refs: u32) -> bool {
        let ready = Self::extents(range).all(|e| self.hot.get(&e).is_some_and(|x| x.durable));
        if !ready {
            return false;
        }
        self.clock += 1;
        for e in Self::extents(range) {
            let x = self.hot.get_mut(&e).expect("checked above");
            x.refs += refs;
            x.last_use = self.clock;
        }
        true
    }

    /// Asks for the extents of `range` that are not hot to be made hot.
    pub fn want(&mut self, range: &Range<u64>) {
        for e in Self::extents(range) {
            if !self.hot.contains_key(&e) && !self.wanted.contains(&e) {
                self.wanted.push(e);
            }
        }
    }

    /// Gives back `refs` references on every extent of `range`. True if an extent
    /// became free while extents are wanted (a blocked transaction may now fit).
    pub fn release(&mut self, range: &Range<u64>, refs: u32) -> bool {
        let mut freed = false;
        for e in Self::extents(range) {
            if let Some(x) = self.hot.get_mut(&e) {
                debug_assert!(x.refs >= refs, "extent {e}: releasing more than was taken");
                x.refs = x.refs.saturating_sub(refs);
                freed |= x.refs == 0;
            }
        }
        freed && !self.wanted.is_empty()
    }

    /// Wanted extents that cannot be placed: every hot extent is in use.
    pub fn blocked(&self) -> bool {
        !self.wanted.is_empty() && self.in_flight.is_none()
    }

    /// The next transaction, if extents are wanted, none is in flight, and room can
    /// be made. The caller makes `extents` durable and then calls
    /// [`ActivityLog::committed`] with the sequence it passed to
    /// [`ActivityLog::begin`].
    pub fn next_transaction(&mut self) -> Option<Transaction> {
        if self.in_flight.is_some() || self.wanted.is_empty() {
            return None;
        }
        let mut evicted = false;
        let mut added = 0;
        while let Some(&e) = self.wanted.first() {
            if self.hot.len() >= self.capacity {
                let victim = self
                    .hot
                    .iter()
                    .filter(|(_, x)| x.refs == 0 && x.durable)
                    .min_by_key(|(_, x)| x.last_use)
                    .map(|(e, _)| *e);
                let Some(victim) = victim else { break };
                self.hot.remove(&victim);
                evicted = true;
            }
            self.wanted.remove(0);
            self.clock += 1;
            self.hot.insert(e, Extent { refs: 0, last_use: self.clock, durable: false });
            added += 1;
        }
        if added == 0 {
            return None;
        }
        let mut extents: Vec<u32> = self.hot.keys().copied().collect();
        extents.sort_unstable();
        Some(Transaction { extents, evicted })
    }

    /// The transaction just returned is being written as metadata update `seq`.
    pub fn begin(&mut self, seq: u64) {
        self.in_flight = Some(seq);
    }

    /// Metadata is durable up to `seq`: true if that completed the transaction in
    /// flight (its extents are now usable).
    pub fn committed(&mut self, seq: u64) -> bool {
        match self.in_flight {
            Some(s) if s <= seq => {
                self.in_flight = None;
                self.transactions += 1;
                for x in self.hot.values_mut() {
                    x.durable = true;
                }
                true
            }
            _ => false,
        }
    }

    /// Extents currently hot.
    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }

    /// Transactions made durable since start.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = 1 << AL_EXTENT_SHIFT;

    fn commit(al: &mut ActivityLog, seq: u64) -> Transaction {
        let t = al.next_transaction().expect("a transaction");
        al.begin(seq);
        assert!(al.committed(seq));
        t
    }

    #[test]
    fn extents_of_ranges() {
        assert_eq!(ActivityLog::extents(&(0..4096)), 0..=0);
        assert_eq!(ActivityLog::extents(&(E - 1..E + 1)), 0..=1);
        assert_eq!(ActivityLog::extents(&(E..2 * E)), 1..=1);
        assert_eq!(ActivityLog::span(&(0..32 * E)), 32);
    }

    #[test]
    fn a_write_waits_for_its_extent_to_be_durable() {
        let mut al = ActivityLog::new(4);
        let r = 0..4096;
        assert!(!al.try_acquire(&r, 2));
        al.want(&r);
        al.want(&r);
        let t = al.next_transaction().unwrap();
        assert_eq!(t, Transaction { extents: vec![0], evicted: false });
        al.begin(7);
        assert!(!al.try_acquire(&r, 2), "hot but not durable yet");
        assert!(al.next_transaction().is_none(), "one transaction at a time");
        assert!(!al.committed(6));
        assert!(al.committed(7));
        assert!(al.try_acquire(&r, 2));
        assert_eq!(al.transactions(), 1);
    }

    #[test]
    fn evicts_the_least_recently_used_free_extent_only() {
        let mut al = ActivityLog::new(2);
        for e in 0..2 {
            al.want(&(e * E..e * E + 1));
        }
        commit(&mut al, 1);
        assert!(al.try_acquire(&(0..1), 2)); // extent 0 in use
        assert!(al.try_acquire(&(E..E + 1), 2));
        al.release(&(E..E + 1), 2); // extent 1 free, but used more recently than 0
        al.want(&(2 * E..2 * E + 1));
        let t = commit(&mut al, 2);
        assert_eq!(t, Transaction { extents: vec![0, 2], evicted: true });
        // Now both hot extents: 0 (in use) and 2 (free). Extent 3 evicts 2.
        al.want(&(3 * E..3 * E + 1));
        assert_eq!(commit(&mut al, 3).extents, vec![0, 3]);
        // Everything in use: extent 4 must wait for a release.
        assert!(al.try_acquire(&(3 * E..3 * E + 1), 1));
        al.want(&(4 * E..4 * E + 1));
        assert!(al.next_transaction().is_none());
        assert!(al.blocked());
        assert!(!al.release(&(0..1), 1), "still one reference left");
        assert!(al.release(&(0..1), 1));
        assert_eq!(commit(&mut al, 4).extents, vec![3, 4]);
        assert_eq!(al.hot_count(), 2);
    }
}
