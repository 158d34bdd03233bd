//! The I/O shell around the [`Core`]: the replicated NBD device, the core task that
//! feeds events in and executes the actions that come out, and the metadata writer.
//!
//! Channels into the core task (all bounded by something upstream, see each):
//! - `inputs`: NBD writes/flushes (bounded by nbd-server's per-connection limits) and
//!   storage completions (bounded by the ops in flight);
//! - peer connections from the supervisor (one at a time);
//! - the live link's events (bounded channel inside the link);
//! - control requests (bounded channel);
//! - metadata completions (one per metadata action);
//! - a 100 ms tick (resync rate, lazy bitmap writes).
//!
//! Metadata actions (superblock updates, bitmap blocks, activity-log transactions)
//! run on one metadata thread, in the order the core emitted them: the core relies
//! on that order (bitmap blocks before the activity log forgets an extent). Once the
//! disk is detached (Diskless), the metadata thread closes the metadata, after the
//! core's last update of it, so its lock is free for `create-md` on a replaced disk.
//!
//! Reads, CACHE and BLOCK_STATUS bypass the core: they touch only the local disk,
//! which on a Primary is UpToDate, so they cost what they cost standalone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use nbd_server::{BlockDevice, ExportInfo, NbdError, Request as NbdRequest, Responder};
use nix::errno::Errno;
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::{Command, ControlRequest, Reply};
use crate::device::spawn_block_status;
use crate::events::{EventPublisher, EventSnapshot};
use crate::meta::MetaStore;
use crate::metrics::Metrics;
use crate::peer::link::{LinkEvent, PeerConn};
use crate::peer::msg::{Hello, Message};
use crate::repl::core::{Action, CmdId, CmdOutput, ConnState, Core, Event, JobId, Outcome, Request};
use crate::repl::recover::{MetaJob, MetaWriter};
use crate::state::{DiskState, Generations, Role};
use crate::storage::{IoBuf, IoOp, IoSink, Storage};

mod commands;
mod undo;

pub(crate) use undo::CatchUpJournal;

// The Hello's state (generations, role, disk, these flags) is informational: it is
// logged at the handshake; the connect decision uses `ConnectState`, sent once the
// link is up (`repl::connect`), because a Hello can be stale by then.

/// `Hello.flags` bit: the sender crashed while Primary and was not resynced since.
pub const HELLO_CRASHED_PRIMARY: u32 = 1 << 0;
/// `Hello.flags` bit: the sender's bitmap has bits set.
pub const HELLO_DIRTY: u32 = 1 << 1;
/// `Hello.flags` bit: `connect --discard-my-data` was given on the sender.
pub const HELLO_DISCARD_MY_DATA: u32 = 1 << 2;

/// How long the fence-peer handler may take before write acks resume anyway.
const FENCE_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long an after-resync-target handler may take before it is abandoned.
const HANDLER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the core gets a `Tick`.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// How long `secondary --force` waits for clients to go and for the final flush.
const FORCE_DEMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What flows into the core task from the device and the storage engine.
pub enum Input {
    Nbd {
        job: JobId,
        request: Request,
        responder: Responder,
        started: std::time::Instant,
    },
    Disk {
        job: JobId,
        result: Result<(), Errno>,
        buf: IoBuf,
    },
    MetaDone {
        seq: u64,
        result: Result<(), String>,
    },
    /// Before a clean stop (see `Event::Drain`).
    Drain {
        done: oneshot::Sender<()>,
    },
    /// The fence-peer handler ended (exit code, or why it did not run or finish).
    FenceDone {
        result: Result<i32, String>,
    },
    /// The catch-up's undo journal had to go (`repl::fallback`).
    FallbackLost {
        reason: String,
    },
    /// A rollback to the fallback image ended.
    RolledBack {
        result: Result<Vec<std::ops::Range<u64>>, String>,
    },
    /// A client read (or CACHE) straight from the local disk failed: the failure
    /// policy decides, then a read is answered through the peer or with the error.
    ReadFailed {
        offset: u64,
        errno: Errno,
        responder: Responder,
        /// The read's buffer (none for CACHE).
        buf: Option<nbd_server::buf::BufMut>,
        started: std::time::Instant,
    },
}

