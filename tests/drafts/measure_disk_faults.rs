//! Measurements for issue 13 (the "before" picture), NOT a test: it asserts
//! nothing about blockd and prints what happened. Each `#[test]` is one scenario
//! on a real pair; run them one at a time with their output:
//!
//! ```sh
//! cargo build --release -p blockd -p blockctl
//! cp tests/drafts/measure_disk_faults.rs tests/tests/ &&
//!   cargo test --release -p blockd-tests --test measure_disk_faults -- --test-threads 1 --nocapture 2>&1 |
//!   tee /tmp/measure.txt; rm tests/tests/measure_disk_faults.rs
//! ```
//!
//! Per scenario it prints: a timeline (every second: the writer's acknowledged
//! writes, then per node role/disk/disk_error, the peer's connection/replication/
//! disk, out-of-sync and unsent bytes, and RSS), the client's summary (writes
//! acknowledged, failed with which NBD error, connections died), what a
//! verification found, and the WARN/ERROR lines of both logs (deduplicated, with
//! counts).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockd_tests::faultdisk::{FaultOpts, FaultScope};
use blockd_tests::loadgen::{AckLog, LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::{DiskSpec, NODES, Pair, PairOpts, binary};
use blockd_tests::pattern::{file_reader, nbd_reader};
use blockd_tests::raw::{CMD_FLUSH, CMD_WRITE, RawClient, Reply};
use blockd_tests::smallfs::SmallFsKind;
use blockd_tests::tools::wait_deadline;
use blockd_tests::*;
use serde_json::Value;

const BS: u32 = 4096;
const WAIT: Duration = Duration::from_secs(60);

/// `status --json` of node `n`, bounded to 5 s (None: no answer in time).
fn status(p: &Pair, n: usize) -> Option<Value> {
    let mut child = Command::new(binary("blockctl"))
        .arg("--config")
        .arg(p.node_config(n))
        .args(["--node", NODES[n], "status", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn blockctl");
    let out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let st = wait_deadline(&mut child, Duration::from_secs(5))?;
    let text = reader.join().unwrap_or_default();
    if !st.success() {
        return None;
    }
    serde_json::from_str(&text).ok()
}

fn rss_mib(pid: Option<u32>) -> String {
    let Some(pid) = pid else { return "-".into() };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        })
        .map_or("gone".into(), |kib| format!("{}MiB", kib / 1024))
}

fn node_line(p: &mut Pair, n: usize) -> String {
    let pid = p.nodes[n].daemon.as_mut().and_then(|d| if d.is_running() { d.pid() } else { None });
    let Some(s) = status(p, n) else {
        return format!("{}: (no status within 5 s) rss={}", NODES[n], rss_mib(pid));
    };
    let q = &s["peers"][0];
    let err = s["disk_error"].as_str().map_or(String::new(), |e| format!(" disk_error={e:?}"));
    format!(
        "{}: {}/{}{err} peer={}/{}/{} oos={} unsent={} rss={}",
        NODES[n],
        s["role"].as_str().unwrap_or("?"),
        s["disk"].as_str().unwrap_or("?"),
        q["connection"].as_str().unwrap_or("?"),
        q["replication"].as_str().unwrap_or("?"),
        q["disk"].as_str().unwrap_or("?"),
        q["out_of_sync_bytes"],
        s["unsent_bytes"],
        rss_mib(pid)
    )
}

/// Prints a timeline line every second for `secs` seconds (t relative to `t0`).
fn observe(p: &mut Pair, t0: Instant, secs: u64, load: Option<&LoadGen>) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let tick = Instant::now();
        let acked = load.map_or(String::new(), |l| format!("acked={:<7} ", l.acked()));
        let (a, b) = (node_line(p, 0), node_line(p, 1));
        eprintln!("  t={:>5.1}s {acked}| {a} | {b}", t0.elapsed().as_secs_f64());
        let spent = tick.elapsed();
        if spent < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_secs(1) - spent);
        }
    }
}

/// The client's view: counts and the NBD errors seen.
fn client_summary(log: &AckLog) {
    eprintln!("  client: {}", log.summary());
    let mut errs: BTreeMap<u32, usize> = BTreeMap::new();
    for e in log.writes.iter().filter_map(|w| w.error).chain(log.flushes.iter().filter_map(|f| f.error)) {
        *errs.entry(e).or_default() += 1;
    }
    if !errs.is_empty() {
        eprintln!("  client NBD errors (errno: count): {errs:?}  (5 = EIO, 28 = ENOSPC)");
    }
    for w in &log.writers {
        eprintln!("  writer {}: {:?}", w.writer, w.end);
    }
}

