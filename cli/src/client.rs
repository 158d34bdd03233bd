//! What the verbs do: control-socket requests, starting and stopping the daemon,
//! creating metadata, formatting status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockd::config::{Config, NodeConfig};
use blockd::meta::{CreateOptions, MetaStore, MetaTarget};
use serde_json::Value;

use crate::{Fail, refused, usage};

/// How long `up` waits for the daemon to answer, and `down` for it to go.
const DAEMON_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the daemon (a poll with a deadline, not a sleep
/// standing in for synchronization).
const POLL: Duration = Duration::from_millis(50);
/// How long one control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a long job (`verify` of a large device) may take.
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Sends one request to the node's control socket; returns the `result` object, or
/// the daemon's refusal as exit code 1.
pub fn request(node: &NodeConfig, body: &Value) -> Result<Value, Fail> {
    request_within(node, body, REQUEST_TIMEOUT)
}

/// [`request`] for a verb whose answer comes when a long job ends (`verify`): no
/// deadline beyond the daemon's own.
pub fn request_long(node: &NodeConfig, body: &Value) -> Result<Value, Fail> {
    request_within(node, body, LONG_REQUEST_TIMEOUT)
}

fn request_within(node: &NodeConfig, body: &Value, timeout: Duration) -> Result<Value, Fail> {
    let mut req = body.clone();
    req["v"] = Value::from(blockd::control::PROTOCOL_VERSION);
    let reply = exchange(&node.control, &req, timeout).map_err(|e| {
        refused(format!(
            "node {} is not running (control socket {}: {e}); start it with `blockctl up`",
            node.name,
            node.control.display()
        ))
    })?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply["result"].clone())
    } else {
        Err(refused(reply["error"].as_str().unwrap_or("the daemon refused without a reason")))
    }
}

/// `status` of a node that may be stopped: `Ok(None)` when nothing listens on its
/// control socket (absent, or refusing connections); `Err` when something does but
/// the status does not come.
pub fn try_status(node: &NodeConfig) -> Result<Option<Value>, String> {
    let req = serde_json::json!({"v": blockd::control::PROTOCOL_VERSION, "cmd": "status"});
    match exchange(&node.control, &req, REQUEST_TIMEOUT) {
        Ok(reply) if reply["ok"] == Value::Bool(true) => Ok(Some(reply["result"].clone())),
        Ok(reply) => {
            Err(reply["error"].as_str().unwrap_or("the daemon refused without a reason").to_string())
        }
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("control socket {}: {e}", node.control.display())),
    }
}

fn exchange(socket: &Path, req: &Value, timeout: Duration) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub fn create_md(config: &Config, node: &NodeConfig, force: bool, clear_bitmap: bool) -> Result<(), Fail> {
    // Checked before MetaStore::create, which creates an external metadata file
    // before it knows whether the disk fits.
    config.check_local(node).map_err(usage)?;
    let target = MetaTarget { backing: node.disk.clone(), location: node.meta.clone() };
    let opts = CreateOptions {
        resource: config.resource.name.clone(),
        node: node.name.clone(),
        granularity_bytes: config.resource.bitmap_granularity_bytes,
        force,
        clear_bitmap,
        size_bytes: config.resource.size_bytes,
    };
    let sb = MetaStore::create(&target, &opts).map_err(refused)?;
    println!(
        "created metadata for {} on node {}: data size {} bytes, disk {}",
        config.resource.name, node.name, sb.data_size_bytes, sb.disk
    );
    Ok(())
}

/// `dump-md`: the metadata of a stopped node, one `key: value` per line.
pub fn dump_md(node: &NodeConfig) -> Result<(), Fail> {
    let target = MetaTarget { backing: node.disk.clone(), location: node.meta.clone() };
    let meta = MetaStore::open(&target).map_err(refused)?;
    print!("{}", meta.dump());
    Ok(())
}

