//! Issue 12, with real processes: state changes agreed with the peer, and the link's
//! life cycle under a verifying writer.
//!
//! * `primary` on both connected nodes at the same moment, 30 tries in a row (every
//!   other one over a link with 10 ms latency, so that both requests cross): never
//!   two Primaries while connected, checked on samples of both nodes' status taken
//!   through their control sockets while the commands run, and again once both
//!   settled; the loser is refused (exit code 1, a reason on stderr).
//! * The replication link flapped from either side (a silent partition, or a
//!   reset), often in the middle of the resync the previous flap caused, under a
//!   protocol C writer that records every acknowledged write, the Secondary on a
//!   slow disk (nbdkit's delay filter behind nbdfuse): afterwards the pair is in
//!   sync, every acknowledged write reads back from the Primary and is on the
//!   Secondary's disk, online `verify` finds nothing, and the two backing files are
//!   identical.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockd_tests::faultdisk::FaultOpts;
use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked};
use blockd_tests::netns::{ADDRS, NetnsPair};
use blockd_tests::pair::{DiskSpec, NODES, Pair, PairOpts};
use blockd_tests::pattern::{file_reader, nbd_reader, random_seed, splitmix64};
use blockd_tests::proxy::Proxy;
use blockd_tests::scatter::assert_data_equal;
use blockd_tests::tools::Output;
use blockd_tests::*;
use serde_json::Value;

/// Bound on every wait for a state (settling, reconnecting after a keepalive
/// timeout and the dialer's backoff, resync).
const WAIT: Duration = Duration::from_secs(60);
const BLOCK: u32 = 4096;

// ---------------------------------------------------------------------------
// 1. Simultaneous promotion.

const TRIES: usize = 30;
/// Pace of the sampler while the commands run (it only paces; nothing waits on it).
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// Bound on one try's samples; the sampler ends as soon as both commands returned.
const MAX_SAMPLES: usize = 20_000;
/// The link's latency each way (a delaying proxy in alpha's connection to beta),
/// by try: none, so a command that starts a little later finds the other's change
/// under way or done; and enough that both requests are usually in flight at once,
/// crossing (the case the lower transaction id decides).
const LATENCIES: [Duration; 2] = [Duration::ZERO, Duration::from_millis(10)];

/// Both nodes' status, read one right after the other; None if either does not
/// answer.
fn both(p: &Pair) -> Option<[Value; 2]> {
    Some([p.socket_status(0)?, p.socket_status(1)?])
}

fn brief(s: &Value) -> String {
    let peer = &s["peers"][0];
    format!(
        "{} {} {} connection:{} replication:{} peer-role:{}",
        s["node"], s["role"], s["disk"], peer["connection"], peer["replication"], peer["role"]
    )
}

/// Both report the link up and both are Primary.
fn two_connected_primaries(s: &[Value; 2]) -> bool {
    s.iter().all(|s| s["role"] == "Primary" && s["peers"][0]["connection"] == "Connected")
}

/// Each node is replicating and sees the other's role as it is: no state change
/// is half done (a commit not yet seen by the voter).
fn settled(s: &[Value; 2]) -> bool {
    (0..2).all(|n| {
        let peer = &s[n]["peers"][0];
        peer["connection"] == "Connected"
            && peer["replication"] == "Established"
            && peer["role"] == s[1 - n]["role"]
    })
}

/// What the sampler saw during one try.
#[derive(Default)]
struct Sampled {
    samples: usize,
    with_a_primary: usize,
    unanswered: usize,
    /// Every sample with two Primaries while both said Connected.
    violations: Vec<String>,
}

/// Samples both nodes until `done` (bounded by [`MAX_SAMPLES`]).
fn sample_until(p: &Pair, done: &AtomicBool) -> Sampled {
    let start = Instant::now();
    let mut r = Sampled::default();
    while !done.load(Ordering::SeqCst) && r.samples + r.unanswered < MAX_SAMPLES {
        match both(p) {
            Some(s) => {
                r.samples += 1;
                if s.iter().any(|s| s["role"] == "Primary") {
                    r.with_a_primary += 1;
                }
                if two_connected_primaries(&s) {
                    r.violations.push(format!("{:?}: {} | {}", start.elapsed(), brief(&s[0]), brief(&s[1])));
                }
            }
            None => r.unanswered += 1,
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    r
}

/// Runs `blockctl primary` on both nodes at once (two threads released by one
/// barrier) while a third samples both nodes' status.
fn promote_both(p: &Pair) -> ([Output; 2], Sampled) {
    let done = AtomicBool::new(false);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_until(p, &done));
        let commands = [0, 1].map(|n| {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                p.ctl(n, &["primary"])
            })
        });
        let outs = commands.map(|c| c.join().expect("a `primary` thread panicked"));
        done.store(true, Ordering::SeqCst);
        (outs, sampler.join().expect("the sampler panicked"))
    })
}

