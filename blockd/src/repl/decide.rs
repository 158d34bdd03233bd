//! What two nodes do when they connect: compare data generations (SPEC §5, DRBD's
//! UUID rules) and decide who syncs whom, or refuse.
//!
//! Pure: no I/O, no clock. The rules, in the order they are tried:
//!
//! | rule | condition (mine vs the peer's) | outcome |
//! |---|---|---|
//! | fresh pair | both `current` are 0 | wait for `primary --force` |
//! | just created | my `current` is 0 | I am target, full sync |
//! | peer just created | the peer's `current` is 0 | I am source, full sync |
//! | same generation | `current` equal | in sync (unless a side is Inconsistent: it is the target) |
//! | peer behind | my `bitmap` = its `current` | I am source (bitmap resync where possible) |
//! | I am behind | its `bitmap` = my `current` | I am target |
//! | split brain | both `bitmap` set and equal, or one's `bitmap` in the other's history | refuse, both StandAlone |
//! | history | my `current` in its history | I am target, full sync |
//! | history | its `current` in my history | I am source, full sync |
//! | unrelated | nothing matches | refuse |
//!
//! A node that is Primary never becomes a sync target (its data is what clients see),
//! and a would-be source must hold consistent data.
//!
//! Crashed Primary (DRBD's rule of the same name): a node that died while Primary may
//! have written blocks locally that never reached its peer; its activity log says
//! where (the hot extents are merged into its bitmap at start). A bitmap resync in
//! either direction unites both sides' bitmaps, so those blocks are copied too. When
//! both sides are at the same generation the crashed Primary is the source: its copy
//! holds every acknowledged write plus possibly some that were in flight.
//!
//! Same generation but dirty bits on a side (a crashed Primary's hot extents, a
//! verify's findings, a resync cut short by a crash of its source): a bitmap resync
//! from the Primary if there is one, else from the side with bits, else from the
//! node whose name sorts first.
//!
//! Split brain with `connect --discard-my-data` on exactly one side: that side is the
//! target; the scope is the bitmaps (united) when both moved from the same
//! generation, else everything.

use crate::state::{DiskState, Generations, Role};

/// One side's view, as sent in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideState {
    pub gens: Generations,
    pub disk: DiskState,
    pub role: Role,
    /// It crashed while Primary and has not been resynced since.
    pub crashed_primary: bool,
    /// Its bitmap has bits set.
    pub dirty: bool,
    /// `connect --discard-my-data` was given on it.
    pub discard_my_data: bool,
    /// Its node name sorts before the other's (a tie-break both sides agree on).
    pub lower_name: bool,
}

/// How much must be transferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncScope {
    /// Only what the bitmaps say changed (a full sync until the bitmap exists).
    Bitmap,
    /// Everything (skipping regions that read as zero on the source).
    Full,
}

/// Why a connection is refused; shown in status and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Both sides wrote independently since a common generation.
    SplitBrain,
    /// No generation in common: not copies of the same data.
    UnrelatedData,
    /// This node is Primary but the peer's data is newer.
    PrimaryWouldBeTarget,
    /// The peer is Primary but this node's data is newer.
    PeerPrimaryWouldBeTarget,
    /// The side that should be the source has no consistent data.
    NoConsistentSource,
    /// Both sides are Primary.
    BothPrimary,
    /// Neither side has a disk.
    NoDisk,
    /// A Primary without a disk, and a peer that does not hold exactly the data it
    /// served (another generation, or not UpToDate).
    DisklessPrimaryWithoutData,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::SplitBrain => {
                "split brain: both nodes changed the data since they were last connected; \
                 resolve with `blockctl connect --discard-my-data` on the node whose changes to drop"
            }
            Refusal::UnrelatedData => "unrelated data: the nodes share no data generation",
            Refusal::PrimaryWouldBeTarget => {
                "the peer has newer data but this node is Primary; demote it to resync"
            }
            Refusal::PeerPrimaryWouldBeTarget => "this node has newer data but the peer is Primary",
            Refusal::NoConsistentSource => "the node with the newer data is not consistent",
            Refusal::BothPrimary => "both nodes are Primary",
            Refusal::NoDisk => "neither node has a disk",
            Refusal::DisklessPrimaryWithoutData => {
                "a Primary without a disk and a peer that is not UpToDate with the data it served"
            }
        })
    }
}

