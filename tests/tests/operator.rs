//! The operator CLI against a real pair: every `blockctl` verb, checked through
//! `status --json` (and the data on both backing files where a verb moves data);
//! every refusal, with its exit code and the reason on stderr; and the `events
//! --json` stream through connect, resync, role switch and disconnect.
//!
//! Data is written through NBD with the raw client ([`scatter`] plans: content
//! depends only on seed and offset), copies are compared after a clean stop of
//! both nodes (sparse-aware, [`scatter::assert_data_equal`]).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use blockd_tests::pair::{NODES, Pair, PairOpts, binary};
use blockd_tests::raw::RawClient;
use blockd_tests::scatter::{self, GRANULE, Plan, assert_data_equal, check_plan, write_plan};
use blockd_tests::*;
use serde_json::Value;

/// Bound on every wait for a state (connect, resync, verify).
const WAIT: Duration = Duration::from_secs(60);
/// Writes in flight per writer connection.
const QD: usize = 16;
/// Resync chunks in flight at once, and their size (blockd's `RESYNC_PARALLEL`,
/// `RESYNC_CHUNK_BYTES`): what may still complete after `pause-sync`.
const RESYNC_IN_FLIGHT_BYTES: u64 = 4 * MIB;

fn addr(p: &Pair, n: usize) -> Addr {
    Addr::Unix(p.nodes[n].nbd.clone())
}

fn peer_str(p: &Pair, n: usize, key: &str) -> String {
    p.peer(n)[key].as_str().unwrap_or("").to_string()
}

fn sent(p: &Pair, n: usize) -> u64 {
    p.peer_u64(n, "resync_sent_bytes")
}

fn done(p: &Pair, n: usize) -> u64 {
    p.peer_u64(n, "resync_done_bytes")
}

fn role(p: &Pair, n: usize) -> String {
    p.status(n)["role"].as_str().unwrap_or("").to_string()
}

/// `secondary` on node `n`, retried (bounded) while the node still counts an NBD
/// client that just disconnected.
fn demote(p: &mut Pair, n: usize) {
    p.wait(
        Duration::from_secs(30),
        |p| p.ctl(n, &["secondary"]).status.success(),
        &format!("`secondary` on {} succeeds", NODES[n]),
    );
}

/// Waits until node `n` reports `key` == `want` for its peer.
fn wait_peer(p: &mut Pair, n: usize, key: &str, want: &str) {
    p.wait(WAIT, |p| peer_str(p, n, key) == want, &format!("{} reports peer {key} {want}", NODES[n]));
}

/// Both nodes started and Established; alpha Primary; returns the exported size.
fn primary_pair(label: &str, opts: &PairOpts) -> (Pair, u64) {
    let mut p = Pair::start(label, opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let size = p.export_size(0);
    (p, size)
}

/// Overwrites whole granules of `path` at `offsets` behind blockd's back (a
/// pattern no plan writes).
fn corrupt(path: &std::path::Path, offsets: &[u64]) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open disk");
    for &off in offsets {
        f.write_all_at(&vec![0xa5; GRANULE as usize], off).expect("corrupt");
    }
    f.sync_all().expect("fsync disk");
}

/// `verify` on node `n`: (bytes out of sync, bytes compared) from its output.
fn verify(p: &Pair, n: usize, args: &[&str]) -> (u64, u64) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = p.ctl_ok(n, &all);
    let line = out.stdout.trim();
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["verify:", oos, "bytes", "out", "of", "sync", "of", total, compared, ..]
            if compared.trim_end_matches(';') == "compared" =>
        {
            (oos.parse().expect("out of sync"), total.parse().expect("compared"))
        }
        _ => panic!("cannot parse verify output {line:?}\n{}", out.describe()),
    }
}

fn stop_both(p: &mut Pair) {
    p.stop_node(0);
    p.stop_node(1);
}

fn assert_copies_equal(p: &Pair, size: u64) {
    let compared = assert_data_equal(p.disk_path(0), p.disk_path(1), size);
    eprintln!("copies equal over {size} bytes ({compared} bytes of data segments compared)");
}

fn check_both<'a>(p: &Pair, plan: &Plan, extents: impl IntoIterator<Item = &'a scatter::Extent> + Clone) {
    for (n, name) in NODES.iter().enumerate() {
        check_plan(p.disk_path(n), plan, extents.clone())
            .unwrap_or_else(|e| panic!("{name} lacks data it must hold: {e}"));
    }
}

