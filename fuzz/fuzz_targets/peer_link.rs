//! See `blockd_fuzz::peer` for what this target feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockd_fuzz::peer::peer_link(data));
