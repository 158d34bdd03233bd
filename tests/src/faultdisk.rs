//! A backing disk whose faults a test switches while a node runs (issue 13):
//! [`FaultDisk`].
//!
//! ```text
//! blockd ── pread / pwrite / fdatasync / fallocate ──► FUSE file  DIR/NAME.fuse/nbd
//!   └► nbdfuse ── NBD over a Unix socket (4 connections, multi-conn) ──► nbdkit
//!        --filter=pause → error → [delay] → rate → file plugin → DIR/NAME.store
//! ```
//!
//! The node's `disk` is the FUSE file ([`FaultDisk::path`]); the data lands in
//! the sparse *store* file ([`FaultDisk::store`]), which a test reads to compare
//! copies without going through the faults. Filters are listed client side first,
//! so a paused request gets no error and a failed one no delay.
//!
//! Switches, each effective for the next request nbdkit receives:
//!
//! | call | nbdkit filter | what the node sees |
//! |---|---|---|
//! | [`fail`](FaultDisk::fail)`(Writes)` | error: `error-{pwrite,zero,trim}-file` exists | `pwrite`, `fallocate` (zero, punch hole) fail with [`FaultOpts::errno`]; reads work |
//! | [`fail`](FaultDisk::fail)`(ReadsAndWrites)` | also `error-{pread,extents,cache}-file` | reads fail with EIO too |
//! | [`heal`](FaultDisk::heal) | the trigger files removed | everything works again |
//! | [`pause`](FaultDisk::pause) / [`resume`](FaultDisk::resume) | pause: `p` / `r` on `pause-control` | every request (read, write, flush) hangs until resumed: a hung disk under a live process |
//! | [`throttle`](FaultDisk::throttle) | rate: `rate-file` (re-read while running) | a bandwidth cap on reads and writes |
//! | [`FaultOpts::write_delay_ms`] | delay: `delay-{write,zero,trim}` | every write is that much slower, from the start |
//!
//! Limits of nbdkit 1.32 (measured):
//! - The error filter cannot fail FLUSH: `fdatasync` on the FUSE file succeeds
//!   while writes fail.
//! - The errno is fixed when nbdkit starts (`error-pwrite=` …): a disk is either an
//!   EIO disk or an ENOSPC disk ([`FaultOpts::errno`]). A real full disk is
//!   [`crate::smallfs::SmallFs`].
//! - The delay filter reads its delays only at start, and nbdkit cannot be
//!   restarted under a running nbdfuse: libnbd does not reconnect, and every
//!   request after the server went away fails with ESHUTDOWN. So a slow disk is
//!   slow from the start ([`FaultOpts::write_delay_ms`]); a disk that becomes
//!   slow while running is [`FaultDisk::throttle`] (bandwidth) or
//!   [`FaultDisk::pause`] (hang).
//! - Reads go through the kernel's page cache of the FUSE file (written data
//!   too: FUSE writes through but keeps the pages). A cached block reads fine
//!   while nbdkit fails reads, as on a real dying disk; [`FaultDisk::fail`] with
//!   reads therefore drops the file's cached pages, so every next read fails.
//!   O_DIRECT opens work; `preadv2(RWF_NOWAIT)` answers EOPNOTSUPP (blockd then
//!   reads through its engine); blockd's io_uring and posix engines both work on
//!   the file and both return its EIO to the client.
//!
//! Cleanup (drop, also while a test panics): resume a paused disk, unmount the
//! FUSE file ([`FuseMount`]), then kill nbdkit by its PID ([`Daemon`]; it also
//! runs with `--exit-with-parent`, so create the disk on the thread that owns
//! it). Drop the node that uses the disk first: the [`crate::pair::Pair`] does.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::daemon::{Addr, Daemon};
use crate::guards::{FuseMount, require_fs_privileges};
use crate::tmp::sparse_file;
use crate::tools::require;

/// How long a pause or resume may take: the pause filter acknowledges a pause
/// only once every request received before it completed.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest Unix socket path (`sockaddr_un.sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The errno a failing write returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultErrno {
    /// A dying disk.
    #[default]
    Eio,
    /// A thin store that ran out of space (reads still fail with EIO when
    /// [`FaultScope::ReadsAndWrites`]).
    Enospc,
}

impl FaultErrno {
    fn nbdkit_name(self) -> &'static str {
        match self {
            FaultErrno::Eio => "EIO",
            FaultErrno::Enospc => "ENOSPC",
        }
    }

    /// The value `std::io::Error::raw_os_error` reports.
    pub fn raw(self) -> i32 {
        match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
        }
    }
}

