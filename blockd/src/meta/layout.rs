//! Where the metadata areas and the data live: a pure computation from the backing
//! store's size, the bitmap granularity and internal/external placement.
//!
//! The metadata area is three 4 KiB-aligned parts: the bitmap area (one bit per
//! granule for one peer, then one crc32c per 4 KiB bitmap block), the activity-log
//! area (64 KiB) and the superblock area (two 4 KiB slots, A then B).
//!
//! - Internal: `[data][bitmap][AL][superblock A][superblock B]`, the area ending at the
//!   backing size rounded down to 4 KiB, so the superblock sits at a place known from
//!   the backing size alone. The data is the largest 4 KiB multiple that fits in
//!   front of the area sized for it.
//! - External: `[superblock A][superblock B][AL][bitmap]` at the start of the
//!   metadata file, mirrored so that the superblock again sits at a fixed place (offset
//!   0) that does not depend on the granularity stored inside it. The data is the
//!   whole backing store rounded down to 4 KiB.
//!
//! All offsets in [`Layout`] are absolute byte offsets in the metadata file (the
//! backing store for internal metadata).

use crate::config::{MAX_BITMAP_GRANULARITY, MIN_BITMAP_GRANULARITY, MetaLocation};

/// Alignment of every area, and of the data size.
pub const BLOCK_BYTES: u64 = 4096;
/// One superblock slot.
pub const SUPERBLOCK_SLOT_BYTES: u64 = 4096;
/// Both slots.
pub const SUPERBLOCK_AREA_BYTES: u64 = 2 * SUPERBLOCK_SLOT_BYTES;
/// The activity-log area (fixed for format version 1).
pub const AL_AREA_BYTES: u64 = 64 << 10;
/// Smaller data areas are refused: such a device is a typo, not a use case.
pub const MIN_DATA_BYTES: u64 = 1 << 20;

/// Internal or external placement, as stored in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaKind {
    /// At the end of the backing store.
    Internal,
    /// At the start of a separate file or device.
    External,
}

impl MetaKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            MetaKind::Internal => 1,
            MetaKind::External => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<MetaKind> {
        match code {
            1 => Some(MetaKind::Internal),
            2 => Some(MetaKind::External),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MetaKind::Internal => "internal",
            MetaKind::External => "external",
        }
    }
}

impl From<&MetaLocation> for MetaKind {
    fn from(location: &MetaLocation) -> MetaKind {
        match location {
            MetaLocation::Internal => MetaKind::Internal,
            MetaLocation::External(_) => MetaKind::External,
        }
    }
}

/// The computed placement of data and metadata. Every offset and length is a multiple
/// of [`BLOCK_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kind: MetaKind,
    /// Length of the backing store the layout was computed for.
    pub backing_bytes: u64,
    /// Bytes per bitmap bit.
    pub granularity_bytes: u64,
    /// Usable data bytes at the start of the backing store: the largest size the
    /// device can export (the superblock may export less, see `resource.size`).
    pub data_bytes: u64,
    /// Where the whole metadata area starts in the metadata file.
    pub area_offset_bytes: u64,
    pub area_bytes: u64,
    /// The bitmap area: `bitmap_bits_bytes` of bits, then the crc32c table.
    pub bitmap_offset_bytes: u64,
    pub bitmap_bytes: u64,
    /// The bits part: `ceil(data_bytes / granularity / 8)` rounded up to 4 KiB.
    pub bitmap_bits_bytes: u64,
    /// The activity-log area.
    pub al_offset_bytes: u64,
    pub al_bytes: u64,
    /// Slot A; slot B follows it.
    pub superblock_offset_bytes: u64,
}

/// Why no layout exists for the given inputs (the caller adds the path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    BadGranularity { granularity_bytes: u64 },
    TooSmall { backing_bytes: u64, data_bytes: u64 },
}