/// Kills a daemon started by `blockctl up` (by its PID, from its status) if a test
/// fails before `blockctl down` stopped it.
struct UpGuard(Option<i32>);

impl Drop for UpGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: kill(2) on a PID this test started (through `blockctl up`).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

// ---------------------------------------------------------------------------
// 1. Every verb, and the state it leads to.

/// `show`, `status` (text, `-v`, `--json`), `events --now` (text and JSON),
/// `primary` / `secondary`, `disconnect` / `connect`, `verify [--repair]`,
/// `dump-md` on a stopped node, `up` / `down`.
#[test]
fn verbs_change_the_state_status_reports() {
    let opts = PairOpts { extra_resource: "resync-rate = \"64MiB\"\n".into(), ..PairOpts::default() };
    let mut p = Pair::start("op-verbs", &opts);
    p.wait_established();

    // show: the effective config, defaults filled in.
    let out = p.ctl_ok(0, &["show"]);
    for want in ["[resource]", "name = \"r0\"", "protocol = \"C\"", "resync-rate = 67108864", "al-extents = "]
    {
        assert!(out.stdout.contains(want), "show lacks {want:?}\n{}", out.describe());
    }
    assert_eq!(out.stdout.matches("[[node]]").count(), 2, "show lists both nodes\n{}", out.describe());
    for name in NODES {
        assert!(out.stdout.contains(&format!("name = \"{name}\"")), "show lacks node {name}\n{}", out.stdout);
    }

    // status: text, verbose, JSON.
    let out = p.ctl_ok(0, &["status"]);
    for want in ["r0 role:Secondary", "disk:UpToDate", "beta connection:Connected", "replication:Established"]
    {
        assert!(out.stdout.contains(want), "status lacks {want:?}\n{}", out.describe());
    }
    assert!(!out.stdout.contains("activity-log:"), "plain status has no counters\n{}", out.stdout);
    for verbose in ["-v", "--verbose"] {
        let out = p.ctl_ok(0, &["status", verbose]);
        for want in ["activity-log:", "generations: current", "replicated:", "resync-sent:"] {
            assert!(out.stdout.contains(want), "status {verbose} lacks {want:?}\n{}", out.describe());
        }
    }
    let s = p.status(0);
    assert_eq!((s["resource"].as_str(), s["node"].as_str()), (Some("r0"), Some("alpha")), "{s}");
    assert_eq!((s["role"].as_str(), s["disk"].as_str()), (Some("Secondary"), Some("UpToDate")), "{s}");
    let peer = &s["peers"][0];
    assert_eq!(peer["node"], "beta", "{s}");
    assert_eq!(peer["out_of_sync_bytes"], 0, "{s}");
    for key in ["al_hot_extents", "al_transactions", "unsent_bytes"] {
        assert!(s[key].is_u64(), "status --json lacks {key}: {s}");
    }
    assert!(s["generations"]["current"].is_string(), "status --json lacks generations: {s}");

    // events --now: the four objects as they exist, then the `-` terminator.
    let out = p.ctl_ok(0, &["events", "--now"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "events --now: 4 objects and `exists -`\n{}", out.describe());
    let want = [
        ("exists resource ", &["resource:r0", "role:Secondary"][..]),
        ("exists device ", &["resource:r0", "disk:UpToDate"][..]),
        ("exists connection ", &["peer:beta", "connection:Connected", "peer-role:Secondary"][..]),
        ("exists peer-device ", &["peer:beta", "replication:Established", "peer-disk:UpToDate"][..]),
    ];
    for (line, (prefix, fields)) in lines.iter().zip(want) {
        assert!(line.starts_with(prefix), "{line:?} does not start with {prefix:?}\n{}", out.stdout);
        for f in fields {
            assert!(line.split_whitespace().any(|w| w == *f), "{line:?} lacks {f:?}");
        }
    }
    assert_eq!(lines[4], "exists -", "{}", out.stdout);
    let out = p.ctl_ok(0, &["events", "--now", "--json"]);
    let objs: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("events --json line {l:?}: {e}")))
        .collect();
    let kinds: Vec<&str> = objs.iter().map(|o| o["object"].as_str().unwrap_or("?")).collect();
    assert_eq!(kinds, ["resource", "device", "connection", "peer-device", "-"], "{}", out.stdout);
    assert!(objs.iter().all(|o| o["type"] == "exists"), "{}", out.stdout);
    assert!(objs[..4].iter().all(|o| o["resource"] == "r0"), "{}", out.stdout);
    assert_eq!(objs[0]["role"], "Secondary");
    assert_eq!(objs[1]["disk"], "UpToDate");
    assert_eq!(
        (&objs[2]["peer"], &objs[2]["connection"], &objs[2]["peer_role"]),
        (&Value::from("beta"), &Value::from("Connected"), &Value::from("Secondary"))
    );
    assert_eq!(
        (&objs[3]["replication"], &objs[3]["peer_disk"]),
        (&Value::from("Established"), &Value::from("UpToDate"))
    );
    assert_eq!(objs[3]["out_of_sync_bytes"], 0);
    assert!(objs[3].get("done_percent").is_none(), "no resync, no progress: {}", objs[3]);
    assert_eq!(objs[4], serde_json::json!({"type": "exists", "object": "-"}));

    // primary / secondary, seen by both nodes.
    p.ctl_ok(0, &["primary"]);
    assert_eq!(role(&p, 0), "Primary");
    wait_peer(&mut p, 1, "role", "Primary");
    p.ctl_ok(0, &["secondary"]);
    assert_eq!(role(&p, 0), "Secondary");
    wait_peer(&mut p, 1, "role", "Secondary");
    p.ctl_ok(0, &["primary"]);
    let size = p.export_size(0);

    // disconnect: StandAlone with the reason; the peer notices; writes are tracked.
    p.ctl_ok(0, &["disconnect"]);
    let peer = p.peer(0);
    assert_eq!(
        (peer["connection"].as_str(), peer["replication"].as_str()),
        (Some("StandAlone"), Some("Off"))
    );
    let reason = peer["reason"].as_str().unwrap_or_else(|| panic!("StandAlone without a reason: {peer}"));
    assert!(reason.contains("disconnect"), "reason {reason:?}");
    let out = p.ctl_ok(0, &["status"]);
    assert!(out.stdout.contains("connection:StandAlone"), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("reason: {reason}")), "{}", out.stdout);
    p.wait(
        WAIT,
        |p| p.peer(1)["connection"].as_str().is_some_and(|c| c != "Connected"),
        "beta notices that alpha is gone",
    );
    // StandAlone stays StandAlone: the link is not re-established by itself.
    assert_eq!(peer_str(&p, 0, "connection"), "StandAlone");
    let plan = Plan::random(0x0e_7b5, 0..16 * MIB, 2 * MIB, 4096, 64 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &plan, QD);
    assert_eq!(p.peer_u64(0, "out_of_sync_bytes"), plan.dirty_bytes(), "alpha tracks the writes");

    // connect: Connected again, the writes resynced, the reason gone.
    p.ctl_ok(0, &["connect"]);
    p.wait_synced(WAIT);
    assert_eq!(p.peer(0)["reason"], Value::Null, "{}", p.peer(0));
    assert_eq!(p.peer(1)["role"], "Primary");

    // verify: the whole device compared, nothing out of sync, status says so.
    assert_eq!(verify(&p, 0, &[]), (0, size));
    let peer = p.peer(0);
    assert_eq!(peer["verify_running"], false, "{peer}");
    assert_eq!(
        (peer["verify_done_bytes"].as_u64(), peer["verify_total_bytes"].as_u64()),
        (Some(size), Some(size))
    );
    assert_eq!(peer["verify_out_of_sync_bytes"], 0, "{peer}");
    let out = p.ctl_ok(0, &["verify", "--repair"]);
    assert!(out.stdout.contains("resync started for them"), "{}", out.describe());
    assert_eq!(verify(&p, 0, &["--repair"]), (0, size));
    p.wait_synced(WAIT);
    let out = p.ctl_ok(0, &["status"]);
    assert!(
        out.stdout.contains(&format!("verify: done {size}/{size} bytes, out-of-sync:0 bytes")),
        "{}",
        out.stdout
    );

    // dump-md on a stopped node: its metadata as of the clean stop.
    let gen_current = p.status(1)["generations"]["current"].as_str().expect("generations").to_string();
    p.stop_node(1);
    let out = p.ctl_ok(1, &["dump-md"]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("gen_current"))
        .unwrap_or_else(|| panic!("dump-md has no gen_current\n{}", out.describe()));
    assert!(
        line.contains(&gen_current),
        "dump-md {line:?}, status said current {gen_current}\n{}",
        out.stdout
    );

    // up: blockd in the background, answering when `up` returns; down: gone.
    let log = p.dir.join("beta-up.log");
    let out = p.ctl_ok(1, &["up", "--log", &log.display().to_string()]);
    assert!(out.stdout.contains("node beta up"), "{}", out.describe());
    let pid = p.status(1)["pid"].as_u64().expect("pid in status") as i32;
    let mut guard = UpGuard(Some(pid));
    p.wait_synced(WAIT);
    let out = p.ctl(1, &["up"]);
    assert_eq!(out.status.code(), Some(1), "up twice\n{}", out.describe());
    assert!(out.stderr.contains("already running"), "{}", out.describe());
    let out = p.ctl_ok(1, &["down"]);
    assert!(out.stdout.contains("node beta down"), "{}", out.describe());
    assert!(!pid_alive(pid), "blockd (pid {pid}) still runs after `down`");
    guard.0 = None;
    assert!(p.try_status(1).is_none(), "beta answers after `down`");
    assert!(!p.nodes[1].control.exists(), "the control socket is removed");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log_text.is_empty(), "`up --log` wrote no log at {}", log.display());
    let out = p.ctl_ok(1, &["dump-md"]);
    assert!(out.stdout.contains("gen_current"), "{}", out.describe());
    p.wait(WAIT, |p| peer_str(p, 0, "connection") != "Connected", "alpha notices that beta is gone");
    p.stop_node(0);
    check_plan(p.disk_path(0), &plan, &plan.extents).unwrap_or_else(|e| panic!("alpha: {e}"));
    check_plan(p.disk_path(1), &plan, &plan.extents).unwrap_or_else(|e| panic!("beta: {e}"));
    assert_copies_equal(&p, size);
}

