//! [`MetaError`]: everything that can go wrong creating, opening or updating metadata.
//!
//! Every variant names where (`at`): `disk /x.img` for internal metadata, `meta /m.md`
//! for an external file, so an operator with several resources knows which one.

use std::io;

/// A metadata failure; the message names the place and says what to do where it can.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// A system call on the metadata (or the backing store) failed.
    #[error("{at}: {what}: {source}")]
    Io {
        at: String,
        /// What was being done, e.g. "reading superblock slot A".
        what: String,
        #[source]
        source: io::Error,
    },

    /// Neither superblock slot carries the magic: this was never initialised.
    #[error("{at}: no blockd metadata found (run `blockctl create-md`)")]
    NoMetadata { at: String },

    /// Metadata exists but no slot is usable (both corrupt or torn).
    #[error("{at}: no valid superblock: slot A: {slot_a}; slot B: {slot_b}")]
    NoValidSuperblock {
        at: String,
        /// Why slot A was rejected.
        slot_a: String,
        /// Why slot B was rejected.
        slot_b: String,
    },

    /// An intact superblock written by a newer (or unknown) format.
    #[error(
        "{at}: superblock slot {slot} has format version {version}; this blockd reads \
         version {supported} only"
    )]
    UnsupportedVersion { at: String, slot: char, version: u32, supported: u32 },

    /// `create` found valid metadata and `force` was not given.
    #[error(
        "{at}: valid blockd metadata already exists (resource {resource}, node {node}); \
         use --force to overwrite it"
    )]
    AlreadyExists { at: String, resource: String, node: String },

    /// Another process holds the metadata (normally a running `blockd`).
    #[error("{at}: metadata is in use by another process (is blockd running?)")]
    Busy { at: String },

    /// The backing store cannot hold the minimum data size plus the metadata area.
    #[error(
        "{at}: too small: {backing_bytes} bytes leave {data_bytes} bytes of data; at \
         least {min_data_bytes} bytes of data are needed"
    )]
    TooSmall { at: String, backing_bytes: u64, data_bytes: u64, min_data_bytes: u64 },

    /// The configured `resource.size` does not fit, or is itself too small.
    #[error("{at}: {detail}")]
    BadSize { at: String, detail: String },

    /// The external metadata device is smaller than the metadata area.
    #[error("{at}: too small for the metadata area: {have_bytes} bytes, need {need_bytes}")]
    MetaTooSmall { at: String, have_bytes: u64, need_bytes: u64 },

    /// A path that is neither a regular file nor a block device.
    #[error("{at}: not a regular file or block device")]
    NotFileOrDevice { at: String },

    /// Bitmap granularity outside 4 KiB..1 MiB or not a power of two.
    #[error("bitmap granularity {granularity_bytes} bytes: must be a power of two from 4 KiB to 1 MiB")]
    BadGranularity { granularity_bytes: u64 },

    /// A resource or node name that cannot be stored.
    #[error("{what} name {name:?}: {why}")]
    BadName { what: &'static str, name: String, why: &'static str },

    /// The metadata is valid but for another resource.
    #[error("{at}: metadata belongs to resource {found}, config says {expected}")]
    WrongResource { at: String, found: String, expected: String },

    /// The metadata is valid but for another node.
    #[error("{at}: metadata was created for node {found}, this is {expected}")]
    WrongNode { at: String, found: String, expected: String },

    /// The stored layout does not match the one computed for the store as it is now
    /// (the backing store changed size, or internal/external was switched).
    #[error("{at}: metadata layout mismatch: {detail}")]
    LayoutMismatch { at: String, detail: String },

    /// An `update` tried to change something that is fixed at `create` time, or to
    /// store a value the format cannot hold.
    #[error("{at}: refused metadata update: {detail}")]
    BadUpdate { at: String, detail: String },

    /// A bitmap block on disk does not match its crc32c in the table (a torn or
    /// corrupt block, or a torn table page). The caller must not use any of the bitmap:
    /// the safe fallback is to treat the whole device as out of sync.
    #[error(
        "{at}: bitmap block {block} is corrupt (crc32c in the table {expected:#010x}, of the \
         block {found:#010x}): the bitmap cannot be trusted"
    )]
    BitmapCorrupt { at: String, block: u64, expected: u32, found: u32 },

    /// A bitmap read or write that does not fit this metadata (wrong device size, block
    /// index past the bitmap area, a block whose crc is not its data's): a caller bug,
    /// refused before anything is written.
    #[error("{at}: refused bitmap I/O: {detail}")]
    BadBitmapIo { at: String, detail: String },

    /// `write_al` was given more extents than one activity-log slot holds.
    #[error(
        "{at}: refused activity-log write: {count} hot extents, one slot holds at most {max} \
         (lower resource.al-extents)"
    )]
    TooManyAlExtents { at: String, count: usize, max: u32 },

    /// `write_al` was given an extent past the end of the data area.
    #[error(
        "{at}: refused activity-log write: extent {extent} starts at byte {start_bytes}, past the \
         data area of {data_bytes} bytes"
    )]
    AlExtentOutOfRange { at: String, extent: u32, start_bytes: u64, data_bytes: u64 },
}

impl MetaError {
    pub(crate) fn io(at: &str, what: impl Into<String>, source: io::Error) -> MetaError {
        MetaError::Io { at: at.to_owned(), what: what.into(), source }
    }
}