impl LayoutError {
    pub(crate) fn at(self, at: &str) -> super::MetaError {
        match self {
            LayoutError::BadGranularity { granularity_bytes } => {
                super::MetaError::BadGranularity { granularity_bytes }
            }
            LayoutError::TooSmall { backing_bytes, data_bytes } => super::MetaError::TooSmall {
                at: at.to_owned(),
                backing_bytes,
                data_bytes,
                min_data_bytes: MIN_DATA_BYTES,
            },
        }
    }
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

fn round_down(x: u64, to: u64) -> u64 {
    x / to * to
}

/// Checks a bitmap granularity: a power of two from 4 KiB to 1 MiB.
pub fn granularity_ok(granularity_bytes: u64) -> bool {
    granularity_bytes.is_power_of_two()
        && (MIN_BITMAP_GRANULARITY..=MAX_BITMAP_GRANULARITY).contains(&granularity_bytes)
}

/// (bits part, whole bitmap area) for `data_bytes` of data.
fn bitmap_sizes(data_bytes: u64, granularity_bytes: u64) -> (u64, u64) {
    let bits = data_bytes.div_ceil(granularity_bytes);
    let bits_bytes = round_up(bits.div_ceil(8), BLOCK_BYTES);
    // One crc32c (4 bytes) per 4 KiB block of bits, so a torn bitmap block is detected.
    let crc_bytes = round_up(bits_bytes / BLOCK_BYTES * 4, BLOCK_BYTES);
    (bits_bytes, bits_bytes + crc_bytes)
}

/// The whole metadata area for `data_bytes` of data.
fn area_bytes_for(data_bytes: u64, granularity_bytes: u64) -> u64 {
    bitmap_sizes(data_bytes, granularity_bytes).1 + AL_AREA_BYTES + SUPERBLOCK_AREA_BYTES
}

impl Layout {
    /// Computes the layout for a backing store of `backing_bytes`.
    ///
    /// Internal metadata: the data size depends on the bitmap size, which depends on
    /// the data size. `d + area(d)` grows with `d`, so the largest fitting `d` is found
    /// by binary search over 4 KiB units: exact, and at most 64 steps whatever the size.
    pub fn compute(
        backing_bytes: u64,
        granularity_bytes: u64,
        location: &MetaLocation,
    ) -> Result<Layout, LayoutError> {
        if !granularity_ok(granularity_bytes) {
            return Err(LayoutError::BadGranularity { granularity_bytes });
        }
        let usable = round_down(backing_bytes, BLOCK_BYTES);
        let kind = MetaKind::from(location);
        let data_bytes = match kind {
            MetaKind::Internal => {
                let fits = |blocks: u64| {
                    let d = blocks * BLOCK_BYTES;
                    d.checked_add(area_bytes_for(d, granularity_bytes)).is_some_and(|end| end <= usable)
                };
                // Invariant: `lo` fits (or is 0), `hi + 1` does not.
                let (mut lo, mut hi) = (0u64, usable / BLOCK_BYTES);
                while lo < hi {
                    let mid = lo + (hi - lo).div_ceil(2);
                    if fits(mid) { lo = mid } else { hi = mid - 1 }
                }
                if fits(lo) { lo * BLOCK_BYTES } else { 0 }
            }
            MetaKind::External => usable,
        };
        if data_bytes < MIN_DATA_BYTES {
            return Err(LayoutError::TooSmall { backing_bytes, data_bytes });
        }
        let (bitmap_bits_bytes, bitmap_bytes) = bitmap_sizes(data_bytes, granularity_bytes);
        let area_bytes = bitmap_bytes + AL_AREA_BYTES + SUPERBLOCK_AREA_BYTES;
        let layout = match kind {
            MetaKind::Internal => {
                let area_offset_bytes = usable - area_bytes;
                Layout {
                    area_offset_bytes,
                    bitmap_offset_bytes: area_offset_bytes,
                    al_offset_bytes: area_offset_bytes + bitmap_bytes,
                    superblock_offset_bytes: usable - SUPERBLOCK_AREA_BYTES,
                    ..Layout::base(kind, backing_bytes, granularity_bytes, data_bytes)
                }
            }
            MetaKind::External => Layout {
                area_offset_bytes: 0,
                superblock_offset_bytes: 0,
                al_offset_bytes: SUPERBLOCK_AREA_BYTES,
                bitmap_offset_bytes: SUPERBLOCK_AREA_BYTES + AL_AREA_BYTES,
                ..Layout::base(kind, backing_bytes, granularity_bytes, data_bytes)
            },
        };
        Ok(Layout { area_bytes, bitmap_bytes, bitmap_bits_bytes, ..layout })
    }

