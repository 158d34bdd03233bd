//! The Pacemaker resource agent `ocf/blockd` and the fence handlers
//! `ocf/crm-fence-peer` / `ocf/crm-unfence-peer`, run for real:
//!
//! * `ocf-tester` (resource-agents) against node alpha of a real pair (beta run
//!   by the harness, so alpha connects and promotes);
//! * every action run directly with the environment Pacemaker gives an agent
//!   (clone meta attributes, `CRM_meta_on_node`): return codes of monitor in each
//!   state, idempotent start/stop/promote/demote, a refused promote, the promotion
//!   scores written with `crm_attribute --promotion` into a CIB file (`CIB_file`,
//!   so no cluster is needed and a cluster on this host is never touched);
//! * meta-data against `ra-api-1.dtd` (xmllint), validate-all with bad clone meta;
//! * the fence handlers' constraints and exit codes on a CIB file.
//!
//! A node started by the agent (`blockctl up`) is outside the [`Pair`] harness:
//! [`Reaper`] kills (by PID) any `blockd run` of this test's config left over,
//! on drop, failure or not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockd_tests::faultdisk::{FaultOpts, FaultScope};
use blockd_tests::pair::{DiskSpec, Pair, PairOpts, binary};
use blockd_tests::raw::{CMD_WRITE, RawClient, Reply};
use blockd_tests::tools::{Output, run_capture};
use blockd_tests::*;

const OCF_ROOT: &str = "/usr/lib/ocf";
const DTD: &str = "/usr/share/resource-agents/ra-api-1.dtd";
const WAIT: Duration = Duration::from_secs(60);
const RUN: Duration = Duration::from_secs(300);
/// OCF return codes.
const OK: i32 = 0;
const ERR_GENERIC: i32 = 1;
const ERR_CONFIGURED: i32 = 6;
const NOT_RUNNING: i32 = 7;
const RUNNING_PROMOTED: i32 = 8;
/// The agent's score for a Primary serving through its peer without its disk.
const SCORE_DISKLESS_PRIMARY: i64 = 9999;

fn ocf(name: &str) -> PathBuf {
    workspace_root().join("ocf").join(name)
}

/// PATH with blockctl's directory (the cargo target dir) first, and the sbin dirs.
fn path_env() -> String {
    let dir = binary("blockctl").parent().expect("blockctl dir").display().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{dir}:{path}:/usr/sbin:/sbin")
}

/// A CIB with nodes alpha and beta (alpha a member), the promotable clone `clone`
/// of primitive `r0`, for `crm_attribute` / `cibadmin` through `CIB_file`.
fn write_cib(path: &Path, clone: &str, quorum: bool, beta_member: bool) {
    let (in_ccm, crmd) = if beta_member { ("true", "online") } else { ("false", "offline") };
    let text = format!(
        r#"<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0" have-quorum="{}">
  <configuration>
    <crm_config/>
    <nodes><node id="1" uname="alpha"/><node id="2" uname="beta"/></nodes>
    <resources>
      <clone id="{clone}">
        <meta_attributes id="{clone}-meta">
          <nvpair id="{clone}-promotable" name="promotable" value="true"/>
          <nvpair id="{clone}-notify" name="notify" value="true"/>
        </meta_attributes>
        <primitive id="r0" class="ocf" provider="blockd" type="blockd"/>
      </clone>
    </resources>
    <constraints/>
  </configuration>
  <status>
    <node_state id="1" uname="alpha" in_ccm="true" crmd="online" join="member" expected="member"/>
    <node_state id="2" uname="beta" in_ccm="{in_ccm}" crmd="{crmd}" join="member" expected="member"/>
  </status>
</cib>
"#,
        if quorum { 1 } else { 0 }
    );
    std::fs::write(path, text).expect("write cib");
}

/// Kills (SIGKILL, by PID) every `blockd run --config CONFIG --node alpha` still
/// alive: nodes the agent started with `blockctl up`.
struct Reaper {
    config: String,
    node: &'static str,
}

impl Reaper {
    fn strays(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let has = |pair: [&str; 2]| args.windows(2).any(|w| w[0] == pair[0] && w[1] == pair[1]);
            let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
            if !zombie
                && args.iter().any(|a| a == "run")
                && has(["--config", &self.config])
                && has(["--node", self.node])
            {
                pids.push(pid);
            }
        }
        pids
    }

    fn kill_all(&self) -> Vec<i32> {
        let pids = self.strays();
        for &pid in &pids {
            // SAFETY: kill(2) on a PID whose cmdline names this test's config.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        pids
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let killed = self.kill_all();
        if !killed.is_empty() {
            eprintln!("killed leftover blockd {} (pids {killed:?})", self.node);
        }
    }
}

