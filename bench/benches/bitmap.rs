//! Micro-benchmarks of the dirty bitmap at 1 TiB @ 4 KiB (2^28 bits = 32 MiB of bitmap).
//! Run: `cargo bench -p blockd-bench --bench bitmap`.

use std::hint::black_box;
use std::time::Duration;

use bitmap::{BLOCK_BYTES, Bitmap};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const DEVICE: u64 = 1 << 40;
const G: u64 = 4096;
const GRANULES: u64 = DEVICE / G;

/// A small deterministic generator (xorshift64*), so the bench needs no rng crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn granule_offset(&mut self) -> u64 {
        (self.next() % GRANULES) * G
    }
}

/// 1% of the granules set, scattered at random.
fn one_percent(seed: u64) -> Bitmap {
    let mut map = Bitmap::new(DEVICE, G).expect("geometry");
    let mut rng = Rng(seed);
    for _ in 0..GRANULES / 100 {
        let at = rng.granule_offset();
        map.set_range(at..at + G);
    }
    map.mark_persisted();
    map
}

fn bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap_1TiB_4KiB");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));

    let mut map = Bitmap::new(DEVICE, G).expect("geometry");
    let mut rng = Rng(1);
    group.bench_function("set_range_4k_random", |b| {
        b.iter(|| {
            let at = rng.granule_offset();
            map.set_range(black_box(at..at + G));
        })
    });
    group.bench_function("clear_range_4k_random", |b| {
        b.iter(|| {
            let at = rng.granule_offset();
            map.clear_range(black_box(at..at + G));
        })
    });
    group.bench_function("set_range_1GiB", |b| b.iter(|| map.set_range(black_box(1 << 30..2 << 30))));

    let sparse = one_percent(2);
    group.bench_function("count_bits_1pct", |b| b.iter(|| black_box(&sparse).count_bits()));
    group.bench_function("iterate_runs_1pct", |b| b.iter(|| black_box(&sparse).runs().count()));
    let empty = Bitmap::new(DEVICE, G).expect("geometry");
    group.bench_function("iterate_runs_empty", |b| b.iter(|| black_box(&empty).runs().count()));

    let other = one_percent(3);
    group.bench_function("union_1pct_into_1pct", |b| {
        b.iter_batched_ref(
            || sparse.clone(),
            |map| map.union_with(black_box(&other)).expect("same geometry"),
            BatchSize::LargeInput,
        )
    });

    // Every block changed (a union of two 1% maps touches all 8192 blocks): the worst-case persist.
    let mut all_changed = sparse.clone();
    all_changed.union_with(&other).expect("same geometry");
    assert_eq!(all_changed.changed_blocks().count(), 8192);
    let mut out = [0u8; BLOCK_BYTES];
    group.bench_function("encode_all_changed_blocks_8192", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for block in all_changed.changed_blocks() {
                acc ^= all_changed.encode_block(block, &mut out);
            }
            acc
        })
    });
    let mut few = sparse.clone();
    few.mark_persisted();
    let mut rng = Rng(4);
    for _ in 0..64 {
        let at = rng.granule_offset();
        few.set_range(at..at + G);
    }
    group.bench_function("changed_blocks_and_encode_64_writes", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for block in few.changed_blocks() {
                acc ^= few.encode_block(block, &mut out);
            }
            acc
        })
    });
    let mut bits = vec![0u8; (DEVICE / G / 8) as usize];
    let mut crcs = vec![0u8; (DEVICE / G / 8 / BLOCK_BYTES as u64 * 4) as usize];
    for block in all_changed.changed_blocks() {
        let crc = all_changed.encode_block(block, &mut out);
        bits[block as usize * BLOCK_BYTES..][..BLOCK_BYTES].copy_from_slice(&out);
        crcs[block as usize * 4..][..4].copy_from_slice(&crc.to_le_bytes());
    }
    group.bench_function("decode_32MiB", |b| {
        b.iter(|| Bitmap::decode(DEVICE, G, black_box(&bits), black_box(&crcs)).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
