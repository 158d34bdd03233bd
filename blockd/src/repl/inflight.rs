//! The Primary's writes in flight, keyed by byte range (SPEC §4: "overlapping writes in
//! flight are serialized on the primary, so both copies apply them in the same
//! order").
//!
//! A write is admitted only if its range overlaps no write in flight and no earlier
//! waiting write; otherwise it waits, in arrival order. Completing a write releases
//! the waiting writes that became free. The table holds job ids only; the core keeps
//! the jobs themselves. Ranges in flight are disjoint, so one ordered-map lookup
//! answers "does this overlap anything in flight".

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

/// Writes in flight and writes waiting for an overlapping one to finish, by job id.
#[derive(Debug)]
pub struct InFlight<Id = crate::repl::job::JobId> {
    /// In flight: start → (end, job id). Disjoint.
    active: BTreeMap<u64, (u64, Id)>,
    /// Waiting, in arrival order.
    waiting: VecDeque<(Id, Range<u64>)>,
}

impl<Id> Default for InFlight<Id> {
    fn default() -> Self {
        InFlight { active: BTreeMap::new(), waiting: VecDeque::new() }
    }
}

impl<Id: Copy + Eq + std::fmt::Debug> InFlight<Id> {
    pub fn new() -> InFlight<Id> {
        InFlight::default()
    }

    /// Offers job `id` writing `range` (non-empty). True: it may start now (it is
    /// recorded as in flight); false: it waits and comes back from [`Self::complete`].
    pub fn admit(&mut self, id: Id, range: Range<u64>) -> bool {
        assert!(range.start < range.end, "empty write range {range:?}");
        let free = !self.overlaps_active(&range) && !self.waiting.iter().any(|(_, r)| overlap(r, &range));
        if free {
            self.active.insert(range.start, (range.end, id));
        } else {
            self.waiting.push_back((id, range));
        }
        free
    }

    /// Job `id` (in flight at `start`) finished; returns the waiting jobs that may
    /// start now, in arrival order (they are recorded as in flight).
    pub fn complete(&mut self, id: Id, start: u64) -> Vec<Id> {
        let removed = self.active.remove(&start);
        assert_eq!(removed.map(|(_, job)| job), Some(id), "job {id:?} was not in flight at {start}");
        let mut started = Vec::new();
        let mut still_waiting = VecDeque::with_capacity(self.waiting.len());
        while let Some((job, range)) = self.waiting.pop_front() {
            // Order among overlapping writes: nothing may pass an earlier waiter.
            let blocked =
                self.overlaps_active(&range) || still_waiting.iter().any(|(_, r)| overlap(r, &range));
            if blocked {
                still_waiting.push_back((job, range));
            } else {
                self.active.insert(range.start, (range.end, job));
                started.push(job);
            }
        }
        self.waiting = still_waiting;
        started
    }

    /// Writes in flight.
    pub fn active_len(&self) -> usize {
        self.active.len()
    }

    /// Writes waiting for an overlapping write.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// True if nothing is in flight or waiting.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    fn overlaps_active(&self, range: &Range<u64>) -> bool {
        // Disjoint ranges sorted by start have sorted ends too: only the last one
        // starting before `range.end` can reach into `range`.
        self.active.range(..range.end).next_back().is_some_and(|(_, &(end, _))| end > range.start)
    }
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn disjoint_writes_start_at_once() {
        let mut t = InFlight::<u64>::new();
        assert!(t.admit(1, 0..4096));
        assert!(t.admit(2, 4096..8192), "adjacent is not overlapping");
        assert!(t.admit(3, 100_000..100_001));
        assert_eq!(t.active_len(), 3);
    }

    #[test]
    fn overlapping_writes_wait_in_order() {
        let mut t = InFlight::<u64>::new();
        assert!(t.admit(1, 0..8192));
        assert!(!t.admit(2, 4096..12288), "overlaps 1");
        assert!(!t.admit(3, 10_000..11_000), "overlaps waiting 2: must not pass it");
        assert!(t.admit(4, 20_000..21_000), "unrelated write is not held up");
        assert_eq!(t.complete(1, 0), vec![2]);
        assert_eq!(t.complete(2, 4096), vec![3]);
        assert_eq!(t.complete(3, 10_000), Vec::<u64>::new());
        assert_eq!(t.complete(4, 20_000), Vec::<u64>::new());
        assert!(t.is_empty());
    }

    #[test]
    fn one_completion_can_release_several() {
        let mut t = InFlight::<u64>::new();
        assert!(t.admit(1, 0..100));
        assert!(!t.admit(2, 0..10));
        assert!(!t.admit(3, 50..60));
        assert_eq!(t.complete(1, 0), vec![2, 3]);
    }

    /// Random admits and completions against a brute-force model: in-flight ranges are
    /// always disjoint, every write eventually starts, and overlapping writes start in
    /// arrival order.
    #[test]
    fn matches_a_brute_force_model() {
        let mut rng = StdRng::seed_from_u64(7);
        for _round in 0..50 {
            let mut t = InFlight::<u64>::new();
            let mut ranges = std::collections::HashMap::new();
            let mut started_order = Vec::new();
            let mut running: Vec<u64> = Vec::new();
            for id in 0..300u64 {
                let start = rng.random_range(0..64u64) * 512;
                let r = start..start + rng.random_range(1..8u64) * 512;
                ranges.insert(id, r.clone());
                if t.admit(id, r) {
                    running.push(id);
                    started_order.push(id);
                }
                while !running.is_empty() && rng.random_bool(0.4) {
                    let done = running.swap_remove(rng.random_range(0..running.len()));
                    for s in t.complete(done, ranges[&done].start) {
                        running.push(s);
                        started_order.push(s);
                    }
                }
                for (i, a) in running.iter().enumerate() {
                    for b in &running[i + 1..] {
                        assert!(!overlap(&ranges[a], &ranges[b]), "{a} and {b} overlap in flight");
                    }
                }
            }
            while let Some(done) = running.pop() {
                for s in t.complete(done, ranges[&done].start) {
                    running.push(s);
                    started_order.push(s);
                }
            }
            assert!(t.is_empty(), "everything started and finished");
            assert_eq!(started_order.len(), 300);
            let position: std::collections::HashMap<u64, usize> =
                started_order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            for a in 0..300u64 {
                for b in a + 1..300 {
                    if overlap(&ranges[&a], &ranges[&b]) {
                        assert!(
                            position[&a] < position[&b],
                            "{b} started before the earlier overlapping {a}"
                        );
                    }
                }
            }
        }
    }
}