/// A pair (not started) with agent and CIB files in its dir, and the reaper.
struct Fixture {
    reaper: Reaper,
    pair: Pair,
    cib: PathBuf,
    log: PathBuf,
}

impl Fixture {
    fn new(label: &str) -> Fixture {
        Fixture::with(label, &PairOpts::default())
    }

    fn with(label: &str, opts: &PairOpts) -> Fixture {
        require("xmllint");
        require("crm_attribute");
        let pair = Pair::create(label, opts);
        let cib = pair.dir.join("cib.xml");
        write_cib(&cib, "r0-clone", true, true);
        let log = pair.dir.join("alpha-agent.log");
        let reaper = Reaper { config: pair.config.display().to_string(), node: "alpha" };
        Fixture { reaper, pair, cib, log }
    }

    /// The environment ocf-tester needs besides `-o`: OCF_ROOT, PATH, and a CIB
    /// file so the agent's `crm_attribute` never reaches a live cluster.
    fn base_env(&self, cmd: &mut Command) {
        cmd.env("OCF_ROOT", OCF_ROOT).env("PATH", path_env()).env("CIB_file", &self.cib);
        for (k, _) in std::env::vars() {
            if k.starts_with("OCF_") || k.starts_with("BLOCKD_CLONE") {
                cmd.env_remove(k);
            }
        }
        cmd.env("OCF_ROOT", OCF_ROOT);
    }

    /// Runs `ocf/blockd ACTION` as Pacemaker would for a clone instance on alpha;
    /// `extra` adds or overrides variables.
    fn agent(&self, action: &str, extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(ocf("blockd"));
        self.base_env(&mut cmd);
        cmd.arg(action)
            .env("OCF_RESOURCE_INSTANCE", "r0")
            .env("OCF_RESKEY_resource", "r0")
            .env("OCF_RESKEY_config", &self.pair.config)
            .env("OCF_RESKEY_node", "alpha")
            .env("OCF_RESKEY_log", &self.log)
            .env("OCF_RESKEY_CRM_meta_on_node", "alpha")
            .env("OCF_RESKEY_CRM_meta_timeout", "30000")
            .env("OCF_RESKEY_CRM_meta_interval", "0")
            .env("OCF_RESKEY_CRM_meta_promotable", "true")
            .env("OCF_RESKEY_CRM_meta_promoted_max", "1")
            .env("OCF_RESKEY_CRM_meta_promoted_node_max", "1")
            .env("OCF_RESKEY_CRM_meta_clone_max", "2")
            .env("OCF_RESKEY_CRM_meta_clone_node_max", "1")
            .env("OCF_RESKEY_CRM_meta_notify", "true");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        run_capture(&mut cmd, RUN)
    }

    /// `agent` that must return `want`.
    fn expect(&self, action: &str, extra: &[(&str, &str)], want: i32) -> Output {
        let out = self.agent(action, extra);
        assert_eq!(
            out.status.code(),
            Some(want),
            "ocf/blockd {action} {extra:?}: want OCF rc {want}\n{}\n--- alpha log ---\n{}",
            out.describe(),
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
        );
        out
    }

    /// A recurring monitor (not a probe).
    fn monitor(&self, want: i32) -> Output {
        self.expect("monitor", &[("OCF_RESKEY_CRM_meta_interval", "10000")], want)
    }

    /// alpha's promotion score in the CIB file (None: no attribute).
    fn score(&self) -> Option<i64> {
        let mut cmd = Command::new(require("crm_attribute"));
        cmd.args(["--promotion=r0", "-N", "alpha", "-G", "-q"]).env("CIB_file", &self.cib);
        let out = run_capture(&mut cmd, RUN);
        if !out.status.success() {
            assert!(
                out.stderr.contains("No such") || out.stderr.contains("not found"),
                "crm_attribute query failed unexpectedly\n{}",
                out.describe()
            );
            return None;
        }
        Some(out.stdout.trim().parse().unwrap_or_else(|e| panic!("score {:?}: {e}", out.stdout)))
    }

