//! The on-disk encoding of an undo journal: the header block and the record
//! header (layout in the module docs of [`super`]). Pure functions over byte
//! slices; all I/O is in the parent module.

use super::{Purpose, UndoHeader};

/// The header block's length; records start here.
pub const HEADER_BYTES: u64 = 4096;
/// A record's header, before its data.
pub const RECORD_HEADER_BYTES: u64 = 40;
/// The header block's first bytes.
pub const MAGIC: [u8; 8] = *b"BLKDUNDO";
/// Every record's first bytes.
pub const RECORD_MAGIC: [u8; 4] = *b"UREC";
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Smallest granule: a sector.
pub const MIN_GRANULE_BYTES: u32 = 512;
/// Largest granule: the largest bitmap granularity.
pub const MAX_GRANULE_BYTES: u32 = 1 << 20;

/// Where the header's crc32c sits (computed over the whole block with it zero).
const HEADER_CRC_AT: usize = 12;

/// The header with the journal's random id, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StoredHeader {
    pub header: UndoHeader,
    pub journal_id: u64,
}

/// Why a header block was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeaderProblem {
    Magic,
    Version(u32),
    Invalid(String),
}

/// Checks the fields a caller may choose: the geometry and the capacity.
pub(super) fn check_header(h: &UndoHeader) -> Result<(), String> {
    let g = h.granule_bytes;
    if !g.is_power_of_two() || !(MIN_GRANULE_BYTES..=MAX_GRANULE_BYTES).contains(&g) {
        return Err(format!(
            "granule of {g} bytes is not a power of two from {MIN_GRANULE_BYTES} to {MAX_GRANULE_BYTES}"
        ));
    }
    if h.device_size_bytes == 0 {
        return Err("device size is 0".into());
    }
    if h.capacity_bytes < HEADER_BYTES + RECORD_HEADER_BYTES + u64::from(g) {
        return Err(format!(
            "capacity of {} bytes holds no record (at least {} needed)",
            h.capacity_bytes,
            HEADER_BYTES + RECORD_HEADER_BYTES + u64::from(g)
        ));
    }
    Ok(())
}

pub(super) fn encode_header(s: &StoredHeader) -> Vec<u8> {
    let h = &s.header;
    let mut block = vec![0u8; HEADER_BYTES as usize];
    block[0..8].copy_from_slice(&MAGIC);
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    block[16..24].copy_from_slice(&s.journal_id.to_le_bytes());
    block[24..32].copy_from_slice(&h.device_size_bytes.to_le_bytes());
    block[32..36].copy_from_slice(&h.granule_bytes.to_le_bytes());
    block[36..40].copy_from_slice(&h.purpose.code().to_le_bytes());
    block[40..48].copy_from_slice(&h.capacity_bytes.to_le_bytes());
    block[48..56].copy_from_slice(&h.generation.to_le_bytes());
    block[56..64].copy_from_slice(&h.created_unix_s.to_le_bytes());
    let crc = crc32c::crc32c(&block);
    block[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    block
}

pub(super) fn decode_header(block: &[u8]) -> Result<StoredHeader, HeaderProblem> {
    if block.len() < HEADER_BYTES as usize || block[0..8] != MAGIC {
        return Err(HeaderProblem::Magic);
    }
    let block = &block[..HEADER_BYTES as usize];
    let version = u32_at(block, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderProblem::Version(version));
    }
    let stored_crc = u32_at(block, HEADER_CRC_AT);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&block[..HEADER_CRC_AT]), &[0; 4]);
    let crc = crc32c::crc32c_append(crc, &block[HEADER_CRC_AT + 4..]);
    if crc != stored_crc {
        return Err(HeaderProblem::Invalid(format!(
            "checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
        )));
    }
    let purpose = Purpose::from_code(u32_at(block, 36))
        .ok_or_else(|| HeaderProblem::Invalid(format!("unknown purpose code {}", u32_at(block, 36))))?;
    let header = UndoHeader {
        device_size_bytes: u64_at(block, 24),
        granule_bytes: u32_at(block, 32),
        capacity_bytes: u64_at(block, 40),
        purpose,
        generation: u64_at(block, 48),
        created_unix_s: u64_at(block, 56),
    };
    check_header(&header).map_err(HeaderProblem::Invalid)?;
    Ok(StoredHeader { header, journal_id: u64_at(block, 16) })
}

/// A record's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RecordHeader {
    pub journal_id: u64,
    pub seq: u64,
    pub offset_bytes: u64,
    pub data_len: u32,
    pub reserved: u32,
}

/// Appends a record (header, then `data`) to `out`.
pub(super) fn encode_record(out: &mut Vec<u8>, journal_id: u64, seq: u64, offset_bytes: u64, data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&journal_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset_bytes.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(data);
    let crc = record_crc(&out[start..start + RECORD_HEADER_BYTES as usize], data);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The header of a record, if `bytes` starts with the record magic; the checksum is
/// checked later, with the data ([`record_crc_ok`]).
pub(super) fn decode_record_header(bytes: &[u8]) -> Option<RecordHeader> {
    if bytes.len() < RECORD_HEADER_BYTES as usize || bytes[0..4] != RECORD_MAGIC {
        return None;
    }
    Some(RecordHeader {
        journal_id: u64_at(bytes, 8),
        seq: u64_at(bytes, 16),
        offset_bytes: u64_at(bytes, 24),
        data_len: u32_at(bytes, 32),
        reserved: u32_at(bytes, 36),
    })
}

/// Whether the stored checksum of the record whose header is `header` covers
/// `header` and `data`.
pub(super) fn record_crc_ok(header: &[u8], data: &[u8]) -> bool {
    u32_at(header, 4) == record_crc(header, data)
}

/// crc32c over the header from byte 8 on (magic and the crc field left out), then
/// the data.
fn record_crc(header: &[u8], data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[8..RECORD_HEADER_BYTES as usize]), data)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
