//! Scripted event streams through the core: the ack table, epochs, flushes, peer loss
//! and the Secondary's epoch ordering.

use nbd_server::buf::BufMut;

use super::*;
use crate::repl::decide::SideState;

const G: u64 = 4096;

const SIZE: u64 = 64 << 20;

fn cfg(protocol: Protocol, send_buffer_bytes: u64) -> CoreConfig {
    CoreConfig {
        protocol,
        send_buffer_bytes,
        granularity_bytes: G,
        size_bytes: SIZE,
        al_extents: 64,
        resync_rate_bytes_per_sec: None,
        resync_min_rate_bytes_per_sec: 8 << 20,
        resync_checksum: false,
        fence_peer: false,
        name_sorts_first: true,
        on_io_error: crate::config::IoErrorPolicy::Detach,
        ack_timeout_ms: crate::config::DEFAULT_ACK_TIMEOUT_MS,
        pull_ahead_fill_bytes: None,
        bugs: Default::default(),
    }
}

/// An empty bitmap for a device of `size` bytes.
fn bm(size: u64) -> Bitmap {
    let mut b = Bitmap::new(size, G).expect("bitmap");
    b.mark_persisted();
    b
}

fn new_core(cfg: CoreConfig, role: Role, disk: DiskState, gens: Generations, seed: u64) -> Core {
    let size = cfg.size_bytes;
    Core::new(cfg, role, disk, gens, false, bm(size), seed)
}

/// Handles `event`; activity-log transactions and bitmap writes complete at once
/// (their `MetaDurable` is fed back), so the tests see only the other actions.
fn h(c: &mut Core, event: Event) -> Vec<Action> {
    let mut pending = c.handle(event);
    let mut shown = Vec::new();
    while !pending.is_empty() {
        let mut next = Vec::new();
        for a in pending {
            match a {
                Action::WriteAl { seq, .. } | Action::WriteBitmap { seq, .. } => {
                    next.extend(c.handle(Event::MetaDone { seq, result: Ok(()) }))
                }
                other => shown.push(other),
            }
        }
        pending = next;
    }
    shown
}

/// `blockctl primary [--force]`: the actions, or the refusal.
fn promote(c: &mut Core, force: bool) -> Result<Vec<Action>, String> {
    let mut out = Vec::new();
    c.promote(0, force, &mut out).map(|_| out)
}

/// The link comes up and the peer's state (`remote`) arrives: the decision's
/// actions (after this node's own `ConnectState`), or the refusal.
fn connect(c: &mut Core, remote: SideState) -> Result<Vec<Action>, String> {
    let up = c.handle(Event::LinkUp);
    assert!(matches!(&up[..], [Action::Send(Message::ConnectState { .. })]), "{up:?}");
    use super::connect::{STATE_CRASHED_PRIMARY, STATE_DIRTY, STATE_DISCARD_MY_DATA};
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let flags = flag(remote.crashed_primary, STATE_CRASHED_PRIMARY)
        | flag(remote.dirty, STATE_DIRTY)
        | flag(remote.discard_my_data, STATE_DISCARD_MY_DATA);
    let msg = Message::ConnectState { gens: remote.gens, role: remote.role, disk: remote.disk, flags };
    let mut a = c.handle(Event::PeerMessage(msg));
    // Every connect ends by announcing this node's state: not shown.
    if matches!(a.last(), Some(Action::Send(Message::State { .. }))) {
        a.pop();
    }
    // The frames so far were written to the socket (send-buffer accounting).
    let queued = c.unsent_bytes();
    c.handle(Event::PeerSent { bytes: queued });
    match c.connection() {
        (ConnState::StandAlone, Some(reason)) => Err(reason.to_string()),
        _ => Ok(a),
    }
}

fn remote(current: u64, bitmap: u64, role: Role) -> SideState {
    SideState {
        gens: Generations { current, bitmap, ..Generations::default() },
        disk: DiskState::UpToDate,
        role,
        crashed_primary: false,
        dirty: false,
        discard_my_data: false,
        lower_name: false,
    }
}

/// A node at generation 10, connected to an in-sync peer.
fn core(protocol: Protocol, role: Role, send_buffer_bytes: u64) -> Core {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut c = new_core(cfg(protocol, send_buffer_bytes), role, DiskState::UpToDate, gens, 1);
    let peer_role = if role == Role::Primary { Role::Secondary } else { Role::Primary };
    assert!(connect(&mut c, remote(10, 0, peer_role)).expect("in sync").is_empty());
    assert_eq!(c.repl_state(), ReplState::Established);
    c
}

fn data(len: usize) -> Buf {
    BufMut::unpooled(len).freeze()
}

/// An internal job of the first link (the tests connect once).
fn ij(kind: JobKind, seq: u64) -> JobId {
    JobId::new(kind, 1, seq)
}

/// NBD job ids are given as plain numbers in these tests.
trait IntoJob {
    fn job(self) -> JobId;
}

impl IntoJob for u64 {
    fn job(self) -> JobId {
        JobId::nbd(self)
    }
}

impl IntoJob for JobId {
    fn job(self) -> JobId {
        self
    }
}

fn write(c: &mut Core, job: u64, offset: u64, len: usize) -> Vec<Action> {
    let job = JobId::nbd(job);
    h(c, Event::Nbd { job, request: Request::Write { offset, data: data(len), fua: false } })
}

fn local_done(c: &mut Core, job: impl IntoJob) -> Vec<Action> {
    let job = job.job();
    h(c, Event::LocalDone { job, result: Ok(()), buf: None })
}

fn peer(c: &mut Core, m: Message) -> Vec<Action> {
    h(c, Event::PeerMessage(m))
}

/// A compact picture of actions, for readable assertions.
/// NBD jobs by their number, the core's own by kind, link and sequence.
fn name(job: JobId) -> String {
    match job.kind() {
        JobKind::Nbd => job.raw().to_string(),
        _ => job.to_string(),
    }
}

