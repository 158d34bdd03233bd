//! Issue 13: a node's own disk fails, fills up or is replaced, on real processes
//! under a verifying protocol C writer (`LoadGen`, 4 connections, FLUSH every 128
//! writes). The faults: nbdkit's error filter behind nbdfuse (`FaultDisk`: EIO on
//! writes, switched at runtime) and a sparse store on a small ext4 that is filled
//! on demand (`SmallFs`: ENOSPC into holes), and a hung disk (nbdkit's pause
//! filter: `ack-timeout`). After each: no acknowledged write is lost, no Primary
//! serves stale data (a node that missed writes is promoted only as a diskless
//! Primary serving its UpToDate peer's data, never alone), and after repair
//! (`attach-disk`) and resync the copies are equal (`verify` finds 0 bytes out of
//! sync, the stores are byte-identical, and beta's store holds every acknowledged
//! write). A Primary whose disk fails goes on through its peer; the client sees
//! nothing.
//!
//! Each test prints what the client saw and what both nodes' status said
//! (`eprintln!`, visible with `--nocapture`), for the closing note.
//!
//! Not here yet (in `tests/drafts/disk_faults.rs`): two defects found while
//! writing these.
//!
//! Needs root, FUSE, loop devices, nbdkit, nbdfuse, mkfs.ext4 (like
//! `faultdisk_selftest.rs`). About a minute in all.

use std::path::Path;
use std::time::{Duration, Instant};

use blockd_tests::faultdisk::{FaultOpts, FaultScope};
use blockd_tests::loadgen::{AckLog, LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::{DiskSpec, NODES, Pair, PairOpts};
use blockd_tests::pattern::{file_reader, nbd_reader};
use blockd_tests::raw::{CMD_READ, CMD_WRITE, RawClient, Reply};
use blockd_tests::scatter::{assert_data_equal, data_segments, merge};
use blockd_tests::smallfs::SmallFsKind;
use blockd_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const BS: u32 = 4096;
const NBD_EIO: u32 = 5;
const NBD_OK: u32 = 0;
const NBD_ENOSPC: u32 = 28;

fn random_seed() -> u64 {
    let seed =
        std::env::var("BLOCKD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with BLOCKD_FUZZ_SEED={seed})");
    seed
}

fn fault() -> DiskSpec {
    DiskSpec::Fault(FaultOpts::default())
}

/// A 256 MiB sparse store on a 32 MiB ext4: writes into holes fail with ENOSPC
/// once [`blockd_tests::smallfs::SmallFs::fill`] took the free blocks.
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

/// A verifying writer on alpha: 4 connections, 4 KiB blocks in `region`, a FLUSH
/// every 128 writes per connection, at most `duration`.
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

/// [`writer_for`] that runs until stopped (bounded at 2 minutes).
fn writer(p: &Pair, region_offset: u64, region_bytes: u64) -> LoadGen {
    writer_for(p, region_offset, region_bytes, Duration::from_secs(120))
}

/// `status[key]` of node `n` as a string ("" when absent or not answering).
fn field(p: &Pair, n: usize, key: &str) -> String {
    p.try_status(n).and_then(|s| s[key].as_str().map(String::from)).unwrap_or_default()
}

fn peer_field(p: &Pair, n: usize, key: &str) -> String {
    p.peer(n)[key].as_str().unwrap_or_default().to_string()
}

fn wait_disk(p: &mut Pair, n: usize, want: &str) {
    let what = format!("{}'s disk {want}", NODES[n]);
    p.wait(WAIT, |p| field(p, n, "disk") == want, &what);
}

fn wait_peer_disk(p: &mut Pair, n: usize, want: &str) {
    let what = format!("{}'s view of its peer's disk {want}", NODES[n]);
    p.wait(WAIT, |p| peer_field(p, n, "disk") == want, &what);
}

/// The daemon's PID, from its status.
fn pid(p: &Pair, n: usize) -> u64 {
    p.status(n)["pid"].as_u64().expect("status has pid")
}

/// One line per node for the report: role, disk, peer view, out of sync, errors.
fn report(p: &Pair, when: &str) {
    for (n, name) in NODES.iter().enumerate() {
        let Some(s) = p.try_status(n) else {
            eprintln!("[{when}] {name}: not answering");
            continue;
        };
        let peer = &s["peers"][0];
        eprintln!(
            "[{when}] {name}: role {} disk {} | peer {} {} disk {} out_of_sync {} | io_errors {} disk_failure {} \
             disk_error {}",
            s["role"],
            s["disk"],
            peer["connection"],
            peer["replication"],
            peer["disk"],
            peer["out_of_sync_bytes"],
            s["io_errors"],
            s["disk_failure"],
            s["disk_error"],
        );
    }
}

/// Node `n`'s `disk_failure` says what failed with `errno` (`errno_name`): an
/// operation, and the errno's name (`EIO: I/O error`); `disk_error` repeats it in
/// words. Returns the object.
fn assert_disk_failure(p: &Pair, n: usize, errno: i32, errno_name: &str) -> Value {
    let s = p.status(n);
    let f = &s["disk_failure"];
    assert_eq!(f["errno"].as_i64(), Some(i64::from(errno)), "{}: disk_failure {f} in {s}", NODES[n]);
    let name = f["errno_name"].as_str().unwrap_or_default();
    assert!(name.starts_with(errno_name), "{}: errno_name {name:?} is not {errno_name}: {f}", NODES[n]);
    assert!(f["op"].as_str().is_some_and(|op| !op.is_empty()), "{}: disk_failure without op: {f}", NODES[n]);
    let e = s["disk_error"].as_str().unwrap_or_else(|| panic!("{}: no disk_error in {s}", NODES[n]));
    assert!(
        e.contains(f["op"].as_str().unwrap_or("?")),
        "{}: disk_error {e:?} does not name the op",
        NODES[n]
    );
    f.clone()
}

/// A data write failed (a Secondary's `replicated write`), at an offset inside
/// the device.
fn assert_write_failed_at_offset(failure: &Value, size: u64) {
    assert_eq!(failure["op"], "replicated write", "{failure}");
    let offset = failure["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {failure}"));
    assert!(offset < size, "offset {offset} outside the {size}-byte device");
}

