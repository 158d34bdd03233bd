//! `blockctl export-discarded` (issue 15, item 5), offline: kept undo journals are
//! made here with the `blockd` library the daemon uses (a discarded node's catch-up:
//! its data preserved, then overwritten by the peer's), then the real `blockctl`
//! writes them out. Checks the sparse image, the overlay on `--base` (which gives
//! back the discarded node's whole image), the choice of the newest journal,
//! `--journal`, what it prints, and the refusals (none kept, a base of another
//! size) with exit 1 and a reason.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockd::undo::{Purpose, UndoHeader, UndoJournal, catchup_path, discarded_path};
use blockd_tests::pair::binary;
use blockd_tests::tools::Output;
use blockd_tests::{TempDir, run_capture};

/// 4 MiB and a partial granule.
const DEVICE_BYTES: u64 = (4 << 20) + 1536;
const GRANULE: u32 = 4096;
const DEADLINE: Duration = Duration::from_secs(60);
/// When the newer of the two journals was kept.
const KEPT_AT: u64 = 1_700_000_000;

/// Bytes that differ by offset and `seed`.
fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|i| ((i / 7) as u8).wrapping_add((i >> 13) as u8) ^ seed).collect()
}

fn write_file(path: &Path, bytes: &[u8]) -> File {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f
}

struct Setup {
    dir: TempDir,
    config: PathBuf,
    undo_dir: PathBuf,
    /// The discarded node's image before the catch-up.
    before: Vec<u8>,
    /// Its disk after the catch-up (the peer's data where it was overwritten).
    after: PathBuf,
    /// What the newer journal preserved, merged.
    changed: Vec<Range<u64>>,
}

/// A config whose node keeps journals in `<dir>/undo`, and two kept journals of r0:
/// an older one, and the newer one of a catch-up that overwrote `changed`.
fn setup(label: &str) -> Setup {
    let dir = TempDir::new(label);
    let d = dir.path().display().to_string();
    let undo_dir = dir.join("undo");
    std::fs::create_dir(&undo_dir).unwrap();
    let config = dir.join("r0.toml");
    std::fs::write(
        &config,
        format!(
            "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:7789\"\n\
             nbd = \"unix:{d}/alpha.nbd\"\ndisk = \"{d}/alpha.img\"\nmeta = \"internal\"\n\
             control = \"{d}/alpha.ctl\"\nundo-dir = \"{d}/undo\"\n"
        ),
    )
    .unwrap();
    let before = pattern(0x11, 0, DEVICE_BYTES);
    let after = dir.join("alpha.img");
    // The older journal: one granule of other contents.
    let older = write_file(&dir.join("older.img"), &pattern(0x77, 0, DEVICE_BYTES));
    catch_up(&older, &undo_dir, KEPT_AT - 3600, std::slice::from_ref(&(0..1)));
    // The newer: unaligned writes, one across granules, one at the device's end.
    let disk = write_file(&after, &before);
    let writes = [
        5000..9000,
        1 << 20..(1 << 20) + 1,
        (2 << 20) - 10..(2 << 20) + 10,
        DEVICE_BYTES - 100..DEVICE_BYTES,
    ];
    catch_up(&disk, &undo_dir, KEPT_AT, &writes);
    let g = u64::from(GRANULE);
    let changed = vec![
        g..3 * g,
        1 << 20..(1 << 20) + g,
        (2 << 20) - g..(2 << 20) + g,
        DEVICE_BYTES / g * g..DEVICE_BYTES,
    ];
    Setup { dir, config, undo_dir, before, after, changed }
}

/// A discarded node's catch-up as the daemon runs it: each write's granules
/// preserved and synced before the peer's data overwrites them; then kept.
fn catch_up(disk: &File, undo_dir: &Path, kept_at: u64, writes: &[Range<u64>]) {
    let header = UndoHeader {
        device_size_bytes: DEVICE_BYTES,
        granule_bytes: GRANULE,
        capacity_bytes: 64 << 20,
        purpose: Purpose::Discarded,
        generation: 0xabcd_0000_0000_0000 | kept_at,
        created_unix_s: kept_at - 60,
    };
    let mut journal = UndoJournal::create(&catchup_path(undo_dir, "r0"), header).unwrap();
    for w in writes {
        journal.preserve(disk, std::slice::from_ref(w)).unwrap();
        journal.sync().unwrap();
        disk.write_all_at(&pattern(0x99, w.start, w.end - w.start), w.start).unwrap();
    }
    journal.keep_as(&discarded_path(undo_dir, "r0", kept_at)).unwrap();
}

fn blockctl(s: &Setup, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary("blockctl"));
    cmd.arg("--config").arg(&s.config).args(["--node", "alpha"]).args(args);
    run_capture(&mut cmd, DEADLINE)
}

fn ok(s: &Setup, args: &[&str]) -> Output {
    let out = blockctl(s, args);
    assert!(out.status.success(), "{}", out.describe());
    out
}

