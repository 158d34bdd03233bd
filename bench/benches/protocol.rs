//! Micro-benchmarks of the per-request protocol work: header decode, validation,
//! reply header encode, and a buffer-pool round trip. Run: `cargo bench -p blockd-bench`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use nbd_server::buf::BufPool;
use nbd_server::proto::{
    RequestHeader, cmd, cmd_flags, decode_request, encode_request, encode_simple_reply,
    encode_structured_header, reply,
};
use nbd_server::{ExportInfo, validate_request};

fn export() -> ExportInfo {
    ExportInfo::writable(1 << 40)
}

fn protocol(c: &mut Criterion) {
    let header = RequestHeader {
        flags: cmd_flags::FUA,
        command: cmd::WRITE,
        cookie: 42,
        offset: 1 << 30,
        length: 4096,
    };
    let raw = encode_request(&header);
    let info = export();
    c.bench_function("decode_request", |b| b.iter(|| decode_request(black_box(&raw))));
    c.bench_function("decode_and_validate", |b| {
        b.iter(|| {
            let h = decode_request(black_box(&raw)).expect("valid");
            validate_request(&h, &info, true, true)
        })
    });
    c.bench_function("encode_simple_reply", |b| b.iter(|| encode_simple_reply(black_box(42), 0)));
    c.bench_function("encode_structured_read_header", |b| {
        b.iter(|| encode_structured_header(black_box(42), reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 4104))
    });
    let pool = BufPool::default();
    c.bench_function("bufpool_get_freeze_drop_4k", |b| b.iter(|| drop(black_box(pool.get(4096)).freeze())));
    c.bench_function("bufpool_get_drop_1m", |b| b.iter(|| drop(black_box(pool.get(1 << 20)))));
}

criterion_group!(benches, protocol);
criterion_main!(benches);