/// Stops the writer and checks the client saw no error and no dead connection.
fn finish_clean(load: LoadGen) -> AckLog {
    load.stop();
    let log = load.finish();
    eprintln!("client: {}", log.summary());
    assert_eq!(log.error_count(), 0, "the client saw errors: {}", log.summary());
    assert_eq!(log.connections_died(), 0, "connections died: {}", log.summary());
    log
}

/// The NBD errors the client got: all of them `want`, at least one.
fn assert_all_errors_are(log: &AckLog, want: u32) {
    let errs: Vec<u32> = log.writes.iter().filter_map(|w| w.error).collect();
    eprintln!("client: {} ({} write errors, all {want}?)", log.summary(), errs.len());
    assert!(!errs.is_empty(), "no write failed: {}", log.summary());
    assert!(errs.iter().all(|&e| e == want), "errors other than {want}: {:?}", &errs[..errs.len().min(20)]);
}

/// `blockctl verify` on the Primary `n` finds nothing out of sync.
fn assert_verify_clean(p: &Pair, n: usize) {
    let out = p.ctl_ok(n, &["verify"]);
    eprintln!("{}", out.stdout.trim());
    assert!(
        out.stdout.starts_with("verify: 0 bytes out of sync"),
        "verify found differences:\n{}",
        out.describe()
    );
}

/// Promotion of node `n` (diskless, its peer not connected) is refused, with and
/// without --force, and the reason names the case.
fn assert_promotion_refused(p: &Pair, n: usize) {
    for args in [&["primary"][..], &["primary", "--force"]] {
        let out = p.ctl_refused(n, args, 1, "Diskless");
        eprintln!("{} {args:?} refused: {}", NODES[n], out.stderr.trim());
    }
    assert_eq!(field(p, n, "role"), "Secondary");
}

