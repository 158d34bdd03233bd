//! See `blockd_fuzz::control` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::control::control_line(data));
