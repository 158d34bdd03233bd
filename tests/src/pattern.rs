//! Self-describing block patterns shared by [`crate::loadgen`] and
//! [`crate::chain`], and block readers/writers for verification (over NBD or
//! straight from a backing file).
//!
//! Block layout (big-endian), `len` bytes in all, `len >= 64`:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic (which tool wrote it) |
//! | 8..16 | run id (one per `LoadGen`/`ChainWriter`: tells runs apart on one disk) |
//! | 16..24 | `a`: writer id (loadgen) / sequence number k (chain) |
//! | 24..32 | `b`: per-writer seq (loadgen) / previous k, `u64::MAX` for none (chain) |
//! | 32..40 | absolute block index (byte offset / `len`) |
//! | 40..44 | `len` |
//! | 44..48 | CRC-32 (IEEE) of bytes 0..44 and 48..len |
//! | 48..len | filler derived from (magic, run, a, b) |

use std::cell::RefCell;
use std::fmt;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::daemon::Addr;
use crate::raw::{CMD_READ, RawClient, Reply};

/// Header bytes before the filler.
pub const HEADER_BYTES: usize = 48;
/// Smallest block a pattern fits in.
pub const MIN_BLOCK_BYTES: u32 = 64;

const CRC_AT: usize = 44;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, as zlib) continued from `crc` (start with 0).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// splitmix64: a tiny deterministic generator (state advanced in place).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A test's seed: `BLOCKD_FUZZ_SEED` when set, else a random one; printed with the
/// line that replays it.
pub fn random_seed() -> u64 {
    let seed =
        std::env::var("BLOCKD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with BLOCKD_FUZZ_SEED={seed})");
    seed
}

/// A fresh run id: unique per call within a process and (with high
/// probability) across processes; mixes `seed` so runs stay recognisable.
pub fn new_run_id(seed: u64) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut s = seed ^ nanos ^ ((std::process::id() as u64) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
    splitmix64(&mut s)
}

/// The decoded header of a block (whatever its CRC says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub magic: [u8; 8],
    pub run: u64,
    pub a: u64,
    pub b: u64,
    pub block: u64,
    pub len: u32,
}

impl fmt::Display for RawHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} run={:#018x} a={} b={} block={} len={}",
            String::from_utf8_lossy(&self.magic),
            self.run,
            self.a,
            self.b,
            self.block,
            self.len
        )
    }
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// All zeros (never written, trimmed, or lost).
    Zeros,
    /// No known magic: the first bytes in hex.
    Garbage(String),
    /// A known magic but the CRC (or the length field) does not match: a
    /// torn or corrupted block.
    BadCrc(RawHeader),
    /// A well-formed pattern.
    Valid(RawHeader),
}

impl fmt::Display for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decoded::Zeros => write!(f, "zeros"),
            Decoded::Garbage(h) => write!(f, "garbage (first bytes {h})"),
            Decoded::BadCrc(h) => write!(f, "corrupt block (bad CRC): {h}"),
            Decoded::Valid(h) => write!(f, "{h}"),
        }
    }
}

fn filler_key(magic: &[u8; 8], run: u64, a: u64, b: u64) -> u64 {
    let mut s = u64::from_be_bytes(*magic) ^ run.rotate_left(17) ^ a.rotate_left(31) ^ b.rotate_left(47);
    splitmix64(&mut s)
}