fn refused(s: &Setup, args: &[&str], reason: &str) {
    let out = blockctl(s, args);
    assert_eq!(out.status.code(), Some(1), "want exit 1\n{}", out.describe());
    assert!(out.stderr.contains(reason), "stderr should say {reason:?}\n{}", out.describe());
}

#[test]
fn sparse_image_of_the_newest_journal() {
    let s = setup("export-sparse");
    let output = s.dir.join("saved.img");
    let out = ok(&s, &["export-discarded", "r0", "--output", output.to_str().unwrap()]);
    let image = std::fs::read(&output).unwrap();
    assert_eq!(image.len() as u64, DEVICE_BYTES, "the device's size");
    for (i, byte) in image.iter().enumerate() {
        let i = i as u64;
        let want = if s.changed.iter().any(|r| r.contains(&i)) { s.before[i as usize] } else { 0 };
        assert!(*byte == want, "byte {i}: {byte:#x}, want {want:#x}\n{}", out.describe());
    }
    // Sparse: far fewer blocks allocated than the device's size.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&output).unwrap().blocks() * 512;
    assert!(allocated < DEVICE_BYTES / 4, "{allocated} bytes allocated for a mostly empty image");
    let journal = discarded_path(&s.undo_dir, "r0", KEPT_AT);
    let saved: u64 = s.changed.iter().map(|r| r.end - r.start).sum();
    for want in [
        format!("journal: {} (discarded)", journal.display()),
        format!("generation: {:#018x}", 0xabcd_0000_0000_0000u64 | KEPT_AT),
        format!("catch-up started: {} (2023-11-14 22:12:20 UTC)", KEPT_AT - 60),
        format!("wrote: 4 ranges, {saved} bytes of saved blocks, to {}", output.display()),
        format!("  {}..{} ({} bytes)", 4096, 3 * 4096, 2 * 4096),
        "base: none".to_owned(),
    ] {
        assert!(out.stdout.contains(&want), "stdout lacks {want:?}\n{}", out.describe());
    }
}

#[test]
fn base_overlay_gives_back_the_discarded_image() {
    let s = setup("export-base");
    let output = s.dir.join("recovered.img");
    let args = ["export-discarded", "r0", "--output", output.to_str().unwrap(), "--base"];
    let out = ok(&s, &[&args[..], &[s.after.to_str().unwrap()]].concat());
    assert!(
        std::fs::read(&output).unwrap() == s.before,
        "not the discarded node's image\n{}",
        out.describe()
    );
    assert!(out.stdout.contains(&format!("base: {}", s.after.display())), "{}", out.describe());
    // The output is replaced on a second run, not appended to or refused.
    let out = ok(&s, &[&args[..], &[s.after.to_str().unwrap()]].concat());
    assert!(std::fs::read(&output).unwrap() == s.before, "{}", out.describe());
}

#[test]
fn an_explicit_journal_needs_no_config() {
    let s = setup("export-journal");
    let output = s.dir.join("older.out");
    let journal = discarded_path(&s.undo_dir, "r0", KEPT_AT - 3600);
    let mut cmd = Command::new(binary("blockctl"));
    cmd.args(["export-discarded", "--journal", journal.to_str().unwrap(), "--output"]).arg(&output);
    let out = run_capture(&mut cmd, DEADLINE);
    assert!(out.status.success(), "{}", out.describe());
    let image = std::fs::read(&output).unwrap();
    assert_eq!(&image[..4096], &pattern(0x77, 0, 4096)[..], "the older journal's granule");
    assert!(image[4096..].iter().all(|b| *b == 0));
    assert!(out.stdout.contains("wrote: 1 ranges, 4096 bytes"), "{}", out.describe());
}

#[test]
fn refusals() {
    let s = setup("export-refused");
    let output = s.dir.join("x.img");
    let o = output.to_str().unwrap();
    // A base of another size.
    let small = s.dir.join("small.img");
    write_file(&small, &[1; 4096]);
    let reason = format!("is 4096 bytes, but the journal's device is {DEVICE_BYTES} bytes");
    refused(&s, &["export-discarded", "r0", "--output", o, "--base", small.to_str().unwrap()], &reason);
    // The output may not be the base or the journal.
    let after = s.after.to_str().unwrap();
    refused(
        &s,
        &["export-discarded", "r0", "--output", after, "--base", after],
        "is the journal or the base",
    );
    // A missing journal, named or looked up.
    let missing = s.dir.join("missing.undo");
    let args = ["export-discarded", "r0", "--output", o, "--journal", missing.to_str().unwrap()];
    refused(&s, &args, "none was kept there");
    for entry in std::fs::read_dir(&s.undo_dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    refused(&s, &["export-discarded", "r0", "--output", o], "no discarded data was kept for r0");
    // Not a journal.
    let junk = s.dir.join("junk.undo");
    std::fs::write(&junk, b"not a journal at all").unwrap();
    refused(
        &s,
        &["export-discarded", "r0", "--output", o, "--journal", junk.to_str().unwrap()],
        "not an undo journal",
    );
}
