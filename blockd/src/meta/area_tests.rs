//! Bitmap and activity-log I/O on sparse temp files: round trips (internal and
//! external), incremental writes, corruption reports, AL slot alternation and
//! fallback, refusals.

use bitmap::Bitmap;

use super::bitmap_io::zero_block_crc;
use super::tests::{MIB, Temp, internal, opts};
use super::*;

const GIB: u64 = 1 << 30;
/// Device bits per 4 KiB bitmap block.
const BITS_PER_BLOCK: u64 = 32768;

fn external(disk: &Temp, meta: &Temp) -> MetaTarget {
    MetaTarget { backing: disk.0.clone(), location: MetaLocation::External(meta.0.clone()) }
}

/// The changed blocks of `map`, encoded as the core would.
fn changed(map: &Bitmap) -> Vec<BitmapBlock> {
    map.changed_blocks()
        .map(|index| {
            let mut data = Box::new([0u8; 4096]);
            let crc = map.encode_block(index, &mut data);
            BitmapBlock { index, data, crc }
        })
        .collect()
}

/// Sets some ranges (in several blocks when the device has them), persists the changed
/// blocks, and checks that a reopened store reads the same bitmap back.
fn round_trip(loc: &MetaTarget) {
    let mut store = MetaStore::open(loc).unwrap();
    let size = store.data_size_bytes();
    let g = store.superblock().bitmap_granularity_bytes;
    let mut map = store.read_bitmap(size).unwrap();
    assert_eq!(map.count_bits(), 0);
    map.set_range(0..1);
    map.set_range(5 * g..9 * g + 1);
    map.set_range(size - 1..size);
    if map.blocks() > 3 {
        map.set_range(3 * BITS_PER_BLOCK * g - g..3 * BITS_PER_BLOCK * g + g);
    }
    let blocks = changed(&map);
    store.write_bitmap_blocks(&blocks).unwrap();
    map.mark_persisted();
    drop(store);
    let store = MetaStore::open(loc).unwrap();
    let back = store.read_bitmap(size).unwrap();
    assert_eq!(back, map);
    assert_eq!(back.count_bits(), map.count_bits());
    assert!(back.is_set(5 * g) && back.is_set(size - 1) && !back.is_set(10 * g));
}

#[test]
fn set_bits_round_trip_internal_and_external() {
    let disk = Temp::sparse("bm-int.img", GIB);
    MetaStore::create(&internal(&disk), &opts("r0", "alpha")).unwrap();
    assert_eq!(MetaStore::open(&internal(&disk)).unwrap().layout().bitmap_bits_bytes / 4096, 8);
    round_trip(&internal(&disk));

    let disk = Temp::sparse("bm-ext.img", GIB + 4096);
    let meta = Temp::path_only("bm-ext.md");
    let loc = external(&disk, &meta);
    MetaStore::create(&loc, &CreateOptions { granularity_bytes: 64 << 10, ..opts("r0", "beta") }).unwrap();
    round_trip(&loc);
}

#[test]
fn fresh_create_reads_back_an_empty_bitmap_and_al() {
    let zero_crc = zero_block_crc();
    assert_ne!(zero_crc, 0, "crc32c of zeroes is not 0: a zeroed table must not pass");
    assert_eq!(zero_crc, crc32c::crc32c(&[0u8; 4096]));
    let disk = Temp::sparse("bm-fresh.img", GIB);
    let loc = internal(&disk);
    // Garbage where the bitmap goes: create must overwrite all of it.
    let l = Layout::compute(GIB, 4096, &MetaLocation::Internal).unwrap();
    disk.write(l.bitmap_offset_bytes, &vec![0x5a; (l.bitmap_bytes + l.al_bytes) as usize]);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let store = MetaStore::open(&loc).unwrap();
    let map = store.read_bitmap(store.data_size_bytes()).unwrap();
    assert_eq!((map.count_bits(), map.blocks(), map.changed_blocks().count()), (0, 8, 0));
    // Every table entry is the zero block's crc; the page's padding is zero.
    let table = disk.read(l.bitmap_crc_offset_bytes(), 4096);
    for (i, entry) in table.chunks_exact(4).enumerate() {
        let want = if i < 8 { zero_crc } else { 0 };
        assert_eq!(u32::from_le_bytes(entry.try_into().unwrap()), want, "entry {i}");
    }
    assert_eq!(store.read_al().unwrap(), Vec::<u32>::new());
    let dump = store.dump();
    assert!(dump.lines().any(|l| l == "bitmap_dirty_bytes: 0"), "{dump}");
    assert!(dump.lines().any(|l| l == "al_hot_extents: 0"), "{dump}");
    // A smaller exported size reads a bitmap of that size from the same area.
    assert_eq!(store.read_bitmap(10 * MIB).unwrap().len_bits(), 10 * MIB / 4096);
}

