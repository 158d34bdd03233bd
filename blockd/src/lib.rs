//! blockd: the daemon behind a replicated block device.
//!
//! # Overview
//! - [`cli`]: `blockd`'s command line (clap), shared with the man-page generator
//!   (behind the default `bin` feature, which the fuzz crate turns off).
//! - [`config`]: the resource's TOML file (SPEC §8.1), validated, with `file:line: key`
//!   errors; picks the local node.
//! - [`storage`]: one backing store (file or block device) and its I/O engine
//!   (`io_uring` or a posix thread pool) behind a completion interface: submit an
//!   [`storage::IoOp`] with a token, get the token back through an [`storage::IoSink`].
//! - [`device`]: [`device::LocalDevice`], the `nbd_server::BlockDevice` that serves the
//!   local store directly, using each request's responder as the storage token.
//! - [`meta`]: the per-node metadata: superblock (two checksummed slots, generations,
//!   flags, disk state), layout of the bitmap and activity-log areas, `create-md`.
//! - [`peer`]: the replication link: checksummed, sequenced frames; messages; the
//!   versioned handshake; keepalive; the dial/accept supervisor with reconnect.
//! - [`repl`]: replication. [`repl::core::Core`] owns all replication state and is
//!   driven by events (`handle(event) -> actions`, no I/O); `repl::resync` (inside the
//!   core) copies data after an outage; [`repl::decide`] picks the sync direction from
//!   generation ids; [`repl::inflight`] serializes overlapping writes;
//!   [`repl::shell`] runs the core as a task and is the replicated `BlockDevice`;
//!   [`repl::node`] wires a replicated node for `blockd run`.
//! - [`control`]: the node's control socket (JSON lines) that `blockctl` talks to.
//! - [`metrics`]: counters, gauges and latency histograms, and the optional
//!   Prometheus text endpoint.
//! - [`events`]: the state snapshot the core task publishes, and its `exists`/`change`
//!   objects for `blockctl events`.
//! - [`state`]: the replication vocabulary: [`state::Role`], [`state::DiskState`],
//!   [`state::Generations`] (data generation ids).
//! - [`daemon`]: `blockd run`: a single-node config serves its disk standalone
//!   ([`device::LocalDevice`]); with a peer it runs [`repl::node`]. Both stop
//!   gracefully on SIGTERM/SIGINT.
//! - [`standalone`]: the control socket of a standalone export (`status`, `down`,
//!   `events`; other verbs refused).
//! - [`systemd`]: `sd_notify` readiness (once the control socket answers), watchdog
//!   and stopping notifications for `Type=notify` units.
//! - [`certs`]: a CA, node and NBD client certificates (rcgen) for `blockctl gen-certs`.
//! - [`tls`]: the crypto provider (aws-lc-rs, chosen by measurement), PEM files
//!   into rustls configs, and the NBD server's STARTTLS hook; [`peer::tls`] builds
//!   the peer link's mutual TLS on it.
//! - [`undo`]: the undo journal of a resync target: the old contents of each granule
//!   a catch-up overwrites, saved durably first, so a target can roll back to the
//!   image before the catch-up (and a discarded split-brain side's blocks are kept).
//! - [`safety`]: `PR_SET_IO_FLUSHER`, `oom_score_adj`, `mlockall` for processes in
//!   the block I/O path of a kernel NBD client on the same host (blockd, and
//!   `blockctl attach`'s resident).
//!
//! `ARCHITECTURE.md` at the repository root has the request paths and invariants.

pub mod certs;
#[cfg(feature = "bin")]
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod events;
pub mod meta;
pub mod metrics;
pub mod peer;
pub mod repl;
pub mod safety;
pub mod standalone;
pub mod state;
pub mod storage;
pub mod systemd;
pub mod tls;
pub mod undo;
