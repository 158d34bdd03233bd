//! The undo journal of a resync target: a crash-consistent image to fall back to
//! while a node catches up (issue 15, items 4 and 5).
//!
//! # Why
//!
//! A bitmap resync copies the out-of-sync granules in disk order, not in the order
//! the source wrote them, so a target is not a consistent image until the resync
//! ends (DRBD calls it Inconsistent for the whole time). If the source dies
//! mid-catch-up, the target would have nothing usable. So while a catch-up runs,
//! before anything (resync data, a replicated write, trim, write-zeroes) overwrites
//! a granule of the data disk for the first time in this catch-up, the granule's
//! old contents are appended to this journal and made durable. Rolling the journal
//! back restores the image from before the catch-up: consistent, only older.
//! After a split brain resolved by `connect --discard-my-data` the journal of that
//! catch-up is kept: it holds the discarded node's changed blocks, which
//! `blockctl export-discarded` writes out for recovery.
//!
//! # Format (version 1, integers little-endian)
//!
//! A 4096-byte header block, then records back to back.
//!
//! | header bytes | field |
//! |---|---|
//! | 0..8 | magic `BLKDUNDO` |
//! | 8..12 | format version (1) |
//! | 12..16 | crc32c of the whole block, computed with this field zero |
//! | 16..24 | journal id: random, drawn at [`UndoJournal::create`] |
//! | 24..32 | device size, bytes |
//! | 32..36 | granule, bytes (a power of two, 512 B to 1 MiB) |
//! | 36..40 | purpose: 1 catch-up, 2 discarded (split brain) |
//! | 40..48 | capacity: the most bytes the file may hold, header included |
//! | 48..56 | the generation of the image the journal restores (opaque here) |
//! | 56..64 | creation time, Unix seconds |
//!
//! | record bytes | field |
//! |---|---|
//! | 0..4 | magic `UREC` |
//! | 4..8 | crc32c of bytes 8..40 and the data |
//! | 8..16 | journal id (the header's) |
//! | 16..24 | sequence number: 0 for the first record, then +1 |
//! | 24..32 | device offset, bytes (granule-aligned) |
//! | 32..36 | data length: the granule, less for the device's last partial granule |
//! | 36..40 | reserved, zero |
//! | 40.. | the granule's contents before the catch-up |
//!
//! The journal id and the sequence number make a record self-describing: bytes left
//! from another journal, or from an earlier position of this one, never pass for the
//! next record. `create` writes a new file and renames it over the old one, so no
//! old record survives in it anyway.
//!
//! # Crash argument
//!
//! 1. A record counts only if it is complete, carries this journal's id and the next
//!    sequence number, and its checksum matches. `open` reads records in order and
//!    stops at the first that does not (a torn or corrupt tail), truncating the file
//!    there.
//! 2. A granule's record is appended before its first overwrite in this catch-up, and
//!    the caller lets the overwrite reach the data disk only after
//!    [`UndoJournal::sync`] returned (one `fdatasync` per batch), so the record is
//!    durable before the granule changes.
//! 3. A granule is recorded once, read while it still held its pre-catch-up contents
//!    (it was not yet preserved, so by 2 it had not been overwritten).
//!
//! So after any crash every granule that may have been overwritten has a valid record
//! (by 2, it was synced, and a synced record is before any torn tail) holding its
//! pre-catch-up contents (by 3); the torn tail holds only records of a batch whose
//! sync never returned, whose overwrites therefore never started. Writing every
//! valid record back ([`UndoJournal::roll_back`]) restores exactly the pre-catch-up
//! image, and doing it again after a crash during it gives the same image (it only
//! writes the journal's contents, never reads the data disk).
//!
//! Checksums cannot tell a torn tail from media corruption in the middle of the
//! file: both end the journal there. The data disk has the same exposure.
//!
//! # Bounds
//!
//! The file never exceeds `capacity_bytes`: a [`UndoJournal::preserve`] that would
//! pass it returns [`UndoError::Full`] and appends nothing (the caller then gives up
//! the fallback and says so). Records are streamed through buffers of about 1 MiB
//! (a batch is read from the data disk and appended in pieces of that size). The set
//! of preserved granules is a hash set of granule indices: its size follows the
//! journal's contents (about 20 bytes per granule: 5 MiB for a full 1 GiB journal
//! of 4 KiB granules) rather than the device's (a bit per granule would be 512 MiB
//! for 16 TiB), and a damaged header cannot make it large: it holds at most one
//! entry per record actually in the file.