/// The job id of the stop-time drain (NBD job ids count up from 1 and never get here).
const DRAIN_JOB: JobId = JobId::nbd(u64::MAX);

/// Storage completion token: through the core, straight back to the client, or to
/// the daemon itself (the final flush).
pub enum Token {
    Core(JobId),
    /// A read (or CACHE) answered straight from the local disk; `started` times it.
    Direct {
        responder: Responder,
        started: std::time::Instant,
        offset: u64,
    },
    Internal(oneshot::Sender<Result<(), Errno>>),
}

/// Storage completions: core jobs go back to the core task; direct reads reply here.
pub struct CoreSink {
    inputs: mpsc::UnboundedSender<Input>,
    metrics: Arc<Metrics>,
}

impl IoSink for CoreSink {
    type Token = Token;

    fn complete(&self, token: Token, result: Result<(), Errno>, buf: IoBuf) {
        match token {
            Token::Core(job) => {
                let _ = self.inputs.send(Input::Disk { job, result, buf });
            }
            Token::Internal(tx) => {
                let _ = tx.send(result);
            }
            Token::Direct { responder, started, offset } => {
                if let Err(errno) = result {
                    // The failure policy applies to reads too (`repl::failure`); a
                    // detached Primary may serve it through its peer.
                    let buf = match buf {
                        IoBuf::Read(b) => Some(b),
                        _ => None,
                    };
                    let failed = Input::ReadFailed { offset, errno, responder, buf, started };
                    if let Err(mpsc::error::SendError(Input::ReadFailed { responder, .. })) =
                        self.inputs.send(failed)
                    {
                        responder.error(NbdError::from_errno(errno as i32, false));
                    }
                    return;
                }
                self.metrics.read_latency.observe(started.elapsed());
                crate::device::reply(responder, result, buf, false)
            }
        }
    }
}

/// State the device reads without asking the core (kept current by the core task).
pub struct Shared {
    role: AtomicU8,
    peer_role: AtomicU8,
    /// `secondary --force` is closing the NBD clients: refuse new ones meanwhile (a
    /// reconnecting kernel client would otherwise come straight back and hold off
    /// the demotion).
    demoting: AtomicBool,
    /// The local disk is detached: reads go through the core (to the peer).
    detached: AtomicBool,
    /// NBD job numbers (the device's requests, and reads the core task retries).
    next_job: AtomicU64,
    pub local_name: String,
    pub peer_name: String,
}

impl Shared {
    fn role(&self) -> Role {
        Role::from_code(self.role.load(Ordering::Acquire)).unwrap_or(Role::Secondary)
    }
}

/// The NBD device of a replicated node.
pub struct ReplicatedDevice {
    storage: Arc<Storage<CoreSink>>,
    metrics: Arc<Metrics>,
    inputs: mpsc::UnboundedSender<Input>,
    shared: Arc<Shared>,
    size_bytes: u64,
    runtime: tokio::runtime::Handle,
}

impl BlockDevice for ReplicatedDevice {
    fn export_info(&self) -> ExportInfo {
        // FAST_ZERO would need the peer's answer too; not offered.
        ExportInfo { can_fast_zero: false, ..ExportInfo::writable(self.size_bytes) }
    }

    fn check_open(&self) -> Result<(), String> {
        // SeqCst: pairs with the demotion's flag store and transmission count load.
        if self.shared.demoting.load(Ordering::SeqCst) {
            return Err(format!("node {} is becoming Secondary", self.shared.local_name));
        }
        if self.shared.role() == Role::Primary {
            return Ok(());
        }
        let primary = match Role::from_code(self.shared.peer_role.load(Ordering::Acquire)) {
            Some(Role::Primary) => format!("the Primary is {}", self.shared.peer_name),
            _ => "no Primary is known".to_string(),
        };
        Err(format!("node {} is Secondary; {primary}", self.shared.local_name))
    }

