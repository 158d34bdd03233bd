//! The backing store and the blocking system calls both engines share: opening,
//! full-length `pread`/`pwrite`, `fallocate`, block-device ioctls and the
//! `SEEK_DATA`/`SEEK_HOLE` allocation map.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, PosixFadviseAdvice};
use nix::sys::stat::SFlag;
use nix::unistd::Whence;

use super::range::{Action, ZEROES};
use super::{BackingKind, Extent, StorageError};

// BLKGETSIZE64 is _IOR(0x12, 114, size_t); u64 has the size of size_t on the 64-bit
// targets we build for.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// BLKDISCARD and BLKZEROOUT are declared with _IO (no size) although they take a
// pointer to a `[start, len]` pair of u64 byte counts.
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// The opened backing store, shared by the engine threads and [`super::Storage`].
#[derive(Debug)]
pub(crate) struct Backing {
    pub file: File,
    pub kind: BackingKind,
    /// Length at open time.
    pub size_bytes: u64,
    pub read_only: bool,
}

impl Backing {
    pub fn open(path: &Path, read_only: bool) -> Result<Backing, StorageError> {
        // std opens with O_CLOEXEC already; spelled out because the fd must never leak
        // into the resource-agent scripts the daemon may spawn.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| StorageError::Open { path: path.to_owned(), source })?;
        let stat = nix::sys::stat::fstat(&file)
            .map_err(|source| StorageError::Stat { path: path.to_owned(), source })?;
        let file_type = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        let (kind, size_bytes) = if file_type == SFlag::S_IFREG {
            (BackingKind::RegularFile, stat.st_size as u64)
        } else if file_type == SFlag::S_IFBLK {
            let mut size_bytes = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at
            // a live local.
            unsafe { blkgetsize64(file.as_raw_fd(), &mut size_bytes) }
                .map_err(|source| StorageError::DeviceSize { path: path.to_owned(), source })?;
            (BackingKind::BlockDevice, size_bytes)
        } else {
            return Err(StorageError::NotFileOrDevice { path: path.to_owned() });
        };
        Ok(Backing { file, kind, size_bytes, read_only })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// A byte offset or length as `off_t`; values past `i64::MAX` are invalid for
/// every file.
pub(crate) fn to_off(bytes: u64) -> Result<libc::off_t, Errno> {
    libc::off_t::try_from(bytes).map_err(|_| Errno::EINVAL)
}

/// Reads all of `buf` from `offset`. Bytes past the end of the file (which may have
/// shrunk underneath us) read as zeroes, like the hole they logically are.
pub(crate) fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
    let mut done_bytes = 0;
    while done_bytes < buf.len() {
        let at = to_off(offset + done_bytes as u64)?;
        match nix::sys::uio::pread(fd, &mut buf[done_bytes..], at) {
            Ok(0) => {
                buf[done_bytes..].fill(0);
                return Ok(());
            }
            Ok(n) => done_bytes += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads all of `buf` at `offset` only if every byte is already in the page cache
/// (`preadv2(RWF_NOWAIT)`): never blocks on the disk. False means "use the engine".
pub(crate) fn pread_cached(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> bool {
    let Ok(at) = to_off(offset) else { return false };
    let iov = [std::io::IoSliceMut::new(buf)];
    let want = iov[0].len();
    // SAFETY: the iovec points into `buf`, which is valid and exclusively borrowed for
    // the duration of the call.
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), iov.as_ptr().cast(), 1, at, libc::RWF_NOWAIT) };
    n >= 0 && n as usize == want
}

/// Writes all of `buf` at `offset`; with `fua` each write carries `RWF_DSYNC` so the
/// data is durable when this returns.
pub(crate) fn pwrite_full(fd: BorrowedFd<'_>, buf: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
    let mut done_bytes = 0;
    while done_bytes < buf.len() {
        let at = to_off(offset + done_bytes as u64)?;
        let rest = &buf[done_bytes..];
        let written = if fua { pwrite_dsync(fd, rest, at) } else { nix::sys::uio::pwrite(fd, rest, at) };
        match written {
            // A zero-byte write of a non-empty buffer would loop forever.
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done_bytes += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) if fua => {
                // Kernels before 4.7 lack pwritev2 flags: write, then fdatasync.
                pwrite_full(fd, rest, offset + done_bytes as u64, false)?;
                return fdatasync(fd);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `pwritev2(RWF_DSYNC)` call (nix has no wrapper for it).
fn pwrite_dsync(fd: BorrowedFd<'_>, buf: &[u8], offset: libc::off_t) -> Result<usize, Errno> {
    let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `iov` describes `buf`, which stays borrowed for the whole call; the
    // kernel only reads through it for a write.
    let n = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, offset, libc::RWF_DSYNC) };
    Errno::result(n).map(|n| n as usize)
}

pub(crate) fn fdatasync(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    loop {
        match nix::unistd::fdatasync(fd) {
            Err(Errno::EINTR) => {}
            other => return other,
        }
    }
}

/// Starts readahead of the range; failures only lose the prefetch, so none is
/// reported.
pub(crate) fn fadvise_willneed(fd: BorrowedFd<'_>, offset: u64, len_bytes: u64) {
    if let (Ok(offset), Ok(len_bytes)) = (to_off(offset), to_off(len_bytes)) {
        let _ = nix::fcntl::posix_fadvise(fd, offset, len_bytes, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
    }
}

/// Runs one step of a trim / write-zeroes job synchronously. Returns the bytes
/// written for a [`Action::WriteZeroes`] step (possibly short) and 0 otherwise.
pub(crate) fn run_action(fd: BorrowedFd<'_>, action: Action) -> Result<u64, Errno> {
    match action {
        Action::Fallocate { mode, offset, len_bytes } => {
            let flags = FallocateFlags::from_bits_retain(mode);
            nix::fcntl::fallocate(fd, flags, to_off(offset)?, to_off(len_bytes)?).map(|()| 0)
        }
        Action::BlkDiscard { offset, len_bytes } => {
            let range = [offset, len_bytes];
            // SAFETY: the ioctl reads two u64 from the pointer, which points at a live
            // local array of two u64.
            unsafe { blkdiscard(fd.as_raw_fd(), &range) }.map(|_| 0)
        }
        Action::BlkZeroout { offset, len_bytes } => {
            let range = [offset, len_bytes];
            // SAFETY: as for BLKDISCARD above.
            unsafe { blkzeroout(fd.as_raw_fd(), &range) }.map(|_| 0)
        }
        Action::WriteZeroes { offset, len_bytes } => {
            nix::sys::uio::pwrite(fd, &ZEROES[..len_bytes], to_off(offset)?).map(|n| n as u64)
        }
        Action::Datasync => fdatasync(fd).map(|()| 0),
    }
}

/// See [`super::Storage::block_status`].
pub(crate) fn block_status(
    backing: &Backing,
    offset: u64,
    len_bytes: u64,
    max_extents: usize,
) -> Result<Vec<Extent>, Errno> {
    if len_bytes == 0 || max_extents == 0 {
        return Err(Errno::EINVAL);
    }
    let end = offset.checked_add(len_bytes).ok_or(Errno::EINVAL)?;
    to_off(end)?;
    let all_data = vec![Extent { len: len_bytes, hole: false, zero: false }];
    if backing.kind == BackingKind::BlockDevice {
        return Ok(all_data);
    }

    let fd = backing.fd();
    let mut extents = Extents { list: Vec::new(), max: max_extents };
    let mut pos = offset;
    while pos < end && !extents.full() {
        let data_start = match seek(fd, pos, Whence::SeekData) {
            Ok(data_start) => data_start,
            // No data at or after `pos` (this includes `pos` past the end of file).
            Err(Errno::ENXIO) => end,
            // A file system without SEEK_DATA support: everything is data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if extents.list.is_empty() => {
                return Ok(all_data);
            }
            Err(e) if extents.list.is_empty() => return Err(e),
            // Some of the range is already answered: report that much.
            Err(_) => break,
        };
        if data_start > pos {
            let hole_end = data_start.min(end);
            extents.push(hole_end - pos, true);
            pos = hole_end;
            continue;
        }
        let data_end = match seek(fd, pos, Whence::SeekHole) {
            // A hole start at or before `pos` cannot happen right after SEEK_DATA
            // found data at `pos`, short of a concurrent change; call it data to the
            // end so the loop always advances.
            Ok(hole_start) if hole_start > pos => hole_start.min(end),
            Ok(_) => end,
            // The file shrank between the two seeks: the next SEEK_DATA reports it.
            Err(Errno::ENXIO) => continue,
            Err(e) if extents.list.is_empty() => return Err(e),
            Err(_) => break,
        };
        extents.push(data_end - pos, false);
        pos = data_end;
    }
    Ok(extents.list)
}

fn seek(fd: BorrowedFd<'_>, pos: u64, whence: Whence) -> Result<u64, Errno> {
    // lseek moves the shared file position, which no engine uses (all I/O is
    // positional), so concurrent block_status calls cannot disturb anything.
    nix::unistd::lseek(fd, to_off(pos)?, whence).map(|at| at as u64)
}

/// An extent list that merges neighbours of the same kind and stops at a maximum.
struct Extents {
    list: Vec<Extent>,
    max: usize,
}

impl Extents {
    fn full(&self) -> bool {
        self.list.len() >= self.max
    }

    fn push(&mut self, len_bytes: u64, hole: bool) {
        match self.list.last_mut() {
            Some(last) if last.hole == hole => last.len += len_bytes,
            _ => self.list.push(Extent { len: len_bytes, hole, zero: hole }),
        }
    }
}