/// Which requests [`FaultDisk::fail`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultScope {
    /// Writes, write-zeroes and trims (`pwrite`, `fallocate`).
    Writes,
    /// Those and reads (`pread`, block status, cache).
    ReadsAndWrites,
}

/// How a [`FaultDisk`] is set up (fixed for its life: nbdkit reads these at start).
#[derive(Clone, Debug, Default)]
pub struct FaultOpts {
    /// What a failing write returns.
    pub errno: FaultErrno,
    /// Added to every write, write-zeroes and trim (nbdkit's delay filter);
    /// 0 = no delay filter at all.
    pub write_delay_ms: u32,
}

/// A running fault-injecting disk (see the module doc). Field order is drop
/// order: the FUSE mount goes before nbdkit.
pub struct FaultDisk {
    fuse: Option<FuseMount>,
    nbdkit: Daemon,
    name: String,
    store: PathBuf,
    file: PathBuf,
    size_bytes: u64,
    control: PathBuf,
    fail_writes: PathBuf,
    fail_reads: PathBuf,
    rate_file: PathBuf,
    paused: AtomicBool,
}

impl std::fmt::Debug for FaultDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultDisk").field("name", &self.name).field("file", &self.file).finish()
    }
}

impl FaultDisk {
    /// Creates the sparse store `DIR/NAME.store` of `size_bytes`, starts nbdkit on
    /// `DIR/NAME.k` and mounts it at `DIR/NAME.fuse` (bounded waits; panics with
    /// the logs on failure). Needs root and `/dev/fuse`.
    pub fn create(dir: &Path, name: &str, size_bytes: u64, opts: &FaultOpts) -> FaultDisk {
        require_fs_privileges();
        let nbdkit = require("nbdkit");
        let path = |suffix: &str| dir.join(format!("{name}.{suffix}"));
        let (store, socket, control) = (path("store"), path("k"), path("kc"));
        for s in [&socket, &control] {
            assert!(
                s.as_os_str().len() <= MAX_SOCKET_PATH,
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter directory or name",
                s.display()
            );
        }
        let (fail_writes, fail_reads, rate_file) = (path("fail-writes"), path("fail-reads"), path("rate"));
        sparse_file(&store, size_bytes);
        let mut args: Vec<String> = vec!["-f".into(), "--exit-with-parent".into(), "--unix".into()];
        args.push(socket.display().to_string());
        args.extend(["--filter=pause", "--filter=error"].map(String::from));
        if opts.write_delay_ms > 0 {
            args.push("--filter=delay".into());
        }
        args.extend(["--filter=rate".into(), "file".into(), store.display().to_string()]);
        args.push(format!("pause-control={}", control.display()));
        let errno = opts.errno.nbdkit_name();
        for (op, errno, trigger) in [
            ("pwrite", errno, &fail_writes),
            ("zero", errno, &fail_writes),
            ("trim", errno, &fail_writes),
            ("pread", "EIO", &fail_reads),
            ("extents", "EIO", &fail_reads),
            ("cache", "EIO", &fail_reads),
        ] {
            args.push(format!("error-{op}={errno}"));
            args.push(format!("error-{op}-rate=100%"));
            args.push(format!("error-{op}-file={}", trigger.display()));
        }
        if opts.write_delay_ms > 0 {
            for op in ["write", "zero", "trim"] {
                args.push(format!("delay-{op}={}ms", opts.write_delay_ms));
            }
        }
        args.push(format!("rate-file={}", rate_file.display()));
        let daemon = Daemon::start(
            &format!("nbdkit-{name}"),
            &nbdkit,
            args,
            path("nbdkit.log"),
            vec![Addr::Unix(socket.clone())],
            vec![socket.clone(), control.clone()],
        );
        let uri = Addr::Unix(socket).uri("");
        let fuse = FuseMount::mount(&path("fuse"), &uri, &path("nbdfuse.log"), size_bytes);
        let file = fuse.file();
        FaultDisk {
            fuse: Some(fuse),
            nbdkit: daemon,
            name: name.to_string(),
            store,
            file,
            size_bytes,
            control,
            fail_writes,
            fail_reads,
            rate_file,
            paused: AtomicBool::new(false),
        }
    }

