//! A real two-node Corosync + Pacemaker cluster managing blockd (issue 7).
//!
//! `tests/pacemaker/cluster.sh` builds the cluster on this machine: each node is
//! a set of namespaces (network, mount, UTS, IPC, PID) with its own corosync,
//! pacemakerd and blockd on its own backing file; the nodes share one veth link
//! (10.214.0.1 ↔ 10.214.0.2), which carries both corosync and blockd's
//! replication. The resource is a promotable clone of blockd's OCF agent
//! (`ocf:blockd:blockd`, installed inside each node at
//! `/usr/lib/ocf/resource.d/blockd/blockd` from this tree's `ocf/`).
//!
//! One test, scenarios in sequence (the cluster takes ~8 s to form):
//! 1. the clone promotes exactly one node: Pacemaker says Promoted/Unpromoted,
//!    blockd says Primary/Secondary, Connected, Established;
//! 2. acknowledged writes through NBD on the Primary are on the Secondary's disk;
//! 3. SIGKILL of the Primary's whole namespace under write load: the other
//!    node is Promoted within 10 s and every acknowledged write reads back from
//!    it through NBD; the crashed node restarts, rejoins Unpromoted, resyncs,
//!    and the two disks are equal;
//! 4. the same with `crm node standby` of the Primary, then `crm node online`.
//!
//! The NBD sockets are Unix socket paths in each node's host directory, so the
//! test's own load generator (which records which writes were acknowledged)
//! reaches them from the host; `blockctl` runs inside each node (the control
//! sockets are in the nodes' private `/run`).
//!
//! Needs root and `pacemaker corosync pacemaker-cli-utils resource-agents crmsh`
//! (scripts/test.sh installs them). Drop tears the cluster down (SIGKILL of both
//! namespaces' PID 1, netns deleted), also when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_tests::loadgen::{AckLog, LoadGen, LoadOpts, verify_acked};
use blockd_tests::pair::binary;
use blockd_tests::pattern::{file_reader, nbd_reader};
use blockd_tests::tools::{Output, run_capture};
use blockd_tests::*;
use serde_json::Value;

const NODES: [&str; 2] = ["node1", "node2"];
const BLOCK: u32 = 4096;
/// The region the load generator writes.
const REGION: u64 = 16 * MIB;
/// Bound on one harness command (`up`, `down`, `exec …`).
const SH_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on cluster formation and on any role change / resync wait.
const WAIT: Duration = Duration::from_secs(60);
/// The promotion after a crash must take at most this long (corosync token
/// 1000 ms: ≈ 2.2 s to the new membership, then notify + promote).
const PROMOTE_WITHIN: Duration = Duration::from_secs(10);

fn other(node: &str) -> &'static str {
    if node == NODES[0] { NODES[1] } else { NODES[0] }
}

/// The cluster of one test run; Drop brings it down.
struct Cluster {
    script: PathBuf,
    bin: PathBuf,
    ocf: PathBuf,
    /// `BDPCMK_FENCING=1`: stonith through the harness's fence daemon.
    fencing: bool,
    /// `down` already ran.
    down: bool,
    /// Declared last: removed after the cluster is down.
    dir: TempDir,
    /// Held while the cluster exists: the netns names (`bdpcmk-node1/2`) and
    /// the subnet are fixed, so one cluster at a time on this machine (also
    /// across test processes). Dropped (unlocked) after everything above.
    _lock: std::fs::File,
}

