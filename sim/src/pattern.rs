//! What the simulated clients write: every 512-byte sector of a block written by
//! write `tag` starts with the tag and the block's index, then a filler derived
//! from both. So a sector read back names the write it came from, a torn block shows
//! as sectors of two writes, and a misplaced or corrupted sector as garbage.

use crate::disk::{BLOCK_BYTES, SECTOR_BYTES};

/// A write's identity; 0 is "zeroes" (never written, trimmed, or zeroed).
pub type Tag = u64;

/// What one sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorContent {
    Zeroes,
    Written(Tag),
    /// Neither zeroes nor a whole sector of one write to this block.
    Garbage,
}

fn filler(tag: Tag, block: u64, sector: usize) -> u64 {
    (tag ^ block.rotate_left(17) ^ (sector as u64).rotate_left(41)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fills one block's worth of `buf` for write `tag`.
pub fn fill_block(buf: &mut [u8], tag: Tag, block: u64) {
    debug_assert_eq!(buf.len(), BLOCK_BYTES);
    for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES).enumerate() {
        sector[0..8].copy_from_slice(&tag.to_le_bytes());
        sector[8..16].copy_from_slice(&block.to_le_bytes());
        let f = filler(tag, block, i).to_le_bytes();
        for word in sector[16..].chunks_exact_mut(8) {
            word.copy_from_slice(&f);
        }
    }
}

/// The content of each sector of `data` (one block, number `block`).
pub fn sectors(data: &[u8], block: u64) -> [SectorContent; BLOCK_BYTES / SECTOR_BYTES] {
    let mut out = [SectorContent::Garbage; BLOCK_BYTES / SECTOR_BYTES];
    for (i, sector) in data.chunks_exact(SECTOR_BYTES).enumerate() {
        out[i] = if sector.iter().all(|&b| b == 0) {
            SectorContent::Zeroes
        } else {
            let tag = u64::from_le_bytes(sector[0..8].try_into().expect("8 bytes"));
            let at = u64::from_le_bytes(sector[8..16].try_into().expect("8 bytes"));
            let f = filler(tag, block, i).to_le_bytes();
            let intact = at == block && tag != 0 && sector[16..].chunks_exact(8).all(|w| w == f);
            if intact { SectorContent::Written(tag) } else { SectorContent::Garbage }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_name_their_write_and_detect_damage() {
        let mut b = vec![0u8; BLOCK_BYTES];
        assert!(sectors(&b, 3).iter().all(|s| *s == SectorContent::Zeroes));
        fill_block(&mut b, 42, 3);
        assert!(sectors(&b, 3).iter().all(|s| *s == SectorContent::Written(42)));
        assert!(sectors(&b, 4).iter().all(|s| *s == SectorContent::Garbage), "another block's data");
        b[600] ^= 1;
        assert_eq!(sectors(&b, 3)[1], SectorContent::Garbage);
        assert_eq!(sectors(&b, 3)[0], SectorContent::Written(42));
    }
}