    fn submit(&self, request: NbdRequest, responder: Responder) {
        let job = JobId::nbd(self.shared.next_job.fetch_add(1, Ordering::Relaxed));
        let m = &self.metrics;
        let count = |n: &AtomicU64, v: u64| {
            n.fetch_add(v, Ordering::Relaxed);
        };
        let started = std::time::Instant::now();
        let request = match request {
            NbdRequest::Read { offset, buf } if self.shared.detached.load(Ordering::Acquire) => {
                count(&m.reads, 1);
                count(&m.read_bytes, buf.len() as u64);
                Request::Read { offset, buf }
            }
            NbdRequest::Cache { .. } | NbdRequest::BlockStatus { .. }
                if self.shared.detached.load(Ordering::Acquire) =>
            {
                // Nothing to warm or inspect here: CACHE is advisory, and every
                // block counts as data (a hole here says nothing of the peer's).
                return match request {
                    NbdRequest::BlockStatus { len_bytes, .. } => {
                        responder.block_status(vec![nbd_server::Extent { len_bytes, flags: 0 }])
                    }
                    _ => responder.ok(),
                };
            }
            NbdRequest::Read { offset, buf } => {
                count(&m.reads, 1);
                count(&m.read_bytes, buf.len() as u64);
                let token = Token::Direct { responder, started, offset };
                return self.storage.submit(IoOp::Read { offset, buf }, token);
            }
            NbdRequest::Cache { offset, len_bytes } => {
                let op = IoOp::Cache { offset, len: len_bytes.into() };
                return self.storage.submit(op, Token::Direct { responder, started, offset });
            }
            NbdRequest::BlockStatus { offset, len_bytes, .. } => {
                return spawn_block_status(&self.runtime, self.storage.clone(), offset, len_bytes, responder);
            }
            NbdRequest::Write { offset, data, fua } => {
                count(&m.writes, 1);
                count(&m.write_bytes, data.len() as u64);
                Request::Write { offset, data, fua }
            }
            NbdRequest::Flush => {
                count(&m.flushes, 1);
                Request::Flush
            }
            NbdRequest::Trim { offset, len_bytes, fua } => {
                count(&m.writes, 1);
                count(&m.trims, 1);
                Request::Trim { offset, len: len_bytes.into(), fua }
            }
            NbdRequest::WriteZeroes { offset, len_bytes, no_hole, fast_only, fua } => {
                count(&m.writes, 1);
                count(&m.trims, 1);
                Request::WriteZeroes { offset, len: len_bytes.into(), may_trim: !no_hole, fast_only, fua }
            }
        };
        if let Err(mpsc::error::SendError(Input::Nbd { responder, .. })) =
            self.inputs.send(Input::Nbd { job, request, responder, started })
        {
            responder.error(NbdError::Shutdown);
        }
    }
}

