//! The connection supervisor: keeps one connection to the peer up for the life of the
//! daemon and hands each new one to the core as a [`PeerConn`].
//!
//! Exactly one side dials: the node whose name sorts lower. The other only accepts.
//! Both sides know both names from the shared config, so they agree without talking,
//! and there is never a pair of crossing connections to reconcile.
//!
//! - **Dialer**: resolves the peer's host name again on every attempt (an address
//!   change is picked up without a restart), tries each address, handshakes, hands
//!   the `PeerConn` over and waits until the link is down before dialing again.
//!   Failed attempts back off exponentially (`backoff_min_ms`..`backoff_max_ms`,
//!   ±25% jitter so two restarting pairs do not dial in lockstep); a connection that
//!   stayed up longer than [`STABLE_CONNECTION`] resets the backoff.
//! - **Acceptor**: listens on its replication address for its whole life. While a
//!   link is up, a new connection gets `Bye("already connected")` and is closed. Up
//!   to [`MAX_PENDING_HANDSHAKES`] handshakes run at once, so one silent client cannot
//!   keep the real peer out.
//!
//! `shutdown` (or the core dropping its receiver) stops everything: pending
//! handshakes are dropped and a live link is closed (the core gets
//! `Closed(LocalClosed)`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nbd_server::buf::BufPool;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::error::bump;
use super::frame::{FrameReader, FrameWriter};
use super::handshake::{
    Established, HandshakeError, HandshakeParams, compression_agreed, handshake, say_bye,
};
use super::link::{LinkHandle, LinkSettings, PeerConn, spawn_link};
use super::msg::Hello;
use super::tls::{self, PeerRead, PeerWrite, TlsError};
use super::{LinkError, PeerStats};
use crate::config::{Config, HostPort, PeerTlsFiles};

/// A connection that lasted longer than this resets the reconnect backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Handshakes the acceptor runs at once; more connections wait in the backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 4;
/// What the acceptor tells a connection that arrives while a link is up.
pub const BUSY_REASON: &str = "already connected";

/// Where and how to reach the peer.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This node's name.
    pub local_name: String,
    /// The peer's name (what its Hello must say).
    pub peer_name: String,
    /// This node's replication address (the acceptor listens here).
    pub listen: HostPort,
    /// The peer's replication address (the dialer connects here).
    pub peer_addr: HostPort,
    /// See [`LinkSettings::ping_interval_ms`].
    pub ping_interval_ms: u64,
    /// See [`LinkSettings::ping_timeout_ms`]; keep it a few times the interval.
    pub ping_timeout_ms: u64,
    /// Bound on connecting to one address, and on the Hello exchange.
    pub handshake_timeout_ms: u64,
    /// See [`LinkSettings::receive_budget_bytes`].
    pub receive_budget_bytes: u64,
    /// See [`LinkSettings::request_budget_bytes`].
    pub request_budget_bytes: u64,
    /// First retry delay.
    pub backoff_min_ms: u64,
    /// Largest retry delay (before jitter).
    pub backoff_max_ms: u64,
    /// While this says false (StandAlone: split brain, `blockctl disconnect`), the
    /// dialer does not dial and the acceptor drops connections before any handshake,
    /// so the peer never sees a link come and go. `None`: always enabled.
    pub enabled: Option<watch::Receiver<bool>>,
    /// `resource.shared-secret`: authenticate the peer (see [`super::auth`]).
    pub secret: Option<crate::config::SharedSecret>,
    /// `resource.tls-ca` and this node's files: mutual TLS (see [`super::tls`]),
    /// read again for every connection.
    pub tls: Option<PeerTlsFiles>,
    /// `compression = "zstd"` at this level (this node's Hello must say
    /// [`FEATURE_ZSTD`](super::msg::FEATURE_ZSTD)); a link compresses when both
    /// Hellos say it ([`compression_agreed`]).
    pub compression_level: Option<i32>,
    /// See [`LinkSettings::replication_rate_bytes_per_sec`].
    pub replication_rate_bytes_per_sec: Option<u64>,
}

