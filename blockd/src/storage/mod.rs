//! The storage engine: one backing store (regular file or block device) and the I/O
//! engine that executes operations on it.
//!
//! Completion-based: callers [`Storage::submit`] an [`IoOp`] with a caller-chosen
//! token; the engine executes it on its own thread(s) and reports back through the
//! [`IoSink`] given at open time, with the token, the result and the op's buffer (so
//! buffers return to their pool without copies). The two engines behind this one
//! interface are `uring` (io_uring via the `io-uring` crate, one ring owned by one
//! thread) and `posix` (a small pool of threads doing `pread`/`pwrite`).
//! [`EngineKind::Auto`] tries io_uring and falls back to posix with one warning.
//!
//! Operations map to the kernel as: FLUSH = `fdatasync`; FUA write = `RWF_DSYNC`;
//! TRIM = punch hole (file) or `BLKDISCARD` (device); WRITE_ZEROES = zero-range or
//! punch hole, falling back to written zeroes unless `fast_only`; block status from
//! `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Types: [`StorageOptions`] (engine choice, queue bound, thread count, read-only),
//! [`IoOp`] (one request, owning its buffer), [`IoBuf`] (the buffer handed back with
//! the completion), [`IoSink`] (the caller's completion callback), [`Storage`] (open,
//! submit, block status, shutdown, [`StorageStats`]), [`Extent`] (one block-status
//! run) and [`StorageError`] (open-time failures).
//!
//! INTERFACE CONTRACT (fixed; engines implement it):
//! - `submit` never blocks and never spins, whatever the load: it is called from
//!   async runtime threads (the replication core's task, NBD connection tasks), and
//!   one of those waiting for the engine would stall every task on it. The engines'
//!   preallocated lock-free queues hold `StorageOptions::max_inflight` ops; an op
//!   that finds them full waits in an overflow queue (`overflow`), which the engine
//!   drains in arrival order after the ops queued before it.
//! - The overflow queue has no bound of its own: what reaches it is bounded
//!   upstream. A standalone export submits at most one op per NBD request in
//!   flight, and those are bounded per connection (`nbd_server::MAX_INFLIGHT_REQUESTS`,
//!   128, and 64 MiB of payload) and in connections
//!   (`nbd_server::ServerConfig::max_connections`, 64): 8192, the default
//!   `max_inflight`, so it does not overflow at all. A replicated node adds the
//!   core's own work on top of its NBD requests: resync and verify run a fixed number
//!   of requests at a time, and what a node applies for its peer is bounded by the
//!   peer link's byte budget for received data. Only the sum can pass
//!   `max_inflight`, briefly; each op that overflows is counted
//!   ([`StorageStats::overflow_ops_total`], and a debug line when an overflow
//!   episode starts).
//! - Every submitted op completes exactly once through the sink: from an engine
//!   thread, or — for a read fully served from the page cache — on the submitting
//!   thread before `submit` returns. Sinks must therefore not take locks the
//!   submitter holds.
//! - Errors are reported as `nix::errno::Errno` (the caller maps them to NBD errors).
//! - Ops in flight at the same time are unordered; a FLUSH covers the writes that
//!   completed before it was submitted.

pub(crate) mod ops;
mod overflow;
mod posix;
mod range;
mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use nbd_server::buf::{Buf, BufMut};
use nix::errno::Errno;

use self::ops::Backing;

/// Cached reads up to this size are copied on the submitting thread; larger ones go to
/// the engine so their copies run in parallel with the caller's other work (measured:
/// 1 MiB inline copies serialize a connection's reads and replies on one core).
const INLINE_READ_MAX_BYTES: usize = 128 << 10;

/// Which I/O engine to run (`--io-engine=auto|uring|posix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else posix.
    Auto,
    /// io_uring or fail to open.
    Uring,
    /// Worker threads doing blocking system calls; runs everywhere.
    Posix,
}

