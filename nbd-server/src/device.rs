//! What the server serves: the [`BlockDevice`] trait, the validated [`Request`]s it
//! receives, and the [`Responder`] through which it answers each one exactly once.
//!
//! The model is completion-based: `submit` starts the work and returns at once; the
//! device later calls one of the responder's methods from any thread. The responder
//! carries a reserved slot of the connection's bounded reply queue, so answering
//! never blocks and never allocates.

use tokio::sync::{OwnedSemaphorePermit, mpsc::OwnedPermit};

use crate::buf::{Buf, BufMut};
use crate::error::NbdError;
use crate::proto::{RequestHeader, cmd_flags, tflags};

/// Size, capabilities and block-size constraints of an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub read_only: bool,
    /// FLUSH and FUA are honoured (durable before the reply).
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    /// WRITE_ZEROES with FAST_ZERO fails fast with ENOTSUP when it would be slow.
    pub can_fast_zero: bool,
    pub can_cache: bool,
    /// FLUSH/FUA effects are visible on every connection when their reply is sent.
    pub can_multi_conn: bool,
    pub rotational: bool,
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_payload_bytes: u32,
}

impl ExportInfo {
    /// A writable export of `size_bytes` with every capability on (FLUSH/FUA, TRIM,
    /// WRITE_ZEROES with FAST_ZERO, CACHE, multi-conn) and the default block sizes:
    /// minimum 1, preferred 4 KiB, maximum payload 32 MiB. Devices turn off what
    /// they cannot honour.
    pub fn writable(size_bytes: u64) -> ExportInfo {
        ExportInfo {
            size_bytes,
            read_only: false,
            can_flush: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            rotational: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_payload_bytes: crate::proto::MAX_PAYLOAD_BYTES,
        }
    }

    /// The transmission flags that describe this export honestly.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = tflags::HAS_FLAGS;
        let set = |f: &mut u16, on: bool, bit: u16| {
            if on {
                *f |= bit;
            }
        };
        set(&mut f, self.read_only, tflags::READ_ONLY);
        set(&mut f, self.can_flush, tflags::SEND_FLUSH | tflags::SEND_FUA);
        set(&mut f, self.rotational, tflags::ROTATIONAL);
        set(&mut f, self.can_trim && !self.read_only, tflags::SEND_TRIM);
        let zeroes = self.can_write_zeroes && !self.read_only;
        set(&mut f, zeroes, tflags::SEND_WRITE_ZEROES);
        set(&mut f, zeroes && self.can_fast_zero, tflags::SEND_FAST_ZERO);
        set(&mut f, self.can_multi_conn, tflags::CAN_MULTI_CONN);
        set(&mut f, self.can_cache, tflags::SEND_CACHE);
        f
    }
}

/// One extent of a BLOCK_STATUS answer for `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u32,
    /// `NBD_STATE_HOLE` / `NBD_STATE_ZERO` bits.
    pub flags: u32,
}

/// A request that passed validation: in range, flags valid for its command, payload
/// (for WRITE) fully received.
#[derive(Debug)]
pub enum Request {
    /// Fill all of `buf` from `offset`.
    Read {
        offset: u64,
        buf: BufMut,
    },
    Write {
        offset: u64,
        data: Buf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len_bytes: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u32,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len_bytes: u32,
    },
    /// Report `base:allocation` from `offset`; with `req_one`, exactly one extent.
    BlockStatus {
        offset: u64,
        len_bytes: u32,
        req_one: bool,
    },
}

/// What a device serves. Implementations are shared by every connection.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size and capabilities, read at each `GO`/`INFO`/`EXPORT_NAME`.
    fn export_info(&self) -> ExportInfo;

    /// Whether the export may be opened now; `Err(message)` refuses `GO`/`INFO` with
    /// `NBD_REP_ERR_POLICY` and that message (e.g. "this node is Secondary; the
    /// Primary is beta"), and closes an `EXPORT_NAME` client.
    fn check_open(&self) -> Result<(), String> {
        Ok(())
    }

    /// Starts `request`; the device answers through `responder` exactly once, from
    /// any thread. Must not block.
    fn submit(&self, request: Request, responder: Responder);
}

