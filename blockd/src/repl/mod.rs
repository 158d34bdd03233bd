//! Replication: the single-owner core, its pure building blocks, and the I/O around it.
//!
//! - [`core`]: [`core::Core`], the state machine that owns all replication state
//!   (role, disk state, generations, jobs, epochs, transfer log, dirty set, resync);
//!   `handle(event)` returns actions and does no I/O. Its child module `resync`
//!   connects two nodes and copies data after an outage.
//! - [`decide`]: what two nodes do when they connect, from their data generations
//!   (in sync, sync direction and scope, or a refusal such as split brain).
//! - [`inflight`]: the Primary's writes in flight, serializing overlapping ones so
//!   both copies apply them in the same order (resync chunks take part too).
//! - [`dirty`]: regions changed without the peer, at bitmap granularity (in memory).
//! - [`shell`]: runs the core in one task, feeding it events and executing its
//!   actions; the replicated `nbd_server::BlockDevice` (reads bypass the core).
//! - [`node`]: wires a replicated node for `blockd run` and stops it in order.

pub mod core;
pub mod decide;
pub mod dirty;
pub mod inflight;
pub mod node;
pub mod shell;
