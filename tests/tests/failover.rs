//! Crashes under load: no write acknowledged under protocol C is lost when the
//! Primary dies and the Secondary is promoted; flushed data survive a crash of both
//! nodes; under protocol A the Secondary's image is always a prefix of a dependent
//! write sequence.

use std::time::Duration;

use blockd_tests::chain::{ChainOpts, ChainWriter};
use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked, verify_flushed};
use blockd_tests::pair::{NODES, Pair, PairOpts};
use blockd_tests::pattern::{file_reader, nbd_reader, random_seed};
use blockd_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const BLOCK: u32 = 4096;

fn established_primary(label: &str, protocol: char) -> Pair {
    let mut p = Pair::start(label, &PairOpts { protocol, ..PairOpts::default() });
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    p
}

/// SPEC §12 / issue: a load generator logs every acknowledged write through several
/// connections; `kill -9` the Primary mid-load; promote the Secondary; every
/// acknowledged write reads back there (last acknowledged write wins per block).
#[test]
fn protocol_c_primary_crash_loses_no_acknowledged_write() {
    let mut p = established_primary("failover-c", 'C');
    let opts =
        LoadOpts { connections: 4, region_bytes: 16 * MIB, seed: random_seed(), ..LoadOpts::default() };
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, opts);
    load.wait_acked(2000, WAIT);
    p.daemon(0).kill();
    let log = load.finish();
    assert!(log.connections_died() > 0, "the writers saw the Primary die");
    p.wait(WAIT, |p| p.status(1)["peers"][0]["connection"] != "Connected", "beta notices the loss");
    p.ctl_ok(1, &["primary"]);
    let stats = verify_acked(&log, nbd_reader(&Addr::Unix(p.nodes[1].nbd.clone()), EXPORT, BLOCK))
        .unwrap_or_else(|e| panic!("acknowledged writes lost after failover: {e}\n{}", log.summary()));
    eprintln!("verified after failover: {stats:?}");
    assert_eq!(p.status(1)["role"], "Primary");
    p.stop_node(1);
}

/// Kill both nodes after a FLUSH was acknowledged: everything the FLUSH covered is
/// on the Secondary's disk.
#[test]
fn flushed_writes_survive_a_crash_of_both_nodes() {
    let mut p = established_primary("crash-both", 'C');
    let opts = LoadOpts {
        connections: 2,
        region_bytes: 8 * MIB,
        flush_every: Some(50),
        seed: random_seed(),
        ..LoadOpts::default()
    };
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, opts);
    load.wait_flushes_acked(5, WAIT);
    p.daemon(0).kill();
    p.daemon(1).kill();
    let log = load.finish();
    assert!(log.flushes_acked() >= 5);
    let stats = verify_flushed(&log, file_reader(p.disk_path(1), BLOCK))
        .unwrap_or_else(|e| panic!("flushed writes missing on the Secondary's disk: {e}\n{}", log.summary()));
    eprintln!("verified on beta's disk: {stats:?}");
}

/// Protocol A: each write is issued after the previous one was acknowledged (and
/// records it); after both nodes are killed, the Secondary holds a prefix of the
/// sequence, never a hole.
#[test]
fn protocol_a_secondary_holds_a_prefix_after_a_crash() {
    let mut p = established_primary("prefix-a", 'A');
    let seed = random_seed();
    let opts = ChainOpts { region_bytes: 4 * MIB, seed, ..ChainOpts::default() };
    let chain = ChainWriter::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, opts);
    // A seeded random moment between 200 and 1200 acknowledged writes.
    chain.wait_acked(200 + seed % 1000, WAIT);
    p.daemon(0).kill();
    p.daemon(1).kill();
    let log = chain.finish();
    let prefix = log
        .verify_prefix(file_reader(p.disk_path(1), BLOCK), log.issued)
        .unwrap_or_else(|e| panic!("the Secondary's image is not a prefix: {e}"));
    eprintln!("acked {} issued {}; the Secondary holds a prefix of {}", log.acked, log.issued, prefix.len);
    assert!(prefix.len <= log.issued);
}

