//! The supervisor over real loopback TCP: connecting, reconnecting by itself,
//! refusing a second connection, re-resolving the peer's name, shutting down.
//! Waits are bounded by a deadline; none of them sleeps a fixed time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nbd_server::buf::BufPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::config::HostPort;
use crate::peer::dial::{BUSY_REASON, Backoff, PeerSettings, Resolver, Supervisor};
use crate::peer::link::{LinkEvent, PeerConn};

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn loopback(port: u16) -> HostPort {
    HostPort { host: "127.0.0.1".into(), port }
}

struct Node {
    conns: mpsc::Receiver<PeerConn>,
    stats: Arc<PeerStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _hello: watch::Sender<Hello>,
}

impl Node {
    async fn conn(&mut self) -> PeerConn {
        tokio::time::timeout(DEADLINE, self.conns.recv()).await.expect("a connection in time").expect("open")
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(DEADLINE, self.task).await.expect("stops in time").expect("no panic");
    }
}

fn settings(local: &str, peer: &str, listen: HostPort, peer_addr: HostPort) -> PeerSettings {
    PeerSettings {
        backoff_min_ms: 10,
        backoff_max_ms: 200,
        ..PeerSettings::new(local, peer, listen, peer_addr)
    }
}

fn start(settings: PeerSettings, hello: Hello, resolver: Option<Resolver>) -> Node {
    let (hello_tx, hello_rx) = watch::channel(hello);
    let (conn_tx, conn_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::new(PeerStats::default());
    let task = match resolver {
        None => crate::peer::spawn_supervisor(
            settings,
            hello_rx,
            BufPool::default(),
            stats.clone(),
            conn_tx,
            stop_rx,
        ),
        Some(resolver) => {
            let sup = Supervisor {
                settings,
                hello: hello_rx,
                pool: BufPool::default(),
                stats: stats.clone(),
                events: conn_tx,
                resolver,
            };
            tokio::spawn(sup.run(stop_rx))
        }
    };
    Node { conns: conn_rx, stats, stop: stop_tx, task, _hello: hello_tx }
}

/// alpha dials (its name sorts first), beta accepts.
fn pair() -> (Node, Node, u16) {
    let (pa, pb) = (free_port(), free_port());
    let alpha = start(settings("alpha", "beta", loopback(pa), loopback(pb)), hello("alpha"), None);
    let beta = start(settings("beta", "alpha", loopback(pb), loopback(pa)), hello("beta"), None);
    (alpha, beta, pb)
}

async fn event(conn: &mut PeerConn) -> LinkEvent {
    tokio::time::timeout(DEADLINE, conn.incoming.recv()).await.expect("an event in time").expect("open")
}

async fn until_closed(conn: &mut PeerConn) -> LinkError {
    loop {
        if let LinkEvent::Closed(e) = event(conn).await {
            return e;
        }
    }
}

/// Waits until `cond` holds, checking every 10 ms, failing after [`DEADLINE`].
async fn wait_until(cond: impl Fn() -> bool) {
    within(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A message from `from` arrives at `to`.
async fn carries(from: &PeerConn, to: &mut PeerConn, id: u64) {
    from.outgoing.send(Message::RecvAck { id }).expect("link up");
    loop {
        match event(to).await {
            LinkEvent::Message(Message::RecvAck { id: got }) if got == id => return,
            LinkEvent::Sent { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn supervisors_connect_and_carry_messages() {
    let (mut alpha, mut beta, _) = pair();
    let mut a = alpha.conn().await;
    let mut b = beta.conn().await;
    assert_eq!(a.remote, hello("beta"));
    assert_eq!(b.remote, hello("alpha"));
    carries(&a, &mut b, 1).await;
    carries(&b, &mut a, 2).await;
    assert_eq!(alpha.stats.snapshot().connects, 1);
    assert_eq!(beta.stats.snapshot().connects, 1);
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn reconnect_after_the_dialer_drops_its_conn() {
    let (mut alpha, mut beta, _) = pair();
    let a = alpha.conn().await;
    let mut b = beta.conn().await;
    drop(a);
    until_closed(&mut b).await;
    let a2 = alpha.conn().await;
    let mut b2 = beta.conn().await;
    carries(&a2, &mut b2, 3).await;
    assert_eq!(alpha.stats.snapshot().connects, 2);
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn reconnect_after_the_acceptor_drops_its_conn() {
    let (mut alpha, mut beta, _) = pair();
    let mut a = alpha.conn().await;
    let b = beta.conn().await;
    drop(b);
    until_closed(&mut a).await;
    let mut a2 = alpha.conn().await;
    let b2 = beta.conn().await;
    carries(&b2, &mut a2, 4).await;
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn acceptor_refuses_a_second_connection_while_one_is_up() {
    let (mut alpha, mut beta, beta_port) = pair();
    let a = alpha.conn().await;
    let mut b = beta.conn().await;

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", beta_port)).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, BufPool::default(), Arc::new(PeerStats::default()));
    let first = tokio::time::timeout(DEADLINE, reader.read()).await.expect("an answer in time");
    match first {
        Ok(Message::Bye { reason }) => assert_eq!(reason, BUSY_REASON),
        other => panic!("{other:?}"),
    }
    tokio::io::AsyncWriteExt::shutdown(&mut w).await.unwrap();
    let end = tokio::time::timeout(DEADLINE, reader.read()).await.expect("closed in time");
    assert!(matches!(end, Err(LinkError::Eof)), "{end:?}");
    assert_eq!(beta.stats.snapshot().busy_refused, 1);

    carries(&a, &mut b, 5).await;
    assert_eq!(beta.stats.snapshot().connects, 1, "the first link is untouched");
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn dialer_resolves_again_on_every_attempt() {
    // The name first points at an address where nothing listens, then "moves" to
    // beta: only a dialer that resolves on every attempt finds it.
    let (pa, pb, dead) = (free_port(), free_port(), free_port());
    let beta = start(settings("beta", "alpha", loopback(pb), loopback(pa)), hello("beta"), None);
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = lookups.clone();
    let resolver = Resolver::new(move |hp: &HostPort| {
        assert_eq!(hp.host, "peer.example");
        let n = counted.fetch_add(1, Ordering::SeqCst);
        let port = if n < 2 { dead } else { pb };
        Box::pin(async move { Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]) })
    });
    let peer = HostPort { host: "peer.example".into(), port: 1 };
    let mut alpha = start(settings("alpha", "beta", loopback(pa), peer), hello("alpha"), Some(resolver));
    let mut beta = beta;
    let a = alpha.conn().await;
    let mut b = beta.conn().await;
    carries(&a, &mut b, 6).await;
    // Two attempts went to the dead address; more than one attempt may go to beta
    // if it was not listening yet. Either way: one lookup per attempt.
    let n = lookups.load(Ordering::SeqCst);
    assert!(n >= 3, "{n} lookups");
    assert_eq!(alpha.stats.snapshot().dial_attempts, n as u64, "one lookup per attempt");
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn dialer_reaches_the_peer_by_host_name() {
    let (pa, pb) = (free_port(), free_port());
    let localhost = HostPort { host: "localhost".into(), port: pb };
    let mut alpha = start(settings("alpha", "beta", loopback(pa), localhost), hello("alpha"), None);
    let mut beta = start(settings("beta", "alpha", loopback(pb), loopback(pa)), hello("beta"), None);
    let a = alpha.conn().await;
    let mut b = beta.conn().await;
    carries(&a, &mut b, 7).await;
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn incompatible_peers_never_get_a_conn() {
    let (pa, pb) = (free_port(), free_port());
    let mut other = hello("beta");
    other.resource = "r9".into();
    let mut alpha = start(settings("alpha", "beta", loopback(pa), loopback(pb)), hello("alpha"), None);
    let mut beta = start(settings("beta", "alpha", loopback(pb), loopback(pa)), other, None);
    // Both sides refuse, more than once: the dialer keeps trying.
    wait_until(|| {
        alpha.stats.snapshot().handshake_refused >= 2 && beta.stats.snapshot().handshake_refused >= 2
    })
    .await;
    assert!(alpha.conns.try_recv().is_err() && beta.conns.try_recv().is_err());
    assert_eq!(alpha.stats.snapshot().connects + beta.stats.snapshot().connects, 0);
    alpha.stop().await;
    beta.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_supervisor_and_closes_its_link() {
    let (mut alpha, mut beta, _) = pair();
    let mut a = alpha.conn().await;
    let mut b = beta.conn().await;
    beta.stop().await;
    assert!(matches!(until_closed(&mut b).await, LinkError::LocalClosed));
    until_closed(&mut a).await;
    // The dialer keeps trying and gets no connection: nobody listens any more.
    wait_until(|| alpha.stats.snapshot().dial_attempts >= 3).await;
    assert!(alpha.conns.try_recv().is_err());
    alpha.stop().await;
}

#[test]
fn backoff_doubles_up_to_the_cap_with_jitter_and_resets() {
    let mut b = Backoff::new(100, 1000);
    let mut bases = Vec::new();
    for _ in 0..8 {
        let d = b.next_delay().as_secs_f64() * 1000.0;
        let base = [100.0, 200.0, 400.0, 800.0, 1000.0, 1000.0, 1000.0, 1000.0][bases.len()];
        assert!((0.75 * base..=1.25 * base).contains(&d), "delay {d} ms for base {base} ms");
        bases.push(base);
    }
    b.reset();
    let d = b.next_delay().as_secs_f64() * 1000.0;
    assert!((75.0..=125.0).contains(&d), "after reset: {d} ms");
}

#[test]
fn settings_from_a_two_node_config() {
    let toml = r#"
[resource]
name = "r0"
shared-secret = "0123456789abcdef"

[[node]]
name = "alpha"
replication = "127.0.0.1:7789"
nbd = "127.0.0.1:10809"
disk = "/var/lib/blockd/a.img"
meta = "internal"

[[node]]
name = "beta"
replication = "beta.example:7790"
nbd = "127.0.0.1:10810"
disk = "/var/lib/blockd/b.img"
meta = "internal"
"#;
    let config = crate::config::Config::parse(toml, std::path::Path::new("r0.toml")).expect("valid config");
    let s = PeerSettings::from_config(&config, "beta").expect("two nodes");
    assert_eq!((s.local_name.as_str(), s.peer_name.as_str()), ("beta", "alpha"));
    assert_eq!(s.listen, HostPort { host: "beta.example".into(), port: 7790 });
    assert_eq!(s.peer_addr, loopback(7789));
    assert!(!s.dials(), "beta sorts after alpha: it accepts");
    assert_eq!(s.secret.as_ref().map(|x| x.as_bytes()), Some(&b"0123456789abcdef"[..]));
    assert!(PeerSettings::from_config(&config, "alpha").expect("two nodes").dials());
    assert!(PeerSettings::from_config(&config, "gamma").is_none());
}
