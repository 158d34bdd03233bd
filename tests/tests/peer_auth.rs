//! Peer authentication (SPEC §6) with real processes: a pair with the same
//! `shared-secret` connects and replicates; a node with another secret, or with none,
//! is refused by both sides with a clear log line and nothing is replicated or
//! resynced; a config whose peers talk off loopback without a secret is refused
//! before anything starts.

use std::process::Command;
use std::time::Duration;

use blockd_tests::pair::{Pair, PairOpts, binary};
use blockd_tests::raw::{CMD_WRITE, RawClient};
use blockd_tests::*;

const SECRET: &str = "shared-secret = \"a pair's secret, 32 bytes long...\"\n";
/// How long a refused pair is watched for a connection that must not come.
const WATCH: Duration = Duration::from_secs(3);

fn opts(extra_resource: &str) -> PairOpts {
    PairOpts { extra_resource: extra_resource.into(), ..PairOpts::default() }
}

#[test]
fn the_same_secret_connects_and_replicates() {
    let mut p = Pair::start("auth-ok", &opts(SECRET));
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, false);
    c.request(0, CMD_WRITE, 1, 4096, 4, b"auth").expect("write");
    assert_eq!(c.finish(1), 0);
    drop(c);
    p.wait(Duration::from_secs(30), |p| p.peer_u64(0, "replicated_bytes") >= 4, "the write is replicated");
    let shown = p.ctl_ok(0, &["show"]).stdout;
    assert!(
        shown.contains("# shared-secret: set (not shown)") && !shown.contains("32 bytes long"),
        "{shown}"
    );
}

/// Starts alpha with the pair's config and beta with `beta_resource` instead of the
/// pair's `[resource]` extras; both must stay apart, each logging `want_alpha` /
/// `want_beta`.
fn refused(label: &str, alpha_resource: &str, beta_resource: &str, want_alpha: &str, want_beta: &str) {
    let mut p = Pair::create(label, &opts(alpha_resource));
    let text = std::fs::read_to_string(&p.config).expect("config");
    let beta_text = text.replacen(alpha_resource, beta_resource, 1);
    assert_ne!(text, beta_text, "beta's config differs");
    let beta_config = p.dir.join("beta.toml");
    std::fs::write(&beta_config, beta_text).expect("write beta.toml");
    p.nodes[1].config = Some(beta_config);
    p.start_node(0);
    p.start_node(1);
    let logs_say =
        |p: &mut Pair| p.daemon(0).log().contains(want_alpha) && p.daemon(1).log().contains(want_beta);
    p.wait(Duration::from_secs(30), logs_say, "both nodes log why they refuse the other");
    // Refused, and it stays so: nothing replicated, no connection, no resync.
    let deadline = std::time::Instant::now() + WATCH;
    while std::time::Instant::now() < deadline {
        for n in 0..2 {
            let peer = p.peer(n);
            assert_ne!(peer["connection"], "Connected", "node {n}: {peer}");
            assert_eq!(peer["replicated_bytes"], 0, "{peer}");
            assert_eq!(peer["resync_sent_bytes"], 0, "{peer}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_different_secret_is_refused_by_both() {
    let other = "shared-secret = \"someone else's secret, as long\"\n";
    let want = "peer failed authentication: it does not know this node's shared-secret";
    refused("auth-wrong", SECRET, other, want, want);
}

#[test]
fn a_node_without_the_secret_is_refused_by_both() {
    refused(
        "auth-missing",
        SECRET,
        "\n",
        "this node requires peer authentication (resource.shared-secret) but the peer has none",
        "the peer requires peer authentication (resource.shared-secret) but this node has none",
    );
}

#[test]
fn peers_off_loopback_without_a_secret_are_a_config_error() {
    let dir = TempDir::new("auth-cfg");
    let d = dir.path().display();
    let config = dir.path().join("r0.toml");
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"192.0.2.1:7789\"\n\
         nbd = \"unix:{d}/a.nbd\"\ndisk = \"{d}/a.img\"\nmeta = \"internal\"\n\n[[node]]\nname = \"beta\"\n\
         replication = \"192.0.2.2:7789\"\nnbd = \"unix:{d}/b.nbd\"\ndisk = \"{d}/b.img\"\nmeta = \"internal\"\n"
    );
    std::fs::write(&config, text).expect("config");
    let cfg = config.display().to_string();
    for args in [vec!["--config", &cfg, "show"], vec!["--config", &cfg, "--node", "alpha", "create-md"]] {
        let out = run_capture(Command::new(binary("blockctl")).args(&args), Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains("key `node[0].replication`: 192.0.2.1:7789 is not a loopback address, so peers must authenticate"),
            "{}",
            out.describe()
        );
    }
    let out = run_capture(
        Command::new(binary("blockd")).args(["run", "--config", &cfg, "--node", "alpha"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
}
