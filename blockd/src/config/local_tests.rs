//! [`Config::check_local`] against real files in a temp dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::local::{human, human_exact};
use super::*;
use crate::meta::layout::Layout;

const MIB: u64 = 1 << 20;
/// Lines of the keys in [`text`].
const L_DISK: usize = 9;
const L_META: usize = 10;

/// A temp dir removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Temp {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("blockd-config-local-{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Temp(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse file of `bytes`.
    fn file(&self, name: &str, bytes: u64) -> PathBuf {
        let p = self.join(name);
        std::fs::File::create(&p).and_then(|f| f.set_len(bytes)).expect("create file");
        p
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config whose first node (`alpha`) has `disk` and `meta` on lines [`L_DISK`] and
/// [`L_META`]; with `peer`, a second node `beta` makes it replicated.
fn text(disk: &Path, meta: &str, size: Option<&str>, peer: bool) -> String {
    let size = size.map_or("# no size".to_owned(), |s| format!("size = {s:?}"));
    let mut t = format!(
        "[resource]\nname = \"r0\"\n{size}\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:7789\"\n\
         nbd = \"127.0.0.1:10809\"\ndisk = {:?}\nmeta = {meta:?}\n",
        disk.display().to_string()
    );
    if peer {
        t.push_str(
            "\n[[node]]\nname = \"beta\"\nreplication = \"127.0.0.1:7790\"\nnbd = \"127.0.0.1:10810\"\n\
             disk = \"/nonexistent/beta.img\"\nmeta = \"internal\"\n",
        );
    }
    t
}

fn config(disk: &Path, meta: &str, size: Option<&str>, peer: bool) -> Config {
    let c = Config::parse(&text(disk, meta, size, peer), Path::new("r0.toml")).expect("valid config");
    assert_eq!(c.nodes[0].lines, NodeLines { disk: L_DISK, meta: L_META });
    c
}

/// `check_local` of node alpha: Ok, or the one-line message.
fn check(c: &Config) -> Result<(), String> {
    let node = c.local_node(Some("alpha")).expect("alpha");
    c.check_local(node).map_err(|e| {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "not one line: {msg:?}");
        msg
    })
}

#[test]
fn a_good_disk_passes_standalone_and_replicated() {
    let t = Temp::new("good");
    let disk = t.file("a.img", 64 * MIB);
    for peer in [false, true] {
        assert_eq!(check(&config(&disk, "internal", None, peer)), Ok(()));
        assert_eq!(check(&config(&disk, "internal", Some("32MiB"), peer)), Ok(()));
    }
}

#[test]
fn a_missing_disk_names_the_path_and_the_os_error() {
    let t = Temp::new("missing");
    for disk in [t.join("nope.img"), t.join("no-dir/a.img")] {
        assert_eq!(
            check(&config(&disk, "internal", None, true)),
            Err(format!(
                "r0.toml:{L_DISK}: key `node[0].disk`: cannot open {} read-write: No such file or \
                 directory (os error 2)",
                disk.display()
            ))
        );
    }
}

#[test]
fn a_disk_that_is_neither_file_nor_block_device_is_refused() {
    let t = Temp::new("kind");
    let dir = t.join("sub");
    std::fs::create_dir(&dir).expect("mkdir");
    assert_eq!(
        check(&config(&dir, "internal", None, false)),
        Err(format!(
            "r0.toml:{L_DISK}: key `node[0].disk`: {} is a directory, not a regular file or a block device",
            dir.display()
        ))
    );
    assert_eq!(
        check(&config(Path::new("/dev/null"), "internal", None, true)),
        Err(format!(
            "r0.toml:{L_DISK}: key `node[0].disk`: /dev/null is a character device, not a regular file \
             or a block device"
        ))
    );
}

#[test]
fn a_disk_that_does_not_open_read_write_is_refused() {
    // Root opens a mode-0400 file anyway (CAP_DAC_OVERRIDE); the check opens for real,
    // so as root the file passes, and otherwise the OS error is in the message.
    let t = Temp::new("ro");
    let disk = t.file("ro.img", 64 * MIB);
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("chmod");
    let writable = std::fs::OpenOptions::new().write(true).open(&disk).is_ok();
    let got = check(&config(&disk, "internal", None, true));
    if writable {
        assert_eq!(got, Ok(()));
    } else {
        assert_eq!(
            got,
            Err(format!(
                "r0.toml:{L_DISK}: key `node[0].disk`: cannot open {} read-write: Permission denied \
                 (os error 13)",
                disk.display()
            ))
        );
    }
}

#[test]
fn size_larger_than_the_data_area_after_internal_metadata() {
    let t = Temp::new("size-internal");
    let disk = t.file("a.img", 64 * MIB);
    let data = Layout::compute(64 * MIB, DEFAULT_BITMAP_GRANULARITY, &MetaLocation::Internal)
        .expect("layout")
        .data_bytes;
    assert!(data < 64 * MIB);
    // The whole disk fits a standalone export (no metadata) but not a replicated one.
    assert_eq!(check(&config(&disk, "internal", Some("64MiB"), false)), Ok(()));
    assert_eq!(
        check(&config(&disk, "internal", Some("64MiB"), true)),
        Err(format!(
            "r0.toml:{L_DISK}: key `node[0].disk`: `resource.size` is 64 MiB but node alpha's disk {} \
             holds only {} of data after its internal metadata; lower `resource.size` or use a larger disk",
            disk.display(),
            human_exact(data)
        ))
    );
    // Exactly the data area fits.
    let c = config(&disk, "internal", Some(&format!("{data}")), true);
    assert_eq!(check(&c), Ok(()));
    let c = config(&disk, "internal", Some(&format!("{}", data + 4096)), true);
    assert!(check(&c).is_err());
}

