//! See `blockd_fuzz::meta` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::meta::meta_open(data));
