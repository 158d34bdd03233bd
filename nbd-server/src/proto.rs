//! Wire constants and fixed-size header codecs of the NBD protocol (fixed newstyle).
//!
//! Values are from the NBD protocol document (`doc/proto.md`); see
//! `shared/research/nbd-pacemaker.md` §1. All integers on the wire are big-endian.
//! The codecs here are pure functions over byte arrays so they can be fuzzed and
//! benchmarked without sockets.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client, 16 bits).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    pub const ERR_POLICY: u32 = 0x8000_0002;
    pub const ERR_INVALID: u32 = 0x8000_0003;
    pub const ERR_PLATFORM: u32 = 0x8000_0004;
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    pub const ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;

    /// True for the error reply types (high bit set).
    pub fn is_error(reply_type: u32) -> bool {
        reply_type & 0x8000_0000 != 0
    }
}

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (16 bits, sent with the export size).
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (16 bits).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this server knows of; anything else is EINVAL.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Structured reply flags and chunk types.
pub mod reply {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const TYPE_NONE: u16 = 0;
    pub const TYPE_OFFSET_DATA: u16 = 1;
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    pub const TYPE_ERROR: u16 = 0x8001;
    pub const TYPE_ERROR_OFFSET: u16 = 0x8002;
}

/// `base:allocation` status flags.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The only meta context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, description, meta context query) accepted on the wire.
pub const MAX_STRING_BYTES: usize = 4096;
/// Largest READ/WRITE payload: the protocol's 32 MiB, also advertised as the maximum.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// Length of a compact request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_BYTES: usize = 20;

/// A decoded compact request header (payload not included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The request header did not start with [`REQUEST_MAGIC`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

/// Decodes a 28-byte compact request header.
pub fn decode_request(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, BadMagic> {
    let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([bytes[4], bytes[5]]),
        command: u16::from_be_bytes([bytes[6], bytes[7]]),
        cookie: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes")),
    })
}

/// Encodes a compact request header (client side and tests).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.command.to_be_bytes());
    out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header.
pub fn encode_structured_header(
    cookie: u64,
    flags: u16,
    chunk_type: u16,
    payload_len: u32,
) -> [u8; STRUCTURED_HEADER_BYTES] {
    let mut out = [0u8; STRUCTURED_HEADER_BYTES];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// Encodes an option reply header (the payload of `len` bytes follows).
pub fn encode_option_reply(option: u32, reply_type: u32, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&reply_type.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let h = RequestHeader {
            flags: cmd_flags::FUA,
            command: cmd::WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(decode_request(&encode_request(&h)), Ok(h));
    }

    #[test]
    fn bad_request_magic_is_reported() {
        let mut b =
            encode_request(&RequestHeader { flags: 0, command: cmd::READ, cookie: 1, offset: 0, length: 1 });
        b[0] = 0;
        assert_eq!(decode_request(&b), Err(BadMagic(0x0060_9513)));
    }

    #[test]
    fn header_layouts_match_the_spec() {
        assert_eq!(&encode_simple_reply(7, 22)[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]);
        let s = encode_structured_header(1, reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 9);
        assert_eq!(&s[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1]);
        assert_eq!(&s[16..], &[0, 0, 0, 9]);
        let o = encode_option_reply(opt::GO, rep::ERR_POLICY, 3);
        assert_eq!(&o[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&o[12..16], &[0x80, 0, 0, 2]);
    }
}
