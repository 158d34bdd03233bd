//! Issue 15: pull-ahead. A protocol A Primary with more than `congestion-fill`
//! queued stops shipping writes (Ahead), records them in the bitmap under a new
//! generation, tells its peer (Behind: Outdated), and catches the peer up with a
//! bitmap resync once the queue drained.

use super::*;

const FILL: u64 = 64 << 10;

fn pull_ahead_primary() -> Core {
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = CoreConfig { pull_ahead_fill_bytes: Some(FILL), ..cfg(Protocol::A, 1 << 20) };
    let mut c = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 1);
    assert!(connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync").is_empty());
    c
}

/// Writes of 16 KiB at offsets 0, 16K, … until the Primary pulls ahead; returns
/// the actions of the write that made it, and the next job number.
fn write_until_ahead(c: &mut Core) -> (Vec<String>, u64) {
    for job in 1..100u64 {
        let mut done = show(&write(c, job, (job - 1) * 16384, 16384));
        done.extend(show(&local_done(c, job)));
        if c.repl_state() == ReplState::Ahead {
            return (done, job + 1);
        }
    }
    panic!("never pulled ahead");
}

#[test]
fn a_congested_primary_pulls_ahead_and_records_writes_in_the_bitmap() {
    let mut c = pull_ahead_primary();
    let (_, next) = write_until_ahead(&mut c);
    assert!(c.unsent_bytes() > FILL);
    assert_eq!(c.ahead_count(), 1);
    let gens = c.generations();
    assert_ne!(gens.current, 10, "a new generation, as for a lost peer");
    assert_eq!(gens.bitmap, 10);
    // A write while Ahead goes to the local disk only; it waits for the new
    // generation to be durable, then is acknowledged without the peer.
    let before = c.dirty_bytes();
    let sent = show(&write(&mut c, next, 1 << 20, 4096));
    assert!(sent.iter().all(|a| !a.starts_with("send")), "nothing shipped while Ahead: {sent:?}");
    let done = show(&local_done(&mut c, next));
    assert!(done.is_empty(), "waits for the durable generation: {done:?}");
    assert_eq!(c.dirty_bytes(), before + 4096, "recorded in the bitmap");
    let persist = c.last_persist_seq;
    let acked = show(&h(&mut c, Event::MetaDone { seq: persist, result: Ok(()) }));
    assert!(acked.contains(&format!("reply {next} ok")), "{acked:?}");
}

#[test]
fn the_peer_is_told_and_the_open_epoch_ends_with_a_flush_barrier() {
    let mut c = pull_ahead_primary();
    let (shown, _) = write_until_ahead(&mut c);
    let barrier = shown.iter().position(|a| a.starts_with("send barrier") && a.ends_with("flush=true"));
    let ahead = shown.iter().position(|a| a.starts_with("send Ahead"));
    assert!(barrier.is_some() && ahead.is_some() && barrier < ahead, "{shown:?}");
}

#[test]
fn a_drained_queue_starts_the_catch_up_resync() {
    let mut c = pull_ahead_primary();
    let (_, next) = write_until_ahead(&mut c);
    write(&mut c, next, 2 << 20, 4096);
    local_done(&mut c, next);
    let persist = c.last_persist_seq;
    h(&mut c, Event::MetaDone { seq: persist, result: Ok(()) });
    // Half drained is not enough to leave Ahead when more than half the fill is
    // still queued.
    let unsent = c.unsent_bytes();
    assert!(h(&mut c, Event::PeerSent { bytes: unsent - FILL / 2 - 1 }).is_empty());
    assert_eq!(c.repl_state(), ReplState::Ahead);
    let catch_up = show(&h(&mut c, Event::PeerSent { bytes: 1 }));
    assert!(catch_up.iter().any(|a| a.starts_with("send StartRepair")), "{catch_up:?}");
    assert_eq!(c.repl_state(), ReplState::SyncSource);
    assert!(c.dirty_bytes() >= 4096);
}

#[test]
fn writers_waiting_for_the_send_buffer_are_released_when_pulling_ahead() {
    // A send buffer smaller than one write: each write waits for the socket.
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = CoreConfig { pull_ahead_fill_bytes: Some(FILL), ..cfg(Protocol::A, FILL) };
    let mut c = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 1);
    assert!(connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync").is_empty());
    write(&mut c, 1, 0, 60 << 10);
    local_done(&mut c, 1);
    write(&mut c, 2, 1 << 20, 32 << 10);
    let done = show(&local_done(&mut c, 2));
    assert_eq!(c.repl_state(), ReplState::Ahead);
    assert!(done.contains(&"reply 2 ok".to_string()), "not held by the send buffer: {done:?}");
}

#[test]
fn a_secondary_told_ahead_is_behind_and_outdated_until_it_catches_up() {
    let mut s = core(Protocol::A, Role::Secondary, 0);
    let shown = show(&peer(&mut s, Message::Ahead { queued_bytes: 1 << 20 }));
    assert_eq!(s.disk(), DiskState::Outdated);
    assert_eq!(s.repl_state(), ReplState::Behind);
    assert!(shown.iter().any(|a| a.starts_with("persist")), "recorded: {shown:?}");
    assert!(promote(&mut s, false).is_err(), "an Outdated node is not promoted without --force");
    // The catch-up: it becomes the target of a bitmap resync.
    let t = show(&peer(&mut s, Message::StartRepair { bytes: 4096 }));
    assert_eq!((s.repl_state(), s.disk()), (ReplState::SyncTarget, DiskState::Inconsistent), "{t:?}");
}

