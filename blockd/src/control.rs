//! The control socket: a Unix socket speaking JSON lines, one request and one reply
//! per line (SPEC §8). `blockctl` and tests use it; it is versioned so either side can
//! refuse a peer it does not understand.
//!
//! Request: `{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"primary","force":false}`, ...
//! Reply: `{"ok":true,"status":{...}}` or `{"ok":false,"error":"why, and what to do"}`.
//!
//! `{"v":1,"cmd":"events"}` turns the connection into a stream of state objects
//! (see [`crate::events`]) until the client hangs up.
//!
//! The socket has mode 0600 (root only), or 0660 with the node's `control-group`
//! (SPEC: only root or the socket's group may connect); it is bound under a temporary
//! name and renamed into place only once its mode and group are set, so nobody can
//! connect while it is still open to others. A request that does not parse gets an
//! error reply and the connection stays usable; an oversized, non-UTF-8 or
//! unterminated line gets an error reply and the connection is closed. The daemon is
//! never disturbed. Lines are bounded to [`MAX_REQUEST_BYTES`], connections to
//! [`MAX_CONNECTIONS`] (one more is told so and closed), and a connection idle for
//! [`IDLE_TIMEOUT`] between requests is closed, so idle clients cannot lock the
//! operator out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::events::{EventFeed, Names};

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// How long a request/reply connection may stay idle (event streams are exempt).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Concurrent control connections.
pub const MAX_CONNECTIONS: usize = 32;

/// A request, as sent on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    Status,
    Primary {
        #[serde(default)]
        force: bool,
    },
    Secondary {
        #[serde(default)]
        force: bool,
    },
    /// Stop the daemon cleanly (`blockctl down`).
    Down,
    /// Leave StandAlone and connect to the peer again; with `discard_my_data`, this
    /// node gives up its changes in a split brain and resyncs from the peer.
    Connect {
        #[serde(default)]
        discard_my_data: bool,
    },
    /// Close the peer link and stay StandAlone until `connect`.
    Disconnect,
    /// Online verify: compare digests of every granule with the peer; the reply
    /// comes when it ends. With `repair`, resync what differs.
    Verify {
        #[serde(default)]
        repair: bool,
    },
    /// Discard this node's data: a full resync from the peer.
    Invalidate,
    /// Discard the peer's data: a full resync from this node.
    InvalidateRemote,
    /// Hold resync until `resume-sync`.
    PauseSync,
    ResumeSync,
    /// Detach the local disk on purpose (as after an I/O error): the node goes on
    /// Diskless and releases the disk's metadata lock, so the disk can be replaced
    /// (`create-md`). On a Primary only while its peer can serve for it.
    DetachDisk,
    /// Bring a detached disk (repaired, or replaced and `create-md`'d) back: the
    /// node restarts inside the daemon process from the disk's metadata and
    /// resyncs as the generations say. The reply comes once the node runs again.
    /// Only on a Secondary whose disk is Diskless.
    AttachDisk,
    /// Stream state changes (`exists` objects first); with `now`, only the current
    /// state. Served by the control task itself, one JSON object per line.
    Events {
        #[serde(default)]
        now: bool,
    },
    /// Internal (never on the wire): the last step of `secondary --force`, once its
    /// NBD clients are gone.
    #[serde(skip)]
    FinishForcedDemotion,
    /// A test hook: makes the replication core task panic, to check that the node
    /// then stops at once instead of staying up without its core. Refused unless
    /// the daemon was started with `BLOCKD_DEBUG_COMMANDS=1`.
    DebugPanic,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    command: serde_json::Value,
}

/// Where the answer to one request goes: the `result` object, or why not.
pub type Reply = oneshot::Sender<Result<serde_json::Value, String>>;

/// One request handed to the daemon, with where its answer goes.
#[derive(Debug)]
pub struct ControlRequest {
    pub command: Command,
    pub reply: Reply,
}

/// What the control task serves without asking the core: the state snapshots for
/// `events`, and the names they carry.
#[derive(Clone, Debug)]
pub struct EventSource {
    pub feed: EventFeed,
    pub names: Names,
}

