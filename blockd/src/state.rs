//! Replication state vocabulary shared by metadata, the peer protocol and the core
//! (SPEC §2, §5): roles, disk states, and data generation identifiers.

use std::fmt;

/// A node's role for the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Exports the device over NBD and accepts writes.
    Primary,
    /// Receives replication; refuses NBD clients.
    Secondary,
}

/// The state of a node's local data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskState {
    /// No usable local disk.
    Diskless,
    /// The local disk failed (I/O errors); reads and writes no longer use it.
    Failed,
    /// Partly written by a resync that has not finished: not usable as a source.
    Inconsistent,
    /// Consistent but known to be older than the peer's data.
    Outdated,
    /// Consistent, freshness unknown (the peer is unreachable).
    Consistent,
    /// Consistent and as new as any copy.
    UpToDate,
}

macro_rules! wire_enum {
    ($ty:ident { $($variant:ident = $code:expr, $name:expr;)* }) => {
        impl $ty {
            /// The one-byte code used on the wire and in the metadata.
            pub fn code(self) -> u8 {
                match self { $($ty::$variant => $code,)* }
            }

            /// Decodes [`Self::code`]; `None` for an unknown code.
            pub fn from_code(code: u8) -> Option<$ty> {
                match code { $($code => Some($ty::$variant),)* _ => None }
            }

            /// The name used in status output (DRBD's spelling).
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name,)* }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(Role {
    Primary = 1, "Primary";
    Secondary = 2, "Secondary";
});

wire_enum!(DiskState {
    Diskless = 1, "Diskless";
    Failed = 2, "Failed";
    Inconsistent = 3, "Inconsistent";
    Outdated = 4, "Outdated";
    Consistent = 5, "Consistent";
    UpToDate = 6, "UpToDate";
});

impl DiskState {
    /// No usable disk: detached after an I/O error (`Failed` while its last ops
    /// run, then `Diskless`), or never attached.
    pub fn is_detached(self) -> bool {
        matches!(self, DiskState::Failed | DiskState::Diskless)
    }
}

/// How many past generation ids are remembered.
pub const HISTORY_LEN: usize = 4;

/// Data generation identifiers (SPEC §5, DRBD's UUIDs): random 64-bit ids naming
/// generations of the data. 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Generations {
    /// The generation the local data belongs to now.
    pub current: u64,
    /// The generation the (single) peer's copy was at when changes started being
    /// tracked in the bitmap; 0 while connected and in sync.
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; HISTORY_LEN],
}

impl Generations {
    /// Starts a new generation (a Primary lost its peer, or a node was promoted while
    /// disconnected): the bitmap id takes the current id, which gets `fresh`, and the
    /// old bitmap id (if any) goes to the history.
    pub fn start_new(&mut self, fresh: u64) {
        debug_assert_ne!(fresh, 0, "0 means no generation");
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
        }
        self.bitmap = self.current;
        self.current = fresh;
    }

    fn push_history(&mut self, id: u64) {
        self.history.rotate_right(1);
        self.history[0] = id;
    }

    /// True if `id` is one of the ids in the history.
    pub fn history_contains(&self, id: u64) -> bool {
        id != 0 && self.history.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_reject_unknown() {
        for r in [Role::Primary, Role::Secondary] {
            assert_eq!(Role::from_code(r.code()), Some(r));
        }
        for d in [
            DiskState::Diskless,
            DiskState::Failed,
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
        ] {
            assert_eq!(DiskState::from_code(d.code()), Some(d));
        }
        assert_eq!(Role::from_code(0), None);
        assert_eq!(DiskState::from_code(99), None);
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
    }

    #[test]
    fn new_generation_shifts_ids() {
        let mut g = Generations { current: 10, ..Generations::default() };
        g.start_new(20);
        assert_eq!((g.current, g.bitmap, g.history), (20, 10, [0; 4]));
        g.start_new(30);
        assert_eq!((g.current, g.bitmap, g.history[0]), (30, 20, 10));
        assert!(g.history_contains(10));
        assert!(!g.history_contains(0));
    }
}
