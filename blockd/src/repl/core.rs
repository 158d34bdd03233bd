//! The replication core: one owner of all replication state, driven by events.
//!
//! [`Core::handle`] takes one [`Event`] and returns the [`Action`]s it causes; it does
//! no I/O, reads no clock and spawns nothing, so it is tested with scripted event
//! streams. The I/O shell (`repl::shell`) feeds it NBD requests, storage completions,
//! peer messages and link events, and executes the actions: storage submits, peer
//! sends, NBD replies (the shell keeps each request's responder under its job id),
//! and durable metadata updates.
//!
//! What it implements (SPEC §4, `ARCHITECTURE.md` "Replication"):
//! - Primary: the ack table for protocols A, B, C (FUA and FLUSH included),
//!   overlapping writes serialized through [`InFlight`], epochs closed by barriers
//!   when a write may depend on an acknowledged one, and a bounded send buffer for A.
//! - Secondary: writes of one epoch applied concurrently, none of the next epoch
//!   before the barrier's epoch is complete (and flushed when asked).
//! - Peer loss while Primary: writes waiting for the peer complete locally and are
//!   recorded in the bitmap; a new generation is made durable before any write is
//!   acknowledged without the peer.
//! - Write intent (SPEC §5): before a Primary write touches the local disk, its 4 MiB
//!   extents are durably hot in the activity log ([`ActivityLog`]); a range too large
//!   for the log is set in the bitmap and the bitmap written first instead. The
//!   bitmap itself is written lazily (on ticks, before evictions, at a clean stop).

use std::collections::{HashMap, VecDeque};

use nbd_server::NbdError;
use nbd_server::buf::{Buf, BufMut};
use nix::errno::Errno;

use bitmap::Bitmap;

use crate::config::Protocol;
use crate::meta::BitmapBlock;
use crate::peer::msg::Message;
use crate::repl::al::ActivityLog;
use crate::repl::inflight::InFlight;
use crate::state::{DiskState, Generations, Role};
use crate::storage::IoOp;

use super::job::JobIds;
pub use super::job::{JobId, JobKind};

/// Writes per epoch before a barrier is forced (DRBD's `max-epoch-size` default), so
/// the transfer log is trimmed regularly even under a stream of independent writes.
const MAX_EPOCH_WRITES: u64 = 2048;

/// An NBD request as the core sees it (validated by nbd-server).
#[derive(Debug)]
pub enum Request {
    Write { offset: u64, data: Buf, fua: bool },
    Trim { offset: u64, len: u64, fua: bool },
    WriteZeroes { offset: u64, len: u64, may_trim: bool, fast_only: bool, fua: bool },
    Flush,
}

/// Everything that can happen to the core.
#[derive(Debug)]
pub enum Event {
    /// A client request (the shell holds its responder under `job`).
    Nbd { job: JobId, request: Request },
    /// A local storage op of `job` finished; `buf` is the op's buffer coming back.
    LocalDone { job: JobId, result: Result<(), Errno>, buf: Option<BufMut> },
    /// A peer link is up (the shell holds no other): the core tells the peer its
    /// state and decides once it has the peer's (`repl::connect`).
    LinkUp,
    /// A message from the peer.
    PeerMessage(Message),
    /// The link wrote `bytes` of queued frames to the socket.
    PeerSent { bytes: u64 },
    /// The link is gone.
    LinkDown,
    /// The metadata update with this sequence number was carried out: durable, or
    /// failed with the error's text.
    MetaDone { seq: u64, result: Result<(), String> },
    /// An operator command (`blockctl`); `Action::Done { id }` answers it.
    Command { id: CmdId, cmd: Command },
    /// Before a clean stop: make every write so far durable locally and on the peer
    /// under any protocol; `Reply { job }` comes when done (or the peer is gone).
    Drain { job: JobId },
    /// The fence-peer handler returned (`Ok(exit code)`), or could not be run or timed
    /// out (`Err`). Either way, writes are acknowledged again.
    FenceDone { result: Result<i32, String> },
    /// Time passed (the core reads no clock): drives the resync rate, its measured
    /// rate, and lazy bitmap writes. `app_requests`: NBD requests (reads included)
    /// since the last tick, for the `auto` resync rate.
    Tick { elapsed_ms: u64, app_requests: u64 },
}

/// How an NBD request ends.
#[derive(Debug)]
pub enum Outcome {
    Ok,
    Error(NbdError),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Submit `op` to local storage; its completion comes back as `LocalDone { job }`.
    Local { job: JobId, op: IoOp },
    /// Queue `msg` for the peer (its frame size counts against the send buffer).
    Send(Message),
    /// Answer the NBD request `job`.
    Reply { job: JobId, outcome: Outcome },
    /// Make this state durable (metadata update + fsync), then send
    /// `MetaDurable { seq }`. Every metadata action (`Persist`, `WriteBitmap`,
    /// `WriteAl`) is carried out in the order given.
    Persist { seq: u64, gens: Generations, disk: DiskState, was_primary: bool },
    /// Write these encoded bitmap blocks and fsync.
    WriteBitmap { seq: u64, blocks: Vec<BitmapBlock> },
    /// Record this hot-extent set as the activity log and fsync.
    WriteAl { seq: u64, extents: Vec<u32> },
    /// Run the `fence-peer` handler; `FenceDone` comes back when it returned.
    FencePeer,
    /// Run the `after-resync-target` handler (nothing waits for it).
    AfterResyncTarget,
    /// The answer to `Event::Command { id }`.
    Done { id: CmdId, result: Result<CmdOutput, String> },
    /// Close the peer link (sending `reason` to the peer first); no `LinkDown`
    /// follows for it.
    DropLink { reason: String },
    /// Whether the shell should connect to the peer at all (false: StandAlone).
    LinkPolicy { enabled: bool },
}

/// Identifies an operator command until its `Action::Done`.
pub type CmdId = u64;

