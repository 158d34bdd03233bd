// The API takes a slice of ranges; a slice of one range is what these tests mean.
#![allow(clippy::single_range_in_vec_init)]
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const G: u32 = 4096;
/// 16 whole granules and a partial one: the last granule's record is shorter.
const DEVICE: u64 = 16 * G as u64 + 1000;

struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Temp {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("blockd-undo-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Temp(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn header(capacity_bytes: u64) -> UndoHeader {
    UndoHeader {
        device_size_bytes: DEVICE,
        granule_bytes: G,
        capacity_bytes,
        purpose: Purpose::CatchUp,
        generation: 0xfeed_beef,
        created_unix_s: 1_700_000_000,
    }
}

/// Room for every granule of the device.
fn roomy() -> u64 {
    HEADER_BYTES + 17 * (RECORD_HEADER_BYTES + u64::from(G))
}

/// Distinct bytes everywhere (a function of offset and `seed`).
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 12) as u8) ^ seed).collect()
}

fn data_file(path: &Path, contents: &[u8]) -> File {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.write_all_at(contents, 0).unwrap();
    f
}

fn read_all(f: &File) -> Vec<u8> {
    let mut v = vec![0; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

/// Preserve + sync + overwrite, as the catch-up will do.
fn write_through(j: &mut UndoJournal, data: &File, range: Range<u64>, seed: u8) {
    j.preserve(data, std::slice::from_ref(&range)).unwrap();
    j.sync().unwrap();
    data.write_all_at(&pattern(seed, range.end - range.start), range.start).unwrap();
}

#[test]
fn header_round_trips_and_reopens_empty() {
    let t = Temp::new("header");
    let path = t.path("r0.undo");
    let j = UndoJournal::create(&path, header(roomy())).unwrap();
    assert_eq!(j.used_bytes(), HEADER_BYTES);
    drop(j);
    let j = UndoJournal::open(&path).unwrap().expect("the journal");
    assert_eq!(j.header(), &header(roomy()));
    assert_eq!((j.preserved_bytes(), j.preserved_granules(), j.torn_tail()), (0, 0, None));
    assert!(UndoJournal::open(&t.path("none.undo")).unwrap().is_none());
    assert!(!t.path("r0.undo.tmp").exists(), "create leaves no temporary file");
    let e = UndoJournal::create(&t.path("missing/r0.undo"), header(roomy())).unwrap_err();
    assert!(matches!(e, UndoError::Io { op: "create", .. }), "{e}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn preserve_overwrite_roll_back_restores_and_is_idempotent() {
    let t = Temp::new("rollback");
    let orig = pattern(1, DEVICE);
    let data = data_file(&t.path("disk"), &orig);
    let mut j = UndoJournal::create(&t.path("r0.undo"), header(roomy())).unwrap();
    write_through(&mut j, &data, 5000..20000, 2);
    write_through(&mut j, &data, 0..100, 3);
    write_through(&mut j, &data, DEVICE - 10..DEVICE, 4);
    assert_ne!(read_all(&data), orig);
    let restored = j.roll_back(&data).unwrap();
    // Granules 0..5 (5000..20000 is granules 1..=4, 0..100 granule 0) and the last, partial one.
    assert_eq!(restored, 5 * u64::from(G) + 1000);
    assert_eq!(read_all(&data), orig);
    // Again (after a crash during it, say), and again after a reopen: the same image.
    data.write_all_at(&pattern(9, 3000), 6000).unwrap();
    assert_eq!(j.roll_back(&data).unwrap(), restored);
    assert_eq!(read_all(&data), orig);
    drop(j);
    let j = UndoJournal::open(&t.path("r0.undo")).unwrap().unwrap();
    assert_eq!(j.roll_back(&data).unwrap(), restored);
    assert_eq!(read_all(&data), orig);
}

#[test]
fn unaligned_ranges_widen_to_granules_and_are_preserved_once() {
    let t = Temp::new("granules");
    let data = data_file(&t.path("disk"), &pattern(1, DEVICE));
    let mut j = UndoJournal::create(&t.path("r0.undo"), header(roomy())).unwrap();
    let g = u64::from(G);
    // 4095..4097 touches granules 0 and 1; the second range overlaps it; the empty one
    // is nothing.
    let out = j.preserve(&data, &[4095..4097, 4096..4100, 9000..9000]).unwrap();
    assert_eq!(out, PreserveOutcome { granules: 2, file_bytes: 2 * (RECORD_HEADER_BYTES + g) });
    assert!(j.is_preserved(0) && j.is_preserved(g) && j.is_preserved(g + 17) && !j.is_preserved(2 * g));
    // Already preserved: nothing appended.
    let used = j.used_bytes();
    assert_eq!(j.preserve(&data, &[0..2 * g]).unwrap(), PreserveOutcome::default());
    assert_eq!(j.used_bytes(), used);
    // Partly preserved: only the new granule.
    assert_eq!(j.preserve(&data, &[g..2 * g + 1]).unwrap().granules, 1);
    // The last, partial granule holds what the device has.
    let out = j.preserve(&data, &[DEVICE - 1..DEVICE]).unwrap();
    assert_eq!(out.file_bytes, RECORD_HEADER_BYTES + 1000);
    assert_eq!(j.preserved_bytes(), 3 * g + 1000);
    assert!(matches!(j.preserve(&data, &[DEVICE - 1..DEVICE + 1]), Err(UndoError::OutOfDevice { .. })));
    // A range over many chunks is read in pieces and comes back whole.
    let big = Temp::new("granules-big");
    let device = (3 << 20) + 512;
    let orig = pattern(5, device);
    let data = data_file(&big.path("disk"), &orig);
    let h = UndoHeader { device_size_bytes: device, capacity_bytes: 8 << 20, ..header(0) };
    let mut j = UndoJournal::create(&big.path("r0.undo"), h).unwrap();
    assert_eq!(j.preserve(&data, &[1..device]).unwrap().granules, device.div_ceil(g));
    data.write_all_at(&vec![0; device as usize], 0).unwrap();
    assert_eq!(j.roll_back(&data).unwrap(), device);
    assert_eq!(read_all(&data), orig);
}

#[test]
fn full_appends_nothing() {
    let t = Temp::new("full");
    let data = data_file(&t.path("disk"), &pattern(1, DEVICE));
    let g = u64::from(G);
    // Room for three records.
    let capacity = HEADER_BYTES + 3 * (RECORD_HEADER_BYTES + g) + 10;
    let mut j = UndoJournal::create(&t.path("r0.undo"), header(capacity)).unwrap();
    j.preserve(&data, &[0..2 * g]).unwrap();
    let used = j.used_bytes();
    match j.preserve(&data, &[2 * g..4 * g]) {
        Err(UndoError::Full { needed_bytes, used_bytes, capacity_bytes }) => {
            assert_eq!(
                (needed_bytes, used_bytes, capacity_bytes),
                (2 * (RECORD_HEADER_BYTES + g), used, capacity)
            );
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(j.used_bytes(), used);
    assert!(!j.is_preserved(2 * g));
    assert_eq!(std::fs::metadata(t.path("r0.undo")).unwrap().len(), used);
    // What fits still goes in.
    assert_eq!(j.preserve(&data, &[2 * g..3 * g]).unwrap().granules, 1);
    assert!(UndoJournal::create(&t.path("x.undo"), header(HEADER_BYTES)).is_err());
}

/// A journal of three records, synced; returns its path, the device contents and
/// where the last record starts.
fn three_records(t: &Temp) -> (PathBuf, Vec<u8>, u64) {
    let orig = pattern(1, DEVICE);
    let data = data_file(&t.path("disk"), &orig);
    let path = t.path("r0.undo");
    let mut j = UndoJournal::create(&path, header(roomy())).unwrap();
    write_through(&mut j, &data, 0..2 * u64::from(G), 2);
    let last = j.used_bytes();
    write_through(&mut j, &data, 10 * u64::from(G)..10 * u64::from(G) + 1, 3);
    (path, orig, last)
}

#[test]
fn a_torn_last_record_is_cut_at_every_length_and_on_any_corrupt_byte() {
    let t = Temp::new("torn");
    let (path, _orig, last) = three_records(&t);
    let whole = std::fs::read(&path).unwrap();
    let copy = t.path("copy.undo");
    let check_two = |why: &str| {
        let j = UndoJournal::open(&copy).unwrap().unwrap();
        assert_eq!(j.preserved_granules(), 2, "{why}");
        assert!(j.is_preserved(0) && j.is_preserved(u64::from(G)) && !j.is_preserved(10 * u64::from(G)));
        assert_eq!(j.used_bytes(), last, "{why}");
        drop(j);
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), last, "{why}: the tail is truncated");
    };
    for cut in last..whole.len() as u64 {
        std::fs::write(&copy, &whole[..cut as usize]).unwrap();
        check_two(&format!("cut at {cut}"));
    }
    // A corrupt byte anywhere in the last record (the reserved field included).
    for at in last..whole.len() as u64 {
        let mut bytes = whole.clone();
        bytes[at as usize] ^= 0x40;
        std::fs::write(&copy, &bytes).unwrap();
        check_two(&format!("byte {at} flipped"));
    }
    // Zeros after the records (a preallocated or torn extension) are a tail too.
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&[0; 5000]);
    std::fs::write(&copy, &bytes).unwrap();
    let j = UndoJournal::open_read_only(&copy).unwrap().unwrap();
    assert_eq!(j.torn_tail(), Some((5000, "no record magic")));
    drop(j);
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), bytes.len() as u64, "read-only: nothing truncated");
    assert_eq!(UndoJournal::open(&copy).unwrap().unwrap().preserved_granules(), 3);
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), whole.len() as u64);
}

