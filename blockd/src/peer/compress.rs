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
//! - A failed attempt still costs the CPU of compressing, and a stream of
//!   incompressible data (a LUKS device on top of blockd, media, backups of
//!   compressed files) fails every time. So after [`SKIP_AFTER_FAILURES`] failures
//!   in a row the next payloads go raw without an attempt, up to as many bytes as
//!   the failed one had, then twice as many after the next failure, and so on up
//!   to [`MAX_SKIP_FACTOR`] times; the first success ends it. A payload larger than
//!   what is left to skip is tried. An incompressible stream then pays for about
//!   one attempt per 65 payloads' worth of bytes. A mixed stream (a file system
//!   with some compressed files) rarely fails that many times in a row, so it
//!   keeps its ratio: measured with skipping after every single failure, ext4
//!   with ordinary files sent 18% more bytes.
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
/// Failed attempts in a row before payloads go raw without an attempt.
pub(crate) const SKIP_AFTER_FAILURES: u32 = 8;
/// After failed attempts in a row, at most this many times the failed payload's
/// bytes go raw without an attempt.
pub(crate) const MAX_SKIP_FACTOR: u64 = 64;

/// The writer's compressor: one zstd context at the configured level.
pub(crate) struct Packer {
    ctx: zstd::bulk::Compressor<'static>,
    /// Bytes of payloads still to send raw without an attempt.
    skip_left_bytes: u64,
    /// Times the failed payload's bytes to skip after the next failure: 1 after a
    /// success, doubling with each failure in a row past the first
    /// [`SKIP_AFTER_FAILURES`].
    skip_factor: u64,
    /// Failed attempts since the last success.
    failures_in_a_row: u32,
}

impl Packer {
    /// A context at `level`; `None` (logged) if zstd cannot make one: the link then
    /// sends everything raw, which the peer reads just as well.
    pub(crate) fn new(level: i32) -> Option<Packer> {
        match zstd::bulk::Compressor::new(level) {
            Ok(ctx) => Some(Packer { ctx, skip_left_bytes: 0, skip_factor: 1, failures_in_a_row: 0 }),
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
    /// largest batch seen, so in steady state nothing is allocated here. After
    /// failed attempts, payloads go raw without one for a while (module doc).
    pub(crate) fn pack(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        if data.len() < MIN_COMPRESS_BYTES {
            return None;
        }
        let len_bytes = data.len() as u64;
        if len_bytes <= self.skip_left_bytes {
            self.skip_left_bytes -= len_bytes;
            return None;
        }
        let packed = self.attempt(data, out);
        if packed.is_some() {
            self.skip_left_bytes = 0;
            self.skip_factor = 1;
            self.failures_in_a_row = 0;
        } else {
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            if self.failures_in_a_row >= SKIP_AFTER_FAILURES {
                self.skip_left_bytes = len_bytes * self.skip_factor;
                self.skip_factor = (self.skip_factor * 2).min(MAX_SKIP_FACTOR);
            }
        }
        packed
    }

    fn attempt(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
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
        // The context is still good after a failure (once the skip after it is over).
        // The context is still good after a failure, and one failure skips nothing.
        assert!(p.pack(&text(4096), &mut out).is_some());
    }

    /// After SKIP_AFTER_FAILURES failed attempts in a row, payloads go raw without
    /// one for 1, 2, 4, ... up to MAX_SKIP_FACTOR times the failed payload's bytes;
    /// a larger payload is tried; a success ends the skipping.
    #[test]
    fn failures_in_a_row_skip_more_bytes_and_a_success_resets() {
        let mut p = Packer::new(3).expect("context");
        let mut random = vec![0u8; 4096];
        StdRng::seed_from_u64(9).fill_bytes(&mut random);
        let (text, mut out) = (text(4096), Vec::new());
        // How many 4 KiB compressible payloads go raw after `failures` failed
        // attempts in a row (each failure is attempted once the skip before it is
        // over: random payloads are fed until one is tried).
        let mut after_failures = |p: &mut Packer, failures: u32| {
            for _ in 0..failures {
                while p.skip_left_bytes > 0 {
                    assert_eq!(p.pack(&random, &mut out), None);
                }
                assert_eq!(p.pack(&random, &mut out), None);
            }
            let mut skipped = 0;
            while p.pack(&text, &mut out).is_none() {
                skipped += 1;
                assert!(skipped <= MAX_SKIP_FACTOR, "never compressed again");
            }
            skipped
        };
        let n = SKIP_AFTER_FAILURES;
        assert_eq!(after_failures(&mut p, n - 1), 0, "fewer failures in a row skip nothing");
        assert_eq!(after_failures(&mut p, n), 1);
        assert_eq!(after_failures(&mut p, n + 1), 2, "the success before reset the count");
        assert_eq!(after_failures(&mut p, n + 2), 4);
        assert_eq!(after_failures(&mut p, n + 9), MAX_SKIP_FACTOR, "bounded");
        assert_eq!(after_failures(&mut p, n), 1);
        // A payload larger than what is left to skip (4 KiB after n failures of 4
        // KiB) is tried at once.
        for _ in 0..n {
            assert_eq!(p.pack(&random, &mut out), None);
        }
        assert_eq!(p.skip_left_bytes, 4096);
        assert!(p.pack(&super::tests::text(8192), &mut out).is_some(), "8 KiB with 4 KiB left to skip");
        assert!(!out.is_empty(), "the compressed payloads were appended");
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
