//! NBD: one whole server connection (`Server::serve_one`) over an in-memory stream
//! whose reader is the fuzz input and whose writer discards the replies.
//!
//! - `nbd_handshake`: the input is everything the client sends, from its flags on:
//!   option haggling, and whatever transmission a successful haggle leads to.
//! - `nbd_client`: the other direction: the input is what a server sends to this
//!   crate's client (`blockctl attach`'s dial), for the handshake and for a listing.
//! - `nbd_request`: six bytes choose the export (size, read-only, capabilities, block
//!   sizes, structured replies or not); the harness then sends a valid handshake
//!   and the rest of the input is the request stream.
//!
//! Checks: the connection ends (the input ends, so must the server), nothing panics,
//! and the device sees only requests that validation promises: in range, aligned,
//! allowed by the export's capabilities (ARCHITECTURE.md: "devices only get
//! in-range, correctly flagged requests").

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nbd_server::client::{self, Client};
use nbd_server::proto::{
    self, BASE_ALLOCATION, IHAVEOPT, MAX_PAYLOAD_BYTES, RequestHeader, client_flags, cmd, cmd_flags, info,
    opt,
};
use nbd_server::{BlockDevice, ExportInfo, Extent, NbdError, Request, Responder, Server, ServerConfig};

use crate::{Bytes, Seed};

/// The export's name.
pub const EXPORT: &str = "r0";
/// Bytes of export choice in front of an `nbd_request` input.
const CONFIG_BYTES: usize = 6;

/// Target `nbd_handshake`: `data` is everything the client sends.
pub fn nbd_handshake(data: &[u8]) {
    serve(ExportInfo { min_block_bytes: 512, ..ExportInfo::writable(1 << 20) }, data.to_vec());
}

/// Target `nbd_request`: export choice, then requests after a valid handshake.
pub fn nbd_request(data: &[u8]) {
    let Some((config, requests)) = data.split_first_chunk::<CONFIG_BYTES>() else { return };
    let choice = ExportChoice::decode(config);
    let mut client = choice.handshake();
    client.extend_from_slice(requests);
    serve(choice.info, client);
}

/// Target `nbd_client`: `data` is everything a server sends to the client side
/// (`blockctl attach` dialing a node): the handshake and a few requests, and
/// separately the export listing.
pub fn nbd_client(data: &[u8]) {
    crate::block_on(async {
        if let Ok(mut client) = Client::connect(tokio::io::join(data, tokio::io::sink()), EXPORT).await {
            let _ = client.read(0, 512).await;
            let _ = client.flush().await;
        }
        let _ = client::list_exports(&mut tokio::io::join(data, tokio::io::sink())).await;
    });
}

/// Serves `client_bytes` as one connection and returns when the server is done with it.
fn serve(info: ExportInfo, client_bytes: Vec<u8>) {
    // Errors are the expected answer to most inputs; only panics and hangs are bugs.
    let _ = crate::block_on(serve_to(info, client_bytes, tokio::io::sink()));
}

async fn serve_to<W>(info: ExportInfo, client_bytes: Vec<u8>, out: W) -> Result<(), nbd_server::Error>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut config = ServerConfig::new(EXPORT);
    config.export.description = Some("a fuzzed export".into());
    let server = Server::new(Arc::new(Device { info }), config);
    // Held until the connection ends: a dropped sender means "shut down".
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    server.serve_one(tokio::io::join(Cursor::new(client_bytes), out), shutdown).await
}

/// What an `nbd_request` input's first bytes choose.
struct ExportChoice {
    info: ExportInfo,
    structured: bool,
    /// End the haggle with the old `EXPORT_NAME` instead of `GO`.
    export_name: bool,
}

impl ExportChoice {
    fn decode(c: &[u8; CONFIG_BYTES]) -> ExportChoice {
        let bit = |byte: u8, n: u32| byte & (1 << n) != 0;
        let units = u64::from(u16::from_be_bytes([c[2], c[3]]));
        let size_bytes = if bit(c[5], 0) {
            // Near the end of u64: offset + length overflows.
            u64::MAX - units * 512
        } else {
            (units << 12).saturating_sub(u64::from(c[4] >> 4) * 512)
        };
        let info = ExportInfo {
            size_bytes,
            read_only: bit(c[0], 0),
            can_flush: bit(c[0], 1),
            can_trim: bit(c[0], 2),
            can_write_zeroes: bit(c[0], 3),
            can_fast_zero: bit(c[0], 4),
            can_cache: bit(c[0], 5),
            can_multi_conn: bit(c[5], 2),
            rotational: bit(c[5], 3),
            min_block_bytes: 1 << (c[1] % 13),
            preferred_block_bytes: 4096,
            max_payload_bytes: (1u32 << (12 + (c[4] & 0x0f) % 14)).min(MAX_PAYLOAD_BYTES),
        };
        ExportChoice { info, structured: bit(c[0], 6), export_name: bit(c[5], 1) }
    }

