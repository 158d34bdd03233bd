//! The NBD client: writes, FUA writes, trims, write-zeroes and flushes to the
//! Primary, up to a queue depth, each write with a unique tag in every sector.
//! Every acknowledgement goes into the model with the nodes it was acknowledged
//! for: the Primary, and the peer whose `WriteAck` (C) or `RecvAck` (B) it waited
//! for; a FLUSH covers the Primary, and the peer too when it waited for the peer's
//! barrier (B, C, the same link from submission to reply).

use std::collections::HashMap;

use blockd::config::Protocol;
use blockd::repl::core::{Event, JobId, Link, Outcome, Request};
use blockd::state::{DiskState, Role};
use rand::Rng;

use crate::disk::BLOCK_BYTES;
use crate::model::WriteNo;
use crate::pattern::{Tag, fill_block};
use crate::world::{DRAIN_JOB, Ev, Phase, World};

#[derive(Debug)]
enum Pending {
    Write { no: WriteNo, fua: bool },
    Flush { mark: u64, session: Option<u64> },
}

#[derive(Debug, Default)]
pub struct Client {
    outstanding: HashMap<(usize, JobId), Pending>,
    next_tag: Tag,
    pub acked_writes: u64,
    pub acked_flushes: u64,
}

impl Client {
    pub fn outstanding_on(&self, node: usize) -> usize {
        self.outstanding.keys().filter(|(n, _)| *n == node).count()
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The write request `job` on `node` is, if it is one and still outstanding.
    pub fn write_of(&self, node: usize, job: JobId) -> Option<WriteNo> {
        match self.outstanding.get(&(node, job)) {
            Some(Pending::Write { no, .. }) => Some(*no),
            _ => None,
        }
    }

    /// The node crashed: its requests are never answered.
    pub fn node_gone(&mut self, node: usize) {
        self.outstanding.retain(|(n, _), _| *n != node);
    }
}

impl World {
    /// The Primary the client talks to: the first running, accepting Primary.
    fn client_target(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&n| {
            self.nodes[n].run.as_ref().is_some_and(|r| r.accepting_clients && r.core.role() == Role::Primary)
        })
    }

    /// Whether the client writes now: always in chaos, in the first part of healing.
    fn client_active(&self) -> bool {
        match self.phase {
            Phase::Chaos => true,
            Phase::Heal { since_us } => self.now_us < since_us + self.cfg.heal_writes_us,
        }
    }

    pub fn client_issue(&mut self) {
        let next = self.rng.random_range(50..3000);
        self.at(next, Ev::ClientIssue);
        if !self.client_active() {
            return;
        }
        let Some(node) = self.client_target() else { return };
        if self.client.outstanding_on(node) >= self.cfg.queue_depth {
            return;
        }
        let blocks_total = self.nodes[node].size_bytes / BLOCK_BYTES as u64;
        let n = self.rng.random_range(1..=4u64);
        let hot = (blocks_total / 8).max(8);
        let first = if self.rng.random_bool(0.7) {
            self.rng.random_range(0..hot)
        } else {
            self.rng.random_range(0..blocks_total)
        }
        .min(blocks_total - n);
        let offset = first * BLOCK_BYTES as u64;
        let len = n * BLOCK_BYTES as u64;
        let kind = self.rng.random_range(0..100);
        let (request, pending) = if kind < 14 {
            let session = self
                .session_of(node)
                .filter(|_| self.core(node).is_some_and(|c| c.link() == Link::Replicating));
            (Request::Flush, Pending::Flush { mark: self.model.ack_mark(), session })
        } else if kind < 24 {
            self.client.next_tag += 1;
            let no = self.model.submit(self.client.next_tag, true, first, n);
            let fua = self.rng.random_bool(0.2);
            let request = if kind < 19 {
                Request::Trim { offset, len, fua }
            } else {
                Request::WriteZeroes {
                    offset,
                    len,
                    may_trim: self.rng.random_bool(0.5),
                    fast_only: false,
                    fua,
                }
            };
            (request, Pending::Write { no, fua })
        } else {
            self.client.next_tag += 1;
            let tag = self.client.next_tag;
            let no = self.model.submit(tag, false, first, n);
            let mut data = self.pool.get(len as usize);
            for (i, block) in data.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                fill_block(block, tag, first + i as u64);
            }
            let fua = self.rng.random_bool(0.1);
            (Request::Write { offset, data: data.freeze(), fua }, Pending::Write { no, fua })
        };
        let tag = self.client.next_tag;
        self.debug(|| {
            format!(
                "client: job {} tag #{tag} {request:?} blocks {first}+{n}",
                self.nodes[node].run.as_ref().map_or(0, |r| r.next_nbd_job)
            )
        });
        let run = self.nodes[node].run.as_mut().expect("target runs");
        let job = JobId::nbd(run.next_nbd_job);
        run.next_nbd_job += 1;
        run.app_requests += 1;
        self.client.outstanding.insert((node, job), pending);
        self.handle(node, Event::Nbd { job, request });
    }

    pub fn client_reply(&mut self, node: usize, job: JobId, outcome: Outcome) {
        if job == DRAIN_JOB {
            if std::mem::take(&mut self.draining[node]) {
                self.finish_demote(node);
            }
            return;
        }
        let peer = self
            .peer_acked
            .remove(&(node, job))
            .filter(|(p, inc)| self.nodes[*p].incarnation == *inc)
            .map(|(p, _)| p);
        let Some(pending) = self.client.outstanding.remove(&(node, job)) else { return };
        // A Primary without a disk answers from its peer (`repl::diskless`).
        let detached = self.core(node).is_some_and(|c| c.disk().is_detached());
        if !matches!(outcome, Outcome::Ok) {
            return;
        }
        match pending {
            Pending::Write { no, fua } => {
                self.client.acked_writes += 1;
                let mut holders = Vec::new();
                if detached {
                    // Acknowledged from the peer's WriteAck (or a barrier's ack,
                    // which the model does not see: then nobody is claimed).
                    holders.extend(peer.map(|p| (p, fua)));
                } else {
                    holders.push((node, fua));
                    match (self.protocol(), peer) {
                        (Protocol::C, Some(p)) => holders.push((p, fua)),
                        (Protocol::B, Some(p)) => holders.push((p, false)),
                        _ => {}
                    }
                }
                self.model.acked(no, &holders);
            }
            Pending::Flush { mark, session } => {
                self.client.acked_flushes += 1;
                if !detached {
                    self.model.flushed(node, mark);
                }
                let same_link = session.is_some() && session == self.session_of(node);
                // A diskless peer takes no writes and flushes nothing for them.
                let peer_has_disk =
                    self.core(node).is_some_and(|c| !c.peer_view().1.is_some_and(DiskState::is_detached));
                if (self.protocol() != Protocol::A || detached) && same_link && peer_has_disk {
                    let s = self.net.get(session.expect("checked")).expect("live session");
                    let peer = s.other(node);
                    self.model.flushed(peer, mark);
                }
            }
        }
    }
}
