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
use crate::repl::core::ctx::ctx;
use primary::{FlushJob, Intent, Sent, WriteJob};

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
    /// The write-intent layer: activity log, bitmap writes and the local flushes
    /// they wait for (`intent`, the only code that touches its fields).
    intent: intent::WriteIntent,
    /// The sequence of the latest superblock update.
    last_persist_seq: u64,
    /// Resync rate control and measured progress.
    rate: resync::RateCtl,
    /// Online verify (this node compares), and digest requests served for the peer.
    verifier: verify::Verifier,
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
    /// Secondary: the epoch-ordered applier (and the count of writes on the peer's
    /// behalf per link).
    applier: apply::Applier,
    /// Replication state toward the peer, and resync in progress.
    repl: ReplState,
    source: Option<resync::Source>,
    target: Option<resync::Target>,
    /// Resync or verify chunks of a dropped run still held by the in-flight table.
    abandoned_chunks: HashMap<JobId, std::ops::Range<u64>>,
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
    /// The local disk failed and was detached (`repl::failure`).
    disk_failure: Option<DiskFailure>,
    /// Local I/O errors since start, and local ops submitted and not yet done
    /// (`Failed` becomes `Diskless` when none is left).
    io_errors: u64,
    local_ops: u64,
    /// Reads served for a diskless peer Primary (`repl::serve`).
    server: serve::ReadServer,
    /// A diskless Primary's reads waiting for the peer (`repl::diskless`).
    peer_reads: HashMap<JobId, BufMut>,
    /// This Secondary records everything as out of sync for its diskless Primary.
    tracking_diskless_primary: bool,
    /// `ack-timeout` (`repl::ackwatch`).
    ackwatch: ackwatch::AckWatch,
    /// A client error was passed on: the range is in the bitmap, to be resynced
    /// from this node while connected.
    repair_pending: bool,
    /// Pull-ahead (`repl::ahead`): this Primary ships no writes until the queue
    /// drained; this Secondary was told its Primary pulled ahead.
    ahead: bool,
    behind: bool,
    ahead_count: u64,
    /// A sync target's fallback image (`repl::fallback`): an undo journal holds
    /// the image from before the catch-up; why the last one was dropped; the
    /// `primary --force` waiting for a rollback.
    fallback: bool,
    fallback_lost: Option<String>,
    rollback_cmd: Option<CmdId>,
    /// A sync target started on a live link applies nothing of the resync until
    /// the writes received before it completed (`on_start_repair`).
    target_after_drain: bool,
    /// Pulled ahead: the barrier that closed the last shipped epoch, until the
    /// peer acknowledged it (`repl::ahead`: no resync chunk is read meanwhile).
    ahead_barrier: Option<u64>,
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
            intent: intent::WriteIntent::new(al),
            last_persist_seq: 0,
            rate,
            verifier: verify::Verifier::default(),
            discard_my_data: false,
            dispatched_writes: 0,
            dispatched_at_tick: 0,
            fencing: false,
            last_fence: None,
            sync_paused_here: false,
            sync_paused_by_peer: false,
            applier: apply::Applier::default(),
            repl: ReplState::Off,
            source: None,
            target: None,
            abandoned_chunks: HashMap::new(),
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
            io_errors: 0,
            local_ops: 0,
            repair_pending: false,
            ackwatch: ackwatch::AckWatch::default(),
            server: serve::ReadServer::default(),
            peer_reads: HashMap::new(),
            tracking_diskless_primary: false,
            ahead: false,
            behind: false,
            ahead_count: 0,
            fallback: false,
            fallback_lost: None,
            rollback_cmd: None,
            target_after_drain: false,
            ahead_barrier: None,
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
        self.intent.al_stats()
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

    /// Applies one event.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle_into(event, &mut out);
        out
    }

    /// [`Core::handle`] into a caller's buffer, so the event loop reuses one vector
    /// instead of allocating one per request.
    pub fn handle_into(&mut self, event: Event, out: &mut Vec<Action>) {
        let first_new = out.len();
        self.dispatch_event(event, out);
        // Counted for `Failed` → `Diskless`: ops on the disk this node detaches.
        self.local_ops +=
            out[first_new..].iter().filter(|a| matches!(a, Action::Local { .. })).count() as u64;
        self.maybe_diskless(out);
    }

    /// A local op failed: the failure policy decides (`repl::failure`), before the
    /// op's owner sees the result (a Secondary must be gone from the link before
    /// anything could acknowledge an epoch that holds the failed write).
    fn local_io_failed(&mut self, job: JobId, errno: Errno, out: &mut Vec<Action>) {
        use failure::FailedIo::{Client, Internal};
        let io = match job.kind() {
            JobKind::Nbd => match self.writes.get(&job) {
                Some(w) => Client { op: "write", offset: Some(w.range.start) },
                None => Client { op: "flush", offset: None },
            },
            JobKind::Apply => Internal { op: "replicated write", offset: self.applier.offset_of(job) },
            JobKind::ApplyFlush => Internal { op: "flush of a replicated epoch", offset: None },
            JobKind::ResyncWrite => Internal { op: "resync write", offset: None },
            JobKind::ResyncFlush => Internal { op: "resync flush", offset: None },
            JobKind::ResyncRead => Internal { op: "resync read", offset: None },
            JobKind::VerifyRead => Internal { op: "verify read", offset: None },
            JobKind::DigestRead => Internal { op: "read for a digest request", offset: None },
            JobKind::PeerRead => Internal { op: "read for the diskless peer", offset: None },
            JobKind::MetaFlush => Internal { op: "flush before a metadata update", offset: None },
        };
        let passed_on = self.on_io_error(io, errno, out);
        if passed_on && let Some(w) = self.writes.get(&job) {
            // The peer may have applied it: the range differs until resynced.
            let range = w.range.clone();
            self.mark_dirty(range);
        }
    }

    fn dispatch_event(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Nbd { job, request } => self.on_request(job, request, out),
            Event::Drain { job } => self.start_flush(job, true, out),
            Event::LocalDone { job, result, buf } => self.on_local_done(job, result, buf, out),
            Event::PeerMessage(msg) => self.on_peer_message(msg, out),
            Event::PeerSent { bytes } => {
                if bytes > 0 {
                    self.peer_progress();
                }
                self.sent_bytes_total = (self.sent_bytes_total + bytes).min(self.queued_bytes_total);
                self.release_send_waiters(out);
                self.check_drained(out);
            }
            Event::LinkUp => self.on_link_up(out),
            Event::LinkDown => self.on_link_down(out),
            Event::MetaDone { seq, result } => self.on_meta_done(seq, result, out),
            Event::Command { id, cmd } => self.on_command(id, cmd, out),
            Event::Tick { elapsed_ms, app_requests } => self.on_tick(elapsed_ms, app_requests, out),
            Event::FenceDone { result } => self.on_fence_done(result, out),
            Event::ReadFailed { offset, errno } => self.on_read_failed(offset, errno, out),
            Event::FallbackLost { reason } => self.on_fallback_lost(reason),
            Event::RolledBack { result } => self.on_rolled_back(result, out),
        }
    }

    fn on_local_done(
        &mut self,
        job: JobId,
        result: Result<(), Errno>,
        buf: Option<BufMut>,
        out: &mut Vec<Action>,
    ) {
        self.local_ops = self.local_ops.saturating_sub(1);
        if let Err(errno) = result {
            self.local_io_failed(job, errno, out);
        }
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
            // After a detach, nothing of the link it left is acknowledged either.
            JobKind::Apply | JobKind::ResyncWrite if !current || self.detached() => {
                self.stale_peer_write_done(job, out)
            }
            JobKind::ApplyFlush | JobKind::ResyncFlush | JobKind::DigestRead | JobKind::PeerRead
                if self.detached() => {}
            JobKind::PeerRead if current => self.server.on_read(job, result, buf, &mut ctx!(self, out)),
            JobKind::PeerRead => {}
            JobKind::Apply => {
                let applied = self.applier.on_done(job, result, &mut ctx!(self, out));
                self.after_applied(applied, out);
            }
            JobKind::ApplyFlush if current => {
                let applied = self.applier.on_flushed(result, &mut ctx!(self, out));
                self.after_applied(applied, out);
            }
            JobKind::ResyncRead => self.on_chunk_read(job, result, buf, out),
            JobKind::VerifyRead => self.on_verify_read(job, result, buf, out),
            JobKind::DigestRead if current => {
                self.verifier.on_digest_read(job, result, buf, &self.pool, &mut ctx!(self, out))
            }
            JobKind::ResyncWrite => self.on_target_write(job, result, out),
            JobKind::ResyncFlush if current => self.on_target_flush(job, result, out),
            // A flush or digest read of a link that is gone: nothing waits for it.
            JobKind::ApplyFlush | JobKind::DigestRead | JobKind::ResyncFlush => {}
            JobKind::MetaFlush => self.on_meta_flushed(job, result, out),
        }
    }

    fn on_peer_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        if ackwatch::is_answer(&msg) {
            self.peer_progress();
        }
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
        if self.detached()
            && (is_peer_data(&msg)
                || matches!(
                    msg,
                    Message::Barrier { .. } | Message::DigestReq { .. } | Message::StartRepair { .. }
                ))
        {
            // Nothing may be applied or read here: the peer should know this node
            // is diskless; a message crossing that news ends the link.
            tracing::warn!(
                kind = msg.kind().name(),
                "data-path message for a detached disk; dropping the link"
            );
            out.push(Action::DropLink { reason: "this node's disk is detached".into() });
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
            Message::WriteAck { id, errno } => self.on_peer_ack(JobId::from_raw(id), errno, true, out),
            Message::RecvAck { id } => self.on_peer_ack(JobId::from_raw(id), 0, false, out),
            Message::BarrierAck { epoch, errno } => self.on_barrier_ack(epoch, errno, out),
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
            Message::ReadReq { id, offset, len, after_epoch } => {
                self.on_read_req(id, offset, len, after_epoch, out)
            }
            Message::ReadData { id, errno, data } => self.on_read_data(id, errno, data, out),
            Message::Digests { offset, len, data } => self.on_digests(offset, len, data, out),
            Message::StartRepair { bytes } => self.on_start_repair(bytes, out),
            Message::Invalidate => self.on_invalidate(out),
            Message::SyncPause { paused } => self.on_sync_pause(paused, out),
            Message::ResyncInfo { done_bytes, total_bytes } => self.on_resync_info(done_bytes, total_bytes),
            Message::State { role, disk } => self.on_peer_state(role, disk, out),
            Message::ConnectState { gens, role, disk, flags } => {
                self.on_connect_state(gens, role, disk, flags, out)
            }
            Message::StatePrepare { tid, change } => self.on_state_prepare(tid, change, out),
            Message::StateReply { tid, yes, reason } => self.on_state_reply(tid, yes, reason, out),
            Message::StateCommit { tid } => self.on_state_commit(tid),
            Message::StateAbort { tid } => self.on_state_abort(tid),
            Message::Ahead { queued_bytes } => self.on_peer_ahead(queued_bytes, out),
            other => tracing::debug!(?other, "message not handled by the data path"),
        }
    }

    /// A data-path message that may not be applied yet (or would pass held ones).
    /// Barriers and resync flush requests are ordered after the writes they cover.
    fn must_hold(&self, msg: &Message) -> bool {
        if !is_peer_data(msg) && !matches!(msg, Message::Barrier { .. } | Message::ResyncFlush { .. }) {
            return false;
        }
        !self.ingress_held.is_empty() || self.ingress_blocked()
    }

    /// Nothing of the current link may be applied now: an earlier link's writes
    /// are in flight, a sync target is not durably Inconsistent yet or waits for
    /// the writes received before it, or a Secondary's new generation (its
    /// Primary went diskless) is not durable yet.
    fn ingress_blocked(&self) -> bool {
        self.stale_peer_writes()
            || self.target.as_ref().is_some_and(|t| !t.ready())
            || self.target_after_drain
            || (self.role == Role::Secondary && self.gens_pending)
    }

    /// Applies the held data-path messages, in order, as far as nothing blocks.
    pub(super) fn release_ingress(&mut self, out: &mut Vec<Action>) {
        while !self.ingress_blocked() {
            let Some(msg) = self.ingress_held.pop_front() else { break };
            self.on_peer_message_now(msg, out);
        }
    }

    /// Jobs the in-flight table released, whoever owns them.
    pub(super) fn start_released(&mut self, jobs: Vec<JobId>, out: &mut Vec<Action>) {
        for job in jobs {
            if self.release_abandoned(job, out) {
                continue;
            }
            match job.kind() {
                JobKind::Nbd if self.writes.contains_key(&job) => self.dispatch_write(job, out),
                JobKind::ResyncRead => self.read_chunk(job, out),
                JobKind::VerifyRead => self.read_verify_chunk(job, out),
                _ => {}
            }
        }
    }

    /// A stopped resync or verify gives its chunks' ranges back: now for those
    /// nothing else holds, when their read or admission comes back for the rest.
    pub(super) fn take_back(&mut self, chunks: AbandonedChunks, out: &mut Vec<Action>) {
        self.abandoned_chunks.extend(chunks.later);
        for (job, range) in chunks.now {
            let next = self.inflight.complete(job, range.start);
            self.start_released(next, out);
        }
    }

    /// A chunk of a resync or verify that was dropped gives its range back (when
    /// its read or its admission comes back). True if `job` was one.
    pub(super) fn release_abandoned(&mut self, job: JobId, out: &mut Vec<Action>) -> bool {
        let Some(range) = self.abandoned_chunks.remove(&job) else { return false };
        let next = self.inflight.complete(job, range.start);
        self.start_released(next, out);
        true
    }

    /// The replication state toward the peer.
    pub fn repl_state(&self) -> ReplState {
        self.congestion_state().unwrap_or(self.repl)
    }

    /// A write of an earlier link finished; its result has nobody to go to.
    fn stale_peer_write_done(&mut self, job: JobId, out: &mut Vec<Action>) {
        self.applier.peer_write_done(job);
        if !self.stale_peer_writes() {
            self.release_ingress(out);
        }
    }

    fn stale_peer_writes(&self) -> bool {
        !self.cfg.bugs.accept_stale_completion && self.applier.stale_writes(self.link_gen)
    }

    /// What applying a write (or closing an epoch) meant for the rest of the core.
    fn after_applied(&mut self, applied: apply::Applied, out: &mut Vec<Action>) {
        if applied.epoch_done {
            let through = self.applier.applied_through();
            self.verifier.release_digest_reqs(through, &self.pool, &mut ctx!(self, out));
            self.server.release(through, &self.pool, &mut ctx!(self, out));
        }
        if applied.drained {
            if std::mem::take(&mut self.target_after_drain) {
                self.release_ingress(out);
            }
            self.maybe_start_target_flush(out);
        }
    }

    /// A replicated write, trim, zeroing or barrier.
    fn on_replicated(&mut self, msg: Message, out: &mut Vec<Action>) {
        let applied = self.applier.on_message(msg, &mut ctx!(self, out));
        self.after_applied(applied, out);
    }

    /// Queues a durable update of the persistent state; returns its sequence number.
    fn persist(&mut self, out: &mut Vec<Action>) -> u64 {
        if self.detached() {
            // A detached disk gets no metadata (`fail_disk` recorded it Outdated).
            let seq = self.next_seq();
            self.last_persist_seq = seq;
            return seq;
        }
        self.persist_disk(self.disk, out)
    }

    /// Queues a durable update recording `disk` as the disk state.
    fn persist_disk(&mut self, disk: DiskState, out: &mut Vec<Action>) -> u64 {
        let seq = self.next_seq();
        self.last_persist_seq = seq;
        // A crashed Primary keeps the flag until a resync made it consistent again.
        let was_primary = self.role == Role::Primary || self.crashed_primary;
        out.push(Action::Persist { seq, gens: self.gens, disk, was_primary });
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

/// The chunks of a stopped resync or verify (`Core::take_back`).
pub(super) struct AbandonedChunks {
    /// Chunks nothing holds any more (read done, or sent).
    pub now: Vec<(JobId, std::ops::Range<u64>)>,
    /// Chunks whose read or in-flight admission is still to come back.
    pub later: Vec<(JobId, std::ops::Range<u64>)>,
}

#[path = "types.rs"]
mod types;
pub use types::*;
#[path = "ackwatch.rs"]
mod ackwatch;
#[path = "ahead.rs"]
mod ahead;
#[path = "apply.rs"]
mod apply;
#[path = "connect.rs"]
mod connect;
#[path = "ctx.rs"]
mod ctx;
#[path = "diskless.rs"]
mod diskless;
#[path = "failure.rs"]
mod failure;
#[path = "fallback.rs"]
mod fallback;
#[path = "intent.rs"]
mod intent;
#[path = "operator.rs"]
mod operator;
#[path = "primary.rs"]
mod primary;
#[path = "resync/mod.rs"]
mod resync;
#[path = "serve.rs"]
mod serve;
#[path = "session.rs"]
mod session;
#[path = "twopc.rs"]
mod twopc;
#[path = "verify.rs"]
mod verify;
pub use failure::DiskFailure;
pub use intent::encode_changed;
pub use resync::{ConnectRefusal, RESYNC_CHUNK_BYTES, RESYNC_PARALLEL, ReplState, ResyncProgress};
pub use verify::VerifyStatus;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
