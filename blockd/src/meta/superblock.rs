//! The superblock: its in-memory form ([`Superblock`]) and its 4 KiB on-disk slot
//! encoding (little-endian; the table is in the module doc of [`super`]).
//!
//! Decoding checks, in order: magic, crc32c, version, then every field's range. The
//! first three are at fixed offsets for every format version, so a bit flip is told
//! apart from a superblock written by a newer blockd.

use crate::state::{DiskState, Generations, HISTORY_LEN};

use super::layout::{Layout, MetaKind, SUPERBLOCK_SLOT_BYTES, granularity_ok};

/// `b"BLKDMETA"` at offset 0 of each slot.
pub const MAGIC: [u8; 8] = *b"BLKDMETA";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest resource or node name stored (bytes of UTF-8).
pub const NAME_MAX_BYTES: usize = 64;
/// Activity-log extent: 4 MiB, as DRBD.
pub const AL_EXTENT_BYTES: u64 = 4 << 20;
/// Default number of activity-log extents: the config's `al-extents` default (one
/// definition, there).
pub use crate::config::DEFAULT_AL_EXTENTS;

const SLOT: usize = SUPERBLOCK_SLOT_BYTES as usize;

// Field offsets in a slot.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_CRC: usize = 12;
const OFF_SEQUENCE: usize = 16;
const OFF_RESOURCE_ID: usize = 24;
const OFF_CREATED_AT: usize = 32;
const OFF_DATA_SIZE: usize = 40;
const OFF_GRANULARITY: usize = 48;
const OFF_AL_EXTENT_BYTES: usize = 56;
const OFF_AL_EXTENTS: usize = 64;
const OFF_FLAGS: usize = 68;
const OFF_DISK: usize = 72;
const OFF_KIND: usize = 73;
const OFF_GEN_CURRENT: usize = 80;
const OFF_GEN_BITMAP: usize = 88;
const OFF_GEN_HISTORY: usize = 96;
const OFF_LAYOUT: usize = 128;
const LAYOUT_FIELDS: usize = 6;
const OFF_RESOURCE: usize = 192;
const OFF_NODE: usize = 272;

/// Boolean state kept in the superblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetaFlags {
    /// The local data is consistent (not mid-resync as a target).
    pub consistent: bool,
    /// This node was Primary; still set after a crash (DRBD's crashed-primary).
    pub was_primary: bool,
    /// The daemon shut down cleanly (activity log empty, bitmap flushed).
    pub clean_shutdown: bool,
    /// The peer needs a full sync from this node (e.g. after `invalidate-remote`).
    pub peer_full_sync_needed: bool,
}

const FLAG_CONSISTENT: u32 = 1 << 0;
const FLAG_WAS_PRIMARY: u32 = 1 << 1;
const FLAG_CLEAN_SHUTDOWN: u32 = 1 << 2;
const FLAG_PEER_FULL_SYNC: u32 = 1 << 3;
const FLAGS_KNOWN: u32 = FLAG_CONSISTENT | FLAG_WAS_PRIMARY | FLAG_CLEAN_SHUTDOWN | FLAG_PEER_FULL_SYNC;

impl MetaFlags {
    fn bits(self) -> u32 {
        let mut b = 0;
        for (on, bit) in [
            (self.consistent, FLAG_CONSISTENT),
            (self.was_primary, FLAG_WAS_PRIMARY),
            (self.clean_shutdown, FLAG_CLEAN_SHUTDOWN),
            (self.peer_full_sync_needed, FLAG_PEER_FULL_SYNC),
        ] {
            if on {
                b |= bit;
            }
        }
        b
    }

    fn from_bits(b: u32) -> MetaFlags {
        MetaFlags {
            consistent: b & FLAG_CONSISTENT != 0,
            was_primary: b & FLAG_WAS_PRIMARY != 0,
            clean_shutdown: b & FLAG_CLEAN_SHUTDOWN != 0,
            peer_full_sync_needed: b & FLAG_PEER_FULL_SYNC != 0,
        }
    }
}

/// One node's persistent metadata header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped by every durable write; the slot with the highest valid one wins.
    pub sequence: u64,
    /// Random at `create`: names this metadata instance (each node draws its own).
    pub resource_id: u64,
    /// Resource name, for humans and to catch a config pointing at the wrong disk.
    pub resource: String,
    /// Node name, same purpose.
    pub node: String,
    /// The exported device size.
    pub data_size_bytes: u64,
    pub bitmap_granularity_bytes: u64,
    pub al_extent_bytes: u64,
    pub al_extents: u32,
    pub flags: MetaFlags,
    pub disk: DiskState,
    pub generations: Generations,
    pub created_at_unix_secs: u64,
}

