//! Issue 13: an I/O error on a node's own disk detaches it; no node with a failed
//! disk claims UpToDate or is promoted; the Primary tracks what a failed peer lacks.

use super::*;

fn fail(c: &mut Core, job: impl IntoJob, errno: Errno) -> Vec<String> {
    show(&h(c, Event::LocalDone { job: job.job(), result: Err(errno), buf: None }))
}

fn diskless(current: u64, role: Role) -> SideState {
    SideState { disk: DiskState::Diskless, ..remote(current, 0, role) }
}

/// Before: a Secondary whose disk failed a replicated write kept saying UpToDate,
/// was promoted, and served stale data. Now the failure detaches its disk before
/// anything could acknowledge the epoch, it leaves the link, it is Diskless once its
/// last op is back, and promotion is refused, naming why.
#[test]
fn a_secondary_whose_write_fails_detaches_and_is_never_promoted() {
    let mut s = core(Protocol::C, Role::Secondary, 0);
    let w = |id, offset| Message::Write { id, epoch: 1, offset, fua: false, data: data(4096) };
    peer(&mut s, w(1, 0));
    peer(&mut s, w(2, 4096));
    peer(&mut s, Message::Barrier { epoch: 1, flush: false });
    let failed = fail(&mut s, ij(JobKind::Apply, 1), Errno::EIO);
    assert!(failed.iter().any(|a| a.starts_with("drop-link")), "{failed:?}");
    assert!(!failed.iter().any(|a| a.starts_with("send barrier-ack")), "no epoch acknowledged: {failed:?}");
    assert!(!failed.iter().any(|a| a == "send write-ack 1 0"), "{failed:?}");
    assert_eq!(s.disk(), DiskState::Failed, "an op of its own is still on the disk");
    let f = s.disk_failure().expect("recorded");
    assert_eq!((f.op, f.errno, f.offset), ("replicated write", Some(libc::EIO), Some(0)));
    let last = show(&local_done(&mut s, ij(JobKind::Apply, 2)));
    assert!(!last.iter().any(|a| a.starts_with("send barrier-ack")), "{last:?}");
    assert_eq!(s.disk(), DiskState::Diskless);
    for force in [false, true] {
        let why = promote(&mut s, force).expect_err("no disk");
        assert!(why.contains("Diskless") && why.contains("not connected"), "{why}");
    }
    assert_eq!(s.role(), Role::Secondary);
    // It reconnects diskless: nothing to sync. With the peer Primary it is refused;
    // once the peer is an UpToDate Secondary, it may become a diskless Primary
    // (asking the peer), never a Primary of its own data.
    let a = connect(&mut s, remote(10, 0, Role::Primary)).expect("connects diskless");
    assert!(a.is_empty(), "{:?}", show(&a));
    let why = promote(&mut s, false).expect_err("peer is Primary");
    assert!(why.contains("peer is Primary"), "{why}");
    peer(&mut s, Message::State { role: Role::Secondary, disk: DiskState::Outdated });
    let why = promote(&mut s, true).expect_err("no UpToDate peer");
    assert!(why.contains("not UpToDate either"), "{why}");
    peer(&mut s, Message::State { role: Role::Secondary, disk: DiskState::UpToDate });
    let asked = show(&promote(&mut s, false).expect("asks the peer"));
    assert!(asked.iter().any(|x| x.contains("StatePrepare")), "{asked:?}");
    // Data sent anyway is never applied.
    let a = show(&peer(&mut s, w(3, 0)));
    assert!(
        a.iter().any(|x| x.starts_with("drop-link")) && !a.iter().any(|x| x.starts_with("local")),
        "{a:?}"
    );
}

