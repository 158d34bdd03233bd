//! Unit tests: edge cases, a randomized model check, persistence and a 1 TiB bitmap.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{BITS_PER_BLOCK, BLOCK_BYTES, Bitmap, BitmapError};

const K4: u64 = 4096;

fn runs(map: &Bitmap) -> Vec<Range<u64>> {
    map.runs().collect()
}

/// A device of 10 granules of 4 KiB plus a 1000-byte tail granule.
fn small() -> Bitmap {
    let mut map = Bitmap::new(10 * K4 + 1000, K4).unwrap();
    map.mark_persisted();
    map
}

#[test]
fn geometry_and_bad_granularity() {
    let map = small();
    assert_eq!((map.device_bytes(), map.granularity_bytes(), map.len_bits()), (10 * K4 + 1000, K4, 11));
    for g in [0, 2048, 4095, 6144, 2 << 20] {
        assert!(
            matches!(Bitmap::new(1 << 30, g), Err(BitmapError::BadGranularity { granularity_bytes }) if granularity_bytes == g)
        );
    }
    for g in [4096, 8192, 1 << 20] {
        assert!(Bitmap::new(1 << 30, g).is_ok());
    }
    let empty = Bitmap::new(0, K4).unwrap();
    assert_eq!((empty.len_bits(), empty.count_bits(), empty.runs().count()), (0, 0, 0));
    assert_eq!(Bitmap::on_disk_bytes(0, K4), (0, 0));
}

#[test]
fn set_range_edges() {
    let mut map = small();
    map.set_range(5..5);
    #[allow(clippy::reversed_empty_ranges)] // deliberately reversed
    map.set_range(7..3);
    assert_eq!(map.count_bits(), 0, "empty ranges set nothing");
    map.set_range(K4 - 1..K4 + 1); // straddles granules 0 and 1
    assert_eq!(runs(&map), vec![0..2 * K4]);
    assert!(map.is_set(0) && map.is_set(2 * K4 - 1) && !map.is_set(2 * K4));
    map.set_range(10 * K4 + 999..u64::MAX); // last partial granule, clamped
    assert_eq!(runs(&map), vec![0..2 * K4, 10 * K4..10 * K4 + 1000]);
    assert_eq!(map.dirty_bytes(), 2 * K4 + 1000);
    assert!(!map.is_set(10 * K4 + 1000), "past the device end");
    map.set_range(20 * K4..30 * K4); // wholly past the end
    assert_eq!(map.count_bits(), 3);
}

#[test]
fn clear_range_edges() {
    let mut map = small();
    map.set_all();
    assert_eq!(map.dirty_bytes(), map.device_bytes());
    map.clear_range(1..K4 * 2 - 1); // touches granules 0 and 1, covers neither
    assert_eq!(map.count_bits(), 11);
    map.clear_range(1..K4 * 3); // covers granules 1 and 2 fully
    assert_eq!(runs(&map), vec![0..K4, 3 * K4..10 * K4 + 1000]);
    map.clear_range(10 * K4..10 * K4 + 999); // partial tail granule not fully covered
    assert!(map.is_set(10 * K4));
    map.clear_range(10 * K4..u64::MAX); // reaching the device end covers the tail granule
    assert!(!map.is_set(10 * K4));
    map.clear_range(9 * K4 + 1..10 * K4 + 1000); // granule 9 only partly covered
    assert!(map.is_set(9 * K4));
    map.clear_range(4 * K4..4 * K4); // empty
    assert_eq!(map.count_bits(), 8);
    map.clear_all();
    assert_eq!((map.count_bits(), map.dirty_bytes()), (0, 0));
}

#[test]
fn runs_merge_and_are_maximal() {
    let mut map = Bitmap::new(1 << 30, K4).unwrap();
    map.set_range(0..K4);
    map.set_range(K4..2 * K4);
    map.set_range(2 * K4 + 5..2 * K4 + 6);
    map.set_range(10 * K4..11 * K4);
    // Runs crossing 64-bit words and a 4 KiB block boundary.
    map.set_range(60 * K4..70 * K4);
    map.set_range((BITS_PER_BLOCK - 3) * K4..(BITS_PER_BLOCK + 200) * K4);
    map.set_range((1 << 30) - K4..1 << 30);
    assert_eq!(
        runs(&map),
        vec![
            0..3 * K4,
            10 * K4..11 * K4,
            60 * K4..70 * K4,
            (BITS_PER_BLOCK - 3) * K4..(BITS_PER_BLOCK + 200) * K4,
            (1 << 30) - K4..1 << 30,
        ]
    );
    map.set_all();
    assert_eq!(runs(&map), vec![0..1 << 30]);
}

