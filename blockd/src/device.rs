//! [`LocalDevice`]: the NBD export served straight from the local backing store
//! (a standalone node). Requests go to the storage engine with the request's
//! [`Responder`] as the completion token, so a reply is sent from the engine thread
//! the moment the I/O completes, with no task or allocation per request.

use std::sync::Arc;

use nbd_server::{BlockDevice, ExportInfo, Extent, NbdError, Request, Responder, proto};
use nix::errno::Errno;
use tokio::sync::oneshot;

use crate::storage::{IoBuf, IoOp, IoSink, Storage};

/// Extents per BLOCK_STATUS reply; clients ask again for the rest.
const MAX_STATUS_EXTENTS: usize = 64 << 10;

/// Who is waiting for a storage completion.
pub enum Waiter {
    /// An NBD request; `fast_zero` decides whether ENOTSUP may reach the client.
    Nbd { responder: Responder, fast_zero: bool },
    /// The daemon itself (e.g. the final flush at shutdown).
    Internal(oneshot::Sender<Result<(), Errno>>),
}

/// Routes storage completions to their waiters.
pub struct ReplySink;

impl IoSink for ReplySink {
    type Token = Waiter;

    fn complete(&self, token: Waiter, result: Result<(), Errno>, buf: IoBuf) {
        match token {
            Waiter::Nbd { responder, fast_zero } => reply(responder, result, buf, fast_zero),
            Waiter::Internal(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Answers an NBD request from its storage completion: the read data, success, or
/// the errno mapped to an NBD error (`ENOTSUP` passes only for a FAST_ZERO request).
pub fn reply(responder: Responder, result: Result<(), Errno>, buf: IoBuf, fast_zero: bool) {
    match (result, buf) {
        (Ok(()), IoBuf::Read(data)) => responder.read_done(data),
        (Ok(()), _) => responder.ok(),
        (Err(errno), _) => {
            if errno != Errno::ENOTSUP {
                tracing::warn!(error = %errno, "local I/O failed");
            }
            responder.error(NbdError::from_errno(errno as i32, fast_zero));
        }
    }
}

/// A block device served from local storage only.
pub struct LocalDevice {
    storage: Arc<Storage<ReplySink>>,
    size_bytes: u64,
    runtime: tokio::runtime::Handle,
}

impl LocalDevice {
    /// Exports the first `size_bytes` of `storage`. Must be called inside a tokio
    /// runtime (BLOCK_STATUS runs on its blocking pool).
    pub fn new(storage: Storage<ReplySink>, size_bytes: u64) -> LocalDevice {
        debug_assert!(size_bytes <= storage.size_bytes());
        LocalDevice { storage: Arc::new(storage), size_bytes, runtime: tokio::runtime::Handle::current() }
    }

    /// Makes everything written so far durable (`fdatasync`).
    pub async fn flush(&self) -> Result<(), Errno> {
        let (tx, rx) = oneshot::channel();
        self.storage.submit(IoOp::Flush, Waiter::Internal(tx));
        rx.await.unwrap_or(Err(Errno::EIO))
    }

    /// Which I/O engine actually runs.
    pub fn engine_name(&self) -> &'static str {
        self.storage.engine_name()
    }

    fn block_status(&self, offset: u64, len_bytes: u32, responder: Responder) {
        spawn_block_status(&self.runtime, self.storage.clone(), offset, len_bytes, responder);
    }
}

/// Answers BLOCK_STATUS from the backing store's allocation map. `lseek(SEEK_DATA/
/// SEEK_HOLE)` can block on metadata reads, so it runs on the blocking pool; BLOCK_STATUS
/// is not a hot path, so the task allocation is fine. Shared by every device kind.
pub fn spawn_block_status<S: IoSink>(
    runtime: &tokio::runtime::Handle,
    storage: Arc<Storage<S>>,
    offset: u64,
    len_bytes: u32,
    responder: Responder,
) {
    runtime.spawn_blocking(move || {
        match storage.block_status(offset, u64::from(len_bytes), MAX_STATUS_EXTENTS) {
            Ok(extents) => responder.block_status(
                extents
                    .into_iter()
                    .map(|e| Extent {
                        len_bytes: u32::try_from(e.len).unwrap_or(u32::MAX),
                        flags: if e.hole { proto::state::HOLE } else { 0 }
                            | if e.zero { proto::state::ZERO } else { 0 },
                    })
                    .collect(),
            ),
            Err(errno) => responder.error(NbdError::from_errno(errno as i32, false)),
        }
    });
}

impl BlockDevice for LocalDevice {
    fn export_info(&self) -> ExportInfo {
        // One backing store and one page cache behind every connection: FLUSH/FUA
        // effects are visible to all of them, so multi-conn is honest.
        ExportInfo::writable(self.size_bytes)
    }

    fn submit(&self, request: Request, responder: Responder) {
        let (op, fast_zero) = match request {
            Request::Read { offset, buf } => (IoOp::Read { offset, buf }, false),
            Request::Write { offset, data, fua } => (IoOp::Write { offset, buf: data, fua }, false),
            Request::Flush => (IoOp::Flush, false),
            Request::Trim { offset, len_bytes, fua } => {
                (IoOp::Trim { offset, len: len_bytes.into(), fua }, false)
            }
            Request::WriteZeroes { offset, len_bytes, no_hole, fast_only, fua } => (
                IoOp::WriteZeroes { offset, len: len_bytes.into(), may_trim: !no_hole, fast_only, fua },
                fast_only,
            ),
            Request::Cache { offset, len_bytes } => (IoOp::Cache { offset, len: len_bytes.into() }, false),
            Request::BlockStatus { offset, len_bytes, .. } => {
                return self.block_status(offset, len_bytes, responder);
            }
        };
        self.storage.submit(op, Waiter::Nbd { responder, fast_zero });
    }
}
