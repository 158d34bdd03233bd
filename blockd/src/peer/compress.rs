//! zstd for the data of `Write` and `ResyncData` frames (issue 15; the layout is in
//! `peer::msg`'s module doc). One context each way per link, made once and reused:
//! the writer task compresses ([`Packer`]), the reader task decompresses
//! ([`Unpacker`]), so neither costs the replication core any time.
//!
//! - A payload goes compressed only if that makes its frame smaller (compressed
//!   bytes plus the 4-byte length below the raw length), so compression never costs
//!   bandwidth: incompressible data (encrypted, already compressed) goes raw, after
//!   one failed attempt (zstd gives up early on such data: its blocks go raw
//!   inside the zstd frame, which then overflows the output bound).
//! - Decompression writes into a buffer of exactly the length the frame declares
//!   (which the receive budget was charged for before anything was read), and zstd
//!   never writes past it: a "bomb" fails like corrupt data, with no allocation
//!   beyond the declared length. The single-shot API decompresses into that flat
//!   buffer with no window buffer of its own, whatever window a frame claims.

use std::io::Cursor;

/// Bytes of the uncompressed-length field after a compressed frame's fixed part.
pub(crate) const RAW_LEN_BYTES: usize = 4;
/// Data shorter than this goes raw: there is little to gain and a context call to pay.
pub(crate) const MIN_COMPRESS_BYTES: usize = 256;

/// The writer's compressor: one zstd context at the configured level.
pub(crate) struct Packer {
    ctx: zstd::bulk::Compressor<'static>,
}

impl Packer {
    /// A context at `level`; `None` (logged) if zstd cannot make one: the link then
    /// sends everything raw, which the peer reads just as well.
    pub(crate) fn new(level: i32) -> Option<Packer> {
        match zstd::bulk::Compressor::new(level) {
            Ok(ctx) => Some(Packer { ctx }),
            Err(e) => {
                tracing::warn!(
                    level,
                    "cannot create a zstd context ({e}); this link sends data uncompressed"
                );
                None
            }
        }
    }

    /// Appends `data` compressed to `out` and returns the compressed length, if that
    /// makes the frame smaller; otherwise leaves `out` as it was and returns `None`
    /// (send it raw). `out` is the writer's batch buffer: it only grows to the
    /// largest batch seen, so in steady state nothing is allocated here.
    pub(crate) fn pack(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        if data.len() < MIN_COMPRESS_BYTES {
            return None;
        }
        let start = out.len();
        // Room for a result of the raw length: a larger one is useless anyway.
        out.reserve(data.len());
        let mut tail = Cursor::new(&mut *out);
        tail.set_position(start as u64);
        match self.ctx.compress_to_buffer(data, &mut tail) {
            Ok(n) if n + RAW_LEN_BYTES < data.len() => Some(n),
            _ => {
                out.truncate(start);
                None
            }
        }
    }
}

/// The reader's decompressor: one zstd context.
pub(crate) struct Unpacker {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl Unpacker {
    pub(crate) fn new() -> std::io::Result<Unpacker> {
        Ok(Unpacker { ctx: zstd::bulk::Decompressor::new()? })
    }

    /// Decompresses `src` into all of `dst`: `Err` (what is wrong, for the bad-frame
    /// error) if it is not zstd, is corrupt, or does not come to exactly `dst.len()`
    /// bytes. Never writes past `dst`.
    pub(crate) fn unpack(&mut self, src: &[u8], dst: &mut [u8]) -> Result<(), &'static str> {
        match self.ctx.decompress_to_buffer(src, dst) {
            Ok(n) if n == dst.len() => Ok(()),
            Ok(_) => Err("compressed data is shorter than its declared length"),
            Err(_) => Err("compressed data is corrupt or longer than its declared length"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngCore, SeedableRng};

    use super::*;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog; ".iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn text_shrinks_and_comes_back_whole() {
        let mut p = Packer::new(3).expect("context");
        let mut out = b"earlier frame".to_vec();
        let data = text(64 << 10);
        let n = p.pack(&data, &mut out).expect("text compresses");
        assert!(n * 20 < data.len(), "{n}");
        assert_eq!(out.len(), 13 + n);
        assert_eq!(&out[..13], b"earlier frame", "appends, keeps what was there");
        let mut back = vec![0u8; data.len()];
        Unpacker::new().unwrap().unpack(&out[13..], &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn incompressible_or_tiny_data_goes_raw() {
        let mut p = Packer::new(19).expect("context");
        let mut random = vec![0u8; 1 << 20];
        StdRng::seed_from_u64(7).fill_bytes(&mut random);
        let mut out = vec![1, 2, 3];
        assert_eq!(p.pack(&random, &mut out), None);
        assert_eq!(p.pack(&[0u8; MIN_COMPRESS_BYTES - 1], &mut out), None);
        assert_eq!(out, [1, 2, 3], "a failed attempt leaves nothing behind");
        // The context is still good after a failure.
        assert!(p.pack(&text(4096), &mut out).is_some());
    }

    #[test]
    fn wrong_lengths_garbage_and_bombs_are_refused() {
        let mut p = Packer::new(1).expect("context");
        let data = vec![0u8; 1 << 20];
        let mut z = Vec::new();
        let n = p.pack(&data, &mut z).unwrap();
        assert_eq!(n, z.len());
        let mut u = Unpacker::new().unwrap();
        // Declared shorter than the content: a bomb against a small buffer.
        let mut small = vec![0u8; 4096];
        assert!(u.unpack(&z, &mut small).unwrap_err().contains("longer"));
        // Declared longer than the content.
        let mut big = vec![0u8; (1 << 20) + 1];
        assert!(u.unpack(&z, &mut big).unwrap_err().contains("shorter"));
        // Garbage, and a truncated frame.
        let mut dst = vec![0u8; 1 << 20];
        assert!(u.unpack(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], &mut dst).is_err());
        assert!(u.unpack(&z[..z.len() / 2], &mut dst).is_err());
        assert!(u.unpack(&[], &mut dst).is_err());
        // The context is still good.
        u.unpack(&z, &mut dst).unwrap();
        assert!(dst.iter().all(|&b| b == 0));
    }
}