fn show(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Local { job, op } => format!("local {} {}", name(*job), op_name(op)),
            Action::Send(m) => match m {
                Message::ResyncData { offset, data } => format!("send resync-data {offset} {}", data.len()),
                Message::ResyncZeroes { offset, len } => format!("send resync-zeroes {offset} {len}"),
                Message::ResyncAck { offset, len, errno } => {
                    format!("send resync-ack {offset} {len} {errno}")
                }
                Message::ResyncDone { gens } => format!("send resync-done {} {}", gens.current, gens.bitmap),
                Message::Write { id, epoch, .. } => format!("send write {id} e{epoch}"),
                Message::Barrier { epoch, flush } => format!("send barrier e{epoch} flush={flush}"),
                Message::BarrierAck { epoch, errno } => format!("send barrier-ack e{epoch} {errno}"),
                Message::WriteAck { id, errno } => format!("send write-ack {id} {errno}"),
                Message::RecvAck { id } => format!("send recv-ack {id}"),
                other => format!("send {other:?}"),
            },
            Action::Reply { job, outcome } => format!("reply {} {}", name(*job), outcome_name(outcome)),
            Action::Persist { seq, .. } => format!("persist {seq}"),
            Action::WriteBitmap { seq, blocks } => format!("write-bitmap {seq} {}", blocks.len()),
            Action::WriteAl { seq, extents } => format!("write-al {seq} {extents:?}"),
            Action::Done { id, result } => format!("done {id} {result:?}"),
            Action::DropLink { reason } => format!("drop-link {reason}"),
            Action::LinkPolicy { enabled } => format!("link-policy {enabled}"),
            Action::FencePeer => "fence-peer".to_string(),
            Action::AfterResyncTarget => "after-resync-target".to_string(),
            Action::CatchUpBegin { discarded } => format!("catch-up-begin discarded={discarded}"),
            Action::CatchUpEnd { after_seq } => format!("catch-up-end after {after_seq}"),
            Action::RollBack => "roll-back".to_string(),
        })
        .collect()
}

fn op_name(op: &IoOp) -> &'static str {
    match op {
        IoOp::Read { .. } => "read",
        IoOp::Write { .. } => "write",
        IoOp::Flush => "flush",
        IoOp::Trim { .. } => "trim",
        IoOp::WriteZeroes { .. } => "zeroes",
        IoOp::Cache { .. } => "cache",
    }
}

fn outcome_name(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Read(b) => format!("read {}", b.len()),
        Outcome::Error(e) => format!("error {e}"),
    }
}

#[test]
fn protocol_c_acks_after_local_and_peer_write() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    assert_eq!(show(&write(&mut c, 1, 0, 4096)), ["local 1 write", "send write 1 e1"]);
    assert!(local_done(&mut c, 1).is_empty(), "the peer has not written it yet");
    assert_eq!(show(&peer(&mut c, Message::WriteAck { id: 1, errno: 0 })), ["reply 1 ok"]);
    // Either order works.
    write(&mut c, 2, 8192, 4096);
    assert!(peer(&mut c, Message::WriteAck { id: 2, errno: 0 }).is_empty());
    assert_eq!(show(&local_done(&mut c, 2)), ["reply 2 ok"]);
}

#[test]
fn protocol_b_acks_on_receipt() {
    let mut c = core(Protocol::B, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    assert_eq!(show(&peer(&mut c, Message::RecvAck { id: 1 })), ["reply 1 ok"]);
}

#[test]
fn protocol_a_acks_when_queued_within_the_send_buffer() {
    let mut c = core(Protocol::A, Role::Primary, 1 << 20);
    write(&mut c, 1, 0, 4096);
    assert_eq!(show(&local_done(&mut c, 1)), ["reply 1 ok"], "fits in the buffer");
    // A buffer of zero bytes: the write waits until its frame reached the socket.
    let mut c = core(Protocol::A, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    assert!(local_done(&mut c, 1).is_empty(), "buffer full: the write blocks");
    let frame = Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: data(4096) }.wire_len();
    assert_eq!(c.unsent_bytes(), frame);
    assert!(h(&mut c, Event::PeerSent { bytes: frame - 1 }).is_empty());
    assert_eq!(show(&h(&mut c, Event::PeerSent { bytes: 1 })), ["reply 1 ok"]);
}

#[test]
fn overlapping_writes_are_serialized() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    write(&mut c, 1, 0, 8192);
    assert!(write(&mut c, 2, 4096, 4096).is_empty(), "waits for 1");
    local_done(&mut c, 1);
    let after = peer(&mut c, Message::WriteAck { id: 1, errno: 0 });
    // 1 is acknowledged, so 2 (which may depend on it) opens a new epoch.
    assert_eq!(
        show(&after),
        ["reply 1 ok", "send barrier e1 flush=false", "local 2 write", "send write 2 e2"]
    );
}

#[test]
fn a_write_after_an_ack_starts_a_new_epoch() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    assert_eq!(
        show(&write(&mut c, 2, 4096, 4096)),
        ["local 2 write", "send write 2 e1"],
        "independent: same epoch"
    );
    local_done(&mut c, 1);
    peer(&mut c, Message::WriteAck { id: 1, errno: 0 });
    assert_eq!(
        show(&write(&mut c, 3, 8192, 4096)),
        ["send barrier e1 flush=false", "local 3 write", "send write 3 e2"]
    );
}

#[test]
fn flush_waits_for_local_and_peer_flush_except_under_a() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    let f = h(&mut c, Event::Nbd { job: JobId::nbd(5), request: Request::Flush });
    assert_eq!(show(&f), ["send barrier e1 flush=true", "local 5 flush"]);
    assert!(local_done(&mut c, 5).is_empty());
    assert_eq!(show(&peer(&mut c, Message::BarrierAck { epoch: 1, errno: 0 })), ["reply 5 ok"]);

    let mut a = core(Protocol::A, Role::Primary, 1 << 20);
    let f = h(&mut a, Event::Nbd { job: JobId::nbd(5), request: Request::Flush });
    assert_eq!(show(&f), ["send barrier e1 flush=true", "local 5 flush"], "A still orders the peer");
    assert_eq!(show(&local_done(&mut a, 5)), ["reply 5 ok"]);
}

#[test]
fn peer_loss_completes_locally_after_a_durable_new_generation() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    let down = h(&mut c, Event::LinkDown);
    assert_eq!(show(&down), ["persist 2"], "no ack before the new generation is durable");
    let g = c.generations();
    assert_eq!((g.bitmap, g.current != 10 && g.current != 0), (10, true));
    assert_eq!(c.dirty_bytes(), 4096, "the peer may lack write 1");
    assert_eq!(show(&h(&mut c, Event::MetaDone { seq: 2, result: Ok(()) })), ["reply 1 ok"]);
    // Disconnected: local only, recorded dirty.
    assert_eq!(show(&write(&mut c, 2, 1 << 20, 8192)), ["local 2 write"]);
    assert_eq!(show(&local_done(&mut c, 2)), ["reply 2 ok"]);
    assert_eq!(c.dirty_bytes(), 4096 + 8192);
}