#[test]
fn runs_from_resumes() {
    let mut map = small();
    map.set_range(2 * K4..5 * K4);
    map.set_range(8 * K4..u64::MAX);
    assert_eq!(map.runs_from(0).collect::<Vec<_>>(), runs(&map));
    assert_eq!(map.runs_from(3 * K4 + 7).collect::<Vec<_>>(), vec![3 * K4..5 * K4, 8 * K4..10 * K4 + 1000]);
    assert_eq!(map.runs_from(5 * K4).collect::<Vec<_>>(), vec![8 * K4..10 * K4 + 1000]);
    assert_eq!(map.runs_from(10 * K4 + 999).collect::<Vec<_>>(), vec![10 * K4..10 * K4 + 1000]);
    assert_eq!(map.runs_from(10 * K4 + 1000).count(), 0);
    assert_eq!(map.runs_from(u64::MAX).count(), 0);
}

#[test]
fn union_merges_and_checks_geometry() {
    let mut a = Bitmap::new(1 << 30, K4).unwrap();
    let mut b = Bitmap::new(1 << 30, K4).unwrap();
    a.set_range(0..K4);
    b.set_range(K4..3 * K4);
    b.set_range((BITS_PER_BLOCK * 2) * K4..(BITS_PER_BLOCK * 2 + 1) * K4);
    a.mark_persisted();
    a.union_with(&b).unwrap();
    assert_eq!(runs(&a), vec![0..3 * K4, BITS_PER_BLOCK * 2 * K4..(BITS_PER_BLOCK * 2 + 1) * K4]);
    assert_eq!(a.changed_blocks().collect::<Vec<_>>(), vec![0, 2]);
    a.mark_persisted();
    a.union_with(&b).unwrap();
    assert_eq!(a.changed_blocks().count(), 0, "a no-op union changes no block");
    for other in [Bitmap::new(1 << 29, K4).unwrap(), Bitmap::new(1 << 30, 8192).unwrap()] {
        assert!(matches!(a.union_with(&other), Err(BitmapError::GeometryMismatch { .. })));
    }
}

/// Applies random set/clear ranges to a bitmap and to a `Vec<bool>` model and compares.
#[test]
fn randomized_against_model() {
    let mut rng = StdRng::seed_from_u64(0x5eed_b17a);
    for round in 0..40 {
        let g = K4 << rng.random_range(0..3);
        let device = rng.random_range(1..300 * K4);
        let mut map = Bitmap::new(device, g).unwrap();
        let len = device.div_ceil(g) as usize;
        let mut model = vec![false; len];
        for _ in 0..200 {
            let a = rng.random_range(0..device + 3 * g);
            let b = rng.random_range(0..device + 3 * g);
            let (s, e) = (a.min(b), a.max(b));
            if rng.random_bool(0.5) {
                map.set_range(s..e);
                let e = e.min(device);
                if s < e {
                    model[(s / g) as usize..e.div_ceil(g) as usize].fill(true);
                }
            } else {
                map.clear_range(s..e);
                for (i, bit) in model.iter_mut().enumerate() {
                    let (gs, ge) = (i as u64 * g, ((i as u64 + 1) * g).min(device));
                    if s <= gs && ge <= e {
                        *bit = false;
                    }
                }
            }
            assert_eq!(map.count_bits(), model.iter().filter(|b| **b).count() as u64, "round {round}");
        }
        let mut expect = Vec::new();
        let mut i = 0;
        while i < len {
            if model[i] {
                let start = i;
                while i < len && model[i] {
                    i += 1;
                }
                expect.push(start as u64 * g..(i as u64 * g).min(device));
            } else {
                i += 1;
            }
        }
        assert_eq!(runs(&map), expect, "round {round}");
        assert_eq!(map.dirty_bytes(), expect.iter().map(|r| r.end - r.start).sum::<u64>());
        for probe in (0..device).step_by(997) {
            assert_eq!(map.is_set(probe), model[(probe / g) as usize]);
        }
    }
}

