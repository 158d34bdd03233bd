//! DRAFT (issue 13), not compiled by cargo: disk failures, hung and slow peers,
//! full thin stores, on real processes under verifying writers. Written against
//! the behaviour issue 13 specifies; move to `tests/tests/` once it exists and
//! adapt names where the implementation chose differently (each assumption is
//! marked ASSUMES).
//!
//! The faults come from `blockd_tests::faultdisk::FaultDisk` (nbdkit's error,
//! pause and delay filters behind nbdfuse) and `blockd_tests::smallfs::SmallFs`
//! (a sparse store on a small filesystem that is filled on demand), given to a
//! node through `PairOpts::disks`. After each fault: no acknowledged write is
//! lost, no Primary serves stale data, and the copies are equal after repair and
//! resync.
//!
//! ASSUMES (from issue 13 and SPEC §8.2):
//! - `[resource]` keys `on-io-error = "detach" | "pass-on"` (default detach) and
//!   `ack-timeout` (a duration; written `"2s"` here — adapt to the parser).
//! - `status --json`: `disk` is `Failed` then `Diskless` after an I/O error with
//!   detach; `disk_error` names the errno, the operation and the offset (the
//!   words `EIO`/`Input/output error`, `write`, `offset`); the peer's `disk` as
//!   seen by the other node leaves `UpToDate` (Diskless, Failed or Outdated).
//! - events: a `device` change with `disk` `Failed` and `Diskless`.
//! - verbs `blockctl detach-disk` and `blockctl attach-disk`; `create-md --force`
//!   works on a running node whose disk is detached (the disk's lock is released).
//! - Promotion of a node whose disk is not UpToDate is refused (exit 1, the reason
//!   names the disk state) unless the peer is UpToDate and connected, when it
//!   becomes a diskless Primary serving through the peer.
//! - A diskless Primary without an UpToDate connected peer answers EIO.
//! - ENOSPC on a Primary is answered ENOSPC (NBD error 28) and does not detach
//!   the disk; on a Secondary it is a failed peer write.
//! - After a failed local or peer write, the range is out of sync until resynced:
//!   the copies never differ where out_of_sync_bytes says they do not.
//!
//! CI cost: each test runs a bounded writer (seconds) on a 64–256 MiB pair;
//! about 3 minutes in all on 2 cores, most of it waiting for resyncs.

use std::time::Duration;

