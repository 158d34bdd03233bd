//! The operator and the faults: an episode is a chaos phase (link cuts,
//! partitions, crashes, metadata faults, and every operator command on either node
//! or on both at the same step), then a healing phase in which a careful operator
//! restarts what is down, reconnects, resolves split brains and keeps one Primary,
//! until the pair is connected, in sync and idle; then the quiescence checks run
//! and the next episode starts. Healing that does not converge in time is a
//! failure too (a resync that stopped and never resumed, a state that wedged).

use blockd::repl::core::{Command, ConnState, Link, ReplState};
use blockd::state::{DiskState, Role};
use rand::Rng;

use crate::disk::MetaFaults;
use crate::world::{Ev, MS, Phase, SEC, World};

impl World {
    pub fn chaos(&mut self) {
        if self.phase != Phase::Chaos {
            return;
        }
        if self.now_us >= self.episode_start_us + self.cfg.chaos_us {
            self.log("healing".into());
            self.phase = Phase::Heal { since_us: self.now_us };
            self.net.heal();
            for n in &self.nodes {
                n.disk.set_meta_faults(MetaFaults::default());
                n.disk.set_data_faults(0.0);
                n.disk.set_hung(false);
            }
            self.at(MS, Ev::Heal);
            return;
        }
        let next = self.rng.random_range(20 * MS..600 * MS);
        self.at(next, Ev::Chaos);
        let nodes = self.nodes.len();
        let node = self.rng.random_range(0..nodes);
        if self.rng.random_range(0..100) < self.cfg.cut_percent {
            let session = self.session_of(node);
            session.into_iter().for_each(|s| self.cut(s));
            return;
        }
        let roll = self.rng.random_range(12..100);
        match roll {
            0..12 => {
                let session = self.session_of(node);
                session.into_iter().for_each(|s| self.cut(s));
            }
            12..16 => {
                let other = (node + 1) % nodes;
                let until = self.now_us + self.rng.random_range(100 * MS..3 * SEC);
                self.net.partition(node, other, until);
                for s in [self.session_of(node), self.session_of(other)].into_iter().flatten() {
                    self.cut(s);
                }
                self.log(format!(
                    "partition between {} and {}",
                    self.nodes[node].name, self.nodes[other].name
                ));
            }
            16..22 if self.running(node) => {
                self.crash(node, "chaos");
                let after = self.rng.random_range(50 * MS..3 * SEC);
                self.at(after, Ev::Restart { node });
            }
            22..26 if self.cfg.meta_fault_probability > 0.0 || self.cfg.data_fault_probability > 0.0 => {
                let p = self.cfg.meta_fault_probability;
                self.nodes[node].disk.set_meta_faults(MetaFaults { fail_probability: p });
                self.nodes[node].disk.set_data_faults(self.cfg.data_fault_probability);
                if self.cfg.data_fault_probability > 0.0 && self.rng.random_bool(0.3) {
                    self.nodes[node].disk.set_hung(true);
                    self.log(format!("{}: disk hangs", self.nodes[node].name));
                }
                self.log(format!(
                    "{}: disk faults on (metadata {p}, data {})",
                    self.nodes[node].name, self.cfg.data_fault_probability
                ));
            }
            26..36 => {
                let force = self.rng.random_bool(0.2);
                self.at(0, Ev::Command { node, cmd: Command::Promote { force } });
            }
            36..41 => {
                // Both at the same instant.
                for n in 0..nodes {
                    self.at(0, Ev::Command { node: n, cmd: Command::Promote { force: false } });
                }
            }
            41..49 => {
                let force = self.rng.random_bool(0.5);
                self.at(0, Ev::Demote { node, force, attempt: 0 });
            }
            49..52 => self.at(0, Ev::Command { node, cmd: Command::Disconnect }),
            52..58 => {
                let discard_my_data = self.rng.random_bool(0.2);
                self.at(0, Ev::Command { node, cmd: Command::Connect { discard_my_data } });
            }
            58..60 => self.at(0, Ev::Command { node, cmd: Command::Invalidate }),
            60..62 => self.at(0, Ev::Command { node, cmd: Command::InvalidateRemote }),
            62..67 => {
                let repair = self.rng.random_bool(0.5);
                self.at(0, Ev::Command { node, cmd: Command::Verify { repair } });
            }
            67..70 => {
                let paused = self.rng.random_bool(0.5);
                self.at(0, Ev::Command { node, cmd: Command::SetSyncPaused(paused) });
            }
            _ => {}
        }
    }