/// Checks every acknowledged write with `read`; prints the outcome (a panicking
/// reader, e.g. an NBD error, is reported too).
fn verify(what: &str, log: &AckLog, read: impl FnMut(u64) -> Vec<u8>) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify_acked(log, read)));
    match r {
        Ok(Ok(stats)) => eprintln!("  verify {what}: OK {stats:?}"),
        Ok(Err(e)) => {
            eprintln!(
                "  verify {what}: {} of {} blocks LOST/STALE ({} MiB)",
                e.violations.len(),
                e.blocks_checked,
                e.violations.len() as u64 * BS as u64 / MIB
            );
            for v in e.violations.iter().take(3) {
                eprintln!("    {v}");
            }
        }
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
            eprintln!("  verify {what}: the reader failed: {}", msg.lines().next().unwrap_or(""));
        }
    }
}

/// How many 4 KiB blocks of `[0, bytes)` differ between the two stores (read
/// directly, bypassing the faults).
fn diff_blocks(p: &Pair, bytes: u64) {
    let (mut a, mut b) = (file_reader(p.store_path(0), BS), file_reader(p.store_path(1), BS));
    let differ = (0..bytes / BS as u64).filter(|&i| a(i) != b(i)).count();
    let oos: Vec<String> = (0..2)
        .map(|n| status(p, n).map_or("?".into(), |s| s["peers"][0]["out_of_sync_bytes"].to_string()))
        .collect();
    eprintln!(
        "  stores differ in {differ} of {} blocks of the first {} MiB (out_of_sync_bytes: alpha {}, beta {})",
        bytes / BS as u64,
        bytes / MIB,
        oos[0],
        oos[1]
    );
}

/// WARN/ERROR lines of node `n`'s log, timestamps cut, counted.
fn log_summary(p: &Pair, n: usize) {
    let log = p.nodes[n].daemon.as_ref().map(|d| d.log()).unwrap_or_default();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for l in log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
        let msg = l.split_once('Z').map_or(l, |(_, rest)| rest).trim().to_string();
        // Fold offsets and counts so repeated messages group.
        let key: String = msg.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        match seen.iter_mut().find(|(k, _)| *k == key) {
            Some((_, c)) => *c += 1,
            None => seen.push((key, 1)),
        }
    }
    eprintln!("  --- {} log: {} WARN/ERROR kinds", NODES[n], seen.len());
    for (k, c) in seen.iter().take(25) {
        eprintln!("    {c:>6} x {k}");
    }
}

/// The end of a scenario: both stores checked for every write `log`
/// acknowledged, how much they differ in the first `region_bytes`, both logs.
fn report(p: &Pair, log: &AckLog, region_bytes: u64) {
    for (n, name) in NODES.iter().enumerate() {
        verify(&format!("{name}'s store file"), log, file_reader(p.store_path(n), BS));
    }
    diff_blocks(p, region_bytes);
    log_summary(p, 0);
    log_summary(p, 1);
}

fn ctl_report(p: &Pair, n: usize, args: &[&str]) {
    let out = p.ctl(n, args);
    eprintln!(
        "  blockctl {} on {}: exit {:?} {}{}",
        args.join(" "),
        NODES[n],
        out.status.code(),
        out.stdout.trim(),
        out.stderr.trim()
    );
}

fn load_opts(region_bytes: u64) -> LoadOpts {
    LoadOpts { connections: 4, region_bytes, seed: 13, flush_every: Some(256), ..LoadOpts::default() }
}

fn start(label: &str, protocol: char, disks: [DiskSpec; 2], external_meta: bool, disk_bytes: u64) -> Pair {
    let opts = PairOpts { protocol, disks, external_meta, disk_bytes, ..PairOpts::default() };
    let mut p = Pair::start(label, &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    p
}

fn fault() -> DiskSpec {
    DiskSpec::Fault(FaultOpts::default())
}

/// A verifying writer on alpha; after 2000 acknowledged writes node `n`'s disk
/// fails writes; 10 s of timeline; the writer's log, with the client's summary.
fn writes_fail_under_load(p: &mut Pair, n: usize) -> (AckLog, Instant) {
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, load_opts(16 * MIB));
    load.wait_acked(2000, WAIT);
    let t0 = Instant::now();
    p.fault(n).fail(FaultScope::Writes);
    eprintln!("  t=0: {}'s disk fails writes (acked so far {})", NODES[n], load.acked());
    observe(p, t0, 10, Some(&load));
    load.stop();
    let log = load.finish();
    eprintln!("  nbdkit injected {} errors on {}", p.fault(n).injected(), NODES[n]);
    client_summary(&log);
    (log, t0)
}

