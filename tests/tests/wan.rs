//! Replication across a WAN (issue 15, item 6) with real processes:
//!
//! 1. pull-ahead: a protocol A Primary behind a slow link ([`WanBed`]: 40 ms RTT,
//!    a few Mbit/s) under a writer much faster than the link goes `Ahead` (its peer
//!    `Behind`, Outdated), the writer is never held, and once it stops the pair
//!    catches up to identical copies holding every acknowledged write;
//! 2. consistent catch-up: a Secondary that is `SyncTarget` behind an ext4
//!    filesystem's worth of divergence when its source is `kill -9`ed rolls back
//!    to the image from before the resync on `primary --force`, and that image
//!    fscks clean and holds the files written before the disconnect;
//! 3. split brain: the node resolved against with `connect --discard-my-data`
//!    keeps its changed blocks, and `blockctl export-discarded` gives them back.
//!
//! Behaviour is asserted; figures (pull-aheads, bytes caught up, times) are only
//! printed for the closing note. Every wait polls with a deadline.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use blockd_tests::guards::{FuseMount, LoopDev, Mount, require_fs_privileges};
use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::{NODES, Pair, PairOpts};
use blockd_tests::pattern::{file_reader, random_seed};
use blockd_tests::scatter::{GRANULE, Plan, assert_data_equal, check_plan, merge, write_plan};
use blockd_tests::wan::{WanBed, WanLink};
use blockd_tests::*;
use rand::{RngCore, SeedableRng};
use serde_json::Value;

/// Bound on a wait for a state change (connect, promote, resync start).
const WAIT: Duration = Duration::from_secs(120);
/// Bound on a whole catch-up over the slow link.
const CATCH_UP: Duration = Duration::from_secs(300);
/// Writes in flight per connection of a [`write_plan`].
const QD: usize = 16;

fn addr(p: &Pair, n: usize) -> Addr {
    Addr::Unix(p.nodes[n].nbd.clone())
}

/// The named fields of node `n`'s status (for the test output).
fn brief(p: &Pair, n: usize) -> String {
    let Some(s) = p.try_status(n) else { return format!("{}: (no answer)", NODES[n]) };
    let peer = &s["peers"][0];
    format!(
        "{}: role {} disk {} | peer: connection {} replication {} disk {} out_of_sync_bytes {} \
         resync_done_bytes {}/{} | pull_aheads {} fallback_image {} fallback_lost {} undo_journal {}",
        NODES[n],
        s["role"],
        s["disk"],
        peer["connection"],
        peer["replication"],
        peer["disk"],
        peer["out_of_sync_bytes"],
        peer["resync_done_bytes"],
        peer["resync_total_bytes"],
        s["pull_aheads"],
        s["fallback_image"],
        s["fallback_lost"],
        s["undo_journal"]
    )
}

/// Asserts `verify` on node `n` reports nothing out of sync.
fn verify_in_sync(p: &Pair, n: usize) {
    let out = p.ctl_ok(n, &["verify"]);
    assert!(out.stdout.contains("verify: 0 bytes out of sync"), "{}", out.describe());
    eprintln!("{}", out.stdout.trim());
}

/// Waits until node `n` no longer sees its peer connected.
fn wait_peer_gone(p: &mut Pair, n: usize) {
    p.wait(
        WAIT,
        |p| p.try_status(n).is_some_and(|s| s["peers"][0]["connection"] != "Connected"),
        &format!("{} notices that its peer is gone", NODES[n]),
    );
}

/// Did an event stream report object `object` with `key` == `want`?
fn saw(events: &[Value], object: &str, key: &str, want: &str) -> bool {
    events.iter().any(|e| e["object"] == object && e[key] == want)
}

// ---------------------------------------------------------------------------
// 1. Pull-ahead over a slow link, then catch-up.

/// 40 ms RTT at 10 Mbit/s (1.25 MB/s): a loopback NBD writer is many times faster.
const SLOW_LINK: WanLink = WanLink { rtt_ms: 40, rate_mbit: 10 };
/// The replication port inside each namespace.
const PORT: u16 = 7789;
/// How long the writer writes.
const WRITE_FOR: Duration = Duration::from_secs(10);
/// The writer's pace: 10 MB/s of 4 KiB writes, eight times the link, yet not so
/// fast that it starves a test running beside it (2 cores).
const WRITES_PER_SEC: u64 = 2500;