/// Node `n` (diskless, its peer connected, UpToDate and Secondary) is promoted: a
/// diskless Primary, serving its peer's data: every write `log` acknowledged
/// (never stale data). Then it is demoted again.
fn diskless_primary_serves_the_peers_data(p: &mut Pair, n: usize, log: &AckLog) {
    p.ctl_ok(n, &["primary"]);
    assert_eq!((field(p, n, "role").as_str(), field(p, n, "disk").as_str()), ("Primary", "Diskless"));
    report(p, &format!("{} promoted without its disk", NODES[n]));
    verify_acked(log, nbd_reader(&nbd(p, n), EXPORT, BS))
        .expect("the diskless Primary serves the peer's data");
    // The reader's connection may still be counted for a moment after it closed.
    p.wait(WAIT, |p| p.ctl(n, &["secondary"]).status.success(), "demoted once the reader is gone");
}

/// `attach-disk` on node `n`: the same daemon process goes on with its disk.
fn attach_disk(p: &mut Pair, n: usize) {
    let before = pid(p, n);
    let out = p.ctl_ok(n, &["attach-disk"]);
    eprintln!("attach-disk: {}", out.stdout.trim());
    assert_eq!(pid(p, n), before, "attach-disk keeps the daemon's PID");
    assert!(p.daemon(n).is_running(), "{} still runs", NODES[n]);
}

/// The last resync alpha started as source was a full sync (`true`) or a bitmap
/// resync (`false`), from its log.
fn last_resync_was_full(p: &mut Pair) -> bool {
    let log = p.daemon(0).log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("resync as source") && l.contains("full="))
        .expect("alpha resynced as source");
    eprintln!("alpha: {}", line.trim());
    line.contains("full=true")
}

/// Bytes in 4 KiB blocks where the two stores differ within `[0, size)` (only
/// where either has data).
fn differing_bytes(a: &Path, b: &Path, size: u64) -> u64 {
    let mut segs = data_segments(a, size);
    segs.extend(data_segments(b, size));
    let (mut ra, mut rb) = (file_reader(a, BS), file_reader(b, BS));
    let mut differ = 0;
    for seg in merge(segs) {
        for block in seg.start / BS as u64..seg.end.div_ceil(BS as u64) {
            if ra(block) != rb(block) {
                differ += BS as u64;
            }
        }
    }
    differ
}

/// No silent divergence: where the stores differ, the Primary counts bytes out of
/// sync. Read before the stores (a running resync only clears bits), so what
/// differs while they are read was out of sync when it was taken.
fn assert_divergence_tracked(p: &Pair, primary: usize, size: u64) {
    let oos = p.peer_u64(primary, "out_of_sync_bytes");
    let differ = differing_bytes(p.store_path(0), p.store_path(1), size);
    eprintln!("stores differ in {differ} bytes; {} counts {oos} out of sync", NODES[primary]);
    assert!(differ <= oos, "the copies differ in {differ} bytes but only {oos} are out of sync");
}

/// The end of every test: both nodes stopped cleanly, beta's store holds every
/// write `log` acknowledged, and the stores are equal.
fn stop_and_compare(p: &mut Pair, log: &AckLog, size: u64) {
    p.stop_node(0);
    p.stop_node(1);
    verify_acked(log, file_reader(p.store_path(1), BS)).expect("beta's store holds every acknowledged write");
    let compared = assert_data_equal(p.store_path(0), p.store_path(1), size);
    eprintln!("stores equal ({compared} bytes of data compared)");
}

// ---------------------------------------------------------------------------
// The Secondary's disk fails (EIO on writes).