#[test]
fn acknowledged_protocol_a_writes_are_dirty_after_peer_loss() {
    let mut c = core(Protocol::A, Role::Primary, 1 << 20);
    write(&mut c, 1, 0, 4096);
    assert_eq!(show(&local_done(&mut c, 1)), ["reply 1 ok"]);
    h(&mut c, Event::LinkDown);
    assert_eq!(c.dirty_bytes(), 4096, "acked to the client but never confirmed by the peer");
}

#[test]
fn barrier_ack_trims_the_transfer_log() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    peer(&mut c, Message::WriteAck { id: 1, errno: 0 });
    h(&mut c, Event::Nbd { job: JobId::nbd(2), request: Request::Flush });
    local_done(&mut c, 2);
    peer(&mut c, Message::BarrierAck { epoch: 1, errno: 0 });
    h(&mut c, Event::LinkDown);
    assert_eq!(c.dirty_bytes(), 0, "the peer confirmed write 1's epoch");
}

#[test]
fn secondary_applies_epochs_in_order() {
    let mut s = core(Protocol::C, Role::Secondary, 0);
    let w = |id, epoch, offset| Message::Write { id, epoch, offset, fua: false, data: data(4096) };
    let (a1, a2) = (ij(JobKind::Apply, 1), ij(JobKind::Apply, 2));
    assert_eq!(show(&peer(&mut s, w(1, 1, 0))), [format!("local {a1} write")]);
    assert_eq!(show(&peer(&mut s, w(2, 1, 4096))), [format!("local {a2} write")]);
    assert!(peer(&mut s, Message::Barrier { epoch: 1, flush: true }).is_empty(), "epoch 1 still running");
    assert!(peer(&mut s, w(3, 2, 8192)).is_empty(), "epoch 2 waits for epoch 1");
    assert_eq!(show(&local_done(&mut s, a1)), ["send write-ack 1 0"]);
    let flush = ij(JobKind::ApplyFlush, 3);
    assert_eq!(
        show(&local_done(&mut s, a2)),
        ["send write-ack 2 0".to_string(), format!("local {flush} flush")]
    );
    assert_eq!(
        show(&local_done(&mut s, flush)),
        ["send barrier-ack e1 0".to_string(), format!("local {} write", ij(JobKind::Apply, 4))],
        "after the flush, epoch 2 starts"
    );
}

#[test]
fn secondary_under_b_acks_receipt_and_under_a_stays_silent() {
    let mut s = core(Protocol::B, Role::Secondary, 0);
    let m = Message::Write { id: 7, epoch: 1, offset: 0, fua: false, data: data(512) };
    assert_eq!(
        show(&peer(&mut s, m)),
        ["send recv-ack 7".to_string(), format!("local {} write", ij(JobKind::Apply, 1))]
    );
    assert!(local_done(&mut s, ij(JobKind::Apply, 1)).is_empty());
    let mut a = core(Protocol::A, Role::Secondary, 0);
    let m = Message::Write { id: 7, epoch: 1, offset: 0, fua: false, data: data(512) };
    assert_eq!(show(&peer(&mut a, m)), [format!("local {} write", ij(JobKind::Apply, 1))]);
    assert!(local_done(&mut a, ij(JobKind::Apply, 1)).is_empty());
}

#[test]
fn promotion_rules() {
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = cfg(Protocol::C, 0);
    let mut c = new_core(cfg.clone(), Role::Secondary, DiskState::Inconsistent, gens, 1);
    assert!(promote(&mut c, false).unwrap_err().contains("local disk is Inconsistent"));
    c.peer_role = Some(Role::Primary);
    assert!(promote(&mut c, true).unwrap_err().contains("peer is Primary"));
    c.peer_role = None;
    let a = promote(&mut c, true).expect("forced");
    assert_eq!(show(&a), ["persist 1"]);
    assert_eq!((c.role(), c.disk()), (Role::Primary, DiskState::UpToDate));
    assert_eq!(c.generations().bitmap, 10, "a new generation of its own");
    assert!(promote(&mut c, false).expect("idempotent").is_empty());
    // Promoted while disconnected: a new generation too.
    let mut d = new_core(cfg, Role::Secondary, DiskState::UpToDate, gens, 2);
    promote(&mut d, false).expect("UpToDate");
    assert_eq!(d.generations().bitmap, 10);
    let mut a = Vec::new();
    d.demote(&mut a).expect("idle");
    assert_eq!(show(&a), ["persist 2"], "after the promotion's persist 1");
    assert_eq!(d.role(), Role::Secondary);
}

#[test]
fn drain_waits_for_the_peer_even_under_a() {
    let mut a = core(Protocol::A, Role::Primary, 1 << 20);
    write(&mut a, 1, 0, 4096);
    local_done(&mut a, 1);
    let d = h(&mut a, Event::Drain { job: JobId::nbd(99) });
    assert_eq!(show(&d), ["send barrier e1 flush=true", "local 99 flush"]);
    assert!(local_done(&mut a, 99).is_empty(), "the peer has not confirmed yet");
    assert_eq!(show(&peer(&mut a, Message::BarrierAck { epoch: 1, errno: 0 })), ["reply 99 ok"]);
}

/// A Primary at generation 20 whose peer is still at 10 (the peer missed changes),
/// with its whole device dirty; the peer's (empty) bitmap has arrived.
fn source_core(size_bytes: u64) -> (Core, Vec<Action>) {
    source_core_with(CoreConfig { size_bytes, ..cfg(Protocol::C, 0) })
}

fn source_core_with(cfg: CoreConfig) -> (Core, Vec<Action>) {
    let size_bytes = cfg.size_bytes;
    let gens = Generations { current: 20, bitmap: 10, ..Generations::default() };
    let mut dirty = bm(size_bytes);
    dirty.set_all();
    let mut c = Core::new(cfg, Role::Primary, DiskState::UpToDate, gens, false, dirty, 3);
    let a = connect(&mut c, remote(10, 0, Role::Secondary)).expect("source");
    assert!(a.is_empty(), "waits for the target's bitmap: {:?}", show(&a));
    assert_eq!(c.repl_state(), ReplState::SyncSource);
    let a = peer(&mut c, Message::BitmapDone { blocks: 0 });
    (c, a)
}