impl PeerSettings {
    /// Settings with the default timings (ping 1 s, timeout 5 s, handshake 5 s,
    /// backoff 100 ms..5 s) and budgets (64 MiB each).
    pub fn new(local_name: &str, peer_name: &str, listen: HostPort, peer_addr: HostPort) -> PeerSettings {
        PeerSettings {
            local_name: local_name.to_owned(),
            peer_name: peer_name.to_owned(),
            listen,
            peer_addr,
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            handshake_timeout_ms: 5000,
            receive_budget_bytes: super::link::DEFAULT_RECEIVE_BUDGET_BYTES,
            request_budget_bytes: super::link::DEFAULT_REQUEST_BUDGET_BYTES,
            backoff_min_ms: 100,
            backoff_max_ms: 5000,
            enabled: None,
            secret: None,
            tls: None,
            compression_level: None,
            replication_rate_bytes_per_sec: None,
        }
    }

    /// Takes the WAN keys of `[resource]`: `compression`, `compression-level`,
    /// `replication-rate`.
    pub fn set_wan(&mut self, resource: &crate::config::ResourceConfig) {
        self.compression_level =
            (resource.compression == crate::config::Compression::Zstd).then_some(resource.compression_level);
        self.replication_rate_bytes_per_sec = resource.replication_rate_bytes_per_sec;
    }

    fn is_enabled(&self) -> bool {
        self.enabled.as_ref().is_none_or(|e| *e.borrow())
    }

    /// Settings (default timings) for node `local` of a two-node resource; `None`
    /// if `local` is not in the config or the config does not have exactly one other
    /// node (more peers are not supported yet).
    pub fn from_config(config: &Config, local: &str) -> Option<PeerSettings> {
        let me = config.node(local)?;
        let mut peers = config.peers(local);
        let (peer, None) = (peers.next()?, peers.next()) else { return None };
        let mut s = PeerSettings::new(local, &peer.name, me.replication.clone(), peer.replication.clone());
        s.secret = config.resource.shared_secret.clone();
        s.tls = config.peer_tls(local);
        s.set_wan(&config.resource);
        Some(s)
    }

    /// True if this node dials (its name sorts lower); false if it accepts.
    pub fn dials(&self) -> bool {
        self.local_name < self.peer_name
    }

