//! The simulated network: one TCP-like session at a time per pair of nodes.
//!
//! A session is set up while both nodes run, allow connecting and are not
//! partitioned, and neither still holds an older session with the other (a node
//! refuses a second connection while one is up, as `peer::dial` does). Each side
//! learns of it (`LinkUp`) at its own moment. Messages are delivered in order per
//! direction, each after a random latency, never before the receiver's `LinkUp`.
//! A cut (or a crash) loses everything in flight; each side notices at its own
//! moment (`LinkDown`): at once for a reset, up to the keepalive timeout otherwise.
//! A side that closes the session itself (`DropLink`) gets no `LinkDown`; what it
//! had sent is still delivered, then the other side sees the close.

use std::collections::HashMap;

/// One session between two nodes.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    /// The two nodes, lower index first.
    pub nodes: [usize; 2],
    /// Each side still has it (has not seen `LinkDown` or closed it).
    pub up: [bool; 2],
    /// Everything in flight is lost; nothing more is delivered.
    pub cut: bool,
    /// The time of the last delivery scheduled towards each side (FIFO).
    pub last_delivery_us: [u64; 2],
    /// A slow link (`SimConfig::link_bytes_per_sec`): when the wire toward each
    /// side has sent everything queued so far.
    pub wire_free_us: [u64; 2],
}

impl Session {
    /// 0 or 1: which side `node` is.
    pub fn side(&self, node: usize) -> usize {
        usize::from(self.nodes[1] == node)
    }

    pub fn other(&self, node: usize) -> usize {
        self.nodes[1 - self.side(node)]
    }
}

/// All sessions, and partitions between pairs.
#[derive(Debug, Default)]
pub struct Net {
    sessions: HashMap<u64, Session>,
    next_id: u64,
    /// Pairs that cannot reach each other until the given time.
    partitioned_until_us: HashMap<(usize, usize), u64>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Net {
    pub fn get(&self, id: u64) -> Option<&Session> {
        self.sessions.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.sessions.get_mut(&id)
    }

    /// A session of this pair still held by a side.
    pub fn live_between(&self, a: usize, b: usize) -> Option<u64> {
        let p = pair(a, b);
        let mut live: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| (s.nodes[0], s.nodes[1]) == p && s.up.iter().any(|u| *u))
            .map(|s| s.id)
            .collect();
        live.sort_unstable();
        live.first().copied()
    }

    pub fn partitioned(&self, a: usize, b: usize, now_us: u64) -> bool {
        self.partitioned_until_us.get(&pair(a, b)).is_some_and(|until| now_us < *until)
    }

    pub fn partition(&mut self, a: usize, b: usize, until_us: u64) {
        self.partitioned_until_us.insert(pair(a, b), until_us);
    }

    pub fn heal(&mut self) {
        self.partitioned_until_us.clear();
    }

    /// A new session between `a` and `b`; the caller schedules each side's
    /// `LinkUp` at `up_at_us` and deliveries never precede it.
    pub fn open(&mut self, a: usize, b: usize, up_at_us: [u64; 2]) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let nodes = [a.min(b), a.max(b)];
        let last_delivery_us = if nodes[0] == a { up_at_us } else { [up_at_us[1], up_at_us[0]] };
        self.sessions.insert(
            id,
            Session { id, nodes, up: [true, true], cut: false, last_delivery_us, wire_free_us: [0; 2] },
        );
        id
    }

    /// Forgets sessions no side holds any more.
    pub fn reap(&mut self) {
        self.sessions.retain(|_, s| s.up.iter().any(|u| *u));
    }
}
