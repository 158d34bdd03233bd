//! A fault-injecting TCP proxy for link tests: loopback only, or the veth
//! addresses of [`crate::netns`] from inside a namespace a test made
//! ([`crate::netns::test_address`]).
//!
//! [`Proxy::start`] listens on `listen` (port 0 for an ephemeral port) and
//! forwards every accepted connection to `target`, both directions. The side
//! that connected to the proxy is the *client*; [`Direction::ToTarget`] is
//! client → target, [`Direction::ToClient`] the replies. Put it between two
//! nodes by giving the connecting node the proxy's address as its peer.
//!
//! Threads: one acceptor, and per connection one reader and one writer per
//! direction (reader → bounded channel → writer). Every socket read and write
//! has a 100 ms timeout, so every loop rechecks the proxy's and the
//! connection's state at least that often; nothing spins. Drop stops and
//! joins everything.
//!
//! Faults:
//! * [`Proxy::cut`]: every current connection is closed abruptly (SO_LINGER
//!   0: both peers get a RST, without a FIN first), and connections accepted
//!   until [`Proxy::heal`] are reset at once. When `cut` returns, the old
//!   connections are gone.
//! * [`Proxy::pause`]: stop forwarding (and reading) without closing: data
//!   stays in the socket buffers and TCP backpressure builds up, as on a
//!   link that silently stopped delivering. [`Proxy::resume`] (or `heal`)
//!   continues the same streams, nothing lost.
//! * [`Proxy::set_delay`]: each chunk is forwarded `delay` after it was read
//!   (latency, not a throughput cap: chunks queue behind each other).
//! * [`Proxy::set_bandwidth`]: a token bucket per direction, shared by all
//!   connections, starting empty when set: the bytes forwarded in one
//!   direction since the call never exceed `rate × elapsed`.
//! * [`Proxy::corrupt_next`]: flips bit 0 of one byte, once: the byte
//!   `n` positions after the last byte forwarded so far in the selected
//!   direction ([`Proxy::set_corrupt_direction`], default `ToTarget`),
//!   counted over all connections in that direction.
//!
//! A half-close (EOF) is forwarded as a half-close; a reset or error on
//! either side resets both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::daemon::Addr;

/// The granularity at which every proxy loop rechecks its state.
const TICK: Duration = Duration::from_millis(100);
/// Read buffer per direction.
const CHUNK: usize = 64 << 10;
/// Chunks queued between a reader and its writer.
const QUEUE: usize = 64;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting side to the target.
    ToTarget,
    /// From the target back to the connecting side.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::ToClient => 1,
        }
    }
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes forwarded client → target.
    pub to_target: u64,
    /// Bytes forwarded target → client.
    pub to_client: u64,
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Forwarded connections still open.
    pub active: usize,
    /// Connections reset on arrival because the proxy was cut.
    pub refused: u64,
    /// Connections reset on arrival because the target did not accept.
    pub target_connect_failures: u64,
    /// Calls of `cut`.
    pub cuts: u64,
    /// Bytes corrupted by `corrupt_next`.
    pub corrupted: u64,
}

impl ProxyStats {
    pub fn bytes(&self, d: Direction) -> u64 {
        match d {
            Direction::ToTarget => self.to_target,
            Direction::ToClient => self.to_client,
        }
    }
}