fn read_done(c: &mut Core, job: impl IntoJob, len: usize, fill: u8) -> Vec<Action> {
    let job = job.job();
    let mut buf = BufMut::unpooled(len);
    buf.fill(fill);
    h(c, Event::LocalDone { job, result: Ok(()), buf: Some(buf) })
}

#[test]
fn full_resync_sends_data_and_zeroes_then_done() {
    let mib = RESYNC_CHUNK_BYTES;
    let (mut c, a) = source_core(2 * mib + 4096);
    let j = |seq| ij(JobKind::ResyncRead, seq);
    assert_eq!(
        show(&a),
        [format!("local {} read", j(1)), format!("local {} read", j(2)), format!("local {} read", j(3))]
    );
    let p = c.resync_progress();
    assert_eq!((p.done_bytes, p.total_bytes, p.sent_bytes), (0, 2 * mib + 4096, 0));
    assert_eq!(show(&read_done(&mut c, j(1), mib as usize, 7)), [format!("send resync-data 0 {mib}")]);
    assert_eq!(show(&read_done(&mut c, j(2), mib as usize, 0)), [format!("send resync-zeroes {mib} {mib}")]);
    assert_eq!(show(&read_done(&mut c, j(3), 4096, 1)), [format!("send resync-data {} 4096", 2 * mib)]);
    assert!(peer(&mut c, Message::ResyncAck { offset: 0, len: mib, errno: 0 }).is_empty());
    assert!(peer(&mut c, Message::ResyncAck { offset: 2 * mib, len: 4096, errno: 0 }).is_empty());
    let acked = peer(&mut c, Message::ResyncAck { offset: mib, len: mib, errno: 0 });
    assert_eq!(show(&acked), ["send ResyncFlush { id: 0 }"], "the target makes the chunks durable first");
    assert_eq!(c.dirty_bytes(), 2 * mib + 4096, "the bits stay until then");
    let done = peer(&mut c, Message::ResyncFlushed { id: 0 });
    assert_eq!(show(&done), ["persist 1", "send resync-done 20 0"], "in sync: the bitmap generation retires");
    assert_eq!(c.generations().history[0], 10);
    assert_eq!(c.repl_state(), ReplState::Established);
    assert_eq!(c.resync_progress().total_bytes, 0);
    assert_eq!(c.dirty_bytes(), 0);
}

#[test]
fn an_application_write_waits_for_an_overlapping_chunk() {
    let (mut c, _) = source_core(RESYNC_CHUNK_BYTES);
    let chunk = ij(JobKind::ResyncRead, 1);
    assert!(write(&mut c, 1, 4096, 4096).is_empty(), "the chunk holds the range");
    read_done(&mut c, chunk, RESYNC_CHUNK_BYTES as usize, 3);
    let after = peer(&mut c, Message::ResyncAck { offset: 0, len: RESYNC_CHUNK_BYTES, errno: 0 });
    let shown = show(&after);
    for expected in ["local 1 write", "send write 1 e1"] {
        assert!(shown.contains(&expected.to_string()), "released after the target has the chunk: {shown:?}");
    }
}

#[test]
fn losing_the_link_mid_resync_releases_chunk_ranges() {
    let (mut c, _) = source_core(RESYNC_CHUNK_BYTES);
    read_done(&mut c, ij(JobKind::ResyncRead, 1), RESYNC_CHUNK_BYTES as usize, 3);
    assert!(write(&mut c, 1, 0, 4096).is_empty());
    let down = h(&mut c, Event::LinkDown);
    assert!(show(&down).contains(&"local 1 write".to_string()), "{:?}", show(&down));
    assert_eq!(c.repl_state(), ReplState::Off);
}

#[test]
fn target_waits_for_durable_inconsistency_then_adopts_generations() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut t = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 4);
    let a = connect(&mut t, remote(20, 10, Role::Primary)).expect("target");
    assert_eq!(
        show(&a),
        [
            "send BitmapDone { blocks: 0 }",
            "catch-up-begin discarded=false",
            "persist 1",
            "send State { role: Secondary, disk: Inconsistent }"
        ],
        "its own bitmap (empty) goes to the source first; the undo journal of its consistent image begins"
    );
    assert_eq!((t.repl_state(), t.disk()), (ReplState::SyncTarget, DiskState::Inconsistent));
    let data = Message::ResyncData { offset: 0, data: data(4096) };
    assert!(peer(&mut t, data).is_empty(), "held until Inconsistent is durable");
    let j = ij(JobKind::ResyncWrite, 1);
    assert_eq!(show(&h(&mut t, Event::MetaDone { seq: 1, result: Ok(()) })), [format!("local {j} write")]);
    assert!(peer(&mut t, Message::ResyncZeroes { offset: 4096, len: 8192 }).len() == 1);
    assert_eq!(show(&local_done(&mut t, j)), ["send resync-ack 0 4096 0"]);
    let done_gens = Generations { current: 20, bitmap: 0, history: [10, 0, 0, 0] };
    assert!(
        peer(&mut t, Message::ResyncDone { gens: done_gens }).is_empty(),
        "a chunk is still being written"
    );
    let flush = ij(JobKind::ResyncFlush, 3);
    assert_eq!(
        show(&local_done(&mut t, ij(JobKind::ResyncWrite, 2))),
        ["send resync-ack 4096 8192 0".to_string(), format!("local {flush} flush")]
    );
    assert_eq!(
        show(&local_done(&mut t, flush)),
        [
            "persist 2",
            "catch-up-end after 2",
            "send State { role: Secondary, disk: UpToDate }",
            "after-resync-target"
        ],
        "the source learns the target is UpToDate; the undo journal goes once that is durable; the \
         after-resync-target handler runs"
    );
    assert_eq!(
        (t.disk(), t.generations(), t.repl_state()),
        (DiskState::UpToDate, done_gens, ReplState::Established)
    );
}