/// Checks a name for storage in a slot.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > NAME_MAX_BYTES {
        Some("longer than 64 bytes")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else {
        None
    }
}

/// What a decoded slot says about the layout it was written for; compared with the
/// layout computed at open time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StoredGeometry {
    pub kind: MetaKind,
    /// area offset, area, bitmap offset, bitmap, AL offset, usable data (bytes).
    pub fields: [u64; LAYOUT_FIELDS],
}

impl StoredGeometry {
    pub fn of(layout: &Layout) -> StoredGeometry {
        StoredGeometry {
            kind: layout.kind,
            fields: [
                layout.area_offset_bytes,
                layout.area_bytes,
                layout.bitmap_offset_bytes,
                layout.bitmap_bytes,
                layout.al_offset_bytes,
                layout.data_bytes,
            ],
        }
    }
}

/// Why one slot was not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SlotProblem {
    /// No magic: never written, or overwritten.
    BadMagic,
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
    /// Intact, but written by another format version.
    Version(u32),
    /// Intact and our version, but a field is out of range.
    Invalid(String),
}

impl std::fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotProblem::BadMagic => f.write_str("bad magic"),
            SlotProblem::CrcMismatch { stored, computed } => {
                write!(f, "crc mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            SlotProblem::Version(v) => write!(f, "unsupported format version {v}"),
            SlotProblem::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn put_name(buf: &mut [u8], at: usize, name: &str) {
    buf[at] = name.len() as u8;
    buf[at + 1..at + 1 + name.len()].copy_from_slice(name.as_bytes());
}

fn get_name(buf: &[u8], at: usize, what: &str) -> Result<String, SlotProblem> {
    let len = buf[at] as usize;
    let bytes = buf.get(at + 1..at + 1 + len).filter(|_| len <= NAME_MAX_BYTES);
    let name = bytes
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| SlotProblem::Invalid(format!("{what} name is not 1..64 bytes of UTF-8")))?;
    match name_problem(name) {
        Some(why) => Err(SlotProblem::Invalid(format!("{what} name {why}"))),
        None => Ok(name.to_owned()),
    }
}

/// crc32c of a slot with its crc field taken as zero.
fn slot_crc(slot: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&slot[..OFF_CRC]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &slot[OFF_CRC + 4..])
}

impl Superblock {
    /// Checks the fields that the format or the layout constrain.
    pub(crate) fn check(&self, layout: &Layout) -> Result<(), String> {
        for (what, name) in [("resource", &self.resource), ("node", &self.node)] {
            if let Some(why) = name_problem(name) {
                return Err(format!("{what} name {name:?} {why}"));
            }
        }
        if !granularity_ok(self.bitmap_granularity_bytes) {
            return Err(format!("bitmap granularity {} bytes", self.bitmap_granularity_bytes));
        }
        if self.bitmap_granularity_bytes != layout.granularity_bytes {
            return Err(format!(
                "bitmap granularity {} bytes differs from the layout's {}",
                self.bitmap_granularity_bytes, layout.granularity_bytes
            ));
        }
        if self.data_size_bytes == 0 || self.data_size_bytes > layout.data_bytes {
            return Err(format!(
                "data size {} bytes is not in 1..={} (the usable data area)",
                self.data_size_bytes, layout.data_bytes
            ));
        }
        // More extents than an AL slot holds could never be recorded.
        let al_extents_ok = (1..=super::MAX_AL_EXTENTS).contains(&self.al_extents);
        if self.al_extent_bytes == 0 || !self.al_extent_bytes.is_power_of_two() || !al_extents_ok {
            return Err(format!(
                "activity log of {} extents of {} bytes",
                self.al_extents, self.al_extent_bytes
            ));
        }
        Ok(())
    }