    fn alpha_status(&self) -> Option<serde_json::Value> {
        self.pair.try_status(0)
    }
}

fn tail(s: &str, n: usize) -> String {
    blockd_tests::tools::tail(s, n)
}

/// ocf-tester's full cycle (meta-data against the DTD, validate-all, probes,
/// start, monitor, notify, demote/promote twice, stop, restart, double start,
/// double stop) on alpha, with beta up so alpha connects and can be promoted.
#[test]
fn ocf_tester_passes() {
    let tester = require("ocf-tester");
    let mut f = Fixture::new("ocf-tester");
    f.pair.start_node(1);
    let mut cmd = Command::new(tester);
    f.base_env(&mut cmd);
    cmd.args(["-v", "-n", "r0", "-o", "resource=r0"])
        .arg("-o")
        .arg(format!("config={}", f.pair.config.display()))
        .args(["-o", "node=alpha"])
        .arg("-o")
        .arg(format!("log={}", f.log.display()))
        .arg(ocf("blockd"));
    let out = run_capture(&mut cmd, RUN);
    assert!(
        out.status.success() && out.stdout.contains("passed all tests"),
        "ocf-tester failed\n{}\n--- alpha log ---\n{}",
        out.describe(),
        tail(&std::fs::read_to_string(&f.log).unwrap_or_default(), 40)
    );
    // It ends with stop, stop: nothing of alpha left.
    assert!(f.alpha_status().is_none(), "alpha still answers after ocf-tester");
    let strays = f.reaper.kill_all();
    assert!(strays.is_empty(), "blockd alpha still running after ocf-tester: pids {strays:?}");
}

