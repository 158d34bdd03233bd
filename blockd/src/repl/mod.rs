//! Replication: the single-owner core, its pure building blocks, and the I/O around it.
//!
//! - [`core`]: [`core::Core`], the state machine that owns all replication state
//!   (role, disk state, generations, jobs, epochs, transfer log, the persistent
//!   dirty bitmap, the activity log, resync, verify); `handle(event)` returns actions
//!   and does no I/O. Its child modules: `intent` (the activity-log gate, bitmap
//!   writes, metadata completions), `apply` (the Secondary's epoch-ordered writes),
//!   `resync` (connect, bitmap exchange, resync with rate control and optional
//!   checksums) and `verify` (online verify and the digest requests it serves).
//! - [`al`]: the activity log (write-intent extents), pure bookkeeping for the core.
//! - [`decide`]: what two nodes do when they connect, from their data generations
//!   (in sync, sync direction and scope, or a refusal such as split brain).
//! - [`job`]: job ids typed by owner and link generation, so a completion routes
//!   by its kind and one from an earlier link is recognised.
//! - [`inflight`]: the Primary's writes in flight, serializing overlapping ones so
//!   both copies apply them in the same order (resync chunks take part too).
//! - [`shell`]: runs the core in one task, feeding it events and executing its
//!   actions; the replicated `nbd_server::BlockDevice` (reads bypass the core).
//! - [`node`]: wires a replicated node for `blockd run` and stops it in order.
//! - [`recover`]: starting a node from its metadata (crash recovery of the bitmap
//!   and activity log), and carrying out the core's metadata actions; shared with
//!   the simulator.

pub mod al;
pub mod core;
pub mod decide;
pub mod inflight;
pub mod job;
pub mod node;
pub mod recover;
pub mod shell;