/// `detach-disk` is a detach like after an error; on a Primary only while its peer
/// can serve in its place.
#[test]
fn detach_disk_by_the_operator() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    h(&mut p, Event::LinkDown);
    let a = p.handle(Event::Command { id: 1, cmd: Command::DetachDisk });
    assert!(matches!(&a[..], [Action::Done { result: Err(e), .. }] if e.contains("Primary")), "{a:?}");
    let mut p = core(Protocol::C, Role::Primary, 0);
    h(&mut p, Event::Command { id: 1, cmd: Command::DetachDisk });
    assert_eq!((p.role(), p.disk()), (Role::Primary, DiskState::Diskless));
    let mut s = core(Protocol::C, Role::Secondary, 0);
    let a = show(&s.handle(Event::Command { id: 1, cmd: Command::DetachDisk }));
    assert!(a.iter().any(|x| x.starts_with("drop-link")), "{a:?}");
    assert_eq!(s.disk(), DiskState::Diskless);
    assert_eq!(s.disk_failure().map(|f| f.op), Some("detach-disk"));
}

/// ENOSPC on a Secondary is a failed peer write like any other.
#[test]
fn enospc_on_a_secondary_detaches() {
    let mut s = core(Protocol::A, Role::Secondary, 0);
    peer(&mut s, Message::Write { id: 1, epoch: 1, offset: 8192, fua: false, data: data(4096) });
    fail(&mut s, ij(JobKind::Apply, 1), Errno::ENOSPC);
    assert_eq!(s.disk(), DiskState::Diskless);
    assert_eq!(s.disk_failure().and_then(|f| f.errno), Some(libc::ENOSPC));
}

/// The Primary's view: a peer that reports a failed write is left (its transfer
/// log goes into the bitmap under a new generation), and the write is acknowledged
/// only once that generation is durable (protocol C: the data is here and the range
/// is recorded as the peer's to resync).
#[test]
fn a_peer_write_error_leaves_the_link_and_records_the_range() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    write(&mut p, 1, 0, 4096);
    local_done(&mut p, 1);
    let a = show(&peer(&mut p, Message::WriteAck { id: 1, errno: libc::EIO }));
    assert!(a.iter().any(|x| x.starts_with("drop-link")), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("reply 1")), "waits for the new generation: {a:?}");
    let Some(seq) = a.iter().find_map(|x| x.strip_prefix("persist ")) else { panic!("{a:?}") };
    let done = show(&h(&mut p, Event::MetaDone { seq: seq.parse().expect("seq"), result: Ok(()) }));
    assert_eq!(done, ["reply 1 ok"]);
    assert_eq!(p.dirty_bytes(), 4096);
    assert_eq!(p.generations().bitmap, 10, "the peer's generation is the bitmap's");
    // It comes back diskless: connected, and nothing is sent to it.
    let a = connect(&mut p, diskless(10, Role::Secondary)).expect("connects");
    assert!(a.is_empty(), "{:?}", show(&a));
    assert_eq!(p.repl_state(), ReplState::Established);
    let w = show(&write(&mut p, 2, 8192, 4096));
    assert_eq!(w, ["local 2 write"], "not replicated to a diskless peer");
    assert_eq!(show(&local_done(&mut p, 2)), ["reply 2 ok"]);
    assert_eq!(p.dirty_bytes(), 8192);
    let f = show(&h(&mut p, Event::Nbd { job: JobId::nbd(3), request: Request::Flush }));
    assert_eq!(f, ["local 3 flush"], "no barrier to a diskless peer");
    assert!(
        p.handle(Event::Command { id: 1, cmd: Command::Verify { repair: false } })
            .iter()
            .any(|a| matches!(a, Action::Done { result: Err(e), .. } if e.contains("Diskless")))
    );
}

/// A failed barrier (protocol A: the write errors come with it) is the same.
#[test]
fn a_failed_barrier_marks_its_epoch_and_leaves_the_link() {
    let mut p = core(Protocol::A, Role::Primary, 1 << 20);
    write(&mut p, 1, 0, 4096);
    assert_eq!(show(&local_done(&mut p, 1)), ["reply 1 ok"]);
    let f = show(&h(&mut p, Event::Nbd { job: JobId::nbd(2), request: Request::Flush }));
    assert!(f.contains(&"send barrier e1 flush=true".to_string()), "{f:?}");
    let a = show(&peer(&mut p, Message::BarrierAck { epoch: 1, errno: libc::EIO }));
    assert!(a.iter().any(|x| x.starts_with("drop-link")), "{a:?}");
    assert_eq!(p.dirty_bytes(), 4096, "the acknowledged write is the peer's to resync");
}