#[test]
fn pull_ahead_under_a_writer_faster_than_the_link_then_catch_up() {
    // Declared first: dropped last, after the nodes inside it were killed.
    let mut bed = WanBed::create("wanpull", SLOW_LINK);
    let base = PairOpts {
        protocol: 'A',
        extra_resource:
            "on-congestion = \"pull-ahead\"\ncongestion-fill = \"2MiB\"\nsend-buffer = \"4MiB\"\n".into(),
        ..PairOpts::default()
    };
    let mut p = bed.start_pair("wan-pull-ahead", PORT, base);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let size = p.export_size(0);
    // Every state change of both nodes, from before the first write: Ahead and
    // Behind may last well under a second each.
    let mut events = [p.events(0, true), p.events(1, true)];
    for ev in &mut events {
        ev.wait_for(WAIT, "the initial state", |o| o["type"] == "exists" && o["object"] == "-");
    }

    let opts = LoadOpts {
        connections: 2,
        region_bytes: 16 * MIB,
        seed: random_seed(),
        max_ops: 1_000_000,
        max_duration: WRITE_FOR,
        max_writes_per_sec: Some(WRITES_PER_SEC),
        ..LoadOpts::default()
    };
    let load = LoadGen::start(&addr(&p, 0), EXPORT, opts);
    let start = Instant::now();
    // The writers end by themselves after WRITE_FOR; a writer held for good by the
    // link would keep running (its client's read timeout ends it with an error).
    p.wait(WRITE_FOR + WAIT, |_| load.running() == 0, "the writers end after their bounded run");
    let wrote_for = start.elapsed();
    let log = load.finish();
    let status0 = p.status(0);
    eprintln!("{}\nafter the writer: {}\n{}", log.summary(), brief(&p, 0), brief(&p, 1));
    assert_eq!(log.error_count(), 0, "no write failed: {}", log.summary());
    assert_eq!(log.connections_died(), 0, "no writer lost its connection: {}", log.summary());
    assert!(log.acked_count() > 0, "the writer wrote: {}", log.summary());
    let written = log.acked_count() as u64 * 4096;

    let converge = Instant::now();
    p.wait_synced(CATCH_UP);
    let converged_after = converge.elapsed();
    for ev in &mut events {
        ev.stop();
    }
    let [ev0, ev1] = [events[0].json(), events[1].json()];
    let pull_aheads = p.status(0)["pull_aheads"].as_u64().expect("pull_aheads");
    let caught_up = p.peer_u64(0, "resync_sent_bytes");
    eprintln!(
        "pull-ahead over {} ms RTT, {} Mbit/s: {written} bytes acknowledged in {wrote_for:.1?} \
         ({:.1} MB/s); pull_aheads {pull_aheads}; replicated_bytes {}; resync_sent_bytes (caught up) \
         {caught_up}; sent_wire_bytes {}; ack_timeouts {}; converged {converged_after:.1?} after the \
         writer stopped",
        SLOW_LINK.rtt_ms,
        SLOW_LINK.rate_mbit,
        written as f64 / wrote_for.as_secs_f64() / 1e6,
        p.peer_u64(0, "replicated_bytes"),
        p.peer_u64(0, "sent_wire_bytes"),
        status0["ack_timeouts"],
    );
    assert!(pull_aheads > 0, "alpha never pulled ahead\n{}", events[0].describe());
    assert!(
        saw(&ev0, "peer-device", "replication", "Ahead"),
        "alpha never reported Ahead\n{}",
        events[0].describe()
    );
    // Beta is Behind from the `Ahead` message until the `StartRepair` that follows
    // it once alpha's queue drained, which can be the next frame on the socket: the
    // event stream is a log of transitions, so it shows Behind however short. The
    // node's log is its own record of every pull-ahead it saw.
    let beta_log = p.daemon(1).log();
    let behind_logged = beta_log.matches("this node is Behind").count();
    eprintln!(
        "beta: {behind_logged} pull-aheads logged; events showed Behind: {}, Outdated: {}",
        saw(&ev1, "peer-device", "replication", "Behind"),
        saw(&ev1, "device", "disk", "Outdated")
    );
    assert!(behind_logged > 0, "beta never went Behind\n{}", tools::tail(&beta_log, 40));
    assert!(
        saw(&ev1, "peer-device", "replication", "Behind"),
        "beta's events never showed Behind ({behind_logged} logged)\n{}",
        events[1].describe()
    );
    assert!(
        ev1.iter().any(|e| e["object"] == "device" && e["type"] == "change" && e["disk"] != "UpToDate"),
        "beta's disk never left UpToDate (Outdated when Behind, Inconsistent as SyncTarget)\n{}",
        events[1].describe()
    );
    assert!(
        saw(&ev0, "peer-device", "replication", "SyncSource"),
        "alpha caught beta up with a resync\n{}",
        events[0].describe()
    );
    assert!(caught_up > 0, "a bitmap resync carried what was not shipped");

    verify_in_sync(&p, 0);
    p.stop_node(1);
    p.stop_node(0);
    for (n, name) in NODES.iter().enumerate() {
        let stats = verify_acked(&log, file_reader(p.store_path(n), log.block_bytes))
            .unwrap_or_else(|e| panic!("{name} lacks an acknowledged write: {e}"));
        eprintln!("{name}: every acknowledged write present ({stats:?})");
    }
    let compared = assert_data_equal(p.store_path(0), p.store_path(1), size);
    eprintln!("backing stores identical over {size} bytes ({compared} bytes of data compared)");
}