/// Polls until both nodes answer and [`settled`]; returns their status.
fn wait_settled(p: &mut Pair, what: &str) -> [Value; 2] {
    let mut last = None;
    p.wait(
        WAIT,
        |p| {
            last = both(p).filter(settled);
            last.is_some()
        },
        what,
    );
    last.expect("settled")
}

#[test]
fn simultaneous_primary_never_makes_two_primaries() {
    let opts = PairOpts { disk_bytes: 16 * MIB, ..PairOpts::default() };
    let mut p = Pair::create("sc-promote", &opts);
    let beta: std::net::SocketAddr = p.nodes[1].replication.parse().expect("beta's address");
    let proxy = Proxy::ephemeral(beta);
    p.dial_peer_at(0, &proxy.addr().to_string());
    p.start_node(0);
    p.start_node(1);
    p.wait_synced(WAIT);
    let mut won = [0usize; 2];
    let mut both_refused = 0;
    let mut refusals: BTreeMap<(Duration, String), usize> = BTreeMap::new();
    let (mut samples, mut with_a_primary) = (0, 0);
    for t in 1..=TRIES {
        let latency = LATENCIES[t % LATENCIES.len()];
        proxy.set_delay(latency);
        let (outs, sampled) = promote_both(&p);
        let s = wait_settled(&mut p, &format!("try {t}: both nodes settled after the promotions"));
        let report = || {
            let mut r = format!("try {t} of {TRIES} (link latency {latency:?} each way)\n");
            for n in 0..2 {
                r.push_str(&format!("--- {} now: {}\n{}", NODES[n], brief(&s[n]), outs[n].describe()));
            }
            r
        };
        assert!(
            sampled.violations.is_empty(),
            "two Primaries while connected, seen in {} of {} samples:\n{}\n{}",
            sampled.violations.len(),
            sampled.samples,
            sampled.violations.join("\n"),
            report()
        );
        assert!(!two_connected_primaries(&s), "two Primaries after settling\n{}", report());
        for n in 0..2 {
            let primary = s[n]["role"] == "Primary";
            match outs[n].status.code() {
                Some(0) => assert!(primary, "`primary` succeeded but the node is not Primary\n{}", report()),
                Some(1) => {
                    assert!(!primary, "`primary` was refused but the node is Primary\n{}", report());
                    let why = outs[n].stderr.trim();
                    assert!(!why.is_empty(), "a refusal without a reason\n{}", report());
                    let why = why.lines().next().unwrap_or(why).to_string();
                    *refusals.entry((latency, why)).or_default() += 1;
                }
                _ => panic!("`primary` exit code: want 0 (done) or 1 (refused)\n{}", report()),
            }
        }
        let winner = (0..2).find(|&n| s[n]["role"] == "Primary");
        match winner {
            Some(w) => won[w] += 1,
            None => both_refused += 1,
        }
        eprintln!(
            "try {t} (latency {latency:?}): {}; {} samples ({} with a Primary, {} unanswered)",
            (0..2)
                .map(|n| format!("{} exit {:?}", NODES[n], outs[n].status.code()))
                .collect::<Vec<_>>()
                .join(", "),
            sampled.samples,
            sampled.with_a_primary,
            sampled.unanswered
        );
        samples += sampled.samples;
        with_a_primary += sampled.with_a_primary;
        if let Some(w) = winner {
            p.ctl_ok(w, &["secondary"]);
        }
        let demoted =
            |p: &mut Pair| both(p).is_some_and(|s| settled(&s) && s.iter().all(|s| s["role"] == "Secondary"));
        p.wait(WAIT, demoted, &format!("try {t}: both Secondary and replicating again"));
    }
    eprintln!(
        "{TRIES} tries: alpha won {}, beta won {}, both refused {both_refused}; {samples} samples \
         ({with_a_primary} with a Primary), none with two Primaries while connected",
        won[0], won[1]
    );
    for ((latency, why), count) in &refusals {
        eprintln!("  latency {latency:?}: refused {count}x: {why}");
    }
    p.stop_node(0);
    p.stop_node(1);
}

