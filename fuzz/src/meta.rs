//! Metadata as a node reads it at start: `MetaStore::open` (both superblock slots,
//! the crc table, the activity-log slots), then the bitmap (`read_bitmap`, and
//! `read_bitmap_salvaging` when it does not check out) and the hot extents
//! (`read_al`), used the way startup uses them, and `dump` (`blockctl dump-md`).
//!
//! The metadata lives in memfd files (nothing is left behind, nothing touches a
//! disk) reached through `/proc/self/fd/N`, exactly as the daemon opens a path.
//!
//! Input, compact so that mutations land on fields rather than on zero padding:
//! one flags byte, then up to six sections, each a little-endian u16 length and
//! that many bytes, copied to the start of its area (the rest stays zero): superblock
//! slot A, slot B, AL slot A, AL slot B, the bitmap's bits, its crc table.
//!
//! Flags: bit 0 internal placement (else external), bit 1 a 1 GiB device (else
//! 2 MiB), bit 7 a 64 KiB bitmap granularity (else 4 KiB); bits 2–6 make the harness
//! write correct crcs into slot A, slot B, AL slot A, AL slot B and the crc table
//! (so that mutated fields get past the crc checks to the range checks behind them).
//!
//! Checks: no panic, no unbounded allocation; what `open` accepts is consistent
//! (data size within the layout, a bitmap of that size, hot extents that fit a slot).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use blockd::config::MetaLocation;
use blockd::meta::{
    AL_EXTENT_BYTES, BitmapBlock, CreateOptions, Layout, MAX_AL_EXTENTS, MetaError, MetaStore, MetaTarget,
};

use crate::Seed;

const SLOT_BYTES: u64 = 4096;
const AL_SLOT_BYTES: u64 = 32 << 10;
/// Where the crc32c sits in superblock and AL slots alike.
const CRC_AT: usize = 12;
const SMALL_DEVICE_BYTES: u64 = (2 << 20) + 12345;
const BIG_DEVICE_BYTES: u64 = 1 << 30;

const F_INTERNAL: u8 = 1 << 0;
const F_BIG: u8 = 1 << 1;
const F_FIX_SB_A: u8 = 1 << 2;
const F_FIX_AL_A: u8 = 1 << 4;
const F_FIX_BITMAP: u8 = 1 << 6;
const F_GRANULARITY_64K: u8 = 1 << 7;
const F_FIX_ALL: u8 = 0b0111_1100;

/// Target `meta_open`.
pub fn meta_open(data: &[u8]) {
    if let Some(setup) = prepare(data)
        && let Ok(store) = MetaStore::open(&setup.target)
    {
        check_store(&store);
    }
}

/// Writes the metadata `data` describes into this process's memfds.
fn prepare(data: &[u8]) -> Option<Setup> {
    let (&flags, mut rest) = data.split_first()?;
    let setup = Setup::new(flags);
    let mut areas = setup.areas();
    for area in &mut areas {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else { break };
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len()).min(area.len());
        area[..len].copy_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    for (i, area) in areas.iter_mut().take(4).enumerate() {
        if flags & (F_FIX_SB_A << i) != 0 {
            fix_slot_crc(area);
        }
    }
    if flags & F_FIX_BITMAP != 0 {
        let [.., bits, crcs] = &mut areas;
        for (block, crc) in bits.chunks_exact(bitmap::BLOCK_BYTES).zip(crcs.chunks_exact_mut(4)) {
            crc.copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
        }
    }
    setup.write(&areas);
    Some(setup)
}

