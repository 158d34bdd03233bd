//! The simulated world: nodes, network, clients and operators on one virtual clock,
//! every choice drawn from one seeded PRNG, so a seed replays exactly.
//!
//! The loop pops the earliest event (ties in scheduling order), hands it to its
//! node's real [`Core`] (or to the client, the operator, the network), executes
//! the actions that come out against the simulated disks, metadata and network, and
//! checks the invariants (`checks`). One event is one step.

use crate::disk::BLOCK_BYTES;
use std::collections::{BTreeMap, HashMap, VecDeque};

use blockd::config::Protocol;
use blockd::peer::msg::Message;
use blockd::repl::core::{Action, CmdId, CmdOutput, Command, Core, CoreConfig, Event, JobId};
use blockd::repl::recover::MetaJob;
use blockd::state::Role;
use blockd::storage::IoOp;
use nbd_server::buf::BufPool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::client::Client;
use crate::config::SimConfig;
use crate::model::Model;
use crate::net::Net;
use crate::node::{PendingOp, SimNode};

/// Virtual time, in microseconds.
pub type Micros = u64;

pub const MS: Micros = 1000;
pub const SEC: Micros = 1_000_000;

/// Something that happens at a point of virtual time.
#[derive(Debug)]
pub enum Ev {
    Tick {
        node: usize,
        inc: u64,
    },
    IoDone {
        node: usize,
        inc: u64,
        op: u64,
    },
    /// A rollback to the undo journal's image is done (`Action::RollBack`).
    RolledBack {
        node: usize,
        inc: u64,
    },
    MetaExec {
        node: usize,
        inc: u64,
    },
    LinkUp {
        node: usize,
        session: u64,
    },
    Deliver {
        to: usize,
        session: u64,
        msg: Message,
    },
    PeerSent {
        node: usize,
        session: u64,
        bytes: u64,
    },
    LinkDown {
        node: usize,
        session: u64,
    },
    Dial,
    ClientIssue,
    Chaos,
    Heal,
    Restart {
        node: usize,
    },
    /// A command from the operator (or two at once: same time, consecutive).
    Command {
        node: usize,
        cmd: Command,
    },
    /// `secondary`: stop taking client requests, then demote once drained.
    Demote {
        node: usize,
        force: bool,
        attempt: u32,
    },
}

/// Why a seed failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: u64,
    pub time_us: Micros,
    pub invariant: &'static str,
    pub detail: String,
}

/// The phase of an episode: faults and commands, then healing and a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Chaos,
    Heal { since_us: Micros },
}

pub struct World {
    pub cfg: SimConfig,
    pub core_cfg: CoreConfig,
    pub rng: StdRng,
    pub now_us: Micros,
    next_seq: u64,
    queue: BTreeMap<(Micros, u64), Ev>,
    pub nodes: Vec<SimNode>,
    pub net: Net,
    pub client: Client,
    pub model: Model,
    pub steps: u64,
    pub failure: Option<Failure>,
    trace: VecDeque<String>,
    pub phase: Phase,
    pub pool: BufPool,
    /// Operator commands waiting for their `Done`: (node, id) → what.
    pub commands: HashMap<(usize, CmdId), Command>,
    next_cmd: CmdId,
    /// Writes the peer acknowledged: (node, job) → the peer and its incarnation
    /// (a requirement dies with the incarnation that took it on).
    pub peer_acked: HashMap<(usize, JobId), (usize, u64)>,
    /// Nodes whose next completed resync is by an operator's choice (discard,
    /// invalidate): the stale-side check does not apply.
    pub discarding: Vec<bool>,
    /// A forced demotion waits for its drain.
    pub draining: Vec<bool>,
    /// The acknowledgement count when each node last sent `ResyncDone`.
    pub resync_done_mark: Vec<u64>,
    pub episodes: u64,
    /// Times a Primary pulled ahead of its peer (`Ahead` sent).
    pub pull_aheads: u64,
    /// Rollbacks of a sync target to its image from before the catch-up.
    pub rollbacks: u64,
    pub checks_passed: u64,
    pub episode_start_us: Micros,
    pub last_heal_action_us: Micros,
    /// Per (session, receiver): the replicated writes, for the prefix invariant.
    pub prefix_logs: HashMap<(u64, usize), crate::prefix::SessionLog>,
}

