//! Drop guards for things outside the process that must be undone even when
//! a test panics: FUSE mounts (nbdfuse), loop devices and mounts.
//!
//! Each has an explicit, checked teardown (`unmount`, `detach`) for the happy
//! path and a best-effort Drop for the failure path. Declare them after the
//! `Server` so they are dropped first (reverse declaration order).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::tools::{TOOL_TIMEOUT, require, run_capture, run_ok, tool, wait_deadline};

/// Is `path` currently a mount point? (reads /proc/self/mountinfo)
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let canon = canon.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines().any(|l| l.split(' ').nth(4).map(|m| m.replace("\\040", " ") == canon).unwrap_or(false))
        })
        .unwrap_or(false)
}

/// Panics unless the machine can do FUSE + loop + mount (root, /dev/fuse,
/// /dev/loop-control).
pub fn require_fs_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (FUSE, loop devices, mount)");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse missing: this test needs FUSE");
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control missing: this test needs loop devices"
    );
}

/// `nbdfuse MOUNTPOINT URI` running in the foreground; the export appears as
/// `MOUNTPOINT/nbd`.
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    child: Option<Child>,
}

impl FuseMount {
    /// Mounts and waits (bounded) until `MOUNTPOINT/nbd` exists with the
    /// expected size.
    pub fn mount(mountpoint: &Path, uri: &str, log: &Path, expect_size: u64) -> FuseMount {
        let nbdfuse = require("nbdfuse");
        require("fusermount3");
        std::fs::create_dir_all(mountpoint).expect("mkdir fuse mountpoint");
        let logf = std::fs::File::create(log).expect("nbdfuse log");
        let child = Command::new(nbdfuse)
            .arg(mountpoint)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::from(logf.try_clone().expect("dup")))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn nbdfuse");
        let mut g = FuseMount { mountpoint: mountpoint.to_path_buf(), child: Some(child) };
        let file = g.file();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = std::fs::metadata(&file)
                && m.len() == expect_size
            {
                break;
            }
            if let Some(st) = g.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                g.child = None;
                panic!(
                    "nbdfuse exited with {st} before {} appeared\n{}",
                    file.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear within 30s\n{}",
                file.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        g
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("nbd")
    }

    /// `fusermount3 -u` (retried while busy, bounded), then nbdfuse must exit 0
    /// (bounded wait).
    pub fn unmount(mut self) {
        if let Err(out) = fusermount_u(&self.mountpoint) {
            panic!("fusermount3 -u failed\n{}", out.describe());
        }
        let mut child = self.child.take().expect("nbdfuse child");
        let st = wait_deadline(&mut child, Duration::from_secs(30))
            .expect("nbdfuse did not exit within 30s after fusermount3 -u");
        assert!(st.success(), "nbdfuse exited with {st}");
    }
}

/// `fusermount3 -u MOUNTPOINT` until it succeeds or the mount is gone, for at
/// most 10 s: a child that another test thread forked may hold a descriptor of
/// the file until it execs (EBUSY). The last failure's output otherwise.
fn fusermount_u(mountpoint: &Path) -> Result<(), crate::tools::Output> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_capture(Command::new(require("fusermount3")).arg("-u").arg(mountpoint), TOOL_TIMEOUT);
        if out.status.success() || !is_mountpoint(mountpoint) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(out);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if is_mountpoint(&self.mountpoint) {
                let _ = fusermount_u(&self.mountpoint);
            }
            if wait_deadline(&mut child, Duration::from_secs(10)).is_none() {
                // wait_deadline killed it; lazily detach what is left.
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.mountpoint).status();
            }
        }
    }
}

/// A loop device attached with `losetup -f --show FILE`.
#[derive(Debug)]
pub struct LoopDev {
    dev: Option<PathBuf>,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = tool("losetup", [std::ffi::OsStr::new("-f"), "--show".as_ref(), file.as_os_str()]);
        let dev = PathBuf::from(out.stdout.trim());
        assert!(dev.to_string_lossy().starts_with("/dev/loop"), "losetup printed {:?}", out.stdout);
        LoopDev { dev: Some(dev) }
    }

    pub fn dev(&self) -> &Path {
        self.dev.as_deref().expect("attached")
    }

    /// `losetup -d`, checked.
    pub fn detach(mut self) {
        let dev = self.dev.take().expect("attached");
        // The kernel may hold the device briefly after umount: retry a few
        // times within a bound.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run_capture(Command::new(require("losetup")).arg("-d").arg(&dev), TOOL_TIMEOUT);
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "losetup -d failed\n{}", out.describe());
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

/// A mounted filesystem.
#[derive(Debug)]
pub struct Mount {
    target: Option<PathBuf>,
}

impl Mount {
    pub fn new(dev: &Path, target: &Path, fstype: &str) -> Mount {
        Mount::with_options(dev, target, fstype, "")
    }

    /// `mount -t FSTYPE [-o OPTIONS] DEV TARGET` (e.g. `tmpfs` with `size=8m`).
    pub fn with_options(dev: &Path, target: &Path, fstype: &str, options: &str) -> Mount {
        std::fs::create_dir_all(target).expect("mkdir mount target");
        let mut cmd = Command::new(require("mount"));
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run_ok(cmd.arg(dev).arg(target), TOOL_TIMEOUT);
        Mount { target: Some(target.to_path_buf()) }
    }

    pub fn path(&self) -> &Path {
        self.target.as_deref().expect("mounted")
    }

    /// `umount`, checked. Retried for a bounded time: a child that another test
    /// thread forked may hold a descriptor of a file in here until it execs
    /// (EBUSY). On failure the guard keeps the target, so its Drop still
    /// detaches it (lazily).
    pub fn unmount(mut self) {
        let t = self.target.clone().expect("mounted");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run_capture(Command::new(require("umount")).arg(&t), TOOL_TIMEOUT);
            if out.status.success() {
                self.target = None;
                return;
            }
            assert!(Instant::now() < deadline, "umount failed\n{}", out.describe());
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            let ok = Command::new("umount").arg(&t).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&t).status();
            }
        }
    }
}
