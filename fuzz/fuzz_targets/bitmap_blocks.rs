//! See `blockd_fuzz::bitmaps` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::bitmaps::bitmap_blocks(data));