/// An operator command the core decides (SPEC §8 verbs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `primary [--force]`.
    Promote { force: bool },
    /// `secondary` (the shell has closed the NBD clients first).
    Demote,
    /// `connect [--discard-my-data]`: leave StandAlone.
    Connect { discard_my_data: bool },
    /// `disconnect`: drop the link and stay StandAlone.
    Disconnect,
    /// `invalidate`: this node's data is resynced in full from the peer.
    Invalidate,
    /// `invalidate-remote`: the peer's data is resynced in full from this node.
    InvalidateRemote,
    /// `pause-sync` (true) / `resume-sync` (false).
    SetSyncPaused(bool),
    /// `verify [--repair]`: answered when the verify ends.
    Verify { repair: bool },
}

/// What a successful command reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdOutput {
    Done,
    Verified { verified_bytes: u64, out_of_sync_bytes: u64 },
}

/// The connection to the peer, as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Trying to reach the peer (or a link is being set up).
    Connecting,
    /// Replicating.
    Connected,
    /// Not connecting: refused (split brain, …) or `blockctl disconnect`.
    StandAlone,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "Connecting",
            ConnState::Connected => "Connected",
            ConnState::StandAlone => "StandAlone",
        }
    }
}

/// The core's fixed settings.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub protocol: Protocol,
    /// Protocol A: bytes of frames queued but not yet written to the socket beyond
    /// which writes wait for their acknowledgement.
    pub send_buffer_bytes: u64,
    /// Dirty-set granularity (bytes per tracked unit).
    pub granularity_bytes: u64,
    /// The replicated device's size (a full sync covers it all).
    pub size_bytes: u64,
    /// Activity-log capacity in hot 4 MiB extents.
    pub al_extents: u32,
    /// Resync rate: `Some(bytes/s)` fixed, `None` auto (full speed while the
    /// application is idle, `resync_min_rate` while it does I/O).
    pub resync_rate_bytes_per_sec: Option<u64>,
    pub resync_min_rate_bytes_per_sec: u64,
    /// Checksum-based resync: only granules whose digests differ are sent.
    pub resync_checksum: bool,
    /// A `fence-peer` handler is configured (used with protocol C): a Primary that
    /// loses its peer runs it and acknowledges no write until it returned.
    pub fence_peer: bool,
    /// This node's name sorts before the peer's (a tie-break both sides agree on).
    pub name_sorts_first: bool,
    /// Known defects the simulator's own tests put back, to show it catches each.
    /// Always off outside those tests (no config key or flag reaches it).
    #[doc(hidden)]
    pub bugs: InjectedBugs,
}

/// See [`CoreConfig::bugs`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// The Secondary acknowledges a write (protocol C) before it completes.
    pub ack_before_write: bool,
    /// The resync source skips every third chunk (clears its bits unsent).
    pub skip_chunk: bool,
    /// A promotion while connected does not ask the peer.
    pub promotion_skips_peer: bool,
    /// A completion of an earlier link is taken for the current link's.
    pub accept_stale_completion: bool,
    /// The Secondary starts the writes of a later epoch without waiting for the
    /// current one.
    pub apply_out_of_order: bool,
}

/// How a Primary write is covered against a crash (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intent {
    /// Holds two activity-log references (local part, peer part).
    Log,
    /// Its range was set in the bitmap and written before the write started; the
    /// bits are cleared once both the local disk and the peer have it.
    Bitmap,
}

/// A range the peer has not confirmed yet (DRBD's transfer log entry).
#[derive(Debug)]
struct Sent {
    epoch: u64,
    job: JobId,
    range: std::ops::Range<u64>,
    intent: Intent,
}

/// Whether and how the peer takes part in the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// No peer connection.
    Disconnected,
    /// A link is up; the states are being exchanged (nothing is replicated yet).
    Negotiating,
    /// Connected and replicating every write.
    Replicating,
}

/// What a Primary write still waits for from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerPart {
    /// Not replicated (disconnected): the range is dirty.
    NotSent,
    /// Sent; waiting for `RecvAck` (B) or `WriteAck` (C).
    Awaiting,
    /// Protocol A: queued; acknowledged once the send buffer has drained below the
    /// bound past this frame's end (in bytes ever queued).
    Queued { queued_end_bytes: u64 },
    /// Done (acked, or the peer was lost and the range marked dirty).
    Done,
}

#[derive(Debug)]
struct WriteJob {
    range: std::ops::Range<u64>,
    op: Option<IoOp>,
    message: Option<Message>,
    local: Option<Result<(), Errno>>,
    peer: PeerPart,
    epoch: u64,
    /// Started while the new generation was not yet durable.
    needs_durable_gens: bool,
    intent: Option<Intent>,
    /// The peer confirmed this write's epoch before the write finished locally.
    peer_settled: bool,
}

#[derive(Debug)]
struct FlushJob {
    local: Option<Result<(), Errno>>,
    /// The barrier epoch whose ack this flush waits for (B and C while connected).
    barrier: Option<u64>,
}

/// A Secondary's write being applied.
#[derive(Debug)]
struct ApplyJob {
    peer_id: u64,
    epoch: u64,
    /// Its place in receive order (`Applier::received`).
    rx: u64,
}

/// Epoch state on the Secondary.
#[derive(Debug, Default)]
struct Applier {
    /// The epoch whose writes are being applied.
    epoch: u64,
    /// Writes of `epoch` not yet complete.
    outstanding: u64,
    /// The barrier closing `epoch` arrived: (flush asked).
    closing: Option<bool>,
    /// A flush for the closing barrier is running.
    flushing: bool,
    /// Messages of later epochs, held until `epoch` is closed, each with its place
    /// in receive order.
    held: VecDeque<(u64, Message)>,
    /// Writes received on this link (their receive order).
    received: u64,
    /// A sync target waits for every write received before `ResyncDone` (receive
    /// order up to this) to complete before its final flush: this many still have
    /// not.
    drain_mark: Option<u64>,
    undrained: u64,
}

