//! The keys of `[resource]` for links that cannot keep up (issue 15):
//! `on-congestion` and `congestion-fill`.

use std::fmt;

/// `on-congestion`: what a protocol A Primary does when more than
/// `congestion-fill` bytes are queued for its peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CongestionPolicy {
    /// Writers wait for the send buffer (the application runs at link speed).
    #[default]
    Block,
    /// The Primary goes `Ahead`: it stops shipping writes and records them in the
    /// bitmap; the peer goes `Behind` (Outdated). When the queue has drained, a
    /// bitmap resync catches the peer up and replication continues.
    PullAhead,
}

impl fmt::Display for CongestionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CongestionPolicy::Block => "block",
            CongestionPolicy::PullAhead => "pull-ahead",
        })
    }
}

/// Default `congestion-fill`: the default send buffer, so that with
/// `pull-ahead` a writer never waits for it.
pub const DEFAULT_CONGESTION_FILL_BYTES: u64 = 64 << 20;
/// Smallest `congestion-fill`: below a few frames the Primary would go Ahead on
/// every burst.
pub const MIN_CONGESTION_FILL_BYTES: u64 = 1 << 20;