/// Both nodes replicating with UpToDate disks.
fn wait_in_sync(p: &mut Pair) {
    p.wait(
        WAIT,
        |p| {
            (0..2).all(|n| {
                let s = p.status(n);
                s["peers"][0]["replication"] == "Established"
                    && s["disk"] == "UpToDate"
                    && s["peers"][0]["disk"] == "UpToDate"
            })
        },
        "both nodes Established and UpToDate",
    );
}

fn assert_copies_equal(p: &Pair, size: u64) {
    let (a, b) = (p.disk_bytes(0, size), p.disk_bytes(1, size));
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first, None, "the copies differ (first difference at byte {first:?})");
}

/// `kill -9` of the Secondary under load: the Primary keeps serving; the Secondary
/// restarts, resyncs what it missed, and the copies are equal afterwards.
#[test]
fn killed_secondary_catches_up() {
    let mut p = established_primary("kill-secondary", 'C');
    let size: u64 = tool("nbdinfo", ["--size", &p.uri(0)]).stdout.trim().parse().expect("size");
    let opts =
        LoadOpts { connections: 2, region_bytes: 16 * MIB, seed: random_seed(), ..LoadOpts::default() };
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, opts);
    load.wait_acked(500, WAIT);
    p.daemon(1).kill();
    let before = load.acked();
    load.wait_acked(before + 500, WAIT);
    assert_eq!(load.running(), 2, "the Primary kept serving without its peer");
    let dirty = p.status(0)["peers"][0]["out_of_sync_bytes"].as_u64().unwrap_or(0);
    assert!(dirty > 0, "the Primary tracks what the Secondary missed");
    p.daemon(1).start_again();
    wait_in_sync(&mut p);
    load.stop();
    let log = load.finish();
    verify_acked(&log, nbd_reader(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, BLOCK))
        .expect("primary intact");
    p.stop_node(0);
    p.stop_node(1);
    assert_copies_equal(&p, size);
}

/// A fresh pair created without --clear-bitmap waits for `primary --force`; then a
/// full sync copies everything, skipping regions that read as zero.
#[test]
fn forced_primary_full_syncs_a_fresh_pair() {
    let opts = PairOpts { clear_bitmap: false, ..PairOpts::default() };
    let mut p = Pair::start("fresh-force", &opts);
    p.wait(
        WAIT,
        |p| p.status(0)["peers"][0]["reason"].as_str().is_some_and(|r| r.contains("--force")),
        "alpha explains that a forced promotion is needed",
    );
    let out = p.ctl(0, &["primary"]);
    assert_eq!(out.status.code(), Some(1), "an Inconsistent node needs --force\n{}", out.describe());
    p.ctl_ok(0, &["primary", "--force"]);
    let size: u64 = tool("nbdinfo", ["--size", &p.uri(0)]).stdout.trim().parse().expect("size");
    let seed = p.dir.join("seed.img");
    random_file(&seed, 4 * MIB, 7, 0, 0);
    tool("nbdcopy", ["--flush".to_string(), seed.display().to_string(), p.uri(0)]);
    wait_in_sync(&mut p);
    let sent = p.status(0)["peers"][0]["resync_sent_bytes"].as_u64().expect("resync_sent_bytes");
    assert!(sent <= 4 * MIB + RESYNC_CHUNK, "zero regions are not sent: {sent} bytes");
    p.stop_node(0);
    p.stop_node(1);
    assert_copies_equal(&p, size);
}

/// The resync chunk size (a chunk that mixes data and zeroes is sent whole).
const RESYNC_CHUNK: u64 = MIB;

