//! The transmission phase of one connection: a reader that decodes and validates
//! requests and submits them to the device, and a writer task that encodes replies
//! in completion order (out of order with respect to requests, as NBD allows).
//!
//! Both halves are bounded: at most [`MAX_INFLIGHT_REQUESTS`] requests and
//! [`MAX_INFLIGHT_PAYLOAD_BYTES`] of READ/WRITE payload per connection are in flight,
//! so a client that pipelines without reading replies stalls only itself.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::buf::BufPool;
use crate::device::{BlockDevice, ExportInfo, Extent, Reply, ReplyBody, Request, Responder};
use crate::error::{Error, NbdError};
use crate::handshake::{BASE_ALLOCATION_ID, Negotiated};
use crate::proto::{
    MAX_PAYLOAD_BYTES, REQUEST_HEADER_BYTES, RequestHeader, cmd, cmd_flags, decode_request,
    encode_simple_reply, encode_structured_header, reply,
};

/// Requests in flight per connection (the Linux client's queue depth is 128).
pub const MAX_INFLIGHT_REQUESTS: usize = 128;
/// READ/WRITE payload in flight per connection: two maximum-size requests.
pub const MAX_INFLIGHT_PAYLOAD_BYTES: usize = 64 << 20;
/// Budget accounting unit (one semaphore permit).
const BUDGET_UNIT_BYTES: usize = 4096;
/// Socket buffering on each side; small replies are batched into one write.
const SOCKET_BUFFER_BYTES: usize = 128 << 10;
/// At most this many extents in one BLOCK_STATUS reply (the spec's SHOULD limit).
pub const MAX_EXTENTS: usize = 1 << 20;