// ---------------------------------------------------------------------------
// 2. kill -9 of the source mid-catch-up: roll back, promote, fsck.

/// Room for internal metadata at the end of each backing file.
const META_ROOM: u64 = 8 * MIB;

/// Seeded (path, content) files; `dir` names the top directory.
fn files(dir: &str, seed: u64, count: usize, bytes_each: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![(format!("{dir}/hello.txt"), format!("written in {dir}\n").into_bytes())];
    for i in 0..count {
        let mut b = vec![0u8; bytes_each + i * 517];
        rng.fill_bytes(&mut b);
        v.push((format!("{dir}/sub{}/file{i}.bin", i % 4), b));
    }
    v
}

fn write_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

fn check_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let p = root.join(name);
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(got == *data, "{name}: content differs ({} vs {} bytes)", got.len(), data.len());
    }
}

/// Mounts node `n`'s export (it is Primary) through nbdfuse and a loop device at
/// `DIR/mnt`, runs `f` on the mount, unmounts, checks the filesystem
/// (`e2fsck -fn`), and undoes every layer (also on a panic, by the guards).
fn with_fs(p: &Pair, n: usize, tag: &str, f: impl FnOnce(&Path)) {
    let size = p.export_size(n);
    let fuse = FuseMount::mount(
        &p.dir.join(&format!("fuse-{tag}")),
        &p.uri(n),
        &p.dir.join(&format!("nbdfuse-{tag}.log")),
        size,
    );
    let lo = LoopDev::attach(&fuse.file());
    let dev = lo.dev().to_str().expect("a device path").to_string();
    {
        let m = Mount::new(lo.dev(), &p.dir.join("mnt"), "ext4");
        f(m.path());
        m.unmount();
    }
    // After the unmount: e2fsck needs the device unused.
    tool("e2fsck", ["-fn", &dev]);
    lo.detach();
    fuse.unmount();
}

