//! `replication-rate` (issue 15) with real processes: a Primary whose writes are
//! shipped at 512 KiB/s, far slower than the writer, under protocols A (a 1 MiB
//! send buffer, so writers wait for it: the slow link the pacing models) and B
//! (every write waits for the peer's receipt). The link must stay up the whole
//! time: the peer's 5 s idle timeout and a 2 s `ack-timeout` see bytes and progress
//! flowing while a frame is written piece by piece. Then everything replicates and
//! verifies. Asserts behaviour only; prints the achieved rate for the closing note.

use std::time::{Duration, Instant};

use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::scatter::assert_data_equal;
use blockd_tests::*;
use rand::{RngCore, SeedableRng};

const RATE_BYTES_PER_SEC: u64 = 512 << 10;
const SETTLE: Duration = Duration::from_secs(300);

fn paced(protocol: char, write_bytes: usize) {
    let opts = PairOpts {
        protocol,
        extra_resource: "replication-rate = \"512KiB\"\nsend-buffer = \"1MiB\"\nack-timeout = \"2s\"\n"
            .into(),
        ..PairOpts::default()
    };
    let mut p = Pair::start(&format!("reprate-{protocol}"), &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let data = p.dir.join("random.bin");
    let mut bytes = vec![0u8; write_bytes];
    rand::rngs::StdRng::seed_from_u64(u64::from(protocol as u8)).fill_bytes(&mut bytes);
    std::fs::write(&data, &bytes).expect("write the data file");

    let wire_before = p.peer_u64(0, "sent_wire_bytes");
    let start = Instant::now();
    tool("nbdcopy", ["--flush".to_string(), data.display().to_string(), p.uri(0)]);
    let written = start.elapsed();
    p.wait(SETTLE, |p| p.try_status(0).is_some_and(|s| s["unsent_bytes"] == 0), "alpha sent everything");
    let drained = start.elapsed();
    let wire = p.peer_u64(0, "sent_wire_bytes") - wire_before;
    eprintln!(
        "protocol {protocol}, replication-rate {RATE_BYTES_PER_SEC} B/s: {write_bytes} bytes written in \
         {written:.1?}, {wire} wire bytes drained after {drained:.1?}: {:.0} B/s",
        wire as f64 / drained.as_secs_f64()
    );

    // The link never dropped: no ack-timeout, no keepalive timeout, no resync.
    let status = p.status(0);
    assert_eq!(status["ack_timeouts"], 0, "{status}");
    for n in 0..2 {
        let log = p.daemon(n).log();
        assert!(!log.contains("peer link failed"), "node {n} lost the link:\n{log}");
        assert_eq!(p.peer_u64(n, "resync_sent_bytes"), 0, "a resync means the link was lost");
    }
    p.wait_synced(SETTLE);
    let out = p.ctl_ok(0, &["verify"]);
    assert!(out.stdout.contains("verify: 0 bytes out of sync"), "{}", out.describe());
    assert_data_equal(p.disk_path(0), p.disk_path(1), p.export_size(0));
}

#[test]
fn protocol_a_writes_paced_far_below_the_writer_keep_the_link_up_and_all_replicate() {
    paced('A', 8 << 20);
}

#[test]
fn protocol_b_writes_paced_far_below_the_writer_keep_the_link_up_and_all_replicate() {
    paced('B', 4 << 20);
}
