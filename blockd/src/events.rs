//! The state an event stream reports (`blockctl events`, in the spirit of `drbdsetup
//! events2`): a small copyable [`EventSnapshot`] the core task publishes after every
//! event it handles (a `watch`: only a change wakes subscribers, and publishing
//! allocates nothing), and [`diff`], which turns two snapshots into the objects that
//! changed.
//!
//! Objects, as in DRBD: `resource` (role), `device` (disk state), `connection` (to
//! the peer: connection state, peer role), `peer-device` (replication state, peer
//! disk, resync progress). Each line is a JSON object:
//! `{"type":"exists"|"change","object":…,"resource":…,…fields}`; `--now` prints the
//! `exists` lines and a final `{"type":"exists","object":"-"}`.

use serde_json::{Value, json};

/// Resync progress is reported in steps of this many per mille (0.1%).
const PROGRESS_STEP_PER_MILLE: u64 = 1;

/// What the event stream reports, as of the last event the core handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSnapshot {
    pub role: &'static str,
    pub disk: &'static str,
    pub connection: &'static str,
    pub peer_role: &'static str,
    pub replication: &'static str,
    pub peer_disk: &'static str,
    pub out_of_sync_bytes: u64,
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
}

impl EventSnapshot {
    /// Resync progress in per mille, while a resync with a known total runs.
    fn done_per_mille(&self) -> Option<u64> {
        (self.resync_total_bytes > 0)
            .then(|| (self.resync_done_bytes * 1000 / self.resync_total_bytes) / PROGRESS_STEP_PER_MILLE)
    }
}

/// Names the objects carry.
#[derive(Clone, Debug)]
pub struct Names {
    pub resource: String,
    pub peer: String,
}

/// The objects of `new` that differ from `old` (all of them when `old` is `None`),
/// typed `exists` or `change`.
pub fn diff(old: Option<&EventSnapshot>, new: &EventSnapshot, names: &Names) -> Vec<Value> {
    let kind = if old.is_some() { "change" } else { "exists" };
    let mut out = Vec::new();
    let changed = |f: &dyn Fn(&EventSnapshot) -> Vec<Value>| old.is_none_or(|o| f(o) != f(new));
    let resource = |s: &EventSnapshot| vec![json!(s.role)];
    if changed(&resource) {
        out.push(json!({"type": kind, "object": "resource", "resource": names.resource, "role": new.role}));
    }
    let device = |s: &EventSnapshot| vec![json!(s.disk)];
    if changed(&device) {
        out.push(json!({"type": kind, "object": "device", "resource": names.resource, "disk": new.disk}));
    }
    let connection = |s: &EventSnapshot| vec![json!(s.connection), json!(s.peer_role)];
    if changed(&connection) {
        out.push(json!({
            "type": kind, "object": "connection", "resource": names.resource, "peer": names.peer,
            "connection": new.connection, "peer_role": new.peer_role,
        }));
    }
    let peer_device = |s: &EventSnapshot| {
        vec![
            json!(s.replication),
            json!(s.peer_disk),
            json!(s.out_of_sync_bytes == 0),
            json!(s.done_per_mille()),
        ]
    };
    if changed(&peer_device) {
        let mut o = json!({
            "type": kind, "object": "peer-device", "resource": names.resource, "peer": names.peer,
            "replication": new.replication, "peer_disk": new.peer_disk,
            "out_of_sync_bytes": new.out_of_sync_bytes,
        });
        if let Some(per_mille) = new.done_per_mille() {
            o["done_percent"] = json!(per_mille as f64 / 10.0);
            o["resync_done_bytes"] = json!(new.resync_done_bytes);
            o["resync_total_bytes"] = json!(new.resync_total_bytes);
        }
        out.push(o);
    }
    out
}

/// The end of the `exists` block.
pub fn exists_end() -> Value {
    json!({"type": "exists", "object": "-"})
}

/// One event as a `drbdsetup events2`-like text line.
pub fn human_line(event: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let kind = text(&event["type"]);
    let object = text(&event["object"]);
    if object == "-" {
        return format!("{kind} -");
    }
    let mut line = format!("{kind} {object}");
    if let Some(map) = event.as_object() {
        for (k, v) in map {
            if k != "type" && k != "object" {
                line.push_str(&format!(" {}:{}", k.replace('_', "-"), text(v)));
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names { resource: "r0".into(), peer: "beta".into() }
    }

    fn snap() -> EventSnapshot {
        EventSnapshot {
            role: "Primary",
            disk: "UpToDate",
            connection: "Connected",
            peer_role: "Secondary",
            replication: "Established",
            peer_disk: "UpToDate",
            ..EventSnapshot::default()
        }
    }

    #[test]
    fn exists_lists_every_object_and_change_only_what_changed() {
        let s = snap();
        let all = diff(None, &s, &names());
        let objects: Vec<&str> = all.iter().map(|o| o["object"].as_str().unwrap()).collect();
        assert_eq!(objects, ["resource", "device", "connection", "peer-device"]);
        assert!(all.iter().all(|o| o["type"] == "exists"));
        assert!(diff(Some(&s), &s, &names()).is_empty());
        let demoted = EventSnapshot { role: "Secondary", ..s };
        let d = diff(Some(&s), &demoted, &names());
        assert_eq!(
            d,
            vec![json!({"type": "change", "object": "resource", "resource": "r0", "role": "Secondary"})]
        );
    }

    #[test]
    fn resync_progress_is_reported_in_tenths_of_a_percent() {
        let s = EventSnapshot {
            replication: "SyncSource",
            out_of_sync_bytes: 1000,
            resync_total_bytes: 1_000_000,
            ..snap()
        };
        let a = EventSnapshot { resync_done_bytes: 100, ..s };
        assert!(diff(Some(&s), &a, &names()).is_empty(), "below a tenth of a percent");
        let b = EventSnapshot { resync_done_bytes: 250_000, ..s };
        let d = diff(Some(&s), &b, &names());
        assert_eq!(d[0]["done_percent"], json!(25.0));
        assert_eq!(
            human_line(&d[0]),
            "change peer-device done-percent:25.0 out-of-sync-bytes:1000 peer:beta peer-disk:UpToDate \
             replication:SyncSource resource:r0 resync-done-bytes:250000 resync-total-bytes:1000000"
        );
    }
}