#[test]
fn a_source_killed_mid_catch_up_leaves_a_target_that_rolls_back_and_fscks_clean() {
    require_fs_privileges();
    for t in ["mkfs.ext4", "e2fsck", "fsck.ext4", "losetup", "mount", "umount", "nbdfuse"] {
        require(t);
    }
    let opts = PairOpts {
        disk_bytes: 256 * MIB + META_ROOM,
        // Slow, so that the catch-up is still running when the source dies.
        extra_resource: "resync-rate = \"1MiB\"\n".into(),
        ..PairOpts::default()
    };
    let mut p = Pair::start("wan-rollback", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);

    // While connected: a filesystem and files, synced and cleanly unmounted (so the
    // image the Secondary holds at the disconnect is a clean filesystem).
    let before = files("before", 1, 24, 64 << 10);
    let size = p.export_size(0);
    {
        let fuse =
            FuseMount::mount(&p.dir.join("fuse-mkfs"), &p.uri(0), &p.dir.join("nbdfuse-mkfs.log"), size);
        let lo = LoopDev::attach(&fuse.file());
        let dev = lo.dev().to_str().expect("a device path").to_string();
        // No lazy init: no background writes after the mount.
        tool("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &dev]);
        lo.detach();
        fuse.unmount();
    }
    with_fs(&p, 0, "before", |root| write_files(root, &before));
    p.wait_synced(WAIT);

    // Divergence while beta is disconnected: many MB of new files.
    p.ctl_ok(1, &["disconnect"]);
    wait_peer_gone(&mut p, 0);
    let after = files("after", 2, 40, 1 << 20);
    with_fs(&p, 0, "after", |root| {
        check_files(root, &before);
        write_files(root, &after);
    });
    let diverged = p.peer_u64(0, "out_of_sync_bytes");
    eprintln!("diverged while disconnected: {diverged} bytes out of sync on alpha");

    // Catch-up at 1 MiB/s: wait until beta is SyncTarget, has overwritten some of
    // its blocks (saved first in its undo journal) and keeps a fallback image.
    p.ctl_ok(1, &["connect"]);
    p.wait(
        WAIT,
        |p| {
            p.try_status(1).is_some_and(|s| {
                s["peers"][0]["replication"] == "SyncTarget"
                    && s["peers"][0]["resync_done_bytes"].as_u64().is_some_and(|d| d >= 2 * MIB)
                    && s["fallback_image"] == true
                    && s["undo_journal"]["preserved_bytes"].as_u64().is_some_and(|b| b > 0)
            })
        },
        "beta SyncTarget with progress, a fallback image and a journal in use",
    );
    eprintln!("mid-catch-up:\n{}\n{}", brief(&p, 0), brief(&p, 1));
    let status = p.status(1);
    let total = status["peers"][0]["resync_total_bytes"].as_u64().unwrap_or(0);
    let done = status["peers"][0]["resync_done_bytes"].as_u64().unwrap_or(0);
    assert!(done < total, "the catch-up must still be running when the source dies: {status}");

    p.daemon(0).kill();
    wait_peer_gone(&mut p, 1);
    eprintln!("after kill -9 of alpha: {}", brief(&p, 1));
    assert_eq!(p.status(1)["disk"], "Inconsistent", "a sync target cut off mid-way: {}", p.status(1));
    let refused = p.ctl_refused(1, &["primary"], 1, "Inconsistent");
    eprintln!("beta `primary`: exit {:?}: {}", refused.status.code(), refused.stderr.trim());
    let forced = p.ctl_ok(1, &["primary", "--force"]);
    eprintln!("beta `primary --force`: {}{}", forced.stdout.trim(), forced.stderr.trim());
    p.wait(WAIT, |p| p.try_status(1).is_some_and(|s| s["role"] == "Primary"), "beta Primary");
    let s = p.status(1);
    eprintln!("after the forced promotion: {}", brief(&p, 1));
    assert_eq!(s["role"], "Primary", "{s}");
    assert_eq!(s["disk"], "UpToDate", "{s}");
    let log = p.daemon(1).log();
    assert!(log.contains("rolled back"), "beta's log says it rolled back:\n{}", tools::tail(&log, 40));

    // The rolled-back image: a clean filesystem with the files from before the
    // disconnect, and none of those written after it.
    let beta_size = p.export_size(1);
    assert_eq!(beta_size, size, "beta exports the same device");
    let fuse = FuseMount::mount(&p.dir.join("fuse-beta"), &p.uri(1), &p.dir.join("nbdfuse-beta.log"), size);
    let lo = LoopDev::attach(&fuse.file());
    let dev = lo.dev().to_str().expect("a device path").to_string();
    let fsck = tool("fsck.ext4", ["-fn", &dev]);
    eprintln!("fsck.ext4 -fn on beta after the rollback: exit 0\n{}{}", fsck.stdout, fsck.stderr);
    {
        let m = Mount::with_options(lo.dev(), &p.dir.join("mnt-beta"), "ext4", "ro");
        check_files(m.path(), &before);
        assert!(
            !m.path().join("after").exists(),
            "the files written after the disconnect are not in the image from before the catch-up"
        );
        m.unmount();
    }
    lo.detach();
    fuse.unmount();
}

// ---------------------------------------------------------------------------
// 3. Split brain: the discarded node's data is kept and exported.

/// Granule-aligned ranges a plan's extents cover.
fn granules(plans: &[&Plan]) -> Vec<Range<u64>> {
    let all = plans
        .iter()
        .flat_map(|p| p.extents.iter())
        .map(|e| e.offset / GRANULE * GRANULE..e.end().div_ceil(GRANULE) * GRANULE)
        .collect();
    merge(all)
}

/// The first `size` bytes of `from`, as the file `to`.
fn copy_prefix(from: &Path, to: &Path, size: u64) {
    let mut data = std::fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    data.truncate(size as usize);
    std::fs::write(to, data).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
}

#[test]
fn split_brain_keeps_the_discarded_nodes_data() {
    let opts = PairOpts { disk_bytes: 64 * MIB + META_ROOM, ..PairOpts::default() };
    let mut p = Pair::start("wan-split-brain", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let size = p.export_size(0);
    let common = Plan::random(0x5b01, 0..48 * MIB, 8 * MIB, 4096, 64 << 10);
    write_plan(&addr(&p, 0), EXPORT, &common, QD);
    p.wait_synced(WAIT);

    // Both disconnected and both Primary: each writes its own pattern, in places
    // of its own and in a shared region.
    for n in 0..2 {
        p.ctl_ok(n, &["disconnect"]);
    }
    for (n, name) in NODES.iter().enumerate() {
        p.wait(WAIT, |p| p.peer(n)["connection"] == "StandAlone", &format!("{name} StandAlone"));
    }
    p.ctl_ok(1, &["primary"]);
    let on_alpha = Plan::random(0x5b02, 0..32 * MIB, 4 * MIB, 4096, 64 << 10);
    let on_beta = Plan::random(0x5b03, 16 * MIB..48 * MIB, 4 * MIB, 4096, 64 << 10);
    write_plan(&addr(&p, 0), EXPORT, &on_alpha, QD);
    write_plan(&addr(&p, 1), EXPORT, &on_beta, QD);
    p.wait(WAIT, |p| p.ctl(1, &["secondary"]).status.success(), "`secondary` on beta succeeds");
    // Beta's image before the resolution (all of it is on its backing file).
    let beta_before = p.dir.join("beta-before.img");
    copy_prefix(p.store_path(1), &beta_before, size);
    check_plan(&beta_before, &on_beta, &on_beta.extents).expect("beta holds its own writes");

    // Resolution: beta's changes are discarded.
    p.ctl_ok(0, &["connect"]);
    p.ctl_ok(1, &["connect", "--discard-my-data"]);
    p.wait_synced(WAIT);
    eprintln!("resolved:\n{}\n{}", brief(&p, 0), brief(&p, 1));
    assert_eq!(p.status(0)["role"], "Primary");
    assert_eq!(p.status(1)["role"], "Secondary");
    verify_in_sync(&p, 0);
    p.stop_node(1);
    p.stop_node(0);
    check_plan(p.store_path(1), &on_alpha, &on_alpha.extents).expect("beta now holds alpha's writes");
    assert_data_equal(p.store_path(0), p.store_path(1), size);

    let undo_dir = p.dir.join("beta-undo");
    let kept: Vec<String> = std::fs::read_dir(&undo_dir)
        .expect("beta's undo-dir")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("beta's undo-dir after the resolution: {kept:?}");
    assert!(
        kept.iter().any(|f| f.starts_with(&format!("{EXPORT}.discarded.")) && f.ends_with(".undo")),
        "beta kept its discarded data: {kept:?}"
    );

    // Sparse: beta's own pattern at its offsets, and data only where the catch-up
    // overwrote (the granules either side changed).
    let sparse = p.dir.join("discarded.img");
    let out = p.ctl_ok(1, &["export-discarded", EXPORT, "--output", sparse.to_str().expect("utf-8")]);
    eprintln!("export-discarded:\n{}", out.stdout.trim());
    assert_eq!(std::fs::metadata(&sparse).expect("the image").len(), size, "the device's size");
    check_plan(&sparse, &on_beta, &on_beta.extents)
        .unwrap_or_else(|e| panic!("the exported image lacks beta's writes: {e}\n{}", out.describe()));
    let changed = granules(&[&on_alpha, &on_beta]);
    let image = std::fs::read(&sparse).expect("read the exported image");
    let mut at = 0u64;
    for r in changed.iter().chain(std::iter::once(&(size..size))) {
        if let Some(i) = image[at as usize..r.start as usize].iter().position(|b| *b != 0) {
            panic!("data at byte {} outside what either side changed\n{}", at + i as u64, out.describe());
        }
        at = r.end;
    }

    // Over a copy of the winner's device: beta's whole image from before.
    let base = p.dir.join("alpha-now.img");
    copy_prefix(p.store_path(0), &base, size);
    let full = p.dir.join("recovered.img");
    let args = ["export-discarded", EXPORT, "--output", full.to_str().expect("utf-8"), "--base"];
    let out = p.ctl_ok(1, &[&args[..], &[base.to_str().expect("utf-8")]].concat());
    eprintln!("export-discarded --base:\n{}", out.stdout.trim());
    check_plan(&full, &on_beta, &on_beta.extents).expect("beta's writes over the base");
    let compared = assert_data_equal(&full, &beta_before, size);
    eprintln!("recovered image equals beta's image from before the resolution ({compared} bytes compared)");
}