/// A reply travelling from a device to the connection's writer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub cookie: u64,
    pub command: u16,
    /// The request's offset (echoed in structured READ chunks).
    pub offset: u64,
    pub body: ReplyBody,
    /// Payload bytes this request holds against its connection's in-flight budget;
    /// released when the reply has been written.
    pub _budget: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
pub(crate) enum ReplyBody {
    Ok,
    Error(NbdError),
    ReadData(BufMut),
    BlockStatus { context_id: u32, extents: Vec<Extent>, request_len: u32, req_one: bool },
}

/// The device's handle for answering one request.
///
/// Dropping it unanswered sends `EIO`, so a device bug surfaces as an error to the
/// client instead of a request that hangs forever.
#[derive(Debug)]
pub struct Responder {
    permit: Option<OwnedPermit<Reply>>,
    header: RequestHeader,
    context_id: u32,
    budget: Option<OwnedSemaphorePermit>,
}

impl Responder {
    pub(crate) fn new(
        permit: OwnedPermit<Reply>,
        header: RequestHeader,
        context_id: u32,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Responder {
        Responder { permit: Some(permit), header, context_id, budget }
    }

    fn send(&mut self, body: ReplyBody) {
        if let Some(permit) = self.permit.take() {
            let reply = Reply {
                cookie: self.header.cookie,
                command: self.header.command,
                offset: self.header.offset,
                body,
                _budget: self.budget.take(),
            };
            // If the connection is gone the reply is simply dropped.
            let _ = permit.send(reply);
        }
    }

    /// The request succeeded (anything but READ data and BLOCK_STATUS).
    pub fn ok(mut self) {
        self.send(ReplyBody::Ok);
    }

    /// A READ succeeded; `buf` holds the data.
    pub fn read_done(mut self, buf: BufMut) {
        self.send(ReplyBody::ReadData(buf));
    }

    /// The request failed.
    pub fn error(mut self, error: NbdError) {
        self.send(ReplyBody::Error(error));
    }

    /// A BLOCK_STATUS answer (consecutive extents from the request offset).
    pub fn block_status(mut self, extents: Vec<Extent>) {
        let context_id = self.context_id;
        let request_len = self.header.length;
        let req_one = self.header.flags & cmd_flags::REQ_ONE != 0;
        self.send(ReplyBody::BlockStatus { context_id, extents, request_len, req_one });
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.permit.is_some() {
            tracing::error!(cookie = self.header.cookie, "request dropped unanswered; replying EIO");
            self.send(ReplyBody::Error(NbdError::Io));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo::writable(1 << 20)
    }

    #[test]
    fn flags_reflect_capabilities() {
        let f = info().transmission_flags();
        assert_eq!(f, 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800);
        let ro = ExportInfo { read_only: true, ..info() }.transmission_flags();
        assert_eq!(ro & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES), 0);
        assert_ne!(ro & tflags::READ_ONLY, 0);
        let no_zero = ExportInfo { can_write_zeroes: false, ..info() }.transmission_flags();
        assert_eq!(no_zero & tflags::SEND_FAST_ZERO, 0, "FAST_ZERO requires WRITE_ZEROES");
    }

    #[tokio::test]
    async fn dropped_responder_replies_eio() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let permit = tx.reserve_owned().await.expect("open");
        let header = RequestHeader { flags: 0, command: 0, cookie: 42, offset: 0, length: 1 };
        drop(Responder::new(permit, header, 0, None));
        let reply = rx.recv().await.expect("a reply");
        assert_eq!(reply.cookie, 42);
        assert!(matches!(reply.body, ReplyBody::Error(NbdError::Io)));
    }
}
