//! Replication: the single-owner core and its pure building blocks.
//!
//! - [`decide`]: what two nodes do when they connect, from their data generations
//!   (sync direction, or a refusal such as split brain).
//! - [`inflight`]: the Primary's table of writes in flight, which serializes
//!   overlapping writes so both copies apply them in the same order.
//!
//! The event-driven core that owns the replication state (see `ARCHITECTURE.md`)
//! builds on these.

pub mod core;
pub mod decide;
pub mod dirty;
pub mod inflight;
pub mod node;
pub mod shell;
