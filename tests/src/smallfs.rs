//! A small filesystem of its own, for thin (sparse) backing stores that run out of
//! space: [`SmallFs`].
//!
//! A sparse file bigger than the filesystem is a thin store: writes into its
//! holes allocate blocks, and once the filesystem is full they fail with ENOSPC
//! while overwrites of allocated blocks still succeed (as on a thin LV or a
//! sparse image). [`SmallFs::fill`] makes it full at a moment the test chooses
//! (a filler file takes every free block), [`SmallFs::release`] frees them again.
//!
//! Two kinds: `tmpfs` with `size=` (one mount; `fdatasync` is a no-op) and
//! `ext4` on a loop device over a sparse image (`mkfs.ext4 -m 0`: no blocks
//! reserved for root, who runs the nodes; delayed allocation still reports
//! ENOSPC at `write` time). Cleanup on drop, also while a test panics: unmount
//! ([`Mount`]), then detach the loop device ([`LoopDev`]). Stop whatever has
//! files open on it first (the [`crate::pair::Pair`] stops its nodes first).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::guards::{LoopDev, Mount, require_fs_privileges};
use crate::tmp::sparse_file;
use crate::tools::tool;

/// Filler allocation steps: big ones first, then single blocks for the rest.
const FILL_STEPS_BYTES: [u64; 2] = [1 << 20, 4096];

/// Which filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmallFsKind {
    #[default]
    Tmpfs,
    Ext4,
}

/// A mounted small filesystem (see the module doc). Field order is drop order:
/// unmount, then detach the loop device.
#[derive(Debug)]
pub struct SmallFs {
    mount: Option<Mount>,
    loopdev: Option<LoopDev>,
    kind: SmallFsKind,
    mountpoint: PathBuf,
    filler: PathBuf,
}

impl SmallFs {
    /// Mounts a `kind` filesystem of `size_bytes` at `mountpoint` (created). An
    /// ext4 image is the sparse file `image`, outside the mount point. Needs root.
    pub fn create(kind: SmallFsKind, mountpoint: &Path, image: &Path, size_bytes: u64) -> SmallFs {
        require_fs_privileges();
        let (mount, loopdev) = match kind {
            SmallFsKind::Tmpfs => {
                let opts = format!("size={size_bytes},mode=0700");
                (Mount::with_options(Path::new("tmpfs"), mountpoint, "tmpfs", &opts), None)
            }
            SmallFsKind::Ext4 => {
                sparse_file(image, size_bytes);
                tool(
                    "mkfs.ext4",
                    ["-q".as_ref(), "-F".as_ref(), "-m".as_ref(), "0".as_ref(), image.as_os_str()],
                );
                let lo = LoopDev::attach(image);
                (Mount::new(lo.dev(), mountpoint, "ext4"), Some(lo))
            }
        };
        SmallFs {
            mount: Some(mount),
            loopdev,
            kind,
            mountpoint: mountpoint.to_path_buf(),
            filler: mountpoint.join(".filler"),
        }
    }

    pub fn kind(&self) -> SmallFsKind {
        self.kind
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device under an ext4 one.
    pub fn loop_device(&self) -> Option<&Path> {
        self.loopdev.as_ref().map(LoopDev::dev)
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Bytes an unprivileged-or-not writer can still allocate (statvfs
    /// `f_bavail`; with `-m 0` the same for root).
    pub fn free_bytes(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()).expect("no NUL in path");
        // SAFETY: an all-zero statvfs is a valid value; statvfs(3) reads a
        // NUL-terminated path and fills the struct we own.
        let (r, st) = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            (libc::statvfs(path.as_ptr(), &mut st), st)
        };
        assert_eq!(r, 0, "statvfs {}: {}", self.mountpoint.display(), std::io::Error::last_os_error());
        st.f_bavail * st.f_frsize
    }

    /// Takes every free block with a filler file (fallocate, in 1 MiB then 4 KiB
    /// steps until ENOSPC; bounded by the filesystem's size). From now on writes
    /// into holes fail with ENOSPC. Returns the filler's size.
    pub fn fill(&self) -> u64 {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.filler)
            .unwrap_or_else(|e| panic!("create {}: {e}", self.filler.display()));
        let mut len = f.metadata().expect("stat filler").len();
        for step in FILL_STEPS_BYTES {
            loop {
                // SAFETY: fallocate(2) on an fd we own, with in-range arguments.
                let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, len as libc::off_t, step as libc::off_t) };
                if r == 0 {
                    len += step;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fallocate {}: {e}", self.filler.display());
                break;
            }
        }
        f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", self.filler.display()));
        len
    }

    /// Frees what [`SmallFs::fill`] took (truncates and removes the filler, then
    /// `syncfs` so the freed blocks are reusable at once).
    pub fn release(&self) {
        // Truncate first: a child forked by another test thread may still hold
        // the filler's fd until it execs, and an unlinked file keeps its blocks
        // while open.
        match OpenOptions::new().write(true).open(&self.filler) {
            Ok(f) => {
                f.set_len(0).unwrap_or_else(|e| panic!("truncate {}: {e}", self.filler.display()));
                drop(f);
                std::fs::remove_file(&self.filler)
                    .unwrap_or_else(|e| panic!("remove {}: {e}", self.filler.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("open {}: {e}", self.filler.display()),
        }
        let dir = std::fs::File::open(&self.mountpoint)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.mountpoint.display()));
        // SAFETY: syncfs(2) on an fd we own.
        let r = unsafe { libc::syncfs(dir.as_raw_fd()) };
        assert_eq!(r, 0, "syncfs {}: {}", self.mountpoint.display(), std::io::Error::last_os_error());
    }

    /// Unmounts (checked) and detaches the loop device (checked).
    pub fn unmount(mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount();
        }
        if let Some(lo) = self.loopdev.take() {
            lo.detach();
        }
    }
}