/// beta's disk starts failing writes under load. The client sees nothing; beta
/// goes Failed, then Diskless, saying what failed; alpha sees its peer Diskless
/// and tracks every write beta misses; beta is promoted only as a diskless Primary
/// serving alpha's data, never alone. Repair: the
/// faults stop and `attach-disk` brings the disk back, internal metadata after
/// `create-md --force` (a replaced disk: full sync), external metadata as it is
/// (bitmap resync).
fn secondary_disk_fails(label: &str, external_meta: bool) {
    let opts = PairOpts { disks: [DiskSpec::Plain, fault()], external_meta, ..PairOpts::default() };
    let mut p = start(label, opts);
    let size = p.export_size(0);
    let mut events = p.events(1, true);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    p.fault(1).fail(FaultScope::Writes);
    events.wait_for(WAIT, "beta's device Diskless", |o| o["object"] == "device" && o["disk"] == "Diskless");
    // Failed lasts while beta's other writes are still on the disk: an event of its
    // own unless the failed write was the only one (then both in one step).
    let disks: Vec<String> =
        events.json().iter().filter(|o| o["object"] == "device").map(|o| o["disk"].to_string()).collect();
    eprintln!("beta's device events: {}", disks.join(" → "));
    wait_disk(&mut p, 1, "Diskless");
    let failure = assert_disk_failure(&p, 1, libc::EIO, "EIO");
    if external_meta {
        // Only data I/O goes through the faults.
        assert_write_failed_at_offset(&failure, size);
    }
    let log1 = p.daemon(1).log();
    assert!(log1.contains("local disk failed"), "beta's log says nothing:\n{log1}");
    wait_peer_disk(&mut p, 0, "Diskless");
    report(&p, "beta detached");

    // alpha keeps serving and tracks what beta misses.
    let oos_before = p.peer_u64(0, "out_of_sync_bytes");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    let oos_after = p.peer_u64(0, "out_of_sync_bytes");
    eprintln!("alpha out_of_sync_bytes: {oos_before} at detach, {oos_after} after 2000 more writes");
    assert!(oos_after > oos_before, "alpha's out-of-sync count grows while beta is diskless");
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha serves every acknowledged write");
    assert_divergence_tracked(&p, 0, size);

    // beta's data is behind: promoted only to serve alpha's data through alpha;
    // alone, never.
    p.ctl_ok(0, &["secondary"]);
    diskless_primary_serves_the_peers_data(&mut p, 1, &log);
    p.stop_node(0);
    p.wait(WAIT, |p| peer_field(p, 1, "connection") != "Connected", "beta sees alpha gone");
    assert_promotion_refused(&p, 1);
    p.start_node(0);
    p.wait(WAIT, |p| peer_field(p, 0, "disk") == "Diskless", "alpha reconnects to diskless beta");
    p.ctl_ok(0, &["primary"]);

    if !external_meta {
        // The metadata is behind the faults too: attach-disk checks it takes a
        // write, and refuses with beta still running.
        let out = p.ctl_refused(1, &["attach-disk"], 1, "cannot be written");
        eprintln!("attach-disk before the repair: {}", out.stderr.trim());
        assert_eq!(field(&p, 1, "disk"), "Diskless");
    }

    // Repair.
    p.fault(1).heal();
    if !external_meta {
        // A replaced disk: new metadata while beta runs detached.
        p.ctl_ok(1, &["create-md", "--force"]);
    }
    attach_disk(&mut p, 1);
    p.wait_synced(WAIT);
    report(&p, "after attach-disk and resync");
    assert_eq!(last_resync_was_full(&mut p), !external_meta, "full sync for a new disk, else bitmap");
    assert!(p.status(1)["disk_failure"].is_null(), "the failure is gone after the repair");
    assert_verify_clean(&p, 0);
    stop_and_compare(&mut p, &log, size);
}

/// Data and metadata (internal) fail together; the disk is replaced.
#[test]
fn a_failing_secondary_disk_is_detached_and_the_client_sees_nothing() {
    secondary_disk_fails("df-sec-eio", false);
}

/// Only the data area fails (external metadata): the failed writes detach the
/// disk all the same; the repaired disk comes back with a bitmap resync.
#[test]
fn a_failing_secondary_data_area_is_detached_even_with_healthy_metadata() {
    secondary_disk_fails("df-sec-eio-ext", true);
}

// ---------------------------------------------------------------------------
// The Primary's disk fails: it goes on as a diskless Primary.