/// `invalidate` on the Secondary and `invalidate-remote` on the Primary: each a
/// full resync from the Primary that repairs granules corrupted behind blockd's
/// back (which a bitmap resync would not know about); the copies end equal.
#[test]
fn invalidate_and_invalidate_remote_resync_in_full() {
    let (mut p, size) = primary_pair("op-invalidate", &PairOpts::default());
    let plan = Plan::random(0x1a7a11d, 0..32 * MIB, 4 * MIB, 4096, 64 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &plan, QD);
    p.wait_synced(WAIT);
    let zero_granule = 48 * MIB;
    assert!(zero_granule + GRANULE <= size, "export {size}");

    for (n, verb) in [(1, "invalidate"), (0, "invalidate-remote")] {
        let bad = [plan.extents[0].offset, plan.extents[1].offset, zero_granule];
        corrupt(p.disk_path(1), &bad);
        assert_eq!(verify(&p, 0, &[]), (3 * GRANULE, size), "before {verb}: the corruption is seen");
        let sent0 = sent(&p, 0);
        p.ctl_ok(n, &[verb]);
        // Done: at least every written byte was sent again (a full resync; the
        // written data is non-zero), and the pair is in sync.
        p.wait(
            WAIT,
            |p| p.is_synced() && sent(p, 0) - sent0 >= plan.bytes(),
            &format!("{verb} on {}: full resync from alpha done", NODES[n]),
        );
        eprintln!("{verb}: resync sent {} bytes (written: {})", sent(&p, 0) - sent0, plan.bytes());
        assert_eq!(role(&p, 0), "Primary", "{verb} keeps the roles");
        assert_eq!(role(&p, 1), "Secondary", "{verb} keeps the roles");
        assert_eq!(verify(&p, 0, &[]), (0, size), "after {verb}: the corruption is repaired");
    }
    stop_both(&mut p);
    check_both(&p, &plan, &plan.extents);
    assert_copies_equal(&p, size);
}

