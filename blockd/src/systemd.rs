//! systemd readiness and watchdog for `Type=notify` units (`blockd@.service`), by the
//! `sd_notify(3)` protocol: one datagram of `KEY=VALUE` lines sent to the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or an abstract address written `@name`).
//!
//! Written by hand on `std`'s Unix datagram socket rather than with a crate: it is a
//! few lines over a stable, documented interface, and the well-kept small crate
//! (`sd-notify`) connects to the variable's value as a path, so it cannot reach the
//! abstract addresses systemd also hands out.
//!
//! [`supervise`] is what `blockd run` uses: `READY=1` once the node's control socket
//! answers a `status` request (a standalone export binds it after its NBD addresses),
//! then, when the unit has `WatchdogSec=`,
//! `WATCHDOG=1` every half period for as long as the control socket keeps answering;
//! `STOPPING=1` when the daemon begins to stop. Without `$NOTIFY_SOCKET` nothing is
//! sent and nothing runs (`blockctl up` and foreground use).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// How often readiness is probed while the daemon starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Longest a watchdog probe may take before the ping is skipped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` when unset (not started by systemd).
    pub fn from_env() -> Option<io::Result<Notifier>> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Notifier::new(&value))
    }

    /// For an address as systemd writes it: a path, or `@name` (abstract).
    pub fn new(value: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None if bytes.starts_with(b"/") => SocketAddr::from_pathname(Path::new(value))?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={value:?} is neither a path nor an @abstract name"),
                ));
            }
        };
        Ok(Notifier { socket: UnixDatagram::unbound()?, addr })
    }

    /// Sends `state`: newline-separated `KEY=VALUE` assignments, in one datagram.
    /// Never blocks for long: the manager's socket is a local datagram socket.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr).map(drop)
    }
}

/// Half of `$WATCHDOG_USEC` (how often to ping), when the watchdog is enabled for
/// this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// What proves the daemon is serving.
#[derive(Clone, Debug)]
pub enum Probe {
    /// Its control socket answers `status` (a replicated node's through the core
    /// task; a standalone export's is bound after its NBD addresses).
    Control(PathBuf),
}

impl Probe {
    /// `Ok(status line)` when the daemon answers.
    async fn check(&self) -> Result<String, String> {
        match self {
            Probe::Control(path) => match tokio::time::timeout(PROBE_TIMEOUT, control_status(path)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            },
        }
    }
}

/// One `status` request on the control socket, summarised for systemd's `STATUS=`.
async fn control_status(path: &Path) -> Result<String, String> {
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let req = format!("{{\"v\":{},\"cmd\":\"status\"}}\n", crate::control::PROTOCOL_VERSION);
    w.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await.map_err(|e| e.to_string())?;
    let reply: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    if reply["ok"] != serde_json::Value::Bool(true) {
        return Err(reply["error"].as_str().unwrap_or("refused").to_string());
    }
    let s = &reply["result"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let local = format!("{} {}", text(&s["role"]), text(&s["disk"]));
    Ok(match s["peers"].get(0) {
        Some(peer) => format!(
            "{local}, peer {} {} {}",
            text(&peer["node"]),
            text(&peer["connection"]),
            text(&peer["replication"])
        ),
        None => format!("{local}, standalone export"),
    })
}

/// Tells systemd when the daemon is ready, pings its watchdog while the daemon
/// answers, and says when it stops. Returns at the stop signal (after `STOPPING=1`).
pub async fn supervise(notifier: Notifier, probe: Probe, mut stop: watch::Receiver<bool>) {
    let send = |state: &str| {
        if let Err(e) = notifier.send(state) {
            tracing::warn!("cannot notify systemd ({state:?}): {e}");
        }
    };
    let status = loop {
        tokio::select! {
            _ = stopped(&mut stop) => {
                send("STOPPING=1");
                return;
            }
            checked = probe.check() => if let Ok(status) = checked { break status },
        }
        tokio::time::sleep(READY_POLL).await;
    };
    send(&format!("READY=1\nSTATUS={status}"));
    tracing::info!("told systemd: ready");
    let interval = watchdog_interval();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick(interval) => match probe.check().await {
                Ok(status) => send(&format!("WATCHDOG=1\nSTATUS={status}")),
                // No ping: if this lasts the whole watchdog period, systemd acts.
                Err(e) => tracing::warn!("watchdog: the control socket did not answer: {e}"),
            },
        }
    }
    send("STOPPING=1");
}

/// Resolves when the stop signal is raised (or its sender is gone), holding no
/// borrow of the value afterwards.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn tick(interval: Option<Duration>) {
    match interval {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_address() {
        let dir = std::env::temp_dir().join(format!("blockd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.as_os_str()).unwrap().send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("blockd-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::new(format!("@{name}").as_ref()).unwrap().send("WATCHDOG=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_a_relative_address() {
        assert!(Notifier::new("notify.sock".as_ref()).is_err());
    }
}
