//! The keys of `[resource]` for replication across a WAN (issue 15): `compression`,
//! `compression-level`, `replication-rate`, `on-congestion` and `congestion-fill`.

use std::fmt;

/// `compression`: what the peer link does to the data of `Write` and resync frames.
/// Both nodes must say `zstd` for a link to compress (agreed in the Hello); a
/// mismatch runs the link uncompressed, with a warning on both sides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Data goes as it is.
    #[default]
    Off,
    /// zstd at `compression-level`; a payload that does not shrink goes raw.
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::Zstd => "zstd",
        })
    }
}

/// Default `compression-level`: zstd's own default, several hundred MB/s per core
/// with most of the ratio of the higher levels on ordinary files.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// Lowest `compression-level`.
pub const MIN_COMPRESSION_LEVEL: i32 = 1;
/// Highest `compression-level`: zstd's 20..22 ("ultra") need hundreds of MiB per
/// context and compress a few MB/s, never what a replication link wants.
pub const MAX_COMPRESSION_LEVEL: i32 = 19;
/// Lowest `replication-rate`: 64 KiB/s (512 kbit/s). Slower is more likely a unit
/// mistake than a link; a 32 MiB write still flows in pieces at this rate.
pub const MIN_REPLICATION_RATE_BYTES_PER_SEC: u64 = 64 << 10;

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
