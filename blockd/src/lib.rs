//! blockd: the daemon behind a replicated block device.
//!
//! # Overview
//! - [`config`]: the resource's TOML file (SPEC §8.1), validated, with `file:line: key`
//!   errors; picks the local node.
//! - [`storage`]: one backing store (file or block device) and its I/O engine
//!   (`io_uring` or a posix thread pool) behind a completion interface: submit an
//!   [`storage::IoOp`] with a token, get the token back through an [`storage::IoSink`].
//! - [`device`]: [`device::LocalDevice`], the `nbd_server::BlockDevice` that serves the
//!   local store directly, using each request's responder as the storage token.
//! - [`meta`]: the per-node metadata: superblock (two checksummed slots, generations,
//!   flags, disk state), layout of the bitmap and activity-log areas, `create-md`.
//! - [`repl`]: replication building blocks: the connect-time sync decision from
//!   generation ids, and the in-flight write table that serializes overlapping writes.
//! - [`state`]: the replication vocabulary: [`state::Role`], [`state::DiskState`],
//!   [`state::Generations`] (data generation ids).
//! - [`daemon`]: `blockd run`: open, serve NBD on the node's addresses, shut down
//!   gracefully on SIGTERM/SIGINT.
//!
//! Replication (peer protocol, roles, the event-driven core) arrives as a second
//! `BlockDevice` that wraps the same storage; see `ARCHITECTURE.md`.

pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod meta;
pub mod peer;
pub mod repl;
pub mod state;
pub mod storage;