/// Takes the machine-wide lock of this harness (flock on a file under /run/lock
/// or /tmp), polling with a deadline.
fn machine_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let dir = if Path::new("/run/lock").is_dir() { "/run/lock" } else { "/tmp" };
    let path = Path::new(dir).join("blockd-bdpcmk.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "{} still locked after 300 s (another cluster test)",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Cluster {
    /// `cluster.sh up`: namespaces, configs, backing files + `create-md`, both nodes started.
    fn up(fencing: bool) -> Cluster {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (namespaces, mounts)");
        let root = workspace_root();
        let bin = binary("blockctl").parent().expect("target dir").to_path_buf();
        assert!(bin.join("blockd").is_file(), "no blockd next to {}: cargo build --release", bin.display());
        let ocf = std::env::var_os("BLOCKD_OCF_DIR").map_or_else(|| root.join("ocf"), PathBuf::from);
        assert!(
            ocf.join("blockd").is_file(),
            "{}/blockd (the OCF agent) is missing: this test runs the tree's own agent",
            ocf.display()
        );
        let c = Cluster {
            script: root.join("tests/pacemaker/cluster.sh"),
            bin,
            ocf,
            fencing,
            down: false,
            dir: TempDir::new("pacemaker"),
            _lock: machine_lock(),
        };
        c.sh_ok(&["check"]);
        c.sh_ok(&["up"]);
        c
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.script);
        cmd.args(args)
            .env("BDPCMK_DIR", self.dir.path())
            .env("BDPCMK_BIN", &self.bin)
            .env("BDPCMK_OCF", &self.ocf)
            .env("BDPCMK_FENCING", if self.fencing { "1" } else { "0" });
        if self.fencing {
            // blockd's own fencing on top of stonith: a Primary that loses its peer
            // forbids the Promoted role elsewhere until the peer has resynced.
            let bin = self.dir.path().join("bin");
            cmd.env(
                "BDPCMK_NODE_EXTRA",
                format!(
                    "fence-peer = \"{}/crm-fence-peer --clone-id blockd-clone\"\n\
                     after-resync-target = \"{}/crm-unfence-peer --clone-id blockd-clone\"",
                    bin.display(),
                    bin.display()
                ),
            );
        }
        cmd
    }

    fn sh(&self, args: &[&str]) -> Output {
        run_capture(&mut self.command(args), SH_TIMEOUT)
    }

    fn sh_ok(&self, args: &[&str]) -> Output {
        let out = self.sh(args);
        if !out.status.success() {
            panic!("cluster.sh {args:?} failed\n{}\n{}", out.describe(), self.report());
        }
        out
    }

    /// The cluster as `view` sees it (`crm_mon` XML parsed by the harness).
    fn state(&self, view: &str) -> Value {
        let out = self.sh(&["state", view]);
        serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null)
    }

    /// `blockctl status --json` inside `node`, None when it does not answer.
    fn blockd(&self, node: &str) -> Option<Value> {
        let out = self.sh(&["blockctl", node, "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    /// Polls `f` every 100 ms until it returns Some, at most `timeout`; then
    /// panics with both nodes' view and the logs.
    fn wait<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Cluster) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for: {what}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both nodes' cluster view and blockd status, and the log tails.
    fn report(&self) -> String {
        let mut s = String::new();
        for n in NODES {
            s.push_str(&format!("--- {n}: crm_mon {}\n", self.state(n)));
            let st = self.blockd(n).map_or("(no answer)".to_string(), |v| v.to_string());
            s.push_str(&format!("--- {n}: blockd {st}\n"));
        }
        let logs = run_capture(&mut self.command(&["logs"]), SH_TIMEOUT);
        s.push_str(&logs.stdout);
        s
    }

    /// Waits until `view` sees both nodes online, a DC, and the clone with
    /// exactly one Promoted and one Unpromoted instance; returns the Promoted node.
    fn wait_clone(&self, view: &str, timeout: Duration) -> &'static str {
        self.wait(timeout, &format!("{view}: both online, one Promoted, one Unpromoted"), |c| {
            let s = c.state(view);
            let ok = s["dc"] == true
                && s["online"].as_array().is_some_and(|a| a.len() == 2)
                && s["promoted"].as_array().is_some_and(|a| a.len() == 1)
                && s["unpromoted"].as_array().is_some_and(|a| a.len() == 1);
            ok.then(|| if s["promoted"][0] == NODES[0] { NODES[0] } else { NODES[1] })
        })
    }

    /// Waits until `node` alone is Promoted as `node` sees it; returns the time taken.
    fn wait_promoted(&self, node: &str, since: Instant, timeout: Duration) -> Duration {
        self.wait(timeout, &format!("{node} Promoted"), |c| {
            let s = c.state(node);
            (s["promoted"].as_array().is_some_and(|a| a.len() == 1) && s["promoted"][0] == node)
                .then(|| since.elapsed())
        })
    }

    /// Waits until blockd on `primary` is Primary, on the other node Secondary,
    /// both Connected + Established, both disks UpToDate, nothing out of sync.
    fn wait_synced(&self, primary: &str, timeout: Duration) {
        self.wait(timeout, &format!("blockd: {primary} Primary, peer Secondary, synced"), |c| {
            let ok = NODES.iter().all(|&n| {
                c.blockd(n).is_some_and(|s| {
                    let p = &s["peers"][0];
                    let role = if n == primary { "Primary" } else { "Secondary" };
                    s["role"] == role
                        && s["disk"] == "UpToDate"
                        && p["connection"] == "Connected"
                        && p["replication"] == "Established"
                        && p["disk"] == "UpToDate"
                        && p["out_of_sync_bytes"] == 0
                })
            });
            ok.then_some(())
        })
    }

    /// No failed actions recorded, as `view` sees it.
    fn assert_no_failures(&self, view: &str) {
        let s = self.state(view);
        let failed = s["failed"].as_array().cloned().unwrap_or_default();
        assert!(failed.is_empty(), "{view}: failed actions recorded: {failed:#?}\n{}", self.report());
    }

    fn nbd(&self, node: &str) -> Addr {
        Addr::Unix(self.dir.path().join("nodes").join(node).join("nbd.sock"))
    }

    fn disk(&self, node: &str) -> PathBuf {
        self.dir.path().join("nodes").join(node).join("disk.img")
    }

    /// The exported size, from the Primary's NBD handshake.
    fn export_size(&self, primary: &str) -> u64 {
        tool("nbdinfo", ["--size", &self.nbd(primary).uri(EXPORT)]).stdout.trim().parse().expect("size")
    }

    /// Runs `crm ARGS` inside `node`.
    fn crm(&self, node: &str, args: &[&str]) {
        let mut full = vec!["exec", node, "crm"];
        full.extend_from_slice(args);
        self.sh_ok(&full);
    }

    fn down(&mut self, hard: bool) -> Duration {
        let t = Instant::now();
        let out = self.sh(if hard { &["down", "--hard"] } else { &["down"] });
        self.down = true;
        assert!(out.status.success(), "cluster.sh down failed\n{}", out.describe());
        t.elapsed()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "test failed; node files under {} (BLOCKD_KEEP_TMP=1 keeps them)",
                self.dir.path().display()
            );
        }
        let out = run_capture(&mut self.command(&["down", "--hard"]), SH_TIMEOUT);
        if !out.status.success() {
            eprintln!("warning: cluster.sh down --hard failed\n{}", out.describe());
        }
    }
}