mod format;
mod paths;
mod scan;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use format::{FORMAT_VERSION, HEADER_BYTES, MAX_GRANULE_BYTES, MIN_GRANULE_BYTES, RECORD_HEADER_BYTES};
pub use paths::{DiscardedJournal, catchup_path, discarded_path, list_discarded};

use format::{HeaderProblem, StoredHeader};
use scan::{Scanner, Step};

/// How much of the data disk one append reads at a time.
const CHUNK_BYTES: u64 = 1 << 20;

/// Why a journal exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A catch-up (bitmap resync after pull-ahead, a disconnect or a restart): the
    /// fallback if the source dies; deleted when the catch-up completes.
    CatchUp,
    /// A catch-up after `connect --discard-my-data`: kept when it completes, as the
    /// record of the discarded node's changed blocks.
    Discarded,
}

impl Purpose {
    fn code(self) -> u32 {
        match self {
            Purpose::CatchUp => 1,
            Purpose::Discarded => 2,
        }
    }

    fn from_code(code: u32) -> Option<Purpose> {
        match code {
            1 => Some(Purpose::CatchUp),
            2 => Some(Purpose::Discarded),
            _ => None,
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Purpose::CatchUp => "catch-up",
            Purpose::Discarded => "discarded",
        })
    }
}

/// What a journal is about; written once, in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoHeader {
    /// The data device's size; records cover `0..device_size_bytes`.
    pub device_size_bytes: u64,
    /// Bytes per preserved unit: a power of two, [`MIN_GRANULE_BYTES`] to
    /// [`MAX_GRANULE_BYTES`] (normally the bitmap granularity).
    pub granule_bytes: u32,
    /// The most bytes the file may hold, header included.
    pub capacity_bytes: u64,
    pub purpose: Purpose,
    /// The generation of the image the journal restores (opaque here).
    pub generation: u64,
    /// When the journal was created, Unix seconds.
    pub created_unix_s: u64,
}

/// What one [`UndoJournal::preserve`] appended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreserveOutcome {
    /// Granules newly preserved.
    pub granules: u64,
    /// Bytes appended to the file (record headers and data).
    pub file_bytes: u64,
}

/// Everything that can go wrong with a journal.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("undo journal {}: {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("data disk: {op} at byte {offset_bytes}: {source}")]
    Data { op: &'static str, offset_bytes: u64, source: io::Error },
    #[error("{} is not an undo journal (no BLKDUNDO magic)", path.display())]
    NotAJournal { path: PathBuf },
    #[error(
        "undo journal {}: format version {version} is not supported (this blockd reads version {FORMAT_VERSION})",
        path.display()
    )]
    Version { path: PathBuf, version: u32 },
    #[error("undo journal {}: bad header: {why}", path.display())]
    BadHeader { path: PathBuf, why: String },
    #[error("undo journal header: {why}")]
    InvalidHeader { why: String },
    #[error("undo journal {}: record at file offset {file_offset_bytes}: {why}", path.display())]
    Corrupt { path: PathBuf, file_offset_bytes: u64, why: String },
    #[error(
        "undo journal full: {needed_bytes} more bytes needed, {used_bytes} of its {capacity_bytes} bytes used"
    )]
    Full { needed_bytes: u64, used_bytes: u64, capacity_bytes: u64 },
    #[error("range {start}..{end} is outside the device of {device_size_bytes} bytes")]
    OutOfDevice { start: u64, end: u64, device_size_bytes: u64 },
    #[error("undo journal {} was opened read-only", path.display())]
    ReadOnly { path: PathBuf },
    #[error("undo journal {}: unusable after an append failed and could not be undone", path.display())]
    Broken { path: PathBuf },
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
}

