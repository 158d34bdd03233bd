//! The in-memory bitmap: geometry, set/clear/count, union, and the changed-block set.

use std::fmt;
use std::ops::Range;

use bitvec::prelude::{BitVec, Lsb0};

use crate::runs::Runs;
use crate::{BITS_PER_BLOCK, BitmapError, MAX_GRANULARITY, MIN_GRANULARITY, WORDS_PER_BLOCK};

/// One bit per granule of a device, plus the on-disk blocks changed since the last persist.
#[derive(Clone)]
pub struct Bitmap {
    pub(crate) bits: BitVec<u64, Lsb0>,
    /// One bit per 4 KiB on-disk block: set when the block changed since `mark_persisted`.
    pub(crate) changed: BitVec<u64, Lsb0>,
    pub(crate) device_bytes: u64,
    pub(crate) granularity_bytes: u64,
    /// log2(granularity_bytes).
    pub(crate) shift: u32,
    /// Set bits, kept current by every mutation so counting is O(1) (status reads
    /// it after every event).
    pub(crate) ones: u64,
}

impl Bitmap {
    /// An all-clean bitmap for `device_bytes` at `granularity_bytes` (power of two, 4 KiB..=1 MiB).
    /// Every on-disk block counts as changed: it has never been written.
    pub fn new(device_bytes: u64, granularity_bytes: u64) -> Result<Bitmap, BitmapError> {
        let mut map = Self::empty(device_bytes, granularity_bytes)?;
        map.changed.fill(true);
        Ok(map)
    }

    /// All clear, no block changed.
    pub(crate) fn empty(device_bytes: u64, granularity_bytes: u64) -> Result<Bitmap, BitmapError> {
        let (len, blocks) = Self::geometry(device_bytes, granularity_bytes)?;
        Ok(Bitmap {
            bits: BitVec::repeat(false, len),
            changed: BitVec::repeat(false, blocks),
            device_bytes,
            granularity_bytes,
            shift: granularity_bytes.trailing_zeros(),
            ones: 0,
        })
    }