use blockd_tests::faultdisk::{FaultOpts, FaultScope};
use blockd_tests::loadgen::{AckLog, LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::{DiskSpec, NODES, Pair, PairOpts};
use blockd_tests::pattern::{file_reader, nbd_reader};
use blockd_tests::raw::{CMD_READ, CMD_WRITE, RawClient, Reply};
use blockd_tests::smallfs::SmallFsKind;
use blockd_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const BS: u32 = 4096;
const NBD_EIO: u32 = 5;
const NBD_ENOSPC: u32 = 28;
/// The disk states a node leaves UpToDate for after a failure.
const NOT_UP_TO_DATE: [&str; 3] = ["Diskless", "Failed", "Outdated"];

fn random_seed() -> u64 {
    let seed =
        std::env::var("BLOCKD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with BLOCKD_FUZZ_SEED={seed})");
    seed
}

fn fault() -> DiskSpec {
    DiskSpec::Fault(FaultOpts::default())
}

fn thin_ext4() -> DiskSpec {
    DiskSpec::SmallFs { kind: SmallFsKind::Ext4, fs_bytes: 32 * MIB }
}

/// A pair with alpha Primary, both Established.
fn start(label: &str, opts: PairOpts) -> Pair {
    let mut p = Pair::start(label, &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    p
}

fn nbd(p: &Pair, n: usize) -> Addr {
    Addr::Unix(p.nodes[n].nbd.clone())
}

/// A verifying writer on alpha: 4 connections, 4 KiB blocks in `region`.
fn writer(p: &Pair, region_offset: u64, region_bytes: u64) -> LoadGen {
    writer_for(p, region_offset, region_bytes, Duration::from_secs(120))
}

/// [`writer`] that stops by itself after `duration`.
fn writer_for(p: &Pair, region_offset: u64, region_bytes: u64, duration: Duration) -> LoadGen {
    let opts = LoadOpts {
        connections: 4,
        region_offset,
        region_bytes,
        flush_every: Some(128),
        seed: random_seed(),
        max_duration: duration,
        ..LoadOpts::default()
    };
    LoadGen::start(&nbd(p, 0), EXPORT, opts)
}

/// The end of every test: both nodes stopped cleanly, beta's store holds every
/// write `log` acknowledged, and the copies are equal.
fn stop_and_compare(p: &mut Pair, log: &AckLog, size: u64) {
    p.stop_node(0);
    p.stop_node(1);
    verify_acked(log, file_reader(p.store_path(1), BS)).expect("beta's store holds every acknowledged write");
    assert_stores_equal(p, size);
}

/// Reconnects (the out-of-sync ranges are resynced on connect), waits until in
/// sync, then [`stop_and_compare`].
fn resync_and_compare(p: &mut Pair, log: &AckLog, size: u64) {
    p.ctl_ok(0, &["disconnect"]);
    p.ctl_ok(0, &["connect"]);
    p.wait_synced(WAIT);
    stop_and_compare(p, log, size);
}

/// `status[key]` of node `n` as a string ("" when it does not answer).
fn field(p: &Pair, n: usize, key: &str) -> String {
    p.try_status(n).and_then(|s| s[key].as_str().map(String::from)).unwrap_or_default()
}

fn peer_field(p: &Pair, n: usize, key: &str) -> String {
    p.peer(n)[key].as_str().unwrap_or_default().to_string()
}

fn wait_disk(p: &mut Pair, n: usize, want: &[&str]) {
    let what = format!("{}'s disk one of {want:?}", NODES[n]);
    p.wait(WAIT, |p| want.contains(&field(p, n, "disk").as_str()), &what);
}

fn wait_peer_disk(p: &mut Pair, n: usize, want: &[&str]) {
    let what = format!("{}'s view of its peer's disk one of {want:?}", NODES[n]);
    p.wait(WAIT, |p| want.contains(&peer_field(p, n, "disk").as_str()), &what);
}

/// `disk_error` says what failed: the errno, the operation and the offset.
fn assert_disk_error(p: &Pair, n: usize, errno_words: &[&str]) {
    let s = p.status(n);
    let e = s["disk_error"].as_str().unwrap_or_else(|| panic!("{}: no disk_error in {s}", NODES[n]));
    assert!(
        errno_words.iter().any(|w| e.contains(w)),
        "{}: disk_error {e:?} names no errno {errno_words:?}",
        NODES[n]
    );
    assert!(
        e.contains("write") && e.contains("offset"),
        "{}: disk_error {e:?} lacks the operation or the offset",
        NODES[n]
    );
}

/// Stops the writer and checks the client saw no error and no dead connection.
fn finish_clean(load: LoadGen) -> AckLog {
    load.stop();
    let log = load.finish();
    assert_eq!(log.error_count(), 0, "the client saw errors: {}", log.summary());
    assert_eq!(log.connections_died(), 0, "connections died: {}", log.summary());
    log
}

/// The NBD errors the client got, all of them `want`, at least one.
fn assert_all_errors_are(log: &AckLog, want: u32) {
    let errs: Vec<u32> = log.writes.iter().filter_map(|w| w.error).collect();
    assert!(!errs.is_empty(), "no write failed: {}", log.summary());
    assert!(errs.iter().all(|&e| e == want), "errors other than {want}: {:?}", &errs[..errs.len().min(20)]);
}

/// One request on a fresh connection to node `n` (a Primary): the NBD error, 0
/// for success. Reads are discarded; the point is whether stale data is served.
fn probe(p: &Pair, n: usize, cmd: u16, offset: u64) -> u32 {
    let (mut c, _, _) = RawClient::handshake(&nbd(p, n), EXPORT, false);
    let data = vec![0x3c; BS as usize];
    let payload: &[u8] = if cmd == CMD_WRITE { &data } else { &[] };
    c.request(0, cmd, 1, offset, BS, payload).expect("send");
    match c.read_reply().expect("reply") {
        Reply::Simple { error: 0, .. } if cmd == CMD_READ => {
            let mut buf = vec![0u8; BS as usize];
            c.read_exact(&mut buf).expect("read data");
            0
        }
        Reply::Simple { error, .. } => error,
        r => panic!("unexpected reply {r:?}"),
    }
}

/// The data areas of both stores (read around the faults) are equal.
fn assert_stores_equal(p: &Pair, bytes: u64) {
    let (mut a, mut b) = (file_reader(p.store_path(0), BS), file_reader(p.store_path(1), BS));
    let first = (0..bytes / BS as u64).find(|&i| a(i) != b(i));
    assert_eq!(first, None, "the copies differ (first at block {first:?})");
}

/// No silent divergence: where the stores differ, the Primary counts the bytes
/// out of sync.
fn assert_divergence_tracked(p: &Pair, primary: usize, bytes: u64) {
    let (mut a, mut b) = (file_reader(p.store_path(0), BS), file_reader(p.store_path(1), BS));
    let differ = (0..bytes / BS as u64).filter(|&i| a(i) != b(i)).count() as u64 * BS as u64;
    let oos = p.peer_u64(primary, "out_of_sync_bytes");
    assert!(differ <= oos, "the copies differ in {differ} bytes but only {oos} are out of sync");
}

/// The export size (data area), from the Primary `n`.
fn data_bytes(p: &Pair, n: usize) -> u64 {
    p.export_size(n)
}

// ---------------------------------------------------------------------------
// 1. The Secondary's disk fails.

fn secondary_disk_fails(external_meta: bool) {
    let opts = PairOpts { disks: [DiskSpec::Plain, fault()], external_meta, ..PairOpts::default() };
    let mut p = start("df-sec-eio", opts);
    let size = data_bytes(&p, 0);
    let mut events = p.events(1, true);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    p.fault(1).fail(FaultScope::Writes);
    wait_disk(&mut p, 1, &["Failed", "Diskless"]);
    assert_disk_error(&p, 1, &["EIO", "Input/output error"]);
    wait_disk(&mut p, 1, &["Diskless"]);
    events.wait_for(WAIT, "device Failed", |o| o["object"] == "device" && o["disk"] == "Failed");
    events.wait_for(WAIT, "device Diskless", |o| o["object"] == "device" && o["disk"] == "Diskless");
    let log1 = p.daemon(1).log();
    assert!(log1.contains("Input/output error") || log1.contains("EIO"), "beta's log says nothing:\n{log1}");
    wait_peer_disk(&mut p, 0, &NOT_UP_TO_DATE);
    assert_ne!(field(&p, 1, "disk"), "UpToDate");

    // The Primary keeps serving and tracks what beta misses.
    let before = load.acked();
    load.wait_acked(before + 2000, WAIT);
    let log = finish_clean(load);
    assert!(p.peer_u64(0, "out_of_sync_bytes") > 0, "alpha tracks what beta missed");
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha serves every acknowledged write");

    // beta's data is behind: never a Primary serving it. With alpha connected and
    // UpToDate, beta may become a diskless Primary that serves alpha's data...
    p.ctl_ok(0, &["secondary"]);
    let out = p.ctl(1, &["primary"]);
    if out.status.success() {
        assert_eq!(field(&p, 1, "disk"), "Diskless", "a promoted failed node is diskless");
        verify_acked(&log, nbd_reader(&nbd(&p, 1), EXPORT, BS))
            .expect("the diskless Primary serves the peer's (current) data");
        p.ctl_ok(1, &["secondary"]);
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", out.describe());
        assert!(out.stderr.contains("disk"), "the refusal says why:\n{}", out.describe());
    }
    // ... and without its peer it is refused.
    p.stop_node(0);
    p.wait(WAIT, |p| peer_field(p, 1, "connection") != "Connected", "beta sees alpha gone");
    p.ctl_refused(1, &["primary"], 1, "Diskless");
    p.start_node(0);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") == "Connected", "alpha reconnects");
    p.ctl_ok(0, &["primary"]);

    // Repair: a healthy disk, new metadata, attach, full resync, equal copies.
    p.fault(1).heal();
    p.ctl_ok(1, &["create-md", "--force"]);
    p.ctl_ok(1, &["attach-disk"]);
    p.wait_synced(WAIT);
    assert_eq!(field(&p, 1, "disk_error"), "", "the error is gone after repair");
    stop_and_compare(&mut p, &log, size);
}

/// The data and the metadata (internal) fail together.
#[test]
fn a_failing_secondary_disk_is_detached_and_the_client_sees_nothing() {
    secondary_disk_fails(false);
}

/// Only the data area fails (external metadata): the failed writes must still
/// detach the disk, not just set bits (today: beta stays UpToDate, 16 MiB lost
/// on failover).
#[test]
fn a_failing_secondary_data_area_is_detached_even_with_healthy_metadata() {
    secondary_disk_fails(true);
}

// ---------------------------------------------------------------------------
// 2. The Primary's disk fails: it goes on as a diskless Primary.

fn primary_disk_fails(protocol: char) {
    let opts = PairOpts { protocol, disks: [fault(), DiskSpec::Plain], ..PairOpts::default() };
    let mut p = start(&format!("df-pri-{protocol}"), opts);
    let size = data_bytes(&p, 0);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    // Reads fail too: they must be served by the peer.
    p.fault(0).fail(FaultScope::ReadsAndWrites);
    wait_disk(&mut p, 0, &["Diskless"]);
    assert_disk_error(&p, 0, &["EIO", "Input/output error"]);
    assert_eq!(field(&p, 0, "role"), "Primary");
    wait_peer_disk(&mut p, 1, &["Diskless"]);
    let before = load.acked();
    load.wait_acked(before + 2000, WAIT);
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS))
        .expect("the diskless Primary reads from its peer");
    verify_acked(&log, file_reader(p.store_path(1), BS))
        .expect("acknowledged = on the peer (protocol C semantics while diskless, whatever the protocol)");

    // Without its peer a diskless Primary answers EIO: never stale data.
    p.stop_node(1);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") != "Connected", "alpha sees beta gone");
    assert_eq!(probe(&p, 0, CMD_READ, 0), NBD_EIO, "a read on a diskless Primary without its peer");
    assert_eq!(probe(&p, 0, CMD_WRITE, 0), NBD_EIO, "a write on a diskless Primary without its peer");
    p.start_node(1);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") == "Connected", "beta reconnects");

    // Repair alpha's disk in place.
    p.fault(0).heal();
    p.ctl_ok(0, &["create-md", "--force"]);
    p.ctl_ok(0, &["attach-disk"]);
    p.wait_synced(WAIT);
    verify_acked(&log, file_reader(p.store_path(0), BS)).expect("alpha's store after resync");
    stop_and_compare(&mut p, &log, size);
}