#[test]
fn writes_after_a_promotion_wait_for_its_durable_generation() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut c = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 5);
    assert_eq!(show(&promote(&mut c, false).expect("promote")), ["persist 1"]);
    let w = Event::Nbd {
        job: JobId::nbd(1),
        request: Request::Write { offset: 0, data: data(4096), fua: false },
    };
    assert_eq!(show(&c.handle(w)), ["write-al 2 [0]"], "the extent is made hot first");
    assert!(c.handle(Event::MetaDone { seq: 1, result: Ok(()) }).is_empty());
    assert_eq!(show(&c.handle(Event::MetaDone { seq: 2, result: Ok(()) })), ["local 1 write"]);
    assert_eq!(show(&local_done(&mut c, 1)), ["reply 1 ok"]);
}

#[test]
fn a_sync_target_applies_nothing_before_it_is_durably_inconsistent() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut t = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 6);
    connect(&mut t, remote(20, 10, Role::Primary)).expect("target");
    let w = Message::Write { id: 5, epoch: 1, offset: 0, fua: false, data: data(512) };
    assert!(peer(&mut t, w).is_empty(), "an application write waits too");
    assert_eq!(
        show(&h(&mut t, Event::MetaDone { seq: 1, result: Ok(()) })),
        [format!("local {} write", ij(JobKind::Apply, 1))]
    );
}

#[test]
fn a_range_too_large_for_the_log_uses_the_bitmap_as_intent() {
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = CoreConfig { al_extents: 16, ..cfg(Protocol::C, 0) };
    let mut c = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 11);
    connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync");
    // 16 extents of capacity: a trim over 10 extents is more than half.
    let len = 10 << 22;
    let a =
        c.handle(Event::Nbd { job: JobId::nbd(1), request: Request::Trim { offset: 0, len, fua: false } });
    assert_eq!(show(&a), ["write-bitmap 1 1"], "the bits are on disk before the trim starts");
    assert_eq!(c.dirty_bytes(), len);
    assert_eq!(
        show(&c.handle(Event::MetaDone { seq: 1, result: Ok(()) })),
        [
            "local 1 trim".to_string(),
            format!("send Trim {{ id: 1, epoch: 1, offset: 0, len: {len}, fua: false }}")
        ]
    );
    local_done(&mut c, 1);
    assert_eq!(show(&peer(&mut c, Message::WriteAck { id: 1, errno: 0 })), ["reply 1 ok"]);
    assert_eq!(c.dirty_bytes(), len, "until the peer confirmed the epoch");
    h(&mut c, Event::Tick { elapsed_ms: 100, app_requests: 0 });
    let idle = h(&mut c, Event::Tick { elapsed_ms: 100, app_requests: 0 });
    assert!(show(&idle).contains(&"send barrier e1 flush=true".to_string()), "{:?}", show(&idle));
    peer(&mut c, Message::BarrierAck { epoch: 1, errno: 0 });
    assert_eq!(c.dirty_bytes(), 0, "both copies have it durably: the intent bits are cleared");
}

#[test]
fn evicting_an_extent_writes_the_bitmap_first() {
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = CoreConfig { al_extents: 16, ..cfg(Protocol::C, 0) };
    let mut c = new_core(cfg, Role::Secondary, DiskState::UpToDate, gens, 7);
    let durable = c_promote(&mut c);
    h(&mut c, durable);
    for e in 0..16u64 {
        write(&mut c, e + 1, e << 22, 4096);
        local_done(&mut c, e + 1);
    }
    assert_eq!(c.al_stats().0, 16);
    // Disconnected: the bits of writes 1..16 are only in memory; extent 16 evicts one.
    let a = c.handle(Event::Nbd {
        job: JobId::nbd(17),
        request: Request::Write { offset: 16 << 22, data: data(4096), fua: false },
    });
    let flush = JobId::new(JobKind::MetaFlush, 0, 1);
    assert_eq!(show(&a), [format!("local {flush} flush")], "the writes to the extent are made durable first");
    let shown = show(&c.handle(Event::LocalDone { job: flush, result: Ok(()), buf: None }));
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(shown[0].starts_with("write-bitmap"), "bitmap before the log drops an extent: {shown:?}");
    assert!(shown[1].starts_with("write-al"), "{shown:?}");
}

/// Promotes a disconnected Secondary (returns the event that makes it durable).
fn c_promote(c: &mut Core) -> Event {
    let a = promote(c, false).expect("promote");
    let Action::Persist { seq, .. } = a[0] else { panic!("{:?}", show(&a)) };
    Event::MetaDone { seq, result: Ok(()) }
}

#[test]
fn checksum_resync_sends_only_differing_granules() {
    let gens = Generations { current: 20, bitmap: 10, ..Generations::default() };
    let size = RESYNC_CHUNK_BYTES;
    let cfg = CoreConfig { size_bytes: size, resync_checksum: true, ..cfg(Protocol::C, 0) };
    let mut dirty = bm(size);
    dirty.set_all();
    let mut c = Core::new(cfg, Role::Primary, DiskState::UpToDate, gens, false, dirty, 8);
    connect(&mut c, remote(10, 0, Role::Secondary)).expect("source");
    let j = ij(JobKind::ResyncRead, 1);
    assert_eq!(
        show(&peer(&mut c, Message::BitmapDone { blocks: 0 })),
        [format!("send DigestReq {{ offset: 0, len: {size}, after_epoch: 0 }}"), format!("local {j} read")]
    );
    assert!(read_done(&mut c, j, size as usize, 7).is_empty(), "waits for the target's digests");
    // The target differs in granule 3 only.
    let mut theirs = vec![7u8; size as usize];
    theirs[3 * 4096] = 0;
    let digests = super::verify::digests_of(&theirs, G);
    let mut d = BufMut::unpooled(digests.len());
    d.copy_from_slice(&digests);
    let a = peer(&mut c, Message::Digests { offset: 0, len: size, data: d.freeze() });
    assert_eq!(show(&a), ["send resync-data 12288 4096"]);
    assert_eq!(c.resync_progress().sent_bytes, 4096);
    assert_eq!(
        show(&peer(&mut c, Message::ResyncAck { offset: 12288, len: 4096, errno: 0 })),
        ["send ResyncFlush { id: 0 }"]
    );
    let done = peer(&mut c, Message::ResyncFlushed { id: 0 });
    assert!(show(&done).contains(&"send resync-done 20 0".to_string()), "{:?}", show(&done));
    assert_eq!(c.dirty_bytes(), 0);
}

