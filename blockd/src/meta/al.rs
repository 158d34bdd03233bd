//! The activity log (AL): the durable set of "hot" extents (4 MiB each) that may hold
//! writes not yet recorded in the bitmap. After a crash every hot extent counts as
//! dirty, so the bitmap only has to be written when an extent leaves the set.
//!
//! The 64 KiB area holds two 32 KiB slots written alternately, each with the whole set
//! (format in the module doc of [`super`]). A write goes to the slot *not* holding the
//! newest copy with `sequence + 1` and is synced before it counts; a torn write leaves
//! the other slot valid. Reading takes the valid slot with the highest sequence; slots
//! with a bad magic, version, crc or count are ignored, and none valid is the empty set
//! (a zeroed area after `create`).

use super::io::MetaFile;
use super::layout::{AL_AREA_BYTES, Layout};
use super::{MetaError, MetaStore};

/// What one AL slot can hold (checked by [`MetaStore::write_al`]). The config's
/// `al-extents` range ends here.
pub const MAX_AL_EXTENTS: u32 = crate::config::MAX_AL_EXTENTS_CONFIG;
/// `b"BLKDALOG"` at offset 0 of each AL slot.
pub const AL_MAGIC: [u8; 8] = *b"BLKDALOG";
/// The AL slot format this code writes and reads.
pub const AL_VERSION: u32 = 1;

const SLOT_BYTES: usize = (AL_AREA_BYTES / 2) as usize;
const SLOT_NAMES: [char; 2] = ['A', 'B'];

// Field offsets in a slot.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_CRC: usize = 12;
const OFF_SEQUENCE: usize = 16;
const OFF_COUNT: usize = 24;
const OFF_EXTENTS: usize = 28;

const _: () = assert!(OFF_EXTENTS + 4 * MAX_AL_EXTENTS as usize <= SLOT_BYTES, "a full AL must fit a slot");

/// Which slot holds the newest valid AL copy, and its sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AlNewest {
    pub slot: usize,
    pub sequence: u64,
}

/// One decoded slot.
#[derive(Debug, PartialEq, Eq)]
struct AlSlot {
    sequence: u64,
    extents: Vec<u32>,
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// crc32c of a slot with its crc field taken as zero.
fn slot_crc(slot: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&slot[..OFF_CRC]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &slot[OFF_CRC + 4..])
}