#[test]
fn a_failing_primary_disk_is_invisible_to_the_client_protocol_c() {
    primary_disk_fails('C');
}

#[test]
fn a_failing_primary_disk_is_invisible_to_the_client_protocol_a() {
    primary_disk_fails('A');
}

/// A Primary whose writes fail with `errno` but which keeps its disk: the client
/// gets exactly that error, the disk stays attached, and where the peer wrote
/// what failed here the range is out of sync (no silent divergence). After
/// `heal`, writes succeed and a resync makes the copies equal.
fn errors_reach_the_client_and_the_disk_stays(
    mut p: Pair,
    errno: u32,
    region: (u64, u64),
    fail: impl Fn(&Pair),
    heal: impl Fn(&Pair),
) {
    let size = data_bytes(&p, 0);
    fail(&p);
    let log = writer_for(&p, region.0, region.1, Duration::from_secs(2)).finish();
    assert_all_errors_are(&log, errno);
    assert!(!["Failed", "Diskless"].contains(&field(&p, 0, "disk").as_str()), "the disk stays attached");
    assert_divergence_tracked(&p, 0, size);

    heal(&p);
    let load = writer(&p, region.0, region.1.min(16 * MIB));
    load.wait_acked(2000, WAIT);
    let log = finish_clean(load);
    resync_and_compare(&mut p, &log, size);
}