struct DirState {
    forwarded: u64,
    corrupt_at: Option<u64>,
    corrupted: u64,
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl DirState {
    fn new() -> DirState {
        DirState {
            forwarded: 0,
            corrupt_at: None,
            corrupted: 0,
            rate: None,
            tokens: 0.0,
            last: Instant::now(),
        }
    }
}

struct Inner {
    target: SocketAddr,
    stop: AtomicBool,
    cut: AtomicBool,
    paused: AtomicBool,
    delay: Mutex<Duration>,
    corrupt_dir: Mutex<Direction>,
    dirs: [Mutex<DirState>; 2],
    conns: Mutex<Vec<Arc<Conn>>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    connect_failures: AtomicU64,
    cuts: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Conn {
    client: TcpStream,
    server: TcpStream,
    dead: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Conn {
    fn stream(&self, to: Direction) -> (&TcpStream, &TcpStream) {
        match to {
            Direction::ToTarget => (&self.client, &self.server),
            Direction::ToClient => (&self.server, &self.client),
        }
    }

    /// Marks the connection dead; its sockets will be reset when closed.
    fn abort(&self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            set_linger0(&self.client);
            set_linger0(&self.server);
        }
    }

    fn finished(&self) -> bool {
        lock(&self.threads).iter().all(|t| t.is_finished())
    }

    fn join(&self) {
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

/// SO_LINGER {on, 0}: close() sends a RST instead of a FIN.
fn set_linger0(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd owned by `s` and a correctly sized
    // `struct linger` that outlives the call.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Waits up to `timeout` for `l` to become readable (a pending connection).
fn poll_readable(l: &TcpListener, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// A running proxy. Drop stops it and joins every thread.
pub struct Proxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("addr", &self.addr).field("target", &self.inner.target).finish()
    }
}

impl Proxy {
    /// Listens on `listen` (port 0 = ephemeral) and forwards to `target`, both
    /// loopback or, on a thread inside a test's namespace, its veth addresses.
    /// The proxy's threads stay in the calling thread's network namespace.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> Proxy {
        for (what, a) in [("listens on", listen), ("forwards to", target)] {
            assert!(
                crate::netns::test_address(a.ip()),
                "the test proxy only {what} loopback or a test namespace's address, not {a}"
            );
        }
        let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("proxy: bind {listen}: {e}"));
        l.set_nonblocking(true).expect("proxy: nonblocking listener");
        let addr = l.local_addr().expect("proxy: local_addr");
        let inner = Arc::new(Inner {
            target,
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            corrupt_dir: Mutex::new(Direction::ToTarget),
            dirs: [Mutex::new(DirState::new()), Mutex::new(DirState::new())],
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
        });
        let i = inner.clone();
        let acceptor = thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || accept_loop(l, i))
            .expect("spawn proxy acceptor");
        Proxy { inner, addr, acceptor: Some(acceptor) }
    }

    /// `start("127.0.0.1:0", target)`.
    pub fn ephemeral(target: SocketAddr) -> Proxy {
        Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), target)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// [`Proxy::addr`] as a harness [`Addr`] (for `RawClient`, URIs).
    pub fn nbd_addr(&self) -> Addr {
        Addr::Tcp(self.addr)
    }

    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    /// Resets every current connection and every new one until `heal`.
    /// Returns when the old connections' sockets are closed.
    pub fn cut(&self) {
        self.inner.cuts.fetch_add(1, Ordering::SeqCst);
        let old: Vec<Arc<Conn>> = {
            let mut conns = lock(&self.inner.conns);
            self.inner.cut.store(true, Ordering::SeqCst);
            conns.drain(..).collect()
        };
        for c in &old {
            c.abort();
        }
        for c in &old {
            c.join();
        }
        // Dropping `old` closes the last copies of the sockets: RST.
    }

    /// Accepts and forwards again, and ends a pause. Delay, bandwidth and
    /// pending corruption stay as set.
    pub fn heal(&self) {
        self.inner.cut.store(false, Ordering::SeqCst);
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.inner.cut.load(Ordering::SeqCst)
    }

