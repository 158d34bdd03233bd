//! Listening sockets, the accept loops, per-connection setup, and graceful shutdown.
//!
//! Shutdown: when the watch channel turns `true`, accept loops stop, connections stop
//! reading new requests, and [`Server::serve`] returns once every connection has
//! answered its in-flight requests and closed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::buf::BufPool;
use crate::device::BlockDevice;
use crate::error::Error;
use crate::handshake::{ExportName, Negotiated, Outcome, Setting, negotiate, resume};
use crate::tls::{TlsConfig, TlsMode, TlsPolicy};
use crate::transmission;

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub export: ExportName,
    /// Connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// The whole option haggling (a TLS handshake included) must finish within
    /// this time.
    pub handshake_timeout_ms: u64,
    /// `NBD_OPT_STARTTLS`; `None`: refused (`ERR_POLICY`) everywhere.
    pub tls: Option<TlsConfig>,
}

impl ServerConfig {
    /// Defaults for an export called `name`: 64 connections, 30 s handshake.
    pub fn new(name: &str) -> ServerConfig {
        ServerConfig {
            export: ExportName { name: name.to_string(), description: None },
            max_connections: 64,
            handshake_timeout_ms: 30_000,
            tls: None,
        }
    }
}

/// Live counters, shared with whoever wants to report them.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections currently open (handshake or transmission).
    pub active_connections: AtomicUsize,
    /// Connections in transmission (they can do I/O); what a role change waits for.
    pub transmission_connections: AtomicUsize,
    /// Connections accepted since start.
    pub accepted_connections: AtomicU64,
    /// Connections that ended with a protocol violation or I/O error.
    pub failed_connections: AtomicU64,
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP address such as `127.0.0.1:10809` or `[::1]:10809`.
    pub async fn bind_tcp(addr: &str) -> Result<Listener, Error> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr: addr.to_string(), source })?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a Unix socket, replacing a stale socket file left by a previous run.
    pub fn bind_unix(path: impl Into<PathBuf>) -> Result<Listener, Error> {
        let path = path.into();
        let listen_err = |source| Error::Listen { addr: format!("unix:{}", path.display()), source };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(listen_err)?;
            }
        }
        let l = UnixListener::bind(&path).map_err(listen_err)?;
        Ok(Listener::Unix(l, path))
    }

    /// The address as text (after binding port 0, the real port).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A byte stream that splits into independently owned read and write halves, so the
/// request reader and the reply writer run as separate tasks without a shared lock.
pub trait IntoHalves: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl IntoHalves for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl IntoHalves for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// An in-memory connection: any reader and writer joined (`tokio::io::join`), for
/// [`Server::serve_one`] in tests and fuzz targets.
impl<R, W> IntoHalves for tokio::io::Join<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Read = R;
    type Write = W;
    fn into_halves(self) -> (R, W) {
        self.into_inner()
    }
}

/// Closes every open connection on request (e.g. a node being demoted): each stops
/// reading new requests, answers the ones in flight, and closes. New connections are
/// unaffected (the device's `check_open` decides about those).
#[derive(Clone, Debug)]
pub struct Disconnector(watch::Sender<u64>);

impl Disconnector {
    pub fn disconnect_all(&self) {
        self.0.send_modify(|generation| *generation += 1);
    }
}

/// An NBD server for one export backed by `D`.
pub struct Server<D> {
    device: Arc<D>,
    config: Arc<ServerConfig>,
    pool: BufPool,
    stats: Arc<ServerStats>,
    kick: watch::Sender<u64>,
}

impl<D: BlockDevice> Server<D> {
    pub fn new(device: Arc<D>, config: ServerConfig) -> Server<D> {
        Server {
            device,
            config: Arc::new(config),
            pool: BufPool::default(),
            stats: Arc::default(),
            kick: watch::channel(0).0,
        }
    }

    /// A handle that disconnects every open connection.
    pub fn disconnector(&self) -> Disconnector {
        Disconnector(self.kick.clone())
    }

