//! An async NBD server (fixed newstyle) that serves anything implementing
//! [`BlockDevice`], plus the client side of the handshake. It knows nothing of
//! replication: blockd plugs its storage engine or its replication core in as the
//! device.
//!
//! # Overview
//! - [`Server`] owns the [`Listener`]s (TCP with `TCP_NODELAY`, or Unix sockets) and
//!   spawns one task per connection; [`ServerConfig`] bounds connections and handshake
//!   time. [`Server::serve`] returns after a graceful shutdown.
//! - `handshake` haggles options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`/`GO` (with
//!   `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `STRUCTURED_REPLY`,
//!   `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`), `STARTTLS` (see
//!   [`TlsConfig`]: off → `ERR_POLICY`; on; require → `ERR_TLS_REQD` for every other
//!   option until the upgrade); anything else gets `ERR_UNSUP`. After STARTTLS the
//!   haggling starts over on the TLS stream (no earlier option state is kept) and
//!   transmission runs over its split halves.
//! - `transmission` reads requests, validates them exactly as nbdkit does (EINVAL,
//!   ENOSPC, EPERM, ENOTSUP...), hands valid ones to the device as a [`Request`]
//!   with a [`Responder`], and a writer task encodes replies (simple or structured) in
//!   completion order. Requests and payload bytes in flight are bounded per
//!   connection.
//! - [`buf`] provides the pooled, aligned buffers payloads live in, so the hot path
//!   does not allocate per request.
//! - [`client`] negotiates as a client (for handing sockets to the kernel, and tests).
//! - [`proto`] holds the wire constants and fixed-header codecs.
//!
//! The device contract: `submit` must not block, and every [`Responder`] is answered
//! exactly once (dropping one unanswered replies `EIO`). `CAN_MULTI_CONN` is honest
//! only if the device makes FLUSH/FUA effects visible to all connections at reply time.

pub mod buf;
pub mod client;
mod device;
mod error;
mod handshake;
pub mod proto;
mod server;
mod tls;
mod transmission;

pub use device::{BlockDevice, ExportInfo, Extent, Request, Responder};
pub use error::{Error, NbdError};
pub use handshake::ExportName;
pub use server::{Disconnector, IntoHalves, Listener, Server, ServerConfig, ServerStats};
pub use tls::{AcceptorSource, TlsConfig, TlsMode};
pub use transmission::{
    MAX_EXTENTS, MAX_INFLIGHT_PAYLOAD_BYTES, MAX_INFLIGHT_REQUESTS, validate as validate_request,
};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