fn load_opts(seed: u64) -> LoadOpts {
    LoadOpts {
        connections: 2,
        block_bytes: BLOCK,
        region_bytes: REGION,
        flush_every: Some(64),
        queue_depth: 4,
        seed,
        max_ops: 200_000,
        max_duration: Duration::from_secs(60),
        ..LoadOpts::default()
    }
}

/// Every write of `log` acknowledged is read back from `read_block`.
fn check_acked(what: &str, log: &AckLog, read_block: impl FnMut(u64) -> Vec<u8>) {
    match verify_acked(log, read_block) {
        Ok(stats) => eprintln!("{what}: {} acked writes verified ({stats:?})", log.acked_count()),
        Err(e) => panic!("{what}: acknowledged writes lost: {e:?}\n{}", log.summary()),
    }
}

/// The first `len` bytes of both disks are equal.
fn assert_disks_equal(c: &Cluster, len: u64) {
    let read = |p: &Path| {
        let mut d = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        d.truncate(len as usize);
        d
    };
    let (a, b) = (read(&c.disk(NODES[0])), read(&c.disk(NODES[1])));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        panic!("disks differ after resync, first at byte {first} (block {})", first / BLOCK as usize);
    }
}

/// Waits for the cluster, configures the clone, waits until exactly one node is
/// Promoted (both nodes agree) and blockd is synced; returns the Promoted node.
fn form(c: &Cluster) -> &'static str {
    let t = Instant::now();
    c.wait(WAIT, "both nodes online and a DC", |c| {
        let s = c.state(NODES[0]);
        (s["dc"] == true && s["online"].as_array().is_some_and(|a| a.len() == 2)).then_some(())
    });
    let formed = t.elapsed();
    c.sh_ok(&["configure"]);
    let t = Instant::now();
    let p1 = c.wait_clone(NODES[0], WAIT);
    let promoted_in = t.elapsed();
    assert_eq!(c.wait_clone(NODES[1], WAIT), p1, "both nodes agree on the Promoted node");
    c.wait_synced(p1, WAIT);
    c.assert_no_failures(NODES[0]);
    eprintln!(
        "TIMING cluster formed in {formed:?}, clone Promoted on {p1} {promoted_in:?} after configuration"
    );
    p1
}