    fn base(kind: MetaKind, backing_bytes: u64, granularity_bytes: u64, data_bytes: u64) -> Layout {
        Layout {
            kind,
            backing_bytes,
            granularity_bytes,
            data_bytes,
            area_offset_bytes: 0,
            area_bytes: 0,
            bitmap_offset_bytes: 0,
            bitmap_bytes: 0,
            bitmap_bits_bytes: 0,
            al_offset_bytes: 0,
            al_bytes: AL_AREA_BYTES,
            superblock_offset_bytes: 0,
        }
    }

    /// Where the superblock slots are, from the backing store's length alone (that is
    /// how `open` finds them before it knows the granularity).
    pub fn superblock_offset_for(kind: MetaKind, backing_bytes: u64) -> Option<u64> {
        match kind {
            MetaKind::Internal => round_down(backing_bytes, BLOCK_BYTES).checked_sub(SUPERBLOCK_AREA_BYTES),
            MetaKind::External => Some(0),
        }
    }

    /// Offset of slot `index` (0 = A, 1 = B).
    pub fn slot_offset_bytes(&self, index: usize) -> u64 {
        self.superblock_offset_bytes + index as u64 * SUPERBLOCK_SLOT_BYTES
    }

    /// The crc32c table of the bitmap area (one u32 per 4 KiB block of bits).
    pub fn bitmap_crc_offset_bytes(&self) -> u64 {
        self.bitmap_offset_bytes + self.bitmap_bits_bytes
    }

    /// Where the metadata area ends: the least length of an external metadata file.
    pub fn area_end_bytes(&self) -> u64 {
        self.area_offset_bytes + self.area_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn locations() -> [MetaLocation; 2] {
        [MetaLocation::Internal, MetaLocation::External(PathBuf::from("/m.md"))]
    }

    /// Sizes from the smallest accepted to 16 TiB: round numbers, odd ones around
    /// them, and a deterministic pseudo-random spread.
    fn sizes() -> Vec<u64> {
        let mut v = vec![MIB + 80 * KIB, MIB + 81 * KIB, 2 * MIB, 10 * MIB + 7, GIB, GIB - 512, TIB];
        v.extend([TIB + 4095, 4 * TIB, 16 * TIB, 16 * TIB - 1, 3 * GIB + 123_456_789]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            // xorshift64: reproducible without a seed file.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(2 * MIB + x % (16 * TIB - 2 * MIB));
        }
        v
    }

    fn check(l: &Layout) {
        let aligned = [
            l.data_bytes,
            l.area_offset_bytes,
            l.area_bytes,
            l.bitmap_offset_bytes,
            l.bitmap_bytes,
            l.bitmap_bits_bytes,
            l.al_offset_bytes,
            l.al_bytes,
            l.superblock_offset_bytes,
        ];
        assert!(aligned.iter().all(|x| x % BLOCK_BYTES == 0), "{l:?}");
        assert!(l.data_bytes >= MIN_DATA_BYTES);
        // The bitmap covers every granule of the data, and the crc table has a slot
        // per bitmap block.
        assert!(l.bitmap_bits_bytes * 8 * l.granularity_bytes >= l.data_bytes, "{l:?}");
        assert!(l.bitmap_bytes - l.bitmap_bits_bytes >= l.bitmap_bits_bytes / BLOCK_BYTES * 4);
        // The three parts tile the area exactly, in order, without overlap.
        let mut parts = [
            (l.bitmap_offset_bytes, l.bitmap_bytes),
            (l.al_offset_bytes, l.al_bytes),
            (l.superblock_offset_bytes, SUPERBLOCK_AREA_BYTES),
        ];
        parts.sort();
        assert_eq!(parts[0].0, l.area_offset_bytes);
        for w in parts.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "{l:?}");
        }
        assert_eq!(parts[2].0 + parts[2].1, l.area_end_bytes());
        assert_eq!(l.area_bytes, l.bitmap_bytes + l.al_bytes + SUPERBLOCK_AREA_BYTES);
        assert_eq!(Layout::superblock_offset_for(l.kind, l.backing_bytes), Some(l.superblock_offset_bytes));
        match l.kind {
            MetaKind::Internal => {
                // Data first, then the area, all inside the backing store, area at the
                // (4 KiB-rounded) end.
                assert!(l.data_bytes <= l.area_offset_bytes, "{l:?}");
                assert_eq!(l.area_end_bytes(), l.backing_bytes / BLOCK_BYTES * BLOCK_BYTES);
                // Maximal: one more 4 KiB of data would not fit with its bitmap.
                let more = l.data_bytes + BLOCK_BYTES;
                assert!(more + area_bytes_for(more, l.granularity_bytes) > l.area_end_bytes());
            }
            MetaKind::External => {
                assert_eq!(l.area_offset_bytes, 0);
                assert_eq!(l.superblock_offset_bytes, 0);
                assert_eq!(l.data_bytes, l.backing_bytes / BLOCK_BYTES * BLOCK_BYTES);
            }
        }
    }

