//! MetaStore tests on sparse temp files: create/open round trips (internal and
//! external), slot alternation, fallback from corrupt or torn slots, refusals and the
//! messages operators see. Layout properties are tested in `layout.rs`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

pub(super) const MIB: u64 = 1 << 20;

/// A uniquely named temp file, removed on drop.
pub(super) struct Temp(pub(super) PathBuf);

impl Temp {
    pub(super) fn path_only(name: &str) -> Temp {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Temp(std::env::temp_dir().join(format!("blockd-meta-{}-{n}-{name}", std::process::id())))
    }

    /// A sparse file of `len_bytes`.
    pub(super) fn sparse(name: &str, len_bytes: u64) -> Temp {
        let t = Temp::path_only(name);
        File::create(&t.0).unwrap().set_len(len_bytes).unwrap();
        t
    }

    pub(super) fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.0).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    pub(super) fn write(&self, offset: u64, bytes: &[u8]) {
        OpenOptions::new().write(true).open(&self.0).unwrap().write_all_at(bytes, offset).unwrap();
    }

    pub(super) fn flip(&self, offset: u64) {
        let b = self.read(offset, 1)[0];
        self.write(offset, &[b ^ 0x40]);
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn internal(disk: &Temp) -> MetaTarget {
    MetaTarget { backing: disk.0.clone(), location: MetaLocation::Internal }
}

pub(super) fn opts(resource: &str, node: &str) -> CreateOptions {
    CreateOptions {
        resource: resource.into(),
        node: node.into(),
        granularity_bytes: 4096,
        force: false,
        clear_bitmap: false,
        size_bytes: None,
    }
}

#[test]
fn create_open_round_trip_internal() {
    let disk = Temp::sparse("int.img", 64 * MIB);
    let loc = internal(&disk);
    let expect = Layout::compute(64 * MIB, 4096, &MetaLocation::Internal).unwrap();
    // Garbage where the areas go, to see that create zeroes them; data before them.
    disk.write(expect.area_offset_bytes, &vec![0xff; expect.area_bytes as usize]);
    disk.write(0, b"user data");

    let created = MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let store = MetaStore::open(&loc).unwrap();
    assert_eq!(store.superblock(), &created);
    assert_eq!(store.layout(), &expect);
    assert_eq!(store.data_size_bytes(), expect.data_bytes);
    let sb = store.superblock();
    assert_eq!((sb.sequence, store.current_slot()), (2, 'B'));
    assert_eq!((sb.resource.as_str(), sb.node.as_str()), ("r0", "alpha"));
    assert_eq!((sb.disk, sb.generations), (DiskState::Inconsistent, Generations::default()));
    assert_eq!((sb.al_extent_bytes, sb.al_extents, sb.bitmap_granularity_bytes), (4 * MIB, 1237, 4096));
    assert_eq!(sb.flags, MetaFlags { clean_shutdown: true, ..MetaFlags::default() });
    assert_ne!(sb.resource_id, 0);
    store.verify_identity("r0", "alpha").unwrap();
    let l = store.layout();
    // Zero bits and AL; the crc table holds the crc of a zero block (checked in area_tests).
    assert!(disk.read(l.bitmap_offset_bytes, l.bitmap_bits_bytes as usize).iter().all(|&b| b == 0));
    assert!(disk.read(l.al_offset_bytes, l.al_bytes as usize).iter().all(|&b| b == 0));
    assert_eq!(disk.read(0, 9), b"user data");
    assert_eq!(disk.read(l.superblock_offset_bytes, 8), MAGIC);
}

#[test]
fn create_open_round_trip_external() {
    let disk = Temp::sparse("ext-disk.img", 64 * MIB);
    let meta = Temp::path_only("ext.md");
    let loc = MetaTarget { backing: disk.0.clone(), location: MetaLocation::External(meta.0.clone()) };
    let created =
        MetaStore::create(&loc, &CreateOptions { granularity_bytes: 64 << 10, ..opts("r0", "beta") })
            .unwrap();
    // The missing metadata file was created and sized; the disk was not touched.
    let l = *MetaStore::open(&loc).unwrap().layout();
    assert_eq!(std::fs::metadata(&meta.0).unwrap().len(), l.area_end_bytes());
    assert!(disk.read(0, 64 * MIB as usize).iter().all(|&b| b == 0));
    assert_eq!((l.kind, l.data_bytes, l.granularity_bytes), (MetaKind::External, 64 * MIB, 64 << 10));
    let store = MetaStore::open(&loc).unwrap();
    assert_eq!(store.superblock(), &created);
    assert_eq!(store.data_size_bytes(), 64 * MIB);
    assert_eq!(meta.read(0, 8), MAGIC);
}

#[test]
fn update_increments_sequence_and_alternates_slots() {
    let disk = Temp::sparse("upd.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let mut seen = vec![(store.superblock().sequence, store.current_slot())];
    for i in 1..=4u64 {
        store
            .update(|sb| {
                sb.generations.start_new(100 + i);
                sb.flags.was_primary = i % 2 == 1;
                sb.disk = DiskState::UpToDate;
            })
            .unwrap();
        seen.push((store.superblock().sequence, store.current_slot()));
    }
    assert_eq!(seen, [(2, 'B'), (3, 'A'), (4, 'B'), (5, 'A'), (6, 'B')]);
    let before = store.superblock().clone();
    drop(store);
    let store = MetaStore::open(&loc).unwrap();
    assert_eq!(store.superblock(), &before);
    assert_eq!(before.generations.current, 104);
    assert_eq!((before.generations.bitmap, before.generations.history[..2].to_vec()), (103, vec![102, 101]));
}

#[test]
fn corrupt_newest_slot_falls_back_to_older() {
    let disk = Temp::sparse("corrupt1.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let older = store.superblock().clone();
    store.update(|sb| sb.disk = DiskState::Outdated).unwrap();
    let slot_a = store.layout().slot_offset_bytes(0);
    assert_eq!(store.current_slot(), 'A');
    drop(store);
    // Flip one byte anywhere in the newest slot: in a field, in the crc, in padding.
    for at in [20, 13, 81, 200, 4000] {
        disk.flip(slot_a + at);
        let store = MetaStore::open(&loc).unwrap();
        assert_eq!((store.superblock(), store.current_slot()), (&older, 'B'));
        drop(store);
        disk.flip(slot_a + at);
    }
    assert_eq!(MetaStore::open(&loc).unwrap().superblock().disk, DiskState::Outdated);
}

#[test]
fn corrupt_both_slots_is_no_valid_superblock() {
    let disk = Temp::sparse("corrupt2.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let l = *MetaStore::open(&loc).unwrap().layout();
    disk.flip(l.slot_offset_bytes(0) + 100);
    disk.flip(l.slot_offset_bytes(1));
    let e = MetaStore::open(&loc).unwrap_err();
    assert!(matches!(e, MetaError::NoValidSuperblock { .. }), "{e:?}");
    let msg = e.to_string();
    let want = format!("disk {}: no valid superblock: slot A: crc mismatch", disk.0.display());
    assert!(msg.starts_with(&want), "{msg}");
    assert!(msg.ends_with("; slot B: bad magic"), "{msg}");
}

#[test]
fn torn_update_reads_previous_state() {
    let disk = Temp::sparse("torn.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    store.update(|sb| sb.flags.was_primary = true).unwrap();
    let previous = store.superblock().clone();
    let slot_b = store.layout().slot_offset_bytes(1);
    let old_b = disk.read(slot_b, 4096);
    // The next update goes to B; capture what it writes, then replay it torn.
    store.update(|sb| sb.generations.start_new(7)).unwrap();
    let new_b = disk.read(slot_b, 4096);
    drop(store);

    // Half a slot of garbage over B (a crash mid-write on a device that writes
    // garbage), and the new image torn inside its first sector (every field lives in
    // the first 512 bytes; the rest is zero padding in both images).
    assert_ne!(new_b[40..], old_b[40..], "the tear must split changed bytes");
    let garbage: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    let torn_new = [&new_b[..40], &old_b[40..]].concat();
    for torn in [[&garbage[..], &old_b[2048..]].concat(), torn_new] {
        disk.write(slot_b, &torn);
        let store = MetaStore::open(&loc).unwrap();
        assert_eq!((store.superblock(), store.current_slot()), (&previous, 'A'));
    }
}

#[test]
fn create_refuses_existing_metadata_without_force() {
    let disk = Temp::sparse("force.img", 16 * MIB);
    let loc = internal(&disk);
    let first = MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let e = MetaStore::create(&loc, &opts("r1", "alpha")).unwrap_err();
    let want = format!(
        "disk {}: valid blockd metadata already exists (resource r0, node alpha); use --force to overwrite it",
        disk.0.display()
    );
    assert_eq!(e.to_string(), want);
    // Still intact after the refusal.
    assert_eq!(MetaStore::open(&loc).unwrap().superblock(), &first);

    // Only one slot valid still counts as existing metadata.
    disk.flip(MetaStore::open(&loc).unwrap().layout().slot_offset_bytes(1) + 50);
    assert!(matches!(MetaStore::create(&loc, &opts("r1", "a")), Err(MetaError::AlreadyExists { .. })));

    let l = *MetaStore::open(&loc).unwrap().layout();
    disk.write(l.bitmap_offset_bytes, &[0xaa; 4096]);
    let second = MetaStore::create(&loc, &CreateOptions { force: true, ..opts("r1", "alpha") }).unwrap();
    assert_ne!(second.resource_id, first.resource_id);
    let store = MetaStore::open(&loc).unwrap();
    assert_eq!((store.superblock(), store.superblock().sequence), (&second, 2));
    assert!(disk.read(l.bitmap_offset_bytes, 4096).iter().all(|&b| b == 0), "bitmap re-zeroed");
}

#[test]
fn clear_bitmap_gives_equal_generations_on_both_nodes() {
    let (a, b) = (Temp::sparse("cb-a.img", 32 * MIB), Temp::sparse("cb-b.img", 32 * MIB));
    let cb = |node| CreateOptions { clear_bitmap: true, ..opts("r0", node) };
    let sa = MetaStore::create(&internal(&a), &cb("alpha")).unwrap();
    let sb = MetaStore::create(&internal(&b), &cb("beta")).unwrap();
    assert_eq!(sa.generations, sb.generations);
    assert_ne!(sa.resource_id, sb.resource_id);
    assert_eq!(sa.generations.current, clear_bitmap_gen("r0", sa.data_size_bytes));
    assert_ne!(sa.generations.current, 0);
    assert_eq!((sa.generations.bitmap, sa.generations.history), (0, [0; 4]));
    assert_eq!((sa.disk, sa.flags.consistent), (DiskState::UpToDate, true));
    // Another resource or another size is another generation.
    assert_ne!(clear_bitmap_gen("r1", sa.data_size_bytes), sa.generations.current);
    assert_ne!(clear_bitmap_gen("r0", sa.data_size_bytes - 4096), sa.generations.current);
}

#[test]
fn wrong_resource_and_node_are_named() {
    let disk = Temp::sparse("ident.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r1", "beta")).unwrap();
    let store = MetaStore::open(&loc).unwrap();
    let d = disk.0.display();
    let e = store.verify_identity("r0", "beta").unwrap_err();
    assert_eq!(e.to_string(), format!("disk {d}: metadata belongs to resource r1, config says r0"));
    let e = store.verify_identity("r1", "alpha").unwrap_err();
    assert_eq!(e.to_string(), format!("disk {d}: metadata was created for node beta, this is alpha"));
    store.verify_identity("r1", "beta").unwrap();
}

#[test]
fn missing_metadata_says_run_create_md() {
    let disk = Temp::sparse("none.img", 16 * MIB);
    let e = MetaStore::open(&internal(&disk)).unwrap_err();
    let want = format!("disk {}: no blockd metadata found (run `blockctl create-md`)", disk.0.display());
    assert_eq!(e.to_string(), want);
    let meta = Temp::path_only("none.md");
    let loc = MetaTarget { backing: disk.0.clone(), location: MetaLocation::External(meta.0.clone()) };
    assert!(matches!(MetaStore::open(&loc), Err(MetaError::NoMetadata { .. })));
}

#[test]
fn open_locks_out_a_second_user() {
    let disk = Temp::sparse("busy.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let store = MetaStore::open(&loc).unwrap();
    let e = MetaStore::open(&loc).unwrap_err();
    assert!(e.to_string().ends_with("in use by another process (is blockd running?)"), "{e}");
    assert!(matches!(MetaStore::create(&loc, &opts("r0", "alpha")), Err(MetaError::Busy { .. })));
    drop(store);
    MetaStore::open(&loc).unwrap();
}

#[test]
fn configured_size_must_fit_and_becomes_the_export_size() {
    let disk = Temp::sparse("size.img", 16 * MIB);
    let loc = internal(&disk);
    let sized = |size| CreateOptions { size_bytes: Some(size), ..opts("r0", "alpha") };
    let e = MetaStore::create(&loc, &sized(16 * MIB)).unwrap_err();
    assert!(e.to_string().contains("resource.size is 16777216 bytes but only"), "{e}");
    assert!(matches!(MetaStore::create(&loc, &sized(4096)), Err(MetaError::BadSize { .. })));
    assert_eq!(MetaStore::create(&loc, &sized(10 * MIB)).unwrap().data_size_bytes, 10 * MIB);
    assert_eq!(MetaStore::open(&loc).unwrap().data_size_bytes(), 10 * MIB);
    let tiny = Temp::sparse("tiny.img", MIB);
    let e = MetaStore::create(&internal(&tiny), &opts("r0", "alpha")).unwrap_err();
    assert!(matches!(e, MetaError::TooSmall { .. }), "{e:?}");
}

#[test]
fn update_refuses_fixed_fields_and_keeps_state() {
    let disk = Temp::sparse("fixed.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    let before = store.superblock().clone();
    let too_big = store.layout().data_bytes + 4096;
    for bad in [
        Box::new(|sb: &mut Superblock| sb.node = "beta".into()) as Box<dyn FnOnce(&mut Superblock)>,
        Box::new(|sb: &mut Superblock| sb.bitmap_granularity_bytes = 8192),
        Box::new(move |sb: &mut Superblock| sb.data_size_bytes = too_big),
    ] {
        let e = store.update(bad).unwrap_err();
        assert!(matches!(e, MetaError::BadUpdate { .. }), "{e:?}");
        assert_eq!(store.superblock(), &before);
    }
    drop(store);
    assert_eq!(MetaStore::open(&loc).unwrap().superblock(), &before);
}

#[test]
fn unknown_version_and_changed_size_are_clear_errors() {
    let disk = Temp::sparse("ver.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    let slot_b = MetaStore::open(&loc).unwrap().layout().slot_offset_bytes(1);
    // An intact slot of version 2 (valid crc): written by a newer blockd.
    let mut slot = disk.read(slot_b, 4096);
    slot[8..12].copy_from_slice(&2u32.to_le_bytes());
    slot[12..16].fill(0);
    let crc = crc32c::crc32c(&slot);
    slot[12..16].copy_from_slice(&crc.to_le_bytes());
    disk.write(slot_b, &slot);
    let e = MetaStore::open(&loc).unwrap_err();
    assert!(e.to_string().ends_with("slot B has format version 2; this blockd reads version 1 only"), "{e}");

    // External metadata whose backing store grew: the recorded layout no longer fits.
    let meta = Temp::path_only("grow.md");
    let loc = MetaTarget { backing: disk.0.clone(), location: MetaLocation::External(meta.0.clone()) };
    MetaStore::create(&loc, &opts("r0", "alpha")).unwrap();
    File::options().write(true).open(&disk.0).unwrap().set_len(1 << 30).unwrap();
    let e = MetaStore::open(&loc).unwrap_err();
    assert!(matches!(e, MetaError::LayoutMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("did it change size?"), "{e}");
}

#[test]
fn dump_lists_every_field() {
    let disk = Temp::sparse("dump.img", 16 * MIB);
    let loc = internal(&disk);
    MetaStore::create(&loc, &CreateOptions { clear_bitmap: true, ..opts("r0", "alpha") }).unwrap();
    let mut store = MetaStore::open(&loc).unwrap();
    store.update(|sb| sb.flags.was_primary = true).unwrap();
    let dump = store.dump();
    let sb = store.superblock();
    for want in [
        "placement: internal".to_owned(),
        "sequence: 3".into(),
        "current_slot: A".into(),
        "resource: r0".into(),
        "node: alpha".into(),
        format!("data_size_bytes: {}", sb.data_size_bytes),
        "bitmap_granularity_bytes: 4096".into(),
        "al_extents: 1237".into(),
        "disk: UpToDate".into(),
        "consistent: yes".into(),
        "was_primary: yes".into(),
        "clean_shutdown: yes".into(),
        "peer_full_sync_needed: no".into(),
        format!("gen_current: {:016x}", sb.generations.current),
        "gen_history: 0000000000000000 0000000000000000 0000000000000000 0000000000000000".into(),
        format!("superblock_offset_bytes: {}", store.layout().superblock_offset_bytes),
    ] {
        assert!(dump.lines().any(|l| l == want), "{want:?} not in\n{dump}");
    }
    assert!(dump.lines().all(|l| l.split_once(": ").is_some()), "{dump}");
}
