//! The keys of `[resource]` about failing disks and hung peers (issue 13):
//! `on-io-error` and `ack-timeout`.

use std::fmt;

/// `on-io-error`: what an I/O error on this node's own disk does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoErrorPolicy {
    /// The disk is detached (`Failed`, then `Diskless`): a Primary keeps serving
    /// through its peer, a Secondary stops taking writes; nothing claims UpToDate
    /// until a repaired disk is attached and resynced. DRBD's default too.
    #[default]
    Detach,
    /// A Primary returns the error to the client and keeps the disk (the range is
    /// marked out of sync). A Secondary has no client to pass an error to, so it
    /// detaches whatever this says.
    PassOn,
}

impl fmt::Display for IoErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoErrorPolicy::Detach => "detach",
            IoErrorPolicy::PassOn => "pass-on",
        })
    }
}

/// Default `ack-timeout`. DRBD drops a peer that does not complete a write within
/// `timeout` × `ko-count` = 6 s × 7 = 42 s. We take 10 s: longer than the
/// keepalive's 5 s (a dead process is caught by that first, and a busy peer has
/// room for a flush on a loaded disk), and well below the 30 s after which the
/// Linux NBD client starts complaining about a request (`nbd-pacemaker.md` §2.2),
/// so an application on the Primary sees its write complete locally instead.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 10_000;
/// Shortest `ack-timeout`: below the keepalive interval it would drop healthy peers
/// during a flush.
pub const MIN_ACK_TIMEOUT_MS: u64 = 2_000;
/// Longest `ack-timeout`.
pub const MAX_ACK_TIMEOUT_MS: u64 = 3_600_000;

/// A duration as written in the file: `"10s"`, `"500ms"`, `"2m"`, or a plain
/// integer of seconds.
pub(super) fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use a number with ms, s or m, such as \"10s\""))?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" | "" => 1000,
        "m" | "min" => 60_000,
        other => return Err(format!("{other:?} is not a duration unit; use ms, s or m, such as \"10s\"")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1500ms"), Ok(1500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("7"), Ok(7000));
        assert!(parse_duration_ms("fast").is_err());
        assert!(parse_duration_ms("10h").is_err());
        assert!(parse_duration_ms("").is_err());
    }
}
