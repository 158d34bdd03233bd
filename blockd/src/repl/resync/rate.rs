//! Resync rate control, a sub-machine of the core: a token bucket fed by ticks
//! (a fixed rate, or `auto`: full speed while the application is idle and
//! `resync-min-rate` while it does I/O), and the measured rate for status.

use super::RESYNC_CHUNK_BYTES;
use crate::repl::core::CoreConfig;

#[derive(Debug)]
pub(in crate::repl) struct RateCtl {
    fixed_bytes_per_sec: Option<u64>,
    min_bytes_per_sec: u64,
    /// The limit in force: `None` is full speed.
    limit_bytes_per_sec: Option<u64>,
    tokens_bytes: i64,
    /// Resync bytes done in this process (both directions), and at the last tick.
    progress_bytes: u64,
    progress_at_tick: u64,
    /// Smoothed bytes per second over recent ticks.
    measured_bytes_per_sec: f64,
    /// Payload bytes sent for resync since start (status `resync_sent_bytes`).
    sent_bytes: u64,
}

impl RateCtl {
    pub fn new(cfg: &CoreConfig) -> RateCtl {
        RateCtl {
            fixed_bytes_per_sec: cfg.resync_rate_bytes_per_sec,
            min_bytes_per_sec: cfg.resync_min_rate_bytes_per_sec,
            limit_bytes_per_sec: cfg.resync_rate_bytes_per_sec,
            tokens_bytes: RESYNC_CHUNK_BYTES as i64,
            progress_bytes: 0,
            progress_at_tick: 0,
            measured_bytes_per_sec: 0.0,
            sent_bytes: 0,
        }
    }

    /// Whether a chunk of `len` bytes may start now; takes its tokens if so.
    pub fn take(&mut self, len: u64) -> bool {
        if self.limit_bytes_per_sec.is_none() {
            return true;
        }
        if self.tokens_bytes <= 0 {
            return false;
        }
        self.tokens_bytes -= len as i64;
        true
    }

    /// A tick: refill the bucket (`auto`: full speed unless the application did
    /// I/O since the last tick) and update the measured rate.
    pub fn tick(&mut self, elapsed_ms: u64, app_requests: u64) {
        self.limit_bytes_per_sec = match self.fixed_bytes_per_sec {
            Some(fixed) => Some(fixed),
            None if app_requests > 0 => Some(self.min_bytes_per_sec),
            None => None,
        };
        if let Some(limit) = self.limit_bytes_per_sec {
            let add = limit.saturating_mul(elapsed_ms) / 1000;
            // A burst of at most a fifth of a second (but one chunk at least).
            let burst = (limit / 5).max(RESYNC_CHUNK_BYTES);
            self.tokens_bytes = (self.tokens_bytes + add as i64).min(burst as i64);
        }
        if elapsed_ms > 0 {
            let delta = self.progress_bytes - self.progress_at_tick;
            self.progress_at_tick = self.progress_bytes;
            let now = delta as f64 * 1000.0 / elapsed_ms as f64;
            self.measured_bytes_per_sec = 0.8 * self.measured_bytes_per_sec + 0.2 * now;
        }
    }

    /// `bytes` more of the resync are done (this node is either side).
    pub fn progressed(&mut self, bytes: u64) {
        self.progress_bytes += bytes;
    }

    /// `bytes` of resync payload were sent.
    pub fn sent(&mut self, bytes: u64) {
        self.sent_bytes += bytes;
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    pub fn measured_bytes_per_sec(&self) -> u64 {
        self.measured_bytes_per_sec as u64
    }
}
