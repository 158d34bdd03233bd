//! Dirty-region bitmap: one bit per granule of a replicated device.
//!
//! # Types
//! - [`Bitmap`]: the bits (`bitvec` `BitVec<u64, Lsb0>`), the geometry (device size, granularity)
//!   and a coarse "changed" set (one bit per 4 KiB on-disk block) for incremental persistence.
//! - [`BitmapError`]: bad geometry, mismatched geometry in a union, and on-disk corruption or
//!   truncation found by [`Bitmap::decode`].
//!
//! # Invariants
//! - The granularity is a power of two in 4 KiB..=1 MiB; there are
//!   `len_bits = ceil(device_bytes / granularity)` bits. The last granule may extend past the end
//!   of the device; every byte range this crate returns is clamped to `device_bytes`.
//! - Bit `i` set ⇔ bytes `[i * g, (i + 1) * g)` may differ from the peer. Setting marks every
//!   granule a byte range touches; clearing clears only granules fully inside the range (the last,
//!   partial granule counts as fully inside when the range reaches the device end).
//! - Bits past `len_bits` in the last storage word are always zero.
//! - Every mutation records the on-disk blocks it changed; [`Bitmap::changed_blocks`] lists them
//!   until [`Bitmap::mark_persisted`]. A new bitmap has *all* blocks changed (it was never
//!   written: a zeroed area does not pass the crc check); a decoded one has none.
//!
//! # On-disk format (encode/decode only; the caller owns the I/O and the placement of the areas)
//! - **Bits area**: `ceil(len_bits / 32768)` blocks of 4096 bytes. Bit `i` of the device is bit
//!   `i % 64` of little-endian `u64` word `i / 64`; block `b` holds words `512 b .. 512 (b + 1)`.
//!   Bits past `len_bits` (and words past the last one) are written as zero and ignored on read.
//! - **Crc area**: one crc32c (Castagnoli) per bits block, of its 4096 bytes, stored as
//!   little-endian `u32` at offset `4 b`; the area is rounded up to 4 KiB (the padding is zero
//!   and not checked).
//! - Both sizes come from [`Bitmap::on_disk_bytes`]. Blocks are independent, so a changed block
//!   is persisted by writing its 4 KiB and its crc (see [`Bitmap::encode_block`]).

mod disk;
mod error;
mod map;
mod runs;
#[cfg(test)]
mod tests;

pub use error::BitmapError;
pub use map::Bitmap;
pub use runs::Runs;

/// Bytes of one on-disk bitmap block.
pub const BLOCK_BYTES: usize = 4096;
/// Device bits held by one on-disk block.
pub const BITS_PER_BLOCK: u64 = BLOCK_BYTES as u64 * 8;
/// Smallest granularity.
pub const MIN_GRANULARITY: u64 = 4096;
/// Largest granularity.
pub const MAX_GRANULARITY: u64 = 1 << 20;
/// Default granularity.
pub const DEFAULT_GRANULARITY: u64 = 4096;

const WORDS_PER_BLOCK: usize = BLOCK_BYTES / 8;
