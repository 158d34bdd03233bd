//! `Type=notify` readiness without systemd: blockd runs with `NOTIFY_SOCKET` pointing
//! at a datagram socket this test reads (a path, and an abstract `@name`), as
//! `blockd@.service` runs it. `READY=1` comes only once the node answers (a replicated
//! node: its control socket; a standalone export: its NBD socket), `WATCHDOG=1`
//! follows every half `WATCHDOG_USEC` while it answers, and `STOPPING=1` comes at the
//! stop (SIGTERM, or `blockctl down`). A standalone export has a control socket too,
//! which answers `status` and refuses what needs a peer.

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_tests::pair::{Pair, PairOpts, binary};
use blockd_tests::server::blockd_config;
use blockd_tests::tools::run_capture;
use blockd_tests::{Daemon, TempDir, free_port, sparse_file};

const MSG_TIMEOUT: Duration = Duration::from_secs(30);

/// The next datagram, within [`MSG_TIMEOUT`].
fn next_message(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(MSG_TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Datagrams until one has the line `want`; returns it.
fn wait_for(socket: &UnixDatagram, want: &str) -> String {
    let deadline = Instant::now() + MSG_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no {want} within {MSG_TIMEOUT:?}");
        let msg = next_message(socket);
        if msg.lines().any(|l| l == want) {
            return msg;
        }
    }
}

#[test]
fn standalone_export_is_ready_when_it_serves_and_answers_blockctl() {
    let dir = TempDir::new("notify-standalone");
    let disk = dir.join("alpha.img");
    sparse_file(&disk, 16 << 20);
    let unix = dir.join("nbd.sock");
    let tcp = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.join("r0.toml");
    std::fs::write(&config, blockd_config(dir.path(), &disk, tcp, &unix)).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");

    let args =
        ["run", "--config", &config.display().to_string(), "--node", "alpha"].map(String::from).to_vec();
    let env = vec![("NOTIFY_SOCKET".to_string(), notify_path.display().to_string())];
    // No addresses to poll: readiness is what this test waits for.
    let mut daemon =
        Daemon::start_with_env("alpha", &binary("blockd"), args, env, dir.join("blockd.log"), vec![], vec![]);
    let ready = next_message(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification: {ready:?}");
    // Ready means serving: the NBD greeting comes at once.
    let mut s = UnixStream::connect(&unix).expect("NBD socket bound when READY=1 came");
    s.set_read_timeout(Some(MSG_TIMEOUT)).unwrap();
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).expect("greeting");
    assert_eq!(&magic, b"NBDMAGIC");
    drop(s);
    assert!(ready.contains("STATUS=Primary UpToDate, standalone export"), "{ready:?}");
    // Its control socket answers blockctl like a replicated node's.
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(binary("blockctl"));
        cmd.arg("--config").arg(&config).args(["--node", "alpha"]).args(args);
        run_capture(&mut cmd, MSG_TIMEOUT)
    };
    let out = ctl(&["status", "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!((status["role"].as_str(), status["disk"].as_str()), (Some("Primary"), Some("UpToDate")));
    assert_eq!(status["peers"], serde_json::json!([]), "{status}");
    let out = ctl(&["secondary"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("standalone export"), "{}", out.describe());
    let status = daemon.stop();
    assert!(status.success(), "exit status {status}\n{}", daemon.log_tail(30));
    let stopping = wait_for(&notify, "STOPPING=1");
    assert!(!stopping.contains("READY=1"), "{stopping:?}");
}

#[test]
fn replicated_node_is_ready_when_its_control_socket_answers_and_pings_the_watchdog() {
    let pair = Pair::create("notify-pair", &PairOpts::default());
    // An abstract address, as systemd may hand out.
    let name = format!("blockd-test-notify-{}-{}", std::process::id(), free_port());
    let notify = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
        .expect("bind an abstract notify socket");
    let config = pair.config.display().to_string();
    let args = ["run", "--config", &config, "--node", "alpha"].map(String::from).to_vec();
    let env = vec![
        ("NOTIFY_SOCKET".to_string(), format!("@{name}")),
        // 0.4 s: a ping every 0.2 s.
        ("WATCHDOG_USEC".to_string(), "400000".to_string()),
    ];
    let log: PathBuf = pair.dir.join("alpha-notify.log");
    let mut daemon = Daemon::start_with_env("alpha", &binary("blockd"), args, env, log, vec![], vec![]);

    let ready = next_message(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification: {ready:?}");
    assert!(ready.contains("STATUS=Secondary"), "{ready:?}");
    // Ready means the control socket answers: blockctl works right away.
    let status = pair.status(0);
    assert_eq!(status["role"], "Secondary", "{status}");
    // The watchdog is pinged while the node answers.
    for _ in 0..2 {
        let ping = wait_for(&notify, "WATCHDOG=1");
        assert!(ping.contains("STATUS=Secondary"), "{ping:?}");
    }
    // `blockctl down` stops it like SIGTERM does: STOPPING=1, then exit 0.
    pair.ctl_ok(0, &["down"]);
    wait_for(&notify, "STOPPING=1");
    let exit = daemon.wait_exit(MSG_TIMEOUT).expect("blockd exits after down");
    assert!(exit.success(), "exit status {exit}\n{}", daemon.log_tail(30));
}