/// `pause-sync` during a resync (limited to 4 MiB/s, 32 MiB dirty), on the target
/// then on the source: both nodes show PausedSyncT / PausedSyncS, progress stops;
/// a resume on the other node does not lift a pause; `resume-sync` on the pausing
/// node lets it go on, and it finishes.
#[test]
fn pause_sync_holds_a_resync_and_resume_sync_finishes_it() {
    let opts = PairOpts { extra_resource: "resync-rate = \"4MiB\"\n".into(), ..PairOpts::default() };
    let (mut p, size) = primary_pair("op-pause", &opts);
    p.ctl_ok(0, &["disconnect"]);
    let plan = Plan::sequential(0x9a05e, 0..32 * MIB, 256 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &plan, QD);
    assert_eq!(p.peer_u64(0, "out_of_sync_bytes"), 32 * MIB);
    p.ctl_ok(0, &["connect"]);
    p.wait(
        WAIT,
        |p| peer_str(p, 0, "replication") == "SyncSource" && done(p, 0) > 0,
        "alpha is SyncSource and has made progress",
    );

    for pauser in [1, 0] {
        let other = 1 - pauser;
        p.ctl_ok(pauser, &["pause-sync"]);
        p.wait(
            WAIT,
            |p| {
                peer_str(p, 0, "replication") == "PausedSyncS"
                    && peer_str(p, 1, "replication") == "PausedSyncT"
                    && (0..2).all(|n| p.peer(n)["resync_paused"] == true)
            },
            &format!("pause-sync on {}: alpha PausedSyncS, beta PausedSyncT", NODES[pauser]),
        );
        assert_held(&p, &format!("pause-sync on {}", NODES[pauser]));
        // A pause holds until resumed where it was set.
        p.ctl_ok(other, &["resume-sync"]);
        assert_eq!(peer_str(&p, 0, "replication"), "PausedSyncS", "resume-sync on the other node");
        assert_held(&p, &format!("pause-sync on {}, resume-sync on {}", NODES[pauser], NODES[other]));
        let before = done(&p, 0);
        p.ctl_ok(pauser, &["resume-sync"]);
        if pauser == 1 {
            p.wait(
                WAIT,
                |p| {
                    peer_str(p, 0, "replication") == "SyncSource"
                        && peer_str(p, 1, "replication") == "SyncTarget"
                        && done(p, 0) > before
                },
                "resume-sync: SyncSource / SyncTarget again, progress",
            );
        }
    }
    p.wait_synced(WAIT);
    let peer = p.peer(0);
    assert_eq!(peer["resync_paused"], false, "{peer}");
    stop_both(&mut p);
    check_both(&p, &plan, &plan.extents);
    assert_copies_equal(&p, size);
}