#[test]
fn size_larger_than_the_disk_standalone_and_external() {
    let t = Temp::new("size-whole");
    let disk = t.file("a.img", 64 * MIB);
    let meta = t.join("a.meta");
    let meta_s = meta.display().to_string();
    let want = |extra: &str| {
        Err(format!(
            "r0.toml:{L_DISK}: key `node[0].disk`: `resource.size` is 10 GiB but node alpha's disk {} \
             holds only 64 MiB{extra}; lower `resource.size` or use a larger disk",
            disk.display()
        ))
    };
    assert_eq!(check(&config(&disk, "internal", Some("10GiB"), false)), want(""));
    assert_eq!(check(&config(&disk, &meta_s, Some("10GiB"), true)), want(""));
    // External metadata leaves the whole disk to data.
    assert_eq!(check(&config(&disk, &meta_s, Some("64MiB"), true)), Ok(()));
    assert!(!meta.exists(), "the check creates nothing");
}

#[test]
fn a_replicated_disk_too_small_for_any_data_is_refused_without_a_size() {
    let t = Temp::new("tiny");
    let disk = t.file("a.img", 512 << 10);
    let got = check(&config(&disk, "internal", None, true)).expect_err("too small");
    assert!(
        got.starts_with(&format!(
            "r0.toml:{L_DISK}: key `node[0].disk`: node alpha's disk {} holds 512 KiB, leaving ",
            disk.display()
        )) && got
            .ends_with("of data after its internal metadata; a replicated disk needs at least 1 MiB of data"),
        "{got}"
    );
    // A standalone export has no metadata and no minimum here.
    assert_eq!(check(&config(&disk, "internal", None, false)), Ok(()));
}

#[test]
fn external_meta_directory_must_exist_and_an_existing_file_must_be_usable() {
    let t = Temp::new("meta");
    let disk = t.file("a.img", 64 * MIB);
    let nodir = t.join("no-dir/a.meta");
    assert_eq!(
        check(&config(&disk, &nodir.display().to_string(), None, true)),
        Err(format!(
            "r0.toml:{L_META}: key `node[0].meta`: cannot use {}: directory {} does not exist",
            nodir.display(),
            t.join("no-dir").display()
        ))
    );
    let under_file = disk.join("a.meta");
    assert_eq!(
        check(&config(&disk, &under_file.display().to_string(), None, true)),
        Err(format!(
            "r0.toml:{L_META}: key `node[0].meta`: cannot use {}: {} is a regular file, not a directory",
            under_file.display(),
            disk.display()
        ))
    );
    let meta_dir = t.join("meta-dir");
    std::fs::create_dir(&meta_dir).expect("mkdir");
    assert_eq!(
        check(&config(&disk, &meta_dir.display().to_string(), None, true)),
        Err(format!(
            "r0.toml:{L_META}: key `node[0].meta`: {} is a directory, not a regular file or a block device",
            meta_dir.display()
        ))
    );
    // Missing but creatable, and existing: both fine.
    let meta = t.join("a.meta");
    assert_eq!(check(&config(&disk, &meta.display().to_string(), None, true)), Ok(()));
    assert!(!meta.exists(), "the check creates nothing");
    t.file("a.meta", 0);
    assert_eq!(check(&config(&disk, &meta.display().to_string(), None, true)), Ok(()));
}

#[test]
fn a_failed_check_changes_nothing() {
    let t = Temp::new("unchanged");
    let disk = t.file("a.img", 64 * MIB);
    let before = std::fs::metadata(&disk).expect("stat");
    let meta = t.join("a.meta");
    assert!(check(&config(&disk, &meta.display().to_string(), Some("1TiB"), true)).is_err());
    let after = std::fs::metadata(&disk).expect("stat");
    assert_eq!(after.len(), before.len());
    assert_eq!(after.modified().ok(), before.modified().ok());
    assert!(!meta.exists());
}

#[test]
fn a_node_not_from_the_file_still_gets_a_key() {
    let t = Temp::new("detached");
    let c = config(&t.join("nope.img"), "internal", None, false);
    let mut node = c.nodes[0].clone();
    node.name = "elsewhere".into();
    node.lines = NodeLines::default();
    let e = c.check_local(&node).expect_err("missing disk");
    assert_eq!((e.key(), e.line()), (Some("node.disk"), None));
}

#[test]
fn human_sizes_never_overstate() {
    assert_eq!(human(0), "0 bytes");
    assert_eq!(human(1023), "1023 bytes");
    assert_eq!(human(1024), "1 KiB");
    assert_eq!(human(10 << 30), "10 GiB");
    assert_eq!(human((1 << 30) + (1 << 29)), "1.5 GiB");
    assert_eq!(human((1 << 30) - 1), "1023.9 MiB");
    assert_eq!(human(u64::MAX), "16777215.9 TiB");
    assert_eq!(human_exact(1536 << 20), "1.5 GiB (1610612736 bytes)");
    assert_eq!(human_exact(64 << 20), "64 MiB");
}