    /// The config bytes that decode to this choice's flags (for seeds), with a 64 MiB
    /// export, 512-byte blocks and 32 MiB payloads.
    fn encode(structured: bool, read_only: bool, export_name: bool) -> [u8; CONFIG_BYTES] {
        let caps = 0b0011_1110 | u8::from(read_only) | u8::from(structured) << 6;
        let size_units = ((64u32 << 20) >> 12) as u16;
        let [hi, lo] = size_units.to_be_bytes();
        [caps, 9, hi, lo, 13, u8::from(export_name) << 1 | 1 << 2]
    }

    /// What a well-behaved client sends to get into transmission with this choice.
    fn handshake(&self) -> Vec<u8> {
        let mut b = Bytes::default().u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
        if self.structured {
            b = option(b, opt::STRUCTURED_REPLY, &[]);
            b = option(b, opt::SET_META_CONTEXT, &meta_context_data(EXPORT, &[BASE_ALLOCATION]));
        }
        if self.export_name {
            b = option(b, opt::EXPORT_NAME, EXPORT.as_bytes());
        } else {
            b = option(b, opt::GO, &go_data(EXPORT, &[info::BLOCK_SIZE]));
        }
        b.0
    }
}

/// Requests devices were given (the seeds' test checks that they get that far).
static SUBMITTED: AtomicU64 = AtomicU64::new(0);

/// Answers every request at once, after checking that validation let only proper
/// requests through.
struct Device {
    info: ExportInfo,
}

impl Device {
    fn check_range(&self, what: &str, offset: u64, len_bytes: u64) {
        let i = &self.info;
        let min = u64::from(i.min_block_bytes);
        assert!(len_bytes > 0, "{what}: zero length reached the device");
        let end = offset.checked_add(len_bytes);
        assert!(end.is_some_and(|e| e <= i.size_bytes), "{what} {offset}+{len_bytes} past {}", i.size_bytes);
        assert!(
            offset.is_multiple_of(min) && len_bytes.is_multiple_of(min),
            "{what} {offset}+{len_bytes} not {min}-aligned"
        );
    }

    fn check_write(&self, what: &str, fua: bool) {
        assert!(!self.info.read_only, "{what} on a read-only export");
        assert!(!fua || self.info.can_flush, "{what} with FUA without FLUSH advertised");
    }
}

impl BlockDevice for Device {
    fn export_info(&self) -> ExportInfo {
        self.info.clone()
    }

    fn submit(&self, request: Request, responder: Responder) {
        SUBMITTED.fetch_add(1, Ordering::Relaxed);
        let i = &self.info;
        // Odd offsets fail, so error replies get encoded too.
        let fail = |offset: u64| offset & 1 != 0 || offset % 3 == 2;
        match request {
            Request::Read { offset, buf } => {
                self.check_range("READ", offset, buf.len() as u64);
                assert!(buf.len() <= i.max_payload_bytes as usize, "READ of {} bytes", buf.len());
                if fail(offset) { responder.error(NbdError::Io) } else { responder.read_done(buf) }
            }
            Request::Write { offset, data, fua } => {
                self.check_range("WRITE", offset, data.len() as u64);
                self.check_write("WRITE", fua);
                if fail(offset) { responder.error(NbdError::NoSpc) } else { responder.ok() }
            }
            Request::Flush => {
                assert!(i.can_flush, "FLUSH without FLUSH advertised");
                responder.ok();
            }
            Request::Trim { offset, len_bytes, fua } => {
                self.check_range("TRIM", offset, len_bytes.into());
                self.check_write("TRIM", fua);
                assert!(i.can_trim, "TRIM not advertised");
                responder.ok();
            }
            Request::WriteZeroes { offset, len_bytes, fast_only, fua, .. } => {
                self.check_range("WRITE_ZEROES", offset, len_bytes.into());
                self.check_write("WRITE_ZEROES", fua);
                assert!(i.can_write_zeroes, "WRITE_ZEROES not advertised");
                assert!(!fast_only || i.can_fast_zero, "FAST_ZERO not advertised");
                if fast_only && fail(offset) { responder.error(NbdError::NotSup) } else { responder.ok() }
            }
            Request::Cache { offset, len_bytes } => {
                self.check_range("CACHE", offset, len_bytes.into());
                assert!(i.can_cache, "CACHE not advertised");
                responder.ok();
            }
            Request::BlockStatus { offset, len_bytes, .. } => {
                self.check_range("BLOCK_STATUS", offset, len_bytes.into());
                // A sloppy answer (empty extent, too long in total), which the server
                // must tidy before it goes out.
                let third = len_bytes / 3;
                let extents = vec![
                    Extent { len_bytes: third, flags: proto::state::HOLE | proto::state::ZERO },
                    Extent { len_bytes: 0, flags: 0 },
                    Extent { len_bytes: u32::MAX, flags: 0 },
                ];
                if fail(offset) { responder.error(NbdError::Inval) } else { responder.block_status(extents) }
            }
        }
    }
}

