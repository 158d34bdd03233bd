//! Link cut during writes: each node runs in its own network namespace, the
//! replication link is a veth pair between them, and the test sets one end down
//! under load. The Primary keeps serving (writes are acknowledged once the
//! keepalive declared the peer lost) and tracks what the peer missed; when the
//! link comes back the nodes reconnect by themselves, resync, and both copies
//! are equal afterwards.

use std::time::Duration;

use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked};
use blockd_tests::netns::{ADDRS, NetnsPair};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::pattern::{nbd_reader, random_seed};
use blockd_tests::*;

/// Bound on every wait: peer loss (5 s keepalive), reconnect (backoff ≤ 5 s
/// + jitter), resync, load milestones.
const WAIT: Duration = Duration::from_secs(90);
const BLOCK: u32 = 4096;
/// The replication port inside each namespace.
const PORT: u16 = 7789;
const CONNECTIONS: usize = 2;

fn peer(p: &Pair, n: usize) -> serde_json::Value {
    p.status(n)["peers"][0].clone()
}

fn alpha_log(p: &Pair) -> String {
    p.nodes[0].daemon.as_ref().expect("alpha runs").log()
}

fn link_cut_during_writes(protocol: char) {
    // Declared first: dropped last, after the nodes inside it were killed.
    let net = NetnsPair::create(&format!("linkcut{protocol}"));
    let opts = PairOpts {
        protocol,
        replication: Some(ADDRS.map(|a| format!("{a}:{PORT}"))),
        prefix: [net.exec_prefix(0), net.exec_prefix(1)],
        ..PairOpts::default()
    };
    let mut p = Pair::start(&format!("linkcut-{protocol}"), &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let size: u64 = tool("nbdinfo", ["--size", &p.uri(0)]).stdout.trim().parse().expect("size");

    let alpha = Addr::Unix(p.nodes[0].nbd.clone());
    let load_opts = LoadOpts {
        connections: CONNECTIONS,
        region_bytes: 16 * MIB,
        seed: random_seed(),
        ..LoadOpts::default()
    };
    let load = LoadGen::start(&alpha, EXPORT, load_opts);
    load.wait_acked(1000, WAIT);
    assert!(p.status(0)["peers"][0]["replicated_bytes"].as_u64().unwrap_or(0) > 0, "writes are replicated");

    // Cut the link under load (alpha's end of the veth pair).
    let log_from = alpha_log(&p).len();
    net.set_link(0, false);
    let cut_at = load.acked();
    p.wait(WAIT, |p| peer(p, 0)["connection"] != "Connected", "alpha declares the peer lost");
    p.wait(WAIT, |p| peer(p, 1)["connection"] != "Connected", "beta declares the peer lost");
    // The Primary keeps serving without its peer, and keeps trying to reach it
    // (the link is down, so each attempt fails: the outage outlasts several).
    let lost_at = load.acked();
    load.wait_acked(lost_at + 1000, WAIT);
    p.wait(
        WAIT,
        |p| alpha_log(p).get(log_from..).unwrap_or("").matches("connecting failed").count() >= 3,
        "alpha's reconnect attempts fail while the link is down",
    );
    assert_eq!(load.running(), CONNECTIONS, "every writer is still connected to the Primary");
    let s = p.status(0);
    assert_eq!((s["role"].as_str(), s["disk"].as_str()), (Some("Primary"), Some("UpToDate")), "{s}");
    assert_ne!(s["peers"][0]["replication"], "Established", "{s}");
    let dirty = s["peers"][0]["out_of_sync_bytes"].as_u64().expect("out_of_sync_bytes");
    assert!(dirty > 0, "the Primary tracks what the peer missed: {s}");
    eprintln!(
        "cut after {cut_at} acknowledged writes; peer lost after {lost_at}; {} now, {dirty} bytes out of sync",
        load.acked()
    );

    // Restore the link: the nodes find each other again and resync, under load.
    net.set_link(0, true);
    p.wait(
        WAIT,
        |p| {
            (0..2).all(|n| {
                let s = p.status(n);
                s["peers"][0]["replication"] == "Established" && s["disk"] == "UpToDate"
            })
        },
        "both nodes Established and UpToDate again",
    );
    assert_eq!(peer(&p, 0)["out_of_sync_bytes"], 0, "nothing left out of sync");
    let before = load.acked();
    load.wait_acked(before + 500, WAIT);
    load.stop();
    let log = load.finish();
    eprintln!("{}", log.summary());
    assert_eq!(log.connections_died(), 0, "no writer lost its connection: {}", log.summary());
    assert_eq!(log.error_count(), 0, "no write failed: {}", log.summary());
    let stats = verify_acked(&log, nbd_reader(&alpha, EXPORT, BLOCK))
        .unwrap_or_else(|e| panic!("acknowledged writes lost on the Primary: {e}\n{}", log.summary()));
    eprintln!("verified on alpha: {stats:?}");

    p.stop_node(0);
    p.stop_node(1);
    let (a, b) = (p.disk_bytes(0, size), p.disk_bytes(1, size));
    assert_eq!(a.len() as u64, size);
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first, None, "the copies differ after the resync (first difference at byte {first:?})");
}

#[test]
fn protocol_c_link_cut_during_writes_resyncs() {
    link_cut_during_writes('C');
}

#[test]
fn protocol_a_link_cut_during_writes_resyncs() {
    link_cut_during_writes('A');
}