/// One request on a fresh connection to node `n` (a Primary): its NBD error (0:
/// success). A read's data is discarded: the point is whether it is served.
fn probe(p: &Pair, n: usize, cmd: u16, offset: u64) -> u32 {
    let (mut c, _, _) = RawClient::handshake(&nbd(p, n), EXPORT, false);
    let data = vec![0x3c; BS as usize];
    let payload: &[u8] = if cmd == CMD_WRITE { &data } else { &[] };
    c.request(0, cmd, 1, offset, BS, payload).expect("send");
    match c.read_reply().expect("reply") {
        Reply::Simple { error: NBD_OK, .. } if cmd == CMD_READ => {
            let mut buf = vec![0u8; BS as usize];
            c.read_exact(&mut buf).expect("read data");
            NBD_OK
        }
        Reply::Simple { error, .. } => error,
        r => panic!("unexpected reply {r:?}"),
    }
}

/// Repairs alpha's disk after alpha served as a diskless Primary: the role moves
/// to beta (`attach-disk` restarts the node, so not on a Primary), `create-md
/// --force` for a `replaced` disk, `attach-disk`, the resync, then the end checks.
fn repair_alpha_on_beta(p: &mut Pair, log: &AckLog, size: u64, replaced: bool) {
    p.ctl_refused(0, &["attach-disk"], 1, "move the Primary role first");
    p.ctl_ok(0, &["secondary"]);
    p.ctl_ok(1, &["primary"]);
    if replaced {
        p.ctl_ok(0, &["create-md", "--force"]);
    }
    attach_disk(p, 0);
    p.wait_synced(WAIT);
    report(p, "after attach-disk and resync");
    assert_verify_clean(p, 1);
    stop_and_compare(p, log, size);
}

/// alpha's disk fails reads and writes under load (protocol `protocol`): alpha
/// goes Diskless and stays Primary, serving reads from beta and writing to beta
/// only; the client sees no error, and every acknowledged write is on beta's disk
/// (protocol C semantics while diskless, whatever the protocol). Without beta,
/// alpha answers EIO to reads and writes: never stale data. Repair: the disk is
/// replaced (`create-md --force`) and attached once beta is Primary: full sync.
fn primary_disk_fails(protocol: char) {
    let opts = PairOpts { protocol, disks: [fault(), DiskSpec::Plain], ..PairOpts::default() };
    let mut p = start(&format!("df-pri-{protocol}"), opts);
    let size = p.export_size(0);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    p.fault(0).fail(FaultScope::ReadsAndWrites);
    wait_disk(&mut p, 0, "Diskless");
    assert_disk_failure(&p, 0, libc::EIO, "EIO");
    assert_eq!(field(&p, 0, "role"), "Primary");
    wait_peer_disk(&mut p, 1, "Diskless");
    report(&p, "alpha's disk failed");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS))
        .expect("the diskless Primary reads from its peer");
    verify_acked(&log, file_reader(p.store_path(1), BS)).expect("every acknowledged write is on beta");

    p.stop_node(1);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") != "Connected", "alpha sees beta gone");
    let (read, write) = (probe(&p, 0, CMD_READ, 0), probe(&p, 0, CMD_WRITE, 0));
    eprintln!("diskless alpha without beta: read → NBD error {read}, write → NBD error {write}");
    assert_eq!((read, write), (NBD_EIO, NBD_EIO), "a diskless Primary without its peer serves nothing");
    p.start_node(1);
    p.wait(WAIT, |p| peer_field(p, 0, "connection") == "Connected", "beta reconnects");
    report(&p, "beta back");

    p.fault(0).heal();
    repair_alpha_on_beta(&mut p, &log, size, true);
}

#[test]
fn a_failing_primary_disk_is_invisible_to_the_client_protocol_c() {
    primary_disk_fails('C');
}

#[test]
fn a_failing_primary_disk_is_invisible_to_the_client_protocol_a() {
    primary_disk_fails('A');
}

