//! Bounds under a slow Secondary (issue 13 §6): with protocol A and the
//! Secondary's disk slowed to 20 ms per write (nbdkit's delay filter behind
//! nbdfuse), a 4 KiB random writer on the Primary must not make the Secondary
//! queue received writes without bound. Its link stops reading once the received
//! data it has not applied fills its receive budget, so TCP back-pressure reaches
//! the Primary, whose send buffer then holds its writers back.
//!
//! The test asserts a memory bound (the budget plus generous room for the rest of
//! the process), not a speed; then that the pair gets back in sync with identical
//! data and every acknowledged write on the Secondary. It prints both nodes' RSS
//! every second. Needs root, FUSE, nbdkit, nbdfuse.

use std::time::{Duration, Instant};

use blockd_tests::faultdisk::FaultOpts;
use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::{DiskSpec, Pair, PairOpts};
use blockd_tests::pattern::file_reader;
use blockd_tests::scatter::assert_data_equal;
use blockd_tests::*;

/// The node's receive budget: blockd's default (`peer::link::DEFAULT_RECEIVE_BUDGET_BYTES`).
const RECEIVE_BUDGET_BYTES: u64 = 64 * MIB;
/// Everything else a node holds (code, the buffer pool's idle buffers, the
/// bitmap, the allocator's slack): generous on purpose, this bounds memory only.
const OTHER_BYTES: u64 = 256 * MIB;
const WRITE_DELAY_MS: u32 = 20;
const WRITER_SECS: u64 = 20;
/// Random 4 KiB writes over this region: small enough that the resync at the end
/// copies it in a few large chunks.
const REGION_BYTES: u64 = 16 * MIB;
/// Generous bound on getting back in sync; nothing asserts how long it takes.
const SETTLE: Duration = Duration::from_secs(300);

/// Resident set size of `pid` in bytes (None once it is gone).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[test]
fn protocol_a_slow_secondary_memory_stays_bounded() {
    let slow = DiskSpec::Fault(FaultOpts { write_delay_ms: WRITE_DELAY_MS, ..FaultOpts::default() });
    // A small send buffer keeps the Primary's own backlog short; the Secondary's
    // bound does not depend on it.
    let opts = PairOpts {
        protocol: 'A',
        disk_bytes: 64 * MIB,
        disks: [DiskSpec::Plain, slow],
        extra_resource: "send-buffer = \"8MiB\"\n".into(),
        ..PairOpts::default()
    };
    let mut p = Pair::start("bounds-a", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let (alpha, beta) = (p.daemon(0).pid().expect("alpha runs"), p.daemon(1).pid().expect("beta runs"));
    let bound = RECEIVE_BUDGET_BYTES + OTHER_BYTES;

    let load_opts = LoadOpts {
        connections: 4,
        queue_depth: 8,
        region_bytes: REGION_BYTES,
        seed: 13,
        max_duration: Duration::from_secs(WRITER_SECS),
        ..LoadOpts::default()
    };
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, load_opts);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    // A sample a second while the writer runs (it stops by itself after
    // WRITER_SECS); a Secondary past the bound stops it at once, so a regression
    // cannot eat the machine's memory.
    while load.running() > 0 && t0.elapsed() < Duration::from_secs(WRITER_SECS + 60) {
        let rss = rss_bytes(beta).expect("beta is alive");
        samples.push(rss);
        let unsent = p.try_status(0).map_or("?".into(), |s| s["unsent_bytes"].to_string());
        eprintln!(
            "t={:>4.1}s acked={:<7} beta rss={} MiB | alpha rss={} MiB unsent={unsent}",
            t0.elapsed().as_secs_f64(),
            load.acked(),
            rss / MIB,
            rss_bytes(alpha).unwrap_or(0) / MIB,
        );
        if rss > bound {
            load.stop();
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    load.stop();
    let log = load.finish();
    let max_rss = samples.iter().copied().max().unwrap_or(0);
    eprintln!(
        "beta rss samples (MiB): {:?}; max {} MiB; bound {} MiB; client: {}",
        samples.iter().map(|b| b / MIB).collect::<Vec<_>>(),
        max_rss / MIB,
        bound / MIB,
        log.summary()
    );
    assert!(
        max_rss <= bound,
        "the Secondary's RSS reached {} MiB (bound {} MiB)",
        max_rss / MIB,
        bound / MIB
    );
    assert_eq!(log.error_count(), 0, "writes failed: {}", log.summary());
    assert!(log.acked_count() > 0, "the writer got nothing acknowledged");

    // The Secondary now holds a full budget of writes it applies one epoch (here
    // one write) per 20 ms: minutes of backlog. A disconnect drops it (the
    // Primary's transfer log goes into its bitmap, and buffers held by the dropped
    // link return to that link's budget), the reconnect resyncs the region.
    p.ctl_ok(0, &["disconnect"]);
    p.wait(
        SETTLE,
        |p| p.try_status(1).is_some_and(|s| s["peers"][0]["connection"] != "Connected"),
        "beta notices that alpha is gone",
    );
    p.ctl_ok(0, &["connect"]);
    p.wait_synced(SETTLE);
    let out = p.ctl_ok(0, &["verify"]);
    assert!(
        out.stdout.contains("verify: 0 bytes out of sync"),
        "verify found differences\n{}",
        out.describe()
    );
    eprintln!("after the resync: beta rss={} MiB", rss_bytes(beta).unwrap_or(0) / MIB);
    let compared = assert_data_equal(p.disk_path(0), p.store_path(1), p.export_size(0));
    eprintln!("copies equal ({compared} bytes of data compared)");
    verify_acked(&log, file_reader(p.store_path(1), log.block_bytes))
        .unwrap_or_else(|e| panic!("the Secondary lacks acknowledged writes: {e}"));
}