/// Everything the core task needs.
pub struct CoreTask {
    pub core: Core,
    pub storage: Arc<Storage<CoreSink>>,
    pub inputs: mpsc::UnboundedReceiver<Input>,
    pub inputs_tx: mpsc::UnboundedSender<Input>,
    pub conns: mpsc::Receiver<PeerConn>,
    pub control: mpsc::Receiver<ControlRequest>,
    /// The open metadata; `None` once closed after the disk was detached.
    pub meta: Arc<std::sync::Mutex<Option<MetaStore>>>,
    pub shared: Arc<Shared>,
    pub hello: watch::Sender<Hello>,
    /// Tells the peer supervisor whether to connect at all (false: StandAlone).
    pub link_enabled: watch::Sender<bool>,
    /// The state `blockctl events` reports: each change goes to its transition log.
    pub events: EventPublisher,
    /// Counters the device keeps and gauges this task refreshes on ticks.
    pub metrics: Arc<Metrics>,
    /// Commands run on replication events.
    pub handlers: crate::config::Handlers,
    pub nbd_clients: Arc<nbd_server::ServerStats>,
    /// The peer link's counters (status: wire bytes, compression in use).
    pub peer_stats: Arc<crate::peer::PeerStats>,
    /// Closes NBD clients (`secondary --force`).
    pub disconnector: nbd_server::Disconnector,
    /// This task's own control channel (to finish a forced demotion later).
    pub control_tx: mpsc::Sender<ControlRequest>,
    pub resource: String,
    /// Stops this task (sent by the daemon once NBD clients are drained).
    pub shutdown: watch::Receiver<bool>,
    /// Asks the whole daemon to stop (`blockctl down`).
    pub stop_daemon: watch::Sender<bool>,
    /// `attach-disk` requests, accepted by this task, carried out by `repl::node`
    /// (which restarts the node); capacity 1.
    pub attach_disk: mpsc::Sender<Reply>,
    /// The undo journal of a catch-up (`repl::fallback`).
    pub undo: CatchUpJournal,
}

/// Work for the metadata thread.
enum MetaWork {
    Job(MetaJob),
    /// The disk was detached: close the metadata (and release its lock).
    Close,
}

/// Runs metadata actions one at a time, in order, and reports each one's result.
/// Unbounded channel: the core keeps at most one bitmap write and one activity-log
/// transaction queued, and superblock updates and bitmap intents are bounded by the
/// writes in flight.
fn spawn_meta_thread(
    meta: Arc<std::sync::Mutex<Option<MetaStore>>>,
    inputs: mpsc::UnboundedSender<Input>,
) -> (std::sync::mpsc::Sender<MetaWork>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel::<MetaWork>();
    let handle = std::thread::Builder::new()
        .name("blockd-meta".into())
        .spawn(move || {
            let mut writer = MetaWriter::default();
            for work in rx {
                let Ok(mut m) = meta.lock() else {
                    tracing::error!("metadata lock poisoned; metadata updates stop");
                    return;
                };
                let job = match work {
                    MetaWork::Job(job) => job,
                    MetaWork::Close => {
                        if m.take().is_some() {
                            tracing::info!("disk detached: metadata closed (its lock is released)");
                        }
                        continue;
                    }
                };
                let result = match m.as_mut() {
                    Some(store) => writer.run(store, &job),
                    None => Err("not written: the disk is detached".to_string()),
                };
                drop(m);
                let _ = inputs.send(Input::MetaDone { seq: job.seq(), result });
            }
        })
        .expect("spawning the metadata thread");
    (tx, handle)
}

/// What `publish` last sent: the event snapshot and the handshake fields.
type Published = (EventSnapshot, (Generations, DiskState, Role, u32));

struct Running {
    t: CoreTask,
    published: std::cell::Cell<Option<Published>>,
    meta_jobs: std::sync::mpsc::Sender<MetaWork>,
    /// The metadata was closed after the disk was detached.
    meta_closed: bool,
    app_requests_seen: u64,
    link: Option<PeerConn>,
    /// Each NBD request's responder, and when a write arrived (for its latency).
    responders: HashMap<JobId, (Responder, Option<std::time::Instant>)>,
    /// Control requests the core has not answered yet, by command id.
    commands: HashMap<CmdId, oneshot::Sender<Result<serde_json::Value, String>>>,
    next_cmd: CmdId,
    drain: Option<oneshot::Sender<()>>,
}

