//! The storage engine: one backing store (regular file or block device) and the I/O
//! engine that executes operations on it.
//!
//! Completion-based: callers [`Storage::submit`] an [`IoOp`] with a caller-chosen
//! token; the engine executes it on its own thread(s) and reports back through the
//! [`IoSink`] given at open time, with the token, the result and the op's buffer (so
//! buffers return to their pool without copies). The two engines behind this one
//! interface are `uring` (io_uring via the `io-uring` crate, one ring owned by one
//! thread) and `posix` (a small pool of threads doing `pread`/`pwrite`).
//!
//! Operations map to the kernel as: FLUSH = `fdatasync`; FUA write = `RWF_DSYNC`;
//! TRIM = punch hole (file) or `BLKDISCARD` (device); WRITE_ZEROES = zero-range or
//! punch hole, falling back to written zeroes unless `fast_only`; block status from
//! `SEEK_DATA`/`SEEK_HOLE`.
//!
//! INTERFACE CONTRACT (fixed; engines implement it):
//! - `submit` never blocks on I/O; the caller bounds the number of ops in flight
//!   (at most `StorageOptions::max_inflight`), so the engine queues are sized to that.
//! - Every submitted op completes exactly once through the sink, from an engine thread.
//! - Errors are reported as `nix::errno::Errno` (the caller maps them to NBD errors).
