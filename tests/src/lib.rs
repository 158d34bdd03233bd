//! Integration-test harness for blockd: real server processes (blockd with
//! either I/O engine, or nbdkit as the reference) driven by real NBD clients.
//!
//! * [`Server`] — a temp dir, a sparse disk, a running server ([`Daemon`]).
//! * [`engine_tests!`] — one `#[test]` per engine (`posix::NAME`,
//!   `uring::NAME`); `BLOCKD_TEST_SERVER=nbdkit` runs them against nbdkit.
//! * [`tools`] — external programs with captured output and deadlines.
//! * [`guards`] — FUSE mount / loop device / mount guards.
//! * [`faultdisk`] — a backing disk whose faults a test switches at runtime
//!   (EIO/ENOSPC, hang, slow: nbdkit's filters behind nbdfuse).
//! * [`smallfs`] — a small tmpfs/ext4 for thin stores that run out of space.
//! * [`raw`] — a raw NBD client for protocol corner cases.
//! * [`loadgen`] — acknowledged-write load generator and verifier.
//! * [`chain`] — ordered dependent writer and prefix (crash-consistency)
//!   verifier.
//! * [`proxy`] — fault-injecting TCP proxy (cut, pause, delay, bandwidth,
//!   bit flips).
//! * [`pattern`] — the self-describing block patterns both writers use, and
//!   block readers (NBD, file).
//! * [`pair`] — a replicated two-node pair driven through blockctl.
//! * [`fakepeer`] — a fake replication peer that sends frames a real node
//!   never would (blockd's own encoders, then broken on purpose).
//! * [`tls`] — a CA and certificates (any name, expired, another CA) made in the
//!   test, and the certificate directories libnbd, nbdkit and qemu read.
//! * [`netns`] — two network namespaces joined by a veth pair (a link to cut,
//!   shape with `tc tbf`, or run test threads in).
//! * [`wan`] — a WAN link for a pair: namespaces, `tbf` bandwidth and a delay
//!   proxy (`WanLink { rtt_ms, rate_mbit }`); the `wan-proxy` binary is the same
//!   proxy for `bench/run --preset wan`.
//! * [`scatter`] — seeded scattered-write plans, a pipelined (kill-tolerant)
//!   writer, dirty-granule arithmetic, sparse-aware file comparison.
//!
//! Environment: `BLOCKD_BIN` (binary path), `BLOCKD_TARGET_DIR` (the cargo
//! target dir holding `blockd`/`blockctl` for [`pair`]), `BLOCKD_TEST_SERVER`
//! (`blockd`|`nbdkit`), `BLOCKD_KEEP_TMP=1` (keep temp dirs).

pub mod chain;
pub mod daemon;
pub mod fakepeer;
pub mod faultdisk;
pub mod guards;
pub mod loadgen;
pub mod netns;
pub mod pair;
pub mod pattern;
pub mod proxy;
pub mod raw;
pub mod scatter;
pub mod server;
pub mod smallfs;
pub mod tls;
pub mod tmp;
pub mod tools;
pub mod wan;

pub use daemon::{Addr, Daemon, free_port};
pub use server::{
    EXPORT, Engine, MIB, NODE, Opts, Server, ServerKind, Transport, blockd_bin, blockd_config,
    nbdkit_selected, workspace_root,
};
pub use tmp::{TempDir, assert_files_equal, random_file, sparse_file};
pub use tools::{Background, nbdcheck, require, run_capture, run_ok, tool};