    /// Stops forwarding without closing anything (see module docs).
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    /// Forward each chunk `d` after it was read (both directions; applies
    /// to chunks read from now on).
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.inner.delay) = d;
    }

    /// Limits each direction to `bytes_per_sec` (None: unlimited). The
    /// bucket starts empty.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        assert!(bytes_per_sec != Some(0), "bandwidth 0: use pause()");
        for d in &self.inner.dirs {
            let mut st = lock(d);
            st.rate = bytes_per_sec;
            st.tokens = 0.0;
            st.last = Instant::now();
        }
    }

    /// The direction `corrupt_next` acts on (default `ToTarget`).
    pub fn set_corrupt_direction(&self, d: Direction) {
        *lock(&self.inner.corrupt_dir) = d;
    }

    /// Flips bit 0 of the byte `n_bytes_from_now` positions after the last
    /// byte forwarded so far in the selected direction (0 = the next byte),
    /// once. Replaces a corruption still pending in that direction.
    pub fn corrupt_next(&self, n_bytes_from_now: usize) {
        let d = *lock(&self.inner.corrupt_dir);
        let mut st = lock(&self.inner.dirs[d.index()]);
        st.corrupt_at = Some(st.forwarded + n_bytes_from_now as u64);
    }

    /// Is a corruption still pending in the selected direction?
    pub fn corruption_pending(&self) -> bool {
        let d = *lock(&self.inner.corrupt_dir);
        lock(&self.inner.dirs[d.index()]).corrupt_at.is_some()
    }

    pub fn stats(&self) -> ProxyStats {
        prune(&self.inner);
        let (t, c) = (lock(&self.inner.dirs[0]), lock(&self.inner.dirs[1]));
        ProxyStats {
            to_target: t.forwarded,
            to_client: c.forwarded,
            accepted: self.inner.accepted.load(Ordering::SeqCst),
            active: lock(&self.inner.conns).iter().filter(|c| !c.finished()).count(),
            refused: self.inner.refused.load(Ordering::SeqCst),
            target_connect_failures: self.inner.connect_failures.load(Ordering::SeqCst),
            cuts: self.inner.cuts.load(Ordering::SeqCst),
            corrupted: t.corrupted + c.corrupted,
        }
    }

    /// Polls `stats()` until `pred` holds; panics after `timeout` naming
    /// `what` and the last stats.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ProxyStats) -> bool,
    ) -> ProxyStats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "proxy {}: {what} not reached within {timeout:?}: {s:?}",
                self.addr
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns: Vec<Arc<Conn>> = lock(&self.inner.conns).drain(..).collect();
        for c in &conns {
            c.abort();
        }
        for c in &conns {
            c.join();
        }
    }
}

/// Joins and forgets connections whose threads all ended.
fn prune(inner: &Inner) {
    let done: Vec<Arc<Conn>> = {
        let mut conns = lock(&inner.conns);
        let (done, live): (Vec<_>, Vec<_>) = conns.drain(..).partition(|c| c.finished());
        *conns = live;
        done
    };
    for c in done {
        c.join();
    }
}

fn accept_loop(l: TcpListener, inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        prune(&inner);
        if !poll_readable(&l, TICK) {
            continue;
        }
        let client = match l.accept() {
            Ok((s, _)) => s,
            Err(_) => continue,
        };
        if inner.cut.load(Ordering::SeqCst) {
            inner.refused.fetch_add(1, Ordering::SeqCst);
            set_linger0(&client);
            continue;
        }
        let server = match TcpStream::connect_timeout(&inner.target, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                inner.connect_failures.fetch_add(1, Ordering::SeqCst);
                set_linger0(&client);
                continue;
            }
        };
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))
        };
        if setup(&client).and_then(|_| setup(&server)).is_err() {
            set_linger0(&client);
            set_linger0(&server);
            continue;
        }
        let conn =
            Arc::new(Conn { client, server, dead: AtomicBool::new(false), threads: Mutex::new(Vec::new()) });
        let mut conns = lock(&inner.conns);
        if inner.cut.load(Ordering::SeqCst) {
            // Cut while we were connecting to the target.
            inner.refused.fetch_add(1, Ordering::SeqCst);
            conn.abort();
            continue;
        }
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        let mut handles = Vec::with_capacity(4);
        for d in [Direction::ToTarget, Direction::ToClient] {
            let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
            let (c1, i1) = (conn.clone(), inner.clone());
            let (c2, i2) = (conn.clone(), inner.clone());
            handles.push(
                thread::Builder::new()
                    .name("proxy-read".into())
                    .spawn(move || reader(&c1, &i1, d, tx))
                    .expect("spawn proxy reader"),
            );
            handles.push(
                thread::Builder::new()
                    .name("proxy-write".into())
                    .spawn(move || writer(&c2, &i2, d, rx))
                    .expect("spawn proxy writer"),
            );
        }
        *lock(&conn.threads) = handles;
        conns.push(conn);
    }
}