/// The `blockd` binary: `$BLOCKD_BIN`, else next to this `blockctl`, else `blockd` on PATH.
fn blockd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BLOCKD_BIN") {
        return PathBuf::from(p);
    }
    let sibling = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("blockd")));
    sibling.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("blockd"))
}

pub fn up(config: &Config, node: &NodeConfig, log: Option<PathBuf>) -> Result<(), Fail> {
    // A config mistake is reported here as a usage error, not as "blockd exited
    // with 2" and a log tail.
    config.check_local(node).map_err(usage)?;
    if exchange(&node.control, &serde_json::json!({"v": 1, "cmd": "status"}), REQUEST_TIMEOUT).is_ok() {
        return Err(refused(format!("node {} is already running", node.name)));
    }
    let log = log.unwrap_or_else(|| {
        PathBuf::from(format!("/var/log/blockd/{}-{}.log", config.resource.name, node.name))
    });
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| refused(format!("cannot create {}: {e}", dir.display())))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| refused(format!("cannot open log {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| refused(format!("log {}: {e}", log.display())))?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(blockd_binary())
            .arg("run")
            .arg("--config")
            .arg(&config.path)
            .arg("--node")
            .arg(&node.name)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // A blockd started here is not a systemd service's main process, even
            // when `up` runs inside one (e.g. under Pacemaker): it must not send
            // that service's readiness or watchdog notifications.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            // Its own session: it outlives this command and its terminal.
            .process_group(0)
            .spawn()
            .map_err(|e| refused(format!("cannot start blockd: {e}")))?
    };
    let deadline = Instant::now() + DAEMON_DEADLINE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(refused(format!(
                "blockd exited with {status} before answering; last log lines ({}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        if exchange(&node.control, &serde_json::json!({"v": 1, "cmd": "status"}), REQUEST_TIMEOUT).is_ok() {
            println!("node {} up (pid {}, log {})", node.name, child.id(), log.display());
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    Err(refused(format!("blockd did not answer within {DAEMON_DEADLINE:?}; see {}", log.display())))
}

pub fn down(node: &NodeConfig) -> Result<(), Fail> {
    let status = request(node, &serde_json::json!({"cmd": "status"}))?;
    let pid = status["pid"].as_u64().unwrap_or(0);
    request(node, &serde_json::json!({"cmd": "down"}))?;
    // Done when the process is gone: it flushes and records a clean shutdown after
    // its control socket closes.
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + DAEMON_DEADLINE;
    while Instant::now() < deadline {
        let alive =
            pid != 0 && std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| !s.contains(") Z "));
        if !alive && !node.control.exists() {
            println!("node {} down", node.name);
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    Err(refused(format!("node {} did not stop within {DAEMON_DEADLINE:?}", node.name)))
}

/// `events`: prints each state object the daemon streams (text lines like
/// `drbdsetup events2`, or the JSON objects), until the daemon or the user ends it.
pub fn events(node: &NodeConfig, json: bool, now: bool) -> Result<(), Fail> {
    let not_running = |e: std::io::Error| {
        refused(format!("node {} is not running (control socket {}: {e})", node.name, node.control.display()))
    };
    let mut s = UnixStream::connect(&node.control).map_err(not_running)?;
    let req = serde_json::json!({"v": blockd::control::PROTOCOL_VERSION, "cmd": "events", "now": now});
    s.write_all(format!("{req}\n").as_bytes()).map_err(not_running)?;
    let stdout = std::io::stdout();
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| refused(format!("reading events: {e}")))?;
        let event: Value =
            serde_json::from_str(&line).map_err(|e| refused(format!("bad event line {line:?}: {e}")))?;
        if event["ok"] == Value::Bool(false) {
            return Err(refused(event["error"].as_str().unwrap_or("the daemon refused")));
        }
        let text = if json { line } else { blockd::events::human_line(&event) };
        let mut out = stdout.lock();
        // A closed stdout (`| head`) ends the stream quietly.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `[#####...............]`: 20 cells.
fn progress_bar(done: u64, total: u64) -> String {
    let filled = (done.min(total) * 20 / total.max(1)) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(20 - filled))
}

/// `drbdadm status`-like text; `verbose` adds counters.
pub fn human_status(s: &Value, verbose: bool) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut out =
        format!("{} role:{}\n  disk:{}\n", text(&s["resource"]), text(&s["role"]), text(&s["disk"]));
    for p in s["peers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} connection:{} role:{}\n    replication:{} peer-disk:{} out-of-sync:{} bytes\n",
            text(&p["node"]),
            text(&p["connection"]),
            text(&p["role"]),
            text(&p["replication"]),
            text(&p["disk"]),
            p["out_of_sync_bytes"].as_u64().unwrap_or(0)
        ));
        let num = |k: &str| p[k].as_u64().unwrap_or(0);
        let replication = p["replication"].as_str().unwrap_or("");
        if replication.contains("Sync") {
            // DRBD shows `done:NN.NN`; bytes and a rate help more with a bitmap resync.
            let (done, total) = (num("resync_done_bytes"), num("resync_total_bytes"));
            let rate_kib = num("resync_rate_bytes_per_sec") / 1024;
            if total > 0 {
                let percent = done as f64 * 100.0 / total as f64;
                let eta = p["resync_eta_secs"].as_u64().map_or("-".to_string(), |s| format!("{s}s"));
                out.push_str(&format!(
                    "    resync: {} {done}/{total} bytes ({percent:.1}%) rate:{rate_kib} KiB/s eta:{eta}\n",
                    progress_bar(done, total)
                ));
            } else {
                // Before the source's first progress report.
                out.push_str(&format!("    resync: received {done} bytes rate:{rate_kib} KiB/s\n"));
            }
        }
        if replication.contains("SyncT") {
            // The catching-up target's fallback (issue 15): an older consistent
            // image `primary --force` rolls back to if the source is lost.
            let fallback = match (s["fallback_image"].as_bool(), s["fallback_lost"].as_str()) {
                (Some(true), _) => format!(
                    "consistent image from before the resync kept ({} bytes saved)",
                    s["undo_journal"]["preserved_bytes"].as_u64().unwrap_or(0)
                ),
                (_, Some(why)) => format!("none ({why})"),
                _ => "none (the disk was not consistent when the resync began)".to_string(),
            };
            out.push_str(&format!("    fallback: {fallback}\n"));
        }
        if p["verify_running"].as_bool() == Some(true) || num("verify_done_bytes") > 0 {
            let state = if p["verify_running"].as_bool() == Some(true) { "running" } else { "done" };
            out.push_str(&format!(
                "    verify: {state} {}/{} bytes, out-of-sync:{} bytes\n",
                num("verify_done_bytes"),
                num("verify_total_bytes"),
                num("verify_out_of_sync_bytes")
            ));
        }
        if let Some(reason) = p["reason"].as_str() {
            out.push_str(&format!("    reason: {reason}\n"));
        }
        if verbose {
            out.push_str(&format!(
                "    replicated:{} bytes resync-sent:{} bytes unsent:{} bytes\n",
                num("replicated_bytes"),
                num("resync_sent_bytes"),
                s["unsent_bytes"].as_u64().unwrap_or(0)
            ));
            out.push_str(&format!(
                "    wire-sent:{} bytes (uncompressed {} bytes) compression:{}\n",
                num("sent_wire_bytes"),
                num("sent_uncompressed_bytes"),
                p["compression"].as_str().unwrap_or("off")
            ));
        }
    }
    if verbose {
        out.push_str(&format!(
            "  activity-log: {} hot extents, {} transactions\n  generations: current {} bitmap {}\n",
            s["al_hot_extents"].as_u64().unwrap_or(0),
            s["al_transactions"].as_u64().unwrap_or(0),
            text(&s["generations"]["current"]),
            text(&s["generations"]["bitmap"]),
        ));
    }
    out
}