/// The replication state of one node.
pub struct Core {
    cfg: CoreConfig,
    role: Role,
    disk: DiskState,
    gens: Generations,
    link: Link,
    /// Generations durable up to this metadata sequence.
    durable_seq: u64,
    next_meta_seq: u64,
    /// A new generation was started and is not durable yet.
    gens_pending: bool,
    /// Source of fresh generation ids (seeded: deterministic in tests).
    rng: rand::rngs::StdRng,
    /// Ids for the jobs the core starts itself, and the current link's generation
    /// (bumped at every link start; link-bound job ids carry it).
    ids: JobIds,
    link_gen: u32,
    writes: HashMap<JobId, WriteJob>,
    flushes: HashMap<JobId, FlushJob>,
    inflight: InFlight,
    /// Protocol A jobs waiting for the send buffer to drain, in send order.
    send_waiters: VecDeque<JobId>,
    queued_bytes_total: u64,
    sent_bytes_total: u64,
    /// Primary: the open epoch, whether a write of it was acknowledged, its size.
    epoch: u64,
    epoch_acked: bool,
    epoch_writes: u64,
    /// Primary: ranges sent to the peer whose epoch is not yet barrier-acked, in send
    /// order (DRBD's transfer log). An acknowledged write stays here until the peer
    /// confirms its epoch, so a lost link marks every range the peer may lack.
    transfer_log: VecDeque<Sent>,
    /// Epochs closed by a flush barrier whose ack has not come yet, in order.
    flush_barriers: VecDeque<u64>,
    ticks_since_flush_barrier: u32,
    /// Regions that differ (or may differ) from the peer: persistent, see `meta`.
    bitmap: Bitmap,
    /// A bitmap write is queued and not yet durable: its sequence, and the intent
    /// generation it covers (every bitmap intent set before it was encoded).
    bitmap_write: Option<(u64, u64)>,
    /// Bitmap intents set so far, and those a durable bitmap write covers.
    intent_gen: u64,
    bitmap_durable_gen: u64,
    /// A local data flush before metadata that relies on it is in flight, and what
    /// waits for it: a bitmap write (bits cleared because a local write completed
    /// must not be recorded before that write is durable), and an activity-log
    /// transaction that forgets an extent (its completed writes must be durable
    /// first, or a crash could lose them locally while nothing marks them).
    meta_flush: Option<JobId>,
    bitmap_after_flush: bool,
    al_after_flush: Option<Vec<u32>>,
    /// Bits were cleared on the strength of a local write since the last meta flush
    /// was submitted.
    local_clears: bool,
    ms_since_bitmap_write: u64,
    /// The write-intent log, and writes waiting for their extents to be durable.
    al: ActivityLog,
    al_waiting: VecDeque<JobId>,
    /// Writes whose bitmap intent is queued: they start once `seq` is durable.
    /// Writes whose bitmap intent must be durable first: they start once a bitmap
    /// write covering this intent generation is.
    intent_waiting: Vec<(JobId, u64)>,
    /// The sequence of the latest superblock update.
    last_persist_seq: u64,
    /// Resync rate control and measured progress.
    rate: resync::RateCtl,
    /// Online verify (this node compares), and digest requests served for the peer.
    verify: Option<verify::VerifyRun>,
    digests: verify::DigestServer,
    /// `connect --discard-my-data`: in a split brain, this node becomes the target.
    discard_my_data: bool,
    /// Writes dispatched since start, and at the last tick (an idle Primary closes
    /// its epoch so the peer confirms it and the transfer log and extents drain).
    dispatched_writes: u64,
    dispatched_at_tick: u64,
    /// The fence-peer handler is running: no write or flush is acknowledged.
    fencing: bool,
    last_fence: Option<Result<i32, String>>,
    /// `pause-sync` here, and as the peer told.
    sync_paused_here: bool,
    sync_paused_by_peer: bool,
    /// Secondary.
    applier: Applier,
    applying: HashMap<JobId, ApplyJob>,
    /// Replication state toward the peer, and resync in progress.
    repl: ReplState,
    source: Option<SourceSync>,
    target: Option<TargetSync>,
    /// Resync or verify chunks of a dropped run still held by the in-flight table.
    abandoned_chunks: HashMap<JobId, std::ops::Range<u64>>,
    /// Writes on behalf of the peer (applied writes, resync writes) in flight, per
    /// link generation. While one of an earlier link is in flight, nothing of the
    /// current link is written (`ingress_held`): it could land before the older
    /// write and be overwritten by it.
    peer_writes: HashMap<u32, u32>,
    /// Data-path messages from the peer held until they may be applied (an earlier
    /// link's writes still in flight, or a sync target not yet durably Inconsistent).
    ingress_held: VecDeque<Message>,
    /// It crashed while Primary and was not resynced since (see `repl::decide`).
    crashed_primary: bool,
    /// Buffers for resync reads.
    pool: nbd_server::buf::BufPool,
    /// Payload bytes of application writes sent to the peer.
    replicated_bytes: u64,
    /// The peer as it last told (connect, `State`); `None` while not linked.
    peer_role: Option<Role>,
    peer_disk: Option<DiskState>,
    /// The connection as status shows it, and why the last link was refused.
    conn: ConnState,
    refusal: Option<String>,
    /// No connection is used until `blockctl connect` (split brain, unrelated
    /// data, `blockctl disconnect`).
    standalone: bool,
    /// Commands answered once the metadata update with this sequence is done.
    replies_after_meta: Vec<(u64, CmdId)>,
    /// The `blockctl verify` waiting for the verify's end.
    verify_cmd: Option<CmdId>,
    /// A link that is up but not decided yet (`repl::connect`).
    negotiation: Option<connect::Negotiation>,
    /// State changes agreed with the peer (`repl::twopc`).
    twophase: twopc::TwoPhase,
    /// The local disk failed (`repl::failure`): nothing is acknowledged any more.
    disk_failure: Option<DiskFailure>,
}