/// The job id of a forced demotion's drain (NBD job ids stay far below).
pub const DRAIN_JOB: JobId = JobId::nbd(u64::MAX);

impl World {
    pub fn new(cfg: SimConfig) -> anyhow::Result<World> {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let names = ["alpha", "beta", "gamma", "delta"];
        let mut nodes = Vec::new();
        for (i, name) in names.iter().take(cfg.nodes).enumerate() {
            nodes.push(SimNode::create(i, name, cfg.disk_bytes, cfg.clear_bitmap, rng.random())?);
        }
        let size_bytes = nodes[0].size_bytes;
        let core_cfg = cfg.core_config(size_bytes);
        let n = cfg.nodes;
        let mut w = World {
            cfg,
            core_cfg,
            rng,
            now_us: 0,
            next_seq: 0,
            queue: BTreeMap::new(),
            nodes,
            net: Net::default(),
            client: Client::default(),
            model: Model::new(n),
            steps: 0,
            failure: None,
            trace: VecDeque::new(),
            phase: Phase::Chaos,
            pool: BufPool::new(64 << 20),
            commands: HashMap::new(),
            next_cmd: 1,
            peer_acked: HashMap::new(),
            discarding: vec![false; n],
            draining: vec![false; n],
            resync_done_mark: vec![0; n],
            episodes: 0,
            pull_aheads: 0,
            rollbacks: 0,
            checks_passed: 0,
            episode_start_us: 0,
            last_heal_action_us: 0,
            prefix_logs: HashMap::new(),
        };
        for i in 0..n {
            w.restart(i);
        }
        w.at(10 * MS, Ev::Dial);
        w.at(MS, Ev::ClientIssue);
        w.at(50 * MS, Ev::Chaos);
        Ok(w)
    }

    /// Schedules `ev` `delay_us` from now.
    pub fn at(&mut self, delay_us: Micros, ev: Ev) {
        self.next_seq += 1;
        self.queue.insert((self.now_us + delay_us, self.next_seq), ev);
    }

    pub fn log(&mut self, line: String) {
        if self.cfg.verbose {
            eprintln!("[{:>10.3} ms #{}] {line}", self.now_us as f64 / 1000.0, self.steps);
        }
        if self.trace.len() == 400 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{:.3} ms #{}] {line}", self.now_us as f64 / 1000.0, self.steps));
    }

    /// A detail shown only with `--verbose` (not kept for failure reports).
    pub fn debug(&self, line: impl FnOnce() -> String) {
        if self.cfg.verbose {
            eprintln!("[{:>10.3} ms #{}]   {}", self.now_us as f64 / 1000.0, self.steps, line());
        }
    }

    pub fn trace(&self) -> impl Iterator<Item = &String> {
        self.trace.iter()
    }