/// The outcome of comparing two nodes at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Identical data: replicate from now on.
    InSync,
    /// This node sends data to the peer.
    SyncSource(SyncScope),
    /// This node receives data from the peer.
    SyncTarget(SyncScope),
    /// A fresh pair: nothing to compare until one node is promoted with `--force`.
    WaitForPromotion,
    /// One side has no disk (detached after an I/O error): connected, nothing to
    /// sync; the Primary sends it no writes. The side with the disk keeps its
    /// generations and bitmap for when a disk is attached again.
    Diskless,
    /// Stay StandAlone.
    Refuse(Refusal),
}

/// Decides sync direction from both sides' state (symmetric: swapping the arguments
/// swaps source and target).
pub fn decide(me: &SideState, peer: &SideState) -> Decision {
    use SyncScope::Bitmap;
    if let Some(decision) = diskless(me, peer) {
        return decision;
    }
    let direction = match direction(&me.gens, &peer.gens, me.disk, peer.disk) {
        Direction::Equal => match (me.crashed_primary, peer.crashed_primary) {
            (true, false) => Direction::Source(Bitmap),
            (false, true) => Direction::Target(Bitmap),
            (true, true) => Direction::Refuse(Refusal::SplitBrain),
            (false, false) if !me.dirty && !peer.dirty => Direction::Equal,
            (false, false) => {
                let me_first = match (me.role, peer.role) {
                    (Role::Primary, _) => true,
                    (_, Role::Primary) => false,
                    _ if me.dirty != peer.dirty => me.dirty,
                    _ => me.lower_name,
                };
                if me_first { Direction::Source(Bitmap) } else { Direction::Target(Bitmap) }
            }
        },
        Direction::Refuse(Refusal::SplitBrain) if me.discard_my_data != peer.discard_my_data => {
            // Both moved from one generation: each bitmap holds that side's changes.
            let scope = if me.gens.bitmap != 0 && me.gens.bitmap == peer.gens.bitmap {
                Bitmap
            } else {
                SyncScope::Full
            };
            if me.discard_my_data { Direction::Target(scope) } else { Direction::Source(scope) }
        }
        other => other,
    };
    // A split brain is named as such even between two Primaries (it is the reason
    // to act on); otherwise two Primaries are refused as they are.
    if me.role == Role::Primary
        && peer.role == Role::Primary
        && !matches!(direction, Direction::Refuse(Refusal::SplitBrain))
    {
        return Decision::Refuse(Refusal::BothPrimary);
    }
    match direction {
        Direction::Source(_) if me.role == Role::Secondary && peer.role == Role::Primary => {
            Decision::Refuse(Refusal::PeerPrimaryWouldBeTarget)
        }
        Direction::Target(_) if me.role == Role::Primary => Decision::Refuse(Refusal::PrimaryWouldBeTarget),
        Direction::Source(_) if !usable_source(me.disk) => Decision::Refuse(Refusal::NoConsistentSource),
        Direction::Target(_) if !usable_source(peer.disk) => Decision::Refuse(Refusal::NoConsistentSource),
        Direction::Source(scope) => Decision::SyncSource(scope),
        Direction::Target(scope) => Decision::SyncTarget(scope),
        Direction::Equal => Decision::InSync,
        Direction::Fresh => Decision::WaitForPromotion,
        Direction::Refuse(r) => Decision::Refuse(r),
    }
}

/// The decision when either side has no disk (symmetric).
fn diskless(me: &SideState, peer: &SideState) -> Option<Decision> {
    let no_disk = |s: &SideState| s.disk.is_detached();
    let (without, with) = match (no_disk(me), no_disk(peer)) {
        (false, false) => return None,
        (true, true) => return Some(Decision::Refuse(Refusal::NoDisk)),
        (true, false) => (me, peer),
        (false, true) => (peer, me),
    };
    if me.role == Role::Primary && peer.role == Role::Primary {
        return Some(Decision::Refuse(Refusal::BothPrimary));
    }
    // A diskless Primary served only what its peer held: the same peer, UpToDate,
    // still at that generation or at the one it started when that Primary lost its
    // disk (`repl::diskless`); anything else lacks what it served.
    let same_data = with.gens.current == without.gens.current || with.gens.bitmap == without.gens.current;
    if without.role == Role::Primary && (with.disk != DiskState::UpToDate || !same_data) {
        return Some(Decision::Refuse(Refusal::DisklessPrimaryWithoutData));
    }
    Some(Decision::Diskless)
}