/// Before: the Primary's disk failed, the client got EIO although the peer held a
/// good copy, and the Primary kept saying UpToDate. Now it detaches and serves
/// through its peer: the failed write is answered from the peer's write, later
/// writes go to the peer only (acknowledged on its WriteAck, whatever the
/// protocol), reads are read there, flushes are flush barriers.
#[test]
fn a_primary_whose_disk_fails_serves_through_its_peer() {
    let mut p = core(Protocol::A, Role::Primary, 1 << 20);
    write(&mut p, 1, 0, 4096);
    let a = fail(&mut p, 1, Errno::EIO);
    assert!(a.iter().any(|x| x.contains("State") && x.contains("Diskless")), "{a:?}");
    assert!(
        a.contains(&"send barrier e1 flush=true".to_string()),
        "what was in flight is confirmed by it: {a:?}"
    );
    assert!(!a.iter().any(|x| x.starts_with("reply 1")), "{a:?}");
    assert_eq!(p.disk(), DiskState::Diskless);
    assert_eq!(show(&peer(&mut p, Message::BarrierAck { epoch: 1, errno: 0 })), ["reply 1 ok"]);
    // A later write: to the peer only, done on its WriteAck.
    assert_eq!(show(&write(&mut p, 2, 8192, 4096)), ["send write 2 e2"]);
    assert_eq!(show(&peer(&mut p, Message::WriteAck { id: 2, errno: 0 })), ["reply 2 ok"]);
    // A read: after the epoch holding write 2, from the peer.
    let r = p.handle(Event::Nbd {
        job: JobId::nbd(3),
        request: Request::Read { offset: 8192, buf: BufMut::unpooled(4096) },
    });
    assert!(
        matches!(
            &r[..],
            [
                Action::Send(Message::Barrier { epoch: 2, .. }),
                Action::Send(Message::ReadReq { id: 3, offset: 8192, len: 4096, after_epoch: 2 })
            ]
        ),
        "{r:?}"
    );
    let mut data = BufMut::unpooled(4096);
    data.fill(7);
    let r = p.handle(Event::PeerMessage(Message::ReadData { id: 3, errno: 0, data: data.freeze() }));
    assert!(
        matches!(&r[..], [Action::Reply { outcome: Outcome::Read(b), .. }] if b[0] == 7 && b.len() == 4096),
        "{r:?}"
    );
    // A flush: a flush barrier, answered by its ack.
    let f = show(&h(&mut p, Event::Nbd { job: JobId::nbd(4), request: Request::Flush }));
    assert_eq!(f, ["send barrier e3 flush=true"]);
    assert_eq!(show(&peer(&mut p, Message::BarrierAck { epoch: 3, errno: 0 })), ["reply 4 ok"]);
    // No metadata is written to a detached disk any more.
    let t = show(&h(&mut p, Event::Tick { elapsed_ms: 5000, app_requests: 0 }));
    assert!(!t.iter().any(|x| x.starts_with("persist") || x.starts_with("write-")), "{t:?}");
    // The link goes: what waits for the peer fails, and so does everything new.
    write(&mut p, 5, 0, 4096);
    p.handle(Event::Nbd {
        job: JobId::nbd(6),
        request: Request::Read { offset: 0, buf: BufMut::unpooled(4096) },
    });
    let gone = show(&h(&mut p, Event::LinkDown));
    assert!(
        gone.contains(&"reply 5 error EIO".to_string()) && gone.contains(&"reply 6 error EIO".to_string()),
        "{gone:?}"
    );
    assert_eq!(show(&write(&mut p, 7, 0, 4096)), ["reply 7 error EIO"]);
    let r = show(&h(
        &mut p,
        Event::Nbd { job: JobId::nbd(8), request: Request::Read { offset: 0, buf: BufMut::unpooled(4096) } },
    ));
    assert_eq!(r, ["reply 8 error EIO"], "never stale data");
}