/// Binds `path` (replacing a stale socket) and serves it until `shutdown`. With
/// `group`, members of that group may connect too (mode 0660).
pub fn spawn(
    path: &Path,
    group: Option<&str>,
    requests: mpsc::Sender<ControlRequest>,
    events: EventSource,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(std::io::Error::from)?
                .ok_or_else(|| std::io::Error::other(format!("control-group {name:?} does not exist")))?
                .gid,
        ),
        None => None,
    };
    // Bound under a temporary name; renamed into place once only its owner (and
    // group) can use it.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.new", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let prepared = (|| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
        if let Some(gid) = gid {
            nix::unistd::chown(&staging, None, Some(gid)).map_err(std::io::Error::from)?;
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))?;
        }
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        std::fs::rename(&staging, path)
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let path = path.to_path_buf();
    Ok(tokio::spawn(accept_loop(listener, path, requests, events, shutdown)))
}

async fn accept_loop(
    listener: UnixListener,
    path: PathBuf,
    requests: mpsc::Sender<ControlRequest>,
    events: EventSource,
    mut shutdown: watch::Receiver<bool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually out of file descriptors: pause instead of spinning.
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (_, mut w) = stream.into_split();
                let busy = Err(format!("too many control connections ({MAX_CONNECTIONS}); retry"));
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), write_reply(&mut w, busy)).await;
            });
            continue;
        }
        let (requests, active, events) = (requests.clone(), active.clone(), events.clone());
        tokio::spawn(async move {
            serve(stream, requests, events).await;
            active.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Parses one request line; errors are the reply text.
pub fn parse_request(line: &str) -> Result<Command, String> {
    let env: Envelope = serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    if env.v != PROTOCOL_VERSION {
        return Err(format!(
            "control protocol version {} not supported (this daemon speaks {PROTOCOL_VERSION})",
            env.v
        ));
    }
    serde_json::from_value(env.command).map_err(|e| format!("unknown or malformed command: {e}"))
}

async fn serve(stream: UnixStream, requests: mpsc::Sender<ControlRequest>, events: EventSource) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let read = tokio::time::timeout(IDLE_TIMEOUT, read_line_bounded(&mut reader, MAX_REQUEST_BYTES));
        let line = match read.await {
            Err(_elapsed) => {
                let _ = write_reply(&mut w, Err(format!("idle for {IDLE_TIMEOUT:?}; closing"))).await;
                return;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(why)) => {
                let _ = write_reply(&mut w, Err(why)).await;
                return;
            }
        };
        let reply = match parse_request(&line) {
            Err(why) => Err(why),
            Ok(Command::Events { now }) => {
                // The connection now belongs to the stream.
                let _ = stream_events(&mut reader, &mut w, events, now).await;
                return;
            }
            Ok(command) => {
                let (tx, rx) = oneshot::channel();
                if requests.send(ControlRequest { command, reply: tx }).await.is_err() {
                    Err("the daemon is shutting down".to_string())
                } else {
                    rx.await.unwrap_or_else(|_| Err("the daemon is shutting down".to_string()))
                }
            }
        };
        if write_reply(&mut w, reply).await.is_err() {
            return;
        }
    }
}

/// Reads one `\n`-terminated line of at most `max_bytes`; `None` at a clean EOF.
/// Memory use stays bounded however long the client's line is.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max_bytes: usize,
) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    loop {
        let chunk = r.fill_buf().await.map_err(|e| format!("unreadable request: {e}"))?;
        if chunk.is_empty() {
            return if line.is_empty() { Ok(None) } else { Err("request ended without a newline".into()) };
        }
        let (part, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], i + 1),
            None => (chunk, chunk.len()),
        };
        if line.len() + part.len() > max_bytes {
            return Err(format!("request longer than {max_bytes} bytes"));
        }
        line.extend_from_slice(part);
        let newline = done > part.len();
        r.consume(done);
        if newline {
            return String::from_utf8(line).map(Some).map_err(|_| "request is not UTF-8".into());
        }
    }
}

/// `events`: every object as it exists, then (unless `now`) each change until the
/// client hangs up or the daemon stops. One JSON object per line.
async fn stream_events(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    source: EventSource,
    now: bool,
) -> std::io::Result<()> {
    let (mut last, mut states) = source.feed.subscribe();
    let mut lines = crate::events::diff(None, &last, &source.names);
    lines.push(crate::events::exists_end());
    write_lines(w, &lines).await?;
    if now {
        return Ok(());
    }
    // Ends when the core task (the sender) is gone, or the client hangs up (anything
    // it sends now is ignored).
    let mut ignored = [0u8; 256];
    loop {
        let next = tokio::select! {
            next = states.next() => match next {
                Some(next) => next,
                None => return Ok(()),
            },
            n = tokio::io::AsyncReadExt::read(reader, &mut ignored) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        let lines = crate::events::diff(Some(&last), &next, &source.names);
        last = next;
        write_lines(w, &lines).await?;
    }
}

async fn write_lines(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &[serde_json::Value],
) -> std::io::Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    w.write_all(text.as_bytes()).await
}