#[test]
fn verify_reports_differing_granules_after_the_epoch_is_applied() {
    let cfg = CoreConfig { size_bytes: 1 << 20, ..cfg(Protocol::C, 0) };
    let gens = Generations { current: 10, ..Generations::default() };
    let mut c = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 9);
    connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync");
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    peer(&mut c, Message::WriteAck { id: 1, errno: 0 });
    let a = c.handle(Event::Command { id: 7, cmd: Command::Verify { repair: false } });
    let j = ij(JobKind::VerifyRead, 1);
    assert_eq!(
        show(&a),
        [
            "send barrier e1 flush=false".to_string(),
            "send DigestReq { offset: 0, len: 1048576, after_epoch: 1 }".to_string(),
            format!("local {j} read")
        ],
        "the peer answers after applying epoch 1"
    );
    assert!(read_done(&mut c, j, 1 << 20, 0).is_empty());
    let mut theirs = vec![0u8; 1 << 20];
    theirs[5 * 4096 + 9] = 1;
    theirs[6 * 4096] = 1;
    let digests = super::verify::digests_of(&theirs, G);
    let mut d = BufMut::unpooled(digests.len());
    d.copy_from_slice(&digests);
    let done = peer(&mut c, Message::Digests { offset: 0, len: 1 << 20, data: d.freeze() });
    assert_eq!(show(&done), ["done 7 Ok(Verified { verified_bytes: 1048576, out_of_sync_bytes: 8192 })"]);
    assert_eq!(c.dirty_bytes(), 8192, "recorded for the next resync");
    assert!(!c.verify_status().running);
}

#[test]
fn a_secondary_serves_digests_only_after_the_named_epoch() {
    let mut s = core(Protocol::C, Role::Secondary, 0);
    let w = Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: data(4096) };
    peer(&mut s, w);
    assert!(peer(&mut s, Message::DigestReq { offset: 0, len: 4096, after_epoch: 1 }).is_empty());
    peer(&mut s, Message::Barrier { epoch: 1, flush: false });
    let a = local_done(&mut s, ij(JobKind::Apply, 1));
    assert_eq!(
        show(&a),
        [
            "send write-ack 1 0".to_string(),
            "send barrier-ack e1 0".to_string(),
            format!("local {} read", ij(JobKind::DigestRead, 2))
        ]
    );
}

#[test]
fn a_dirty_sync_target_sends_its_bitmap() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut dirty = bm(SIZE);
    dirty.set_range(0..4096);
    let mut t = Core::new(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, true, dirty, 10);
    let a = connect(&mut t, remote(20, 10, Role::Primary)).expect("target");
    let shown = show(&a);
    assert!(shown[0].starts_with("send BitmapBlock { index: 0"), "{shown:?}");
    assert_eq!(shown[1], "send BitmapDone { blocks: 1 }");
}

#[test]
fn auto_rate_yields_to_application_io_and_a_fixed_rate_holds() {
    let mib = RESYNC_CHUNK_BYTES;
    let size = 64 * mib;
    let gens = Generations { current: 20, bitmap: 10, ..Generations::default() };
    let start = |rate: Option<u64>| {
        let cfg = CoreConfig {
            size_bytes: size,
            resync_rate_bytes_per_sec: rate,
            resync_min_rate_bytes_per_sec: 5 * mib,
            ..cfg(Protocol::C, 0)
        };
        let mut dirty = bm(size);
        dirty.set_all();
        let mut c = Core::new(cfg, Role::Primary, DiskState::UpToDate, gens, false, dirty, 12);
        connect(&mut c, remote(10, 0, Role::Secondary)).expect("source");
        c
    };
    let reads =
        |a: &[Action]| a.iter().filter(|a| matches!(a, Action::Local { op: IoOp::Read { .. }, .. })).count();
    // Auto, application busy: the bucket holds 1 MiB, then 5 MiB/s.
    let mut c = start(None);
    h(&mut c, Event::Tick { elapsed_ms: 100, app_requests: 3 });
    assert_eq!(reads(&peer(&mut c, Message::BitmapDone { blocks: 0 })), 1, "one chunk's worth of tokens");
    assert_eq!(reads(&h(&mut c, Event::Tick { elapsed_ms: 200, app_requests: 1 })), 1, "5 MiB/s for 200 ms");
    // Idle again: full speed, up to the parallelism bound.
    assert_eq!(reads(&h(&mut c, Event::Tick { elapsed_ms: 100, app_requests: 0 })), RESYNC_PARALLEL - 2);
    // Fixed: 10 MiB/s whatever the application does.
    let mut f = start(Some(10 * mib));
    assert_eq!(reads(&peer(&mut f, Message::BitmapDone { blocks: 0 })), 1);
    assert_eq!(reads(&h(&mut f, Event::Tick { elapsed_ms: 100, app_requests: 0 })), 1);
}

#[test]
fn a_fencing_primary_acknowledges_nothing_until_the_handler_returned() {
    let gens = Generations { current: 10, ..Generations::default() };
    let cfg = CoreConfig { fence_peer: true, ..cfg(Protocol::C, 0) };
    let mut c = new_core(cfg, Role::Primary, DiskState::UpToDate, gens, 13);
    connect(&mut c, remote(10, 0, Role::Secondary)).expect("in sync");
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    let down = h(&mut c, Event::LinkDown);
    assert_eq!(show(&down), ["fence-peer", "persist 2"], "the handler runs at once");
    assert!(c.fencing().0);
    h(&mut c, Event::MetaDone { seq: 2, result: Ok(()) });
    // Durable new generation, local write done: still held by the fencing.
    write(&mut c, 2, 8192, 4096);
    assert!(local_done(&mut c, 2).is_empty());
    let flush = h(&mut c, Event::Nbd { job: JobId::nbd(3), request: Request::Flush });
    assert_eq!(show(&flush), ["local 3 flush"]);
    assert!(local_done(&mut c, 3).is_empty(), "flushes are held too");
    let done = h(&mut c, Event::FenceDone { result: Ok(4) });
    let mut shown = show(&done);
    shown.sort();
    assert_eq!(shown, ["reply 1 ok", "reply 2 ok", "reply 3 ok"]);
    assert_eq!(c.fencing(), (false, Some(&Ok(4))));
}