#[test]
fn a_record_of_another_journal_is_not_taken() {
    let t = Temp::new("stale");
    let (path, _orig, _) = three_records(&t);
    let old = std::fs::read(&path).unwrap();
    // A new journal at the same path, with one record; the old file's later records
    // pasted after it, where the new journal's next record would be.
    let data = data_file(&t.path("disk2"), &pattern(7, DEVICE));
    let mut j = UndoJournal::create(&path, header(roomy())).unwrap();
    j.preserve(&data, &[0..1]).unwrap();
    j.sync().unwrap();
    let end = j.used_bytes() as usize;
    drop(j);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&old[end..]);
    std::fs::write(&path, &bytes).unwrap();
    let j = UndoJournal::open(&path).unwrap().unwrap();
    assert_eq!(j.preserved_granules(), 1);
    assert_eq!(j.torn_tail().map(|t| t.1), Some("a record of another journal"));
}

#[test]
fn checksummed_nonsense_and_bad_headers_are_errors() {
    let t = Temp::new("corrupt");
    let (path, _, last) = three_records(&t);
    let whole = std::fs::read(&path).unwrap();
    let id = u64::from_le_bytes(whole[16..24].try_into().unwrap());
    // A complete, checksummed record whose offset is not a granule's: an error, not a tail.
    let mut bytes = whole[..last as usize].to_vec();
    format::encode_record(&mut bytes, id, 2, 100, &[0; G as usize]);
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::Corrupt { .. })));
    // The same granule twice.
    let mut bytes = whole[..last as usize].to_vec();
    format::encode_record(&mut bytes, id, 2, 0, &[0; G as usize]);
    std::fs::write(&path, &bytes).unwrap();
    let e = UndoJournal::open(&path).unwrap_err();
    assert!(e.to_string().contains("preserved twice"), "{e}");
    // Headers.
    let mut bytes = whole.clone();
    bytes[40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::BadHeader { .. })));
    let mut bytes = whole.clone();
    bytes[8] = 9;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::Version { version: 9, .. })));
    std::fs::write(&path, &whole[..100]).unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::BadHeader { .. })));
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::NotAJournal { .. })));
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(UndoJournal::open(&path), Err(UndoError::NotAJournal { .. })));
}

