//! DRAFT (issue 13), not compiled by cargo: a scenario test that fails today, for
//! a defect found while writing `tests/tests/disk_faults.rs` (every other
//! draft of issue 13 runs there now, and the protocol A bound in
//! `tests/tests/bounds.rs`). They use that file's helpers (`start`, `writer`,
//! `field`, `wait_disk`, `finish_clean`, `nbd`, ...); appended to it (without
//! this header) it compiles. Move it there once it passes.

// ---------------------------------------------------------------------------
// A defect found while writing the tests (fails today).

/// Internal metadata on beta's disk, which fails writes: the update that should
/// record the disk Outdated after the failure fails too, so the metadata still
/// says UpToDate. alpha goes on writing, then stops; beta's daemon is restarted
/// on the recovered disk (a reboot, `systemctl restart`) without alpha: it comes
/// up UpToDate and `blockctl primary` (no --force) is accepted. Measured: the new
/// Primary served 2442 of 3074 blocks without their acknowledged writes.
/// `attach-disk` is safe (its check writes Outdated); a plain restart is not.
/// Possible fixes: the Primary fences/outdates a peer that went diskless (as DRBD's
/// fence-peer does), or the failure is recorded where it can be written.
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
    let out = p.ctl(1, &["primary"]);
    if out.status.success() {
        verify_acked(&log, nbd_reader(&nbd(&p, 1), EXPORT, BS)).expect("no stale data from beta");
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    }
}
