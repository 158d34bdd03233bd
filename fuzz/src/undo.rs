//! An undo journal as a node reads it back after a crash (`blockd::undo`): the
//! file is whatever the disk held, so `UndoJournal::open` must refuse or truncate
//! anything, and what it accepts must replay sanely.
//!
//! The journal lives in a memfd reached through `/proc/self/fd/N`, as the daemon
//! opens a path (nothing touches a disk).
//!
//! Input, compact so that mutations land on fields rather than on zero padding: one
//! flags byte; the header section (a little-endian u16 length and that many bytes,
//! copied to the start of the 4096-byte header block, the rest zero); then the
//! bytes after the header block as they are (the records).
//!
//! Flags: bit 0 the harness writes the header's crc32c; bit 1 it walks the records
//! (40-byte header, then the length its bytes 32..36 claim) and writes each one's
//! crc32c; bit 2 on that walk it also writes the header's journal id and the next
//! sequence number into each record (so that mutated fields get past those checks
//! to the checks behind them).
//!
//! Checks: no panic, no allocation beyond what the input justifies; an opened
//! journal's preserved bytes fit the device, `export_sparse` writes sorted, disjoint
//! ranges inside the device that add up to them, `roll_back` restores as many
//! bytes; a `preserve` after the open appends records that a reopen finds again.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use blockd::undo::{HEADER_BYTES, RECORD_HEADER_BYTES, UndoJournal};

use crate::Seed;
use crate::meta::{fd_path, memfd};

const F_FIX_HEADER: u8 = 1 << 0;
const F_FIX_RECORDS: u8 = 1 << 1;
const F_STAMP_RECORDS: u8 = 1 << 2;
const F_ALL: u8 = F_FIX_HEADER | F_FIX_RECORDS | F_STAMP_RECORDS;
/// Where the header keeps its crc32c (computed with the field zero) and the id.
const HEADER_CRC_AT: usize = 12;
const JOURNAL_ID_AT: usize = 16;
/// The most of the device the harness backs with data for `preserve`.
const DATA_BYTES: u64 = 1 << 20;

struct Files {
    journal: File,
    data: File,
    export: File,
}

fn files() -> &'static Files {
    static FILES: std::sync::OnceLock<Files> = std::sync::OnceLock::new();
    FILES.get_or_init(|| Files {
        journal: memfd(c"blockd-fuzz-undo"),
        data: memfd(c"blockd-fuzz-undo-data"),
        export: memfd(c"blockd-fuzz-undo-export"),
    })
}

/// Target `undo_open`.
pub fn undo_open(input: &[u8]) {
    let Some(bytes) = journal_bytes(input) else { return };
    let f = files();
    // Truncating first drops the previous input's pages.
    for file in [&f.journal, &f.data, &f.export] {
        file.set_len(0).expect("truncating a memfd");
    }
    f.journal.write_all_at(&bytes, 0).expect("writing the journal memfd");
    let path = fd_path(&f.journal);
    let Ok(Some(mut journal)) = UndoJournal::open(&path) else { return };
    let h = journal.header().clone();
    let preserved = journal.preserved_bytes();
    assert!(preserved <= h.device_size_bytes, "{journal:?}");
    assert!(journal.used_bytes() <= bytes.len() as u64);

    // The export: a sparse memfd of the device's size (tmpfs takes any size).
    if let Ok(ranges) = journal.export_sparse(&f.export) {
        check_ranges(&ranges, h.device_size_bytes, preserved);
    }
    f.data.set_len(h.device_size_bytes.min(DATA_BYTES)).expect("sizing the data memfd");
    if let Ok(restored) = journal.roll_back(&f.data) {
        assert_eq!(restored, preserved);
    }

    // Appending after the open, then reopening: the same granules.
    let g = u64::from(h.granule_bytes);
    let first = (bytes.len() as u64 * g) % h.device_size_bytes.min(DATA_BYTES);
    let range: Range<u64> = first..(first + 3 * g).min(h.device_size_bytes.min(DATA_BYTES));
    if journal.preserve(&f.data, &[range]).is_ok() && journal.sync().is_ok() {
        let granules = journal.preserved_granules();
        drop(journal);
        let again = UndoJournal::open(&path).expect("reopening what was just written").expect("the file");
        assert_eq!(again.preserved_granules(), granules);
        assert_eq!(again.torn_tail(), None);
    }
}

/// Sorted, disjoint, not adjacent, inside the device, adding up to `total`.
fn check_ranges(ranges: &[Range<u64>], device: u64, total: u64) {
    let mut sum = 0;
    for (i, r) in ranges.iter().enumerate() {
        assert!(r.start < r.end && r.end <= device, "{r:?} of {device}");
        if i > 0 {
            assert!(ranges[i - 1].end < r.start, "{ranges:?}");
        }
        sum += r.end - r.start;
    }
    assert_eq!(sum, total);
}

