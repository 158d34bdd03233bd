//! Iteration over maximal dirty runs, a 64-bit word at a time.

use std::ops::Range;

use crate::Bitmap;

/// Iterator over dirty byte ranges in disk order; see [`Bitmap::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    words: &'a [u64],
    len_bits: u64,
    device_bytes: u64,
    shift: u32,
    /// Next granule to look at.
    pos: u64,
}

impl<'a> Runs<'a> {
    pub(crate) fn new(map: &'a Bitmap, granule: u64) -> Runs<'a> {
        Runs {
            words: map.bits.as_raw_slice(),
            len_bits: map.len_bits(),
            device_bytes: map.device_bytes,
            shift: map.shift,
            pos: granule,
        }
    }
}

/// The first bit index in `from..len_bits` that is set (clear when `invert`), or `None`.
/// Relies on bits past `len_bits` being zero only for `invert == false`; the bound check covers both.
fn next_bit(words: &[u64], len_bits: u64, from: u64, invert: bool) -> Option<u64> {
    if from >= len_bits {
        return None;
    }
    let flip = if invert { u64::MAX } else { 0 };
    let mut index = (from / 64) as usize;
    let mut word = (words[index] ^ flip) & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            let bit = index as u64 * 64 + u64::from(word.trailing_zeros());
            return (bit < len_bits).then_some(bit);
        }
        index += 1;
        word = *words.get(index)? ^ flip;
    }
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = next_bit(self.words, self.len_bits, self.pos, false)?;
        let end = next_bit(self.words, self.len_bits, start + 1, true).unwrap_or(self.len_bits);
        self.pos = end;
        Some(start << self.shift..(end << self.shift).min(self.device_bytes))
    }
}

impl std::iter::FusedIterator for Runs<'_> {}
