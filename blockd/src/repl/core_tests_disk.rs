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
    // It reconnects diskless: nothing to sync, and promotion names the other case.
    let a = connect(&mut s, remote(10, 0, Role::Primary)).expect("connects diskless");
    assert!(a.is_empty(), "{:?}", show(&a));
    peer(&mut s, Message::State { role: Role::Secondary, disk: DiskState::UpToDate });
    let why = promote(&mut s, false).expect_err("no disk");
    assert!(why.contains("promote the peer"), "{why}");
    // Data sent anyway is never applied.
    let a = show(&peer(&mut s, w(3, 0)));
    assert!(
        a.iter().any(|x| x.starts_with("drop-link")) && !a.iter().any(|x| x.starts_with("local")),
        "{a:?}"
    );
}

/// `detach-disk` on a Secondary is a detach like after an error; on a Primary it is
/// refused.
#[test]
fn detach_disk_by_the_operator() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    let a = p.handle(Event::Command { id: 1, cmd: Command::DetachDisk });
    assert!(matches!(&a[..], [Action::Done { result: Err(e), .. }] if e.contains("Primary")), "{a:?}");
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

/// Before: the Primary's disk failed and it kept saying UpToDate. Now it detaches,
/// answers EIO (fail closed), and tells the peer.
#[test]
fn a_primary_whose_write_fails_detaches_and_tells_the_peer() {
    let mut p = core(Protocol::C, Role::Primary, 0);
    write(&mut p, 1, 0, 4096);
    let a = fail(&mut p, 1, Errno::EIO);
    assert!(a.iter().any(|x| x.contains("State") && x.contains("Diskless")), "{a:?}");
    assert!(a.contains(&"reply 1 error EIO".to_string()), "{a:?}");
    assert_eq!(p.disk(), DiskState::Diskless);
    assert!(show(&peer(&mut p, Message::WriteAck { id: 1, errno: 0 })).is_empty());
    assert_eq!(show(&write(&mut p, 2, 0, 4096)), ["reply 2 error EIO"]);
    // No metadata is written to a detached disk any more.
    let t = show(&h(&mut p, Event::Tick { elapsed_ms: 5000, app_requests: 0 }));
    assert!(!t.iter().any(|x| x.starts_with("persist") || x.starts_with("write-")), "{t:?}");
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
    let other = decide(&diskless(10, Role::Primary), &remote(20, 10, Role::Secondary));
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