impl Core {
    /// A node starting with the given persisted state (role from `blockctl`/OCF).
    /// `crashed_primary`: the metadata says it was Primary and did not shut down
    /// cleanly. `bitmap`: the persisted bitmap, with the activity log's hot extents
    /// already merged in after a crash (see `repl::node`).
    pub fn new(
        cfg: CoreConfig,
        role: Role,
        disk: DiskState,
        gens: Generations,
        crashed_primary: bool,
        bitmap: Bitmap,
        seed: u64,
    ) -> Core {
        use rand::SeedableRng;
        let al = ActivityLog::new(cfg.al_extents);
        let rate = resync::RateCtl::new(&cfg);
        Core {
            cfg,
            role,
            disk,
            gens,
            link: Link::Disconnected,
            durable_seq: 0,
            next_meta_seq: 1,
            gens_pending: false,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            ids: JobIds::default(),
            link_gen: 0,
            writes: HashMap::new(),
            flushes: HashMap::new(),
            inflight: InFlight::new(),
            send_waiters: VecDeque::new(),
            queued_bytes_total: 0,
            sent_bytes_total: 0,
            epoch: 1,
            epoch_acked: false,
            epoch_writes: 0,
            transfer_log: VecDeque::new(),
            flush_barriers: VecDeque::new(),
            ticks_since_flush_barrier: 0,
            bitmap,
            bitmap_write: None,
            intent_gen: 0,
            bitmap_durable_gen: 0,
            meta_flush: None,
            bitmap_after_flush: false,
            al_after_flush: None,
            local_clears: false,
            ms_since_bitmap_write: 0,
            al,
            al_waiting: VecDeque::new(),
            intent_waiting: Vec::new(),
            last_persist_seq: 0,
            rate,
            verify: None,
            digests: verify::DigestServer::default(),
            discard_my_data: false,
            dispatched_writes: 0,
            dispatched_at_tick: 0,
            fencing: false,
            last_fence: None,
            sync_paused_here: false,
            sync_paused_by_peer: false,
            applier: Applier { epoch: 1, ..Applier::default() },
            applying: HashMap::new(),
            repl: ReplState::Off,
            source: None,
            target: None,
            abandoned_chunks: HashMap::new(),
            peer_writes: HashMap::new(),
            ingress_held: VecDeque::new(),
            crashed_primary,
            pool: nbd_server::buf::BufPool::new(8 << 20),
            replicated_bytes: 0,
            peer_role: None,
            peer_disk: None,
            conn: ConnState::Connecting,
            refusal: None,
            standalone: false,
            replies_after_meta: Vec::new(),
            verify_cmd: None,
            negotiation: None,
            twophase: twopc::TwoPhase::default(),
            disk_failure: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn generations(&self) -> Generations {
        self.gens
    }

    pub fn link(&self) -> Link {
        self.link
    }

    /// Bytes recorded as (possibly) different from the peer.
    pub fn dirty_bytes(&self) -> u64 {
        self.bitmap.dirty_bytes()
    }

    /// (hot extents, transactions made durable since start) of the activity log.
    pub fn al_stats(&self) -> (usize, u64) {
        (self.al.hot_count(), self.al.transactions())
    }

    /// `connect --discard-my-data`: in the next split brain, this node's changes go.
    pub fn set_discard_my_data(&mut self, discard: bool) {
        self.discard_my_data = discard;
    }

    pub fn discard_my_data(&self) -> bool {
        self.discard_my_data
    }

    /// It crashed while Primary and was not resynced since.
    pub fn crashed_primary(&self) -> bool {
        self.crashed_primary
    }

    /// Before the process stops (after the last event): everything the peer has not
    /// confirmed goes into the bitmap, and the changed bitmap blocks are returned to
    /// be written; after that the activity log may be emptied.
    pub fn stop_dirty(&mut self) -> Vec<BitmapBlock> {
        for sent in std::mem::take(&mut self.transfer_log) {
            self.mark_dirty(sent.range);
        }
        encode_changed(&mut self.bitmap)
    }

    /// Payload bytes of application writes sent to the peer since start.
    pub fn replicated_bytes(&self) -> u64 {
        self.replicated_bytes
    }

    /// Frames queued for the peer and not yet written to its socket.
    pub fn unsent_bytes(&self) -> u64 {
        self.queued_bytes_total - self.sent_bytes_total
    }

    /// Applies one event.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle_into(event, &mut out);
        out
    }

    /// [`Core::handle`] into a caller's buffer, so the event loop reuses one vector
    /// instead of allocating one per request.
    pub fn handle_into(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Nbd { job, request } => self.on_request(job, request, out),
            Event::Drain { job } => self.start_flush(job, true, out),
            Event::LocalDone { job, result, buf } => self.on_local_done(job, result, buf, out),
            Event::PeerMessage(msg) => self.on_peer_message(msg, out),
            Event::PeerSent { bytes } => {
                self.sent_bytes_total = (self.sent_bytes_total + bytes).min(self.queued_bytes_total);
                self.release_send_waiters(out);
            }
            Event::LinkUp => self.on_link_up(out),
            Event::LinkDown => self.on_link_down(out),
            Event::MetaDone { seq, result } => self.on_meta_done(seq, result, out),
            Event::Command { id, cmd } => self.on_command(id, cmd, out),
            Event::Tick { elapsed_ms, app_requests } => self.on_tick(elapsed_ms, app_requests, out),
            Event::FenceDone { result } => self.on_fence_done(result, out),
        }
    }