/// A diskless Primary's peer: writes are acknowledged when written (protocol A
/// here), reads are served after the named epoch, and it records everything as
/// out of sync for the Primary's disk under a generation of its own, durable
/// before it applies anything.
#[test]
fn the_peer_of_a_diskless_primary_tracks_and_serves() {
    let mut s = core(Protocol::A, Role::Secondary, 0);
    let a = show(&peer(&mut s, Message::State { role: Role::Primary, disk: DiskState::Diskless }));
    let Some(seq) = a.iter().find_map(|x| x.strip_prefix("persist ")) else { panic!("{a:?}") };
    assert_ne!(s.generations().bitmap, 0, "a generation of its own");
    assert_eq!(s.dirty_bytes(), SIZE, "everything is out of sync for that disk");
    let w = show(&peer(&mut s, Message::Write { id: 9, epoch: 1, offset: 0, fua: false, data: data(4096) }));
    assert!(w.is_empty(), "held until the generation is durable: {w:?}");
    let d = show(&h(&mut s, Event::MetaDone { seq: seq.parse().expect("seq"), result: Ok(()) }));
    assert_eq!(d, ["local Apply@1:1 write"]);
    assert_eq!(show(&local_done(&mut s, ij(JobKind::Apply, 1))), ["send write-ack 9 0"]);
    // A read after epoch 1: waits for its barrier.
    assert!(show(&peer(&mut s, Message::ReadReq { id: 4, offset: 0, len: 4096, after_epoch: 1 })).is_empty());
    let b = show(&peer(&mut s, Message::Barrier { epoch: 1, flush: false }));
    assert_eq!(b, ["send barrier-ack e1 0", "local PeerRead@1:2 read"]);
    let r = s.handle(Event::LocalDone {
        job: ij(JobKind::PeerRead, 2),
        result: Ok(()),
        buf: Some(BufMut::unpooled(4096)),
    });
    assert!(
        matches!(&r[..], [Action::Send(Message::ReadData { id: 4, errno: 0, data })] if data.len() == 4096),
        "{r:?}"
    );
}

/// A diskless Secondary is promoted while its peer is connected and UpToDate (the
/// peer agrees), and then serves through it; never with `--force` alone.
#[test]
fn a_diskless_node_is_promoted_only_to_serve_through_its_peer() {
    let mut s = core(Protocol::C, Role::Secondary, 0);
    h(&mut s, Event::Command { id: 1, cmd: Command::DetachDisk });
    connect(&mut s, remote(10, 0, Role::Secondary)).expect("connects diskless");
    let a = show(&promote(&mut s, false).expect("asks the peer"));
    let Some(tid) = a.iter().find_map(|x| x.strip_prefix("send StatePrepare { tid: ")) else {
        panic!("{a:?}")
    };
    let tid: u64 = tid.split(',').next().expect("tid").parse().expect("tid");
    let c = show(&peer(&mut s, Message::StateReply { tid, yes: true, reason: String::new() }));
    assert!(c.iter().any(|x| x.contains("Primary") && x.contains("Diskless")), "{c:?}");
    assert_eq!((s.role(), s.disk()), (Role::Primary, DiskState::Diskless));
    assert_eq!(show(&write(&mut s, 2, 0, 4096)), ["send write 2 e1"]);
}

/// A failed client read detaches too (the client has its error).
#[test]
fn a_failed_client_read_detaches() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    h(&mut p, Event::ReadFailed { offset: 4096, errno: Errno::EIO });
    assert_eq!(p.disk(), DiskState::Diskless);
    assert_eq!(p.disk_failure().map(|f| (f.op, f.offset)), Some(("read", Some(4096))));
}