/// Filesystem failover: ext4 (nbdfuse + loop) on the Primary's export, files written
/// and synced, `kill -9` the Primary, promote the Secondary: its export mounts (the
/// journal replays), the synced files are intact, and after a clean unmount
/// `e2fsck -fn` finds nothing to fix.
#[test]
fn ext4_survives_primary_crash_and_failover() {
    use blockd_tests::guards::{FuseMount, LoopDev, Mount, require_fs_privileges};
    require_fs_privileges();
    for t in ["mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "fusermount3"] {
        require(t);
    }
    let opts = PairOpts { disk_bytes: 128 * MIB, ..PairOpts::default() };
    let mut p = Pair::start("fs-failover", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let size: u64 = tool("nbdinfo", ["--size", &p.uri(0)]).stdout.trim().parse().expect("size");
    let files: Vec<(String, Vec<u8>)> = (0..50u32)
        .map(|i| {
            (format!("d{}/f{i}", i % 5), format!("file {i} ").repeat(100 * (i as usize + 1)).into_bytes())
        })
        .collect();
    {
        let fuse = FuseMount::mount(&p.dir.join("fuse-a"), &p.uri(0), &p.dir.join("nbdfuse-a.log"), size);
        let lo = LoopDev::attach(&fuse.file());
        let dev = lo.dev().to_str().expect("utf-8").to_string();
        tool("mkfs.ext4", ["-q", "-F", &dev]);
        let m = Mount::new(lo.dev(), &p.dir.join("mnt-a"), "ext4");
        for (name, data) in &files {
            let path = m.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, data).expect("write");
            std::fs::File::open(&path).and_then(|f| f.sync_all()).expect("fsync");
        }
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        // Crash with the filesystem still mounted; the guards tear down the dead
        // stack (unmount falls back to a lazy one).
        p.daemon(0).kill();
        drop(m);
        drop(lo);
        drop(fuse);
    }
    p.wait(WAIT, |p| p.status(1)["peers"][0]["connection"] != "Connected", "beta notices the loss");
    p.ctl_ok(1, &["primary"]);
    let fuse = FuseMount::mount(&p.dir.join("fuse-b"), &p.uri(1), &p.dir.join("nbdfuse-b.log"), size);
    let lo = LoopDev::attach(&fuse.file());
    let dev = lo.dev().to_str().expect("utf-8").to_string();
    let m = Mount::new(lo.dev(), &p.dir.join("mnt-b"), "ext4");
    for (name, data) in &files {
        let got = std::fs::read(m.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *data, "{name} differs after failover");
    }
    m.unmount();
    tool("e2fsck", ["-fn", &dev]);
    lo.detach();
    fuse.unmount();
    p.stop_node(1);
}

/// Split brain: both nodes change the data while apart (alpha as Primary with beta
/// down, then beta promoted with alpha down); when both run again they refuse to
/// connect, and both say why.
#[test]
fn split_brain_is_detected_and_refused() {
    let mut p = established_primary("split-brain", 'C');
    let w = |p: &Pair, n: usize, byte: u8| {
        let data = p.dir.join(&format!("w{n}.bin"));
        std::fs::write(&data, vec![byte; 1 << 20]).expect("write");
        tool("nbdcopy", ["--flush".to_string(), data.display().to_string(), p.uri(n)]);
    };
    p.stop_node(1);
    w(&p, 0, 0xaa);
    p.stop_node(0);
    p.start_node(1);
    p.ctl_ok(1, &["primary"]);
    w(&p, 1, 0xbb);
    p.start_node(0);
    for (n, name) in NODES.iter().enumerate() {
        p.wait(
            WAIT,
            |p| p.status(n)["peers"][0]["reason"].as_str().is_some_and(|r| r.starts_with("split brain")),
            &format!("{name} reports split brain"),
        );
        assert_eq!(p.status(n)["peers"][0]["connection"], "StandAlone");
    }
    let log = std::fs::read_to_string(p.dir.join("beta.log")).expect("beta log");
    assert!(log.contains("split brain"), "the log says why");
    p.stop_node(0);
    p.stop_node(1);
}