    /// Shared live counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// The buffer pool payloads are read into (shared with the device if it wants).
    pub fn pool(&self) -> BufPool {
        self.pool.clone()
    }

    /// Serves every listener until `shutdown` turns true, then waits for open
    /// connections to finish their in-flight requests.
    pub async fn serve(self, listeners: Vec<Listener>, shutdown: watch::Receiver<bool>) {
        // Every connection task holds a clone of `alive`; when all are dropped, `recv`
        // returns None: a task tracker without another dependency.
        let (alive, mut all_done) = mpsc::channel::<()>(1);
        let mut accept_loops = Vec::new();
        for listener in listeners {
            let ctx = Ctx {
                device: self.device.clone(),
                config: self.config.clone(),
                pool: self.pool.clone(),
                stats: self.stats.clone(),
                shutdown: shutdown.clone(),
                kick: self.kick.clone(),
                alive: alive.clone(),
            };
            accept_loops.push(tokio::spawn(accept_loop(listener, ctx)));
        }
        drop(alive);
        for l in accept_loops {
            let _ = l.await;
        }
        let _ = all_done.recv().await;
    }

    /// Serves one already-open stream exactly as an accepted connection is served
    /// (handshake, then transmission) and returns how it ended. For in-memory streams
    /// in fuzz targets (`fuzz/`) and tests; servers use [`Server::serve`].
    #[doc(hidden)]
    pub async fn serve_one<S: IntoHalves>(
        &self,
        stream: S,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let ctx = Ctx {
            device: self.device.clone(),
            config: self.config.clone(),
            pool: self.pool.clone(),
            stats: self.stats.clone(),
            shutdown,
            kick: self.kick.clone(),
            alive: mpsc::channel(1).0,
        };
        serve_stream(stream, "in-memory", TlsMode::Off, &ctx).await
    }
}

struct Ctx<D> {
    device: Arc<D>,
    config: Arc<ServerConfig>,
    pool: BufPool,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<bool>,
    kick: watch::Sender<u64>,
    alive: mpsc::Sender<()>,
}

impl<D> Clone for Ctx<D> {
    fn clone(&self) -> Self {
        Ctx {
            device: self.device.clone(),
            config: self.config.clone(),
            pool: self.pool.clone(),
            stats: self.stats.clone(),
            shutdown: self.shutdown.clone(),
            kick: self.kick.clone(),
            alive: self.alive.clone(),
        }
    }
}