/// The 32 KiB slot image. The caller has checked `extents.len() <= MAX_AL_EXTENTS`.
fn encode(sequence: u64, extents: &[u32]) -> Vec<u8> {
    let mut s = vec![0u8; SLOT_BYTES];
    s[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&AL_MAGIC);
    s[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&AL_VERSION.to_le_bytes());
    s[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&sequence.to_le_bytes());
    s[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (chunk, e) in s[OFF_EXTENTS..].chunks_exact_mut(4).zip(extents) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    let crc = slot_crc(&s);
    s[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    s
}

/// Decodes one slot image; `None` when it is not a valid AL copy.
fn decode(slot: &[u8]) -> Option<AlSlot> {
    if slot.len() != SLOT_BYTES || slot[OFF_MAGIC..OFF_MAGIC + 8] != AL_MAGIC {
        return None;
    }
    if get_u32(slot, OFF_CRC) != slot_crc(slot) || get_u32(slot, OFF_VERSION) != AL_VERSION {
        return None;
    }
    let count = get_u32(slot, OFF_COUNT);
    if count > MAX_AL_EXTENTS {
        return None;
    }
    let sequence = u64::from_le_bytes(slot[OFF_SEQUENCE..OFF_SEQUENCE + 8].try_into().ok()?);
    let extents = slot[OFF_EXTENTS..].chunks_exact(4).take(count as usize).map(|c| get_u32(c, 0)).collect();
    Some(AlSlot { sequence, extents })
}

/// Both slots, decoded (`None`: invalid).
fn read_slots(file: &MetaFile, layout: &Layout) -> Result<[Option<AlSlot>; 2], MetaError> {
    let mut area = vec![0u8; 2 * SLOT_BYTES];
    file.read(&mut area, layout.al_offset_bytes, "activity log")?;
    let (a, b) = area.split_at(SLOT_BYTES);
    Ok([decode(a), decode(b)])
}

/// The newest valid slot (ties go to A, though writes never make one).
fn newest(slots: &[Option<AlSlot>; 2]) -> Option<(usize, &AlSlot)> {
    let mut best: Option<(usize, &AlSlot)> = None;
    for (i, s) in slots.iter().enumerate() {
        if let Some(s) = s
            && best.is_none_or(|(_, b)| s.sequence > b.sequence)
        {
            best = Some((i, s));
        }
    }
    best
}

/// Where the newest valid copy is, for [`MetaStore::open`].
pub(crate) fn load_newest(file: &MetaFile, layout: &Layout) -> Result<Option<AlNewest>, MetaError> {
    let slots = read_slots(file, layout)?;
    Ok(newest(&slots).map(|(slot, s)| AlNewest { slot, sequence: s.sequence }))
}

impl MetaStore {
    /// The hot extents of the newest valid AL slot, as written (empty if none was
    /// ever written or both slots are invalid). Extent `e` covers bytes
    /// `e * al_extent_bytes ..` of the device.
    pub fn read_al(&self) -> Result<Vec<u32>, MetaError> {
        let slots = read_slots(&self.file, &self.layout)?;
        Ok(newest(&slots).map(|(_, s)| s.extents.clone()).unwrap_or_default())
    }

    /// Durably records the whole hot set: writes it into the AL slot not holding the
    /// newest copy with the next sequence, then `fdatasync`s; only then is it the
    /// newest. At most [`MAX_AL_EXTENTS`], each starting inside the exported device.
    pub fn write_al(&mut self, extents: &[u32]) -> Result<(), MetaError> {
        let at = self.target.at_meta();
        if extents.len() > MAX_AL_EXTENTS as usize {
            return Err(MetaError::TooManyAlExtents { at, count: extents.len(), max: MAX_AL_EXTENTS });
        }
        let data_bytes = self.sb.data_size_bytes;
        // Saturating: the extent size is only known to be a power of two.
        let start = |e: u32| u64::from(e).saturating_mul(self.sb.al_extent_bytes);
        if let Some(&extent) = extents.iter().find(|&&e| start(e) >= data_bytes) {
            let start_bytes = start(extent);
            return Err(MetaError::AlExtentOutOfRange { at, extent, start_bytes, data_bytes });
        }
        let (slot, sequence) = match self.al {
            None => (0, 1),
            Some(n) => {
                let next = n.sequence.checked_add(1).ok_or_else(|| MetaError::BadUpdate {
                    at: at.clone(),
                    detail: "activity-log sequence number exhausted".to_owned(),
                })?;
                (1 - n.slot, next)
            }
        };
        let offset = self.layout.al_offset_bytes + (slot * SLOT_BYTES) as u64;
        // Durable by itself (range-limited), so a transaction does not wait for the
        // backing store's dirty data pages.
        self.file.write_durable(
            &encode(sequence, extents),
            offset,
            &format!("activity-log slot {}", SLOT_NAMES[slot]),
        )?;
        self.al = Some(AlNewest { slot, sequence });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_encoding_round_trips_and_rejects_damage() {
        let s = encode(7, &[3, 1, 4_000_000]);
        assert_eq!(&s[..8], b"BLKDALOG");
        assert_eq!(get_u32(&s, OFF_VERSION), 1);
        assert_eq!(get_u32(&s, OFF_COUNT), 3);
        assert_eq!(decode(&s), Some(AlSlot { sequence: 7, extents: vec![3, 1, 4_000_000] }));
        let full: Vec<u32> = (0..MAX_AL_EXTENTS).collect();
        assert_eq!(decode(&encode(1, &full)).map(|s| s.extents), Some(full));
        assert_eq!(decode(&encode(1, &[])).map(|s| s.extents), Some(vec![]));

        // Any flipped byte (magic, crc, sequence, count, extent, padding) invalidates it.
        for at in [0, 9, 13, 17, 25, 30, SLOT_BYTES - 1] {
            let mut bad = s.clone();
            bad[at] ^= 0x10;
            assert_eq!(decode(&bad), None, "byte {at}");
        }
        // A count beyond the maximum with a valid crc is still refused (not trusted to
        // size a read).
        let mut big = s.clone();
        big[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(MAX_AL_EXTENTS + 1).to_le_bytes());
        let crc = slot_crc(&big);
        big[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&big), None);
        assert_eq!(decode(&vec![0u8; SLOT_BYTES]), None);
    }
}