/// What startup does with an opened store (`repl::node`), minus the writes.
fn check_store(store: &MetaStore) {
    let sb = store.superblock();
    let layout = store.layout();
    assert!(sb.data_size_bytes > 0 && sb.data_size_bytes <= layout.data_bytes, "{sb:?} {layout:?}");
    let size = sb.data_size_bytes;
    let block_bytes = bitmap::BITS_PER_BLOCK * sb.bitmap_granularity_bytes;
    let mut map = match store.read_bitmap(size) {
        Ok(map) => map,
        Err(MetaError::BitmapCorrupt { .. }) => {
            let (mut map, bad) = store.read_bitmap_salvaging(size).expect("salvaging reads what read read");
            for index in bad {
                map.set_range(index * block_bytes..(index + 1) * block_bytes);
            }
            map
        }
        Err(e) => panic!("the bitmap of an opened store is unreadable: {e}"),
    };
    assert_eq!(map.device_bytes(), size);
    let hot = store.read_al().expect("reading the AL area of an opened store");
    assert!(hot.len() <= MAX_AL_EXTENTS as usize);
    for extent in hot {
        let start = u64::from(extent) * AL_EXTENT_BYTES;
        map.set_range(start..start + AL_EXTENT_BYTES);
    }
    assert!(map.dirty_bytes() <= size);
    let _ = store.dump();
}

/// The files and layout one input's flags choose.
struct Setup {
    target: MetaTarget,
    layout: Layout,
    meta: &'static File,
}

impl Setup {
    fn new(flags: u8) -> Setup {
        let files = files();
        let backing_bytes = if flags & F_BIG != 0 { BIG_DEVICE_BYTES } else { SMALL_DEVICE_BYTES };
        let granularity = if flags & F_GRANULARITY_64K != 0 { 64 << 10 } else { 4096 };
        let meta_path = fd_path(&files.meta);
        let (target, meta_len) = if flags & F_INTERNAL != 0 {
            (MetaTarget { backing: meta_path, location: MetaLocation::Internal }, backing_bytes)
        } else {
            files.backing.set_len(backing_bytes).expect("sizing the backing memfd");
            let location = MetaLocation::External(meta_path);
            (MetaTarget { backing: fd_path(&files.backing), location }, 0)
        };
        let layout = Layout::compute(backing_bytes, granularity, &target.location).expect("a valid geometry");
        // Truncating first drops the previous input's bytes.
        files.meta.set_len(0).expect("truncating the meta memfd");
        files.meta.set_len(meta_len.max(layout.area_end_bytes())).expect("sizing the meta memfd");
        Setup { target, layout, meta: &files.meta }
    }

    /// (offset, length) of each input section's area.
    fn regions(&self) -> [(u64, u64); 6] {
        let l = &self.layout;
        let sb = l.superblock_offset_bytes;
        let crcs = l.bitmap_crc_offset_bytes();
        [
            (sb, SLOT_BYTES),
            (sb + SLOT_BYTES, SLOT_BYTES),
            (l.al_offset_bytes, AL_SLOT_BYTES),
            (l.al_offset_bytes + AL_SLOT_BYTES, AL_SLOT_BYTES),
            (l.bitmap_offset_bytes, l.bitmap_bits_bytes),
            (crcs, l.bitmap_offset_bytes + l.bitmap_bytes - crcs),
        ]
    }

    fn areas(&self) -> [Vec<u8>; 6] {
        self.regions().map(|(_, len)| vec![0; len as usize])
    }

    fn write(&self, areas: &[Vec<u8>; 6]) {
        for ((offset, _), area) in self.regions().iter().zip(areas) {
            self.meta.write_all_at(area, *offset).expect("writing the meta memfd");
        }
    }

    fn read(&self) -> [Vec<u8>; 6] {
        let mut areas = self.areas();
        for ((offset, _), area) in self.regions().iter().zip(&mut areas) {
            self.meta.read_exact_at(area, *offset).expect("reading the meta memfd");
        }
        areas
    }
}

