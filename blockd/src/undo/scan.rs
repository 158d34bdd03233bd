//! Reading records in file order through a bounded buffer (never the whole journal
//! in memory): what `open` checks, and what `roll_back` and `export_sparse` replay.

use std::fs::File;
use std::path::Path;

use super::format::{HEADER_BYTES, RECORD_HEADER_BYTES, decode_record_header, record_crc_ok};
use super::{UndoError, UndoHeader, read_up_to};

/// How much is read from the journal at a time.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// One step of a scan.
pub(super) enum Step<'b> {
    /// A complete record with a good checksum, of this journal, in sequence.
    Record { offset_bytes: u64, data: &'b [u8], file_offset_bytes: u64 },
    /// The end of the valid records at `end_bytes`. `torn`: why the bytes from there
    /// to the scan's limit are not a record (`None`: the limit was reached).
    End { end_bytes: u64, torn: Option<&'static str> },
}

/// Reads records from the header's end up to `limit_bytes`.
pub(super) struct Scanner<'a> {
    file: &'a File,
    path: &'a Path,
    header: &'a UndoHeader,
    journal_id: u64,
    limit_bytes: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_at: u64,
    /// Index in `buf` of the next record.
    pos: usize,
    next_seq: u64,
}

impl<'a> Scanner<'a> {
    pub fn new(
        file: &'a File,
        path: &'a Path,
        header: &'a UndoHeader,
        journal_id: u64,
        limit_bytes: u64,
    ) -> Scanner<'a> {
        Scanner {
            file,
            path,
            header,
            journal_id,
            limit_bytes,
            buf: Vec::new(),
            buf_at: HEADER_BYTES,
            pos: 0,
            next_seq: 0,
        }
    }

    /// Records read so far (the next record's sequence number).
    pub fn records(&self) -> u64 {
        self.next_seq
    }

    pub fn next(&mut self) -> Result<Step<'_>, UndoError> {
        let at = self.buf_at + self.pos as u64;
        let end = |torn| Ok(Step::End { end_bytes: at, torn: Some(torn) });
        if at >= self.limit_bytes {
            return Ok(Step::End { end_bytes: at, torn: None });
        }
        let head = RECORD_HEADER_BYTES as usize;
        if !self.fill(head)? {
            return end("a short record header");
        }
        let Some(rh) = decode_record_header(&self.buf[self.pos..self.pos + head]) else {
            return end("no record magic");
        };
        if rh.journal_id != self.journal_id {
            return end("a record of another journal");
        }
        if rh.seq != self.next_seq {
            return end("a record out of sequence");
        }
        if rh.data_len == 0 || rh.data_len > self.header.granule_bytes {
            return end("a record length out of range");
        }
        let total = head + rh.data_len as usize;
        if !self.fill(total)? {
            return end("a short record");
        }
        let (hdr, data) = self.buf[self.pos..self.pos + total].split_at(head);
        if !record_crc_ok(hdr, data) {
            return end("a record checksum mismatch");
        }
        // Complete and checksummed: written by this journal. Anything wrong beyond
        // this point is not a torn write; refuse rather than guess.
        let granule = u64::from(self.header.granule_bytes);
        let device = self.header.device_size_bytes;
        let why = if rh.reserved != 0 {
            Some("reserved field is not zero".to_owned())
        } else if rh.offset_bytes % granule != 0 || rh.offset_bytes >= device {
            Some(format!("offset {} is not a granule of the device", rh.offset_bytes))
        } else if u64::from(rh.data_len) != granule.min(device - rh.offset_bytes) {
            Some(format!("length {} does not match the granule at offset {}", rh.data_len, rh.offset_bytes))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(UndoError::Corrupt { path: self.path.to_owned(), file_offset_bytes: at, why });
        }
        let start = self.pos + head;
        self.pos += total;
        self.next_seq += 1;
        let data = &self.buf[start..start + rh.data_len as usize];
        Ok(Step::Record { offset_bytes: rh.offset_bytes, data, file_offset_bytes: at })
    }

    /// Makes `n` bytes from `pos` on available in `buf`; false if the limit comes first.
    fn fill(&mut self, n: usize) -> Result<bool, UndoError> {
        if self.buf.len() - self.pos >= n {
            return Ok(true);
        }
        self.buf.drain(..self.pos);
        self.buf_at += self.pos as u64;
        self.pos = 0;
        let loaded_end = self.buf_at + self.buf.len() as u64;
        let room = self.limit_bytes.saturating_sub(loaded_end);
        let want =
            (n.max(READ_CHUNK_BYTES) - self.buf.len()).min(usize::try_from(room).unwrap_or(usize::MAX));
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let got = read_up_to(self.file, &mut self.buf[old..], loaded_end)
            .map_err(|source| UndoError::Io { path: self.path.to_owned(), op: "read", source })?;
        self.buf.truncate(old + got);
        Ok(self.buf.len() >= n)
    }
}
