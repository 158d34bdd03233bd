//! The state an event stream reports (`blockctl events`, in the spirit of `drbdsetup
//! events2`): a small copyable [`EventSnapshot`] the core task publishes whenever it
//! changed ([`EventPublisher`]), and [`diff`], which turns two snapshots into the
//! objects that changed.
//!
//! Like `events2`, a stream is a log of transitions, not a sampling of the latest
//! state: a state that lasted for one event of the core (`Behind` right before
//! `SyncTarget`, say) is still reported. Each published snapshot goes into a
//! bounded broadcast log ([`EVENT_LOG_CAPACITY`] snapshots of ~100 bytes) that
//! every stream reads in order; a stream that fell further behind than that (its
//! client does not read) skips to the current state, so a slow client costs the
//! core nothing. Publishing allocates nothing.
//!
//! Objects, as in DRBD: `resource` (role), `device` (disk state), `connection` (to
//! the peer: connection state, peer role), `peer-device` (replication state, peer
//! disk, resync progress). Each line is a JSON object:
//! `{"type":"exists"|"change","object":…,"resource":…,…fields}`; `--now` prints the
//! `exists` lines and a final `{"type":"exists","object":"-"}`.

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// Snapshots the transition log keeps for streams that have not read them yet.
pub const EVENT_LOG_CAPACITY: usize = 256;

/// The core task's side: publishes each new state to the latest-state watch and to
/// the transition log.
#[derive(Debug)]
pub struct EventPublisher {
    latest: watch::Sender<EventSnapshot>,
    log: broadcast::Sender<EventSnapshot>,
}

/// The control socket's side: where each `events` stream subscribes.
#[derive(Debug)]
pub struct EventFeed {
    latest: watch::Receiver<EventSnapshot>,
    log: broadcast::Receiver<EventSnapshot>,
}

impl Clone for EventFeed {
    fn clone(&self) -> Self {
        EventFeed { latest: self.latest.clone(), log: self.log.resubscribe() }
    }
}

/// A publisher starting at `initial`, and the feed its subscribers read.
pub fn event_channel(initial: EventSnapshot) -> (EventPublisher, EventFeed) {
    let (latest_tx, latest_rx) = watch::channel(initial);
    let (log_tx, log_rx) = broadcast::channel(EVENT_LOG_CAPACITY);
    (EventPublisher { latest: latest_tx, log: log_tx }, EventFeed { latest: latest_rx, log: log_rx })
}

impl EventPublisher {
    /// Records a new state (the caller publishes only changes).
    pub fn publish(&self, snapshot: EventSnapshot) {
        self.latest.send_replace(snapshot);
        // No stream listening is not an error.
        let _ = self.log.send(snapshot);
    }
}

impl EventFeed {
    /// The current state, and every state published after it, in order.
    pub fn subscribe(&self) -> (EventSnapshot, EventSubscription) {
        // Subscribed to the log first: a state published in between is then both
        // the current one and the log's first, and diffs to nothing the second time.
        let log = self.log.resubscribe();
        let current = *self.latest.borrow();
        (current, EventSubscription { latest: self.latest.clone(), log })
    }
}

/// One stream's place in the transition log.
#[derive(Debug)]
pub struct EventSubscription {
    latest: watch::Receiver<EventSnapshot>,
    log: broadcast::Receiver<EventSnapshot>,
}

impl EventSubscription {
    /// The next state, in publication order; after falling more than
    /// [`EVENT_LOG_CAPACITY`] behind, the current one. `None` once the publisher is
    /// gone.
    pub async fn next(&mut self) -> Option<EventSnapshot> {
        match self.log.recv().await {
            Ok(snapshot) => Some(snapshot),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Skipped states are lost to this stream; later ones follow in order.
                self.log = self.log.resubscribe();
                Some(*self.latest.borrow())
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

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

    /// A state that lasted for one publication is still in every stream, in order
    /// (with a latest-state watch alone, a stream reading after both publications
    /// saw only the last: `Behind` right before `SyncTarget` went unreported).
    #[tokio::test]
    async fn a_stream_sees_every_state_in_order() {
        let s = snap();
        let (publisher, feed) = event_channel(s);
        let (current, mut sub) = feed.subscribe();
        assert_eq!(current, s);
        let behind = EventSnapshot { replication: "Behind", peer_disk: "UpToDate", ..s };
        let target = EventSnapshot { replication: "SyncTarget", ..s };
        publisher.publish(behind);
        publisher.publish(target);
        assert_eq!(sub.next().await, Some(behind));
        assert_eq!(sub.next().await, Some(target));
        drop(publisher);
        assert_eq!(sub.next().await, None, "the stream ends with the publisher");
    }

    /// A stream that does not keep up skips to the current state; it never holds
    /// more than the log's capacity, and continues in order afterwards.
    #[tokio::test]
    async fn a_stream_far_behind_skips_to_the_current_state() {
        let (publisher, feed) = event_channel(snap());
        let (_, mut sub) = feed.subscribe();
        let at = |n: u64| EventSnapshot { out_of_sync_bytes: n, ..snap() };
        for n in 1..=(EVENT_LOG_CAPACITY as u64 + 10) {
            publisher.publish(at(n));
        }
        let last = EVENT_LOG_CAPACITY as u64 + 10;
        assert_eq!(sub.next().await, Some(at(last)), "the current state after the skip");
        publisher.publish(at(last + 1));
        assert_eq!(sub.next().await, Some(at(last + 1)));
    }
}
