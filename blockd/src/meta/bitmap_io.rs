//! The persistent dirty bitmap: reading and checking the bitmap area, writing changed
//! blocks with their crc32c, and the valid empty bitmap that `create` writes.
//!
//! The encoding of the area belongs to the `bitmap` crate ([`Bitmap::decode`],
//! [`Bitmap::encode_block`]); this module owns where it lives ([`Layout`]) and the I/O.
//! The crc table is also kept in memory ([`CrcTable`], loaded at open) so that a crc
//! update rewrites its 4 KiB table page from memory instead of reading it first.
//!
//! Durability: [`MetaStore::write_bitmap_blocks`] writes the bits blocks, then the
//! touched table pages, then issues one `fdatasync`. A crash before the sync can leave a
//! block whose bits and crc disagree; [`MetaStore::read_bitmap`] then reports
//! [`MetaError::BitmapCorrupt`] and the caller must fall back to a full sync. That is
//! the safe direction: a bitmap is never trusted unless every block checks out.

use std::collections::BTreeSet;
use std::fmt;

use bitmap::{Bitmap, BitmapError};

use super::io::MetaFile;
use super::layout::Layout;
use super::{MetaError, MetaStore};

/// Bytes of one bitmap block, and of one crc-table page.
const BLOCK_BYTES: usize = bitmap::BLOCK_BYTES;
/// Little-endian u32 crc entries per 4 KiB table page.
const CRCS_PER_PAGE: u64 = (BLOCK_BYTES / 4) as u64;
/// Table pages per `write` when `create` fills the whole table: bounds the buffer
/// (1 MiB) whatever the device size.
const FILL_CHUNK_PAGES: u64 = 256;

/// One encoded 4 KiB bitmap block ready to be written (made by the core from
/// [`Bitmap::encode_block`]).
#[derive(Clone, Debug)]
pub struct BitmapBlock {
    /// Block number in the bits area (block `b` holds device bits `32768 b ..`).
    pub index: u64,
    pub data: Box<[u8; BLOCK_BYTES]>,
    /// crc32c of `data`, as `encode_block` returned it.
    pub crc: u32,
}

/// The in-memory copy of the crc table: one crc32c per bitmap block of the layout's
/// bits area (which may be more blocks than the exported size needs).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CrcTable(Vec<u32>);

impl fmt::Debug for CrcTable {
    // Up to hundreds of thousands of entries: a Debug of the store must stay readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrcTable({} blocks)", self.0.len())
    }
}

/// The crc32c of an all-zero block (not 0: crc32c pre- and post-inverts).
pub(crate) fn zero_block_crc() -> u32 {
    crc32c::crc32c(&[0u8; BLOCK_BYTES])
}

impl CrcTable {
    /// Number of bitmap blocks in the layout's bits area.
    fn blocks_in(layout: &Layout) -> u64 {
        layout.bitmap_bits_bytes / BLOCK_BYTES as u64
    }

    /// The table of an empty bitmap: every block all zero.
    pub fn empty(layout: &Layout) -> CrcTable {
        CrcTable(vec![zero_block_crc(); Self::blocks_in(layout) as usize])
    }

    /// Reads the table from disk as it is, without checking it against the bits (that
    /// is [`MetaStore::read_bitmap`]'s job).
    pub fn load(file: &MetaFile, layout: &Layout) -> Result<CrcTable, MetaError> {
        let mut raw = vec![0u8; Self::blocks_in(layout) as usize * 4];
        file.read(&mut raw, layout.bitmap_crc_offset_bytes(), "bitmap crc table")?;
        let crcs = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(CrcTable(crcs))
    }

    pub fn len_blocks(&self) -> u64 {
        self.0.len() as u64
    }

    fn pages(&self) -> u64 {
        self.len_blocks().div_ceil(CRCS_PER_PAGE)
    }

    /// Appends table page `page` (its entries little-endian, zero padding past the last
    /// block) to `out`.
    fn put_page(&self, page: u64, out: &mut Vec<u8>) {
        let first = (page * CRCS_PER_PAGE) as usize;
        let last = (first + CRCS_PER_PAGE as usize).min(self.0.len());
        let start = out.len();
        for crc in self.0.get(first..last).unwrap_or_default() {
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out.resize(start + BLOCK_BYTES, 0);
    }

    /// Writes the whole table (not synced), in bounded chunks.
    pub fn write_all(&self, file: &MetaFile, layout: &Layout) -> Result<(), MetaError> {
        let mut buf = Vec::with_capacity(FILL_CHUNK_PAGES as usize * BLOCK_BYTES);
        let mut page = 0;
        while page < self.pages() {
            let end = (page + FILL_CHUNK_PAGES).min(self.pages());
            buf.clear();
            for p in page..end {
                self.put_page(p, &mut buf);
            }
            let offset = layout.bitmap_crc_offset_bytes() + page * BLOCK_BYTES as u64;
            file.write(&buf, offset, "bitmap crc table")?;
            page = end;
        }
        Ok(())
    }
}

impl MetaStore {
    /// Reads the bitmap area and checks every block's crc32c against the crc table on
    /// disk. `device_bytes` is the exported size (the bits cover granules of
    /// `bitmap_granularity_bytes`); it must fit the data area.
    ///
    /// A mismatch is [`MetaError::BitmapCorrupt`] naming the block: the bitmap is never
    /// returned partly trusted.
    pub fn read_bitmap(&self, device_bytes: u64) -> Result<Bitmap, MetaError> {
        let at = self.target.at_meta();
        let (bits, crcs) = self.read_bitmap_area(device_bytes)?;
        let granularity_bytes = self.sb.bitmap_granularity_bytes;
        Bitmap::decode(device_bytes, granularity_bytes, &bits, &crcs).map_err(|e| match e {
            BitmapError::Corrupt { block, expected, found } => {
                MetaError::BitmapCorrupt { at, block, expected, found }
            }
            other => MetaError::BadBitmapIo { at, detail: other.to_string() },
        })
    }