#[test]
fn zeroed_crc_table_is_corruption_not_an_empty_bitmap() {
    // What the old create wrote: all zero, bits and table.
    let disk = Temp::sparse("bm-zeroed.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let l = *MetaStore::open(&loc).unwrap().layout();
    disk.write(l.bitmap_crc_offset_bytes(), &[0u8; 4096]);
    let store = MetaStore::open(&loc).unwrap();
    let e = store.read_bitmap(store.data_size_bytes()).unwrap_err();
    assert!(matches!(e, MetaError::BitmapCorrupt { block: 0, expected: 0, .. }), "{e:?}");
}

#[test]
fn incremental_write_touches_only_the_given_blocks() {
    // 200 GiB (sparse) at 4 KiB granules: 1600 blocks, so the crc table has two pages.
    let disk = Temp::sparse("bm-incr.img", 200 * GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let l = *store.layout();
    assert!(l.bitmap_bits_bytes / 4096 > 1024 + 6, "{l:?}");
    let size = store.data_size_bytes();
    let mut map = store.read_bitmap(size).unwrap();
    let before = disk.read(l.bitmap_offset_bytes, l.bitmap_bytes as usize);

    let g = 4096;
    map.set_range(BITS_PER_BLOCK * g..BITS_PER_BLOCK * g + 1); // block 1
    map.set_range(1030 * BITS_PER_BLOCK * g + 7 * g..1030 * BITS_PER_BLOCK * g + 9 * g); // block 1030
    assert_eq!(map.changed_blocks().collect::<Vec<_>>(), [1, 1030]);
    let blocks = changed(&map);
    store.write_bitmap_blocks(&blocks).unwrap();

    let after = disk.read(l.bitmap_offset_bytes, l.bitmap_bytes as usize);
    let crc_entry = |b: u64| (l.bitmap_bits_bytes + 4 * b) as usize;
    let allowed = |i: usize| {
        [1u64, 1030].iter().any(|&b| {
            let bits = (b * 4096) as usize..((b + 1) * 4096) as usize;
            bits.contains(&i) || (crc_entry(b)..crc_entry(b) + 4).contains(&i)
        })
    };
    let diff: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(!diff.is_empty());
    assert!(diff.iter().all(|&i| allowed(i)), "bytes outside blocks 1 and 1030 changed: {:?}", &diff[..8]);
    for (b, blk) in [1u64, 1030].iter().zip(&blocks) {
        assert_eq!(&after[crc_entry(*b)..crc_entry(*b) + 4], &blk.crc.to_le_bytes());
    }
    map.mark_persisted();
    drop(store);
    assert_eq!(MetaStore::open(&loc).unwrap().read_bitmap(size).unwrap(), map);
}

#[test]
fn crc_pages_are_written_from_memory() {
    // The table page is rewritten from the copy loaded at open, not read back: a
    // damaged entry on disk for a block not being written is replaced by the good one.
    let disk = Temp::sparse("bm-mem.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let l = *store.layout();
    let size = store.data_size_bytes();
    disk.flip(l.bitmap_crc_offset_bytes() + 4 * 2);
    assert!(matches!(store.read_bitmap(size), Err(MetaError::BitmapCorrupt { block: 2, .. })));
    let mut map = Bitmap::new(size, 4096).unwrap();
    map.set_range(0..4096);
    let block0: Vec<BitmapBlock> = changed(&map).into_iter().filter(|b| b.index == 0).collect();
    store.write_bitmap_blocks(&block0).unwrap();
    let back = store.read_bitmap(size).unwrap();
    assert_eq!((back.count_bits(), back.is_set(0)), (1, true));
}

#[test]
fn flipped_bits_or_crc_byte_is_reported_with_the_block() {
    let disk = Temp::sparse("bm-flip.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let l = *MetaStore::open(&loc).unwrap().layout();
    for (offset, block) in [
        (l.bitmap_offset_bytes + 3 * 4096 + 100, 3),
        (l.bitmap_offset_bytes + 7 * 4096 + 4095, 7),
        (l.bitmap_crc_offset_bytes() + 4 * 5 + 2, 5),
    ] {
        disk.flip(offset);
        let store = MetaStore::open(&loc).unwrap();
        let e = store.read_bitmap(store.data_size_bytes()).unwrap_err();
        let MetaError::BitmapCorrupt { block: got, expected, found, .. } = e else { panic!("{e:?}") };
        assert_eq!(got, block);
        assert_ne!(expected, found);
        let msg = e.to_string();
        let want = format!("disk {}: bitmap block {block} is corrupt (crc32c", disk.0.display());
        assert!(msg.starts_with(&want), "{msg}");
        assert!(msg.ends_with("): the bitmap cannot be trusted"), "{msg}");
        let dump = store.dump();
        let line = format!("bitmap: corrupt (block {block}: crc32c in the table");
        assert!(dump.lines().any(|l| l.starts_with(&line)), "{dump}");
        assert!(!dump.contains("bitmap_dirty_bytes"), "{dump}");
        drop(store);
        disk.flip(offset);
    }
    MetaStore::open(&loc).unwrap().read_bitmap(l.data_bytes).unwrap();
}

#[test]
fn bad_bitmap_writes_and_reads_are_refused_without_writing() {
    let disk = Temp::sparse("bm-refuse.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let l = *store.layout();
    let before = disk.read(l.bitmap_offset_bytes, l.bitmap_bytes as usize);
    let good = BitmapBlock { index: 0, data: Box::new([1u8; 4096]), crc: crc32c::crc32c(&[1u8; 4096]) };
    let past = BitmapBlock { index: 8, ..good.clone() };
    let wrong_crc = BitmapBlock { crc: good.crc ^ 1, ..good.clone() };
    for bad in [past, wrong_crc] {
        // The good block first: nothing at all is written when any block is bad.
        let e = store.write_bitmap_blocks(&[good.clone(), bad]).unwrap_err();
        assert!(matches!(e, MetaError::BadBitmapIo { .. }), "{e:?}");
        assert!(e.to_string().contains("refused bitmap I/O: block"), "{e}");
    }
    assert_eq!(disk.read(l.bitmap_offset_bytes, l.bitmap_bytes as usize), before);
    let e = store.read_bitmap(l.data_bytes + 4096).unwrap_err();
    assert!(matches!(e, MetaError::BadBitmapIo { .. }), "{e:?}");
    store.write_bitmap_blocks(&[]).unwrap();
    store.write_bitmap_blocks(&[good]).unwrap();
    // 0x01 in each of the block's 4096 bytes: one bit per byte.
    assert_eq!(store.read_bitmap(l.data_bytes).unwrap().count_bits(), 4096);
}

fn al_slot(store: &MetaStore, slot: u64) -> u64 {
    store.layout().al_offset_bytes + slot * (32 << 10)
}

#[test]
fn al_round_trip_and_alternation() {
    for external_meta in [false, true] {
        let disk = Temp::sparse("al-rt.img", GIB);
        let meta = Temp::path_only("al-rt.md");
        let loc = if external_meta { external(&disk, &meta) } else { internal(&disk) };
        MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
        let mut store = MetaStore::open(&loc).unwrap();
        assert_eq!(store.al, None);
        let sets: [&[u32]; 4] = [&[7, 3, 200], &[], &[0, 1, 2, 255], &[9]];
        let mut seen = Vec::new();
        for set in sets {
            store.write_al(set).unwrap();
            assert_eq!(store.read_al().unwrap(), set);
            let n = store.al.unwrap();
            seen.push((n.slot, n.sequence));
        }
        assert_eq!(seen, [(0, 1), (1, 2), (0, 3), (1, 4)]);
        let file = if external_meta { &meta } else { &disk };
        assert_eq!(file.read(al_slot(&store, 0), 8), b"BLKDALOG");
        assert_eq!(file.read(al_slot(&store, 1), 8), b"BLKDALOG");
        drop(store);
        let mut store = MetaStore::open(&loc).unwrap();
        assert_eq!(store.read_al().unwrap(), [9]);
        assert_eq!(store.dump().lines().find(|l| l.starts_with("al_hot_extents")), Some("al_hot_extents: 1"));
        // After reopening, the next write still goes to the older slot.
        store.write_al(&[4, 5]).unwrap();
        assert_eq!(store.al, Some(AlNewest { slot: 0, sequence: 5 }));
        drop(store);
        assert_eq!(MetaStore::open(&loc).unwrap().read_al().unwrap(), [4, 5]);
    }
}

#[test]
fn torn_or_corrupt_newest_al_slot_falls_back_to_the_older() {
    let disk = Temp::sparse("al-torn.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    store.write_al(&[1, 2, 3]).unwrap(); // slot A, sequence 1
    let slot_b = al_slot(&store, 1);
    store.write_al(&[10, 11]).unwrap(); // slot B, sequence 2
    let old_b = disk.read(slot_b, 32 << 10);
    store.write_al(&[20, 21, 22, 23]).unwrap(); // slot A, sequence 3
    store.write_al(&[30]).unwrap(); // slot B, sequence 4
    let new_b = disk.read(slot_b, 32 << 10);
    drop(store);

    // A flipped byte in the newest slot (B): its header, its extents, its padding.
    for at in [3, 14, 18, 26, 29, 30_000] {
        disk.flip(slot_b + at);
        let store = MetaStore::open(&loc).unwrap();
        assert_eq!(store.read_al().unwrap(), [20, 21, 22, 23], "byte {at}");
        assert_eq!(store.al, Some(AlNewest { slot: 0, sequence: 3 }));
        drop(store);
        disk.flip(slot_b + at);
    }
    // Torn inside the first sector: the new header (magic, crc, sequence, count) over
    // the old extents, which the crc does not cover.
    assert_ne!(new_b[28..], old_b[28..], "the tear must split changed bytes");
    disk.write(slot_b, &[&new_b[..28], &old_b[28..]].concat());
    let mut store = MetaStore::open(&loc).unwrap();
    assert_eq!(store.read_al().unwrap(), [20, 21, 22, 23]);
    // The next write replaces the torn slot, not the valid one.
    store.write_al(&[40]).unwrap();
    assert_eq!(store.al, Some(AlNewest { slot: 1, sequence: 4 }));
    assert_eq!(store.read_al().unwrap(), [40]);
    // Both slots bad: the empty set.
    let slot_a = al_slot(&store, 0);
    drop(store);
    disk.flip(slot_a + 20);
    disk.flip(slot_b + 20);
    assert_eq!(MetaStore::open(&loc).unwrap().read_al().unwrap(), Vec::<u32>::new());
}

#[test]
fn al_refuses_too_many_or_out_of_range_extents() {
    let disk = Temp::sparse("al-max.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let extents_in_device = store.data_size_bytes().div_ceil(4 * MIB) as u32;
    assert_eq!(MAX_AL_EXTENTS, 8000);
    assert_eq!(MAX_AL_EXTENTS, crate::config::MAX_AL_EXTENTS_CONFIG);
    store.write_al(&[5]).unwrap();
    let full: Vec<u32> = (0..MAX_AL_EXTENTS).map(|i| i % extents_in_device).collect();
    let too_many: Vec<u32> = (0..=MAX_AL_EXTENTS).map(|i| i % extents_in_device).collect();
    let e = store.write_al(&too_many).unwrap_err();
    assert!(matches!(e, MetaError::TooManyAlExtents { count: 8001, max: 8000, .. }), "{e:?}");
    assert!(e.to_string().contains("8001 hot extents, one slot holds at most 8000"), "{e}");
    let e = store.write_al(&[0, extents_in_device]).unwrap_err();
    assert!(matches!(e, MetaError::AlExtentOutOfRange { .. }), "{e:?}");
    let e = store.write_al(&[u32::MAX]).unwrap_err();
    assert!(matches!(e, MetaError::AlExtentOutOfRange { .. }), "{e:?}");
    // Refusals change nothing, on disk or in memory.
    assert_eq!((store.read_al().unwrap(), store.al), (vec![5], Some(AlNewest { slot: 0, sequence: 1 })));
    store.write_al(&full).unwrap();
    drop(store);
    assert_eq!(MetaStore::open(&loc).unwrap().read_al().unwrap(), full);
}

#[test]
fn salvaging_distrusts_only_the_blocks_that_fail_their_crc() {
    // A torn bitmap write (a block and its crc entry out of step) after an unclean
    // stop: that block's region becomes dirty, the rest is read as written.
    let disk = Temp::sparse("bm-salvage.img", GIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let l = *store.layout();
    let size = store.data_size_bytes();
    let mut map = Bitmap::new(size, 4096).unwrap();
    map.set_range(0..4096);
    store.write_bitmap_blocks(&changed(&map)).unwrap();
    // Block 3's bits change on disk without their crc.
    disk.flip(l.bitmap_offset_bytes + 3 * 4096 + 17);
    assert!(matches!(store.read_bitmap(size), Err(MetaError::BitmapCorrupt { block: 3, .. })));
    let (salvaged, bad) = store.read_bitmap_salvaging(size).unwrap();
    assert_eq!(bad, vec![3]);
    let per_block = bitmap::BITS_PER_BLOCK * 4096;
    assert!(salvaged.is_set(0), "block 0 read as written");
    assert!(!salvaged.is_set(4096), "block 0's clear bits stay clear");
    assert!(
        (3 * per_block..4 * per_block.min(size)).step_by(1 << 20).all(|b| b >= size || salvaged.is_set(b))
    );
    assert_eq!(
        salvaged.count_bits(),
        1 + bitmap::BITS_PER_BLOCK.min(size.div_ceil(4096) - 3 * bitmap::BITS_PER_BLOCK)
    );
}