/// `detach-disk` on the Primary under load (beta connected and UpToDate): alpha
/// goes on Diskless, serving through beta; the client sees nothing. Refused while
/// beta is not connected. After the role moved to beta, `attach-disk` of the same
/// disk brings it back.
#[test]
fn detach_disk_on_the_primary_serves_through_the_peer() {
    let mut p = start("df-detach-pri", PairOpts { external_meta: true, ..PairOpts::default() });
    let size = p.export_size(0);
    p.ctl_ok(0, &["disconnect"]);
    p.ctl_refused(0, &["detach-disk"], 1, "not connected and UpToDate");
    p.ctl_ok(0, &["connect"]);
    p.wait_synced(WAIT);

    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);
    p.ctl_ok(0, &["detach-disk"]);
    wait_disk(&mut p, 0, "Diskless");
    assert_eq!(field(&p, 0, "role"), "Primary");
    report(&p, "alpha detached by the operator");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha serves through beta");

    repair_alpha_on_beta(&mut p, &log, size, false);
}

// ---------------------------------------------------------------------------
// ENOSPC on thin stores.

/// beta's thin store is full: its first write into a hole fails with ENOSPC,
/// which detaches it (a copy that missed a write is not UpToDate). The client
/// sees nothing; alpha tracks the range; after space is freed, `attach-disk` of
/// the same disk resyncs it (bitmap) and the copies are equal.
#[test]
fn enospc_on_a_secondary_detaches_it() {
    let opts =
        PairOpts { disks: [DiskSpec::Plain, thin_ext4()], disk_bytes: 256 * MIB, ..PairOpts::default() };
    let mut p = start("df-enospc-sec", opts);
    let size = p.export_size(0);
    let filler = p.small_fs(1).fill();
    eprintln!("beta's filesystem filled ({filler} bytes taken)");
    // 8 MiB: what the resync writes later fits the 32 MiB filesystem.
    let load = writer(&p, 64 * MIB, 8 * MIB);
    load.wait_acked(2000, WAIT);
    wait_disk(&mut p, 1, "Diskless");
    let failure = assert_disk_failure(&p, 1, libc::ENOSPC, "ENOSPC");
    assert_write_failed_at_offset(&failure, size);
    wait_peer_disk(&mut p, 0, "Diskless");
    report(&p, "beta full");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    let log = finish_clean(load);
    assert_divergence_tracked(&p, 0, size);
    p.ctl_ok(0, &["secondary"]);
    diskless_primary_serves_the_peers_data(&mut p, 1, &log);
    p.ctl_ok(0, &["primary"]);

    p.small_fs(1).release();
    attach_disk(&mut p, 1);
    p.wait_synced(WAIT);
    report(&p, "after release, attach-disk and resync");
    assert!(!last_resync_was_full(&mut p), "the same disk comes back with a bitmap resync");
    assert_verify_clean(&p, 0);
    stop_and_compare(&mut p, &log, size);
}

/// alpha (the Primary) keeps its disk while its writes fail with `errno`: the
/// client gets exactly that NBD error for them and nothing else, the disk stays
/// UpToDate, and where beta wrote what failed on alpha the range is out of sync
/// (resynced from alpha). After `heal`, writes succeed and the pair converges.
fn primary_errors_reach_the_client(
    mut p: Pair,
    errno: u32,
    region: (u64, u64),
    fail: impl Fn(&Pair),
    heal: impl Fn(&Pair),
) {
    let size = p.export_size(0);
    fail(&p);
    let log = writer_for(&p, region.0, region.1, Duration::from_secs(2)).finish();
    assert_all_errors_are(&log, errno);
    report(&p, "alpha's writes failing");
    assert_eq!(field(&p, 0, "disk"), "UpToDate", "the disk stays attached");
    assert!(p.status(0)["io_errors"].as_u64().unwrap_or(0) > 0, "alpha counts the errors");
    assert_divergence_tracked(&p, 0, size);

    heal(&p);
    let load = writer(&p, region.0, region.1.min(8 * MIB));
    load.wait_acked(2000, WAIT);
    let log = finish_clean(load);
    p.wait_synced(WAIT);
    report(&p, "after the repair");
    assert_eq!(field(&p, 0, "disk"), "UpToDate");
    assert_verify_clean(&p, 0);
    stop_and_compare(&mut p, &log, size);
}