#[test]
fn export_sparse_writes_the_preserved_granules_at_their_offsets() {
    let t = Temp::new("export");
    let orig = pattern(1, DEVICE);
    let data = data_file(&t.path("disk"), &orig);
    let mut j = UndoJournal::create(&t.path("r0.undo"), header(roomy())).unwrap();
    let g = u64::from(G);
    write_through(&mut j, &data, 3 * g..5 * g, 2);
    write_through(&mut j, &data, g + 1..g + 2, 3);
    write_through(&mut j, &data, 2 * g..2 * g + 1, 4);
    write_through(&mut j, &data, 8 * g..8 * g + 1, 5);
    let out = data_file(&t.path("export.img"), &[]);
    let ranges = j.export_sparse(&out).unwrap();
    assert_eq!(ranges, vec![g..5 * g, 8 * g..9 * g]);
    let image = read_all(&out);
    assert_eq!(image.len() as u64, DEVICE);
    for (i, (got, want)) in image.iter().zip(&orig).enumerate() {
        let inside = ranges.iter().any(|r| r.contains(&(i as u64)));
        assert_eq!(*got, if inside { *want } else { 0 }, "byte {i}");
    }
}

#[test]
fn reopen_rebuilds_the_preserved_set_and_appends_after() {
    let t = Temp::new("reopen");
    let orig = pattern(1, DEVICE);
    let data = data_file(&t.path("disk"), &orig);
    let path = t.path("r0.undo");
    let g = u64::from(G);
    let mut j = UndoJournal::create(&path, header(roomy())).unwrap();
    write_through(&mut j, &data, 0..3 * g, 2);
    drop(j);
    let mut j = UndoJournal::open(&path).unwrap().unwrap();
    assert_eq!((j.preserved_granules(), j.preserved_bytes()), (3, 3 * g));
    assert!((0..3).all(|k| j.is_preserved(k * g)) && !j.is_preserved(3 * g));
    // Appending after a reopen: the new records continue the sequence; only the new
    // granule is appended.
    assert_eq!(j.preserve(&data, &[2 * g..4 * g]).unwrap().granules, 1);
    j.sync().unwrap();
    data.write_all_at(&pattern(3, 2 * g), 2 * g).unwrap();
    drop(j);
    let j = UndoJournal::open(&path).unwrap().unwrap();
    assert_eq!(j.preserved_granules(), 4);
    j.roll_back(&data).unwrap();
    assert_eq!(read_all(&data), orig);
    let ro = UndoJournal::open_read_only(&path).unwrap().unwrap();
    let mut ro = ro;
    assert!(matches!(ro.preserve(&data, &[0..1]), Err(UndoError::ReadOnly { .. })));
}