/// (a) The Secondary's disk starts failing writes under a verifying writer; then
/// the roles are switched and the new Primary's data checked.
fn secondary_disk_fails(external_meta: bool) {
    eprintln!("\n=== (a) Secondary's disk fails (EIO on writes), protocol C, meta external={external_meta}");
    let mut p = start("m-a", 'C', [DiskSpec::Plain, fault()], external_meta, 64 * MIB);
    let (log, t0) = writes_fail_under_load(&mut p, 1);
    observe(&mut p, t0, 2, None);
    eprintln!("  switch roles, beta's disk still failing writes:");
    ctl_report(&p, 0, &["secondary"]);
    ctl_report(&p, 1, &["primary"]);
    observe(&mut p, t0, 2, None);
    if status(&p, 1).is_some_and(|s| s["role"] == "Primary") {
        verify(
            "through beta (new Primary)",
            &log,
            nbd_reader(&Addr::Unix(p.nodes[1].nbd.clone()), EXPORT, BS),
        );
    }
    report(&p, &log, 16 * MIB);
}

#[test]
fn a1_secondary_disk_fails_internal_meta() {
    secondary_disk_fails(false);
}

#[test]
fn a2_secondary_disk_fails_external_meta() {
    secondary_disk_fails(true);
}

/// (b) The Primary's disk fails writes under a verifying writer.
fn primary_disk_fails(external_meta: bool) {
    eprintln!("\n=== (b) Primary's disk fails (EIO on writes), protocol C, meta external={external_meta}");
    let mut p = start("m-b", 'C', [fault(), DiskSpec::Plain], external_meta, 64 * MIB);
    let (log, _) = writes_fail_under_load(&mut p, 0);
    report(&p, &log, 16 * MIB);
}

#[test]
fn b1_primary_disk_fails_internal_meta() {
    primary_disk_fails(false);
}

#[test]
fn b2_primary_disk_fails_external_meta() {
    primary_disk_fails(true);
}

/// One WRITE then one FLUSH on a fresh connection to `nbd` (reply timeout
/// `timeout`): how long each took, or the error.
fn probe_write_flush(nbd: std::path::PathBuf, timeout: Duration) -> String {
    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(nbd), EXPORT, false);
    c.set_read_timeout(Some(timeout));
    let data = vec![0x5a; BS as usize];
    let t = Instant::now();
    let mut out = String::new();
    // A FLUSH has offset 0 and length 0 (anything else is EINVAL).
    for (cookie, cmd, offset, len) in [(1u64, CMD_WRITE, 60 * MIB, BS), (2, CMD_FLUSH, 0, 0)] {
        let payload: &[u8] = if cmd == CMD_WRITE { &data } else { &[] };
        let what = if cmd == CMD_WRITE { "write" } else { "flush" };
        let r = c
            .request(0, cmd, cookie, offset, len, payload)
            .map_err(|e| e.to_string())
            .and_then(|()| c.read_reply().map_err(|e| e.to_string()));
        match r {
            Ok(Reply::Simple { error, .. }) => {
                out.push_str(&format!("{what}: error {error} after {:.1}s; ", t.elapsed().as_secs_f64()))
            }
            Ok(r) => out.push_str(&format!("{what}: {r:?}; ")),
            Err(e) => {
                out.push_str(&format!("{what}: no reply after {:.1}s ({e})", t.elapsed().as_secs_f64()));
                break;
            }
        }
    }
    out
}

/// (c) The Secondary's disk hangs (nbdkit pause) while its process lives.
#[test]
fn c_secondary_disk_hangs() {
    eprintln!("\n=== (c) Secondary's disk hangs (pause filter), protocol C");
    let mut p = start("m-c", 'C', [DiskSpec::Plain, fault()], false, 64 * MIB);
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, load_opts(16 * MIB));
    load.wait_acked(2000, WAIT);
    let t0 = Instant::now();
    p.fault(1).pause();
    eprintln!("  t=0: beta's disk paused (acked so far {})", load.acked());
    let probe = {
        let nbd = p.nodes[0].nbd.clone();
        std::thread::spawn(move || probe_write_flush(nbd, Duration::from_secs(44)))
    };
    observe(&mut p, t0, 45, Some(&load));
    eprintln!("  probe (write+flush started at t=0): {}", probe.join().unwrap_or_else(|_| "panicked".into()));
    p.fault(1).resume();
    eprintln!("  t={:.1}s: beta's disk resumed", t0.elapsed().as_secs_f64());
    observe(&mut p, t0, 10, Some(&load));
    load.stop();
    let log = load.finish();
    client_summary(&log);
    let synced = Instant::now();
    let ok = (0..30).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        p.is_synced()
    });
    eprintln!("  synced after resume: {ok} ({:.1}s)", synced.elapsed().as_secs_f64());
    observe(&mut p, t0, 1, None);
    verify("through alpha", &log, nbd_reader(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, BS));
    report(&p, &log, 16 * MIB);
}

