//! Errors of bitmap construction, union and decoding.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// The granularity is not a power of two in 4 KiB..=1 MiB.
    #[error("bitmap granularity {granularity_bytes} is not a power of two in 4096..=1048576")]
    BadGranularity { granularity_bytes: u64 },
    /// The device needs more bits than this platform can address.
    #[error("device of {device_bytes} bytes is too large for a bitmap at granularity {granularity_bytes}")]
    TooLarge { device_bytes: u64, granularity_bytes: u64 },
    /// Two bitmaps of different geometry cannot be merged.
    #[error(
        "bitmap geometry mismatch: {device_bytes} bytes @ {granularity_bytes} vs \
         {other_device_bytes} bytes @ {other_granularity_bytes}"
    )]
    GeometryMismatch {
        device_bytes: u64,
        granularity_bytes: u64,
        other_device_bytes: u64,
        other_granularity_bytes: u64,
    },
    /// A bits block does not match its stored crc32c.
    #[error("bitmap block {block} is corrupt: stored crc32c {expected:#010x}, computed {found:#010x}")]
    Corrupt { block: u64, expected: u32, found: u32 },
    /// An on-disk area is shorter than the geometry requires.
    #[error("bitmap {area} area truncated: need {needed} bytes, got {got}")]
    Truncated { area: &'static str, needed: u64, got: u64 },
}