/// Encodes every changed block into the two areas, as a caller would write them.
fn persist(map: &mut Bitmap, bits: &mut [u8], crcs: &mut [u8]) {
    let mut block_buf = [0u8; BLOCK_BYTES];
    for block in map.changed_blocks().collect::<Vec<_>>() {
        let crc = map.encode_block(block, &mut block_buf);
        let at = block as usize * BLOCK_BYTES;
        bits[at..at + BLOCK_BYTES].copy_from_slice(&block_buf);
        crcs[block as usize * 4..block as usize * 4 + 4].copy_from_slice(&crc.to_le_bytes());
    }
    map.mark_persisted();
}

#[test]
fn encode_decode_round_trip_and_format() {
    let device = 3 * BITS_PER_BLOCK * K4 + 5 * K4 + 100; // 4 blocks, last one short, partial tail granule
    let (bits_len, crc_len) = Bitmap::on_disk_bytes(device, K4);
    assert_eq!((bits_len, crc_len), (4 * 4096, 4096));
    let mut map = Bitmap::new(device, K4).unwrap();
    assert_eq!(map.changed_blocks().collect::<Vec<_>>(), vec![0, 1, 2, 3], "new: everything unwritten");
    map.set_range(0..1);
    map.set_range(65 * K4..66 * K4);
    map.set_range(device - 1..device);
    map.set_range(BITS_PER_BLOCK * K4 + 7..BITS_PER_BLOCK * K4 * 2);
    let (mut bits, mut crcs) = (vec![0u8; bits_len as usize], vec![0u8; crc_len as usize]);
    persist(&mut map, &mut bits, &mut crcs);
    // Documented layout: bit i = bit i % 64 of LE u64 word i / 64.
    assert_eq!(bits[0], 1);
    assert_eq!(bits[8], 0b10, "bit 65 is bit 1 of word 1");
    let decoded = Bitmap::decode(device, K4, &bits, &crcs).unwrap();
    assert_eq!(decoded, map);
    assert_eq!(decoded.changed_blocks().count(), 0);
    assert_eq!(runs(&decoded), runs(&map));
    // Longer areas are fine; short ones are not.
    let mut long_bits = bits.clone();
    long_bits.extend_from_slice(&[0xff; 100]);
    assert_eq!(Bitmap::decode(device, K4, &long_bits, &crcs).unwrap(), map);
    assert!(matches!(
        Bitmap::decode(device, K4, &bits[..bits.len() - 1], &crcs),
        Err(BitmapError::Truncated { area: "bits", .. })
    ));
    assert!(matches!(
        Bitmap::decode(device, K4, &bits, &crcs[..15]),
        Err(BitmapError::Truncated { area: "crc", .. })
    ));
    // A never-written (zeroed) area does not pass.
    let zeros = vec![0u8; bits_len as usize];
    assert!(matches!(Bitmap::decode(device, K4, &zeros, &crcs), Err(BitmapError::Corrupt { block: 0, .. })));
}

/// Found by the `bitmap_blocks` fuzz target: decode sized its map from the claimed
/// device size before looking at the areas, so a huge size with short areas asked
/// for a bitmap of petabytes (an abort, not an error).
#[test]
fn decode_checks_the_areas_before_allocating() {
    for (device, g) in [(1u64 << 63, K4), (0xff00_0000_c000_3039, 1 << 16), (u64::MAX, K4)] {
        assert!(
            matches!(
                Bitmap::decode(device, g, &[0; 4096], &[0; 4]),
                Err(BitmapError::Truncated { area: "bits", .. })
            ),
            "{device} @ {g}"
        );
    }
    let (bits_len, _) = Bitmap::on_disk_bytes(1 << 40, K4);
    let bits = vec![0u8; bits_len as usize];
    assert!(matches!(
        Bitmap::decode(1 << 40, K4, &bits, &[]),
        Err(BitmapError::Truncated { area: "crc", .. })
    ));
    assert!(matches!(Bitmap::decode(1 << 30, 0, &[], &[]), Err(BitmapError::BadGranularity { .. })));
}