    pub fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.failure.is_none() {
            self.log(format!("FAILED {invariant}: {detail}"));
            self.failure = Some(Failure { step: self.steps, time_us: self.now_us, invariant, detail });
        }
    }

    /// Runs until `max_steps` events were handled or an invariant broke.
    pub fn run(&mut self, max_steps: u64) {
        while self.steps < max_steps && self.failure.is_none() {
            let Some(((time, _), ev)) = self.queue.pop_first() else {
                self.fail("liveness", "nothing left to happen".into());
                break;
            };
            self.now_us = time;
            self.steps += 1;
            self.dispatch(ev);
            if self.failure.is_none() {
                self.check_always();
            }
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, inc } => {
                if !self.alive(node, inc) {
                    return;
                }
                let run = self.nodes[node].run.as_mut().expect("alive");
                let app_requests = std::mem::take(&mut run.app_requests);
                self.handle(node, Event::Tick { elapsed_ms: 100, app_requests });
                self.at(100 * MS, Ev::Tick { node, inc });
            }
            Ev::IoDone { node, inc, op } => {
                if self.alive(node, inc) {
                    self.complete_io(node, op);
                }
            }
            Ev::RolledBack { node, inc } => {
                if self.alive(node, inc) {
                    self.roll_back(node);
                }
            }
            Ev::MetaExec { node, inc } => {
                if self.alive(node, inc) {
                    self.run_meta(node);
                }
            }
            Ev::LinkUp { node, session } => self.link_up(node, session),
            Ev::Deliver { to, session, msg } => self.deliver(to, session, msg),
            Ev::PeerSent { node, session, bytes } => {
                if self.session_of(node) == Some(session) {
                    self.handle(node, Event::PeerSent { bytes });
                }
            }
            Ev::LinkDown { node, session } => self.link_down(node, session),
            Ev::Dial => {
                self.dial();
                let (lo, hi) = self.cfg.redial_us;
                let next = self.rng.random_range(lo..hi);
                self.at(next, Ev::Dial);
            }
            Ev::ClientIssue => self.client_issue(),
            Ev::Chaos => self.chaos(),
            Ev::Heal => self.heal(),
            Ev::Restart { node } => self.restart(node),
            Ev::Command { node, cmd } => self.command(node, cmd),
            Ev::Demote { node, force, attempt } => self.demote(node, force, attempt),
        }
    }

    fn alive(&self, node: usize, inc: u64) -> bool {
        self.nodes[node].incarnation == inc && self.nodes[node].run.is_some()
    }

    pub fn running(&self, node: usize) -> bool {
        self.nodes[node].run.is_some()
    }

    pub fn core(&self, node: usize) -> Option<&Core> {
        self.nodes[node].run.as_ref().map(|r| &r.core)
    }

    pub fn session_of(&self, node: usize) -> Option<u64> {
        self.nodes[node].run.as_ref().and_then(|r| r.session)
    }

    /// Hands `event` to `node`'s core, checks what changed, executes the actions.
    pub fn handle(&mut self, node: usize, event: Event) {
        if self.cfg.verbose {
            let name = &self.nodes[node].name;
            let text = match &event {
                Event::Nbd { job, request } => format!("{name} <- nbd {job} {}", describe_request(request)),
                Event::PeerMessage(m) => format!("{name} <- {}", describe_message(m)),
                Event::LocalDone { job, .. } => format!("{name} <- done {job}"),
                Event::PeerSent { .. } | Event::Tick { .. } => String::new(),
                other => format!("{name} <- {other:?}"),
            };
            if !text.is_empty() {
                self.debug(|| text);
            }
        }
        let Some(run) = self.nodes[node].run.as_mut() else { return };
        let before = crate::checks::Observed::of(&run.core);
        let mut actions = Vec::new();
        let core = &mut run.core;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.handle_into(event, &mut actions)));
        if let Err(panic) = result {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            self.fail("no panic", format!("{}: core panicked: {what}", self.nodes[node].name));
            return;
        }
        let after = crate::checks::Observed::of(&self.nodes[node].run.as_ref().expect("running").core);
        self.transition(node, before, after);
        self.execute(node, actions);
    }

    fn execute(&mut self, node: usize, actions: Vec<Action>) {
        for action in actions {
            if self.cfg.verbose {
                let name = self.nodes[node].name.clone();
                let text = match &action {
                    Action::Local { job, op } => format!("{name} -> local {job} {}", describe_op(op)),
                    Action::Send(m) => format!("{name} -> send {}", describe_message(m)),
                    other => format!("{name} -> {other:?}"),
                };
                self.debug(|| text);
            }
            match action {
                Action::Local { job, op } => self.submit_io(node, job, op),
                Action::Send(msg) => self.send(node, msg),
                Action::Reply { job, outcome } => self.client_reply(node, job, outcome),
                Action::FencePeer | Action::AfterResyncTarget => {}
                Action::CatchUpBegin { .. } => {
                    let n = &mut self.nodes[node];
                    if let Some(run) = n.run.as_mut() {
                        run.undo = Some(Default::default());
                        let quiet = run.ops.values().all(|p| p.op.overwritten_range().is_none());
                        run.undo_snapshot = quiet.then(|| {
                            let mut image = vec![0u8; n.disk.len_bytes() as usize];
                            n.disk.read(0, &mut image);
                            image
                        });
                    }
                }
                Action::CatchUpEnd { .. } => {
                    if let Some(run) = self.nodes[node].run.as_mut() {
                        run.undo = None;
                        run.undo_snapshot = None;
                    }
                }
                Action::RollBack => {
                    let inc = self.nodes[node].incarnation;
                    let latency = self.rng.random_range(MS..50 * MS);
                    self.at(latency, Ev::RolledBack { node, inc });
                }
                Action::Done { id, result } => self.command_done(node, id, result),
                Action::DropLink { reason } => self.drop_link(node, &reason),
                Action::LinkPolicy { enabled } => {
                    if let Some(run) = self.nodes[node].run.as_mut() {
                        run.link_enabled = enabled;
                    }
                }
                meta @ (Action::Persist { .. } | Action::WriteBitmap { .. } | Action::WriteAl { .. }) => {
                    if let Some(job) = MetaJob::from_action(meta) {
                        self.queue_meta(node, job);
                    }
                }
            }
        }
    }

    fn submit_io(&mut self, node: usize, job: JobId, op: IoOp) {
        let primary = self.core(node).is_some_and(|c| c.role() == Role::Primary);
        let writes = matches!(op, IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. });
        if primary && writes && job.kind() != blockd::repl::core::JobKind::Nbd {
            let name = self.nodes[node].name.clone();
            self.fail(
                "a Primary applies no peer data",
                format!("{name} (Primary) writes for the peer: {op:?}"),
            );
        }
        let latency = match op {
            // Longer than `ack-timeout`: the peer must not wait for it.
            _ if self.nodes[node].disk.hung() => self.rng.random_range(12 * SEC..20 * SEC),
            IoOp::Flush => self.rng.random_range(100..5000),
            _ => {
                if self.rng.random_bool(0.02) {
                    self.rng.random_range(5 * MS..50 * MS)
                } else {
                    let (lo, hi) = self.cfg.write_latency_us;
                    self.rng.random_range(lo..hi)
                }
            }
        };
        let n = &mut self.nodes[node];
        if let (Some(undo), Some(range)) =
            (n.run.as_mut().and_then(|r| r.undo.as_mut()), op.overwritten_range())
        {
            // The shell preserves what a write overwrites, durably, before
            // submitting it (`shell::undo`).
            let bs = BLOCK_BYTES as u64;
            for block in range.start / bs..range.end.div_ceil(bs) {
                undo.entry(block).or_insert_with(|| {
                    let mut old = vec![0u8; BLOCK_BYTES];
                    n.disk.read(block * bs, &mut old);
                    old
                });
            }
        }
        let inc = n.incarnation;
        let submitted_stamp = n.disk.stamp();
        let run = n.run.as_mut().expect("running");
        let id = run.next_op;
        run.next_op += 1;
        run.ops.insert(id, PendingOp { job, op, submitted_stamp });
        self.at(latency, Ev::IoDone { node, inc, op: id });
    }

    fn complete_io(&mut self, node: usize, id: u64) {
        let n = &mut self.nodes[node];
        let run = n.run.as_mut().expect("alive");
        let Some(PendingOp { job, op, submitted_stamp }) = run.ops.remove(&id) else { return };
        let disk = &n.disk;
        let writes = matches!(op, IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. });
        let fault = disk.data_fault(writes);
        if let Some((errno, written)) = fault {
            let name = n.name.clone();
            self.log(format!("{name}: {} fails with {errno} (written: {written})", describe_op(&op)));
            let n = &mut self.nodes[node];
            let buf = match op {
                IoOp::Read { buf, .. } => Some(buf),
                IoOp::Write { offset, buf, fua } if written => {
                    n.disk.write(offset, &buf, fua);
                    None
                }
                IoOp::Trim { offset, len, fua } | IoOp::WriteZeroes { offset, len, fua, .. } if written => {
                    n.disk.write_zeroes(offset, len, fua);
                    None
                }
                _ => None,
            };
            self.handle(node, Event::LocalDone { job, result: Err(errno), buf });
            return;
        }
        let n = &mut self.nodes[node];
        let disk = &n.disk;
        let buf = match op {
            IoOp::Read { offset, mut buf } => {
                disk.read(offset, &mut buf);
                Some(buf)
            }
            IoOp::Write { offset, buf, fua } => {
                disk.write(offset, &buf, fua);
                None
            }
            IoOp::Flush => {
                disk.flush_completed(submitted_stamp);
                None
            }
            IoOp::Trim { offset, len, fua } | IoOp::WriteZeroes { offset, len, fua, .. } => {
                disk.write_zeroes(offset, len, fua);
                None
            }
            IoOp::Cache { .. } => None,
        };
        self.handle(node, Event::LocalDone { job, result: Ok(()), buf });
    }

    fn queue_meta(&mut self, node: usize, job: MetaJob) {
        let inc = self.nodes[node].incarnation;
        let run = self.nodes[node].run.as_mut().expect("running");
        run.meta_queue.push_back(job);
        if !run.meta_busy {
            run.meta_busy = true;
            let delay = self.rng.random_range(50..3000);
            self.at(delay, Ev::MetaExec { node, inc });
        }
    }

    /// The metadata thread carries out the next job (a crash may strike during it).
    fn run_meta(&mut self, node: usize) {
        let crash_during =
            self.phase == Phase::Chaos && self.rng.random_bool(self.cfg.crash_in_meta_probability);
        let n = &mut self.nodes[node];
        let run = n.run.as_mut().expect("alive");
        let Some(job) = run.meta_queue.pop_front() else {
            run.meta_busy = false;
            return;
        };
        if crash_during {
            n.disk.fail_power();
            let _ = run.meta_writer.run(&mut run.meta, &job);
            let seq = job.seq();
            return self.crash(node, &format!("power lost during metadata job {seq}"));
        }
        let result = run.meta_writer.run(&mut run.meta, &job);
        let seq = job.seq();
        if !run.meta_queue.is_empty() {
            let inc = n.incarnation;
            let delay = self.rng.random_range(50..3000);
            self.at(delay, Ev::MetaExec { node, inc });
        } else {
            run.meta_busy = false;
        }
        if let Err(e) = &result {
            self.log(format!("{}: metadata job {seq} failed: {e}", self.nodes[node].name));
        }
        self.handle(node, Event::MetaDone { seq, result });
    }

    /// Power loss on `node`: in-flight writes may or may not have landed, and the
    /// disk keeps any subset of what was not flushed.
    pub fn crash(&mut self, node: usize, why: &str) {
        let n = &mut self.nodes[node];
        let Some(run) = n.run.take() else { return };
        n.incarnation += 1;
        // Its job numbers start over: acks the peer sent for its old jobs must not
        // be taken for new ones (a harness bug, not the core's).
        self.peer_acked.retain(|(primary, _), _| *primary != node);
        let mut ops: Vec<(u64, PendingOp)> = run.ops.into_iter().collect();
        ops.sort_unstable_by_key(|(id, _)| *id);
        for (_, op) in ops {
            if !self.rng.random_bool(0.5) {
                continue;
            }
            match op.op {
                IoOp::Write { offset, buf, .. } => n.disk.write(offset, &buf, false),
                IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
                    n.disk.write_zeroes(offset, len, false)
                }
                _ => {}
            }
        }
        let report = n.disk.crash(self.cfg.tear_probability);
        let name = n.name.clone();
        self.log(format!("{name} CRASHED ({why}); disk: {report:?}"));
        self.model.crashed(node);
        self.client.node_gone(node);
        // Only what was flushed is kept: the crash invariant checks that.
        self.prefix_logs.retain(|(_, receiver), _| *receiver != node);
        if let Some(session) = run.session {
            self.cut(session);
        }
    }

    /// Starts (or restarts) a node from its disk.
    pub fn restart(&mut self, node: usize) {
        if self.running(node) {
            return;
        }
        let seed = self.rng.random();
        let cfg = self.core_cfg.clone();
        if let Err(e) = self.nodes[node].start(&cfg, seed) {
            let name = self.nodes[node].name.clone();
            self.log(format!("{name}: start failed: {e:#}"));
            let retry = self.rng.random_range(100 * MS..SEC);
            self.at(retry, Ev::Restart { node });
            return;
        }
        let n = &self.nodes[node];
        let (name, inc) = (n.name.clone(), n.incarnation);
        let core = &n.run.as_ref().expect("started").core;
        self.log(format!("{name} started: {:?} {} gens {:x?}", core.role(), core.disk(), core.generations()));
        self.check_restarted(node);
        let first = self.rng.random_range(0..100 * MS);
        self.at(first, Ev::Tick { node, inc });
    }

    // ---- network ----

    /// Opens sessions between pairs that may connect.
    fn dial(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                let may = |n: &SimNode| n.run.as_ref().is_some_and(|r| r.link_enabled && r.session.is_none());
                if !may(&self.nodes[a]) || !may(&self.nodes[b]) {
                    continue;
                }
                if self.net.partitioned(a, b, self.now_us) || self.net.live_between(a, b).is_some() {
                    continue;
                }
                // Each core gets the link at its own moment (sometimes much later),
                // as the handshake and the hand-over take.
                let mut delay = || {
                    if self.rng.random_bool(0.1) {
                        self.rng.random_range(MS..100 * MS)
                    } else {
                        self.rng.random_range(10..2000)
                    }
                };
                let (da, db) = (delay(), delay());
                let session = self.net.open(a, b, [self.now_us + da, self.now_us + db]);
                self.log(format!(
                    "session {session} opened between {} and {}",
                    self.nodes[a].name, self.nodes[b].name
                ));
                self.at(da, Ev::LinkUp { node: a, session });
                self.at(db, Ev::LinkUp { node: b, session });
            }
        }
    }

    fn link_up(&mut self, node: usize, session: u64) {
        let usable = self.net.get(session).is_some_and(|s| !s.cut && s.up[s.side(node)]);
        let Some(run) = self.nodes[node].run.as_mut() else { return };
        if !usable || run.session.is_some() {
            return;
        }
        run.session = Some(session);
        self.handle(node, Event::LinkUp);
    }

    fn send(&mut self, from: usize, msg: Message) {
        let Some(session) = self.session_of(from) else { return };
        let Some(s) = self.net.get(session) else { return };
        if s.cut {
            return;
        }
        let to = s.other(from);
        let to_side = s.side(to);
        if matches!(msg, Message::ResyncDone { .. }) {
            self.resync_done_mark[from] = self.model.ack_mark();
        }
        if matches!(msg, Message::Ahead { .. }) {
            self.pull_aheads += 1;
        }
        if let Message::WriteAck { id, errno: 0 } = msg {
            self.check_write_ack(from, to, JobId::from_raw(id));
        }
        self.log_for_prefix(session, to, &msg);
        let bytes = msg.wire_len();
        let latency = self.rng.random_range(20..600) + bytes / 2000;
        let now_us = self.now_us;
        let s = self.net.get_mut(session).expect("checked");
        // A slow link: the frame leaves once everything queued before it has, at
        // the link's rate (the sender's queue builds up: pull-ahead's congestion).
        let on_wire_us = self.cfg.link_bytes_per_sec.map(|rate| {
            let start = s.wire_free_us[to_side].max(now_us);
            s.wire_free_us[to_side] = start + bytes * SEC / rate;
            s.wire_free_us[to_side] - now_us
        });
        let when = (now_us + latency + on_wire_us.unwrap_or(0)).max(s.last_delivery_us[to_side] + 1);
        s.last_delivery_us[to_side] = when;
        let delay = when - now_us;
        self.at(delay, Ev::Deliver { to, session, msg });
        let sent = self.rng.random_range(1..200);
        self.at(on_wire_us.unwrap_or(sent), Ev::PeerSent { node: from, session, bytes });
    }

    fn deliver(&mut self, to: usize, session: u64, msg: Message) {
        if self.session_of(to) != Some(session) || self.net.get(session).is_none_or(|s| s.cut) {
            return;
        }
        let from = self.net.get(session).expect("checked").other(to);
        match &msg {
            Message::WriteAck { id, errno: 0 } | Message::RecvAck { id } => {
                let inc = self.nodes[from].incarnation;
                self.peer_acked.insert((to, JobId::from_raw(*id)), (from, inc));
            }
            _ => {}
        }
        self.handle(to, Event::PeerMessage(msg));
    }

    fn link_down(&mut self, node: usize, session: u64) {
        if self.session_of(node) == Some(session) {
            self.check_prefix(node, session);
        }
        if let Some(s) = self.net.get_mut(session) {
            let side = s.side(node);
            s.up[side] = false;
        }
        self.net.reap();
        if self.session_of(node) != Some(session) {
            return;
        }
        self.nodes[node].run.as_mut().expect("running").session = None;
        self.handle(node, Event::LinkDown);
    }

    /// The node closes its link itself (refusal, `disconnect`).
    fn drop_link(&mut self, node: usize, reason: &str) {
        let Some(session) = self.session_of(node) else { return };
        self.check_prefix(node, session);
        self.nodes[node].run.as_mut().expect("has a session").session = None;
        self.log(format!("{} drops session {session}: {reason}", self.nodes[node].name));
        let Some(s) = self.net.get_mut(session) else { return };
        let side = s.side(node);
        s.up[side] = false;
        let other = s.other(node);
        let other_side = s.side(other);
        if s.up[other_side] && !s.cut {
            let after = s.last_delivery_us[other_side].max(self.now_us) - self.now_us;
            let extra = self.rng.random_range(10..1000);
            self.at(after + extra, Ev::LinkDown { node: other, session });
        }
        self.net.reap();
    }

    /// The session breaks: what is in flight is lost; each side notices by itself.
    pub fn cut(&mut self, session: u64) {
        let Some(s) = self.net.get_mut(session) else { return };
        if s.cut {
            return;
        }
        s.cut = true;
        let sides: Vec<usize> = (0..2).filter(|&i| s.up[i]).map(|i| s.nodes[i]).collect();
        for node in sides {
            // A reset is seen at once; a silent peer only after the keepalive timeout.
            let delay = if self.rng.random_bool(0.5) {
                self.rng.random_range(10..2 * MS)
            } else {
                self.rng.random_range(MS..5 * SEC)
            };
            self.at(delay, Ev::LinkDown { node, session });
        }
        self.log(format!("session {session} cut"));
    }

    // ---- commands ----

    pub fn command(&mut self, node: usize, cmd: Command) {
        if !self.running(node) {
            return;
        }
        let id = self.next_cmd;
        self.next_cmd += 1;
        self.log(format!("{}: operator {cmd:?} (#{id})", self.nodes[node].name));
        self.commands.insert((node, id), cmd.clone());
        match &cmd {
            Command::Connect { discard_my_data: true } => self.discarding[node] = true,
            Command::Invalidate => self.discarding[node] = true,
            Command::InvalidateRemote => {
                for other in 0..self.nodes.len() {
                    if other != node {
                        self.discarding[other] = true;
                    }
                }
            }
            _ => {}
        }
        self.handle(node, Event::Command { id, cmd });
    }

    fn command_done(&mut self, node: usize, id: CmdId, result: Result<CmdOutput, String>) {
        let cmd = self.commands.remove(&(node, id));
        let name = self.nodes[node].name.clone();
        self.log(format!("{name}: {cmd:?} (#{id}) -> {result:?}"));
    }

    /// `secondary [--force]`: clients are closed first (no new requests); the core
    /// is asked once none is in flight (with `--force`, after a drain).
    fn demote(&mut self, node: usize, force: bool, attempt: u32) {
        let Some(run) = self.nodes[node].run.as_mut() else { return };
        run.accepting_clients = false;
        if self.client.outstanding_on(node) > 0 && attempt < 50 {
            self.at(20 * MS, Ev::Demote { node, force, attempt: attempt + 1 });
            return;
        }
        if force {
            // Everything so far durable here and on the peer; the demotion follows
            // the drain's reply (`client_reply`).
            self.draining[node] = true;
            self.handle(node, Event::Drain { job: DRAIN_JOB });
            return;
        }
        self.finish_demote(node);
    }

    pub fn finish_demote(&mut self, node: usize) {
        self.command(node, Command::Demote);
        if let Some(run) = self.nodes[node].run.as_mut() {
            run.accepting_clients = true;
        }
    }

    /// Messages, disk ops or metadata jobs still pending.
    pub fn in_flight(&self) -> bool {
        self.queue.values().any(|e| {
            matches!(
                e,
                Ev::Deliver { .. }
                    | Ev::IoDone { .. }
                    | Ev::MetaExec { .. }
                    | Ev::LinkUp { .. }
                    | Ev::LinkDown { .. }
                    | Ev::PeerSent { .. }
            )
        })
    }

    pub fn protocol(&self) -> Protocol {
        self.core_cfg.protocol
    }
}