/// While paused, `resync_done_bytes` stays put on both nodes. Chunks in flight at
/// the pause may still complete (at most [`RESYNC_IN_FLIGHT_BYTES`]); then
/// nothing moves. Observed over ~1.2 s (running, 4 MiB/s would move ~5 MiB).
fn assert_held(p: &Pair, what: &str) {
    let sample = |p: &Pair| (done(p, 0), done(p, 1));
    let mut samples = vec![sample(p)];
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(200));
        samples.push(sample(p));
    }
    let (first, last) = (samples[0], samples[samples.len() - 1]);
    assert!(
        last.0 - first.0 <= RESYNC_IN_FLIGHT_BYTES && samples[3..].iter().all(|s| *s == last),
        "{what}: resync_done_bytes (alpha, beta) moved while paused: {samples:?}"
    );
    assert!(last.0 < 32 * MIB, "{what}: the resync is not finished ({samples:?})");
}

// ---------------------------------------------------------------------------
// 2. Refusals: exit code 1 (2 for usage and config errors), and why on stderr.

#[test]
fn refusals_say_why_and_change_nothing() {
    let (mut p, _size) = primary_pair("op-refuse", &PairOpts::default());
    wait_peer(&mut p, 1, "role", "Primary");

    p.ctl_refused(1, &["primary"], 1, "peer is Primary");
    assert_eq!(role(&p, 1), "Secondary");
    p.ctl_refused(0, &["invalidate"], 1, "this node is Primary");
    p.ctl_refused(1, &["invalidate-remote"], 1, "the peer is Primary");
    // While connected the flag would only linger and resolve a later split brain
    // nobody saw against this node: refused (DRBD refuses `connect` when connected).
    p.ctl_refused(1, &["connect", "--discard-my-data"], 1, "already connected");
    assert!(p.is_synced(), "refused verbs started nothing");

    // secondary with an NBD client attached.
    let (mut client, _, _) = RawClient::handshake(&addr(&p, 0), EXPORT, false);
    client.request(0, blockd_tests::raw::CMD_WRITE, 1, 0, 4, b"wxyz").expect("write");
    assert_eq!(client.finish(1), 0);
    p.ctl_refused(0, &["secondary"], 1, "disconnect them first or use --force");
    assert_eq!(role(&p, 0), "Primary");
    // The client is still served.
    client.request(0, blockd_tests::raw::CMD_FLUSH, 2, 0, 0, &[]).expect("flush");
    assert_eq!(client.finish(2), 0);
    drop(client);
    demote(&mut p, 0);
    p.ctl_ok(0, &["primary"]);

    // The metadata of a running node is locked.
    p.ctl_refused(0, &["dump-md"], 1, "in use by another process");
    p.ctl_refused(0, &["create-md", "--force"], 1, "in use by another process");
    assert_eq!(p.status(0)["disk"], "UpToDate", "create-md on a running node changed nothing");

    // Usage and config errors: exit 2.
    let out = p.ctl_refused(0, &["primary", "r1"], 2, "not \"r1\"");
    assert!(out.stderr.contains("defines resource \"r0\""), "{}", out.describe());
    p.ctl_refused(1, &["primary", "r1"], 2, "not \"r1\"");
    assert_eq!(role(&p, 1), "Secondary");
    p.ctl_refused(0, &["status", "r1"], 2, "not \"r1\"");
    p.ctl_refused(0, &["explode"], 2, "explode");
    p.ctl_refused(0, &["connect", "--discard-your-data"], 2, "--discard-your-data");
    let out = run_capture(
        std::process::Command::new(binary("blockctl"))
            .arg("--config")
            .arg(&p.config)
            .args(["--node", "gamma", "status"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2), "unknown node\n{}", out.describe());
    assert!(out.stderr.contains("gamma"), "{}", out.describe());

    // Disconnected: verify and invalidate-remote need the peer.
    p.ctl_ok(0, &["disconnect"]);
    p.wait(WAIT, |p| peer_str(p, 1, "connection") != "Connected", "beta notices the disconnect");
    p.ctl_refused(0, &["verify"], 1, "not connected");
    p.ctl_refused(0, &["invalidate-remote"], 1, "not connected");
    p.ctl_refused(1, &["verify"], 1, "not connected");
    p.ctl_refused(1, &["invalidate-remote"], 1, "not connected");
    assert_eq!(p.status(1)["disk"], "UpToDate", "refused verbs changed nothing");
    p.ctl_ok(0, &["connect"]);
    p.wait_synced(WAIT);
    stop_both(&mut p);
    assert_eq!(&p.disk_bytes(1, 4)[..], b"wxyz");
}

/// `connect --discard-my-data` without a split brain is harmless: the pair
/// connects as it would have without the flag and nothing is discarded — not on
/// the Primary that holds newer data (its writes made while disconnected reach
/// the peer), not on a clean Secondary. DRBD does the same: the flag only picks
/// the victim when the handshake finds a split brain, and is ignored otherwise.
#[test]
fn connect_discard_my_data_without_split_brain_discards_nothing() {
    let (mut p, size) = primary_pair("op-discard", &PairOpts::default());
    let before = Plan::random(0xd15c, 0..16 * MIB, 2 * MIB, 4096, 64 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &before, QD);
    p.wait_synced(WAIT);

    // The Primary, newer data (written while disconnected), --discard-my-data.
    p.ctl_ok(0, &["disconnect"]);
    p.wait(WAIT, |p| peer_str(p, 1, "connection") != "Connected", "beta notices the disconnect");
    let newer = Plan::random(0xd15d, 16 * MIB..32 * MIB, 2 * MIB, 4096, 64 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &newer, QD);
    assert_eq!(p.peer_u64(0, "out_of_sync_bytes"), newer.dirty_bytes());
    let sent0 = sent(&p, 0);
    p.ctl_ok(0, &["connect", "--discard-my-data"]);
    p.wait_synced(WAIT);
    assert!(
        sent(&p, 0) - sent0 >= newer.bytes(),
        "alpha was the resync source: sent {} bytes for {} written",
        sent(&p, 0) - sent0,
        newer.bytes()
    );
    assert_eq!(role(&p, 0), "Primary");
    for n in 0..2 {
        assert_eq!(p.peer(n)["out_of_sync_bytes"], 0, "{}", p.peer(n));
    }

    // A clean Secondary: connects, nothing to resync either way.
    p.ctl_ok(1, &["disconnect"]);
    p.wait(WAIT, |p| peer_str(p, 0, "connection") != "Connected", "alpha notices the disconnect");
    let sent1 = (sent(&p, 0), sent(&p, 1));
    p.ctl_ok(1, &["connect", "--discard-my-data"]);
    p.wait_synced(WAIT);
    assert_eq!((sent(&p, 0), sent(&p, 1)), sent1, "nothing was resynced");
    assert_eq!(verify(&p, 0, &[]), (0, size));

    stop_both(&mut p);
    check_both(&p, &before, &before.extents);
    check_both(&p, &newer, &newer.extents);
    assert_copies_equal(&p, size);
}

// ---------------------------------------------------------------------------
// 3. The event stream.

fn is(o: &Value, object: &str, key: &str, want: &str) -> bool {
    o["type"] == "change" && o["object"] == object && o[key] == want
}

/// `events --json` on alpha, started before beta: the exists block, then in
/// order: connection Connected and peer-device Established; role Primary; (beta
/// disconnects, alpha writes 8 MiB) connection Connected again and peer-device
/// SyncSource with rising `done_percent`, ending Established with nothing out of
/// sync; role Primary → Secondary; connection StandAlone after `disconnect`.
#[test]
fn events_stream_follows_connect_resync_role_switch_and_disconnect() {
    let opts = PairOpts { extra_resource: "resync-rate = \"4MiB\"\n".into(), ..PairOpts::default() };
    let mut p = Pair::create("op-events", &opts);
    p.start_node(0);
    let mut ev = p.events(0, true);
    let t = Duration::from_secs(30);
    let end = ev.wait_for(t, "exists -", |o| o["type"] == "exists" && o["object"] == "-");
    let exists = ev.json();
    let kinds: Vec<&str> = exists[..=end].iter().map(|o| o["object"].as_str().unwrap_or("?")).collect();
    assert_eq!(kinds, ["resource", "device", "connection", "peer-device", "-"], "{}", ev.describe());
    assert_eq!(exists[0]["role"], "Secondary");
    assert_ne!(exists[2]["connection"], "Connected", "beta is not started yet");

    p.start_node(1);
    let connected =
        ev.wait_for(t, "connection Connected", |o| is(o, "connection", "connection", "Connected"));
    let established =
        ev.wait_for(t, "peer-device Established", |o| is(o, "peer-device", "replication", "Established"));
    p.ctl_ok(0, &["primary"]);
    let primary = ev.wait_for(t, "resource role Primary", |o| is(o, "resource", "role", "Primary"));

    // A resync: beta disconnects, alpha writes, beta connects.
    p.ctl_ok(1, &["disconnect"]);
    let lost = ev.wait_for(t, "connection lost", |o| {
        o["type"] == "change" && o["object"] == "connection" && o["connection"] != "Connected"
    });
    let plan = Plan::sequential(0xe7e7, 0..8 * MIB, 256 * 1024);
    write_plan(&addr(&p, 0), EXPORT, &plan, QD);
    p.ctl_ok(1, &["connect"]);
    let reconnected =
        ev.wait_for(t, "connection Connected again", |o| is(o, "connection", "connection", "Connected"));
    let sync_start =
        ev.wait_for(t, "peer-device SyncSource", |o| is(o, "peer-device", "replication", "SyncSource"));
    let synced = ev.wait_for(WAIT, "peer-device Established, 0 out of sync", |o| {
        is(o, "peer-device", "replication", "Established") && o["out_of_sync_bytes"] == 0
    });
    p.wait_synced(WAIT);

    demote(&mut p, 0);
    let secondary = ev.wait_for(t, "resource role Secondary", |o| is(o, "resource", "role", "Secondary"));
    p.ctl_ok(0, &["disconnect"]);
    let standalone =
        ev.wait_for(t, "connection StandAlone", |o| is(o, "connection", "connection", "StandAlone"));
    ev.stop();
    let all = ev.json();
    let report = ev.describe();
    eprintln!("{report}");

    let order =
        [end, connected, established, primary, lost, reconnected, sync_start, synced, secondary, standalone];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "events out of order {order:?}\n{report}");
    assert!(all[end + 1..].iter().all(|o| o["type"] == "change"), "after `exists -` only changes\n{report}");
    assert!(all[..end].iter().all(|o| o["type"] == "exists"), "{report}");
    assert!(all[end + 1..].iter().all(|o| o["resource"] == "r0"), "{report}");

    // Progress on the source: SyncSource objects with a known total and rising
    // done_percent; no role or connection change in between.
    let progress: Vec<&Value> = all[sync_start..synced]
        .iter()
        .filter(|o| o["object"] == "peer-device" && o["replication"] == "SyncSource")
        .collect();
    let percents: Vec<f64> = progress
        .iter()
        .map(|o| {
            let total = o["resync_total_bytes"].as_u64().unwrap_or(0);
            let done = o["resync_done_bytes"].as_u64().unwrap_or(u64::MAX);
            assert!(total > 0 && done <= total, "SyncSource progress without a sane total: {o}\n{report}");
            o["done_percent"]
                .as_f64()
                .unwrap_or_else(|| panic!("SyncSource without done_percent: {o}\n{report}"))
        })
        .collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "done_percent goes down: {percents:?}\n{report}");
    let distinct = percents.windows(2).filter(|w| w[0] < w[1]).count() + 1;
    assert!(distinct >= 3, "done_percent shows progress in steps: {percents:?}\n{report}");
    assert!(percents.last().copied().unwrap_or(0.0) >= 50.0, "progress reached {percents:?}\n{report}");
    assert!(
        all[sync_start..synced].iter().all(|o| o["object"] != "resource"),
        "no role change during the resync\n{report}"
    );
    // Between the role switch and `disconnect`, the connection stayed up.
    assert_eq!(all[secondary]["role"], "Secondary");
    assert!(
        all[synced..secondary].iter().all(|o| o["object"] != "connection"),
        "the connection did not change before the demotion\n{report}"
    );
    p.stop_node(0);
    p.stop_node(1);
}