#[test]
fn pacemaker_promotable_clone_failover() {
    let t_all = Instant::now();
    let mut c = Cluster::up(false);

    // 1. The cluster forms; the clone promotes exactly one node.
    let p1 = form(&c);
    let size = c.export_size(p1);

    // 2. Acknowledged writes on the Primary are on the Secondary's disk.
    let s1 = other(p1);
    let load = LoadGen::start(&c.nbd(p1), EXPORT, LoadOpts { max_ops: 3000, ..load_opts(1) });
    let log = load.finish();
    assert_eq!(log.acked_count(), 3000, "every write acknowledged: {}", log.summary());
    check_acked("2: Secondary's disk", &log, file_reader(&c.disk(s1), BLOCK));
    let replicated =
        c.blockd(p1).expect("Primary answers")["peers"][0]["replicated_bytes"].as_u64().unwrap_or(0);
    assert!(replicated >= 3000 * BLOCK as u64, "Primary replicated only {replicated} bytes");

    // 3. Crash the Primary under load: the other node is promoted, no acked write lost.
    let load = LoadGen::start(&c.nbd(p1), EXPORT, load_opts(2));
    load.wait_acked(500, WAIT);
    let t = Instant::now();
    c.sh_ok(&["kill-node", p1]);
    let log = load.finish();
    let crash_promote = c.wait_promoted(s1, t, WAIT);
    eprintln!(
        "TIMING crash of {p1}: {s1} Promoted after {crash_promote:?} ({} writes acked before)",
        log.acked_count()
    );
    assert!(crash_promote <= PROMOTE_WITHIN, "promotion took {crash_promote:?} (> {PROMOTE_WITHIN:?})");
    c.wait(WAIT, &format!("blockd on {s1} Primary"), |c| c.blockd(s1).filter(|s| s["role"] == "Primary"));
    check_acked("3: new Primary through NBD", &log, nbd_reader(&c.nbd(s1), EXPORT, BLOCK));
    // The crashed node comes back: Unpromoted (stickiness), resynced.
    let t = Instant::now();
    c.sh_ok(&["start-node", p1]);
    assert_eq!(c.wait_clone(s1, WAIT), s1, "the survivor stays Promoted");
    c.wait_synced(s1, WAIT);
    let rejoin = t.elapsed();
    eprintln!("TIMING {p1} restarted, Unpromoted and resynced after {rejoin:?}");
    assert_disks_equal(&c, size);
    c.assert_no_failures(s1);

    // 4. Standby of the Primary: the other node is promoted; then back online.
    let (p2, s2) = (s1, p1);
    let load = LoadGen::start(&c.nbd(p2), EXPORT, LoadOpts { max_ops: 3000, ..load_opts(3) });
    let log = load.finish();
    assert_eq!(log.acked_count(), 3000, "every write acknowledged: {}", log.summary());
    let t = Instant::now();
    c.crm(s2, &["node", "standby", p2]);
    let standby_promote = c.wait_promoted(s2, t, WAIT);
    eprintln!("TIMING standby of {p2}: {s2} Promoted after {standby_promote:?}");
    c.wait(WAIT, &format!("blockd on {s2} Primary"), |c| c.blockd(s2).filter(|s| s["role"] == "Primary"));
    check_acked("4: new Primary through NBD", &log, nbd_reader(&c.nbd(s2), EXPORT, BLOCK));
    let t = Instant::now();
    c.crm(s2, &["node", "online", p2]);
    assert_eq!(c.wait_clone(s2, WAIT), s2, "the new Primary stays Promoted");
    c.wait_synced(s2, WAIT);
    eprintln!("TIMING {p2} online again, Unpromoted and synced after {:?}", t.elapsed());
    assert_disks_equal(&c, size);
    c.assert_no_failures(s2);

    let down = c.down(false);
    eprintln!("TIMING graceful down {down:?}; whole test {:?}", t_all.elapsed());
}