    #[test]
    fn properties_over_sizes_and_granularities() {
        for loc in locations() {
            for &size in &sizes() {
                for shift in 12..=20 {
                    let l = Layout::compute(size, 1 << shift, &loc).unwrap();
                    assert_eq!((l.backing_bytes, l.granularity_bytes), (size, 1 << shift));
                    check(&l);
                }
            }
        }
    }

    #[test]
    fn known_sizes() {
        // 1 TiB at 4 KiB: 32 MiB of bits (SPEC §5), 32 KiB of crcs.
        let l = Layout::compute(TIB, 4096, &MetaLocation::External("/m".into())).unwrap();
        assert_eq!((l.data_bytes, l.bitmap_bits_bytes), (TIB, 32 * MIB));
        assert_eq!(l.bitmap_bytes, 32 * MIB + 32 * KIB);
        assert_eq!(l.area_bytes, 32 * MIB + 32 * KIB + 64 * KIB + 8 * KIB);
        let l = Layout::compute(TIB, 4096, &MetaLocation::Internal).unwrap();
        assert_eq!(l.superblock_offset_bytes, TIB - 8 * KIB);
        assert_eq!(l.data_bytes, l.area_offset_bytes);
        assert!(TIB - l.data_bytes < 33 * MIB);
    }

    #[test]
    fn refuses_small_devices_and_bad_granularity() {
        // Internal: 1 MiB of data needs 4 KiB bits + 4 KiB crcs + 64 KiB AL + 8 KiB.
        let min = MIB + 80 * KIB;
        assert_eq!(Layout::compute(min, 4096, &MetaLocation::Internal).unwrap().data_bytes, MIB);
        for small in [0, 4096, 100 * KIB, min - 1] {
            let e = Layout::compute(small, 4096, &MetaLocation::Internal).unwrap_err();
            assert!(matches!(e, LayoutError::TooSmall { .. }), "{small}: {e:?}");
        }
        let ext = MetaLocation::External("/m".into());
        assert!(Layout::compute(MIB, 4096, &ext).is_ok());
        assert!(matches!(Layout::compute(MIB - 1, 4096, &ext), Err(LayoutError::TooSmall { .. })));
        for g in [0, 512, 2048, 4097, 3 << 12, 2 << 20] {
            let e = Layout::compute(GIB, g, &MetaLocation::Internal).unwrap_err();
            assert_eq!(e, LayoutError::BadGranularity { granularity_bytes: g });
        }
        // Absurd sizes do not overflow.
        assert!(Layout::compute(u64::MAX, 4096, &MetaLocation::Internal).is_ok());
    }
}