/// `secondary --force` against a client that reconnects as soon as it is closed and
/// writes all the time (what a kernel client behind `blockctl attach`'s resident
/// does), ten times over: the demotion is not held off (new clients are refused,
/// "becoming Secondary", until the role says Secondary), and no write ever gets an
/// error: a client let in during the demotion would have its writes refused as a
/// Secondary's, which fails a filesystem.
#[test]
fn forced_demotion_is_not_held_off_by_a_reconnecting_client() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    const CYCLES: u32 = 10;
    let (mut p, _size) = primary_pair("op-redial", &PairOpts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicU32::new(0));
    let refusals = Arc::new(Mutex::new(Vec::<u32>::new()));
    let write_errors = Arc::new(Mutex::new(Vec::<u32>::new()));
    let redialer = {
        let (addr, stop, sessions) = (addr(&p, 0), stop.clone(), sessions.clone());
        let (refusals, write_errors) = (refusals.clone(), write_errors.clone());
        std::thread::spawn(move || {
            let block = [0x5au8; 4096];
            // Bounded: every cycle takes well under this many rounds.
            for _ in 0..1_000_000 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let mut c = RawClient::connect_fixed(&addr);
                if let Err(t) = c.info_or_go(blockd_tests::raw::OPT_GO, EXPORT) {
                    refusals.lock().expect("lock").push(t);
                    continue;
                }
                sessions.fetch_add(1, Ordering::SeqCst);
                // Write until the server closes the connection; then redial at once.
                for cookie in 1u64.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let sent = c.request(0, blockd_tests::raw::CMD_WRITE, cookie, 0, 4096, &block);
                    match sent.and_then(|()| c.read_reply()) {
                        Ok(r) if r.error() != 0 => write_errors.lock().expect("lock").push(r.error()),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        })
    };
    for cycle in 1..=CYCLES {
        p.wait(WAIT, |_| sessions.load(Ordering::SeqCst) >= cycle, "the redialing client is connected");
        p.ctl_ok(0, &["secondary", "--force"]);
        assert_eq!(role(&p, 0), "Secondary");
        p.ctl_ok(0, &["primary"]);
    }
    stop.store(true, Ordering::SeqCst);
    redialer.join().expect("redialer");
    assert_eq!(*write_errors.lock().expect("lock"), Vec::<u32>::new(), "writes refused around a demotion");
    assert!(sessions.load(Ordering::SeqCst) >= CYCLES);
    let refusals = refusals.lock().expect("lock");
    assert!(!refusals.is_empty(), "the client redialed during a demotion and was refused");
    assert!(refusals.iter().all(|t| *t == 0x8000_0002), "ERR_POLICY each time: {refusals:x?}");
}
