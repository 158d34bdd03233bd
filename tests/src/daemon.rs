//! Spawning and supervising a server process (blockd or nbdkit).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::tools::tail;

/// How long a server may take to start answering on its addresses.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// An address a server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    /// Connects with a short timeout for each attempt.
    pub fn connect(&self) -> std::io::Result<Box<dyn ReadWrite>> {
        Ok(match self {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, Duration::from_secs(2))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Addr::Unix(p) => Box::new(UnixStream::connect(p)?),
        })
    }

    /// A libnbd / qemu URI for `export` on this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Addr::Tcp(a) => format!("nbd://{a}/{export}"),
            Addr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

/// A bidirectional byte stream with read timeouts (TCP or Unix).
pub trait ReadWrite: Read + Write + Send {
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    fn shutdown_write(&self) -> std::io::Result<()>;
}

impl ReadWrite for TcpStream {
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(d)?;
        self.set_write_timeout(d)
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl ReadWrite for UnixStream {
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(d)?;
        self.set_write_timeout(d)
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Ports handed out by [`free_port`]: below the kernel's ephemeral range
/// (32768–60999 by default), so the source port of some other test's outgoing
/// connection cannot take a port between its release here and the server's bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1: each call in this process tries the next port of
/// [`TEST_PORTS`] (from a per-process random start) until one binds, then releases it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = TEST_PORTS.start + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {TEST_PORTS:?} on 127.0.0.1");
}

/// Is the NBD server at `addr` answering? Reads the 8-byte `NBDMAGIC` of the
/// greeting, so a listening socket whose server is not yet serving does not
/// count.
fn answers(addr: &Addr) -> bool {
    let Ok(mut s) = addr.connect() else {
        return false;
    };
    let _ = s.set_timeout(Some(Duration::from_secs(2)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// A supervised server process. Drop kills it (by its PID only) and, when
/// the test is failing, prints the tail of its log.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    addrs: Vec<Addr>,
    /// Unix sockets to remove before (re)starting: for servers (nbdkit)
    /// that leave their socket behind and then refuse to bind it.
    stale_sockets: Vec<PathBuf>,
    /// Extra environment variables of the process.
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    /// Starts `program args...` with stderr (and stdout) appended to `log`
    /// and waits until every address in `addrs` answers.
    pub fn start(
        name: &str,
        program: &Path,
        args: Vec<String>,
        log: PathBuf,
        addrs: Vec<Addr>,
        stale_sockets: Vec<PathBuf>,
    ) -> Daemon {
        Daemon::start_with_env(name, program, args, Vec::new(), log, addrs, stale_sockets)
    }

    /// [`Daemon::start`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
        addrs: Vec<Addr>,
        stale_sockets: Vec<PathBuf>,
    ) -> Daemon {
        let mut d = Daemon {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log,
            addrs,
            stale_sockets,
            env,
            child: None,
            starts: 0,
        };
        d.spawn();
        d
    }

    /// Command line, for messages.
    pub fn cmdline(&self) -> String {
        format!("{} {}", self.program.display(), self.args.join(" "))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The arguments used by the next (re)start.
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    pub fn addrs(&self) -> &[Addr] {
        &self.addrs
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log (all starts).
    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        for s in &self.stale_sockets {
            let _ = fs::remove_file(s);
        }
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let _ = writeln!(log, "=== harness: start #{} of {}: {}", self.starts, self.name, self.cmdline());
        let err = log.try_clone().expect("dup log");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.cmdline()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls (bounded by [`START_TIMEOUT`]) until every address answers;
    /// panics with the log if the process exits or the deadline passes.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending: Vec<Addr> = self.addrs.clone();
        let mut pause = Duration::from_millis(5);
        while !pending.is_empty() {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!(
                    "{} exited with {st} before answering on {:?}\n--- log ---\n{}",
                    self.name,
                    pending,
                    self.log_tail(60)
                );
            }
            pending.retain(|a| !answers(a));
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} did not answer on {:?} within {START_TIMEOUT:?}\n--- log ---\n{}",
                    self.name,
                    pending,
                    self.log_tail(60)
                );
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Sends `sig` to the process (its PID only).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            let pid = c.id() as libc::pid_t;
            // SAFETY: kill(2) on the PID of a child we spawned and have not
            // yet reaped, so the PID cannot have been reused.
            let r = unsafe { libc::kill(pid, sig) };
            assert_eq!(r, 0, "kill({pid}, {sig}) failed");
        }
    }

    /// SIGTERM, then wait up to [`STOP_TIMEOUT`]; SIGKILL after that.
    /// Returns the exit status (a SIGKILLed server reports the signal).
    pub fn stop(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("{} is not running", self.name);
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: as in `signal`: our own unreaped child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        match crate::tools::wait_deadline(&mut child, STOP_TIMEOUT) {
            Some(st) => st,
            None => {
                eprintln!("{} ignored SIGTERM for {STOP_TIMEOUT:?}; it was SIGKILLed", self.name);
                child.wait().expect("wait after SIGKILL")
            }
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (after a
    /// signal sent with [`Daemon::signal`]); None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("not running");
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `stop()` and assert that the server exited with status 0.
    pub fn stop_ok(&mut self) {
        let st = self.stop();
        assert!(
            st.success(),
            "{} exited with {st} after SIGTERM\n--- log ---\n{}",
            self.name,
            self.log_tail(60)
        );
    }

    /// SIGKILL and reap (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean stop (asserting exit 0), then start again with the same
    /// command line and wait until it answers.
    pub fn restart(&mut self) {
        self.stop_ok();
        self.spawn();
    }

    /// Start again after `stop()`/`kill()`.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- {} log ({}), last 80 lines ---\n{}\n--- end of {} log ---",
                self.name,
                self.log.display(),
                self.log_tail(80),
                self.name
            );
        }
        self.kill();
    }
}