fn option(b: Bytes, option: u32, data: &[u8]) -> Bytes {
    b.u64(IHAVEOPT).u32(option).u32(data.len() as u32).raw(data)
}

fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Bytes::default().u32(name.len() as u32).raw(name.as_bytes()).u16(requests.len() as u16);
    for r in requests {
        b = b.u16(*r);
    }
    b.0
}

fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Bytes::default().u32(name.len() as u32).raw(name.as_bytes()).u32(queries.len() as u32);
    for q in queries {
        b = b.u32(q.len() as u32).raw(q.as_bytes());
    }
    b.0
}

fn request(b: Bytes, command: u16, flags: u16, offset: u64, length: u32) -> Bytes {
    let cookie = b.0.len() as u64;
    b.raw(&proto::encode_request(&RequestHeader { flags, command, cookie, offset, length }))
}

/// A session a Linux-kernel-like client runs: READ, WRITE (FUA), TRIM, FLUSH, DISC.
fn kernel_requests(b: Bytes) -> Bytes {
    let b = request(b, cmd::READ, 0, 0, 4096);
    let b = request(b, cmd::WRITE, cmd_flags::FUA, 4096, 1024).raw(&[0xab; 1024]);
    let b = request(b, cmd::TRIM, 0, 8192, 8192);
    let b = request(b, cmd::FLUSH, 0, 0, 0);
    request(b, cmd::DISC, 0, 0, 0)
}

/// A qemu-like session: WRITE_ZEROES with its flags, CACHE, BLOCK_STATUS.
fn qemu_requests(b: Bytes) -> Bytes {
    let b = request(b, cmd::WRITE_ZEROES, cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO, 0, 65536);
    let b = request(b, cmd::CACHE, 0, 0, 65536);
    let b = request(b, cmd::BLOCK_STATUS, 0, 0, 1 << 20);
    let b = request(b, cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 512, 4096);
    let b = request(b, cmd::READ, cmd_flags::DF, 0, 512);
    request(b, cmd::DISC, 0, 0, 0)
}