#[test]
fn losing_the_link_while_ahead_resyncs_by_generation() {
    let mut c = pull_ahead_primary();
    write_until_ahead(&mut c);
    let gens = c.generations();
    h(&mut c, Event::LinkDown);
    assert_eq!(c.generations(), gens, "the generation of the pull-ahead tracks the rest");
    // The peer comes back Outdated at the old generation: a bitmap resync from here.
    let outdated = SideState { disk: DiskState::Outdated, ..remote(10, 0, Role::Secondary) };
    let shown = show(&connect(&mut c, outdated).expect("connects"));
    assert_eq!(c.repl_state(), ReplState::SyncSource, "{shown:?}");
}

/// Issue 15 item 4: a target whose image was consistent asks for an undo
/// journal before its first resync write; `primary --force` after the source is
/// lost rolls back first, marks the restored ranges out of sync and promotes the
/// older image under a generation of its own.
#[test]
fn a_forced_target_rolls_back_to_its_fallback_image_first() {
    let mut t = core(Protocol::A, Role::Secondary, 0);
    let shown = show(&peer(&mut t, Message::StartRepair { bytes: 8192 }));
    assert!(shown.contains(&"catch-up-begin discarded=false".to_string()), "{shown:?}");
    assert!(t.fallback());
    h(&mut t, Event::LinkDown);
    let mut out = Vec::new();
    t.promote(7, true, &mut out).expect("asked");
    assert_eq!(show(&out), ["roll-back"], "nothing else before the rollback");
    assert_eq!(t.role(), Role::Secondary);
    let restored = vec![0..8192, 1 << 20..(1 << 20) + 4096];
    let done = show(&h(&mut t, Event::RolledBack { result: Ok(restored) }));
    assert_eq!((t.role(), t.disk()), (Role::Primary, DiskState::UpToDate), "{done:?}");
    assert_ne!(t.generations().current, 10, "a generation of its own");
    assert_eq!(t.dirty_bytes(), 8192 + 4096, "the restored ranges are out of sync");
    assert!(done.iter().any(|a| a.starts_with("catch-up-end")), "{done:?}");
    assert!(!t.fallback());
}

#[test]
fn a_target_whose_fallback_was_lost_is_forced_as_before() {
    let mut t = core(Protocol::A, Role::Secondary, 0);
    peer(&mut t, Message::StartRepair { bytes: 8192 });
    h(&mut t, Event::FallbackLost { reason: "undo journal full".into() });
    assert_eq!(t.fallback_lost(), Some("undo journal full"));
    h(&mut t, Event::LinkDown);
    let mut out = Vec::new();
    t.promote(7, true, &mut out).expect("promoted");
    assert!(!show(&out).contains(&"roll-back".to_string()));
    assert_eq!((t.role(), t.disk()), (Role::Primary, DiskState::UpToDate));
}

/// Sim seed 841: a resync chunk read while Ahead carries writes never shipped;
/// an older shipped write still queued on the peer would undo them. No chunk is
/// read before the barrier closing the last shipped epoch is acknowledged.
#[test]
fn resync_chunks_wait_for_the_barrier_that_closed_the_shipped_writes() {
    let mut c = pull_ahead_primary();
    let (shown, next) = write_until_ahead(&mut c);
    // A write while Ahead: only a resync chunk will carry it.
    write(&mut c, next, 0, 4096);
    local_done(&mut c, next);
    let persist = c.last_persist_seq;
    h(&mut c, Event::MetaDone { seq: persist, result: Ok(()) });
    let epoch = shown
        .iter()
        .find_map(|a| a.strip_prefix("send barrier e").and_then(|r| r.strip_suffix(" flush=true")))
        .and_then(|e| e.parse::<u64>().ok())
        .expect("the flush barrier closing the shipped writes");
    let unsent = c.unsent_bytes();
    let catch_up = show(&h(&mut c, Event::PeerSent { bytes: unsent }));
    assert!(catch_up.iter().any(|a| a.starts_with("send StartRepair")), "{catch_up:?}");
    assert!(!catch_up.iter().any(|a| a.contains("ResyncRead")), "no chunk read yet: {catch_up:?}");
    let acked = show(&peer(&mut c, Message::BarrierAck { epoch, errno: 0 }));
    assert!(acked.iter().any(|a| a.contains("ResyncRead")), "chunks go once acknowledged: {acked:?}");
}

/// Found by the real-process test (tests/wan.rs): an `Ahead` received while
/// already a sync target left the node showing Behind after its resync ended.
#[test]
fn a_target_told_ahead_is_not_behind_after_its_resync() {
    let mut s = core(Protocol::A, Role::Secondary, 0);
    peer(&mut s, Message::StartRepair { bytes: 4096 });
    peer(&mut s, Message::Ahead { queued_bytes: 1 << 20 });
    assert_eq!((s.repl_state(), s.disk()), (ReplState::SyncTarget, DiskState::Inconsistent));
    assert!(!s.behind, "the running resync covers it");
}

/// Sim seed 300: the peer came back while the rollback ran; the target became
/// its sync target and was then promoted while connected (two Primaries). No
/// link is set up while a rollback runs.
#[test]
fn no_link_is_set_up_while_rolling_back() {
    let mut t = core(Protocol::A, Role::Secondary, 0);
    peer(&mut t, Message::StartRepair { bytes: 8192 });
    h(&mut t, Event::LinkDown);
    let mut out = Vec::new();
    t.promote(7, true, &mut out).expect("asked");
    let up = show(&h(&mut t, Event::LinkUp));
    assert!(up.iter().any(|a| a.starts_with("drop-link")), "{up:?}");
    assert_eq!(t.link(), Link::Disconnected);
    h(&mut t, Event::RolledBack { result: Ok(std::iter::once(0..4096).collect()) });
    assert_eq!(t.role(), Role::Primary);
}
