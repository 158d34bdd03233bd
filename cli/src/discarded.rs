//! `export-discarded`: the blocks a discarded split-brain side had changed, as an
//! image for recovery. After `connect --discard-my-data` the node keeps the undo
//! journal of its catch-up (`blockd::undo`): the old contents of every granule the
//! catch-up overwrote, i.e. the discarded node's data where it differed. This verb
//! reads it offline (no daemon needed) and writes those blocks at their offsets
//! into a sparse image of the device's size, or over a copy of `--base` (e.g. the
//! current device, taken with nbdcopy) for a full image of the discarded data.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use blockd::undo::{self, UndoJournal};

use crate::{Fail, refused};

/// How much of `--base` is copied at a time.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Ranges printed one per line; the rest are counted.
const RANGES_SHOWN: usize = 20;

/// The newest kept journal of `resource` in `dir`; an error naming what was looked
/// for when there is none.
pub fn newest(dir: &Path, resource: &str) -> Result<PathBuf, Fail> {
    let found = undo::list_discarded(dir, resource).map_err(refused)?;
    match found.into_iter().next() {
        Some(j) => Ok(j.path),
        None => Err(refused(format!(
            "no discarded data was kept for {resource}: no {resource}.discarded.*.undo in {} (a node \
             keeps it when a split brain is resolved with `connect --discard-my-data` and undo-size is not 0)",
            dir.display()
        ))),
    }
}

/// Writes the image; prints what it wrote.
pub fn export(journal_path: &Path, output: &Path, base: Option<&Path>) -> Result<(), Fail> {
    let journal = match UndoJournal::open_read_only(journal_path) {
        Ok(Some(j)) => j,
        Ok(None) => {
            return Err(refused(format!("no journal at {}: none was kept there", journal_path.display())));
        }
        Err(e) => return Err(refused(e)),
    };
    let h = journal.header().clone();
    let out = open_output(output, journal_path, base)?;
    let copied = match base {
        Some(base) => Some(copy_base(base, &out, output, h.device_size_bytes)?),
        None => None,
    };
    let ranges = journal.export_sparse(&out).map_err(|e| refused(format!("{}: {e}", output.display())))?;
    let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();

    println!("journal: {} ({})", journal_path.display(), h.purpose);
    println!("generation: {:#018x}", h.generation);
    println!("catch-up started: {}", unix_time(h.created_unix_s));
    println!("device: {} bytes, granule {} bytes", h.device_size_bytes, h.granule_bytes);
    if let Some((tail_bytes, why)) = journal.torn_tail() {
        println!("ignored: {tail_bytes} bytes after the last complete record ({why})");
    }
    match (base, copied) {
        (Some(base), Some(data_bytes)) => {
            println!("base: {} ({data_bytes} bytes of data copied)", base.display())
        }
        _ => println!("base: none (a sparse image: blocks not saved read as zeros)"),
    }
    println!("wrote: {} ranges, {bytes} bytes of saved blocks, to {}", ranges.len(), output.display());
    for r in ranges.iter().take(RANGES_SHOWN) {
        println!("  {}..{} ({} bytes)", r.start, r.end, r.end - r.start);
    }
    if ranges.len() > RANGES_SHOWN {
        println!("  ... and {} more ranges", ranges.len() - RANGES_SHOWN);
    }
    Ok(())
}

/// Creates or replaces `output` (a regular file, not the journal or the base).
fn open_output(output: &Path, journal: &Path, base: Option<&Path>) -> Result<File, Fail> {
    if let Ok(meta) = std::fs::metadata(output) {
        if !meta.is_file() {
            return Err(refused(format!("--output {}: not a regular file", output.display())));
        }
        let same = |other: &Path| {
            std::fs::metadata(other).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        };
        if same(journal) || base.is_some_and(same) {
            return Err(refused(format!(
                "--output {} is the journal or the base image itself",
                output.display()
            )));
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(output)
        .map_err(|e| refused(format!("cannot create {}: {e}", output.display())))
}

/// Copies `base` (a file or a block device of exactly `device_bytes`) into `out`,
/// leaving holes where it reads zeros; returns the bytes of data written.
fn copy_base(base: &Path, out: &File, output: &Path, device_bytes: u64) -> Result<u64, Fail> {
    let at = |e: std::io::Error| refused(format!("--base {}: {e}", base.display()));
    let mut src = File::open(base).map_err(at)?;
    let len = src.seek(SeekFrom::End(0)).map_err(at)?;
    if len != device_bytes {
        return Err(refused(format!(
            "--base {} is {len} bytes, but the journal's device is {device_bytes} bytes",
            base.display()
        )));
    }
    let to = |e: std::io::Error| refused(format!("{}: {e}", output.display()));
    out.set_len(device_bytes).map_err(to)?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let (mut offset, mut written) = (0u64, 0u64);
    while offset < len {
        let n = COPY_CHUNK_BYTES.min((len - offset) as usize);
        src.read_exact_at(&mut buf[..n], offset).map_err(at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], offset).map_err(to)?;
            written += n as u64;
        }
        offset += n as u64;
    }
    Ok(written)
}

/// `1700000000 (2023-11-14 22:13:20 UTC)`.
fn unix_time(s: u64) -> String {
    match i64::try_from(s).ok().and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()) {
        Some(t) => format!(
            "{s} ({:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC)",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("{s} (out of range)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times() {
        assert_eq!(super::unix_time(0), "0 (1970-01-01 00:00:00 UTC)");
        assert_eq!(super::unix_time(1_700_000_000), "1700000000 (2023-11-14 22:13:20 UTC)");
        assert_eq!(super::unix_time(951_782_400), "951782400 (2000-02-29 00:00:00 UTC)");
    }
}
