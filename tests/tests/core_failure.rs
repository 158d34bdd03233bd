//! A node whose replication core dies does not stay up as a node that looks alive
//! (issue 12): the core task's failure stops the process at once (exit status 70),
//! the peer sees the link go, and a restart recovers as after a crash (the node
//! was Primary: its hot extents are resynced).
//!
//! The failure is provoked with the control socket's `debug-panic` test hook, which
//! the daemon honours only when started with `BLOCKD_DEBUG_COMMANDS=1` (here through
//! the harness's command prefix, `env`, which execs blockd).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use blockd::control::PROTOCOL_VERSION;
use blockd_tests::pair::{Pair, PairOpts};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Sends one raw control request; the reply line, or `None` if the daemon closed
/// the connection without one.
fn request(socket: &Path, cmd: &str) -> Option<Value> {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    writeln!(s, "{{\"v\":{PROTOCOL_VERSION},\"cmd\":\"{cmd}\"}}").expect("send request");
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(serde_json::from_str(&line).expect("a JSON reply")),
        _ => None,
    }
}

fn control_socket(p: &Pair, n: usize) -> std::path::PathBuf {
    let config = std::fs::read_to_string(p.node_config(n)).expect("config");
    let name = ["alpha", "beta"][n];
    let table =
        config.split("[[node]]").find(|t| t.contains(&format!("name = \"{name}\""))).expect("node table");
    let line = table.lines().find(|l| l.trim_start().starts_with("control")).expect("control key");
    let path = line.split('"').nth(1).expect("quoted path");
    path.into()
}

#[test]
fn a_dead_core_stops_the_node_and_a_restart_recovers() {
    let opts = PairOpts {
        prefix: [vec!["env".into(), "BLOCKD_DEBUG_COMMANDS=1".into()], Vec::new()],
        ..PairOpts::default()
    };
    let mut p = Pair::start("core-failure", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);

    // Without the variable the hook is refused and the node keeps running.
    let refused = request(&control_socket(&p, 1), "debug-panic").expect("beta answers");
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("debug commands are off")), "{refused}");
    assert!(p.daemon(1).is_running());

    let _ = request(&control_socket(&p, 0), "debug-panic");
    let status = p
        .daemon(0)
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("alpha still runs without its core:\n{}", p.daemon(0).log_tail(40)));
    assert_eq!(status.code(), Some(70), "{status}\n{}", p.daemon(0).log_tail(40));
    let log = p.daemon(0).log();
    assert!(log.contains("the replication core failed"), "{log}");
    assert!(log.contains("debug-panic requested"), "the reason is logged:\n{log}");

    p.wait(WAIT, |p| p.peer(1)["connection"] != "Connected", "beta sees alpha gone");

    // A restart recovers from what the metadata holds, as after a crash: the disk
    // is Consistent, not UpToDate, until the peer is heard (no promotion on its own
    // data), then the crashed Primary's hot extents go to beta.
    p.start_node(0);
    let log = p.daemon(0).log();
    assert!(log.contains("crashed while Primary"), "the unclean stop is recognised:\n{log}");
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    p.wait_synced(WAIT);
}