/// Checks a request header against the negotiated state, in nbdkit's order.
/// Returns the NBD error the request must be answered with, if any.
pub fn validate(
    h: &RequestHeader,
    info: &ExportInfo,
    structured: bool,
    base_allocation: bool,
) -> Result<(), NbdError> {
    use NbdError::{Inval, NoSpc, Perm};
    let writes = matches!(h.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if h.command > cmd::BLOCK_STATUS || h.command == cmd::DISC {
        return Err(Inval);
    }
    if info.read_only && writes {
        return Err(Perm);
    }
    let f = h.flags;
    if f & !cmd_flags::KNOWN != 0
        || (f & cmd_flags::FUA != 0 && !info.can_flush)
        || (f & (cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO) != 0 && h.command != cmd::WRITE_ZEROES)
        || (f & cmd_flags::FAST_ZERO != 0 && !info.can_fast_zero)
        // DF is never advertised.
        || f & cmd_flags::DF != 0
        || (f & cmd_flags::REQ_ONE != 0 && h.command != cmd::BLOCK_STATUS)
    {
        return Err(Inval);
    }
    let advertised = match h.command {
        cmd::FLUSH => info.can_flush,
        cmd::TRIM => info.can_trim,
        cmd::WRITE_ZEROES => info.can_write_zeroes,
        cmd::CACHE => info.can_cache,
        cmd::BLOCK_STATUS => structured && base_allocation,
        _ => true,
    };
    if !advertised {
        return Err(Inval);
    }
    if h.command == cmd::FLUSH {
        return if h.offset == 0 && h.length == 0 { Ok(()) } else { Err(Inval) };
    }
    let in_range =
        h.length > 0 && h.offset.checked_add(u64::from(h.length)).is_some_and(|end| end <= info.size_bytes);
    if !in_range {
        let past_end_error = if matches!(h.command, cmd::WRITE | cmd::WRITE_ZEROES) { NoSpc } else { Inval };
        return Err(if h.length == 0 { Inval } else { past_end_error });
    }
    if h.command == cmd::READ && h.length > info.max_payload_bytes.min(MAX_PAYLOAD_BYTES) {
        return Err(Inval);
    }
    let min = u64::from(info.min_block_bytes.max(1));
    if !h.offset.is_multiple_of(min) || !u64::from(h.length).is_multiple_of(min) {
        return Err(Inval);
    }
    Ok(())
}

/// Runs transmission until the client disconnects, misbehaves, or shutdown starts;
/// returns after every in-flight request has been answered (or the socket died).
pub(crate) async fn run<R, W, D>(
    reader: R,
    writer: W,
    device: Arc<D>,
    negotiated: Negotiated,
    pool: BufPool,
    shutdown: watch::Receiver<bool>,
    kick: watch::Receiver<u64>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let (tx, rx) = mpsc::channel(MAX_INFLIGHT_REQUESTS);
    let structured = negotiated.structured_replies;
    let writer_task = tokio::spawn(write_replies(writer, rx, structured));
    let mut conn = Reader {
        reader: BufReader::with_capacity(SOCKET_BUFFER_BYTES, reader),
        device,
        negotiated,
        pool,
        tx,
        budget: Arc::new(Semaphore::new(MAX_INFLIGHT_PAYLOAD_BYTES / BUDGET_UNIT_BYTES)),
    };
    let read_result = conn.read_requests(shutdown, kick).await;
    // Dropping the sender lets the writer finish once the device has answered every
    // request still in flight (each holds its own sender through its permit).
    drop(conn);
    let write_result = writer_task.await.map_err(|e| Error::Protocol(format!("reply writer failed: {e}")))?;
    read_result.and(write_result.map_err(Error::from))
}

struct Reader<R, D> {
    reader: BufReader<R>,
    device: Arc<D>,
    negotiated: Negotiated,
    pool: BufPool,
    tx: mpsc::Sender<Reply>,
    budget: Arc<Semaphore>,
}

impl<R, D> Reader<R, D>
where
    R: AsyncRead + Unpin,
    D: BlockDevice,
{
    async fn read_requests(
        &mut self,
        mut shutdown: watch::Receiver<bool>,
        mut kick: watch::Receiver<u64>,
    ) -> Result<(), Error> {
        loop {
            let mut raw = [0u8; REQUEST_HEADER_BYTES];
            tokio::select! {
                biased;
                read = self.reader.read_exact(&mut raw) => match read {
                    Ok(_) => {}
                    // A client that just closes is a normal end.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
                _ = crate::server::stopped(&mut shutdown) => return Ok(()),
                _ = kicked(&mut kick) => return Ok(()),
            }
            let header =
                decode_request(&raw).map_err(|m| Error::Protocol(format!("bad request magic {:#x}", m.0)))?;
            if header.command == cmd::DISC {
                return Ok(());
            }
            self.one_request(header).await?;
        }
    }

    async fn one_request(&mut self, h: RequestHeader) -> Result<(), Error> {
        let is_write = h.command == cmd::WRITE;
        if is_write && h.length > MAX_PAYLOAD_BYTES {
            // Too big to consume safely: the spec allows a hard disconnect.
            return Err(Error::Protocol(format!("WRITE payload of {} bytes", h.length)));
        }
        let carries_payload = matches!(h.command, cmd::READ | cmd::WRITE);
        let budget = if carries_payload && h.length <= MAX_PAYLOAD_BYTES {
            let units = (h.length as usize).div_ceil(BUDGET_UNIT_BYTES).max(1) as u32;
            Some(self.budget.clone().acquire_many_owned(units).await.expect("never closed"))
        } else {
            None
        };
        let Ok(permit) = self.tx.clone().reserve_owned().await else {
            return Err(Error::Protocol("reply writer stopped".into()));
        };
        let n = &self.negotiated;
        let verdict = validate(&h, &n.info, n.structured_replies, n.base_allocation);
        let responder = Responder::new(permit, h, BASE_ALLOCATION_ID, budget);
        let data = if is_write {
            // The payload is consumed even when the request is rejected, to stay in sync.
            let mut buf = self.pool.get(h.length as usize);
            self.reader.read_exact(&mut buf).await?;
            Some(buf)
        } else {
            None
        };
        if let Err(e) = verdict {
            tracing::debug!(cookie = h.cookie, command = h.command, error = %e, "request rejected");
            responder.error(e);
            return Ok(());
        }
        let fua = h.flags & cmd_flags::FUA != 0;
        let (offset, len_bytes) = (h.offset, h.length);
        let request = match h.command {
            cmd::READ => Request::Read { offset, buf: self.pool.get(len_bytes as usize) },
            cmd::WRITE => Request::Write { offset, data: data.expect("read above").freeze(), fua },
            cmd::FLUSH => Request::Flush,
            cmd::TRIM => Request::Trim { offset, len_bytes, fua },
            cmd::WRITE_ZEROES => Request::WriteZeroes {
                offset,
                len_bytes,
                no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                fast_only: h.flags & cmd_flags::FAST_ZERO != 0,
                fua,
            },
            cmd::CACHE => Request::Cache { offset, len_bytes },
            cmd::BLOCK_STATUS => {
                Request::BlockStatus { offset, len_bytes, req_one: h.flags & cmd_flags::REQ_ONE != 0 }
            }
            _ => unreachable!("validate() rejects unknown commands"),
        };
        self.device.submit(request, responder);
        Ok(())
    }
}

/// Resolves when the server asks every connection to close (never, if it is gone).
async fn kicked(kick: &mut watch::Receiver<u64>) {
    if kick.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Encodes replies as they arrive; batches whatever is ready into one socket write.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
) -> std::io::Result<()> {
    let mut out = ReplyOut { writer, pending: Vec::with_capacity(SOCKET_BUFFER_BYTES) };
    while let Some(first) = rx.recv().await {
        out.encode(first, structured).await?;
        while let Ok(next) = rx.try_recv() {
            out.encode(next, structured).await?;
        }
        out.flush().await?;
    }
    let _ = out.writer.shutdown().await;
    Ok(())
}

/// Reply bytes on their way to the socket. Headers and small payloads are gathered in
/// `pending` (one write for many replies); a large payload goes out in the same
/// `writev` as everything gathered before it, so its header never travels as a tiny
/// segment of its own (the spirit of `MSG_MORE`) and the payload is not copied.
struct ReplyOut<W> {
    writer: W,
    pending: Vec<u8>,
}

/// Payloads at least this large are written from their own buffer, not copied.
const DIRECT_PAYLOAD_BYTES: usize = 32 << 10;

impl<W: AsyncWrite + Unpin> ReplyOut<W> {
    async fn flush(&mut self) -> std::io::Result<()> {
        self.writer.write_all(&self.pending).await?;
        self.pending.clear();
        self.writer.flush().await
    }

    async fn payload(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.len() < DIRECT_PAYLOAD_BYTES {
            self.pending.extend_from_slice(data);
            if self.pending.len() >= SOCKET_BUFFER_BYTES {
                self.flush().await?;
            }
            return Ok(());
        }
        let mut slices = [std::io::IoSlice::new(&self.pending), std::io::IoSlice::new(data)];
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self.writer.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        self.pending.clear();
        Ok(())
    }

    async fn encode(&mut self, r: Reply, structured: bool) -> std::io::Result<()> {
        let structured_command = matches!(r.command, cmd::READ | cmd::BLOCK_STATUS);
        let out = &mut self.pending;
        match r.body {
            ReplyBody::Ok => out.extend_from_slice(&encode_simple_reply(r.cookie, 0)),
            ReplyBody::Error(e) if structured && structured_command => {
                out.extend_from_slice(&encode_structured_header(
                    r.cookie,
                    reply::FLAG_DONE,
                    reply::TYPE_ERROR,
                    6,
                ));
                out.extend_from_slice(&e.code().to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
            }
            ReplyBody::Error(e) => out.extend_from_slice(&encode_simple_reply(r.cookie, e.code())),
            ReplyBody::ReadData(buf) if structured => {
                let len = u32::try_from(8 + buf.len()).expect("payload ≤ 32 MiB");
                let h = encode_structured_header(r.cookie, reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, len);
                out.extend_from_slice(&h);
                out.extend_from_slice(&r.offset.to_be_bytes());
                return self.payload(&buf).await;
            }
            ReplyBody::ReadData(buf) => {
                out.extend_from_slice(&encode_simple_reply(r.cookie, 0));
                return self.payload(&buf).await;
            }
            ReplyBody::BlockStatus { context_id, extents, request_len, req_one } => {
                let extents = sanitize_extents(extents, request_len, req_one);
                let len = u32::try_from(4 + 8 * extents.len()).expect("bounded extent count");
                out.extend_from_slice(&encode_structured_header(
                    r.cookie,
                    reply::FLAG_DONE,
                    reply::TYPE_BLOCK_STATUS,
                    len,
                ));
                out.extend_from_slice(&context_id.to_be_bytes());
                for e in &extents {
                    out.extend_from_slice(&e.len_bytes.to_be_bytes());
                    out.extend_from_slice(&e.flags.to_be_bytes());
                }
            }
        }
        if self.pending.len() >= SOCKET_BUFFER_BYTES {
            self.flush().await?;
        }
        Ok(())
    }
}

/// Makes a device's answer conform: nonzero lengths, at least one extent, within the
/// request, at most one extent with REQ_ONE, bounded count. Status 0 ("data, not known
/// to be zero") is always a safe answer, so an empty answer becomes one such extent.
fn sanitize_extents(mut extents: Vec<Extent>, request_len: u32, req_one: bool) -> Vec<Extent> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut remaining = request_len;
    extents.retain_mut(|e| {
        if remaining == 0 || e.len_bytes == 0 {
            return false;
        }
        e.len_bytes = e.len_bytes.min(remaining);
        remaining -= e.len_bytes;
        true
    });
    extents.truncate(limit);
    if extents.is_empty() {
        extents.push(Extent { len_bytes: request_len, flags: 0 });
    }
    extents
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo::writable(1 << 20)
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 1, offset, length }
    }

    fn check(h: RequestHeader) -> Result<(), NbdError> {
        validate(&h, &info(), true, true)
    }

    #[test]
    fn range_errors_follow_nbdkit() {
        let end = 1 << 20;
        assert_eq!(check(req(cmd::READ, 0, end, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::WRITE, 0, end - 1, 2)), Err(NbdError::NoSpc));
        assert_eq!(check(req(cmd::WRITE_ZEROES, 0, end, 4096)), Err(NbdError::NoSpc));
        assert_eq!(check(req(cmd::TRIM, 0, end, 4096)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::CACHE, 0, u64::MAX, 4096)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::BLOCK_STATUS, 0, end, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::WRITE, 0, u64::MAX - 1, 4096)), Err(NbdError::NoSpc), "overflow");
        assert_eq!(check(req(cmd::READ, 0, 0, 0)), Err(NbdError::Inval), "zero length");
        assert_eq!(check(req(cmd::WRITE, 0, end - 4096, 4096)), Ok(()));
    }

    #[test]
    fn flag_errors_follow_nbdkit() {
        assert_eq!(check(req(cmd::READ, 0x40, 0, 1)), Err(NbdError::Inval), "unknown flag");
        assert_eq!(check(req(cmd::WRITE, cmd_flags::NO_HOLE, 0, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::TRIM, cmd_flags::FAST_ZERO, 0, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::READ, cmd_flags::DF, 0, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::READ, cmd_flags::REQ_ONE, 0, 1)), Err(NbdError::Inval));
        assert_eq!(check(req(cmd::FLUSH, cmd_flags::FUA, 0, 0)), Ok(()), "FUA on any command");
        assert_eq!(check(req(cmd::READ, cmd_flags::FUA, 0, 1)), Ok(()));
        let zero_flags = cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO | cmd_flags::FUA;
        assert_eq!(check(req(cmd::WRITE_ZEROES, zero_flags, 0, 1)), Ok(()));
        assert_eq!(check(req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, 1)), Ok(()));
    }

    #[test]
    fn commands_need_advertising_and_state() {
        assert_eq!(check(req(9, 0, 0, 1)), Err(NbdError::Inval), "unknown command");
        assert_eq!(check(req(cmd::FLUSH, 0, 1, 0)), Err(NbdError::Inval), "FLUSH with offset");
        let h = req(cmd::BLOCK_STATUS, 0, 0, 1);
        assert_eq!(validate(&h, &info(), true, false), Err(NbdError::Inval), "no meta context");
        assert_eq!(validate(&h, &info(), false, true), Err(NbdError::Inval), "no structured");
        let no_trim = ExportInfo { can_trim: false, ..info() };
        assert_eq!(validate(&req(cmd::TRIM, 0, 0, 1), &no_trim, true, true), Err(NbdError::Inval));
        let ro = ExportInfo { read_only: true, ..info() };
        assert_eq!(validate(&req(cmd::WRITE, 0, 0, 1), &ro, true, true), Err(NbdError::Perm));
        assert_eq!(validate(&req(cmd::READ, 0, 0, 1), &ro, true, true), Ok(()));
        let aligned = ExportInfo { min_block_bytes: 512, ..info() };
        assert_eq!(validate(&req(cmd::READ, 0, 1, 512), &aligned, true, true), Err(NbdError::Inval));
        assert_eq!(validate(&req(cmd::READ, 0, 512, 512), &aligned, true, true), Ok(()));
    }

    #[test]
    fn oversize_read_is_einval_and_big_trims_are_fine() {
        let big = ExportInfo { size_bytes: 1 << 40, ..info() };
        let h = req(cmd::READ, 0, 0, MAX_PAYLOAD_BYTES + 1);
        assert_eq!(validate(&h, &big, true, true), Err(NbdError::Inval));
        assert_eq!(validate(&req(cmd::TRIM, 0, 0, u32::MAX), &big, true, true), Ok(()));
    }

    #[test]
    fn extents_are_sanitized() {
        let e = |len_bytes, flags| Extent { len_bytes, flags };
        assert_eq!(sanitize_extents(vec![], 100, false), vec![e(100, 0)]);
        assert_eq!(sanitize_extents(vec![e(0, 3), e(60, 3), e(60, 0)], 100, false), vec![e(60, 3), e(40, 0)]);
        assert_eq!(sanitize_extents(vec![e(10, 3), e(60, 0)], 100, true), vec![e(10, 3)]);
    }
}