impl CoreTask {
    /// Runs until shutdown; returns the core (for a final flush by the caller).
    pub async fn run(self) -> Core {
        let mut shutdown = self.shutdown.clone();
        let (meta_jobs, meta_thread) = spawn_meta_thread(self.meta.clone(), self.inputs_tx.clone());
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = tokio::time::Instant::now();
        let mut r = Running {
            t: self,
            published: std::cell::Cell::new(None),
            meta_jobs,
            meta_closed: false,
            app_requests_seen: 0,
            link: None,
            responders: HashMap::new(),
            commands: HashMap::new(),
            next_cmd: 1,
            drain: None,
        };
        r.publish();
        // Reused for every event: no allocation per request.
        let mut actions = Vec::with_capacity(16);
        loop {
            let event = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Some(input) = r.t.inputs.recv() => match input {
                    Input::Nbd { job, request, responder, started } => {
                        // Flushes are not timed: their latency is the disk's, not ours.
                        let timed = !matches!(request, Request::Flush);
                        r.responders.insert(job, (responder, timed.then_some(started)));
                        Event::Nbd { job, request }
                    }
                    Input::Disk { job, result, buf } => {
                        let buf = match buf { IoBuf::Read(b) => Some(b), _ => None };
                        Event::LocalDone { job, result, buf }
                    }
                    Input::MetaDone { seq, result } => {
                        if result.is_ok() {
                            r.t.undo.on_meta_durable(seq);
                        }
                        Event::MetaDone { seq, result }
                    }
                    Input::FallbackLost { reason } => Event::FallbackLost { reason },
                    Input::RolledBack { result } => Event::RolledBack { result },
                    Input::ReadFailed { offset, errno, responder, buf, started } => {
                        r.t.metrics.read_latency.observe(started.elapsed());
                        let failed = Event::ReadFailed { offset, errno };
                        let mut actions = r.t.core.handle(failed);
                        r.execute(&mut actions);
                        match buf {
                            Some(buf) => {
                                // Answered through the peer if this node detached,
                                // with EIO otherwise.
                                let job = JobId::nbd(r.t.shared.next_job.fetch_add(1, Ordering::Relaxed));
                                r.responders.insert(job, (responder, None));
                                Event::Nbd { job, request: Request::Read { offset, buf } }
                            }
                            None => {
                                responder.error(NbdError::from_errno(errno as i32, false));
                                continue;
                            }
                        }
                    }
                    Input::Drain { done } => {
                        r.drain = Some(done);
                        Event::Drain { job: DRAIN_JOB }
                    }
                    Input::FenceDone { result } => {
                        r.t.metrics.count_fence(&result);
                        Event::FenceDone { result }
                    }
                },
                Some(conn) = r.t.conns.recv() => match r.accept_link(conn) {
                    Some(event) => event,
                    None => continue,
                },
                Some(ev) = next_link_event(&mut r.link) => match ev {
                    LinkEvent::Message(m) => Event::PeerMessage(m),
                    LinkEvent::Sent { bytes } => Event::PeerSent { bytes },
                    LinkEvent::Closed(e) => {
                        tracing::warn!(peer = %r.t.shared.peer_name, error = %e, "peer link lost");
                        r.link = None;
                        Event::LinkDown
                    }
                },
                Some(req) = r.t.control.recv() => {
                    r.control(req);
                    continue;
                }
                now = ticks.tick() => {
                    let elapsed_ms = now.duration_since(last_tick).as_millis() as u64;
                    last_tick = now;
                    // Application requests for the `auto` resync rate: the metrics'
                    // counters, so the hot path counts each request once.
                    let m = &r.t.metrics;
                    let total = [&m.reads, &m.writes, &m.flushes]
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .sum::<u64>();
                    let app_requests = total - r.app_requests_seen;
                    r.app_requests_seen = total;
                    r.refresh_metrics();
                    Event::Tick { elapsed_ms, app_requests }
                }
            };
            r.t.core.handle_into(event, &mut actions);
            r.execute(&mut actions);
            r.publish();
            r.close_meta_if_detached();
        }
        // Everything queued for the metadata is written before the caller's final
        // bitmap write.
        drop(r.meta_jobs);
        if tokio::task::spawn_blocking(move || meta_thread.join()).await.is_err() {
            tracing::error!("the metadata thread failed");
        }
        r.t.core
    }
}

async fn next_link_event(link: &mut Option<PeerConn>) -> Option<LinkEvent> {
    match link {
        Some(l) => l.incoming.recv().await,
        None => std::future::pending().await,
    }
}