fn usable_source(disk: DiskState) -> bool {
    matches!(disk, DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated)
}

enum Direction {
    Fresh,
    Equal,
    Source(SyncScope),
    Target(SyncScope),
    Refuse(Refusal),
}

fn direction(me: &Generations, peer: &Generations, my_disk: DiskState, peer_disk: DiskState) -> Direction {
    use SyncScope::{Bitmap, Full};
    if me.current == 0 && peer.current == 0 {
        return Direction::Fresh;
    }
    if me.current == 0 {
        return Direction::Target(Full);
    }
    if peer.current == 0 {
        return Direction::Source(Full);
    }
    if me.current == peer.current {
        // Same generation, but an interrupted resync leaves its target Inconsistent,
        // and a disk that failed is Outdated (which of the writes in flight then
        // reached it is unknown): either is resynced in full, whatever else the
        // states say (a crashed Primary's flag included).
        let behind = |d: DiskState| matches!(d, DiskState::Inconsistent | DiskState::Outdated);
        return match (behind(my_disk), behind(peer_disk)) {
            (true, false) => Direction::Target(Full),
            (false, true) => Direction::Source(Full),
            (true, true) if my_disk == peer_disk => {
                if my_disk == DiskState::Inconsistent {
                    Direction::Fresh
                } else {
                    Direction::Equal
                }
            }
            // Outdated has the data of its generation; Inconsistent may not.
            (true, true) if my_disk == DiskState::Outdated => Direction::Source(Full),
            (true, true) => Direction::Target(Full),
            (false, false) => Direction::Equal,
        };
    }
    // Each condition alone says who is behind; both at once is circular (each side
    // changed the data the other one still has), which is a split brain.
    let peer_behind = me.bitmap != 0 && me.bitmap == peer.current;
    let me_behind = peer.bitmap != 0 && peer.bitmap == me.current;
    match (peer_behind, me_behind) {
        (true, true) => return Direction::Refuse(Refusal::SplitBrain),
        (true, false) => return Direction::Source(Bitmap),
        (false, true) => return Direction::Target(Bitmap),
        (false, false) => {}
    }
    let diverged = (me.bitmap != 0 && me.bitmap == peer.bitmap)
        || peer.history_contains(me.bitmap)
        || me.history_contains(peer.bitmap);
    if diverged {
        return Direction::Refuse(Refusal::SplitBrain);
    }
    match (peer.history_contains(me.current), me.history_contains(peer.current)) {
        (true, true) => Direction::Refuse(Refusal::SplitBrain),
        (true, false) => Direction::Target(Full),
        (false, true) => Direction::Source(Full),
        (false, false) => Direction::Refuse(Refusal::UnrelatedData),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiskState::{Inconsistent, Outdated, UpToDate};
    use Role::{Primary, Secondary};

    fn side(current: u64, bitmap: u64, history: [u64; 4], disk: DiskState, role: Role) -> SideState {
        SideState {
            gens: Generations { current, bitmap, history },
            disk,
            role,
            crashed_primary: false,
            dirty: false,
            discard_my_data: false,
            lower_name: false,
        }
    }

    fn sec(current: u64, bitmap: u64) -> SideState {
        side(current, bitmap, [0; 4], UpToDate, Secondary)
    }

    /// Asserts the decision and its mirror image.
    fn check(me: SideState, peer: SideState, expect: Decision) {
        assert_eq!(decide(&me, &peer), expect, "me {me:?}\npeer {peer:?}");
        let mirrored = match &expect {
            Decision::SyncSource(s) => Decision::SyncTarget(*s),
            Decision::SyncTarget(s) => Decision::SyncSource(*s),
            Decision::Refuse(Refusal::PrimaryWouldBeTarget) => {
                Decision::Refuse(Refusal::PeerPrimaryWouldBeTarget)
            }
            Decision::Refuse(Refusal::PeerPrimaryWouldBeTarget) => {
                Decision::Refuse(Refusal::PrimaryWouldBeTarget)
            }
            other => other.clone(),
        };
        assert_eq!(decide(&peer, &me), mirrored, "mirrored: me {peer:?}\npeer {me:?}");
    }

    #[test]
    fn fresh_pair_waits_and_forced_primary_syncs_everything() {
        let fresh = side(0, 0, [0; 4], Inconsistent, Secondary);
        check(fresh, fresh, Decision::WaitForPromotion);
        // `primary --force` on one: it gets a generation and becomes UpToDate.
        let forced = side(7, 0, [0; 4], UpToDate, Primary);
        check(forced, fresh, Decision::SyncSource(SyncScope::Full));
    }

    #[test]
    fn equal_generations_are_in_sync() {
        check(sec(5, 0), sec(5, 0), Decision::InSync);
        check(side(5, 0, [0; 4], UpToDate, Primary), sec(5, 0), Decision::InSync);
    }

    #[test]
    fn interrupted_resync_target_resumes_as_target() {
        let target = side(5, 0, [0; 4], Inconsistent, Secondary);
        check(sec(5, 0), target, Decision::SyncSource(SyncScope::Full));
    }

    #[test]
    fn primary_that_lost_its_peer_is_the_source() {
        // Primary: current 20, bitmap 10 (the generation the peer still has).
        let primary = side(20, 10, [0; 4], UpToDate, Primary);
        check(primary, sec(10, 0), Decision::SyncSource(SyncScope::Bitmap));
    }

    #[test]
    fn failover_then_old_primary_returns_as_target() {
        // The old primary crashed at generation 10; the other node was promoted.
        let new_primary = side(30, 10, [0; 4], UpToDate, Primary);
        let old_primary = sec(10, 0);
        check(new_primary, old_primary, Decision::SyncSource(SyncScope::Bitmap));
    }

    #[test]
    fn both_moved_on_is_split_brain() {
        check(sec(20, 10), sec(30, 10), Decision::Refuse(Refusal::SplitBrain));
        // One side moved twice: its old bitmap id went to history.
        check(
            side(40, 20, [10, 0, 0, 0], UpToDate, Secondary),
            sec(30, 10),
            Decision::Refuse(Refusal::SplitBrain),
        );
    }

    #[test]
    fn history_match_means_full_sync() {
        // The peer is several generations behind and its bitmap id is gone.
        check(
            side(40, 30, [20, 10, 0, 0], UpToDate, Secondary),
            sec(10, 0),
            Decision::SyncSource(SyncScope::Full),
        );
    }

    #[test]
    fn unrelated_data_is_refused() {
        check(sec(11, 0), sec(22, 0), Decision::Refuse(Refusal::UnrelatedData));
        check(sec(11, 3), sec(22, 4), Decision::Refuse(Refusal::UnrelatedData));
    }

    #[test]
    fn a_primary_never_becomes_target() {
        let stale_primary = side(10, 0, [0; 4], UpToDate, Primary);
        check(stale_primary, sec(30, 10), Decision::Refuse(Refusal::PrimaryWouldBeTarget));
    }

    #[test]
    fn a_crashed_primary_is_synced_by_bitmap() {
        let crashed = SideState { crashed_primary: true, dirty: true, ..sec(10, 0) };
        // Same generation: the crashed Primary's copy (a superset of what was
        // acknowledged) is copied over, where its bitmap (hot extents) says.
        check(crashed, sec(10, 0), Decision::SyncSource(SyncScope::Bitmap));
        // The other node was promoted meanwhile: the crashed one is a target; the
        // bitmaps are united, so its hot extents are copied back too.
        check(side(30, 10, [0; 4], UpToDate, Primary), crashed, Decision::SyncSource(SyncScope::Bitmap));
    }

    #[test]
    fn dirty_bits_at_the_same_generation_are_resynced() {
        let dirty = SideState { dirty: true, ..sec(10, 0) };
        check(dirty, sec(10, 0), Decision::SyncSource(SyncScope::Bitmap));
        // A Primary is the source whoever has the bits.
        let primary = side(10, 0, [0; 4], UpToDate, Primary);
        check(primary, dirty, Decision::SyncSource(SyncScope::Bitmap));
        // Both dirty, both Secondary: the lower name is the source.
        let first = SideState { lower_name: true, ..dirty };
        check(first, dirty, Decision::SyncSource(SyncScope::Bitmap));
    }

    #[test]
    fn discard_my_data_resolves_a_split_brain() {
        let alpha = sec(20, 10);
        let beta = sec(30, 10);
        check(alpha, beta, Decision::Refuse(Refusal::SplitBrain));
        let victim = SideState { discard_my_data: true, ..beta };
        check(alpha, victim, Decision::SyncSource(SyncScope::Bitmap));
        // Both discarding resolves nothing.
        check(SideState { discard_my_data: true, ..alpha }, victim, Decision::Refuse(Refusal::SplitBrain));
        // No common generation in the bitmap slots: everything is copied.
        let far = SideState { discard_my_data: true, ..side(30, 40, [10, 0, 0, 0], UpToDate, Secondary) };
        check(side(20, 10, [0; 4], UpToDate, Secondary), far, Decision::SyncSource(SyncScope::Full));
    }

    #[test]
    fn two_primaries_are_refused() {
        let p = side(10, 0, [0; 4], UpToDate, Primary);
        check(p, p, Decision::Refuse(Refusal::BothPrimary));
        // Both promoted while apart and both wrote: that is a split brain first.
        let a = side(20, 10, [0; 4], UpToDate, Primary);
        let b = side(30, 10, [0; 4], UpToDate, Primary);
        check(a, b, Decision::Refuse(Refusal::SplitBrain));
    }

    #[test]
    fn inconsistent_source_is_refused() {
        let broken = side(20, 10, [0; 4], Inconsistent, Secondary);
        check(broken, sec(10, 0), Decision::Refuse(Refusal::NoConsistentSource));
        // An Outdated node may still be a source of what it has.
        let outdated = side(20, 10, [0; 4], Outdated, Secondary);
        check(outdated, sec(10, 0), Decision::SyncSource(SyncScope::Bitmap));
    }

    /// Exhaustive over a small universe of ids: the decision is always the mirror of
    /// the swapped decision, and never makes a Primary a target.
    #[test]
    fn decisions_are_symmetric_over_a_small_universe() {
        let ids = [0u64, 1, 2, 3];
        let disks = [Inconsistent, Outdated, UpToDate];
        let roles = [Primary, Secondary];
        let mut sides = Vec::new();
        for c in ids {
            for b in ids {
                for h in ids {
                    for d in disks {
                        for r in roles {
                            for flags in 0..8u8 {
                                let s = side(c, b, [h, 0, 0, 0], d, r);
                                sides.push(SideState {
                                    crashed_primary: flags & 1 != 0,
                                    dirty: flags & 2 != 0,
                                    discard_my_data: flags & 4 != 0,
                                    ..s
                                });
                            }
                        }
                    }
                }
            }
        }
        let mut checked = 0u64;
        for me in &sides {
            for peer in &sides {
                let me = &SideState { lower_name: true, ..*me };
                let d = decide(me, peer);
                let back = decide(peer, me);
                let consistent = match (&d, &back) {
                    (Decision::SyncSource(a), Decision::SyncTarget(b)) => a == b,
                    (Decision::SyncTarget(a), Decision::SyncSource(b)) => a == b,
                    (
                        Decision::Refuse(Refusal::PrimaryWouldBeTarget),
                        Decision::Refuse(Refusal::PeerPrimaryWouldBeTarget),
                    )
                    | (
                        Decision::Refuse(Refusal::PeerPrimaryWouldBeTarget),
                        Decision::Refuse(Refusal::PrimaryWouldBeTarget),
                    ) => true,
                    (a, b) => a == b,
                };
                assert!(consistent, "asymmetric: {d:?} vs {back:?}\nme {me:?}\npeer {peer:?}");
                if me.role == Primary {
                    assert!(!matches!(d, Decision::SyncTarget(_)), "primary as target: {me:?} {peer:?}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, (sides.len() * sides.len()) as u64);
    }
}