/// Encodes a pattern block of `len` bytes into `buf` (resized).
pub fn encode(buf: &mut Vec<u8>, len: u32, magic: &[u8; 8], run: u64, a: u64, b: u64, block: u64) {
    assert!(len >= MIN_BLOCK_BYTES, "block of {len} bytes: a pattern needs at least {MIN_BLOCK_BYTES}");
    buf.clear();
    buf.resize(len as usize, 0);
    buf[0..8].copy_from_slice(magic);
    buf[8..16].copy_from_slice(&run.to_be_bytes());
    buf[16..24].copy_from_slice(&a.to_be_bytes());
    buf[24..32].copy_from_slice(&b.to_be_bytes());
    buf[32..40].copy_from_slice(&block.to_be_bytes());
    buf[40..44].copy_from_slice(&len.to_be_bytes());
    let mut s = filler_key(magic, run, a, b);
    for chunk in buf[HEADER_BYTES..].chunks_mut(8) {
        let v = splitmix64(&mut s).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = crc32_update(crc32(&buf[..CRC_AT]), &buf[HEADER_BYTES..]);
    buf[CRC_AT..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
}

/// A freshly allocated pattern block.
pub fn pattern(len: u32, magic: &[u8; 8], run: u64, a: u64, b: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::new();
    encode(&mut v, len, magic, run, a, b, block);
    v
}

/// Decodes `data` as a block written with one of `magics`.
pub fn decode(data: &[u8], magics: &[&[u8; 8]]) -> Decoded {
    if data.iter().all(|&b| b == 0) {
        return Decoded::Zeros;
    }
    let known = data.len() >= HEADER_BYTES && magics.iter().any(|m| data[..8] == m[..]);
    if !known {
        let n = data.len().min(16);
        return Decoded::Garbage(data[..n].iter().map(|b| format!("{b:02x}")).collect());
    }
    let g = |i: usize| u64::from_be_bytes(data[i..i + 8].try_into().expect("8 bytes"));
    let h = RawHeader {
        magic: data[..8].try_into().expect("8 bytes"),
        run: g(8),
        a: g(16),
        b: g(24),
        block: g(32),
        len: u32::from_be_bytes(data[40..44].try_into().expect("4 bytes")),
    };
    let stored = u32::from_be_bytes(data[CRC_AT..HEADER_BYTES].try_into().expect("4 bytes"));
    let crc = crc32_update(crc32(&data[..CRC_AT]), &data[HEADER_BYTES..]);
    if crc != stored || h.len as usize != data.len() { Decoded::BadCrc(h) } else { Decoded::Valid(h) }
}

/// Reads `block_bytes`-sized blocks (absolute index) from a file (a backing
/// store whose data starts at offset 0, or an image copy). Panics on I/O
/// errors: a verifier that cannot read has nothing to say.
pub fn file_reader(path: &Path, block_bytes: u32) -> impl FnMut(u64) -> Vec<u8> + use<> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let name = path.display().to_string();
    move |block| {
        let mut buf = vec![0u8; block_bytes as usize];
        let off = block * block_bytes as u64;
        f.read_exact_at(&mut buf, off).unwrap_or_else(|e| panic!("read {name} at {off}: {e}"));
        buf
    }
}

/// Reads blocks (absolute index) over one NBD connection to `export` at
/// `addr` (simple replies). Panics on connection or NBD errors.
pub fn nbd_reader(addr: &Addr, export: &str, block_bytes: u32) -> impl FnMut(u64) -> Vec<u8> + use<> {
    let (c, size, _) = RawClient::handshake(addr, export, false);
    let c = RefCell::new(c);
    let mut cookie = 0u64;
    move |block| {
        cookie += 1;
        let off = block * block_bytes as u64;
        assert!(off + block_bytes as u64 <= size, "block {block} is past the end of the export ({size})");
        let mut c = c.borrow_mut();
        c.request(0, CMD_READ, cookie, off, block_bytes, &[])
            .unwrap_or_else(|e| panic!("send READ at {off}: {e}"));
        match c.read_reply().unwrap_or_else(|e| panic!("READ reply at {off}: {e}")) {
            Reply::Simple { error: 0, cookie: got } if got == cookie => {}
            r => panic!("READ at {off}: unexpected reply {r:?}"),
        }
        let mut buf = vec![0u8; block_bytes as usize];
        c.read_exact(&mut buf).unwrap_or_else(|e| panic!("READ data at {off}: {e}"));
        buf
    }
}

/// Overwrites `data.len()` bytes at block `block` of a file (for
/// corrupting a backing store in negative tests).
pub fn write_block_file(path: &Path, block_bytes: u32, block: u64, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, block * block_bytes as u64)
        .unwrap_or_else(|e| panic!("write {} block {block}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn roundtrip_and_corruption() {
        let m = b"TESTMAGC";
        let p = pattern(4096, m, 7, 1, 2, 3);
        assert_eq!(
            decode(&p, &[m]),
            Decoded::Valid(RawHeader { magic: *m, run: 7, a: 1, b: 2, block: 3, len: 4096 })
        );
        for at in [0usize, 20, 45, 100, 4095] {
            let mut q = p.clone();
            q[at] ^= 0x10;
            match decode(&q, &[m]) {
                Decoded::BadCrc(_) | Decoded::Garbage(_) => {}
                d => panic!("flip at {at} decoded as {d}"),
            }
        }
        assert_eq!(decode(&[0u8; 4096], &[m]), Decoded::Zeros);
        assert!(matches!(decode(&[1u8; 4096], &[m]), Decoded::Garbage(_)));
        // Same header, another writer: different filler.
        assert_ne!(pattern(4096, m, 7, 1, 2, 3)[64..], pattern(4096, m, 7, 1, 3, 3)[64..]);
    }
}