/// `on-io-error = "pass-on"`: the client gets the EIO and the disk stays.
#[test]
fn pass_on_returns_eio_and_keeps_the_disk() {
    let opts = PairOpts {
        disks: [fault(), DiskSpec::Plain],
        external_meta: true,
        extra_resource: "on-io-error = \"pass-on\"\n".into(),
        ..PairOpts::default()
    };
    let p = start("df-pass-on", opts);
    errors_reach_the_client_and_the_disk_stays(
        p,
        NBD_EIO,
        (0, 8 * MIB),
        |p| p.fault(0).fail(FaultScope::Writes),
        |p| p.fault(0).heal(),
    );
}

// ---------------------------------------------------------------------------
// 3. A hung disk on a live peer: ack-timeout.

/// The Secondary's disk hangs (its process keeps answering pings): after
/// `ack-timeout` the Primary drops it and writes go on locally, tracked in the
/// bitmap (today they stall for good). When the disk comes back, the pair
/// reconnects and resyncs.
#[test]
fn a_hung_secondary_disk_is_dropped_after_ack_timeout() {
    let opts = PairOpts {
        disks: [DiskSpec::Plain, fault()],
        extra_resource: "ack-timeout = \"2s\"\n".into(),
        ..PairOpts::default()
    };
    let mut p = start("df-hung", opts);
    let size = data_bytes(&p, 0);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    p.fault(1).pause();
    // The writer's own reply timeout (20 s) is far above ack-timeout: it sees
    // writes continue, not a dead connection.
    let before = load.acked();
    load.wait_acked(before + 2000, WAIT);
    p.wait(
        WAIT,
        |p| peer_field(p, 0, "connection") != "Connected" || p.peer_u64(0, "out_of_sync_bytes") > 0,
        "alpha dropped the hung peer and tracks its writes",
    );
    assert!(alpha_log(&p).contains("ack"), "alpha's log says why it dropped beta:\n{}", alpha_log(&p));

    p.fault(1).resume();
    p.wait_synced(WAIT);
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha");
    stop_and_compare(&mut p, &log, size);
}