/// The file an input describes (module docs).
fn journal_bytes(input: &[u8]) -> Option<Vec<u8>> {
    let (&flags, rest) = input.split_first()?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len()).min(HEADER_BYTES as usize);
    let mut file = vec![0u8; HEADER_BYTES as usize];
    file[..len].copy_from_slice(&rest[..len]);
    file.extend_from_slice(&rest[len..]);
    fix(&mut file, flags);
    Some(file)
}

/// Applies the flags' repairs to a whole file.
fn fix(file: &mut [u8], flags: u8) {
    let (header, records) = file.split_at_mut(HEADER_BYTES as usize);
    if flags & F_FIX_HEADER != 0 {
        header[HEADER_CRC_AT..HEADER_CRC_AT + 4].fill(0);
        let crc = crc32c::crc32c(header);
        header[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if flags & (F_FIX_RECORDS | F_STAMP_RECORDS) == 0 {
        return;
    }
    let id: [u8; 8] = header[JOURNAL_ID_AT..JOURNAL_ID_AT + 8].try_into().expect("8 bytes");
    let head = RECORD_HEADER_BYTES as usize;
    let (mut pos, mut seq) = (0usize, 0u64);
    while records.len() - pos >= head {
        let claimed = u32::from_le_bytes(records[pos + 32..pos + 36].try_into().expect("4 bytes"));
        let end = (pos + head).saturating_add(claimed as usize).min(records.len());
        let record = &mut records[pos..end];
        if flags & F_STAMP_RECORDS != 0 {
            record[8..16].copy_from_slice(&id);
            record[16..24].copy_from_slice(&seq.to_le_bytes());
        }
        if flags & F_FIX_RECORDS != 0 {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&record[8..head]), &record[head..]);
            record[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        pos = end;
        seq += 1;
    }
}

/// Seeds: journals written by `blockd::undo` itself (in a temporary directory: `create`
/// renames and syncs the directory), in the compact input form, with a fixed
/// journal id so that the seeds are the same on every run.
// The seeds' batches are slices of byte ranges; some hold one.
#[allow(clippy::single_range_in_vec_init)]
pub fn seeds() -> Vec<Seed> {
    use blockd::undo::{Purpose, UndoHeader};
    let dir = std::env::temp_dir().join(format!("blockd-fuzz-undo-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let data = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("disk"))
        .expect("a data file");
    let pattern: Vec<u8> = (0..(1u32 << 20) + 1000).map(|i| (i % 251) as u8).collect();
    data.write_all_at(&pattern, 0).expect("writing the data file");
    let mut seeds = Vec::new();
    for (name, granule_bytes, purpose, ranges, tear) in [
        ("seed-empty", 4096, Purpose::CatchUp, &[][..], false),
        ("seed-three", 4096, Purpose::CatchUp, &[0..5000, (1 << 20)..(1 << 20) + 1][..], false),
        ("seed-torn", 4096, Purpose::CatchUp, &[8192..12289][..], true),
        ("seed-discarded-64k", 65536, Purpose::Discarded, &[(1 << 20) + 999..(1 << 20) + 1000][..], false),
    ] {
        let path = dir.join(format!("{name}.undo"));
        let header = UndoHeader {
            device_size_bytes: pattern.len() as u64,
            granule_bytes,
            capacity_bytes: 4 << 20,
            purpose,
            generation: 0x5eed,
            created_unix_s: 1_700_000_000,
        };
        let mut journal = UndoJournal::create(&path, header).expect("creating a seed journal");
        journal.preserve(&data, ranges).expect("preserving");
        journal.sync().expect("syncing");
        drop(journal);
        let mut file = std::fs::read(&path).expect("reading the seed journal");
        file[JOURNAL_ID_AT..JOURNAL_ID_AT + 8].copy_from_slice(&0x5eed_5eed_u64.to_le_bytes());
        fix(&mut file, F_ALL);
        if tear {
            file.truncate(file.len() - 100);
        }
        let header_len = file[..HEADER_BYTES as usize].iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        for flags in [0, F_ALL] {
            let mut input = vec![flags];
            input.extend_from_slice(&(header_len as u16).to_le_bytes());
            input.extend_from_slice(&file[..header_len]);
            input.extend_from_slice(&file[HEADER_BYTES as usize..]);
            let suffix = if flags == 0 { "" } else { "-fixing" };
            seeds.push((format!("{name}{suffix}"), input));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_open_with_their_records() {
        for (name, s) in seeds() {
            undo_open(&s);
            let bytes = journal_bytes(&s).expect("a seed has flags");
            files().journal.set_len(0).unwrap();
            files().journal.write_all_at(&bytes, 0).unwrap();
            let j =
                UndoJournal::open(&fd_path(&files().journal)).unwrap().unwrap_or_else(|| panic!("{name}"));
            let want = match name.trim_end_matches("-fixing") {
                "seed-empty" => 0,
                "seed-three" => 3,
                // 8192..12289: two granules, the last one torn off.
                "seed-torn" => 1,
                _ => 1,
            };
            assert_eq!(j.preserved_granules(), want, "{name}");
        }
    }
}
