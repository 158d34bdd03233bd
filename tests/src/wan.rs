//! A WAN link between the two nodes of a [`Pair`]: a round-trip time and a
//! bandwidth, made from parts this machine has (its kernel has no netem).
//!
//! * Two network namespaces joined by a veth pair ([`NetnsPair`]): alpha runs in
//!   namespace 0, beta in namespace 1.
//! * Bandwidth: `tc tbf` on both veth ends, so each direction carries at most
//!   `rate_mbit` ([`NetnsPair::limit_rate`]).
//! * Delay: a [`Proxy`] in alpha's namespace, on its loopback, in front of beta's
//!   replication address; alpha dials it ([`Pair::dial_peer_at`]; alpha is the node
//!   that dials). The proxy holds every chunk `rtt_ms / 2` in each direction, so a
//!   request and its reply see the whole RTT. It delays application bytes, not
//!   packets: the TCP connection to the proxy sees loopback, the one from the proxy
//!   to beta the veth, so TCP's own window is never the limit it would be on a real
//!   long link (the proxy's queue, 64 chunks of 64 KiB per direction, bounds what
//!   is in flight).
//!
//! ```text
//!   ns 0: alpha ──loopback──▶ proxy (rtt/2 each way) ──veth, tbf──▶ ns 1: beta
//! ```
//!
//! Drop order: the proxies stop before the namespaces are deleted; declare the
//! [`WanBed`] before the [`Pair`], so the pair's nodes are killed first.

use std::net::SocketAddr;
use std::time::Duration;

use crate::netns::{ADDRS, NetnsPair};
use crate::pair::{Pair, PairOpts};
use crate::proxy::Proxy;

/// The link's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanLink {
    /// Round-trip time added by the delay proxy (half each way).
    pub rtt_ms: u64,
    /// Bandwidth of each direction (tbf).
    pub rate_mbit: u64,
}

impl WanLink {
    /// The delay the proxy adds to each direction.
    pub fn one_way(&self) -> Duration {
        Duration::from_micros(self.rtt_ms * 1000 / 2)
    }

    /// The configured rate in bytes per second.
    pub fn rate_bytes_per_sec(&self) -> u64 {
        self.rate_mbit * 1_000_000 / 8
    }
}

/// The namespaces, the shaping and the delay proxies of one test.
pub struct WanBed {
    /// Declared first: stopped before the namespaces go.
    proxies: Vec<Proxy>,
    pub net: NetnsPair,
    pub link: WanLink,
}

impl WanBed {
    /// Creates the namespaces (`tag`: letters and digits, see [`NetnsPair::create`])
    /// and shapes both directions of the veth pair.
    pub fn create(tag: &str, link: WanLink) -> WanBed {
        assert!(link.rtt_ms >= 2, "rtt_ms {}: at least 1 ms each way", link.rtt_ms);
        let net = NetnsPair::create(tag);
        for i in 0..2 {
            net.limit_rate(i, link.rate_mbit);
        }
        WanBed { proxies: Vec::new(), net, link }
    }

    /// Starts a delay proxy in namespace 0, listening on its loopback and
    /// forwarding to `port` on namespace 1's veth address ([`ADDRS`]`[1]`).
    /// Returns the proxy's index ([`WanBed::proxy`]) and its address (valid in
    /// namespace 0 only).
    pub fn delay_to(&mut self, port: u16) -> (usize, SocketAddr) {
        let target = SocketAddr::from((ADDRS[1], port));
        let one_way = self.link.one_way();
        let proxy = self.net.run_in(0, move || {
            let p = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), target);
            p.set_delay(one_way);
            p
        });
        let addr = proxy.addr();
        self.proxies.push(proxy);
        (self.proxies.len() - 1, addr)
    }

    pub fn proxy(&self, i: usize) -> &Proxy {
        &self.proxies[i]
    }

    /// `base` with alpha in namespace 0 and beta in namespace 1, each listening
    /// for replication on its veth address at `port`.
    pub fn pair_opts(&self, port: u16, base: PairOpts) -> PairOpts {
        PairOpts {
            replication: Some(ADDRS.map(|a| format!("{a}:{port}"))),
            prefix: [self.net.exec_prefix(0), self.net.exec_prefix(1)],
            ..base
        }
    }

    /// Creates the pair of [`WanBed::pair_opts`], routes alpha through a delay
    /// proxy to beta, and starts both nodes (not yet waiting for the link).
    pub fn start_pair(&mut self, label: &str, port: u16, base: PairOpts) -> Pair {
        let mut p = Pair::create(label, &self.pair_opts(port, base));
        let (_, addr) = self.delay_to(port);
        p.dial_peer_at(0, &addr.to_string());
        p.start_node(0);
        p.start_node(1);
        p
    }
}