/// ENOSPC on the Primary: the client gets ENOSPC, the disk stays, and the range is
/// resynced from here (the peer may have applied the write). Before, nothing
/// recorded it and the copies differed.
#[test]
fn enospc_on_a_primary_is_passed_on_and_resynced() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    write(&mut p, 1, 0, 4096);
    assert!(fail(&mut p, 1, Errno::ENOSPC).is_empty());
    assert_eq!(show(&peer(&mut p, Message::WriteAck { id: 1, errno: 0 })), ["reply 1 error ENOSPC"]);
    assert_eq!(p.disk(), DiskState::UpToDate);
    assert_eq!(p.dirty_bytes(), 4096);
    let t = show(&h(&mut p, Event::Tick { elapsed_ms: 100, app_requests: 0 }));
    assert!(t.iter().any(|x| x.contains("StartRepair")), "{t:?}");
    assert_eq!(p.repl_state(), ReplState::SyncSource);
}

/// The connect decision with a diskless side.
#[test]
fn connect_decisions_with_a_diskless_side() {
    use crate::repl::decide::{Decision, Refusal, decide};
    let up = remote(10, 0, Role::Secondary);
    assert_eq!(decide(&diskless(10, Role::Secondary), &up), Decision::Diskless);
    assert_eq!(decide(&up, &diskless(5, Role::Secondary)), Decision::Diskless);
    assert_eq!(
        decide(&diskless(10, Role::Secondary), &diskless(10, Role::Secondary)),
        Decision::Refuse(Refusal::NoDisk)
    );
    // A diskless Primary needs the very data it served.
    assert_eq!(decide(&diskless(10, Role::Primary), &up), Decision::Diskless);
    // ... or the generation its peer started when it lost its disk.
    let moved_on = decide(&diskless(10, Role::Primary), &remote(20, 10, Role::Secondary));
    assert_eq!(moved_on, Decision::Diskless);
    let other = decide(&diskless(10, Role::Primary), &remote(20, 5, Role::Secondary));
    assert_eq!(other, Decision::Refuse(Refusal::DisklessPrimaryWithoutData));
    let outdated = SideState { disk: DiskState::Outdated, ..up };
    let d = decide(&outdated, &diskless(10, Role::Primary));
    assert_eq!(d, Decision::Refuse(Refusal::DisklessPrimaryWithoutData));
}

fn tick(c: &mut Core, ms: u64) -> Vec<String> {
    show(&h(c, Event::Tick { elapsed_ms: ms, app_requests: 0 }))
}

/// Before: a peer whose disk hung (its process alive, answering pings) stalled the
/// Primary's write+flush for good. Now a peer that owes an acknowledgement and
/// makes no progress for `ack-timeout` is disconnected, and the write completes
/// locally with its range in the bitmap.
#[test]
fn a_peer_that_does_not_answer_within_ack_timeout_is_disconnected() {
    let cfg = CoreConfig { ack_timeout_ms: 2_000, ..cfg(Protocol::C, 0) };
    let gens = Generations { current: 10, ..Generations::default() };
    let mut p = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 1);
    connect(&mut p, remote(10, 0, Role::Secondary)).expect("in sync");
    write(&mut p, 1, 0, 4096);
    write(&mut p, 2, 4096, 4096);
    local_done(&mut p, 1);
    local_done(&mut p, 2);
    for _ in 0..15 {
        assert!(!tick(&mut p, 100).iter().any(|a| a.starts_with("drop-link")));
    }
    // An answer is progress: the clock starts again.
    peer(&mut p, Message::WriteAck { id: 1, errno: 0 });
    for i in 0..19 {
        let t = tick(&mut p, 100);
        assert!(!t.iter().any(|a| a.starts_with("drop-link")), "{i}: {t:?}");
    }
    let a = tick(&mut p, 100);
    assert!(a.iter().any(|x| x.starts_with("drop-link")), "{a:?}");
    assert_eq!(p.ack_timeouts(), 1);
    assert_eq!(p.link(), Link::Disconnected);
    // The new generation's persist goes first; the reply follows once it is
    // durable (here with the tick's bitmap write, which `h` completes and which the
    // shell carries out after it).
    let persist = a.iter().position(|x| x.starts_with("persist")).expect("new generation");
    let reply = a.iter().position(|x| x == "reply 2 ok").expect("completes locally");
    assert!(persist < reply, "{a:?}");
    assert_eq!(p.dirty_bytes(), 8192, "both ranges are the peer's to resync");
    // Nothing owed: no timeout however long it is quiet.
    let mut s = core(Protocol::C, Role::Primary, 0);
    for _ in 0..200 {
        assert!(!tick(&mut s, 100).iter().any(|a| a.starts_with("drop-link")));
    }
}