    /// The file the node opens as its `disk` (goes through the faults).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The file that holds the data (bypasses the faults: for comparing copies).
    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// From the next request on, fail the requests of `scope` (see the module doc).
    ///
    /// With reads, the file's pages are also dropped from the page cache, so the
    /// next read of any block reaches nbdkit and fails.
    pub fn fail(&self, scope: FaultScope) {
        touch(&self.fail_writes);
        match scope {
            FaultScope::Writes => remove(&self.fail_reads)
                .unwrap_or_else(|e| panic!("remove {}: {e}", self.fail_reads.display())),
            FaultScope::ReadsAndWrites => {
                touch(&self.fail_reads);
                self.drop_page_cache();
            }
        }
    }

    /// POSIX_FADV_DONTNEED on the FUSE file: its clean cached pages go (FUSE
    /// writes through, so there are no dirty ones).
    fn drop_page_cache(&self) {
        use std::os::fd::AsRawFd;
        let f =
            std::fs::File::open(&self.file).unwrap_or_else(|e| panic!("open {}: {e}", self.file.display()));
        // SAFETY: posix_fadvise(2) on an fd we own; offset 0, length 0 = the whole file.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0, "posix_fadvise {}: errno {r}", self.file.display());
    }

    /// Stop failing requests.
    pub fn heal(&self) {
        for f in [&self.fail_writes, &self.fail_reads] {
            remove(f).unwrap_or_else(|e| panic!("remove {}: {e}", f.display()));
        }
    }

    /// Hang every request received from now on. Returns once requests received
    /// before have completed (the pause filter's acknowledgement).
    pub fn pause(&self) {
        self.control(b'p', b'P').unwrap_or_else(|e| panic!("{}: pause: {e}\n{}", self.name, self.log_tail()));
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Let the held requests and every new one through.
    pub fn resume(&self) {
        self.control(b'r', b'R')
            .unwrap_or_else(|e| panic!("{}: resume: {e}\n{}", self.name, self.log_tail()));
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Caps reads and writes together at `bytes_per_sec` (None: unlimited). nbdkit
    /// re-reads the rate while running; its token bucket lets up to 2 s worth of
    /// traffic through at once before the cap bites.
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        let bits = bytes_per_sec.map_or(0, |b| b.saturating_mul(8).max(1));
        // Atomically, as the filter's manual asks: write a new file, rename it over.
        let tmp = self.rate_file.with_extension("rate-new");
        std::fs::write(&tmp, format!("{bits}\n")).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.rate_file)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", self.rate_file.display()));
    }

    /// How many requests nbdkit failed on purpose so far (its "injecting …
    /// error" log lines): proof that a fault reached the disk.
    pub fn injected(&self) -> usize {
        self.nbdkit.log().lines().filter(|l| l.contains("injecting")).count()
    }

    /// nbdkit's PID (for a test that wants to see it gone after drop).
    pub fn nbdkit_pid(&self) -> Option<u32> {
        self.nbdkit.pid()
    }

    /// The FUSE mount point (the directory holding [`FaultDisk::path`]).
    pub fn mountpoint(&self) -> &Path {
        self.file.parent().expect("the FUSE file is in its mount point")
    }

    fn log_tail(&self) -> String {
        format!("--- nbdkit log ---\n{}", self.nbdkit.log_tail(30))
    }

    /// One command on the pause filter's control socket, and its echo.
    fn control(&self, cmd: u8, want: u8) -> std::io::Result<()> {
        let mut s = UnixStream::connect(&self.control)?;
        s.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        s.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        s.write_all(&[cmd])?;
        let mut ack = [0u8];
        s.read_exact(&mut ack)?;
        if ack[0] != want {
            return Err(std::io::Error::other(format!(
                "pause filter answered {:?}, want {:?}",
                ack[0] as char, want as char
            )));
        }
        Ok(())
    }
}

impl FaultDisk {
    /// Cleanup: lets held requests through if the disk is paused (errors ignored).
    /// A process with a request held here cannot exit (a thread waits in the
    /// kernel for FUSE), so this must come before its owner is killed and reaped:
    /// the [`crate::pair::Pair`] calls it before it stops its nodes.
    pub fn resume_if_paused(&self) {
        if self.paused.swap(false, Ordering::SeqCst) {
            let _ = self.control(b'r', b'R');
        }
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        // Held requests would keep the FUSE file busy: let them finish first.
        self.resume_if_paused();
        let _ = remove(&self.fail_writes);
        let _ = remove(&self.fail_reads);
        // Then the fields: the FUSE mount (unmounted, nbdfuse reaped), nbdkit (killed).
        drop(self.fuse.take());
    }
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Removes `path`; absent is fine.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
