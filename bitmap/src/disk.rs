//! The on-disk encoding: 4 KiB blocks of little-endian u64 words, one crc32c per block.
//! See the crate overview for the format. No I/O here.

use crate::{BLOCK_BYTES, Bitmap, BitmapError, WORDS_PER_BLOCK};

impl Bitmap {
    /// Sizes `(bits area, crc area)` for this geometry, each rounded up to 4 KiB. The granularity
    /// is not validated here (pass one [`Bitmap::new`] accepts); zero is treated as one.
    pub fn on_disk_bytes(device_bytes: u64, granularity_bytes: u64) -> (u64, u64) {
        let blocks = Bitmap::blocks_for(device_bytes.div_ceil(granularity_bytes.max(1)));
        (blocks * BLOCK_BYTES as u64, (blocks * 4).next_multiple_of(BLOCK_BYTES as u64))
    }

    /// Indices of the on-disk blocks changed since the last [`mark_persisted`](Self::mark_persisted),
    /// ascending.
    pub fn changed_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.changed.iter_ones().map(|block| block as u64)
    }

    /// Encodes block `block` into `out` and returns its crc32c (to be stored little-endian at
    /// offset `4 * block` of the crc area). Panics if `block >= self.blocks()`.
    pub fn encode_block(&self, block: u64, out: &mut [u8; BLOCK_BYTES]) -> u32 {
        assert!(block < self.blocks(), "bitmap block {block} out of range ({} blocks)", self.blocks());
        let words = self.bits.as_raw_slice();
        let first = block as usize * WORDS_PER_BLOCK;
        let words = &words[first..words.len().min(first + WORDS_PER_BLOCK)];
        let (used, rest) = out.split_at_mut(words.len() * 8);
        for (chunk, word) in used.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        rest.fill(0);
        crc32c::crc32c(out)
    }

    /// Forgets the changed-block set (call once the changed blocks are durable).
    pub fn mark_persisted(&mut self) {
        self.changed.fill(false);
    }

    /// Rebuilds a bitmap from its areas, verifying every block's crc32c. `bits` and `crcs` may be
    /// longer than needed (padding is ignored). The result has no changed blocks. The areas are
    /// checked before anything is allocated, so a device size they cannot hold costs nothing.
    pub fn decode(
        device_bytes: u64,
        granularity_bytes: u64,
        bits: &[u8],
        crcs: &[u8],
    ) -> Result<Bitmap, BitmapError> {
        let (_, blocks) = Bitmap::geometry(device_bytes, granularity_bytes)?;
        // At most 2^37 blocks (2^52 granules of 4 KiB): the products below cannot overflow.
        let blocks = blocks as u64;
        let needed_bits = blocks * BLOCK_BYTES as u64;
        if (bits.len() as u64) < needed_bits {
            return Err(BitmapError::Truncated { area: "bits", needed: needed_bits, got: bits.len() as u64 });
        }
        if (crcs.len() as u64) < blocks * 4 {
            return Err(BitmapError::Truncated { area: "crc", needed: blocks * 4, got: crcs.len() as u64 });
        }
        let mut map = Bitmap::empty(device_bytes, granularity_bytes)?;
        for (block, (data, crc)) in bits.chunks_exact(BLOCK_BYTES).zip(crcs.chunks_exact(4)).enumerate() {
            if block as u64 == blocks {
                break;
            }
            let expected = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
            let found = crc32c::crc32c(data);
            if expected != found {
                return Err(BitmapError::Corrupt { block: block as u64, expected, found });
            }
        }
        let len_bits = map.len_bits();
        let words = map.bits.as_raw_mut_slice();
        for (word, chunk) in words.iter_mut().zip(bits.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        // Keep the invariant: no bits past len_bits.
        if len_bits % 64 != 0
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (len_bits % 64)) - 1;
        }
        map.recount();
        Ok(map)
    }

    /// ORs one encoded block (as [`Bitmap::encode_block`] makes it, e.g. the peer's
    /// bitmap at connect) into this map; bits past the device are ignored. Returns
    /// false (and changes nothing) if `block` is out of range.
    pub fn or_block(&mut self, block: u64, data: &[u8; BLOCK_BYTES]) -> bool {
        if block >= self.blocks() {
            return false;
        }
        let len_bits = self.len_bits();
        let first = block as usize * WORDS_PER_BLOCK;
        let words = self.bits.as_raw_mut_slice();
        let end = words.len().min(first + WORDS_PER_BLOCK);
        let last_word = words.len() - 1;
        let mut diff = 0;
        for (i, chunk) in (first..end).zip(data.chunks_exact(8)) {
            let mut theirs = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if i == last_word && !len_bits.is_multiple_of(64) {
                theirs &= (1u64 << (len_bits % 64)) - 1;
            }
            let merged = words[i] | theirs;
            diff |= merged ^ words[i];
            self.ones += u64::from((merged ^ words[i]).count_ones());
            words[i] = merged;
        }
        if diff != 0 {
            self.changed.set(block as usize, true);
        }
        true
    }
}