#[test]
fn the_target_learns_the_resync_progress_from_the_source() {
    let (mut c, _) = source_core(2 * RESYNC_CHUNK_BYTES);
    let total = 2 * RESYNC_CHUNK_BYTES;
    let tick = || Event::Tick { elapsed_ms: 100, app_requests: 0 };
    let shown = show(&h(&mut c, tick()));
    assert!(
        shown.contains(&format!("send ResyncInfo {{ done_bytes: 0, total_bytes: {total} }}")),
        "{shown:?}"
    );
    assert!(show(&h(&mut c, tick())).is_empty(), "sent again only when it moved");

    let gens = Generations { current: 10, ..Generations::default() };
    let mut t = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 14);
    connect(&mut t, remote(20, 10, Role::Primary)).expect("target");
    peer(&mut t, Message::ResyncInfo { done_bytes: total / 2, total_bytes: total });
    let p = t.resync_progress();
    assert_eq!((p.done_bytes, p.total_bytes), (total / 2, total));
}

/// Issue 12: a completion of the previous link was taken for the current link's
/// (underflowing `outstanding`, or acknowledging an epoch still in flight). Now it
/// is recognised by its link generation, and nothing of the new link is written
/// until the old write has landed (it could otherwise overwrite the newer data).
#[test]
fn a_completion_of_the_previous_link_is_not_taken_for_the_current_one() {
    let mut s = core(Protocol::C, Role::Secondary, 0);
    let w = |id, offset| Message::Write { id, epoch: 1, offset, fua: false, data: data(4096) };
    let old = ij(JobKind::Apply, 1);
    assert_eq!(show(&peer(&mut s, w(1, 0))), [format!("local {old} write")]);
    h(&mut s, Event::LinkDown);
    connect(&mut s, remote(10, 0, Role::Primary)).expect("in sync again");
    assert!(peer(&mut s, w(9, 0)).is_empty(), "held: the old write to the same blocks is in flight");
    assert!(peer(&mut s, Message::Barrier { epoch: 1, flush: false }).is_empty());
    let new = JobId::new(JobKind::Apply, 2, 2);
    assert_eq!(
        show(&local_done(&mut s, old)),
        [format!("local {new} write")],
        "the old write's completion acknowledges nothing; then the new link's write starts"
    );
    assert_eq!(show(&local_done(&mut s, new)), ["send write-ack 9 0", "send barrier-ack e1 0"]);
}

/// Sim seeds 135 and 274: the peer acknowledged a barrier without flushing, the
/// Primary retired the epoch from its transfer log, then the peer crashed and lost
/// the write while nothing marked it. Only a flush barrier's ack retires it now.
#[test]
fn only_a_flush_barrier_ack_retires_the_transfer_log() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    write(&mut c, 1, 0, 4096);
    local_done(&mut c, 1);
    peer(&mut c, Message::WriteAck { id: 1, errno: 0 });
    // A second write closes epoch 1 with a plain barrier, which the peer acks.
    let a = write(&mut c, 2, 8192, 4096);
    assert!(show(&a).contains(&"send barrier e1 flush=false".to_string()), "{:?}", show(&a));
    peer(&mut c, Message::BarrierAck { epoch: 1, errno: 0 });
    h(&mut c, Event::LinkDown);
    assert_eq!(c.dirty_bytes(), 8192, "write 1 may be lost by a crash of the peer: still tracked");
}

/// Delivers messages between two connected cores until none is left; metadata
/// updates complete at once. Returns each side's command answers.
fn exchange(a: &mut Core, b: &mut Core, first_a: Vec<Action>, first_b: Vec<Action>) -> [Vec<Action>; 2] {
    let mut done: [Vec<Action>; 2] = [Vec::new(), Vec::new()];
    let mut pending: [Vec<Action>; 2] = [first_a, first_b];
    while pending.iter().any(|p| !p.is_empty()) {
        for side in 0..2 {
            for action in std::mem::take(&mut pending[side]) {
                let (this, other): (&mut Core, &mut Core) =
                    if side == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
                match action {
                    Action::Send(m) => pending[1 - side].extend(other.handle(Event::PeerMessage(m))),
                    Action::Persist { seq, .. }
                    | Action::WriteAl { seq, .. }
                    | Action::WriteBitmap { seq, .. } => {
                        pending[side].extend(this.handle(Event::MetaDone { seq, result: Ok(()) }))
                    }
                    d @ Action::Done { .. } => done[side].push(d),
                    _ => {}
                }
            }
        }
    }
    done
}

/// Issue 12: both nodes of a connected pair told `primary` at the same moment both
/// became Primary (19 of 30 tries). Now the promotion is agreed with the peer: the
/// request with the lower transaction id wins, the other is refused.
#[test]
fn simultaneous_promotions_make_exactly_one_primary() {
    for seed in 0..30 {
        let gens = Generations { current: 10, ..Generations::default() };
        let mut a = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 2 * seed);
        let mut b = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 2 * seed + 1);
        connect(&mut a, remote(10, 0, Role::Secondary)).expect("in sync");
        connect(&mut b, remote(10, 0, Role::Secondary)).expect("in sync");
        let promote =
            |c: &mut Core| c.handle(Event::Command { id: 1, cmd: Command::Promote { force: false } });
        let (pa, pb) = (promote(&mut a), promote(&mut b));
        assert!(
            a.role() == Role::Secondary && b.role() == Role::Secondary,
            "nobody is Primary before the vote"
        );
        let [done_a, done_b] = exchange(&mut a, &mut b, pa, pb);
        let primaries = [a.role(), b.role()].iter().filter(|r| **r == Role::Primary).count();
        assert_eq!(primaries, 1, "seed {seed}: exactly one Primary");
        let (winner, loser) = if a.role() == Role::Primary { (done_a, done_b) } else { (done_b, done_a) };
        assert!(matches!(&winner[..], [Action::Done { result: Ok(_), .. }]), "{winner:?}");
        let [Action::Done { result: Err(why), .. }] = &loser[..] else { panic!("{loser:?}") };
        assert!(why.contains("went first") || why.contains("refused"), "{why}");
    }
}

