//! Crashes under load: no write acknowledged under protocol C is lost when the
//! Primary dies and the Secondary is promoted; flushed data survive a crash of both
//! nodes; under protocol A the Secondary's image is always a prefix of a dependent
//! write sequence.

use std::time::Duration;

use blockd_tests::chain::{ChainOpts, ChainWriter};
use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked, verify_flushed};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::pattern::{file_reader, nbd_reader};
use blockd_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const BLOCK: u32 = 4096;

fn random_seed() -> u64 {
    let seed =
        std::env::var("BLOCKD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with BLOCKD_FUZZ_SEED={seed})");
    seed
}

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