// ---------------------------------------------------------------------------
// 2. Link flaps under a verifying writer.

/// The replication port inside each namespace.
const PORT: u16 = 7789;
/// Every write to the Secondary's disk takes this much longer (as in the report
/// that found stale completions across reconnects).
const SECONDARY_WRITE_DELAY_MS: u32 = 5;
/// Flaps come in pairs of one kind, cut first from alpha's side, then from beta's.
const FLAP_KINDS: [Cut; 5] = [Cut::Partition, Cut::Partition, Cut::Reset, Cut::Reset, Cut::Reset];
/// Slow enough that a resync of the writer's region lasts a while (about two
/// seconds): a window for the flaps that cut in the middle of one.
const RESYNC_RATE: &str = "4MiB";
/// The writer's rate cap: while the link is down the Primary answers as fast as
/// its own disk, and the run must stay within the writer's log (`max_ops`).
const WRITES_PER_SEC: u64 = 3000;
/// What the daemons log when a link goes, and when a new one is replicating.
const LINK_LOST: &str = "peer link lost";
const LINK_UP: &str = "connected to the peer";

#[derive(Clone, Copy, Debug)]
enum Cut {
    /// The side's veth end down until both nodes' keepalive declared the peer lost,
    /// then up again: a silent partition.
    Partition,
    /// The side aborts the connection (`ss -K`): it fails at once there, the other
    /// side gets a RST.
    Reset,
}

/// When a flap cuts, once the previous link is replicating again.
#[derive(Clone, Copy, Debug)]
enum When {
    /// After this many more acknowledged writes.
    Writes(u64),
    /// Once beta, the sync target, has received part of the resync (or, should it
    /// be over first, once it is in sync).
    MidResync,
}

#[derive(Clone, Copy, Debug)]
struct Flap {
    side: usize,
    cut: Cut,
    when: When,
}

impl fmt::Display for Flap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} from {} ", self.cut, NODES[self.side])?;
        match self.when {
            When::Writes(n) => write!(f, "after {n} writes"),
            When::MidResync => write!(f, "mid-resync"),
        }
    }
}

/// The kinds in a seeded order, each cut from alpha's side then from beta's: one of
/// the two (seeded) in the middle of the resync, the other after a seeded number of
/// writes.
fn flap_schedule(seed: u64) -> Vec<Flap> {
    let mut s = seed;
    let mut kinds = FLAP_KINDS;
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, (splitmix64(&mut s) % (i as u64 + 1)) as usize);
    }
    let mut flaps = Vec::new();
    for cut in kinds {
        let mid_resync_side = splitmix64(&mut s) % 2;
        for side in 0..2 {
            let when = if side as u64 == mid_resync_side {
                When::MidResync
            } else {
                When::Writes(100 + splitmix64(&mut s) % 400)
            };
            flaps.push(Flap { side, cut, when });
        }
    }
    flaps
}

/// Beta has received part of a resync, or is in sync.
fn beta_mid_resync_or_synced(p: &Pair) -> bool {
    p.socket_status(1).is_some_and(|s| {
        let peer = &s["peers"][0];
        let resyncing = peer["replication"] == "SyncTarget" && peer["resync_done_bytes"].as_u64() > Some(0);
        resyncing || (peer["replication"] == "Established" && peer["out_of_sync_bytes"] == 0)
    })
}

/// How often each node's log says `what`.
fn log_count(p: &Pair, what: &str) -> [usize; 2] {
    [0, 1].map(|n| p.nodes[n].daemon.as_ref().map_or(0, |d| d.log().matches(what).count()))
}

/// Waits until both nodes' logs say `what` more often than `before`.
fn wait_logged(p: &mut Pair, what: &str, before: [usize; 2], context: &str) {
    p.wait(
        WAIT,
        |p| log_count(p, what).iter().zip(before).all(|(now, was)| *now > was),
        &format!("{context}: both nodes log {what:?} again"),
    );
}