    /// Like [`MetaStore::read_bitmap`], but a block whose crc does not match is not
    /// trusted *and not fatal*: all its bits are set (its whole region will be
    /// resynced). Returns the map and the indexes of such blocks. For the start after
    /// an unclean stop, when a bitmap write may have been torn between a block and its
    /// crc table page.
    pub fn read_bitmap_salvaging(&self, device_bytes: u64) -> Result<(Bitmap, Vec<u64>), MetaError> {
        let at = self.target.at_meta();
        let (mut bits, mut crcs) = self.read_bitmap_area(device_bytes)?;
        let granularity_bytes = self.sb.bitmap_granularity_bytes;
        let mut bad = Vec::new();
        for (index, (block, crc)) in
            bits.chunks_exact_mut(BLOCK_BYTES).zip(crcs.chunks_exact_mut(4)).enumerate()
        {
            if crc32c::crc32c(block).to_le_bytes() != *crc {
                block.fill(0xff);
                crc.copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
                bad.push(index as u64);
            }
        }
        let map = Bitmap::decode(device_bytes, granularity_bytes, &bits, &crcs)
            .map_err(|e| MetaError::BadBitmapIo { at, detail: e.to_string() })?;
        Ok((map, bad))
    }

    /// The bits and the crc table as they are on disk (the table on disk, not the
    /// copy in memory: this answers whether what a restart would read can be
    /// trusted), for a bitmap of `device_bytes`, which must fit the data area.
    fn read_bitmap_area(&self, device_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), MetaError> {
        if device_bytes > self.layout.data_bytes {
            let detail = format!(
                "a bitmap for {device_bytes} bytes does not fit the data area of {} bytes",
                self.layout.data_bytes
            );
            return Err(MetaError::BadBitmapIo { at: self.target.at_meta(), detail });
        }
        // Within the layout's areas, since device_bytes <= data_bytes at the same
        // granularity.
        let (bits_bytes, crc_bytes) = Bitmap::on_disk_bytes(device_bytes, self.sb.bitmap_granularity_bytes);
        let mut bits = vec![0u8; bits_bytes as usize];
        self.file.read(&mut bits, self.layout.bitmap_offset_bytes, "bitmap blocks")?;
        let mut crcs = vec![0u8; crc_bytes as usize];
        self.file.read(&mut crcs, self.layout.bitmap_crc_offset_bytes(), "bitmap crc table")?;
        Ok((bits, crcs))
    }

    /// Writes `blocks` into the bits area and their crcs into the crc table (one 4 KiB
    /// page write per touched page, from the in-memory table), then one `fdatasync`.
    ///
    /// Every block is checked first (index inside the bitmap area, crc matching its
    /// data), so a refused call writes nothing. On an I/O error the in-memory table
    /// still describes the bits that were written, and a retry rewrites them.
    pub fn write_bitmap_blocks(&mut self, blocks: &[BitmapBlock]) -> Result<(), MetaError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let at = self.target.at_meta();
        for b in blocks {
            let detail = if b.index >= self.crcs.len_blocks() {
                format!("block {} is past the bitmap area ({} blocks)", b.index, self.crcs.len_blocks())
            } else if crc32c::crc32c(&b.data[..]) != b.crc {
                // Writing it would plant a block that reads back as corrupt.
                format!("block {}: the given crc {:#010x} is not its data's", b.index, b.crc)
            } else {
                continue;
            };
            return Err(MetaError::BadBitmapIo { at, detail });
        }
        let mut pages = BTreeSet::new();
        for b in blocks {
            let offset = self.layout.bitmap_offset_bytes + b.index * BLOCK_BYTES as u64;
            self.file.write(&b.data[..], offset, &format!("bitmap block {}", b.index))?;
            // Only once its bits are written, so the table in memory never gets ahead of
            // the bits on disk.
            self.crcs.0[b.index as usize] = b.crc;
            pages.insert(b.index / CRCS_PER_PAGE);
        }
        let mut page_buf = Vec::with_capacity(BLOCK_BYTES);
        for page in pages {
            page_buf.clear();
            self.crcs.put_page(page, &mut page_buf);
            let offset = self.layout.bitmap_crc_offset_bytes() + page * BLOCK_BYTES as u64;
            self.file.write(&page_buf, offset, &format!("bitmap crc table page {page}"))?;
        }
        self.file.sync()
    }
}
