//! The control socket of a standalone export (a config with a single node), so that
//! `blockctl up`, `down`, `status` (one resource or all of them) and `events` work
//! for it as for a replicated node, and `blockd@.service` is ready when it answers.
//!
//! A standalone export is always Primary with an UpToDate disk and has no peer:
//! `status` says so (`"peers": []`, `"standalone": true`), `down` stops the daemon,
//! `events` streams that one state; every other verb is refused with the reason.

use tokio::sync::{mpsc, watch};

use crate::config::NodeConfig;
use crate::control::{self, Command, EventSource};
use crate::events::{EventSnapshot, Names, event_channel};

/// Serves the node's control socket until `stop` is raised; `down` raises it.
pub fn spawn_control(
    resource: &str,
    node: &NodeConfig,
    stop: &watch::Sender<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (requests_tx, mut requests) = mpsc::channel(16);
    let state = EventSnapshot {
        role: "Primary",
        disk: "UpToDate",
        connection: "StandAlone",
        peer_role: "Unknown",
        replication: "Off",
        peer_disk: "DUnknown",
        ..EventSnapshot::default()
    };
    let (publisher, feed) = event_channel(state);
    let events = EventSource { feed, names: Names { resource: resource.to_string(), peer: String::new() } };
    let accept =
        control::spawn(&node.control, node.control_group.as_deref(), requests_tx, events, stop.subscribe())?;
    let status = serde_json::json!({
        "resource": resource,
        "pid": std::process::id(),
        "node": node.name,
        "role": "Primary",
        "disk": "UpToDate",
        "standalone": true,
        "peers": [],
    });
    let stop = stop.clone();
    Ok(tokio::spawn(async move {
        // Ends when the accept loop (the last sender's owner) is gone.
        while let Some(req) = requests.recv().await {
            let reply = match req.command {
                Command::Status => Ok(status.clone()),
                Command::Down => {
                    stop.send_replace(true);
                    Ok(serde_json::json!({}))
                }
                other => Err(format!(
                    "a standalone export (one node in the config) is always Primary and has no peer: \
                     {} does not apply",
                    verb(&other)
                )),
            };
            let _ = req.reply.send(reply);
        }
        drop(publisher);
        let _ = accept.await;
    }))
}

/// The verb's name as the operator typed it.
fn verb(command: &Command) -> String {
    serde_json::to_value(command)
        .ok()
        .and_then(|v| v.get("cmd").and_then(|c| c.as_str()).map(str::to_string))
        .unwrap_or_else(|| "this verb".to_string())
}