fn describe_request(r: &blockd::repl::core::Request) -> String {
    use blockd::repl::core::Request;
    match r {
        Request::Write { offset, data, fua } => {
            let tag = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            format!("write #{tag} blocks {}+{} fua={fua}", offset / 4096, data.len() / 4096)
        }
        Request::Trim { offset, len, fua } => {
            format!("trim blocks {}+{} fua={fua}", offset / 4096, len / 4096)
        }
        Request::WriteZeroes { offset, len, fua, .. } => {
            format!("zeroes blocks {}+{} fua={fua}", offset / 4096, len / 4096)
        }
        Request::Flush => "flush".into(),
        Request::Read { offset, buf } => format!("read blocks {}+{}", offset / 4096, buf.len() / 4096),
    }
}

fn describe_op(op: &IoOp) -> String {
    match op {
        IoOp::Write { offset, buf, fua } => {
            let tag = u64::from_le_bytes(buf[0..8].try_into().expect("8 bytes"));
            format!("write #{tag} blocks {}+{} fua={fua}", offset / 4096, buf.len() / 4096)
        }
        IoOp::Read { offset, buf } => format!("read blocks {}+{}", offset / 4096, buf.len() / 4096),
        other => format!("{other:?}"),
    }
}

fn describe_message(m: &Message) -> String {
    match m {
        Message::Write { id, epoch, offset, fua, data } => {
            let tag = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            format!("Write id {id} e{epoch} #{tag} blocks {}+{} fua={fua}", offset / 4096, data.len() / 4096)
        }
        Message::ResyncData { offset, data } => {
            format!("ResyncData blocks {}+{}", offset / 4096, data.len() / 4096)
        }
        Message::BitmapBlock { index, .. } => format!("BitmapBlock {index}"),
        Message::Digests { offset, len, .. } => format!("Digests {offset}+{len}"),
        other => format!("{other:?}"),
    }
}