    /// The 4 KiB slot image, crc included. The caller has [`Self::check`]ed `self`.
    pub(crate) fn encode(&self, layout: &Layout) -> Vec<u8> {
        let mut s = vec![0u8; SLOT];
        s[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut s, OFF_VERSION, FORMAT_VERSION);
        put_u64(&mut s, OFF_SEQUENCE, self.sequence);
        put_u64(&mut s, OFF_RESOURCE_ID, self.resource_id);
        put_u64(&mut s, OFF_CREATED_AT, self.created_at_unix_secs);
        put_u64(&mut s, OFF_DATA_SIZE, self.data_size_bytes);
        put_u64(&mut s, OFF_GRANULARITY, self.bitmap_granularity_bytes);
        put_u64(&mut s, OFF_AL_EXTENT_BYTES, self.al_extent_bytes);
        put_u32(&mut s, OFF_AL_EXTENTS, self.al_extents);
        put_u32(&mut s, OFF_FLAGS, self.flags.bits());
        s[OFF_DISK] = self.disk.code();
        s[OFF_KIND] = layout.kind.code();
        let g = &self.generations;
        put_u64(&mut s, OFF_GEN_CURRENT, g.current);
        put_u64(&mut s, OFF_GEN_BITMAP, g.bitmap);
        for (i, id) in g.history.iter().enumerate() {
            put_u64(&mut s, OFF_GEN_HISTORY + 8 * i, *id);
        }
        for (i, v) in StoredGeometry::of(layout).fields.iter().enumerate() {
            put_u64(&mut s, OFF_LAYOUT + 8 * i, *v);
        }
        put_name(&mut s, OFF_RESOURCE, &self.resource);
        put_name(&mut s, OFF_NODE, &self.node);
        let crc = slot_crc(&s);
        put_u32(&mut s, OFF_CRC, crc);
        s
    }

    /// Decodes one slot image. Range checks that need the layout are left to the
    /// caller ([`Self::check`]), which computes it from the granularity found here.
    pub(crate) fn decode(slot: &[u8]) -> Result<(Superblock, StoredGeometry), SlotProblem> {
        if slot.len() != SLOT || slot[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err(SlotProblem::BadMagic);
        }
        let (stored, computed) = (get_u32(slot, OFF_CRC), slot_crc(slot));
        if stored != computed {
            return Err(SlotProblem::CrcMismatch { stored, computed });
        }
        let version = get_u32(slot, OFF_VERSION);
        if version != FORMAT_VERSION {
            return Err(SlotProblem::Version(version));
        }
        let flags = get_u32(slot, OFF_FLAGS);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(SlotProblem::Invalid(format!("unknown flag bits {flags:#x}")));
        }
        let disk = DiskState::from_code(slot[OFF_DISK])
            .ok_or_else(|| SlotProblem::Invalid(format!("unknown disk state code {}", slot[OFF_DISK])))?;
        let kind = MetaKind::from_code(slot[OFF_KIND])
            .ok_or_else(|| SlotProblem::Invalid(format!("unknown placement code {}", slot[OFF_KIND])))?;
        let mut history = [0u64; HISTORY_LEN];
        for (i, id) in history.iter_mut().enumerate() {
            *id = get_u64(slot, OFF_GEN_HISTORY + 8 * i);
        }
        let mut fields = [0u64; LAYOUT_FIELDS];
        for (i, v) in fields.iter_mut().enumerate() {
            *v = get_u64(slot, OFF_LAYOUT + 8 * i);
        }
        let sb = Superblock {
            sequence: get_u64(slot, OFF_SEQUENCE),
            resource_id: get_u64(slot, OFF_RESOURCE_ID),
            resource: get_name(slot, OFF_RESOURCE, "resource")?,
            node: get_name(slot, OFF_NODE, "node")?,
            data_size_bytes: get_u64(slot, OFF_DATA_SIZE),
            bitmap_granularity_bytes: get_u64(slot, OFF_GRANULARITY),
            al_extent_bytes: get_u64(slot, OFF_AL_EXTENT_BYTES),
            al_extents: get_u32(slot, OFF_AL_EXTENTS),
            flags: MetaFlags::from_bits(flags),
            disk,
            generations: Generations {
                current: get_u64(slot, OFF_GEN_CURRENT),
                bitmap: get_u64(slot, OFF_GEN_BITMAP),
                history,
            },
            created_at_unix_secs: get_u64(slot, OFF_CREATED_AT),
        };
        Ok((sb, StoredGeometry { kind, fields }))
    }
}

/// The generation id `create --clear-bitmap` writes on both nodes: FNV-1a (64 bit)
/// over `"blockd clear-bitmap v1\0"`, the resource name, a NUL, and the exported
/// size as 8 little-endian bytes. Both nodes know these without talking, so equal
/// configs give equal ids and the first connect finds the disks in sync; another
/// resource or size gives another id. Never 0 (0 means "no generation").
pub fn clear_bitmap_gen(resource: &str, data_size_bytes: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let size = data_size_bytes.to_le_bytes();
    let bytes = b"blockd clear-bitmap v1\0".iter().chain(resource.as_bytes()).chain(&[0]).chain(&size);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}