/// Found by the simulator (seed 588, a hung disk under protocol B): a Secondary was
/// promoted while a write it had acknowledged (RecvAck) was still on its way to
/// its disk, and served the older data. Now promotion waits for those writes.
#[test]
fn promotion_waits_for_the_peers_writes_to_land() {
    let mut s = core(Protocol::B, Role::Secondary, 0);
    let a = show(&peer(&mut s, Message::Write { id: 5, epoch: 1, offset: 0, fua: false, data: data(4096) }));
    assert_eq!(a, ["send recv-ack 5", "local Apply@1:1 write"]);
    h(&mut s, Event::LinkDown);
    let why = promote(&mut s, true).expect_err("its write is not on the disk yet");
    assert!(why.contains("still being written"), "{why}");
    local_done(&mut s, ij(JobKind::Apply, 1));
    promote(&mut s, false).expect("promoted once it landed");
    assert_eq!(s.role(), Role::Primary);
}

/// Found by the simulator (seed 2234): a Primary whose disk failed came back
/// Outdated at the generation its peer still had (the peer finished a resync from
/// it just after the failure, so it had not started its own), and the crashed
/// Primary's flag made the stale disk the resync source. Now an Outdated disk at
/// the same generation is a full sync's target whatever the flags say, and a
/// target that finishes while its Primary is diskless starts tracking then.
#[test]
fn an_outdated_disk_at_the_same_generation_is_resynced_in_full() {
    use crate::repl::decide::{Decision, SyncScope, decide};
    let up = remote(10, 0, Role::Secondary);
    let stale =
        SideState { disk: DiskState::Outdated, crashed_primary: true, ..remote(10, 0, Role::Secondary) };
    assert_eq!(decide(&stale, &up), Decision::SyncTarget(SyncScope::Full));
    assert_eq!(decide(&up, &stale), Decision::SyncSource(SyncScope::Full));
}

/// Found by the fault tests: a sync target whose disk failed mid-resync was
/// recorded Outdated (consistent) in its metadata. Now it stays Inconsistent.
#[test]
fn a_failed_sync_target_stays_inconsistent_in_its_metadata() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut t = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 4);
    connect(&mut t, remote(20, 10, Role::Secondary)).expect("target");
    assert_eq!(t.repl_state(), ReplState::SyncTarget);
    let a = t.handle(Event::Command { id: 1, cmd: Command::DetachDisk });
    let recorded = a.iter().rev().find_map(|x| match x {
        Action::Persist { disk, .. } => Some(*disk),
        _ => None,
    });
    assert_eq!(recorded, Some(DiskState::Inconsistent), "{a:?}");
}

/// Found by the fault tests and the simulator (seed 2507): after an unclean stop a
/// node came back UpToDate (its failed disk could not record Outdated; or it lost
/// unflushed acknowledged writes in a crash) and was promoted on its own data,
/// serving stale blocks. Now such a node is Consistent until it hears its peer:
/// promotion is refused without --force; connecting makes it UpToDate (in sync or
/// source) or a sync target.
#[test]
fn a_consistent_disk_is_promoted_only_by_force_or_after_connecting() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut c = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::Consistent, gens, 1);
    let why = promote(&mut c, false).expect_err("Consistent");
    assert!(why.contains("Consistent") && why.contains("--force"), "{why}");
    connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync");
    assert_eq!(c.disk(), DiskState::UpToDate, "heard the peer, nothing newer there");
    let mut f = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::Consistent, gens, 1);
    promote(&mut f, true).expect("the operator vouches for it");
    assert_eq!((f.role(), f.disk(), f.generations().bitmap), (Role::Primary, DiskState::UpToDate, 10));
}
