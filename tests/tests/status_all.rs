//! `blockctl status` without a resource: every resource in the config directory
//! (`BLOCKD_CONFIG_DIR` here, `/etc/blockd` by default) that has a node on this host
//! (`--node`), running or stopped, like `drbdadm status`; `--json` is an array of the
//! per-resource status objects (SPEC §8.1), a stopped one `"running": false`.

use std::process::Command;
use std::time::Duration;

use blockd_tests::pair::{Pair, PairOpts, binary};
use blockd_tests::tools::{Output, run_capture};
use serde_json::Value;

fn status_all(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary("blockctl"));
    cmd.env("BLOCKD_CONFIG_DIR", dir).args(["--node", "alpha", "status"]).args(args);
    run_capture(&mut cmd, Duration::from_secs(60))
}

/// A two-node config for `name` with nodes `a` and `b` (never started here).
fn config(dir: &std::path::Path, name: &str, a: &str, b: &str) -> String {
    let node = |n: &str, port: u16| {
        format!(
            "\n[[node]]\nname = \"{n}\"\nreplication = \"127.0.0.1:{port}\"\nnbd = \"unix:{d}/{name}-{n}.nbd\"\n\
             disk = \"{d}/{name}-{n}.img\"\nmeta = \"internal\"\ncontrol = \"{d}/{name}-{n}.ctl\"\n",
            d = dir.display()
        )
    };
    format!("[resource]\nname = \"{name}\"\n{}{}", node(a, 7901), node(b, 7902))
}

#[test]
fn lists_running_and_stopped_resources_of_this_node() {
    let pair = Pair::start("status-all", &PairOpts::default());
    // The pair's r0.toml is in its directory; add a stopped resource of alpha, one
    // of other hosts, and files that are not resource configs.
    let dir = pair.dir.path();
    std::fs::write(dir.join("r1.toml"), config(dir, "r1", "alpha", "beta")).unwrap();
    std::fs::write(dir.join("r2.toml"), config(dir, "r2", "gamma", "delta")).unwrap();
    std::fs::write(dir.join("r0.toml.example"), "not a config").unwrap();

    let out = status_all(dir, &[]);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stdout.contains("r0 role:Secondary\n  disk:UpToDate\n"), "{}", out.stdout);
    assert!(out.stdout.contains("r1 stopped\n"), "{}", out.stdout);
    assert!(!out.stdout.contains("r2"), "r2 has no node alpha:\n{}", out.stdout);

    let out = status_all(dir, &["--json"]);
    assert!(out.status.success(), "{}", out.describe());
    let all: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let all = all.as_array().expect("an array");
    assert_eq!(all.len(), 2, "{all:?}");
    // The running one is the same object as `status --json` of that resource.
    let r0 = &all[0];
    assert_eq!((r0["resource"].as_str(), r0["running"].as_bool()), (Some("r0"), Some(true)), "{r0}");
    let single = pair.status(0);
    for key in ["node", "role", "disk"] {
        assert_eq!(r0[key], single[key], "{key}");
    }
    assert_eq!(r0["peers"][0]["node"], "beta", "{r0}");
    let r1 = &all[1];
    assert_eq!(r1["resource"], "r1");
    assert_eq!(r1["node"], "alpha");
    assert_eq!(r1["running"], false);

    // A broken file is reported and the others are still shown; exit 2.
    std::fs::write(dir.join("r3.toml"), "[resource]\nname = \"r3\"\nbogus = 1\n").unwrap();
    let out = status_all(dir, &["--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("r3.toml") && out.stderr.contains("bogus"), "{}", out.describe());
    let all: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
}

#[test]
fn a_standalone_export_is_started_listed_and_stopped_by_blockctl() {
    let dir = blockd_tests::TempDir::new("status-standalone");
    let disk = dir.join("alpha.img");
    blockd_tests::sparse_file(&disk, 16 << 20);
    let tcp = format!("127.0.0.1:{}", blockd_tests::free_port()).parse().unwrap();
    let config = blockd_tests::blockd_config(dir.path(), &disk, tcp, &dir.join("nbd.sock"));
    std::fs::write(dir.join("r0.toml"), config).unwrap();
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(binary("blockctl"));
        cmd.env("BLOCKD_CONFIG_DIR", dir.path()).args(["--node", "alpha"]).args(args);
        run_capture(&mut cmd, Duration::from_secs(60))
    };
    let out = ctl(&["up", "--log", &dir.join("blockd.log").display().to_string(), "r0"]);
    assert!(out.status.success(), "{}", out.describe());
    let out = ctl(&["status", "--json"]);
    let down = ctl(&["down", "r0"]);
    assert!(out.status.success(), "{}", out.describe());
    let all: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(all[0]["resource"], "r0", "{all}");
    assert_eq!(all[0]["running"], true, "{all}");
    assert_eq!(all[0]["role"], "Primary", "{all}");
    assert!(down.status.success(), "{}", down.describe());
    let out = ctl(&["status"]);
    assert!(out.stdout.contains("r0 stopped"), "{}", out.describe());
}

#[test]
fn with_a_resource_or_config_it_is_the_single_object() {
    let pair = Pair::start("status-one", &PairOpts::default());
    let mut cmd = Command::new(binary("blockctl"));
    cmd.env("BLOCKD_CONFIG_DIR", pair.dir.path()).args(["--node", "beta", "status", "--json", "r0"]);
    let out = run_capture(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.describe());
    let one: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(one["resource"], "r0");
    assert_eq!(one["node"], "beta");
    assert!(one.get("running").is_none(), "the single-resource object is unchanged: {one}");
}
