//! Harnesses behind the fuzz targets in `fuzz_targets/`: one module per parser of
//! untrusted bytes, each with the target function (feeds one input, checks what
//! must hold) and the seed inputs `examples/seeds.rs` writes into `corpus/`.
//!
//! - [`nbd`]: a whole NBD connection over an in-memory stream: option haggling from
//!   arbitrary client bytes (`nbd_handshake`), and requests after a valid handshake
//!   against an export of fuzzed capabilities (`nbd_request`).
//! - [`peer`]: the peer link's frame reader over arbitrary bytes (`peer_frames`), and
//!   the payload of every message kind inside a well-formed frame (`peer_msg`).
//! - [`control`]: control-socket request lines (`control_line`).
//! - [`meta`]: metadata as `MetaStore::open` and the startup reads see it: superblock
//!   slots, activity-log slots, bitmap blocks and crc table (`meta_open`).
//! - [`bitmaps`]: the bitmap crate's on-disk block decoding and the peer's bitmap
//!   blocks (`bitmap_blocks`).
//! - [`undo`]: an undo journal read back after a crash: `UndoJournal::open`, then
//!   export, roll back and append (`undo_open`).
//!
//! Every target must return for every input, without a panic, a hang or an
//! allocation out of proportion to the input. The async parsers run on one
//! current-thread tokio runtime per process ([`block_on`]).

pub mod bitmaps;
pub mod control;
pub mod meta;
pub mod nbd;
pub mod peer;
pub mod undo;

use std::future::Future;

/// Runs `f` to completion on this thread's runtime (built once per process: a
/// runtime per input would cost more than most inputs).
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread tokio runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}

/// A named seed input for a target's corpus.
pub type Seed = (String, Vec<u8>);

/// A big-endian byte string builder for seeds and framing.
#[derive(Default)]
pub(crate) struct Bytes(pub Vec<u8>);

impl Bytes {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}