/// Scenario 5: a network partition (the veth down: corosync and replication
/// both cut) under write load, with real fencing (stonith: the harness kills
/// the loser's namespaces; the fence daemon serves one request at a time, so
/// exactly one node survives the fence race). Exactly one node stays, Promoted,
/// with every acknowledged write; after the heal the fenced node restarts,
/// rejoins Unpromoted and resyncs.
#[test]
fn pacemaker_partition_with_fencing() {
    let t_all = Instant::now();
    let mut c = Cluster::up(true);
    let p = form(&c);
    let size = c.export_size(p);
    let load = LoadGen::start(&c.nbd(p), EXPORT, load_opts(5));
    load.wait_acked(300, WAIT);
    let t = Instant::now();
    c.sh_ok(&["partition"]);
    // One node is fenced (its namespaces are gone); the other is Promoted.
    let survivor = c.wait(WAIT, "one node fenced, the other Promoted", |c| {
        let running: Vec<&str> = NODES.into_iter().filter(|&n| c.state(n)["running"] == true).collect();
        (running.len() == 1).then(|| running[0]).filter(|&n| {
            let s = c.state(n);
            s["promoted"].as_array().is_some_and(|a| a.len() == 1) && s["promoted"][0] == n
        })
    });
    let resolved = t.elapsed();
    load.stop(); // the survivor may be the writer's node: it would write on until max_ops
    let log = load.finish();
    let fenced = other(survivor);
    let history = std::fs::read_to_string(c.dir.path().join("fence/history")).unwrap_or_default();
    eprintln!(
        "TIMING partition: {fenced} fenced, {survivor} Promoted after {resolved:?} (was Primary: {p}); fence history: {history:?}; {} writes acked",
        log.acked_count()
    );
    c.wait(WAIT, &format!("blockd on {survivor} Primary"), |c| {
        c.blockd(survivor).filter(|s| s["role"] == "Primary")
    });
    check_acked("5: survivor through NBD", &log, nbd_reader(&c.nbd(survivor), EXPORT, BLOCK));
    // Heal, restart the fenced node: it rejoins Unpromoted and resyncs.
    c.sh_ok(&["heal"]);
    let t = Instant::now();
    c.sh_ok(&["start-node", fenced]);
    assert_eq!(c.wait_clone(survivor, WAIT), survivor, "the survivor stays Promoted");
    c.wait_synced(survivor, WAIT);
    eprintln!("TIMING {fenced} restarted, Unpromoted and resynced after {:?}", t.elapsed());
    if survivor == p {
        // The Primary ran its fence-peer handler when the link went; the resynced
        // node's after-resync-target removed the constraint again.
        let status = c.blockd(survivor).expect("survivor status");
        assert!(
            status["last_fence_result"]["exit_code"].as_i64().is_some_and(|code| [4, 5].contains(&code)),
            "fence-peer result: {status}"
        );
        c.wait(WAIT, "the fencing constraint removed after the resync", |c| {
            let out = c.sh(&["exec", survivor, "cibadmin", "-Q", "-o", "constraints"]);
            (out.status.success() && !out.stdout.contains("blockd-fence-")).then_some(())
        });
    }
    assert_disks_equal(&c, size);
    let down = c.down(false);
    eprintln!("TIMING graceful down {down:?}; whole test {:?}", t_all.elapsed());
}