/// An open undo journal (module docs).
///
/// The caller serializes its use with the writes it protects: while
/// [`preserve`](Self::preserve) reads a granule, no write to that granule may be in
/// flight.
pub struct UndoJournal {
    path: PathBuf,
    file: File,
    stored: StoredHeader,
    /// Length of the valid contents: where the next record goes.
    end_bytes: u64,
    next_seq: u64,
    /// Granule indices (offset / granule) with a record.
    preserved: HashSet<u64>,
    preserved_bytes: u64,
    /// Records appended since the last [`sync`](Self::sync).
    dirty: bool,
    writable: bool,
    broken: bool,
    /// Bytes after the valid records that `open` dropped, and why.
    tail: Option<(u64, &'static str)>,
    /// Reused by `preserve`: the call's ranges, merged; the data read; the records.
    merged: Vec<Range<u64>>,
    read_buf: Vec<u8>,
    out_buf: Vec<u8>,
}

impl fmt::Debug for UndoJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UndoJournal")
            .field("path", &self.path)
            .field("header", &self.stored.header)
            .field("journal_id", &format_args!("{:#018x}", self.stored.journal_id))
            .field("end_bytes", &self.end_bytes)
            .field("records", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl UndoJournal {
    /// Creates a journal at `path`, replacing any file there (a new file is written
    /// beside it and renamed over it); the header is durable (file and directory
    /// fsynced) on return. Mode 0600: it holds the device's data.
    pub fn create(path: &Path, header: UndoHeader) -> Result<UndoJournal, UndoError> {
        format::check_header(&header).map_err(|why| UndoError::InvalidHeader { why })?;
        let stored = StoredHeader { header, journal_id: rand::random::<u64>() | 1 };
        let tmp = tmp_path(path);
        let written = (|| {
            let tmp = tmp.as_path();
            let io = |op| move |source| UndoError::Io { path: tmp.to_owned(), op, source };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(tmp)
                .map_err(io("create"))?;
            file.write_all_at(&format::encode_header(&stored), 0).map_err(io("write header"))?;
            file.sync_all().map_err(io("fsync"))?;
            std::fs::rename(tmp, path).map_err(io("rename"))?;
            Ok(file)
        })();
        let file = written.inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        sync_dir(path)?;
        Ok(UndoJournal::new(path, file, stored, true))
    }

    /// Opens the journal at `path` after a restart: checks the header, reads every
    /// record, truncates a torn or corrupt tail (durably) and rebuilds the set of
    /// preserved granules. `Ok(None)`: no file there.
    pub fn open(path: &Path) -> Result<Option<UndoJournal>, UndoError> {
        UndoJournal::open_with(path, true)
    }

    /// [`open`](Self::open) without changing the file: a torn tail is ignored, not
    /// truncated, and the journal can be read ([`roll_back`](Self::roll_back),
    /// [`export_sparse`](Self::export_sparse)) but not appended to.
    pub fn open_read_only(path: &Path) -> Result<Option<UndoJournal>, UndoError> {
        UndoJournal::open_with(path, false)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Option<UndoJournal>, UndoError> {
        let io = |op| move |source| UndoError::Io { path: path.to_owned(), op, source };
        let file = match OpenOptions::new().read(true).write(writable).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open")(e)),
        };
        let len = file.metadata().map_err(io("stat"))?.len();
        let mut block = vec![0u8; HEADER_BYTES as usize];
        let got = read_up_to(&file, &mut block, 0).map_err(io("read header"))?;
        let stored = format::decode_header(&block[..got]).map_err(|p| match p {
            // Shorter than a header but starting like one: a torn header, not
            // another kind of file.
            HeaderProblem::Magic
                if got > 0 && got < HEADER_BYTES as usize && is_magic_prefix(&block[..got]) =>
            {
                UndoError::BadHeader { path: path.to_owned(), why: format!("only {got} bytes") }
            }
            HeaderProblem::Magic => UndoError::NotAJournal { path: path.to_owned() },
            HeaderProblem::Version(version) => UndoError::Version { path: path.to_owned(), version },
            HeaderProblem::Invalid(why) => UndoError::BadHeader { path: path.to_owned(), why },
        })?;
        let mut journal = UndoJournal::new(path, file, stored, writable);
        let (end_bytes, torn) = journal.rebuild(len)?;
        journal.end_bytes = end_bytes;
        if let Some(why) = torn {
            journal.tail = Some((len - end_bytes, why));
            if writable {
                journal.file.set_len(end_bytes).map_err(io("truncate the torn tail"))?;
                journal.file.sync_all().map_err(io("fsync"))?;
            }
        }
        Ok(Some(journal))
    }

    fn new(path: &Path, file: File, stored: StoredHeader, writable: bool) -> UndoJournal {
        UndoJournal {
            path: path.to_owned(),
            file,
            stored,
            end_bytes: HEADER_BYTES,
            next_seq: 0,
            preserved: HashSet::new(),
            preserved_bytes: 0,
            dirty: false,
            writable,
            broken: false,
            tail: None,
            merged: Vec::new(),
            read_buf: Vec::new(),
            out_buf: Vec::new(),
        }
    }

    /// Reads the records up to `len`, filling the preserved set; returns where the
    /// valid records end and, if bytes follow, why they are not a record.
    fn rebuild(&mut self, len: u64) -> Result<(u64, Option<&'static str>), UndoError> {
        let granule = u64::from(self.stored.header.granule_bytes);
        let (h, id) = (&self.stored.header, self.stored.journal_id);
        let mut scan = Scanner::new(&self.file, &self.path, h, id, len);
        loop {
            match scan.next()? {
                Step::Record { offset_bytes, data, file_offset_bytes } => {
                    if !self.preserved.insert(offset_bytes / granule) {
                        return Err(UndoError::Corrupt {
                            path: self.path.clone(),
                            file_offset_bytes,
                            why: format!("granule at offset {offset_bytes} is preserved twice"),
                        });
                    }
                    self.preserved_bytes += data.len() as u64;
                }
                Step::End { end_bytes, torn } => {
                    self.next_seq = scan.records();
                    return Ok((end_bytes, torn));
                }
            }
        }
    }

    /// For every granule `ranges` touch (byte ranges, widened to granule boundaries)
    /// that is not preserved yet: reads its current contents from `data` (the
    /// backing store, positional reads) and appends a record. All or nothing: on
    /// [`UndoError::Full`] (the file would pass its capacity) or any error, nothing of
    /// this call is kept. Does not sync: call [`sync`](Self::sync) before the writes
    /// these ranges are for reach the data disk.
    pub fn preserve(&mut self, data: &File, ranges: &[Range<u64>]) -> Result<PreserveOutcome, UndoError> {
        if !self.writable {
            return Err(UndoError::ReadOnly { path: self.path.clone() });
        }
        if self.broken {
            return Err(UndoError::Broken { path: self.path.clone() });
        }
        let mut merged = std::mem::take(&mut self.merged);
        let result = self.merge(ranges, &mut merged).and_then(|()| self.append(data, &merged));
        self.merged = merged;
        result
    }

    /// `ranges` widened to granules, sorted and merged into `out`.
    fn merge(&self, ranges: &[Range<u64>], out: &mut Vec<Range<u64>>) -> Result<(), UndoError> {
        let h = &self.stored.header;
        let g = u64::from(h.granule_bytes);
        out.clear();
        for r in ranges.iter().filter(|r| r.start < r.end) {
            if r.end > h.device_size_bytes {
                let device_size_bytes = h.device_size_bytes;
                return Err(UndoError::OutOfDevice { start: r.start, end: r.end, device_size_bytes });
            }
            out.push(r.start / g * g..r.end.div_ceil(g).saturating_mul(g).min(h.device_size_bytes));
        }
        out.sort_unstable_by_key(|r| r.start);
        let mut kept = 0;
        for i in 0..out.len() {
            if kept > 0 && out[i].start <= out[kept - 1].end {
                out[kept - 1].end = out[kept - 1].end.max(out[i].end);
            } else {
                out[kept] = out[i].clone();
                kept += 1;
            }
        }
        out.truncate(kept);
        Ok(())
    }

    fn append(&mut self, data: &File, merged: &[Range<u64>]) -> Result<PreserveOutcome, UndoError> {
        let g = u64::from(self.stored.header.granule_bytes);
        let mut needed = PreserveOutcome::default();
        for gi in merged.iter().flat_map(|r| r.start / g..r.end.div_ceil(g)) {
            if !self.preserved.contains(&gi) {
                needed.granules += 1;
                needed.file_bytes += RECORD_HEADER_BYTES + self.granule_len(gi);
            }
        }
        if needed.granules == 0 {
            return Ok(needed);
        }
        let capacity_bytes = self.stored.header.capacity_bytes;
        if self.end_bytes.saturating_add(needed.file_bytes) > capacity_bytes {
            let (needed_bytes, used_bytes) = (needed.file_bytes, self.end_bytes);
            return Err(UndoError::Full { needed_bytes, used_bytes, capacity_bytes });
        }
        let (start_end, start_seq) = (self.end_bytes, self.next_seq);
        if let Err(e) = self.append_records(data, merged) {
            // Undo this call's appends, so that the file holds exactly the records the
            // set says; if even that fails, appending again could leave garbage
            // between records, so the journal refuses further appends.
            self.end_bytes = start_end;
            self.next_seq = start_seq;
            if self.file.set_len(start_end).is_err() {
                self.broken = true;
            }
            return Err(e);
        }
        for gi in merged.iter().flat_map(|r| r.start / g..r.end.div_ceil(g)) {
            if self.preserved.insert(gi) {
                self.preserved_bytes += self.granule_len(gi);
            }
        }
        self.dirty = true;
        Ok(needed)
    }

    /// Reads runs of unpreserved granules (up to [`CHUNK_BYTES`] each) and appends
    /// their records, about a chunk per write.
    fn append_records(&mut self, data: &File, merged: &[Range<u64>]) -> Result<(), UndoError> {
        let g = u64::from(self.stored.header.granule_bytes);
        let device = self.stored.header.device_size_bytes;
        let id = self.stored.journal_id;
        let per_chunk = (CHUNK_BYTES / g).max(1);
        self.out_buf.clear();
        for r in merged {
            let (mut gi, last) = (r.start / g, r.end.div_ceil(g));
            while gi < last {
                if self.preserved.contains(&gi) {
                    gi += 1;
                    continue;
                }
                let mut run_end = gi + 1;
                while run_end < last && run_end - gi < per_chunk && !self.preserved.contains(&run_end) {
                    run_end += 1;
                }
                let (start, end) = (gi * g, (run_end * g).min(device));
                self.read_buf.resize((end - start) as usize, 0);
                data.read_exact_at(&mut self.read_buf, start).map_err(|source| UndoError::Data {
                    op: "read for the undo journal",
                    offset_bytes: start,
                    source,
                })?;
                for (k, piece) in self.read_buf.chunks(g as usize).enumerate() {
                    format::encode_record(&mut self.out_buf, id, self.next_seq, start + k as u64 * g, piece);
                    self.next_seq += 1;
                }
                if self.out_buf.len() as u64 >= CHUNK_BYTES {
                    self.flush_out()?;
                }
                gi = run_end;
            }
        }
        self.flush_out()
    }

    fn flush_out(&mut self) -> Result<(), UndoError> {
        if self.out_buf.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.out_buf, self.end_bytes).map_err(|source| UndoError::Io {
            path: self.path.clone(),
            op: "append",
            source,
        })?;
        self.end_bytes += self.out_buf.len() as u64;
        self.out_buf.clear();
        Ok(())
    }

    /// Makes everything appended durable: one `fdatasync` (none if nothing was
    /// appended since the last). Call once per batch of preserves, before the
    /// batch's writes go to the data disk.
    pub fn sync(&mut self) -> Result<(), UndoError> {
        if self.dirty {
            self.file.sync_data().map_err(|source| UndoError::Io {
                path: self.path.clone(),
                op: "fdatasync",
                source,
            })?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Writes every preserved granule back to `data` and `fdatasync`s it; returns the
    /// bytes restored. Idempotent: after a crash during it, calling it again gives
    /// the same image. The journal itself is not changed.
    pub fn roll_back(&self, data: &File) -> Result<u64, UndoError> {
        let restored = self.replay(data, "roll back")?;
        data.sync_data().map_err(|source| UndoError::Data { op: "fdatasync", offset_bytes: 0, source })?;
        Ok(restored)
    }

    /// Writes every preserved granule at its offset into `out`, made the device's
    /// size first (`set_len`: a sparse file where nothing is written), and syncs it.
    /// Returns the ranges written, sorted and merged.
    pub fn export_sparse(&self, out: &File) -> Result<Vec<Range<u64>>, UndoError> {
        let device = self.stored.header.device_size_bytes;
        let out_err = |op| move |source| UndoError::Data { op, offset_bytes: 0, source };
        out.set_len(device).map_err(out_err("size the export"))?;
        self.replay(out, "export")?;
        out.sync_all().map_err(out_err("fsync the export"))?;
        Ok(self.preserved_ranges())
    }

    /// The preserved granules as byte ranges of the device, sorted and merged.
    pub fn preserved_ranges(&self) -> Vec<Range<u64>> {
        let device = self.stored.header.device_size_bytes;
        let g = u64::from(self.stored.header.granule_bytes);
        let mut granules: Vec<u64> = self.preserved.iter().copied().collect();
        granules.sort_unstable();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for gi in granules {
            let r = gi * g..((gi + 1) * g).min(device);
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
        }
        ranges
    }

    /// Writes every record's data at its offset into `target`; returns the bytes.
    fn replay(&self, target: &File, op: &'static str) -> Result<u64, UndoError> {
        let (h, id) = (&self.stored.header, self.stored.journal_id);
        let mut scan = Scanner::new(&self.file, &self.path, h, id, self.end_bytes);
        let mut bytes = 0;
        loop {
            match scan.next()? {
                Step::Record { offset_bytes, data, .. } => {
                    target.write_all_at(data, offset_bytes).map_err(|source| UndoError::Data {
                        op,
                        offset_bytes,
                        source,
                    })?;
                    bytes += data.len() as u64;
                }
                Step::End { torn: None, .. } => return Ok(bytes),
                Step::End { end_bytes, torn: Some(why) } => {
                    return Err(UndoError::Corrupt {
                        path: self.path.clone(),
                        file_offset_bytes: end_bytes,
                        why: format!("{why} where a valid record was when the journal was opened"),
                    });
                }
            }
        }
    }

    /// Bytes of device data preserved (the last partial granule counted as it is).
    pub fn preserved_bytes(&self) -> u64 {
        self.preserved_bytes
    }

    /// Granules preserved (records in the journal).
    pub fn preserved_granules(&self) -> u64 {
        self.preserved.len() as u64
    }

    pub fn header(&self) -> &UndoHeader {
        &self.stored.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length: header and records.
    pub fn used_bytes(&self) -> u64 {
        self.end_bytes
    }

    /// Whether the granule starting at `granule_offset` (any byte of it will do)
    /// is preserved.
    pub fn is_preserved(&self, granule_offset: u64) -> bool {
        self.preserved.contains(&(granule_offset / u64::from(self.stored.header.granule_bytes)))
    }

    /// What `open` found after the valid records: the bytes dropped (truncated by
    /// [`open`](Self::open), ignored by [`open_read_only`](Self::open_read_only)) and
    /// why they were not a record. `None`: the file ended cleanly.
    pub fn torn_tail(&self) -> Option<(u64, &'static str)> {
        self.tail
    }

    /// Syncs the journal and renames it to `new_path` (e.g. to keep a discarded
    /// node's journal), durably (the directories fsynced). Refuses to replace an
    /// existing file ([`UndoError::Exists`]).
    pub fn keep_as(mut self, new_path: &Path) -> Result<(), UndoError> {
        if self.writable {
            self.sync()?;
        }
        paths::rename_no_replace(&self.path, new_path)?;
        sync_dir(new_path)?;
        if parent_dir(&self.path) != parent_dir(new_path) {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Deletes the journal at `path` durably (its directory fsynced); no file there
    /// is fine.
    pub fn remove(path: &Path) -> Result<(), UndoError> {
        match std::fs::remove_file(path) {
            Ok(()) => sync_dir(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(UndoError::Io { path: path.to_owned(), op: "remove", source }),
        }
    }

    fn granule_len(&self, gi: u64) -> u64 {
        let g = u64::from(self.stored.header.granule_bytes);
        g.min(self.stored.header.device_size_bytes - gi * g)
    }
}

/// Whether `bytes` start like a header (as far as they go).
fn is_magic_prefix(bytes: &[u8]) -> bool {
    let n = bytes.len().min(format::MAGIC.len());
    bytes[..n] == format::MAGIC[..n]
}

/// Where `create` writes the new file before renaming it.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs the directory holding `path`, so that a create, rename or unlink in it is
/// durable.
fn sync_dir(path: &Path) -> Result<(), UndoError> {
    let dir = parent_dir(path);
    let io = |op| move |source| UndoError::Io { path: dir.to_owned(), op, source };
    File::open(dir).map_err(io("open directory"))?.sync_all().map_err(io("fsync directory"))
}

/// Reads from `offset` until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