async fn write_reply(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    reply: Result<serde_json::Value, String>,
) -> std::io::Result<()> {
    let body = match reply {
        Ok(value) => serde_json::json!({ "ok": true, "result": value }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let mut line = body.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_explain_why() {
        assert_eq!(parse_request(r#"{"v":1,"cmd":"status"}"#), Ok(Command::Status));
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"primary","force":true}"#),
            Ok(Command::Primary { force: true })
        );
        assert_eq!(parse_request(r#"{"v":1,"cmd":"secondary"}"#), Ok(Command::Secondary { force: false }));
        assert_eq!(parse_request(r#"{"v":1,"cmd":"detach-disk"}"#), Ok(Command::DetachDisk));
        assert_eq!(parse_request(r#"{"v":1,"cmd":"attach-disk"}"#), Ok(Command::AttachDisk));
        assert!(parse_request(r#"{"v":1,"cmd":"finish-forced-demotion"}"#).is_err(), "internal only");
        assert!(parse_request("garbage").unwrap_err().starts_with("malformed request"));
        assert!(parse_request(r#"{"v":2,"cmd":"status"}"#).unwrap_err().contains("version 2"));
        assert!(
            parse_request(r#"{"v":1,"cmd":"explode"}"#)
                .unwrap_err()
                .starts_with("unknown or malformed command")
        );
        assert!(parse_request(r#"{"v":1,"cmd":"primary","forse":true}"#).is_err(), "typos are not ignored");
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut ok = &b"{\"v\":1}\nrest"[..];
        assert_eq!(read_line_bounded(&mut ok, 100).await, Ok(Some("{\"v\":1}".to_string())));
        assert!(read_line_bounded(&mut ok, 100).await.unwrap_err().contains("without a newline"));
        let huge = vec![b'x'; 1 << 20];
        let mut r = &huge[..];
        assert!(read_line_bounded(&mut r, 1000).await.unwrap_err().contains("longer than 1000"));
        let mut empty = &b""[..];
        assert_eq!(read_line_bounded(&mut empty, 10).await, Ok(None));
    }

    /// A stream reports a state that lasted for one publication: the core publishes
    /// `Behind` and `SyncTarget` back to back (this test's single-threaded runtime
    /// cannot run the stream in between, as a busy node often does not), and the
    /// client still reads both changes, in order. Fails with a latest-state stream.
    #[tokio::test]
    async fn an_events_stream_reports_every_transition() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("blockd-control-events-{}", std::process::id()));
        let path = dir.join("r0.ctl");
        let initial = crate::events::EventSnapshot {
            role: "Secondary",
            disk: "UpToDate",
            connection: "Connected",
            peer_role: "Primary",
            replication: "Established",
            peer_disk: "UpToDate",
            ..Default::default()
        };
        let (publisher, feed) = crate::events::event_channel(initial);
        let names = Names { resource: "r0".into(), peer: "alpha".into() };
        let (requests, _keep) = mpsc::channel(1);
        let (_stop, shutdown) = watch::channel(false);
        let task =
            spawn(&path, None, requests, EventSource { feed, names }, shutdown).expect("control socket");
        let stream = tokio::net::UnixStream::connect(&path).await.expect("connect");
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"v\":1,\"cmd\":\"events\"}\n").await.expect("send");
        let mut lines = tokio::io::BufReader::new(r).lines();
        let mut next = async || -> serde_json::Value {
            let line = lines.next_line().await.expect("read").expect("a line");
            serde_json::from_str(&line).expect("JSON")
        };
        while next().await["object"] != "-" {}
        publisher.publish(crate::events::EventSnapshot {
            replication: "Behind",
            disk: "Outdated",
            ..initial
        });
        publisher.publish(crate::events::EventSnapshot {
            replication: "SyncTarget",
            disk: "Inconsistent",
            ..initial
        });
        let mut replication = Vec::new();
        let read_two = async {
            while replication.len() < 2 {
                let event = next().await;
                if event["object"] == "peer-device" {
                    replication.push(event["replication"].as_str().expect("replication").to_string());
                }
            }
        };
        let timed_out = tokio::time::timeout(std::time::Duration::from_secs(10), read_two).await.is_err();
        assert!(!timed_out, "the stream reported only {replication:?} within 10 s");
        assert_eq!(replication, ["Behind", "SyncTarget"]);
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