/// alpha's (the Primary's) thin store is full: the client gets ENOSPC (28) for
/// writes into holes (a full disk works: it is not detached). External metadata:
/// internal metadata on a full thin store fails its own updates (the metadata area
/// is a hole), which is a metadata failure.
#[test]
fn enospc_on_a_primary_is_returned_to_the_client() {
    let opts = PairOpts {
        disks: [thin_ext4(), DiskSpec::Plain],
        external_meta: true,
        disk_bytes: 256 * MIB,
        ..PairOpts::default()
    };
    let p = start("df-enospc-pri", opts);
    primary_errors_reach_the_client(
        p,
        NBD_ENOSPC,
        (64 * MIB, 64 * MIB),
        |p| eprintln!("alpha's filesystem filled ({} bytes taken)", p.small_fs(0).fill()),
        |p| p.small_fs(0).release(),
    );
}

/// `on-io-error = "pass-on"`: a Primary's failing writes give the client EIO and
/// the disk stays (external metadata: only data I/O fails).
#[test]
fn pass_on_returns_eio_and_keeps_the_disk() {
    let opts = PairOpts {
        disks: [fault(), DiskSpec::Plain],
        external_meta: true,
        extra_resource: "on-io-error = \"pass-on\"\n".into(),
        ..PairOpts::default()
    };
    let p = start("df-pass-on", opts);
    primary_errors_reach_the_client(
        p,
        NBD_EIO,
        (0, 8 * MIB),
        |p| p.fault(0).fail(FaultScope::Writes),
        |p| p.fault(0).heal(),
    );
}

// ---------------------------------------------------------------------------
// A hung disk on a live peer: ack-timeout.

/// beta's disk hangs (nbdkit's pause filter; its process keeps answering pings)
/// under a protocol C writer: within `ack-timeout` (2 s) alpha drops beta and
/// writes go on locally, tracked in the bitmap (before issue 13 they stalled for
/// more than 40 s). The writer's own reply timeout (20 s, `raw::IO_TIMEOUT`) is the
/// test's bound: a longer stall is a dead connection and fails `finish_clean`;
/// the stall is measured and printed, not asserted. When the disk comes back, the
/// pair reconnects and resyncs, and the copies are equal.
#[test]
fn a_hung_secondary_disk_is_dropped_after_ack_timeout() {
    let opts = PairOpts {
        disks: [DiskSpec::Plain, fault()],
        extra_resource: "ack-timeout = \"2s\"\n".into(),
        ..PairOpts::default()
    };
    let mut p = start("df-hung", opts);
    let size = p.export_size(0);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);

    let paused = Instant::now();
    p.fault(1).pause();
    p.wait(WAIT, |p| peer_field(p, 0, "connection") != "Connected", "alpha drops the hung peer");
    let dropped = paused.elapsed();
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    eprintln!("alpha dropped beta {dropped:?} after the pause; writes went on ({} acked)", load.acked());
    report(&p, "beta's disk hung");
    assert!(p.peer_u64(0, "out_of_sync_bytes") > 0, "alpha tracks what beta did not confirm");
    let log = p.daemon(0).log();
    assert!(log.contains("ack-timeout"), "alpha's log says why it dropped beta:\n{log}");
    assert!(p.status(0)["ack_timeouts"].as_u64().unwrap_or(0) > 0, "alpha counts the ack timeouts");
    assert_eq!(field(&p, 0, "disk"), "UpToDate");

    p.fault(1).resume();
    p.wait_synced(WAIT);
    report(&p, "after resume and resync");
    let log = finish_clean(load);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha");
    assert_verify_clean(&p, 0);
    stop_and_compare(&mut p, &log, size);
}

// ---------------------------------------------------------------------------
// The repair verbs on a healthy pair.

/// `detach-disk` on beta while no node is Primary, then `attach-disk`: nothing
/// was written meanwhile, so the generations are equal and no bit is set, but
/// beta comes back Outdated (recorded after the detach, and by `attach-disk`'s
/// check). It must not stay Outdated for good (as it did before the connect
/// decision made an Outdated disk at the peer's generation a sync target).
#[test]
fn a_disk_attached_with_nothing_missed_becomes_up_to_date() {
    let mut p = Pair::start("df-attach-same", &PairOpts::default());
    p.wait_established();
    p.ctl_ok(1, &["detach-disk"]);
    wait_disk(&mut p, 1, "Diskless");
    attach_disk(&mut p, 1);
    p.wait_synced(WAIT);
    report(&p, "after attach-disk with nothing missed");
}