#[test]
fn keep_as_list_discarded_and_remove() {
    let t = Temp::new("keep");
    let dir = t.path("undo");
    std::fs::create_dir(&dir).unwrap();
    assert_eq!(catchup_path(&dir, "r0"), dir.join("r0.undo"));
    assert!(list_discarded(&t.path("missing"), "r0").unwrap().is_empty());
    for stamp in [100, 300, 200] {
        let h = UndoHeader { purpose: Purpose::Discarded, ..header(roomy()) };
        let j = UndoJournal::create(&catchup_path(&dir, "r0"), h).unwrap();
        j.keep_as(&discarded_path(&dir, "r0", stamp)).unwrap();
    }
    assert!(!catchup_path(&dir, "r0").exists());
    // Not theirs: another resource, a stray name.
    std::fs::write(dir.join("r01.discarded.999.undo"), b"").unwrap();
    std::fs::write(dir.join("r0.discarded.x1.undo"), b"").unwrap();
    let found = list_discarded(&dir, "r0").unwrap();
    let stamps: Vec<u64> = found.iter().map(|d| d.unix_s).collect();
    assert_eq!(stamps, [300, 200, 100]);
    assert_eq!(found[0].path, discarded_path(&dir, "r0", 300));
    // keep_as never replaces a kept journal.
    let j = UndoJournal::create(&catchup_path(&dir, "r0"), header(roomy())).unwrap();
    assert!(matches!(j.keep_as(&discarded_path(&dir, "r0", 300)), Err(UndoError::Exists { .. })));
    assert!(catchup_path(&dir, "r0").exists());
    UndoJournal::remove(&catchup_path(&dir, "r0")).unwrap();
    assert!(!catchup_path(&dir, "r0").exists());
    UndoJournal::remove(&catchup_path(&dir, "r0")).unwrap();
}

