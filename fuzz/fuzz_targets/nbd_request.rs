//! See `blockd_fuzz::nbd` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::nbd::nbd_request(data));