async fn accept_loop<D: BlockDevice>(listener: Listener, ctx: Ctx<D>) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = crate::server::stopped(&mut shutdown) => return,
            accepted = accept(&listener) => match accepted {
                Ok(Accepted::Tcp(s, peer)) => {
                    // Without NODELAY a small reply can wait for the peer's delayed ACK.
                    let _ = s.set_nodelay(true);
                    let tls = ctx.config.tls.as_ref().map_or(TlsMode::Off, |t| t.tcp);
                    tokio::spawn(connection(s, peer, tls, ctx.clone()));
                }
                Ok(Accepted::Unix(s)) => {
                    let tls = ctx.config.tls.as_ref().map_or(TlsMode::Off, |t| t.unix);
                    tokio::spawn(connection(s, "unix".to_string(), tls, ctx.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %listener.local_addr(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a.to_string())),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Resolves once shutdown is requested (or its sender is gone, which means the same).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Decrements one of the connection counts however the connection ends.
struct CountGuard {
    stats: Arc<ServerStats>,
    count: fn(&ServerStats) -> &AtomicUsize,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        (self.count)(&self.stats).fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection<S: IntoHalves, D: BlockDevice>(stream: S, peer: String, tls: TlsMode, ctx: Ctx<D>) {
    let stats = &ctx.stats;
    stats.accepted_connections.fetch_add(1, Ordering::Relaxed);
    let active = stats.active_connections.fetch_add(1, Ordering::Relaxed) + 1;
    let _guard = CountGuard { stats: stats.clone(), count: |s| &s.active_connections };
    if active > ctx.config.max_connections {
        tracing::warn!(%peer, limit = ctx.config.max_connections, "too many connections; closing");
        return;
    }
    let result = serve_stream(stream, &peer, tls, &ctx).await;
    if let Err(e) = result {
        stats.failed_connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, error = %e, "connection ended with an error");
    }
}

async fn serve_stream<S: IntoHalves, D: BlockDevice>(
    mut stream: S,
    peer: &str,
    tls: TlsMode,
    ctx: &Ctx<D>,
) -> Result<(), Error> {
    let timeout_ms = ctx.config.handshake_timeout_ms;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let stopping = *ctx.shutdown.borrow();
    let source = ctx.config.tls.as_ref().map(|t| &t.acceptor);
    let setting = |active| Setting {
        device: ctx.device.as_ref(),
        export: &ctx.config.export,
        shutting_down: stopping,
        tls: TlsPolicy { source, mode: tls, active },
    };
    let mut shutdown = ctx.shutdown.clone();
    // The whole handshake, a TLS upgrade included, is bounded by one deadline; a
    // client still haggling when shutdown starts is simply closed.
    let bounded = async {
        match negotiate(&mut stream, setting(false)).await? {
            Outcome::StartTls { acceptor, resume: state } => {
                let mut secure = acceptor.accept(stream).await.map_err(|e| {
                    tracing::info!(%peer, error = %e, "TLS handshake with an NBD client failed");
                    Error::Io(e)
                })?;
                let outcome = resume(&mut secure, setting(true), state).await?;
                // Boxed: a TLS session is over a kilobyte; one allocation per client.
                Ok::<_, Error>(Upgraded::Tls(Box::new(secure), outcome))
            }
            outcome => Ok(Upgraded::Plain(stream, outcome)),
        }
    };
    let upgraded = tokio::select! {
        timed = tokio::time::timeout_at(deadline, bounded) => {
            timed.map_err(|_| Error::HandshakeTimeout(timeout_ms))??
        }
        _ = crate::server::stopped(&mut shutdown) => return Ok(()),
    };
    match upgraded {
        Upgraded::Plain(stream, Outcome::Transmission(n)) => {
            let (r, w) = stream.into_halves();
            transmit(r, w, n, peer, ctx).await
        }
        Upgraded::Tls(stream, Outcome::Transmission(n)) => {
            tracing::debug!(%peer, "NBD client on TLS");
            // One TLS session carries both directions: the halves share it behind
            // tokio's split lock (held only while a record is sealed or opened).
            let (r, w) = tokio::io::split(stream);
            transmit(r, w, n, peer, ctx).await
        }
        // A second STARTTLS is refused inside the TLS session, so only these remain.
        Upgraded::Plain(..) | Upgraded::Tls(..) => Ok(()),
    }
}

/// A connection after haggling: the stream it ended on, and how it ended.
enum Upgraded<S> {
    Plain(S, Outcome),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Outcome),
}

async fn transmit<R, W, D>(r: R, w: W, negotiated: Negotiated, peer: &str, ctx: &Ctx<D>) -> Result<(), Error>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    tracing::debug!(%peer, structured = negotiated.structured_replies, "transmission phase");
    ctx.stats.transmission_connections.fetch_add(1, Ordering::SeqCst);
    let _counted = CountGuard { stats: ctx.stats.clone(), count: |s| &s.transmission_connections };
    // Subscribed now: a disconnect requested from here on ends this connection.
    let kick = ctx.kick.subscribe();
    // The export may have closed (a role change, a forced disconnect) between GO and
    // here, unseen by the kick above: checked again now that both are in place, so a
    // role change that waits for the transmission count to reach zero is never
    // overtaken by a client.
    if let Err(why) = ctx.device.check_open() {
        tracing::info!(%peer, %why, "export closed during the handshake; disconnecting");
        return Ok(());
    }
    transmission::run(r, w, ctx.device.clone(), negotiated, ctx.pool.clone(), ctx.shutdown.clone(), kick)
        .await
}