/// Writes the crc32c of a superblock or AL slot (computed with its crc field zero).
fn fix_slot_crc(slot: &mut [u8]) {
    slot[CRC_AT..CRC_AT + 4].fill(0);
    let crc = crc32c::crc32c(slot);
    slot[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

struct Files {
    meta: File,
    backing: File,
}

/// This process's two memfds (made once, leaked: they live as long as the process).
fn files() -> &'static Files {
    static FILES: std::sync::OnceLock<Files> = std::sync::OnceLock::new();
    FILES.get_or_init(|| Files { meta: memfd(c"blockd-fuzz-meta"), backing: memfd(c"blockd-fuzz-disk") })
}

/// A new memfd (shared with the other harnesses of files: [`crate::undo`]).
pub(crate) fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor
    // (or -1), which the File then owns alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// The path through which a memfd opens like a file.
pub(crate) fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Seeds: metadata written by the project's own code (`create`, `update`,
/// `write_al`, `write_bitmap_blocks`), in the compact input form.
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, flags, busy) in [
        ("seed-external-fresh", 0, false),
        ("seed-internal-fresh", F_INTERNAL, false),
        ("seed-external-big-used", F_BIG | F_FIX_ALL, true),
        ("seed-internal-big-used", F_INTERNAL | F_BIG, true),
        ("seed-internal-64k-used", F_INTERNAL | F_GRANULARITY_64K | F_FIX_AL_A, true),
    ] {
        seeds.push((name.to_owned(), seed(flags, busy)));
    }
    seeds
}

/// Creates metadata for `flags`' geometry; `busy`: then a crashed Primary's state
/// (flags and generations updated, hot extents, dirty bitmap blocks).
fn seed(flags: u8, busy: bool) -> Vec<u8> {
    let setup = Setup::new(flags);
    let opts = CreateOptions {
        resource: "r0".into(),
        node: "alpha".into(),
        granularity_bytes: setup.layout.granularity_bytes,
        force: true,
        clear_bitmap: busy,
        size_bytes: None,
    };
    MetaStore::create(&setup.target, &opts).expect("create-md on a memfd");
    if busy {
        let mut store = MetaStore::open(&setup.target).expect("opening what create wrote");
        store
            .update(|sb| {
                sb.flags.clean_shutdown = false;
                sb.flags.was_primary = true;
                sb.generations.bitmap = 0x5eed;
            })
            .expect("updating a memfd");
        let size = store.data_size_bytes();
        store.write_al(&[0, (size / AL_EXTENT_BYTES) as u32 / 2]).expect("writing the AL");
        let mut map =
            bitmap::Bitmap::new(size, store.superblock().bitmap_granularity_bytes).expect("a bitmap");
        map.set_range(0..12288);
        // Dirty bits in a second bitmap block too, where the device has one.
        map.set_range((130 << 20).min(size / 2)..(131 << 20).min(size));
        let blocks: Vec<BitmapBlock> = map
            .changed_blocks()
            .map(|index| {
                let mut data = Box::new([0u8; bitmap::BLOCK_BYTES]);
                let crc = map.encode_block(index, &mut data);
                BitmapBlock { index, data, crc }
            })
            .collect();
        store.write_bitmap_blocks(&blocks).expect("writing bitmap blocks");
    }
    let mut areas = setup.read();
    // The same bytes on every run: a fixed resource id and creation time (create
    // draws the one and reads the clock for the other), crcs made good again.
    for slot in areas.iter_mut().take(2).filter(|s| s.iter().any(|b| *b != 0)) {
        slot[24..40].copy_from_slice(&[0x5e; 16]);
        fix_slot_crc(slot);
    }
    let mut input = vec![flags];
    for area in areas {
        // Trailing zeros are what an absent section means anyway.
        let len = area.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        input.extend_from_slice(&(len as u16).to_le_bytes());
        input.extend_from_slice(&area[..len]);
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_open() {
        for (name, s) in seeds() {
            meta_open(&s);
            let setup = prepare(&s).expect("a seed has flags");
            assert!(MetaStore::open(&setup.target).is_ok(), "{name} does not open");
        }
    }
}
