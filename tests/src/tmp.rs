//! Per-test temporary directories and sparse disk files.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A unique directory under `std::env::temp_dir()`, removed on drop unless
/// `BLOCKD_KEEP_TMP=1` (then its path is printed so it can be inspected).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/blockd-test-<label>-<pid>-<n>-<nanos>`.
    pub fn new(label: &str) -> TempDir {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let label: String =
            label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(40).collect();
        let path =
            std::env::temp_dir().join(format!("blockd-test-{label}-{}-{n}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("BLOCKD_KEEP_TMP").as_deref() == Ok("1") {
            eprintln!("BLOCKD_KEEP_TMP=1: keeping {}", self.path.display());
            return;
        }
        // Never follow anything outside: remove_dir_all does not follow
        // symlinks, and mounts were undone by their own guards first.
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: removing {}: {e}", self.path.display());
        }
    }
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap_or_else(|e| panic!("set_len {}: {e}", path.display()));
}

/// Writes `size` bytes of seeded pseudo-random data to `path`, leaving an
/// all-zero hole of `hole` bytes at `hole_at` (both 0 for none).
pub fn random_file(path: &Path, size: u64, seed: u64, hole_at: u64, hole: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(
        fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let pos = off + i as u64;
            if pos >= hole_at && pos < hole_at + hole {
                *b = 0;
            }
        }
        f.write_all(&buf[..n]).expect("write random file");
        off += n as u64;
    }
    f.flush().expect("flush random file");
}

/// Byte-compares two files; panics naming the first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    use std::io::Read;
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let la = fa.metadata().expect("stat").len();
    let lb = fb.metadata().expect("stat").len();
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            panic!("{} and {} differ at byte {}", a.display(), b.display(), off + i as u64);
        }
        off += n as u64;
    }
}
