//! Small synchronous file I/O for the metadata: opening (and locking) the metadata
//! file, its length, positional reads and writes, zeroing ranges, `fdatasync`.
//!
//! Metadata I/O is rare (create, open, a flag or generation change), so it is plain
//! blocking `pread`/`pwrite` on its own descriptor, not the storage engine; what
//! matters is that every write is durable before the caller acts on it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, Flock, FlockArg};

use super::MetaError;

/// Zeroes are written in chunks of this size where holes cannot be punched.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Storage for metadata other than a file: the simulator's disks. Reads past the
/// end fill zeroes; `write_at` with `durable` is durable on return (`RWF_DSYNC`);
/// `sync` makes every earlier write durable (`fdatasync`).
pub trait MetaDevice: Send + Sync + std::fmt::Debug {
    fn len_bytes(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
}

#[derive(Debug)]
enum Backend {
    File(Flock<File>),
    Device(std::sync::Arc<dyn MetaDevice>),
}

/// An open, exclusively locked metadata file (or backing store), or a device.
#[derive(Debug)]
pub(crate) struct MetaFile {
    backend: Backend,
    /// Regular file (holes can be punched) rather than a block device.
    pub regular: bool,
    /// For messages.
    pub at: String,
}

/// Opens `path` for reading (and writing unless `read_only`) and checks that it is a
/// regular file or a block device. `create`: make a missing regular file (mode 0600).
pub(crate) fn open_checked(
    path: &Path,
    at: &str,
    read_only: bool,
    create: bool,
) -> Result<(File, bool), MetaError> {
    // O_CLOEXEC is std's default; spelled out because the fd must not leak into the
    // scripts the daemon may spawn.
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| MetaError::io(at, "opening", e))?;
    let file_type = file.metadata().map_err(|e| MetaError::io(at, "stat", e))?.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(MetaError::NotFileOrDevice { at: at.to_owned() });
    }
    Ok((file, file_type.is_file()))
}

/// The length of a regular file or block device (seeking to the end works for both,
/// without a `BLKGETSIZE64` ioctl).
pub(crate) fn len_bytes(file: &File, at: &str) -> Result<u64, MetaError> {
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|e| MetaError::io(at, "finding its size", e))
}

impl MetaFile {
    /// Opens read-write and takes an exclusive `flock`, so `create-md` cannot run
    /// under a live daemon and two daemons cannot share one metadata area.
    pub fn open(path: &Path, at: &str, create: bool) -> Result<MetaFile, MetaError> {
        let (file, regular) = open_checked(path, at, false, create)?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == Errno::EWOULDBLOCK {
                MetaError::Busy { at: at.to_owned() }
            } else {
                MetaError::io(at, "locking", errno.into())
            }
        })?;
        Ok(MetaFile { backend: Backend::File(file), regular, at: at.to_owned() })
    }

    /// Metadata on a device that is not a file (the simulator's).
    pub fn device(device: std::sync::Arc<dyn MetaDevice>, at: &str) -> MetaFile {
        MetaFile { backend: Backend::Device(device), regular: false, at: at.to_owned() }
    }

    pub fn len_bytes(&self) -> Result<u64, MetaError> {
        match &self.backend {
            Backend::File(file) => len_bytes(file, &self.at),
            Backend::Device(d) => d.len_bytes().map_err(|e| MetaError::io(&self.at, "finding its size", e)),
        }
    }

    /// Grows a regular file to `len_bytes` (sparse).
    pub fn grow(&self, len_bytes: u64) -> Result<(), MetaError> {
        let Backend::File(file) = &self.backend else {
            let e = io::Error::new(io::ErrorKind::Unsupported, "not a regular file");
            return Err(MetaError::io(&self.at, "growing the file", e));
        };
        file.set_len(len_bytes).map_err(|e| MetaError::io(&self.at, "growing the file", e))
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes (a
    /// slot that was never written has no magic).
    pub fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<(), MetaError> {
        let file = match &self.backend {
            Backend::File(file) => file,
            Backend::Device(d) => {
                return d
                    .read_at(buf, offset)
                    .map_err(|e| MetaError::io(&self.at, format!("reading {what}"), e));
            }
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MetaError::io(&self.at, format!("reading {what}"), e)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset` (not yet durable: see [`Self::sync`]).
    pub fn write(&self, buf: &[u8], offset: u64, what: &str) -> Result<(), MetaError> {
        let result = match &self.backend {
            Backend::File(file) => file.write_all_at(buf, offset),
            Backend::Device(d) => d.write_at(buf, offset, false),
        };
        result.map_err(|e| MetaError::io(&self.at, format!("writing {what}"), e))
    }

    /// Writes all of `buf` at `offset` durably (`RWF_DSYNC`): only this range is
    /// written back and flushed, unlike [`Self::sync`], which with internal metadata
    /// would also flush every dirty data page of the backing store. For the activity
    /// log, which is written while the application writes.
    pub fn write_durable(&self, buf: &[u8], offset: u64, what: &str) -> Result<(), MetaError> {
        use std::os::fd::AsFd;
        let result = match &self.backend {
            Backend::File(file) => {
                crate::storage::ops::pwrite_full(file.as_fd(), buf, offset, true).map_err(Into::into)
            }
            Backend::Device(d) => d.write_at(buf, offset, true),
        };
        result.map_err(|e| MetaError::io(&self.at, format!("writing {what}"), e))
    }

    /// `fdatasync`: everything written so far is on stable storage.
    pub fn sync(&self) -> Result<(), MetaError> {
        let result = match &self.backend {
            Backend::File(file) => file.sync_data(),
            Backend::Device(d) => d.sync(),
        };
        result.map_err(|e| MetaError::io(&self.at, "fdatasync", e))
    }

    /// Makes `len_bytes` at `offset` read as zeroes: a punched hole in a regular
    /// file (no writes for a 512 MiB bitmap), written zeroes otherwise.
    pub fn zero(&self, offset: u64, len_bytes: u64, what: &str) -> Result<(), MetaError> {
        if let (true, Backend::File(file)) = (self.regular, &self.backend) {
            let punched = nix::fcntl::fallocate(
                &**file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len_bytes as libc::off_t,
            );
            // Filesystems without hole punching fall through to writing.
            if punched.is_ok() {
                return Ok(());
            }
        }
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(len_bytes as usize)];
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(zeroes.len() as u64) as usize;
            self.write(&zeroes[..n], offset + done, what)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Makes a newly created file's directory entry durable.
pub(crate) fn sync_parent_dir(path: &Path, at: &str) -> Result<(), MetaError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|d| d.sync_all()).map_err(|e| MetaError::io(at, "syncing its directory", e))
}

/// A random non-zero 64-bit id (resource ids here; generation ids for the core),
/// from the kernel's CSPRNG.
pub fn random_id() -> io::Result<u64> {
    let mut urandom = File::open("/dev/urandom")?;
    loop {
        let mut b = [0u8; 8];
        urandom.read_exact(&mut b)?;
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return Ok(id);
        }
    }
}