    /// The settings of a link; `compress`: both Hellos said zstd.
    fn link(&self, compress: bool) -> LinkSettings {
        LinkSettings {
            ping_interval_ms: self.ping_interval_ms,
            ping_timeout_ms: self.ping_timeout_ms,
            receive_budget_bytes: self.receive_budget_bytes,
            request_budget_bytes: self.request_budget_bytes,
            compression_level: self.compression_level.filter(|_| compress),
            replication_rate_bytes_per_sec: self.replication_rate_bytes_per_sec,
            ..LinkSettings::default()
        }
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Handshakes in progress on accepted connections.
type Pending = JoinSet<(SocketAddr, Result<Established<PeerRead, PeerWrite>, HandshakeError>)>;

type Resolved = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns the peer's host name into addresses; DNS in production, scripted in tests.
#[derive(Clone)]
pub(crate) struct Resolver(Arc<dyn Fn(&HostPort) -> Resolved + Send + Sync>);

impl Resolver {
    fn dns() -> Resolver {
        Resolver(Arc::new(|hp: &HostPort| {
            let hp = hp.clone();
            Box::pin(async move { Ok(tokio::net::lookup_host((hp.host.as_str(), hp.port)).await?.collect()) })
        }))
    }

    #[cfg(test)]
    pub(crate) fn new(f: impl Fn(&HostPort) -> Resolved + Send + Sync + 'static) -> Resolver {
        Resolver(Arc::new(f))
    }
}

/// Starts the supervisor. It runs until `shutdown` turns true (or its sender or
/// `events`' receiver is dropped). `local_hello` is read afresh for every connection,
/// so role, disk state and generations are current.
pub fn spawn_supervisor(
    settings: PeerSettings,
    local_hello: watch::Receiver<Hello>,
    pool: BufPool,
    stats: Arc<PeerStats>,
    events: mpsc::Sender<PeerConn>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let sup = Supervisor { settings, hello: local_hello, pool, stats, events, resolver: Resolver::dns() };
    tokio::spawn(sup.run(shutdown))
}

pub(crate) struct Supervisor {
    pub(crate) settings: PeerSettings,
    pub(crate) hello: watch::Receiver<Hello>,
    pub(crate) pool: BufPool,
    pub(crate) stats: Arc<PeerStats>,
    pub(crate) events: mpsc::Sender<PeerConn>,
    pub(crate) resolver: Resolver,
}

/// Resolves when shutdown is asked for, or can no longer be asked for.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

impl Supervisor {
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let s = &self.settings;
        if s.local_name == s.peer_name {
            tracing::error!(node = %s.local_name, "peer has this node's own name; not connecting");
            return;
        }
        if s.dials() {
            tracing::info!(peer = %s.peer_name, addr = %s.peer_addr, "connecting to peer (this node dials)");
            self.dial_loop(&mut shutdown).await;
        } else {
            tracing::info!(peer = %s.peer_name, listen = %s.listen, "waiting for peer (this node accepts)");
            self.accept_loop(&mut shutdown).await;
        }
    }

    fn params(&self, remote_addr: String) -> HandshakeParams {
        HandshakeParams {
            local: self.hello.borrow().clone(),
            expected_peer: self.settings.peer_name.clone(),
            timeout: self.settings.handshake_timeout(),
            remote_addr,
            secret: self.settings.secret.clone(),
        }
    }

    /// Starts the link and hands it to the core; `None` if the core is gone.
    async fn deliver(
        &self,
        est: Established<PeerRead, PeerWrite>,
        addr: SocketAddr,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<LinkHandle> {
        let Established { reader, writer, remote } = est;
        let node = remote.node.clone();
        // Both must want it (the handshake warned if only one does).
        let settings = self.settings.link(compression_agreed(&self.hello.borrow(), &remote));
        let (conn, mut link) = spawn_link(reader, writer, remote, &settings, self.stats.clone());
        bump(&self.stats.connects);
        tracing::info!(peer = %node, %addr, "peer connected");
        let delivered = tokio::select! {
            r = self.events.send(conn) => r.is_ok(),
            () = stopping(shutdown) => false,
        };
        if delivered {
            Some(link)
        } else {
            link.close();
            link.closed().await;
            None
        }
    }

    async fn dial_loop(&self, shutdown: &mut watch::Receiver<bool>) {
        let s = &self.settings;
        let mut backoff = Backoff::new(s.backoff_min_ms, s.backoff_max_ms);
        let mut enabled = s.enabled.clone();
        loop {
            if let Some(enabled) = enabled.as_mut()
                && !*enabled.borrow_and_update()
            {
                tracing::info!(peer = %s.peer_name, "StandAlone: not connecting until `blockctl connect`");
                tokio::select! {
                    r = enabled.wait_for(|on| *on) => if r.is_err() { return },
                    () = stopping(shutdown) => return,
                }
                backoff.reset();
            }
            let attempt = tokio::select! {
                r = self.dial_once() => r,
                () = stopping(shutdown) => return,
            };
            match attempt {
                Ok((est, addr)) => {
                    let Some(mut link) = self.deliver(est, addr, shutdown).await else { return };
                    let up_since = Instant::now();
                    tokio::select! {
                        () = link.closed() => {}
                        () = stopping(shutdown) => {
                            link.close();
                            link.closed().await;
                            return;
                        }
                    }
                    if up_since.elapsed() > STABLE_CONNECTION {
                        backoff.reset();
                    }
                }
                Err(e @ DialError::Handshake(_, HandshakeError::Tls(_))) => {
                    tracing::warn!(peer = %s.peer_name, addr = %s.peer_addr, "connecting failed: {e}")
                }
                Err(e) => tracing::info!(peer = %s.peer_name, addr = %s.peer_addr, "connecting failed: {e}"),
            }
            let delay = backoff.next_delay();
            tracing::debug!(delay_ms = delay.as_millis() as u64, "next connection attempt");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopping(shutdown) => return,
            }
        }
    }

    async fn dial_once(&self) -> Result<(Established<PeerRead, PeerWrite>, SocketAddr), DialError> {
        bump(&self.stats.dial_attempts);
        let s = &self.settings;
        let addrs = (self.resolver.0)(&s.peer_addr).await.map_err(DialError::Resolve)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
        let mut connected = None;
        for addr in addrs {
            match tokio::time::timeout(s.handshake_timeout(), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    connected = Some((stream, addr));
                    break;
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} timed out"))
                }
            }
        }
        let (stream, addr) = connected.ok_or(DialError::Connect(last))?;
        // Small control frames (acks, barriers) must not wait for Nagle.
        stream.set_nodelay(true).map_err(DialError::Connect)?;
        let (r, w) = match &s.tls {
            Some(files) => tls::connect(stream, files, &s.peer_name, s.handshake_timeout())
                .await
                .map_err(|e| DialError::Handshake(addr, tls_failed(&self.stats, e)))?,
            None => tls::plain(stream),
        };
        let est = handshake(r, w, &self.params(addr.to_string()), self.pool.clone(), self.stats.clone())
            .await
            .map_err(|e| DialError::Handshake(addr, e))?;
        Ok((est, addr))
    }

    async fn accept_loop(&self, shutdown: &mut watch::Receiver<bool>) {
        let s = &self.settings;
        let mut backoff = Backoff::new(s.backoff_min_ms, s.backoff_max_ms);
        let listener = loop {
            let bound = tokio::select! {
                r = TcpListener::bind((s.listen.host.as_str(), s.listen.port)) => r,
                () = stopping(shutdown) => return,
            };
            match bound {
                Ok(l) => break l,
                Err(e) => tracing::warn!(listen = %s.listen, "cannot listen for the peer: {e}; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = stopping(shutdown) => return,
            }
        };
        let mut pending: Pending = JoinSet::new();
        let mut active: Option<LinkHandle> = None;
        loop {
            tokio::select! {
                () = stopping(shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => self.on_accept(stream, addr, active.is_some(), &mut pending),
                    Err(e) => {
                        // Usually out of file descriptors: pause instead of spinning.
                        tracing::warn!("accepting a peer connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(s.backoff_min_ms)).await;
                    }
                },
                Some(done) = pending.join_next() => {
                    let Ok((addr, result)) = done else { continue };
                    match result {
                        Ok(est) if active.is_some() => refuse_busy(est.reader, est.writer, addr, &self.stats),
                        Ok(est) => match self.deliver(est, addr, shutdown).await {
                            Some(link) => active = Some(link),
                            None => break,
                        },
                        Err(e) => log_handshake_failure(addr, &e),
                    }
                }
                () = async { active.as_mut().expect("guarded").closed().await }, if active.is_some() => {
                    active = None;
                }
            }
        }
        pending.abort_all();
        if let Some(mut link) = active {
            link.close();
            link.closed().await;
        }
    }

    fn on_accept(&self, stream: TcpStream, addr: SocketAddr, busy: bool, pending: &mut Pending) {
        if !self.settings.is_enabled() {
            tracing::debug!(%addr, "StandAlone: peer connection dropped before its handshake");
            return;
        }
        let _ = stream.set_nodelay(true);
        if !busy && pending.len() >= MAX_PENDING_HANDSHAKES {
            tracing::warn!(%addr, "too many peer handshakes in progress; dropping connection");
            return;
        }
        let (params, pool, stats) = (self.params(addr.to_string()), self.pool.clone(), self.stats.clone());
        let (tls, peer) = (self.settings.tls.clone(), self.settings.peer_name.clone());
        let secured = async move {
            let (r, w) = match &tls {
                None => tls::plain(stream),
                Some(files) => match tls::accept(stream, files, &peer, params.timeout).await {
                    Ok(tls::Accepted::Tls(r, w)) => (r, w),
                    Ok(tls::Accepted::Plaintext(stream)) => {
                        let (r, w) = tls::plain(stream);
                        let mut reader = FrameReader::new(r, pool.clone(), stats.clone());
                        let mut writer = FrameWriter::new(w);
                        let bye = say_bye(&mut reader, &mut writer, TlsError::PlaintextPeer.to_string());
                        let _ = tokio::time::timeout(params.timeout, bye).await;
                        return Err(tls_failed(&stats, TlsError::PlaintextPeer));
                    }
                    Err(e) => return Err(tls_failed(&stats, e)),
                },
            };
            Ok((r, w, params, pool, stats))
        };
        if busy {
            // The Bye must travel the way the peer speaks: after TLS, when TLS is on.
            let stats = self.stats.clone();
            tokio::spawn(async move {
                if let Ok((r, w, _, pool, _)) = secured.await {
                    refuse_busy(FrameReader::new(r, pool, stats.clone()), FrameWriter::new(w), addr, &stats);
                }
            });
        } else {
            pending.spawn(async move {
                let result = match secured.await {
                    Ok((r, w, params, pool, stats)) => handshake(r, w, &params, pool, stats).await,
                    Err(e) => Err(e),
                };
                (addr, result)
            });
        }
    }
}

/// Counts and wraps a failed TLS step: a refusal of the peer is `handshake_refused`,
/// anything else `handshake_failed` (the caller logs it).
fn tls_failed(stats: &PeerStats, e: TlsError) -> HandshakeError {
    bump(if e.is_refusal() { &stats.handshake_refused } else { &stats.handshake_failed });
    HandshakeError::Tls(e)
}

/// Tells a connection that arrived while a link is up to go away, in the background.
fn refuse_busy(
    mut reader: FrameReader<PeerRead>,
    mut writer: FrameWriter<PeerWrite>,
    addr: SocketAddr,
    stats: &PeerStats,
) {
    bump(&stats.busy_refused);
    tracing::info!(%addr, "refusing a second peer connection: {BUSY_REASON}");
    tokio::spawn(async move {
        let bye = say_bye(&mut reader, &mut writer, BUSY_REASON.to_owned());
        let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
    });
}

fn log_handshake_failure(addr: SocketAddr, e: &HandshakeError) {
    match e {
        // Already logged with both values by the handshake.
        HandshakeError::Refused(_) => {}
        HandshakeError::Link(LinkError::Eof) => tracing::debug!(%addr, "connection closed before its Hello"),
        HandshakeError::Tls(e) if e.is_refusal() => tracing::warn!(%addr, "refusing peer connection: {e}"),
        HandshakeError::Tls(e) => tracing::warn!(%addr, "peer TLS handshake failed: {e}"),
        e => tracing::info!(%addr, "peer handshake failed: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve the peer's address: {0}")]
    Resolve(io::Error),
    #[error("{0}")]
    Connect(io::Error),
    #[error("handshake with {0} failed: {1}")]
    Handshake(SocketAddr, HandshakeError),
}

/// Exponential backoff with ±25% jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min_ms: u64, max_ms: u64) -> Backoff {
        let min = Duration::from_millis(min_ms.max(1));
        let max = Duration::from_millis(max_ms).max(min);
        Backoff { min, max, next: min }
    }

    /// The delay before the next attempt; doubles the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.75..=1.25))
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}