    /// One healing round (every 100 ms until converged).
    pub fn heal(&mut self) {
        let Phase::Heal { since_us } = self.phase else { return };
        if self.now_us > since_us + self.cfg.heal_timeout_us {
            let state = self.state_line();
            self.fail(
                "healing converges",
                format!("not in sync {} s after healing began: {state}", self.cfg.heal_timeout_us / SEC),
            );
            return;
        }
        if self.converged() {
            self.check_identical();
            if self.failure.is_none() {
                self.episodes += 1;
                self.log(format!("episode {} converged: {}", self.episodes, self.state_line()));
                self.phase = Phase::Chaos;
                self.episode_start_us = self.now_us;
                self.at(MS, Ev::Chaos);
            }
            return;
        }
        self.at(100 * MS, Ev::Heal);
        for node in 0..self.nodes.len() {
            if self.core(node).is_some_and(|c| c.disk_failure().is_some()) {
                // The operator fixes the disk and restarts the node; it recovers
                // from what its metadata durably holds.
                self.crash(node, "restarted by the operator after its disk failed");
            }
            if !self.running(node) {
                self.restart(node);
            }
        }
        // Act slowly: give each command time to take effect.
        if self.now_us < self.last_heal_action_us + 300 * MS {
            return;
        }
        self.last_heal_action_us = self.now_us;
        for node in 0..self.nodes.len() {
            let Some(core) = self.core(node) else { continue };
            let (conn, refusal) = core.connection();
            let split = refusal.is_some_and(|r| r.starts_with("split brain"));
            if core.sync_paused() {
                self.command(node, Command::SetSyncPaused(false));
            }
            if conn == ConnState::StandAlone {
                let victim = split && self.split_brain_victim() == Some(node);
                self.command(node, Command::Connect { discard_my_data: victim });
            }
        }
        let primaries: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.core(n).is_some_and(|c| c.role() == Role::Primary))
            .collect();
        match primaries.len() {
            0 => self.heal_promote(),
            1 => {}
            _ => {
                for &n in &primaries[1..] {
                    self.at(0, Ev::Demote { node: n, force: true, attempt: 0 });
                }
            }
        }
    }

    /// In a split brain: the node whose changes to drop (the Secondary, else the
    /// higher-numbered).
    fn split_brain_victim(&self) -> Option<usize> {
        let nodes: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.running(n)).collect();
        nodes
            .iter()
            .copied()
            .find(|&n| self.core(n).is_some_and(|c| c.role() == Role::Secondary))
            .or(nodes.last().copied())
    }

    fn heal_promote(&mut self) {
        if let Some(n) =
            (0..self.nodes.len()).find(|&n| self.core(n).is_some_and(|c| c.disk() == DiskState::UpToDate))
        {
            self.command(n, Command::Promote { force: false });
            return;
        }
        // No UpToDate data anywhere: once every node runs and none syncs, make the
        // first one the reference (`primary --force`), as an operator would.
        let all_idle = (0..self.nodes.len()).all(|n| {
            self.core(n)
                .is_some_and(|c| !matches!(c.repl_state(), ReplState::SyncSource | ReplState::SyncTarget))
        });
        if all_idle {
            self.command(0, Command::Promote { force: true });
        }
    }

    /// Healed: all run, connected on one session, one Primary, all UpToDate and
    /// Established, nothing in flight anywhere.
    fn converged(&self) -> bool {
        let Phase::Heal { since_us } = self.phase else { return false };
        if self.now_us < since_us + self.cfg.heal_writes_us || self.client.outstanding() > 0 {
            return false;
        }
        let mut sessions = Vec::new();
        let mut primaries = 0;
        for n in &self.nodes {
            let Some(run) = n.run.as_ref() else { return false };
            let c = &run.core;
            if c.link() != Link::Replicating
                || c.repl_state() != ReplState::Established
                || c.disk() != DiskState::UpToDate
                || !run.idle()
            {
                return false;
            }
            primaries += usize::from(c.role() == Role::Primary);
            sessions.push(run.session);
        }
        sessions.dedup();
        primaries == 1 && sessions.len() == 1 && !self.in_flight()
    }

    /// One line of every node's state, for reports.
    pub fn state_line(&self) -> String {
        let mut parts = Vec::new();
        for n in &self.nodes {
            parts.push(match n.run.as_ref() {
                None => format!("{} down", n.name),
                Some(r) => {
                    let c = &r.core;
                    let (conn, why) = c.connection();
                    format!(
                        "{} {:?} {} {} {} session {:?} oos {} ops {} meta {}{}",
                        n.name,
                        c.role(),
                        c.disk(),
                        conn.as_str(),
                        c.repl_state().as_str(),
                        r.session,
                        c.dirty_bytes(),
                        r.ops.len(),
                        r.meta_queue.len(),
                        why.map(|w| format!(" ({w})")).unwrap_or_default()
                    )
                }
            });
        }
        parts.join("; ")
    }
}
