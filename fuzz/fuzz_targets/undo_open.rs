//! See `blockd_fuzz::undo` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::undo::undo_open(data));