impl EngineKind {
    fn as_str(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::Uring => "uring",
            EngineKind::Posix => "posix",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine name other than `auto`, `uring` or `posix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O engine `{0}` (expected auto, uring or posix)")]
pub struct ParseEngineKindError(String);

impl FromStr for EngineKind {
    type Err = ParseEngineKindError;

    fn from_str(s: &str) -> Result<EngineKind, ParseEngineKindError> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "uring" => Ok(EngineKind::Uring),
            "posix" => Ok(EngineKind::Posix),
            other => Err(ParseEngineKindError(other.to_owned())),
        }
    }
}

/// What the backing store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    RegularFile,
    BlockDevice,
}

/// How to open a [`Storage`].
#[derive(Clone, Debug)]
pub struct StorageOptions {
    pub engine: EngineKind,
    /// Ops in flight (submitted and not yet completed) that the preallocated queues
    /// and slabs hold; more than this still never blocks `submit` (they overflow).
    pub max_inflight: usize,
    /// Worker threads of the posix engine.
    pub posix_threads: usize,
    /// Open the backing store read-only; mutating ops complete with `EROFS`.
    pub read_only: bool,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions { engine: EngineKind::Auto, max_inflight: 8192, posix_threads: 4, read_only: false }
    }
}

/// Counters of a [`Storage`] (cumulative since open, except the gauge).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Ops that found the engine's queue full and waited in the overflow queue.
    pub overflow_ops_total: u64,
    /// Ops waiting in the overflow queue now.
    pub overflow_queued_ops: usize,
}

/// One I/O request. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum IoOp {
    /// Fill all `buf.len()` bytes; bytes past the end of the backing store read as zero.
    Read { offset: u64, buf: BufMut },
    /// Write all of `buf`; with `fua` the data is durable before the completion.
    Write { offset: u64, buf: Buf, fua: bool },
    /// Make every completed write durable (`fdatasync`).
    Flush,
    /// Discard the range (advisory: an unsupported discard succeeds).
    Trim { offset: u64, len: u64, fua: bool },
    /// Make the range read back as zeroes. `may_trim` allows deallocating it;
    /// `fast_only` fails with `ENOTSUP`, changing nothing, unless that is cheap.
    WriteZeroes { offset: u64, len: u64, may_trim: bool, fast_only: bool, fua: bool },
    /// Prefetch the range into the page cache; errors are ignored.
    Cache { offset: u64, len: u64 },
}

impl IoOp {
    /// True for ops that change the backing store (refused on a read-only open).
    fn mutates(&self) -> bool {
        self.overwritten_range().is_some()
    }

    /// The byte range a write, trim or zeroing changes (`None` for other ops).
    pub fn overwritten_range(&self) -> Option<std::ops::Range<u64>> {
        match self {
            IoOp::Write { offset, buf, .. } => Some(*offset..*offset + buf.len() as u64),
            IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
                Some(*offset..*offset + *len)
            }
            IoOp::Read { .. } | IoOp::Flush | IoOp::Cache { .. } => None,
        }
    }

    /// Gives the op's buffer back, for a completion that never reached the kernel.
    fn into_buf(self) -> IoBuf {
        match self {
            IoOp::Read { buf, .. } => IoBuf::Read(buf),
            IoOp::Write { buf, .. } => IoBuf::Write(buf),
            _ => IoBuf::None,
        }
    }
}

/// What comes back with a completion: the op's buffer (so it can be returned to its
/// pool or sent in a reply). A read's buffer holds the data read.
#[derive(Debug)]
pub enum IoBuf {
    None,
    Read(BufMut),
    Write(Buf),
}

/// The caller's completion callback.
pub trait IoSink: Send + Sync + 'static {
    /// Identifies an op to its submitter (e.g. the NBD handle and connection slot).
    type Token: Send + 'static;
    /// Called exactly once per submitted op, from an engine thread (or inline from
    /// `submit` for a cached read). Must not block for long: it stalls every other op
    /// of that engine thread.
    fn complete(&self, token: Self::Token, result: Result<(), Errno>, buf: IoBuf);
}

/// One contiguous run of a block-status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated (a hole in a sparse file).
    pub hole: bool,
    /// Reads as zeroes (always true for a hole).
    pub zero: bool,
}

/// Why a [`Storage`] could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("cannot open backing store {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot stat backing store {}: {source}", path.display())]
    Stat { path: PathBuf, source: Errno },
    #[error("backing store {} is neither a regular file nor a block device", path.display())]
    NotFileOrDevice { path: PathBuf },
    #[error("cannot read the size of block device {}: {source}", path.display())]
    DeviceSize { path: PathBuf, source: Errno },
    #[error("io_uring engine requested but unavailable: {source}")]
    UringUnavailable { source: std::io::Error },
    #[error("cannot start a storage engine thread for {}: {source}", path.display())]
    Spawn { path: PathBuf, source: std::io::Error },
}

/// An open backing store and the engine running its I/O.
///
/// Dropping it (or [`Storage::shutdown`]) completes every op already submitted and
/// joins the engine threads, so it must not be dropped from inside
/// [`IoSink::complete`].
pub struct Storage<S: IoSink> {
    backing: Arc<Backing>,
    engine: Engine<S>,
    sink: Arc<S>,
}

enum Engine<S: IoSink> {
    Posix(posix::PosixEngine<S>),
    Uring(uring::UringEngine<S>),
}

impl<S: IoSink> Storage<S> {
    /// Opens `path` (`O_RDWR`, or `O_RDONLY` when `opts.read_only`) and starts the
    /// engine chosen by `opts.engine`.
    pub fn open(path: &Path, opts: &StorageOptions, sink: Arc<S>) -> Result<Storage<S>, StorageError> {
        let backing = Arc::new(Backing::open(path, opts.read_only)?);
        let engine_sink = sink.clone();
        let engine = match opts.engine {
            EngineKind::Posix => {
                Engine::Posix(posix::PosixEngine::start(&backing, path, opts, engine_sink.clone())?)
            }
            EngineKind::Uring => {
                let ring = uring::Ring::probe(opts.max_inflight)
                    .map_err(|source| StorageError::UringUnavailable { source })?;
                Engine::Uring(uring::UringEngine::start(ring, &backing, path, engine_sink.clone())?)
            }
            EngineKind::Auto => match uring::Ring::probe(opts.max_inflight) {
                Ok(ring) => {
                    Engine::Uring(uring::UringEngine::start(ring, &backing, path, engine_sink.clone())?)
                }
                Err(reason) => {
                    tracing::warn!(
                        path = %path.display(),
                        %reason,
                        "io_uring is unavailable; using the posix storage engine"
                    );
                    Engine::Posix(posix::PosixEngine::start(&backing, path, opts, engine_sink.clone())?)
                }
            },
        };
        Ok(Storage { backing, engine, sink })
    }

    /// Size of the backing store at open time: the file length, or `BLKGETSIZE64`
    /// for a block device.
    pub fn size_bytes(&self) -> u64 {
        self.backing.size_bytes
    }

    pub fn backing_kind(&self) -> BackingKind {
        self.backing.kind
    }

    /// The engine actually running: `"uring"` or `"posix"`.
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Posix(_) => "posix",
            Engine::Uring(_) => "uring",
        }
    }

    /// Queues `op`; its completion arrives through the sink with `token`.
    ///
    /// Never blocks or spins, so it can be called from any thread, including async
    /// runtime workers. Past `max_inflight` queued ops it takes a lock and queues the
    /// op in the overflow queue (see the module doc).
    ///
    /// A read whose bytes are all in the page cache is served right here with
    /// `preadv2(RWF_NOWAIT)` (which never waits for the disk) and completes before
    /// `submit` returns: on this machine kind a hand-off to an engine thread and back
    /// costs more than the copy itself. Anything else goes to the engine.
    pub fn submit(&self, op: IoOp, token: S::Token) {
        let op = match op {
            IoOp::Read { offset, mut buf } if buf.len() <= INLINE_READ_MAX_BYTES => {
                if ops::pread_cached(self.backing.fd(), &mut buf, offset) {
                    return deliver(&*self.sink, token, Ok(()), IoBuf::Read(buf));
                }
                IoOp::Read { offset, buf }
            }
            other => other,
        };
        match &self.engine {
            Engine::Posix(engine) => engine.submit(op, token),
            Engine::Uring(engine) => engine.submit(op, token),
        }
    }

    /// The overflow counters.
    pub fn stats(&self) -> StorageStats {
        let (overflow_ops_total, overflow_queued_ops) = match &self.engine {
            Engine::Posix(engine) => engine.overflow().stats(),
            Engine::Uring(engine) => engine.overflow().stats(),
        };
        StorageStats { overflow_ops_total, overflow_queued_ops }
    }

    /// Allocation map for NBD BLOCK_STATUS: consecutive extents starting at
    /// `offset`, covering at least 1 and at most `len` bytes in at most
    /// `max_extents` extents. Regular files answer from `SEEK_DATA`/`SEEK_HOLE`; a
    /// block device (or a file system without them) reports one data extent. Past
    /// the end of a regular file is a hole. `len == 0` or `max_extents == 0` is
    /// `EINVAL`.
    ///
    /// Synchronous (it makes system calls): run it off the async runtime.
    pub fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>, Errno> {
        ops::block_status(&self.backing, offset, len, max_extents)
    }

    /// Completes everything already submitted, then joins the engine threads.
    pub fn shutdown(self) {
        // The engines' Drop impls do the work; this only names the intent.
        drop(self);
    }
}

/// Hands a completion to the sink. A panicking sink is a bug in the caller, but it
/// must not take down an engine thread: the other ops in flight would never complete,
/// and the io_uring thread owns buffers the kernel may still be writing into.
fn deliver<S: IoSink>(sink: &S, token: S::Token, result: Result<(), Errno>, buf: IoBuf) {
    let call = std::panic::AssertUnwindSafe(|| sink.complete(token, result, buf));
    if std::panic::catch_unwind(call).is_err() {
        tracing::error!("the storage completion callback panicked; the engine carries on");
    }
}