/// Issue 12: the connect decision read the peer's Hello, a snapshot from the
/// handshake; a role change between the Hello and the link's acceptance gave the
/// two sides different decisions. Now each side sends its state once the link is
/// up, and a promotion asked for meanwhile waits for the decision.
#[test]
fn the_connect_decision_uses_the_state_sent_once_the_link_is_up() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut a = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 1);
    let up = a.handle(Event::LinkUp);
    let [Action::Send(Message::ConnectState { role: Role::Secondary, .. })] = &up[..] else {
        panic!("{up:?}")
    };
    assert!(
        a.handle(Event::Command { id: 5, cmd: Command::Promote { force: false } }).is_empty(),
        "the promotion waits for the decision"
    );
    assert_eq!(a.role(), Role::Secondary);
    let peer_state =
        Message::ConnectState { gens, role: Role::Secondary, disk: DiskState::UpToDate, flags: 0 };
    let after = show(&a.handle(Event::PeerMessage(peer_state)));
    assert_eq!(a.repl_state(), ReplState::Established, "in sync, from the states as sent");
    assert!(
        after.iter().any(|s| s.starts_with("send StatePrepare")),
        "then the promotion asks the peer: {after:?}"
    );
}

/// Issue 12: a Primary applied data-path messages from its peer. Now it drops the
/// link and says why.
#[test]
fn a_primary_drops_a_peer_that_sends_it_data() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    let w = Message::Write { id: 1, epoch: 1, offset: 0, fua: false, data: data(4096) };
    let a = show(&peer(&mut c, w));
    assert!(a.iter().any(|s| s.starts_with("drop-link")), "{a:?}");
    assert!(!a.iter().any(|s| s.contains("write")), "nothing written: {a:?}");
    assert!(c.connection().1.is_some_and(|r| r.contains("Primary")), "{:?}", c.connection());
}

/// Issue 12: `primary --force` on a SyncTarget whose source is UpToDate kept
/// applying resync chunks underneath application writes. Now it is refused while
/// connected (disconnect first to make this node's data the reference).
#[test]
fn forcing_a_sync_target_with_an_up_to_date_peer_is_refused() {
    let gens = Generations { current: 10, ..Generations::default() };
    let mut t = new_core(cfg(Protocol::C, 0), Role::Secondary, DiskState::UpToDate, gens, 4);
    connect(&mut t, remote(20, 10, Role::Secondary)).expect("target");
    assert_eq!(t.repl_state(), ReplState::SyncTarget);
    let a = t.handle(Event::Command { id: 3, cmd: Command::Promote { force: true } });
    let [Action::Done { result: Err(why), .. }] = &a[..] else { panic!("{a:?}") };
    assert!(why.contains("disconnect"), "{why}");
    assert_eq!(t.role(), Role::Secondary);
}

/// Issue 12: a resync that reached the end with bits still set (here set behind
/// its cursor, by a client write whose local error was passed on) went back to
/// Established without `ResyncDone`, and the target stayed Inconsistent until some
/// later reconnect. Now the source starts another pass over what is left.
#[test]
fn a_resync_that_ends_with_bits_left_makes_another_pass() {
    let mib = RESYNC_CHUNK_BYTES;
    let on_io_error = crate::config::IoErrorPolicy::PassOn;
    let (mut c, _) = source_core_with(CoreConfig { size_bytes: mib, on_io_error, ..cfg(Protocol::C, 0) });
    let chunk = ij(JobKind::ResyncRead, 1);
    read_done(&mut c, chunk, mib as usize, 7);
    peer(&mut c, Message::ResyncAck { offset: 0, len: mib, errno: 0 });
    // An application write behind the cursor, which fails here (passed on).
    let sent = show(&write(&mut c, 1, 0, 4096));
    assert!(sent.contains(&"local 1 write".to_string()), "{sent:?}");
    let failed =
        show(&h(&mut c, Event::LocalDone { job: JobId::nbd(1), result: Err(Errno::EIO), buf: None }));
    assert!(failed.is_empty(), "waits for the peer: {failed:?}");
    let acked = show(&peer(&mut c, Message::WriteAck { id: 1, errno: 0 }));
    assert_eq!(acked, ["reply 1 error EIO"], "the client gets the error");
    assert_eq!(c.disk(), DiskState::UpToDate, "passed on: the disk stays");
    let flushed = peer(&mut c, Message::ResyncFlushed { id: 0 });
    let shown = show(&flushed);
    assert!(!shown.iter().any(|s| s.starts_with("send resync-done")), "not in sync yet: {shown:?}");
    assert_eq!(c.repl_state(), ReplState::SyncSource, "still syncing what is left: {shown:?}");
    assert!(shown.iter().any(|s| s.ends_with(" read")), "the next pass reads the dirty range: {shown:?}");
}

/// Issue 12: a failed metadata write counted as durable: an activity-log
/// transaction that failed still let its writes go on and be acknowledged. Now the
/// write never reaches this disk, and the disk is detached (issue 13: Failed, then
/// Diskless); with its peer connected and UpToDate the Primary serves through it,
/// without it everything is answered EIO.
#[test]
fn a_failed_metadata_write_fails_closed() {
    let mut c = core(Protocol::C, Role::Primary, 0);
    let a = c.handle(Event::Nbd {
        job: JobId::nbd(1),
        request: Request::Write { offset: 0, data: data(4096), fua: false },
    });
    let [Action::WriteAl { seq, .. }] = &a[..] else { panic!("{a:?}") };
    let failed =
        show(&c.handle(Event::MetaDone { seq: *seq, result: Err("EIO writing the activity log".into()) }));
    assert!(!failed.iter().any(|s| s.starts_with("local 1")), "the write never reaches the disk: {failed:?}");
    assert!(failed.iter().any(|s| s.starts_with("send State")), "{failed:?}");
    assert!(failed.contains(&"send write 1 e2".to_string()), "to the peer only: {failed:?}");
    assert_eq!(c.disk(), DiskState::Diskless, "no op of its own was on the disk");
    assert!(c.disk_failure().is_some_and(|f| f.to_string().contains("EIO writing the activity log")));
    assert_eq!(show(&peer(&mut c, Message::WriteAck { id: 1, errno: 0 })), ["reply 1 ok"]);
    h(&mut c, Event::LinkDown);
    let later = show(&write(&mut c, 2, 8192, 4096));
    assert_eq!(later, ["reply 2 error EIO"], "without the peer nothing is acknowledged");
}

/// Issue 13: disk failures (`repl::failure`).
#[path = "core_tests_wan.rs"]
mod wan;

#[path = "core_tests_disk.rs"]
mod disk;