#[test]
fn link_flaps_under_a_verifying_writer_leave_the_pair_identical() {
    // Declared first: dropped last, after the nodes inside it were killed.
    let net = NetnsPair::create("scflap");
    let slow = FaultOpts { write_delay_ms: SECONDARY_WRITE_DELAY_MS, ..FaultOpts::default() };
    let opts = PairOpts {
        replication: Some(ADDRS.map(|a| format!("{a}:{PORT}"))),
        prefix: [net.exec_prefix(0), net.exec_prefix(1)],
        disks: [DiskSpec::Plain, DiskSpec::Fault(slow)],
        extra_resource: format!("resync-rate = \"{RESYNC_RATE}\"\n"),
        ..PairOpts::default()
    };
    let mut p = Pair::create("sc-flaps", &opts);
    p.start_node(0);
    p.start_node(1);
    p.wait_synced(WAIT);
    p.ctl_ok(0, &["primary"]);
    let size = p.export_size(0);

    let seed = random_seed();
    let flaps = flap_schedule(seed);
    let schedule = flaps.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ");
    eprintln!("flap schedule (seed {seed}): {schedule}");
    let alpha = Addr::Unix(p.nodes[0].nbd.clone());
    let load_opts = LoadOpts {
        connections: 2,
        region_bytes: 8 * MIB,
        seed,
        max_writes_per_sec: Some(WRITES_PER_SEC),
        ..LoadOpts::default()
    };
    let load = LoadGen::start(&alpha, EXPORT, load_opts);
    load.wait_acked(200, WAIT);
    let started = Instant::now();
    for (i, flap) in flaps.iter().enumerate() {
        let context = format!("flap {i} ({flap}; seed {seed})");
        match flap.when {
            When::Writes(n) => load.wait_acked(load.acked() + n, WAIT),
            When::MidResync => p.wait(WAIT, |p| beta_mid_resync_or_synced(p), &context),
        }
        let (lost, up) = (log_count(&p, LINK_LOST), log_count(&p, LINK_UP));
        let cut_at = load.acked();
        match flap.cut {
            Cut::Partition => {
                net.set_link(flap.side, false);
                wait_logged(&mut p, LINK_LOST, lost, &context);
                net.set_link(flap.side, true);
            }
            Cut::Reset => {
                let aborted = net.abort_tcp(flap.side, PORT);
                assert!(aborted >= 1, "{context}: no replication connection to abort");
                wait_logged(&mut p, LINK_LOST, lost, &context);
            }
        }
        wait_logged(&mut p, LINK_UP, up, &context);
        eprintln!(
            "flap {i} at {:.1?}: {flap}: cut at {cut_at} acknowledged writes, replicating again at {}",
            started.elapsed(),
            load.acked()
        );
    }
    p.wait_synced(WAIT);
    // What the sync target logs when a link goes in the middle of its resync.
    let mid_resync = log_count(&p, "link lost during resync")[1];
    eprintln!(
        "{} flaps in {:.1?}, {mid_resync} of them in the middle of a resync",
        flaps.len(),
        started.elapsed()
    );
    // Still writing, in sync.
    load.wait_acked(load.acked() + 200, WAIT);
    load.stop();
    let log = load.finish();
    eprintln!("{}", log.summary());
    assert_eq!(log.connections_died(), 0, "a writer lost its connection: {}", log.summary());
    assert_eq!(log.error_count(), 0, "a write failed: {}", log.summary());
    let stats = verify_acked(&log, nbd_reader(&alpha, EXPORT, BLOCK)).unwrap_or_else(|e| {
        panic!("acknowledged writes lost on the Primary: {e}\nseed {seed}, flaps: {schedule}")
    });
    eprintln!("every acknowledged write reads back from alpha: {stats:?}");

    let out = p.ctl_ok(0, &["verify"]);
    eprintln!("{}", out.stdout.trim());
    let peer = p.peer(0);
    assert_eq!(
        (peer["verify_done_bytes"].as_u64(), peer["verify_out_of_sync_bytes"].as_u64()),
        (Some(size), Some(0)),
        "online verify of the whole device finds nothing out of sync: {peer}\nseed {seed}, flaps: {schedule}"
    );

    p.stop_node(0);
    p.stop_node(1);
    let stats = verify_acked(&log, file_reader(p.store_path(1), BLOCK)).unwrap_or_else(|e| {
        panic!("acknowledged writes missing on the Secondary's disk: {e}\nseed {seed}, flaps: {schedule}")
    });
    eprintln!("every acknowledged write is on beta's disk: {stats:?}");
    eprintln!("comparing the backing files (seed {seed}, flaps: {schedule})");
    let compared = assert_data_equal(p.store_path(0), p.store_path(1), size);
    eprintln!("copies identical over {size} bytes ({compared} bytes of data compared)");
}