    fn on_request(&mut self, job: JobId, request: Request, out: &mut Vec<Action>) {
        debug_assert_eq!(job.kind(), JobKind::Nbd, "requests come with NBD job ids");
        if self.role != Role::Primary {
            // Only a client connected before a demotion can get here; a Secondary
            // never writes on its own behalf.
            tracing::warn!(%job, "write request on a Secondary refused");
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Perm) });
            return;
        }
        if self.disk_failure.is_some() {
            out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
            return;
        }
        match request {
            Request::Flush => self.start_flush(job, false, out),
            Request::Write { offset, data, fua } => {
                let range = offset..offset + data.len() as u64;
                let message = Message::Write { id: job.raw(), epoch: 0, offset, fua, data: data.clone() };
                self.start_write(job, range, IoOp::Write { offset, buf: data, fua }, message, out);
            }
            Request::Trim { offset, len, fua } => {
                let message = Message::Trim { id: job.raw(), epoch: 0, offset, len, fua };
                self.start_write(job, offset..offset + len, IoOp::Trim { offset, len, fua }, message, out);
            }
            Request::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
                let message = Message::WriteZeroes { id: job.raw(), epoch: 0, offset, len, may_trim, fua };
                let op = IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua };
                self.start_write(job, offset..offset + len, op, message, out);
            }
        }
    }

    fn start_write(
        &mut self,
        job: JobId,
        range: std::ops::Range<u64>,
        op: IoOp,
        message: Message,
        out: &mut Vec<Action>,
    ) {
        let admitted = self.inflight.admit(job, range.clone());
        let w = WriteJob {
            range,
            op: Some(op),
            message: Some(message),
            local: None,
            peer: PeerPart::NotSent,
            epoch: 0,
            needs_durable_gens: false,
            intent: None,
            peer_settled: false,
        };
        self.writes.insert(job, w);
        if admitted {
            self.dispatch_write(job, out);
        }
    }

    /// Sends a write with its intent in place to the local disk and, when
    /// replicating, to the peer.
    fn send_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        if self.link == Link::Replicating && (self.epoch_acked || self.epoch_writes >= MAX_EPOCH_WRITES) {
            // This write may depend on one already acknowledged: close the epoch so
            // the Secondary cannot apply them out of order.
            self.close_epoch(false, out);
        }
        let epoch = self.epoch;
        let replicating = self.link == Link::Replicating;
        let needs_durable_gens = self.gens_pending;
        self.dispatched_writes += 1;
        let w = self.writes.get_mut(&job).expect("dispatching a known job");
        w.epoch = epoch;
        w.needs_durable_gens = needs_durable_gens;
        let op = w.op.take().expect("dispatched once");
        let mut message = w.message.take().expect("dispatched once");
        out.push(Action::Local { job, op });
        if !replicating {
            // The bitmap records it: the peer part is settled.
            let (range, intent) = (w.range.clone(), w.intent);
            self.mark_dirty(range.clone());
            if intent == Some(Intent::Log) {
                self.release_al(&range, out);
            }
            return;
        }
        set_epoch(&mut message, epoch);
        self.replicated_bytes += message.data().map_or(0, |d| d.len() as u64);
        let frame_bytes = frame_bytes(&message);
        self.send(message, out);
        self.epoch_writes += 1;
        let w = &self.writes[&job];
        let intent = w.intent.expect("intent before sending");
        self.transfer_log.push_back(Sent { epoch, job, range: w.range.clone(), intent });
        let peer = match self.cfg.protocol {
            Protocol::A => PeerPart::Queued { queued_end_bytes: self.queued_bytes_total },
            Protocol::B | Protocol::C => PeerPart::Awaiting,
        };
        debug_assert!(frame_bytes > 0);
        self.writes.get_mut(&job).expect("known").peer = peer;
        if matches!(peer, PeerPart::Queued { .. }) {
            self.send_waiters.push_back(job);
            self.release_send_waiters(out);
        }
    }

    fn send(&mut self, message: Message, out: &mut Vec<Action>) {
        self.queued_bytes_total += frame_bytes(&message);
        out.push(Action::Send(message));
    }

    /// Protocol A: writes whose frame is within the send-buffer bound count as sent.
    fn release_send_waiters(&mut self, out: &mut Vec<Action>) {
        while let Some(&job) = self.send_waiters.front() {
            let Some(w) = self.writes.get_mut(&job) else {
                self.send_waiters.pop_front();
                continue;
            };
            let PeerPart::Queued { queued_end_bytes } = w.peer else {
                self.send_waiters.pop_front();
                continue;
            };
            if queued_end_bytes.saturating_sub(self.sent_bytes_total) > self.cfg.send_buffer_bytes {
                break;
            }
            w.peer = PeerPart::Done;
            self.send_waiters.pop_front();
            self.try_finish_write(job, out);
        }
    }

    /// A FLUSH (or, with `wait_peer`, a drain that waits for the peer under any
    /// protocol).
    fn start_flush(&mut self, job: JobId, wait_peer: bool, out: &mut Vec<Action>) {
        let barrier = if self.link == Link::Replicating {
            let epoch = self.close_epoch(true, out);
            // Protocol A only keeps the peer ordered; B and C wait for its flush.
            (wait_peer || self.cfg.protocol != Protocol::A).then_some(epoch)
        } else {
            None
        };
        self.flushes.insert(job, FlushJob { local: None, barrier });
        out.push(Action::Local { job, op: IoOp::Flush });
    }

    /// Marks `range` as (possibly) different from the peer. A resync copy of it
    /// that waits for the target's flush no longer clears it: it is older.
    pub(super) fn mark_dirty(&mut self, range: std::ops::Range<u64>) {
        if let Some(sync) = self.source.as_mut() {
            sync.keep_dirty(&range);
        }
        self.bitmap.set_range(range);
    }

    /// Sends the barrier closing the open epoch; returns that epoch. A flush barrier
    /// makes the peer flush: its ack retires the transfer log up to it.
    fn close_epoch(&mut self, flush: bool, out: &mut Vec<Action>) -> u64 {
        let epoch = self.epoch;
        self.send(Message::Barrier { epoch, flush }, out);
        if flush {
            self.flush_barriers.push_back(epoch);
            self.ticks_since_flush_barrier = 0;
        }
        self.epoch += 1;
        self.epoch_acked = false;
        self.epoch_writes = 0;
        epoch
    }

    fn on_local_done(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        let current = job.of_link(self.link_gen) || self.cfg.bugs.accept_stale_completion;
        match job.kind() {
            JobKind::Nbd => {
                if let Some(w) = self.writes.get_mut(&job) {
                    w.local = Some(result);
                    if w.intent == Some(Intent::Log) {
                        let range = w.range.clone();
                        self.release_al(&range, out);
                    }
                    self.try_finish_write(job, out);
                } else if let Some(f) = self.flushes.get_mut(&job) {
                    f.local = Some(result);
                    self.try_finish_flush(job, out);
                } else {
                    debug_assert!(false, "NBD job {job} completed but was not tracked");
                }
            }
            JobKind::Apply | JobKind::ResyncWrite if !current => self.stale_peer_write_done(job, out),
            JobKind::Apply => {
                self.peer_write_done(job);
                if let Some(apply) = self.applying.remove(&job) {
                    self.on_applied(apply, result, out);
                }
            }
            JobKind::ApplyFlush if current => self.on_applier_flushed(result, out),
            JobKind::ResyncRead => self.on_chunk_read(job, result, buf, out),
            JobKind::VerifyRead => self.on_verify_read(job, result, buf, out),
            JobKind::DigestRead if current => self.on_digest_read(job, result, buf, out),
            JobKind::ResyncWrite => {
                self.peer_write_done(job);
                self.on_target_local(job, result, out);
            }
            JobKind::ResyncFlush if current => {
                self.on_target_local(job, result, out);
            }
            // A flush or digest read of a link that is gone: nothing waits for it.
            JobKind::ApplyFlush | JobKind::DigestRead | JobKind::ResyncFlush => {}
            JobKind::MetaFlush => self.on_meta_flushed(job, result, out),
        }
    }

    fn try_finish_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get(&job) else { return };
        let peer_done = matches!(w.peer, PeerPart::Done | PeerPart::NotSent);
        let gens_ok = !w.needs_durable_gens || !self.gens_pending;
        let Some(mut local) = w.local else { return };
        if self.disk_failure.is_some() {
            // Failed closed: answered with an error once off the disk.
            local = Err(Errno::EIO);
        } else if !(peer_done && gens_ok) || w.op.is_some() || self.fencing {
            return;
        }
        let w = self.writes.remove(&job).expect("present");
        if w.epoch == self.epoch {
            self.epoch_acked = true;
        }
        if w.intent == Some(Intent::Bitmap) && w.peer_settled {
            self.bitmap.clear_range(w.range.clone());
            self.local_clears = true;
        }
        let outcome = match local {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Error(NbdError::from_errno(e as i32, false)),
        };
        out.push(Action::Reply { job, outcome });
        let next = self.inflight.complete(job, w.range.start);
        self.start_released(next, out);
    }

    fn try_finish_flush(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(f) = self.flushes.get(&job) else { return };
        let Some(mut local) = f.local else { return };
        if self.disk_failure.is_some() {
            local = Err(Errno::EIO);
        } else if f.barrier.is_some() || self.fencing {
            return;
        }
        self.flushes.remove(&job);
        let outcome = match local {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Error(NbdError::from_errno(e as i32, false)),
        };
        out.push(Action::Reply { job, outcome });
    }

    fn on_peer_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        if self.role == Role::Primary && is_peer_data(&msg) {
            // A Primary's data is what clients see: it never takes the peer's. Two
            // Primaries, or a peer that thinks this node is its sync target.
            tracing::error!(kind = msg.kind().name(), "data from the peer while Primary; dropping the link");
            self.refusal = Some(format!(
                "the peer sent replicated data ({}) to this Primary; link dropped",
                msg.kind().name()
            ));
            out.push(Action::DropLink {
                reason: "this node is Primary and takes no data from its peer".into(),
            });
            self.on_link_down(out);
            return;
        }
        if self.must_hold(&msg) {
            self.ingress_held.push_back(msg);
            return;
        }
        self.on_peer_message_now(msg, out);
    }

    fn on_peer_message_now(&mut self, msg: Message, out: &mut Vec<Action>) {
        match msg {
            Message::WriteAck { id, errno } => self.on_peer_ack(JobId::from_raw(id), errno, out),
            Message::RecvAck { id } => self.on_peer_ack(JobId::from_raw(id), 0, out),
            Message::BarrierAck { epoch, errno } => {
                if errno != 0 {
                    tracing::warn!(epoch, errno, "peer failed to complete a barrier");
                }
                // Acks come in epoch order. Only a flush barrier's ack says the writes
                // of its epoch and before are durable on the peer: a crash of the peer
                // loses anything else, so it stays in the transfer log (and its extents
                // hot) until then.
                let mut flushed = false;
                while self.flush_barriers.front().is_some_and(|e| *e <= epoch) {
                    flushed |= self.flush_barriers.pop_front() == Some(epoch);
                }
                while (flushed || errno != 0) && self.transfer_log.front().is_some_and(|s| s.epoch <= epoch) {
                    let sent = self.transfer_log.pop_front().expect("checked");
                    if errno != 0 {
                        self.mark_dirty(sent.range.clone());
                        if sent.intent == Intent::Log {
                            self.release_al(&sent.range, out);
                        }
                    } else {
                        self.settle_peer_part(sent.job, sent.range, sent.intent, out);
                    }
                }
                let waiting: Vec<JobId> =
                    self.flushes.iter().filter(|(_, f)| f.barrier == Some(epoch)).map(|(j, _)| *j).collect();
                for job in waiting {
                    self.flushes.get_mut(&job).expect("present").barrier = None;
                    self.try_finish_flush(job, out);
                }
            }
            Message::Write { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::Barrier { .. } => self.on_replicated(msg, out),
            Message::ResyncData { .. } | Message::ResyncZeroes { .. } | Message::ResyncDone { .. } => {
                self.on_resync_message(msg, out)
            }
            Message::ResyncAck { offset, len, errno } => self.on_resync_ack(offset, len, errno, out),
            Message::ResyncFlush { id } => self.on_resync_flush_req(id, out),
            Message::ResyncFlushed { id } => self.on_resync_flushed(id, out),
            Message::BitmapBlock { index, data } => self.on_bitmap_block(index, &data),
            Message::BitmapDone { blocks } => self.on_bitmap_done(blocks, out),
            Message::DigestReq { offset, len, after_epoch } => {
                self.on_digest_req(offset, len, after_epoch, out)
            }
            Message::Digests { offset, len, data } => self.on_digests(offset, len, data, out),
            Message::StartRepair { bytes } => self.on_start_repair(bytes, out),
            Message::Invalidate => self.on_invalidate(out),
            Message::SyncPause { paused } => self.on_sync_pause(paused, out),
            Message::ResyncInfo { done_bytes, total_bytes } => self.on_resync_info(done_bytes, total_bytes),
            Message::State { role, disk } => self.on_peer_state(role, disk),
            Message::ConnectState { gens, role, disk, flags } => {
                self.on_connect_state(gens, role, disk, flags, out)
            }
            Message::StatePrepare { tid, change } => self.on_state_prepare(tid, change, out),
            Message::StateReply { tid, yes, reason } => self.on_state_reply(tid, yes, reason, out),
            Message::StateCommit { tid } => self.on_state_commit(tid),
            Message::StateAbort { tid } => self.on_state_abort(tid),
            other => tracing::debug!(?other, "message not handled by the data path"),
        }
    }

    /// A data-path message that may not be applied yet (or would pass held ones).
    /// Barriers and resync flush requests are ordered after the writes they cover.
    fn must_hold(&self, msg: &Message) -> bool {
        if !is_peer_data(msg) && !matches!(msg, Message::Barrier { .. } | Message::ResyncFlush { .. }) {
            return false;
        }
        !self.ingress_held.is_empty()
            || self.stale_peer_writes()
            || self.target.as_ref().is_some_and(|t| !t.ready)
    }

    /// Applies the held data-path messages, in order, as far as nothing blocks.
    pub(super) fn release_ingress(&mut self, out: &mut Vec<Action>) {
        while !self.stale_peer_writes() && self.target.as_ref().is_none_or(|t| t.ready) {
            let Some(msg) = self.ingress_held.pop_front() else { break };
            self.on_peer_message_now(msg, out);
        }
    }

    pub(super) fn peer_write_started(&mut self, job: JobId) {
        *self.peer_writes.entry(job.link()).or_default() += 1;
    }

    pub(super) fn peer_write_done(&mut self, job: JobId) {
        if let Some(n) = self.peer_writes.get_mut(&job.link()) {
            *n -= 1;
            if *n == 0 {
                self.peer_writes.remove(&job.link());
            }
        }
    }

    /// A write of an earlier link finished; its result has nobody to go to.
    fn stale_peer_write_done(&mut self, job: JobId, out: &mut Vec<Action>) {
        self.peer_write_done(job);
        if !self.stale_peer_writes() {
            self.release_ingress(out);
        }
    }

    fn stale_peer_writes(&self) -> bool {
        !self.cfg.bugs.accept_stale_completion && self.peer_writes.keys().any(|link| *link != self.link_gen)
    }

    fn on_peer_ack(&mut self, id: JobId, errno: i32, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get_mut(&id) else { return };
        if w.peer != PeerPart::Awaiting {
            return;
        }
        w.peer = PeerPart::Done;
        if errno != 0 {
            // The peer could not write it: its copy of the range is stale.
            tracing::warn!(job = %id, errno, "peer failed a replicated write; range marked out of sync");
            let range = w.range.clone();
            self.mark_dirty(range);
        }
        self.try_finish_write(id, out);
    }

    fn on_peer_down(&mut self, out: &mut Vec<Action>) {
        if self.link == Link::Disconnected {
            return;
        }
        self.link = Link::Disconnected;
        self.abandon_resync(out);
        self.send_waiters.clear();
        self.queued_bytes_total = self.sent_bytes_total;
        if self.role == Role::Primary && self.cfg.fence_peer && self.cfg.protocol == Protocol::C {
            // DRBD's resource-and-stonith: the peer may be alive and about to be
            // promoted; nothing is acknowledged until the handler made sure it cannot.
            tracing::warn!("peer lost while Primary: running the fence-peer handler; write acks held");
            self.fencing = true;
            out.push(Action::FencePeer);
        }
        if self.role == Role::Primary && self.gens.bitmap == 0 && self.disk_failure.is_none() {
            // SPEC §5: a Primary that loses its peer starts a new generation, durable
            // before any write is acknowledged without the peer (unless one already
            // tracks changes since the peer's, e.g. during a resync).
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.gens_pending = true;
            self.persist(out);
        }
        // Everything sent whose epoch the peer has not confirmed may be missing there,
        // including writes already acknowledged under protocols A and B.
        let sent: Vec<Sent> = self.transfer_log.drain(..).collect();
        for s in sent {
            self.mark_dirty(s.range.clone());
            if s.intent == Intent::Log {
                self.release_al(&s.range, out);
            }
        }
        let gens_pending = self.gens_pending;
        for w in self.writes.values_mut() {
            if w.peer != PeerPart::NotSent {
                w.peer = PeerPart::Done;
            }
            w.needs_durable_gens = gens_pending;
        }
        let flushes: Vec<JobId> = self.flushes.keys().copied().collect();
        for job in flushes {
            self.flushes.get_mut(&job).expect("present").barrier = None;
            self.try_finish_flush(job, out);
        }
        let writes: Vec<JobId> = self.writes.keys().copied().collect();
        for job in writes {
            self.try_finish_write(job, out);
        }
        self.flush_barriers.clear();
        // A Secondary drops what it had not applied; the Primary resyncs it later.
        self.applier.held.clear();
        self.ingress_held.clear();
        self.abandon_verify("the peer link was lost", out);
        self.digests.clear();
    }

    fn on_fence_done(&mut self, result: Result<i32, String>, out: &mut Vec<Action>) {
        if !self.fencing {
            return;
        }
        self.fencing = false;
        match &result {
            // DRBD's meanings: 3 peer not UpToDate, 4 peer outdated/fenced, 5 peer
            // unreachable, 7 peer stonithed.
            Ok(code @ (3 | 4 | 5 | 7)) => tracing::info!(code, "fence-peer handler: the peer is fenced"),
            Ok(code) => {
                tracing::error!(code, "fence-peer handler did not fence the peer; writes resume anyway")
            }
            Err(e) => tracing::error!(error = %e, "fence-peer handler failed; writes resume anyway"),
        }
        self.last_fence = Some(result);
        let writes: Vec<JobId> = self.writes.keys().copied().collect();
        for job in writes {
            self.try_finish_write(job, out);
        }
        let flushes: Vec<JobId> = self.flushes.keys().copied().collect();
        for job in flushes {
            self.try_finish_flush(job, out);
        }
    }

    /// Whether the fence-peer handler runs now, and how the last one ended.
    pub fn fencing(&self) -> (bool, Option<&Result<i32, String>>) {
        (self.fencing, self.last_fence.as_ref())
    }

    /// Queues a durable update of the persistent state; returns its sequence number.
    fn persist(&mut self, out: &mut Vec<Action>) -> u64 {
        let seq = self.next_seq();
        self.last_persist_seq = seq;
        // A crashed Primary keeps the flag until a resync made it consistent again.
        let was_primary = self.role == Role::Primary || self.crashed_primary;
        out.push(Action::Persist { seq, gens: self.gens, disk: self.disk, was_primary });
        seq
    }

    fn fresh_id(&mut self) -> u64 {
        loop {
            let id: u64 = rand::Rng::random(&mut self.rng);
            if id != 0 {
                return id;
            }
        }
    }

    /// `blockctl primary [--force]`. Its persist is queued in `out`; the command is
    /// answered once it is durable (the export opens at once: writes acknowledged
    /// under a new generation wait for it, see `needs_durable_gens`).
    fn promote(&mut self, id: CmdId, force: bool, out: &mut Vec<Action>) -> Result<Promotion, String> {
        if self.role == Role::Primary {
            return Ok(Promotion::Done);
        }
        if self.peer_role == Some(Role::Primary) {
            return Err("the peer is Primary; demote it first (`blockctl secondary` there)".to_string());
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(format!(
                "the local disk is {}; only an UpToDate node can be promoted \
                 (use --force to make this node's data the authoritative copy)",
                self.disk
            ));
        }
        if self.link == Link::Replicating && !self.cfg.bugs.promotion_skips_peer {
            if force && self.disk != DiskState::UpToDate && self.peer_disk == Some(DiskState::UpToDate) {
                return Err(format!(
                    "the local disk is {} and the connected peer's is UpToDate: promote the peer, or \
                     `blockctl disconnect` first to make this node's data the authoritative copy",
                    self.disk
                ));
            }
            // While connected, the peer must agree (`repl::twopc`).
            self.request_promotion(id, force, out)?;
            return Ok(Promotion::Asked);
        }
        self.promote_now(force, out)?;
        Ok(Promotion::Done)
    }

    /// Becomes Primary (disconnected, or with the peer's agreement).
    pub(super) fn promote_now(&mut self, force: bool, out: &mut Vec<Action>) -> Result<(), String> {
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(format!("the local disk is {}; only an UpToDate node can be promoted", self.disk));
        }
        if force && self.disk != DiskState::UpToDate {
            // This copy becomes the reference: a generation of its own, so the peer
            // sees it as newer and takes a full sync from it.
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.disk = DiskState::UpToDate;
            self.gens_pending = true;
        } else if self.link == Link::Disconnected && self.gens.bitmap == 0 {
            // SPEC §5: promoted while disconnected starts a new generation — unless
            // one already tracks changes since the peer's (as DRBD: only when the
            // bitmap id is 0), or the peer would no longer recognize this node.
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.gens_pending = true;
        }
        self.role = Role::Primary;
        self.persist(out);
        self.announce_state(out);
        Ok(())
    }

    /// `blockctl secondary`: the shell has already closed the NBD export and drained
    /// its clients. Refused while writes are in flight.
    fn demote(&mut self, out: &mut Vec<Action>) -> Result<(), String> {
        if self.role == Role::Secondary {
            return Ok(());
        }
        if !self.writes.is_empty() || !self.flushes.is_empty() {
            return Err("writes are still in flight; retry in a moment".to_string());
        }
        self.twophase_link_lost(out);
        self.role = Role::Secondary;
        self.persist(out);
        self.announce_state(out);
        Ok(())
    }
}