impl World {
    /// `Action::RollBack`: the preserved blocks are written back, durably.
    fn roll_back(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let Some(undo) = n.run.as_mut().and_then(|r| r.undo.take()) else {
            self.handle(node, Event::RolledBack { result: Err("no undo journal".into()) });
            return;
        };
        let bs = BLOCK_BYTES as u64;
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for (block, old) in &undo {
            n.disk.write(block * bs, old, true);
            match ranges.last_mut() {
                Some(last) if last.end == block * bs => last.end += bs,
                _ => ranges.push(block * bs..(block + 1) * bs),
            }
        }
        let name = n.name.clone();
        self.rollbacks += 1;
        if let Some(snapshot) = n.run.as_mut().and_then(|r| r.undo_snapshot.take()) {
            let mut now = vec![0u8; snapshot.len()];
            n.disk.read(0, &mut now);
            // The metadata at the end of the disk is not the journal's business.
            let data_end = self.core(node).map_or(0, |c| c.size_bytes()) as usize;
            if let Some(at) = (0..data_end.min(now.len())).find(|&i| now[i] != snapshot[i]) {
                let detail = format!("{name}: byte {at} differs from the image before the catch-up");
                self.fail("a rollback restores the image from before the catch-up", detail);
            }
        }
        self.log(format!("{name}: rolled back {} blocks to the image before the catch-up", undo.len()));
        self.handle(node, Event::RolledBack { result: Ok(ranges) });
    }
}