/// (d) Protocol A, the Secondary's disk 20 ms slower per write from the start:
/// RSS of both nodes under a 4 KiB random writer.
#[test]
fn d_protocol_a_slow_secondary_rss() {
    eprintln!("\n=== (d) protocol A, Secondary's writes delayed 20 ms (delay filter), 4 KiB random writer");
    let slow = DiskSpec::Fault(FaultOpts { write_delay_ms: 20, ..FaultOpts::default() });
    let mut p = start("m-d", 'A', [DiskSpec::Plain, slow], false, 256 * MIB);
    let opts = LoadOpts { queue_depth: 8, flush_every: None, ..load_opts(128 * MIB) };
    let t0 = Instant::now();
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, opts);
    // Bounded by time and by beta's RSS (stop at 6 GiB: the machine is shared).
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        observe(&mut p, t0, 1, Some(&load));
        let pid = p.nodes[1].daemon.as_ref().and_then(|d| d.pid());
        let rss = rss_mib(pid).trim_end_matches("MiB").parse::<u64>().unwrap_or(0);
        if rss > 6 << 10 {
            eprintln!("  beta's RSS passed 6 GiB: stopping the writer early");
            break;
        }
    }
    load.stop();
    let log = load.finish();
    client_summary(&log);
    eprintln!("  after the writer stopped:");
    observe(&mut p, t0, 20, None);
    log_summary(&p, 0);
    log_summary(&p, 1);
}

/// (e) ENOSPC on the Secondary's thin store (ext4 of 32 MiB, device 256 MiB,
/// filled at t=0), then space released.
#[test]
fn e1_enospc_on_secondary_thin_store() {
    eprintln!("\n=== (e1) ENOSPC on the Secondary's thin store (ext4 32 MiB filled), protocol C");
    let thin = DiskSpec::SmallFs { kind: SmallFsKind::Ext4, fs_bytes: 32 * MIB };
    let mut p = start("m-e1", 'C', [DiskSpec::Plain, thin], false, 256 * MIB);
    let t0 = Instant::now();
    let filler = p.small_fs(1).fill();
    eprintln!(
        "  t=0: beta's filesystem filled ({filler} bytes of filler, {} free)",
        p.small_fs(1).free_bytes()
    );
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, load_opts(64 * MIB));
    observe(&mut p, t0, 10, Some(&load));
    load.stop();
    let log = load.finish();
    client_summary(&log);
    p.small_fs(1).release();
    eprintln!("  t={:.1}s: filler removed ({} free)", t0.elapsed().as_secs_f64(), p.small_fs(1).free_bytes());
    observe(&mut p, t0, 15, None);
    verify("through alpha", &log, nbd_reader(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, BS));
    report(&p, &log, 64 * MIB);
}

/// (e2) ENOSPC on the Primary's thin store: what the client gets.
fn enospc_on_primary(external_meta: bool) {
    eprintln!(
        "\n=== (e2) ENOSPC on the Primary's thin store (ext4 32 MiB filled), protocol C, meta external={external_meta}"
    );
    let thin = DiskSpec::SmallFs { kind: SmallFsKind::Ext4, fs_bytes: 32 * MIB };
    let mut p = start("m-e2", 'C', [thin, DiskSpec::Plain], external_meta, 256 * MIB);
    let t0 = Instant::now();
    let filler = p.small_fs(0).fill();
    eprintln!("  t=0: alpha's filesystem filled ({filler} bytes of filler)");
    let load = LoadGen::start(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, load_opts(64 * MIB));
    observe(&mut p, t0, 8, Some(&load));
    load.stop();
    let log = load.finish();
    client_summary(&log);
    eprintln!("  probe write+flush on alpha: {}", probe_write_flush(p.nodes[0].nbd.clone(), WAIT));
    report(&p, &log, 64 * MIB);
}

#[test]
fn e2_enospc_on_primary_thin_store_internal_meta() {
    enospc_on_primary(false);
}

#[test]
fn e3_enospc_on_primary_thin_store_external_meta() {
    enospc_on_primary(true);
}