enum Msg {
    Data(Instant, Vec<u8>),
    Eof,
}

fn alive(conn: &Conn, inner: &Inner) -> bool {
    !conn.dead.load(Ordering::SeqCst) && !inner.stop.load(Ordering::SeqCst)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

fn reader(conn: &Conn, inner: &Inner, d: Direction, tx: SyncSender<Msg>) {
    let (mut src, _) = conn.stream(d);
    let mut buf = vec![0u8; CHUNK];
    while alive(conn, inner) {
        if inner.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match src.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::Eof);
                return;
            }
            Ok(n) => {
                let due = Instant::now() + *lock(&inner.delay);
                // Blocks while the queue is full; fails once the writer is
                // gone (which it is soon after the connection dies).
                if tx.send(Msg::Data(due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if timed_out(&e) => {}
            Err(_) => {
                conn.abort();
                return;
            }
        }
    }
}

/// Sleeps until `until` in ticks; false if the connection died meanwhile.
fn sleep_until(conn: &Conn, inner: &Inner, until: Instant) -> bool {
    loop {
        if !alive(conn, inner) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        thread::sleep((until - now).min(TICK));
    }
}

/// Waits for tokens for `slice` (bandwidth), then counts it and applies a
/// pending corruption. False if the connection died meanwhile.
fn admit(conn: &Conn, inner: &Inner, d: Direction, slice: &mut [u8]) -> bool {
    let n = slice.len() as u64;
    loop {
        if !alive(conn, inner) {
            return false;
        }
        if inner.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let wait = {
            let mut st = lock(&inner.dirs[d.index()]);
            let wait = match st.rate {
                None => None,
                Some(rate) => {
                    let now = Instant::now();
                    let cap = (rate as f64 / 10.0).max(n as f64);
                    st.tokens =
                        (st.tokens + now.duration_since(st.last).as_secs_f64() * rate as f64).min(cap);
                    st.last = now;
                    if st.tokens >= n as f64 {
                        st.tokens -= n as f64;
                        None
                    } else {
                        Some(Duration::from_secs_f64((n as f64 - st.tokens) / rate as f64))
                    }
                }
            };
            if wait.is_none() {
                let start = st.forwarded;
                st.forwarded += n;
                if let Some(at) = st.corrupt_at
                    && at >= start
                    && at < start + n
                {
                    slice[(at - start) as usize] ^= 0x01;
                    st.corrupt_at = None;
                    st.corrupted += 1;
                }
            }
            wait
        };
        match wait {
            None => return true,
            Some(w) => thread::sleep(w.clamp(Duration::from_millis(1), TICK)),
        }
    }
}

fn write_all(conn: &Conn, inner: &Inner, mut dst: &TcpStream, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if !alive(conn, inner) {
            return false;
        }
        match dst.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if timed_out(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

fn writer(conn: &Conn, inner: &Inner, d: Direction, rx: Receiver<Msg>) {
    let (_, dst) = conn.stream(d);
    loop {
        match rx.recv_timeout(TICK) {
            Ok(Msg::Data(due, mut data)) => {
                if !sleep_until(conn, inner, due) {
                    return;
                }
                let slice = match lock(&inner.dirs[d.index()]).rate {
                    Some(r) => (r / 50).clamp(1, CHUNK as u64) as usize,
                    None => CHUNK,
                };
                for s in data.chunks_mut(slice) {
                    if !admit(conn, inner, d, s) {
                        return;
                    }
                    if !write_all(conn, inner, dst, s) {
                        conn.abort();
                        return;
                    }
                }
            }
            Ok(Msg::Eof) => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                if !alive(conn, inner) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