impl Running {
    /// A fresh link: the core decides whether and how to replicate (the supervisor
    /// hands over one at a time; a second one while a link is up is not used).
    fn accept_link(&mut self, conn: PeerConn) -> Option<Event> {
        if self.link.is_some() {
            let _ = conn.outgoing.send(Message::Bye { reason: "a link to this node is up already".into() });
            return None;
        }
        self.link = Some(conn);
        Some(Event::LinkUp)
    }

    /// Carries out a batch of the core's actions, in order (all of them: the
    /// vector is left empty for reuse). A catch-up's undo journal first preserves
    /// what the batch's writes overwrite (`shell::undo`).
    fn execute(&mut self, actions: &mut Vec<Action>) {
        if let Err(undo::Lost(reason)) = self.t.undo.before(actions, self.t.core.generations().current) {
            let _ = self.t.inputs_tx.send(Input::FallbackLost { reason });
        }
        for action in actions.drain(..) {
            match action {
                Action::CatchUpBegin { .. } => {}
                Action::CatchUpEnd { after_seq } => self.t.undo.end_after(after_seq),
                Action::RollBack => {
                    let result = self.t.undo.roll_back();
                    let _ = self.t.inputs_tx.send(Input::RolledBack { result });
                }
                Action::Local { job, op } => self.t.storage.submit(op, Token::Core(job)),
                Action::Send(m) => {
                    if let Some(link) = &self.link {
                        let _ = link.outgoing.send(m);
                    }
                }
                Action::DropLink { reason } => {
                    if let Some(link) = self.link.take() {
                        // Dropping the sender sends what is queued, then closes.
                        let _ = link.outgoing.send(Message::Bye { reason });
                    }
                }
                Action::LinkPolicy { enabled } => {
                    self.t.link_enabled.send_replace(enabled);
                }
                Action::Done { id, result } => {
                    if let Some(reply) = self.commands.remove(&id) {
                        let _ = reply.send(result.map(|output| match output {
                            CmdOutput::Done => serde_json::json!({}),
                            CmdOutput::Verified { verified_bytes, out_of_sync_bytes } => serde_json::json!({
                                "verified_bytes": verified_bytes,
                                "out_of_sync_bytes": out_of_sync_bytes,
                            }),
                        }));
                    }
                }
                Action::Reply { job: DRAIN_JOB, .. } => {
                    if let Some(done) = self.drain.take() {
                        let _ = done.send(());
                    }
                }
                Action::Reply { job, outcome } => {
                    let Some((responder, started)) = self.responders.remove(&job) else { continue };
                    if let Some(started) = started {
                        self.t.metrics.write_latency.observe(started.elapsed());
                    }
                    match outcome {
                        Outcome::Ok => responder.ok(),
                        Outcome::Read(buf) => responder.read_done(buf),
                        Outcome::Error(e) => {
                            self.t.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                            responder.error(e)
                        }
                    }
                }
                meta @ (Action::Persist { .. } | Action::WriteBitmap { .. } | Action::WriteAl { .. }) => {
                    if let Some(job) = MetaJob::from_action(meta) {
                        self.meta_job(job);
                    }
                }
                Action::FencePeer => self.run_fence_peer(),
                Action::AfterResyncTarget => {
                    if let Some(cmd) = self.t.handlers.after_resync_target.clone() {
                        let run = self.run_handler("after-resync-target", cmd, HANDLER_TIMEOUT);
                        tokio::spawn(async move {
                            let _ = run.await;
                        });
                    }
                }
            }
        }
    }

