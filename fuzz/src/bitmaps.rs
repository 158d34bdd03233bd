//! The bitmap crate's on-disk blocks: `Bitmap::decode` of a bits area and crc table
//! read from disk, `Bitmap::or_block` of blocks a peer sends at connect, and the
//! operations that follow them (set/clear ranges, runs, encoding back).
//!
//! Input: granularity byte (`1 << (12 + b % 9)`, or the byte itself when ≥ 0xf0: not
//! a valid granularity), device size (u64 little-endian, any value), a flags byte
//! (bit 0: the harness writes correct crcs), the bits area and the crc table (each a
//! little-endian u16 length and bytes), then operations of 17 bytes each: kind, and
//! two u64 arguments.
//!
//! Checks: no panic, no allocation beyond what the given areas justify; a decoded
//! map encodes back to the blocks it came from (with the bits past the device
//! cleared) and decodes again to the same map; after every operation the count,
//! `dirty_bytes` and the runs agree, runs are sorted, maximal and inside the device.

use bitmap::{BLOCK_BYTES, Bitmap};

use crate::Seed;

const HEADER_BYTES: usize = 10;
const OP_BYTES: usize = 17;

/// Target `bitmap_blocks`.
pub fn bitmap_blocks(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<HEADER_BYTES>() else { return };
    let granularity = match head[0] {
        g @ 0xf0.. => u64::from(g),
        g => 1 << (12 + g % 9),
    };
    let device_bytes = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
    let (bits, rest) = section(rest);
    let (crcs, ops) = section(rest);
    let mut crcs = crcs.to_vec();
    if head[9] & 1 != 0 {
        for (block, crc) in bits.chunks_exact(BLOCK_BYTES).zip(crcs.chunks_exact_mut(4)) {
            crc.copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
        }
    }
    let Ok(mut map) = Bitmap::decode(device_bytes, granularity, bits, &crcs) else { return };
    check_round_trip(&map, Some(bits));
    for op in ops.chunks_exact(OP_BYTES) {
        let a = u64::from_le_bytes(op[1..9].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(op[9..17].try_into().expect("8 bytes"));
        match op[0] % 4 {
            0 => map.set_range(a..b),
            1 => map.clear_range(a..b),
            2 => {
                // A peer's block: `b` picks which of the input's blocks (or all ones).
                let mut block = [0xffu8; BLOCK_BYTES];
                if let Some(chunk) = bits.chunks_exact(BLOCK_BYTES).nth(b as usize % 4) {
                    block.copy_from_slice(chunk);
                }
                let in_range = a < map.blocks();
                assert_eq!(map.or_block(a, &block), in_range, "or_block({a}) of {} blocks", map.blocks());
            }
            _ => {
                let from = a.min(map.device_bytes());
                if let Some(run) = map.runs_from(a).next() {
                    assert!(run.end > from, "run {run:?} from {a} ends before it");
                }
                assert_eq!(map.is_set(a), map.runs().any(|r| r.contains(&a)), "is_set({a})");
            }
        }
        check_runs(&map);
    }
    check_round_trip(&map, None);
}

/// A little-endian u16 length, then that many bytes (fewer if the input ends).
fn section(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return (&[], &[]) };
    rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()))
}

/// Runs agree with the count and stay inside the device, sorted and maximal.
fn check_runs(map: &Bitmap) {
    let mut total = 0;
    let mut last_end = None;
    for run in map.runs() {
        assert!(run.start < run.end && run.end <= map.device_bytes(), "run {run:?}");
        if let Some(end) = last_end {
            assert!(run.start > end, "runs not sorted and maximal: {run:?} after ..{end}");
        }
        last_end = Some(run.end);
        total += run.end - run.start;
    }
    assert_eq!(total, map.dirty_bytes(), "runs and dirty_bytes disagree");
    assert!(map.count_bits() <= map.len_bits());
    assert!(map.changed_blocks().all(|b| b < map.blocks()));
}

/// Encodes every block; compares with the source blocks (their bits past the device
/// cleared) and decodes the result to the same map.
fn check_round_trip(map: &Bitmap, source: Option<&[u8]>) {
    let blocks = map.blocks() as usize;
    let mut bits = vec![0u8; blocks * BLOCK_BYTES];
    let mut crcs = vec![0u8; blocks * 4];
    for (index, (out, crc)) in bits.chunks_exact_mut(BLOCK_BYTES).zip(crcs.chunks_exact_mut(4)).enumerate() {
        let out: &mut [u8; BLOCK_BYTES] = out.try_into().expect("a block");
        let c = map.encode_block(index as u64, out);
        assert_eq!(c, crc32c::crc32c(out), "encode_block's crc");
        crc.copy_from_slice(&c.to_le_bytes());
    }
    if let Some(source) = source {
        for (i, (ours, theirs)) in bits.iter().zip(source).enumerate() {
            let bit_index = i as u64 * 8;
            let keep = (0..8u64).fold(0u8, |m, b| m | u8::from(bit_index + b < map.len_bits()) << b);
            assert_eq!(*ours, theirs & keep, "byte {i} of the bits area changed in a decode/encode");
        }
    }
    let again = Bitmap::decode(map.device_bytes(), map.granularity_bytes(), &bits, &crcs)
        .expect("an encoded map decodes");
    assert!(again == *map, "decode(encode(map)) != map");
    assert_eq!(again.count_bits(), map.count_bits());
}

/// Seeds: bitmaps made by the crate's own encoder, with operations after them.
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, granularity_byte, device_bytes) in
        [("seed-4k-64m", 0u8, 64u64 << 20), ("seed-64k-odd", 4, (3 << 30) + 12345), ("seed-4k-tiny", 0, 4097)]
    {
        let granularity = 1u64 << (12 + granularity_byte % 9);
        let mut map = Bitmap::new(device_bytes, granularity).expect("a geometry");
        map.set_range(0..granularity * 3);
        map.set_range(device_bytes / 2..device_bytes / 2 + granularity * 100);
        map.set_range(device_bytes - 1..device_bytes);
        let mut bits = Vec::new();
        let mut crcs = Vec::new();
        for index in 0..map.blocks() {
            let mut out = [0u8; BLOCK_BYTES];
            crcs.extend_from_slice(&map.encode_block(index, &mut out).to_le_bytes());
            bits.extend_from_slice(&out);
        }
        let mut input = vec![granularity_byte];
        input.extend_from_slice(&device_bytes.to_le_bytes());
        input.push(0);
        for area in [&bits, &crcs] {
            input.extend_from_slice(&(area.len() as u16).to_le_bytes());
            input.extend_from_slice(area);
        }
        for (kind, a, b) in [(0u8, 5, 70_000), (1, 0, 1 << 20), (2, 0, 1), (3, device_bytes / 2, 0)] {
            input.push(kind);
            input.extend_from_slice(&u64::to_le_bytes(a));
            input.extend_from_slice(&u64::to_le_bytes(b));
        }
        seeds.push((name.to_owned(), input));
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode() {
        for (name, s) in seeds() {
            let (bits, rest) = section(&s[HEADER_BYTES..]);
            let (crcs, _) = section(rest);
            let g = 1 << (12 + s[0] % 9);
            let size = u64::from_le_bytes(s[1..9].try_into().expect("8"));
            assert!(Bitmap::decode(size, g, bits, crcs).is_ok(), "{name}");
            bitmap_blocks(&s);
        }
    }
}