/// How a promotion request went.
pub(super) enum Promotion {
    /// The role changed (or already was Primary).
    Done,
    /// The peer was asked; the answer comes later.
    Asked,
}

/// Data the peer writes to this node's disk (never accepted by a Primary).
fn is_peer_data(m: &Message) -> bool {
    matches!(
        m,
        Message::Write { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::ResyncData { .. }
            | Message::ResyncZeroes { .. }
            | Message::ResyncDone { .. }
    )
}

/// Bytes a message occupies in the send buffer: its whole frame, as the link counts
/// it in `Sent`.
fn frame_bytes(m: &Message) -> u64 {
    m.wire_len()
}

fn set_epoch(m: &mut Message, new: u64) {
    match m {
        Message::Write { epoch, .. } | Message::Trim { epoch, .. } | Message::WriteZeroes { epoch, .. } => {
            *epoch = new
        }
        _ => {}
    }
}

#[path = "apply.rs"]
mod apply;
#[path = "connect.rs"]
mod connect;
#[path = "failure.rs"]
mod failure;
#[path = "intent.rs"]
mod intent;
#[path = "operator.rs"]
mod operator;
#[path = "resync.rs"]
mod resync;
#[path = "session.rs"]
mod session;
#[path = "twopc.rs"]
mod twopc;
#[path = "verify.rs"]
mod verify;
pub use failure::DiskFailure;
pub use intent::encode_changed;
pub use resync::{ConnectRefusal, RESYNC_CHUNK_BYTES, RESYNC_PARALLEL, ReplState, ResyncProgress};
use resync::{SourceSync, TargetSync};
pub use verify::VerifyStatus;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