    /// The gauges of the metrics endpoint (every tick).
    fn refresh_metrics(&self) {
        let (m, c) = (&self.t.metrics, &self.t.core);
        let set = |g: &AtomicU64, v: u64| g.store(v, Ordering::Relaxed);
        let p = c.resync_progress();
        let (al_hot, al_tx) = c.al_stats();
        set(&m.out_of_sync_bytes, c.dirty_bytes());
        set(&m.unsent_bytes, c.unsent_bytes());
        set(&m.writes_in_flight, self.responders.len() as u64);
        set(&m.resync_rate_bytes_per_sec, p.rate_bytes_per_sec);
        set(&m.resync_done_bytes, p.done_bytes);
        set(&m.resync_total_bytes, p.total_bytes);
        set(&m.replicated_bytes, c.replicated_bytes());
        set(&m.resync_sent_bytes, p.sent_bytes);
        set(&m.al_hot_extents, al_hot as u64);
        set(&m.al_transactions, al_tx);
        set(&m.connected, u64::from(c.connection().0 == ConnState::Connected));
        set(&m.primary, u64::from(c.role() == Role::Primary));
        set(&m.up_to_date, u64::from(c.disk() == DiskState::UpToDate));
        let split_brain = c.connection().1.is_some_and(crate::metrics::is_split_brain);
        set(&m.split_brain, u64::from(split_brain));
        set(&m.fencing_peer, u64::from(c.fencing().0));
        set(&m.resync_paused, u64::from(c.sync_paused()));
        set(&m.disk_failed, u64::from(c.disk_failure().is_some()));
        set(&m.io_errors, c.io_errors());
        set(&m.ack_timeouts, c.ack_timeouts());
        set(&m.ahead, u64::from(c.repl_state() == crate::repl::core::ReplState::Ahead));
        set(&m.pull_aheads, c.ahead_count());
    }