/// meta-data: valid against ra-api-1.dtd, a timeout on every action, one monitor
/// per role with distinct intervals.
#[test]
fn meta_data_is_valid() {
    let f = Fixture::new("ocf-meta");
    let out = f.expect("meta-data", &[], OK);
    let xml = f.pair.dir.join("meta.xml");
    std::fs::write(&xml, &out.stdout).expect("write meta-data");
    tool("xmllint", ["--noout", "--dtdvalid", DTD, &xml.display().to_string()]);
    let actions: Vec<&str> =
        out.stdout.split("<action ").skip(1).map(|a| a.split("/>").next().unwrap_or("")).collect();
    let names: Vec<String> = actions
        .iter()
        .map(|a| a.split("name=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string())
        .collect();
    for want in ["start", "stop", "promote", "demote", "monitor", "notify", "meta-data", "validate-all"] {
        assert!(names.iter().any(|n| n == want), "no {want} action in meta-data:\n{}", out.stdout);
    }
    for a in &actions {
        assert!(a.contains("timeout=\""), "action without a timeout: <action {a}/>");
    }
    let monitors: Vec<&&str> = actions.iter().filter(|a| a.contains("name=\"monitor\"")).collect();
    let attr = |a: &str, k: &str| {
        a.split(&format!("{k}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string()
    };
    let roles: Vec<String> = monitors.iter().map(|a| attr(a, "role")).collect();
    assert!(roles.contains(&"Promoted".into()) && roles.contains(&"Unpromoted".into()), "{roles:?}");
    let intervals: Vec<String> = monitors.iter().map(|a| attr(a, "interval")).collect();
    assert_eq!(intervals.len(), 2);
    assert_ne!(intervals[0], intervals[1], "monitor intervals must differ per role");
    assert!(out.stdout.contains("<parameter name=\"resource\" required=\"1\""));
}

/// validate-all: fine with the right clone meta; OCF_ERR_CONFIGURED (6) with
/// clone-max=3, without notify, with promoted-max=2, without the resource; 5
/// (not installed) without the config file.
#[test]
fn validate_all() {
    let f = Fixture::new("ocf-validate");
    f.expect("validate-all", &[], OK);
    let out = f.expect("validate-all", &[("OCF_RESKEY_CRM_meta_clone_max", "3")], ERR_CONFIGURED);
    assert!(out.stderr.contains("clone-max=2"), "{}", out.describe());
    let out = f.expect("validate-all", &[("OCF_RESKEY_CRM_meta_notify", "false")], ERR_CONFIGURED);
    assert!(out.stderr.contains("notify=true"), "{}", out.describe());
    f.expect("validate-all", &[("OCF_RESKEY_CRM_meta_promoted_max", "2")], ERR_CONFIGURED);
    f.expect("validate-all", &[("OCF_RESKEY_resource", "")], ERR_CONFIGURED);
    // The config names r0, not r1.
    f.expect("validate-all", &[("OCF_RESKEY_resource", "r1")], ERR_CONFIGURED);
    // A node the config does not define.
    f.expect("validate-all", &[("OCF_RESKEY_node", "gamma")], ERR_CONFIGURED);
    let missing = f.pair.dir.join("nope.toml").display().to_string();
    f.expect("validate-all", &[("OCF_RESKEY_config", &missing)], 5);
    // A probe where the config is missing: simply not running here.
    f.expect("monitor", &[("OCF_RESKEY_config", &missing)], NOT_RUNNING);
    // stop with a bad clone setup still stops (nothing running: success).
    f.expect("stop", &[("OCF_RESKEY_CRM_meta_clone_max", "3")], OK);
}

/// Every action directly, with the promotion score it leaves in the CIB.
#[test]
fn actions_and_scores() {
    let mut f = Fixture::new("ocf-actions");
    assert_eq!(f.score(), None);
    // Stopped: probe and monitor 7.
    f.expect("monitor", &[], NOT_RUNNING);
    f.monitor(NOT_RUNNING);
    // stop of a stopped node: success.
    f.expect("stop", &[], OK);

    f.pair.start_node(1);
    f.expect("start", &[], OK);
    let s = f.alpha_status().expect("alpha answers after start");
    assert_eq!(s["role"], "Secondary", "start must leave the node unpromoted: {s}");
    // The reaper sees the node the agent started (so it would kill it on a failure).
    let pid = s["pid"].as_i64().expect("status pid") as i32;
    assert_eq!(f.reaper.strays(), vec![pid], "reaper's view of the agent-started alpha");
    f.expect("start", &[], OK); // already running
    f.monitor(OK);
    f.pair.wait(
        WAIT,
        |p| {
            p.try_status(0)
                .is_some_and(|s| s["disk"] == "UpToDate" && s["peers"][0]["connection"] == "Connected")
        },
        "alpha UpToDate and Connected",
    );
    f.monitor(OK);
    assert_eq!(f.score(), Some(10000), "UpToDate and Connected");
    f.expect(
        "notify",
        &[("OCF_RESKEY_CRM_meta_notify_type", "post"), ("OCF_RESKEY_CRM_meta_notify_operation", "start")],
        OK,
    );

    // promote / demote, each twice.
    f.expect("promote", &[], OK);
    f.monitor(RUNNING_PROMOTED);
    f.expect("promote", &[], OK);
    f.monitor(RUNNING_PROMOTED);
    assert_eq!(f.alpha_status().expect("status")["role"], "Primary");
    assert_eq!(f.score(), Some(10000));
    f.expect("demote", &[], OK);
    f.monitor(OK);
    f.expect("demote", &[], OK);
    f.monitor(OK);

    // A refused promote (the peer is Primary) fails with the reason, within the
    // action's timeout.
    f.pair.ctl_ok(1, &["primary"]);
    let out = f.expect("promote", &[("OCF_RESKEY_CRM_meta_timeout", "7000")], ERR_GENERIC);
    assert!(out.stderr.contains("blockctl primary refused"), "{}", out.describe());
    f.monitor(OK);
    f.pair.ctl_ok(1, &["secondary"]);

    // The peer gone: still UpToDate, lower score.
    f.pair.stop_node(1);
    f.pair.wait(
        WAIT,
        |p| p.try_status(0).is_some_and(|s| s["peers"][0]["connection"] != "Connected"),
        "alpha sees beta gone",
    );
    f.monitor(OK);
    assert_eq!(f.score(), Some(1000), "UpToDate Secondary, peer not connected");

    // stop of a Primary demotes first; stop twice.
    f.expect("promote", &[], OK);
    f.monitor(RUNNING_PROMOTED);
    // A Primary keeps the best score without its peer (as ocf:linbit:drbd), so a
    // returning Secondary never looks better than the reference copy.
    assert_eq!(f.score(), Some(10000), "UpToDate Primary, peer not connected");
    f.expect("stop", &[], OK);
    f.monitor(NOT_RUNNING);
    assert_eq!(f.score(), None, "no score once stopped");
    f.expect("stop", &[], OK);
    f.monitor(NOT_RUNNING);

    // start twice, stop twice.
    f.expect("start", &[], OK);
    f.expect("start", &[], OK);
    f.monitor(OK);
    f.expect("stop", &[], OK);
    f.expect("stop", &[], OK);
    f.monitor(NOT_RUNNING);
    assert!(f.reaper.strays().is_empty(), "blockd alpha still running after stop");
    // Notify never fails, even on a stopped node.
    f.expect("notify", &[("OCF_RESKEY_CRM_meta_notify_type", "post")], OK);
}

/// Disk failures (issue 13), after `ocf:linbit:drbd`: a Secondary whose disk is
/// Diskless (`detach-disk`) is running (0) with no promotion score; promoted, it
/// serves through its UpToDate peer (8, score 9999); after `attach-disk` and the
/// resync (same daemon PID) the score is 10000 again. A Primary whose disk fails
/// goes on through its peer (8, 9999); without the peer it answers EIO: monitor 1,
/// no score. Stop works.
#[test]
fn monitor_and_scores_with_a_failed_disk() {
    let opts = PairOpts {
        disks: [DiskSpec::Fault(FaultOpts::default()), DiskSpec::Plain],
        external_meta: true,
        ..PairOpts::default()
    };
    let mut f = Fixture::with("ocf-disk", &opts);
    f.pair.start_node(1);
    f.expect("start", &[], OK);
    let synced = |p: &mut Pair| {
        p.try_status(0).is_some_and(|s| {
            s["disk"] == "UpToDate"
                && s["peers"][0]["connection"] == "Connected"
                && s["peers"][0]["replication"] == "Established"
        })
    };
    let diskless = |p: &mut Pair| p.try_status(0).is_some_and(|s| s["disk"] == "Diskless");
    f.pair.wait(WAIT, synced, "alpha UpToDate and Connected");
    f.monitor(OK);
    assert_eq!(f.score(), Some(10000));
    let pid = f.alpha_status().expect("status")["pid"].clone();

    // A diskless Secondary: running, no score.
    f.pair.ctl_ok(0, &["detach-disk"]);
    f.pair.wait(WAIT, diskless, "alpha Diskless");
    f.monitor(OK);
    assert_eq!(f.score(), None, "a diskless Secondary has no promotion score");
    // Promoted anyway (by hand): a diskless Primary serving through beta.
    f.expect("promote", &[], OK);
    f.monitor(RUNNING_PROMOTED);
    assert_eq!(f.score(), Some(SCORE_DISKLESS_PRIMARY));
    f.expect("demote", &[], OK);
    f.monitor(OK);
    assert_eq!(f.score(), None);

    // beta is promoted meanwhile (as the cluster would) and writes; alpha's disk
    // comes back with attach-disk and resyncs; the score is back (same daemon).
    f.pair.ctl_ok(1, &["primary"]);
    f.pair.ctl_ok(0, &["attach-disk"]);
    f.pair.wait(WAIT, synced, "alpha resynced after attach-disk");
    assert_eq!(f.alpha_status().expect("status")["pid"], pid, "attach-disk keeps the PID");
    f.monitor(OK);
    assert_eq!(f.score(), Some(10000), "UpToDate again");
    f.pair.ctl_ok(1, &["secondary"]);

    // A Primary whose disk fails goes on through beta; without beta it fails.
    f.expect("promote", &[], OK);
    f.monitor(RUNNING_PROMOTED);
    f.pair.fault(0).fail(FaultScope::Writes);
    let addr = Addr::Unix(f.pair.nodes[0].nbd.clone());
    let (mut c, _, _) = RawClient::handshake(&addr, EXPORT, false);
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x5a; 4096]).expect("send a write");
    let reply = c.read_reply().expect("reply");
    assert!(matches!(reply, Reply::Simple { error: 0, .. }), "served through beta: {reply:?}");
    drop(c);
    f.pair.wait(WAIT, diskless, "alpha Diskless");
    f.monitor(RUNNING_PROMOTED);
    assert_eq!(f.score(), Some(SCORE_DISKLESS_PRIMARY));
    f.pair.stop_node(1);
    f.pair.wait(
        WAIT,
        |p| p.try_status(0).is_some_and(|s| s["peers"][0]["connection"] != "Connected"),
        "alpha sees beta gone",
    );
    let out = f.monitor(ERR_GENERIC);
    assert!(out.stderr.contains("Primary with a Diskless local disk"), "{}", out.describe());
    assert_eq!(f.score(), None, "a diskless Primary without its peer has no promotion score");

    f.pair.fault(0).heal();
    f.expect("stop", &[], OK);
    f.monitor(NOT_RUNNING);
    assert!(f.reaper.strays().is_empty(), "blockd alpha still running after stop");
}

/// crm-fence-peer / crm-unfence-peer on a CIB file: the constraint, exit codes 4
/// (peer a member), 5 (peer gone), 1 (no quorum, this node fenced itself), and
/// the removal (0, also when absent).
#[test]
fn fence_handlers() {
    let cibadmin = require("cibadmin");
    let dir = TempDir::new("ocf-fence");
    let cib = dir.join("cib.xml");
    let run = |script: &str, node: &str, peer: &str, args: &[&str]| -> Output {
        let mut cmd = Command::new(ocf(script));
        cmd.args(args)
            .env("PATH", path_env())
            .env("CIB_file", &cib)
            .env("BLOCKD_RESOURCE", "r0")
            .env("BLOCKD_NODE", node)
            .env("BLOCKD_PEER", peer)
            .env_remove("BLOCKD_CLONE_ID");
        run_capture(&mut cmd, RUN)
    };
    let constraints = || {
        let mut cmd = Command::new(&cibadmin);
        cmd.args(["-Q", "-o", "constraints"]).env("CIB_file", &cib);
        run_ok(&mut cmd, RUN).stdout
    };
    let code = |o: &Output| o.status.code();

    write_cib(&cib, "r0-clone", true, true);
    let out = run("crm-fence-peer", "alpha", "beta", &[]);
    assert_eq!(code(&out), Some(4), "peer a member: fenced\n{}", out.describe());
    let c = constraints();
    assert!(c.contains(r#"<rsc_location id="blockd-fence-r0-beta" rsc="r0-clone">"#), "{c}");
    assert!(c.contains(r#"role="Promoted" score="-INFINITY""#), "{c}");
    assert!(c.contains(r##"attribute="#uname" operation="ne" value="alpha""##), "{c}");
    // Again (idempotent), and the fenced node may not fence back.
    assert_eq!(code(&run("crm-fence-peer", "alpha", "beta", &[])), Some(4));
    let out = run("crm-fence-peer", "beta", "alpha", &[]);
    assert_eq!(code(&out), Some(1), "{}", out.describe());
    assert!(!constraints().contains("blockd-fence-r0-alpha"));
    // After the resync, beta (the target) removes it; again: nothing to remove.
    let out = run("crm-unfence-peer", "beta", "alpha", &[]);
    assert_eq!(code(&out), Some(0), "{}", out.describe());
    assert!(!constraints().contains("blockd-fence"), "{}", constraints());
    assert_eq!(code(&run("crm-unfence-peer", "beta", "alpha", &[])), Some(0));

    // Peer not a cluster member: 5, constraint placed, with the clone id given.
    // (The schema checks that the constraint's rsc exists.)
    write_cib(&cib, "ms_r0", true, false);
    let out = run("crm-fence-peer", "alpha", "beta", &["--clone-id", "ms_r0"]);
    assert_eq!(code(&out), Some(5), "peer unreachable\n{}", out.describe());
    assert!(constraints().contains(r#"<rsc_location id="blockd-fence-r0-beta" rsc="ms_r0">"#));
    // Run on the fencing node itself, unfence removes it too.
    assert_eq!(code(&run("crm-unfence-peer", "alpha", "beta", &[])), Some(0));
    assert!(!constraints().contains("blockd-fence"));

    // No quorum: refuses (1), places nothing.
    write_cib(&cib, "r0-clone", false, true);
    let out = run("crm-fence-peer", "alpha", "beta", &["--timeout", "1"]);
    assert_eq!(code(&out), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("no quorum"), "{}", out.describe());
    assert!(!constraints().contains("blockd-fence"));

    // cibadmin failing (no such CIB file): 1 within the timeout.
    std::fs::remove_file(&cib).expect("rm cib");
    let out = run("crm-fence-peer", "alpha", "beta", &["--timeout", "1"]);
    assert_eq!(code(&out), Some(1), "{}", out.describe());
    let out = run("crm-unfence-peer", "alpha", "beta", &["--timeout", "1"]);
    assert_eq!(code(&out), Some(1), "{}", out.describe());
}