/// `detach-disk` / `attach-disk` round trip on the Secondary under load: the
/// client sees nothing; beta goes Diskless and its metadata is free (another
/// process can open it); `attach-disk` brings the same disk back in the same
/// process, with a bitmap resync of what it missed. Refusals name their reason.
#[test]
fn detach_and_attach_disk_round_trip_under_load() {
    let mut p = start("df-detach-attach", PairOpts::default());
    let size = p.export_size(0);

    // Refusals, before anything is detached.
    p.ctl_refused(0, &["attach-disk"], 1, "move the Primary role first");
    p.ctl_refused(1, &["attach-disk"], 1, "attached");
    p.ctl_refused(1, &["create-md", "--force"], 1, "in use");

    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);
    p.ctl_ok(1, &["detach-disk"]);
    wait_disk(&mut p, 1, "Diskless");
    wait_peer_disk(&mut p, 0, "Diskless");
    let failure = p.status(1)["disk_failure"].clone();
    assert_eq!(failure["op"], "detach-disk", "{failure}");
    // The metadata is closed: another process can open it (and create-md could).
    let dump = p.ctl_ok(1, &["dump-md"]);
    assert!(dump.stdout.contains("beta"), "dump-md of the detached disk:\n{}", dump.describe());
    p.ctl_ok(1, &["detach-disk"]); // idempotent
    report(&p, "beta detached by the operator");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);

    attach_disk(&mut p, 1);
    p.wait_synced(WAIT);
    report(&p, "after attach-disk");
    assert!(!last_resync_was_full(&mut p), "the same disk comes back with a bitmap resync");
    let acked = load.acked();
    load.wait_acked(acked + 1000, WAIT);
    let log = finish_clean(load);
    p.wait_synced(WAIT);
    assert_verify_clean(&p, 0);
    verify_acked(&log, nbd_reader(&nbd(&p, 0), EXPORT, BS)).expect("alpha serves every acknowledged write");
    stop_and_compare(&mut p, &log, size);
}

/// Before: beta's disk (internal metadata) failed its writes, so the Outdated
/// record after the detach never landed; restarted on the recovered disk with
/// alpha gone, beta came up UpToDate, `primary` was accepted, and it served 2,442
/// of 3,074 blocks without their acknowledged writes. Now a node that did not stop
/// cleanly is Consistent until it hears its peer, and is not promoted on its own.
#[test]
fn a_restarted_node_whose_failed_disk_missed_writes_is_not_promoted() {
    let opts = PairOpts { disks: [DiskSpec::Plain, fault()], ..PairOpts::default() };
    let mut p = start("df-restart-stale", opts);
    let load = writer(&p, 0, 16 * MIB);
    load.wait_acked(2000, WAIT);
    p.fault(1).fail(FaultScope::Writes);
    wait_disk(&mut p, 1, "Diskless");
    let acked = load.acked();
    load.wait_acked(acked + 2000, WAIT);
    let log = finish_clean(load);
    p.stop_node(0);
    // A detached node exits 1 (not a clean stop).
    let status = p.daemon(1).stop();
    assert_eq!(status.code(), Some(1));
    p.nodes[1].daemon = None;
    p.fault(1).heal();
    p.start_node(1);
    assert_eq!(field(&p, 1, "disk"), "Consistent", "not UpToDate before its peer is heard");
    p.ctl_refused(1, &["primary"], 1, "Consistent");
    // Its peer back: beta is resynced (the Outdated mark missing, alpha's newer
    // generation decides), and then holds every acknowledged write.
    p.start_node(0);
    p.wait(
        WAIT,
        |p| field(p, 1, "disk") == "UpToDate" && p.peer(0)["out_of_sync_bytes"] == 0,
        "beta resynced",
    );
    verify_acked(&log, file_reader(p.store_path(1), BS)).expect("every acknowledged write is on beta");
}
