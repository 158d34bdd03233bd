//! The set of regions changed without the peer, at bitmap granularity, kept as
//! merged runs of granules. In memory only: the persistent dirty bitmap (issue 4)
//! replaces it; the interface (insert ranges, count, iterate runs in disk order)
//! stays.

use std::collections::BTreeMap;
use std::ops::Range;

/// Dirty regions as disjoint, non-adjacent runs of granules.
#[derive(Debug, Clone)]
pub struct DirtySet {
    granularity_bytes: u64,
    /// start granule → end granule (exclusive). Disjoint and non-adjacent.
    runs: BTreeMap<u64, u64>,
    granules: u64,
}

impl DirtySet {
    /// An empty set; `granularity_bytes` must be a power of two.
    pub fn new(granularity_bytes: u64) -> DirtySet {
        assert!(granularity_bytes.is_power_of_two(), "granularity {granularity_bytes} is not a power of two");
        DirtySet { granularity_bytes, runs: BTreeMap::new(), granules: 0 }
    }

    /// Marks every granule touched by `range` dirty.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut start = range.start / self.granularity_bytes;
        let mut end = range.end.div_ceil(self.granularity_bytes);
        // Absorb every run that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .runs
            .range(..=end)
            .rev()
            .take_while(|(_, run_end)| **run_end >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.runs.remove(&s);
            self.granules -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
        self.granules += end - start;
    }

    /// Dirty bytes (whole granules).
    pub fn bytes(&self) -> u64 {
        self.granules * self.granularity_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Dirty byte ranges in disk order.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|(s, e)| s * self.granularity_bytes..e * self.granularity_bytes)
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.granules = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rounds_to_granules_and_merges() {
        let mut d = DirtySet::new(4096);
        d.insert(100..200);
        assert_eq!(d.runs().collect::<Vec<_>>(), vec![0..4096]);
        d.insert(8192..8193);
        d.insert(4096..8192); // bridges the two runs
        assert_eq!(d.runs().collect::<Vec<_>>(), vec![0..12288]);
        assert_eq!(d.bytes(), 12288);
        d.insert(0..0);
        assert_eq!(d.bytes(), 12288);
        d.clear();
        assert!(d.is_empty());
    }

    #[test]
    fn matches_a_granule_model() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut d = DirtySet::new(512);
        let mut model = vec![false; 400];
        for _ in 0..2000 {
            let start = rng.random_range(0..400u64 * 512);
            let end = (start + rng.random_range(1..8000)).min(400 * 512);
            d.insert(start..end);
            for g in start / 512..end.div_ceil(512) {
                model[g as usize] = true;
            }
        }
        let from_runs: Vec<bool> =
            (0..400u64).map(|g| d.runs().any(|r| r.start <= g * 512 && g * 512 < r.end)).collect();
        assert_eq!(from_runs, model);
        assert_eq!(d.bytes(), model.iter().filter(|b| **b).count() as u64 * 512);
        let runs: Vec<_> = d.runs().collect();
        for w in runs.windows(2) {
            assert!(w[0].end < w[1].start, "runs are disjoint and not adjacent: {runs:?}");
        }
    }
}