    /// The replication state's name (DRBD's, with the paused variants).
    fn replication_name(&self) -> &'static str {
        use crate::repl::core::ReplState;
        match (self.t.core.repl_state(), self.t.core.sync_paused()) {
            (ReplState::SyncSource, true) => "PausedSyncS",
            (ReplState::SyncTarget, true) => "PausedSyncT",
            (state, _) => state.as_str(),
        }
    }

    /// Runs the fence-peer handler; its end (or absence) comes back as `FenceDone`.
    fn run_fence_peer(&self) {
        let inputs = self.t.inputs_tx.clone();
        let Some(cmd) = self.t.handlers.fence_peer.clone() else {
            let _ = inputs.send(Input::FenceDone { result: Err("no fence-peer handler configured".into()) });
            return;
        };
        let run = self.run_handler("fence-peer", cmd, FENCE_PEER_TIMEOUT);
        tokio::spawn(async move {
            let result = run.await;
            let _ = inputs.send(Input::FenceDone { result });
        });
    }

    /// A handler as `/bin/sh -c CMD` with the resource, node and peer names in its
    /// environment, bounded by `timeout` (then killed). Its output goes to the log.
    fn run_handler(
        &self,
        what: &'static str,
        cmd: String,
        timeout: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<i32, String>> + Send + 'static {
        let env = [
            ("BLOCKD_RESOURCE", self.t.resource.clone()),
            ("BLOCKD_NODE", self.t.shared.local_name.clone()),
            ("BLOCKD_PEER", self.t.shared.peer_name.clone()),
        ];
        async move {
            tracing::info!(handler = what, command = %cmd, "running handler");
            let mut command = tokio::process::Command::new("/bin/sh");
            command.arg("-c").arg(&cmd).envs(env).stdin(std::process::Stdio::null()).kill_on_drop(true);
            let output = match tokio::time::timeout(timeout, command.output()).await {
                Err(_) => return Err(format!("{what} handler did not return within {timeout:?}; killed")),
                Ok(Err(e)) => return Err(format!("cannot run the {what} handler: {e}")),
                Ok(Ok(output)) => output,
            };
            let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
            let code = output.status.code();
            tracing::info!(
                handler = what,
                code,
                stdout = %text(&output.stdout),
                stderr = %text(&output.stderr),
                "handler returned"
            );
            code.ok_or_else(|| format!("{what} handler was killed by a signal"))
        }
    }

    fn meta_job(&self, job: MetaJob) {
        if self.meta_jobs.send(MetaWork::Job(job)).is_err() {
            tracing::error!("the metadata thread is gone; a metadata update was lost");
        }
    }

    /// Once Diskless, the core writes no more metadata (its last update, the
    /// best-effort Outdated, is queued before): the metadata thread closes it after
    /// that update, so `create-md` can run on a replaced disk before `attach-disk`.
    fn close_meta_if_detached(&mut self) {
        if !self.meta_closed && self.t.core.disk() == DiskState::Diskless {
            self.meta_closed = true;
            let _ = self.meta_jobs.send(MetaWork::Close);
        }
    }

    /// Keeps the handshake `Hello` current for the next connection (informational),
    /// and publishes the state for status, events and the NBD side.
    fn publish(&self) {
        let (gens, disk, role) = (self.t.core.generations(), self.t.core.disk(), self.t.core.role());
        let c = &self.t.core;
        let flags = (h_flag(c.crashed_primary(), HELLO_CRASHED_PRIMARY))
            | h_flag(c.dirty_bytes() > 0, HELLO_DIRTY)
            | h_flag(c.discard_my_data(), HELLO_DISCARD_MY_DATA);
        let p = c.resync_progress();
        let (peer_role, peer_disk) = c.peer_view();
        self.t.shared.role.store(role.code(), Ordering::Release);
        self.t.shared.peer_role.store(peer_role.map_or(0, Role::code), Ordering::Release);
        self.t.shared.detached.store(disk.is_detached(), Ordering::Release);
        let snapshot = EventSnapshot {
            role: role.as_str(),
            disk: disk.as_str(),
            connection: c.connection().0.as_str(),
            peer_role: peer_role.map_or("Unknown", Role::as_str),
            replication: self.replication_name(),
            peer_disk: peer_disk.map_or("DUnknown", DiskState::as_str),
            out_of_sync_bytes: c.dirty_bytes(),
            resync_done_bytes: p.done_bytes,
            resync_total_bytes: p.total_bytes,
        };
        // This runs after every event: compared with what was published last, so the
        // watches' locks are taken (and subscribers woken) only on a change.
        let hello = (gens, disk, role, flags);
        let (last_snapshot, last_hello) = self.published.get().unzip();
        if last_snapshot != Some(snapshot) {
            self.t.events.publish(snapshot);
        }
        if last_hello != Some(hello) {
            self.t.hello.send_modify(|h| {
                h.gens = gens;
                h.disk = disk;
                h.role = role;
                h.flags = flags;
            });
        }
        self.published.set(Some((snapshot, hello)));
    }
}

/// Builds the device and the pieces of the core task that share channels.
pub fn new_device(
    storage: Arc<Storage<CoreSink>>,
    inputs: mpsc::UnboundedSender<Input>,
    shared: Arc<Shared>,
    size_bytes: u64,
    metrics: Arc<Metrics>,
) -> ReplicatedDevice {
    ReplicatedDevice {
        storage,
        metrics,
        inputs,
        shared,
        size_bytes,
        runtime: tokio::runtime::Handle::current(),
    }
}

/// The sink and the channel its completions travel on.
pub fn new_sink(
    metrics: Arc<Metrics>,
) -> (Arc<CoreSink>, mpsc::UnboundedSender<Input>, mpsc::UnboundedReceiver<Input>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(CoreSink { inputs: tx.clone(), metrics }), tx, rx)
}

/// Shared role state, starting as Secondary.
pub fn new_shared(local_name: &str, peer_name: &str) -> Arc<Shared> {
    Arc::new(Shared {
        role: AtomicU8::new(Role::Secondary.code()),
        peer_role: AtomicU8::new(0),
        demoting: AtomicBool::new(false),
        detached: AtomicBool::new(false),
        next_job: AtomicU64::new(1),
        local_name: local_name.to_string(),
        peer_name: peer_name.to_string(),
    })
}

fn h_flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}