    /// Checks the granularity; returns `(bits, on-disk blocks)` for this geometry,
    /// without allocating anything.
    pub(crate) fn geometry(device_bytes: u64, granularity_bytes: u64) -> Result<(usize, usize), BitmapError> {
        if !granularity_bytes.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity_bytes)
        {
            return Err(BitmapError::BadGranularity { granularity_bytes });
        }
        let too_large = || BitmapError::TooLarge { device_bytes, granularity_bytes };
        let len = usize::try_from(device_bytes.div_ceil(granularity_bytes)).map_err(|_| too_large())?;
        let blocks = usize::try_from(Self::blocks_for(len as u64)).map_err(|_| too_large())?;
        Ok((len, blocks))
    }

    pub(crate) fn blocks_for(len_bits: u64) -> u64 {
        len_bits.div_ceil(BITS_PER_BLOCK)
    }

    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// Number of granules (bits).
    pub fn len_bits(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Number of on-disk 4 KiB blocks.
    pub fn blocks(&self) -> u64 {
        self.changed.len() as u64
    }

    /// Marks every granule `bytes` touches dirty; the range is clamped to the device.
    pub fn set_range(&mut self, bytes: Range<u64>) {
        let end = bytes.end.min(self.device_bytes);
        if bytes.start >= end {
            return;
        }
        let first = (bytes.start >> self.shift) as usize;
        let last = end.div_ceil(self.granularity_bytes) as usize;
        let before = self.bits[first..last].count_ones() as u64;
        self.bits[first..last].fill(true);
        self.ones += (last - first) as u64 - before;
        self.mark_changed(first, last);
    }

    /// Clears the granules fully inside `bytes` (clamped to the device; the last, partial granule
    /// is fully inside when the range reaches the device end).
    pub fn clear_range(&mut self, bytes: Range<u64>) {
        let end = bytes.end.min(self.device_bytes);
        if bytes.start >= end {
            return;
        }
        let first = bytes.start.div_ceil(self.granularity_bytes) as usize;
        let last = if end == self.device_bytes { self.bits.len() } else { (end >> self.shift) as usize };
        if first >= last {
            return;
        }
        self.ones -= self.bits[first..last].count_ones() as u64;
        self.bits[first..last].fill(false);
        self.mark_changed(first, last);
    }

    /// Whether the granule holding `byte` is dirty; false past the device end.
    pub fn is_set(&self, byte: u64) -> bool {
        byte < self.device_bytes && self.bits[(byte >> self.shift) as usize]
    }

    /// Number of dirty granules.
    pub fn count_bits(&self) -> u64 {
        self.ones
    }

    /// Recounts the set bits after a bulk change of the raw words.
    pub(crate) fn recount(&mut self) {
        self.ones = self.bits.as_raw_slice().iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Dirty bytes: whole granules, the last one clamped to the device end.
    pub fn dirty_bytes(&self) -> u64 {
        let whole = self.count_bits() << self.shift;
        match self.bits.last() {
            Some(last) if *last => whole - ((self.len_bits() << self.shift) - self.device_bytes),
            _ => whole,
        }
    }

    /// Dirty byte ranges in disk order, maximal (adjacent granules merged), clamped to the device.
    pub fn runs(&self) -> Runs<'_> {
        Runs::new(self, 0)
    }

    /// Like [`runs`](Self::runs) from the granule holding `byte` on: a run covering that granule
    /// starts at the granule's first byte. Empty when `byte` is past the device end.
    pub fn runs_from(&self, byte: u64) -> Runs<'_> {
        let granule = if byte >= self.device_bytes { self.len_bits() } else { byte >> self.shift };
        Runs::new(self, granule)
    }

    /// `self |= other`. Both must have the same device size and granularity.
    pub fn union_with(&mut self, other: &Bitmap) -> Result<(), BitmapError> {
        if self.device_bytes != other.device_bytes || self.granularity_bytes != other.granularity_bytes {
            return Err(BitmapError::GeometryMismatch {
                device_bytes: self.device_bytes,
                granularity_bytes: self.granularity_bytes,
                other_device_bytes: other.device_bytes,
                other_granularity_bytes: other.granularity_bytes,
            });
        }
        let ours = self.bits.as_raw_mut_slice().chunks_mut(WORDS_PER_BLOCK);
        let theirs = other.bits.as_raw_slice().chunks(WORDS_PER_BLOCK);
        for (block, (ours, theirs)) in ours.zip(theirs).enumerate() {
            let mut diff = 0;
            for (a, b) in ours.iter_mut().zip(theirs) {
                let merged = *a | *b;
                diff |= merged ^ *a;
                *a = merged;
            }
            if diff != 0 {
                self.changed.set(block, true);
            }
        }
        self.recount();
        Ok(())
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.bits.fill(false);
        self.changed.fill(true);
        self.ones = 0;
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.bits.fill(true);
        self.changed.fill(true);
        self.ones = self.len_bits();
    }

    /// Records that bits `first..last` (non-empty) changed.
    fn mark_changed(&mut self, first: usize, last: usize) {
        let per_block = BITS_PER_BLOCK as usize;
        self.changed[first / per_block..=(last - 1) / per_block].fill(true);
    }
}

impl PartialEq for Bitmap {
    /// Same geometry and same bits (the changed set is not compared).
    fn eq(&self, other: &Bitmap) -> bool {
        self.device_bytes == other.device_bytes
            && self.granularity_bytes == other.granularity_bytes
            && self.bits == other.bits
    }
}

impl Eq for Bitmap {}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("device_bytes", &self.device_bytes)
            .field("granularity_bytes", &self.granularity_bytes)
            .field("len_bits", &self.bits.len())
            .field("set_bits", &self.count_bits())
            .field("changed_blocks", &self.changed.count_ones())
            .finish()
    }
}