/// Crashes at random points of random catch-ups (deterministic seed): the journal as
/// the disk may hold it (everything synced, plus any prefix of what was appended
/// after, with a torn page or a flipped byte in that part), and the data disk as it
/// may be (writes of earlier batches, and of the current batch only after its sync,
/// any prefix of the one in flight). Opening the journal and rolling back must give
/// the image from before the catch-up, every time.
#[test]
fn random_crashes_always_roll_back_to_the_image_before_the_catch_up() {
    let t = Temp::new("crashes");
    let mut rng = StdRng::seed_from_u64(0x0dd_c0ffee);
    let orig = pattern(1, DEVICE);
    let g = u64::from(G);
    for iteration in 0..300 {
        let path = t.path("r0.undo");
        let data = data_file(&t.path("disk"), &orig);
        let mut j = UndoJournal::create(&path, header(roomy())).unwrap();
        let batches = rng.random_range(1..6);
        let crash_batch = rng.random_range(0..batches);
        let crash_before_sync = rng.random_bool(0.4);
        let mut synced_len = j.used_bytes();
        let mut crashed_data = None;
        for b in 0..batches {
            let ranges: Vec<Range<u64>> = (0..rng.random_range(1..4))
                .map(|_| {
                    let start = rng.random_range(0..DEVICE);
                    start..(start + rng.random_range(1..3 * g)).min(DEVICE)
                })
                .collect();
            j.preserve(&data, &ranges).unwrap();
            if b == crash_batch && crash_before_sync {
                crashed_data = Some(read_all(&data));
                break;
            }
            j.sync().unwrap();
            synced_len = j.used_bytes();
            let in_flight = if b == crash_batch { rng.random_range(0..ranges.len()) } else { ranges.len() };
            for (k, r) in ranges.iter().enumerate() {
                let new = pattern(rng.random(), r.end - r.start);
                if k == in_flight {
                    let part = rng.random_range(0..=new.len());
                    data.write_all_at(&new[..part], r.start).unwrap();
                    break;
                }
                data.write_all_at(&new, r.start).unwrap();
            }
            if b == crash_batch {
                crashed_data = Some(read_all(&data));
                break;
            }
        }
        // The journal after the crash: the synced part intact, some of the rest.
        let mut file = std::fs::read(&path).unwrap();
        let kept = rng.random_range(synced_len as usize..=file.len());
        file.truncate(kept);
        if kept > synced_len as usize {
            match rng.random_range(0..3) {
                0 => {}
                1 => {
                    let at = rng.random_range(synced_len as usize..kept);
                    let end = (at + 512).min(kept);
                    file[at..end].fill(0);
                }
                _ => {
                    let at = rng.random_range(synced_len as usize..kept);
                    file[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        drop(j);
        std::fs::write(&path, &file).unwrap();
        let data = data_file(&t.path("disk"), &crashed_data.expect("a crash point"));
        let j = UndoJournal::open(&path).unwrap().unwrap();
        assert!(j.used_bytes() >= synced_len, "iteration {iteration}: synced records lost");
        j.roll_back(&data).unwrap();
        assert!(read_all(&data) == orig, "iteration {iteration}: the rolled-back image differs");
    }
}