/// Seeds of `nbd_handshake`: what real clients send.
pub fn handshake_seeds() -> Vec<Seed> {
    let flags = || Bytes::default().u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    let kernel = kernel_requests(option(flags(), opt::GO, &go_data(EXPORT, &[info::BLOCK_SIZE])));
    let all_info = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE, 99];
    let qemu = option(flags(), opt::STRUCTURED_REPLY, &[]);
    let qemu = option(qemu, opt::SET_META_CONTEXT, &meta_context_data(EXPORT, &[BASE_ALLOCATION]));
    let qemu = qemu_requests(option(qemu, opt::GO, &go_data(EXPORT, &all_info)));
    let list = option(flags(), opt::LIST, &[]);
    let list = option(list, opt::INFO, &go_data("", &all_info));
    let list = option(list, opt::LIST_META_CONTEXT, &meta_context_data("", &[]));
    let list = option(list, opt::LIST_META_CONTEXT, &meta_context_data(EXPORT, &["base:", "qemu:x"]));
    let list = option(list, opt::ABORT, &[]);
    let refused = option(flags(), opt::STARTTLS, &[]);
    let refused = option(refused, opt::INFO, &go_data("nope", &[]));
    let refused = option(refused, opt::SET_META_CONTEXT, &meta_context_data(EXPORT, &[BASE_ALLOCATION]));
    let refused = option(refused, opt::EXTENDED_HEADERS, &[]);
    let refused = option(refused, 1000, &[1, 2, 3]);
    // Announces more option data than is kept (skipped, then ERR_TOO_BIG).
    let refused = refused.u64(IHAVEOPT).u32(opt::INFO).u32(70_000).raw(&[0; 64]);
    let old =
        kernel_requests(option(Bytes::default().u32(client_flags::FIXED_NEWSTYLE), opt::EXPORT_NAME, b"r0"));
    vec![
        ("seed-kernel-go".into(), kernel.0),
        ("seed-qemu-structured".into(), qemu.0),
        ("seed-list-info-abort".into(), list.0),
        ("seed-refusals".into(), refused.0),
        ("seed-export-name".into(), old.0),
    ]
}

/// Seeds of `nbd_request`: export choices, then request streams.
pub fn request_seeds() -> Vec<Seed> {
    let with =
        |config: [u8; CONFIG_BYTES], requests: fn(Bytes) -> Bytes| requests(Bytes::default().raw(&config)).0;
    vec![
        ("seed-kernel".into(), with(ExportChoice::encode(false, false, false), kernel_requests)),
        ("seed-qemu".into(), with(ExportChoice::encode(true, false, false), qemu_requests)),
        ("seed-read-only".into(), with(ExportChoice::encode(false, true, true), kernel_requests)),
    ]
}

/// Seeds of `nbd_client`: what this server answers to the client's own handshake
/// (with a READ and a FLUSH after it) and to its export listing.
pub fn client_seeds() -> Vec<Seed> {
    let flags = || Bytes::default().u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    let go = option(flags(), opt::GO, &go_data(EXPORT, &[info::BLOCK_SIZE]));
    // The cookies `Client` uses: 1, 2, ...
    let go = go.raw(&proto::encode_request(&RequestHeader {
        flags: 0,
        command: cmd::READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }));
    let go = go.raw(&proto::encode_request(&RequestHeader {
        flags: 0,
        command: cmd::FLUSH,
        cookie: 2,
        offset: 0,
        length: 0,
    }));
    let list = option(option(flags(), opt::LIST, &[]), opt::ABORT, &[]);
    let answer = |client_bytes: Vec<u8>| {
        let (out, mut replies) = tokio::io::duplex(1 << 20);
        let info = ExportInfo { min_block_bytes: 512, ..ExportInfo::writable(1 << 20) };
        let _ = crate::block_on(serve_to(info, client_bytes, out));
        let mut bytes = Vec::new();
        crate::block_on(tokio::io::AsyncReadExt::read_to_end(&mut replies, &mut bytes)).expect("in memory");
        bytes
    };
    vec![("seed-go-read-flush".into(), answer(go.0)), ("seed-list".into(), answer(list.0))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_seeds_negotiate() {
        let seeds = client_seeds();
        let details = crate::block_on(client::handshake(
            &mut tokio::io::join(&seeds[0].1[..], tokio::io::sink()),
            EXPORT,
        ));
        assert_eq!(details.expect("a real server's answer").size_bytes, 1 << 20);
        let names =
            crate::block_on(client::list_exports(&mut tokio::io::join(&seeds[1].1[..], tokio::io::sink())));
        assert_eq!(names.expect("a real server's list"), vec![EXPORT.to_owned()]);
        for (_, s) in seeds {
            nbd_client(&s);
        }
    }

    #[test]
    fn seeds_reach_the_device() {
        let submitted = || SUBMITTED.load(Ordering::Relaxed);
        for (name, s) in handshake_seeds().into_iter().chain(request_seeds()) {
            let before = submitted();
            if name.starts_with("seed-list") || name.starts_with("seed-refusals") {
                nbd_handshake(&s);
                assert_eq!(submitted(), before, "{name}");
            } else {
                let run =
                    if request_seeds().iter().any(|(n, _)| *n == name) { nbd_request } else { nbd_handshake };
                run(&s);
                assert!(submitted() >= before + 2, "{name}: {} requests", submitted() - before);
            }
        }
    }
}