#[test]
fn flipped_bits_are_detected_per_block() {
    let device = 4 * BITS_PER_BLOCK * K4;
    let (bits_len, crc_len) = Bitmap::on_disk_bytes(device, K4);
    let mut map = Bitmap::new(device, K4).unwrap();
    map.set_range(12345 * K4..99999 * K4);
    let (mut bits, mut crcs) = (vec![0u8; bits_len as usize], vec![0u8; crc_len as usize]);
    persist(&mut map, &mut bits, &mut crcs);
    for block in 0..4u64 {
        let mut bad = bits.clone();
        bad[block as usize * BLOCK_BYTES + 777] ^= 0x10;
        match Bitmap::decode(device, K4, &bad, &crcs) {
            Err(BitmapError::Corrupt { block: b, expected, found }) => {
                assert_eq!(b, block);
                assert_eq!(expected.to_le_bytes(), crcs[block as usize * 4..][..4]);
                assert_ne!(expected, found);
            }
            other => panic!("block {block}: {other:?}"),
        }
        let mut bad = crcs.clone();
        bad[block as usize * 4 + 2] ^= 0x01;
        assert!(matches!(
            Bitmap::decode(device, K4, &bits, &bad),
            Err(BitmapError::Corrupt { block: b, .. }) if b == block
        ));
    }
}

#[test]
fn changed_blocks_track_exactly_the_touched_blocks() {
    let per_block = BITS_PER_BLOCK * K4; // device bytes covered by one on-disk block
    let mut map = Bitmap::new(10 * per_block, K4).unwrap();
    map.mark_persisted();
    assert_eq!(map.changed_blocks().count(), 0);
    map.set_range(per_block - K4..per_block + 1); // last granule of block 0, first of block 1
    map.set_range(5 * per_block + 3..5 * per_block + 4);
    map.clear_range(8 * per_block..8 * per_block + K4 - 1); // covers no granule: no change
    map.clear_range(9 * per_block..9 * per_block + K4);
    assert_eq!(map.changed_blocks().collect::<Vec<_>>(), vec![0, 1, 5, 9]);
    map.mark_persisted();
    assert_eq!(map.changed_blocks().count(), 0);
    map.set_range(2 * per_block..4 * per_block);
    assert_eq!(map.changed_blocks().collect::<Vec<_>>(), vec![2, 3]);
    map.mark_persisted();
    map.clear_all();
    assert_eq!(map.changed_blocks().count(), 10);
}

#[test]
fn one_tib_at_4k_is_fast() {
    let device = 1u64 << 40;
    let mut map = Bitmap::new(device, K4).unwrap();
    assert_eq!(map.len_bits(), 1 << 28);
    assert_eq!(Bitmap::on_disk_bytes(device, K4), (32 << 20, 32 << 10));
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..100_000 {
        let at = rng.random_range(0..device / K4) * K4;
        map.set_range(at..at + K4);
    }
    map.set_range(0..1 << 30);
    let count = map.count_bits();
    assert!(count > (1 << 18) && count <= (1 << 18) + 100_000);
    assert_eq!(map.runs().map(|r| (r.end - r.start) / K4).sum::<u64>(), count);
    assert_eq!(map.dirty_bytes(), count * K4);
    map.clear_range(0..device);
    assert_eq!(map.runs().count(), 0);
}

#[test]
fn or_block_merges_an_encoded_block_and_keeps_the_count() {
    // 3 blocks' worth of granules plus a partial last word.
    let device = (2 * crate::BITS_PER_BLOCK + 100) * 4096;
    let mut theirs = Bitmap::new(device, 4096).unwrap();
    theirs.set_range(0..8192);
    theirs.set_range(device - 4096..device);
    let mut ours = Bitmap::new(device, 4096).unwrap();
    ours.set_range(4096..3 * 4096);
    ours.mark_persisted();
    let mut block = [0u8; BLOCK_BYTES];
    for b in 0..theirs.blocks() {
        theirs.encode_block(b, &mut block);
        assert!(ours.or_block(b, &block));
    }
    assert_eq!(runs(&ours), vec![0..3 * 4096, device - 4096..device]);
    assert_eq!(ours.count_bits(), 4);
    assert_eq!(ours.changed_blocks().collect::<Vec<_>>(), vec![0, 2]);
    assert!(!ours.or_block(theirs.blocks(), &block), "out of range is refused");
    // Garbage past the device's last granule is ignored.
    let all_ones = [0xffu8; BLOCK_BYTES];
    ours.or_block(2, &all_ones);
    assert_eq!(ours.count_bits(), 4 + 99);
}