fn alpha_log(p: &Pair) -> String {
    p.nodes[0].daemon.as_ref().map(|d| d.log()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// 4. Bounds: protocol A with a slow Secondary.

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// A bound far above any sane queue limit and far below what an unbounded queue
/// reaches (measured before issue 13: 1.3 GiB after 4 s, 6 GiB after 22 s).
const RSS_BOUND_MIB: u64 = 512;

/// Protocol A, the Secondary's writes 20 ms slow, a 4 KiB random writer for
/// 15 s: neither node's RSS passes the bound (the Secondary stops reading its
/// socket when its apply queue is full; the Primary's send buffer is bounded and
/// the writer is slowed or pulled ahead), and the copies end equal.
#[test]
fn protocol_a_with_a_slow_secondary_keeps_both_nodes_bounded() {
    let slow = DiskSpec::Fault(FaultOpts { write_delay_ms: 20, ..FaultOpts::default() });
    let opts = PairOpts {
        protocol: 'A',
        disks: [DiskSpec::Plain, slow],
        disk_bytes: 256 * MIB,
        ..PairOpts::default()
    };
    let mut p = start("df-slow-a", opts);
    let size = data_bytes(&p, 0);
    let pids = [0, 1].map(|n| p.daemon(n).pid().expect("running"));
    let load = LoadGen::start(
        &nbd(&p, 0),
        EXPORT,
        LoadOpts {
            connections: 4,
            queue_depth: 8,
            region_bytes: 128 * MIB,
            seed: random_seed(),
            max_duration: Duration::from_secs(15),
            ..LoadOpts::default()
        },
    );
    let mut peak = [0u64; 2];
    while load.running() > 0 {
        for (n, pid) in pids.iter().enumerate() {
            peak[n] = peak[n].max(rss_mib(*pid));
            assert!(peak[n] < RSS_BOUND_MIB, "{}'s RSS reached {} MiB under protocol A", NODES[n], peak[n]);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("peak RSS: alpha {} MiB, beta {} MiB", peak[0], peak[1]);
    let log = load.finish();
    assert_eq!(log.error_count(), 0, "{}", log.summary());
    p.wait_synced(Duration::from_secs(180));
    stop_and_compare(&mut p, &log, size);
}

// ---------------------------------------------------------------------------
// 5. ENOSPC on thin stores.

/// A Primary on a full thin store: the client gets ENOSPC (not EIO, not
/// success) and the disk stays (ENOSPC is not a dying disk). External metadata:
/// with internal metadata on a thin store the first activity-log write itself
/// meets ENOSPC (the metadata area is a hole; measured), which is a metadata
/// failure, not this case.
#[test]
fn enospc_on_a_primary_is_returned_to_the_client() {
    let opts = PairOpts {
        disks: [thin_ext4(), DiskSpec::Plain],
        external_meta: true,
        disk_bytes: 256 * MIB,
        ..PairOpts::default()
    };
    let p = start("df-enospc-pri", opts);
    errors_reach_the_client_and_the_disk_stays(
        p,
        NBD_ENOSPC,
        (64 * MIB, 64 * MIB),
        |p| {
            p.small_fs(0).fill();
        },
        |p| p.small_fs(0).release(),
    );
}

/// A Secondary on a full thin store: a failed peer write. The client sees
/// nothing, the Primary's view of the peer leaves UpToDate and tracks the range,
/// the Secondary cannot be promoted alone, and after space is freed and the disk
/// repaired the copies are equal.
#[test]
fn enospc_on_a_secondary_is_a_failed_peer_write() {
    let opts =
        PairOpts { disks: [DiskSpec::Plain, thin_ext4()], disk_bytes: 256 * MIB, ..PairOpts::default() };
    let mut p = start("df-enospc-sec", opts);
    let size = data_bytes(&p, 0);
    p.small_fs(1).fill();
    let load = writer(&p, 64 * MIB, 64 * MIB);
    load.wait_acked(5000, WAIT);
    wait_peer_disk(&mut p, 0, &NOT_UP_TO_DATE);
    let log = finish_clean(load);
    assert_divergence_tracked(&p, 0, size);

    p.stop_node(0);
    p.wait(WAIT, |p| peer_field(p, 1, "connection") != "Connected", "beta sees alpha gone");
    let out = p.ctl(1, &["primary"]);
    assert_eq!(out.status.code(), Some(1), "beta is behind and alone: promotion refused\n{}", out.describe());
    p.start_node(0);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") == "Connected", "alpha reconnects");
    p.ctl_ok(0, &["primary"]);

    p.small_fs(1).release();
    if ["Failed", "Diskless"].contains(&field(&p, 1, "disk").as_str()) {
        // ASSUMES: the metadata survived (only data writes met ENOSPC), so no
        // create-md: attach-disk brings the same disk back for a bitmap resync.
        if field(&p, 1, "disk") != "Diskless" {
            p.ctl_ok(1, &["detach-disk"]);
        }
        p.ctl_ok(1, &["attach-disk"]);
        p.wait_synced(WAIT);
        stop_and_compare(&mut p, &log, size);
    } else {
        resync_and_compare(&mut p, &log, size);
    }
}

// ---------------------------------------------------------------------------
// 6. Repair verbs on healthy disks.

/// `detach-disk` on the Secondary under load: Diskless, the client sees
/// nothing; its disk is replaced by an empty one (`create-md`), `attach-disk`
/// full-syncs it. Then `detach-disk` on the Primary: it serves through the peer;
/// `attach-disk` of the same disk resyncs only what changed (bitmap), as the
/// generations say.
#[test]
fn detach_and_attach_disk_replace_disks_under_load() {
    let mut p = start("df-repair", PairOpts { external_meta: true, ..PairOpts::default() });
    let size = data_bytes(&p, 0);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    p.ctl_ok(1, &["detach-disk"]);
    wait_disk(&mut p, 1, &["Diskless"]);
    wait_peer_disk(&mut p, 0, &["Diskless"]);
    // A new, empty disk in its place.
    let store = p.store_path(1).to_path_buf();
    std::fs::File::create(&store).and_then(|f| f.set_len(size)).expect("replace beta's disk");
    p.ctl_ok(1, &["create-md", "--force"]);
    p.ctl_ok(1, &["attach-disk"]);
    p.wait(WAIT, |p| peer_field(p, 0, "replication") == "SyncSource" || p.is_synced(), "full sync starts");
    p.wait_synced(WAIT);

    p.ctl_ok(0, &["detach-disk"]);
    wait_disk(&mut p, 0, &["Diskless"]);
    assert_eq!(field(&p, 0, "role"), "Primary");
    let before = load.acked();
    load.wait_acked(before + 2000, WAIT);
    p.ctl_ok(0, &["attach-disk"]);
    p.wait_synced(WAIT);
    let resynced = p.peer_u64(1, "resync_sent_bytes");
    assert!(resynced < size, "attaching the same disk resyncs what changed, not all ({resynced} bytes)");

    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha");
    stop_and_compare(&mut p, &log, size);
}
