//! Daemon behaviour: SIGTERM under load (exit 0, acknowledged writes
//! survive a restart), restarts, and config errors (exit 2, file:line:key).

use std::process::Command;
use std::time::{Duration, Instant};

use blockd_tests::tools::{PYTHON, TOOL_TIMEOUT, py_script, require_python_nbd};
use blockd_tests::*;

/// Region (from offset 0) the acknowledged-write checker owns.
const WRITER_REGION: u64 = 32 * MIB;

fn count_acks(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("ack ")).count()
}

engine_tests! {
    fn sigterm_under_fio_load_exits_0_and_acked_writes_survive(srv = Opts::new().size(256 * MIB)) {
        let mut srv = srv;
        require_python_nbd();
        // Background load on [128 MiB, 256 MiB): two fio jobs, time based, so
        // they are certainly running when the server is stopped.
        let fio = require("fio");
        let mut load = Background::spawn(
            "fio",
            Command::new(fio).current_dir(srv.dir.path()).args([
                "--name=load", "--ioengine=nbd", &format!("--uri={}", srv.uri()),
                "--rw=randrw", "--bs=4k", "--iodepth=16", "--numjobs=2",
                "--offset=128M", "--size=64M", "--offset_increment=64M",
                "--time_based", "--runtime=120",
                "--eta=always", "--eta-newline=1", "--eta-interval=250ms",
            ]),
            &srv.path("fio.log"),
        );
        // Wait (bounded) until both jobs are connected and doing I/O.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = load.log();
            if log.matches("connected to NBD server").count() >= 2 && log.contains(" IOPS]") {
                break;
            }
            assert!(load.running(), "fio exited early\n{log}");
            assert!(Instant::now() < deadline, "fio did not start I/O within 60s\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The checker: sequential writes over [0, 32 MiB), each logged
        // before it is sent and after its reply.
        let wlog = srv.path("writer.log");
        let mut writer = Background::spawn(
            "writer",
            Command::new(PYTHON)
                .current_dir(srv.dir.path())
                .arg("-u")
                .arg(py_script("nbdcheck.py"))
                .args(["sigterm-writer", &srv.uri(), &WRITER_REGION.to_string()])
                .arg(&wlog),
            &srv.path("writer.out"),
        );
        // Wait (bounded) for the writer to have some acknowledged writes
        // while fio is running.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let acks = std::fs::read_to_string(&wlog).map(|s| count_acks(&s)).unwrap_or(0);
            if acks >= 200 {
                break;
            }
            assert!(writer.running(), "writer exited early\n{}", writer.log());
            assert!(load.running(), "fio exited early\n{}", load.log());
            assert!(Instant::now() < deadline, "only {acks} acknowledged writes in 60s");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(load.running(), "fio is not running at SIGTERM time\n{}", load.log());

        let st = srv.daemon.stop();
        assert!(st.success(), "server exited with {st} on SIGTERM under load\n{}",
                srv.daemon.log_tail(60));

        // Clients notice (bounded), they do not hang.
        let wst = writer.wait(Duration::from_secs(60));
        assert!(wst.success() && writer.log().contains("PASS sigterm-writer"),
                "writer was not stopped by the server ({wst})\n{}", writer.log());
        load.wait(Duration::from_secs(60));
        let log = load.log();
        assert!(!log.contains("Connection refused"), "fio was not connected at SIGTERM\n{log}");

        srv.daemon.start_again();
        let out = nbdcheck("sigterm-verify", &[srv.uri(), WRITER_REGION.to_string(),
                                               wlog.display().to_string()]);
        assert!(out.contains("blocks hold their last acknowledged write"), "{out}");
    }

    fn restart_keeps_data(srv) {
        let mut srv = srv;
        nbdcheck("fill", &[srv.uri(), "77".into(), (16 * MIB).to_string()]);
        srv.daemon.restart();
        nbdcheck("verify-fill", &[srv.uri(), "77".into(), (16 * MIB).to_string()]);
        // A crash (SIGKILL) after FLUSH: the flushed data is there too.
        srv.daemon.kill();
        srv.daemon.start_again();
        nbdcheck("verify-fill", &[srv.uri(), "77".into(), (16 * MIB).to_string()]);
    }

    fn restart_with_the_other_engine_reads_same_data(srv) {
        let mut srv = srv;
        nbdcheck("fill", &[srv.uri(), "78".into(), (8 * MIB).to_string()]);
        srv.daemon.stop_ok();
        if let ServerKind::Blockd(engine) = srv.kind {
            let other = match engine {
                Engine::Posix => Engine::Uring,
                Engine::Uring => Engine::Posix,
            };
            let args = srv.daemon.args_mut();
            let last = args.last_mut().expect("args");
            assert_eq!(last, engine.as_str());
            *last = other.as_str().to_string();
        }
        srv.daemon.start_again();
        nbdcheck("verify-fill", &[srv.uri(), "78".into(), (8 * MIB).to_string()]);
    }

    fn sigterm_with_idle_client_exits_0_and_restart_serves(srv) {
        let mut srv = srv;
        let (mut idle, _, _) = raw::RawClient::handshake(&srv.addr(), EXPORT, true);
        srv.daemon.signal(libc::SIGTERM);
        if srv.kind.is_nbdkit() {
            // nbdkit 1.32 waits for connected clients to go away before it
            // exits on SIGTERM; blockd must not let an idle client block
            // its shutdown.
            drop(idle);
        } else {
            assert!(idle.closed_by_server(), "idle client not disconnected on SIGTERM");
        }
        let st = srv.daemon.wait_exit(daemon::STOP_TIMEOUT).unwrap_or_else(|| {
            panic!("{} did not exit within {:?} of SIGTERM with an idle client connected",
                   srv.kind, daemon::STOP_TIMEOUT)
        });
        assert!(st.success(), "exit status {st} after SIGTERM");
        srv.daemon.start_again();
        nbdcheck("info", &[srv.uri(), srv.size().to_string()]);
    }

    fn sigint_exits_0(srv) {
        let mut srv = srv;
        nbdcheck("fill", &[srv.uri(), "79".into(), MIB.to_string()]);
        srv.daemon.signal(libc::SIGINT);
        let st = srv.daemon.wait_exit(daemon::STOP_TIMEOUT).expect("no exit after SIGINT");
        assert!(st.success(), "exit status {st} after SIGINT");
        srv.daemon.start_again();
        nbdcheck("verify-fill", &[srv.uri(), "79".into(), MIB.to_string()]);
    }
}

// ---------------------------------------------------------------- config
// These exercise blockd's own config parsing; nbdkit has no equivalent, so
// with BLOCKD_TEST_SERVER=nbdkit they only report that they do not apply.

/// Writes `text` (with @DISK@, @SOCK@, @PORT@, @CTL@ substituted) as the
/// config in a fresh temp dir. Returns (config path, unix socket, port, dir).
fn write_config(name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf, u16, TempDir) {
    let dir = TempDir::new(name);
    let disk = dir.join("alpha.img");
    sparse_file(&disk, 16 * MIB);
    let cfg = dir.join("r0.toml");
    let sock = dir.join("nbd.sock");
    let port = free_port();
    let text = text
        .replace("@DISK@", &disk.display().to_string())
        .replace("@SOCK@", &sock.display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@CTL@", &dir.join("alpha.ctl").display().to_string());
    std::fs::write(&cfg, text).expect("write config");
    (cfg, sock, port, dir)
}

/// Runs `blockd run` on a config that must be refused (bounded wait).
fn config_case(name: &str, text: &str, node: &str) -> (tools::Output, std::path::PathBuf, TempDir) {
    let (cfg, _, _, dir) = write_config(name, text);
    let out = run_capture(
        Command::new(blockd_bin()).arg("run").arg("--config").arg(&cfg).args(["--node", node]),
        TOOL_TIMEOUT,
    );
    (out, cfg, dir)
}

fn not_for_nbdkit(name: &str) -> bool {
    if nbdkit_selected() {
        eprintln!("{name}: blockd config handling; not applicable to nbdkit");
        return true;
    }
    false
}

const GOOD_NODE: &str = "[[node]]\n\
name = \"alpha\"\n\
replication = \"127.0.0.1:7789\"\n\
nbd = [\"127.0.0.1:@PORT@\", \"unix:@SOCK@\"]\n\
disk = \"@DISK@\"\n\
meta = \"internal\"\n\
control = \"@CTL@\"\n";

#[test]
fn config_unknown_key_exits_2_naming_file_line_key() {
    if not_for_nbdkit("config_unknown_key") {
        return;
    }
    // Line 11 holds the unknown key.
    let text = format!("[resource]\nname = \"r0\"\n\n{GOOD_NODE}bogus-key = 1\n");
    assert_eq!(text.lines().nth(10), Some("bogus-key = 1"));
    let (out, cfg, _dir) = config_case("cfg-unknown-key", &text, "alpha");
    assert_eq!(out.status.code(), Some(2), "unknown key must exit 2\n{}", out.describe());
    let cfg = cfg.display().to_string();
    assert!(out.stderr.contains(&cfg), "stderr does not name the file\n{}", out.describe());
    assert!(out.stderr.contains("bogus-key"), "stderr does not name the key\n{}", out.describe());
    assert!(
        out.stderr.contains(":11:") || out.stderr.contains("line 11"),
        "stderr does not name line 11\n{}",
        out.describe()
    );
}

#[test]
fn config_syntax_error_exits_2_naming_file_line() {
    if not_for_nbdkit("config_syntax_error") {
        return;
    }
    let text = format!("[resource]\nname = \"r0\"\nprotocol = = \"C\"\n\n{GOOD_NODE}");
    let (out, cfg, _dir) = config_case("cfg-syntax", &text, "alpha");
    assert_eq!(out.status.code(), Some(2), "syntax error must exit 2\n{}", out.describe());
    assert!(out.stderr.contains(&cfg.display().to_string()), "{}", out.describe());
    assert!(
        out.stderr.contains(":3") || out.stderr.contains("line 3"),
        "stderr does not name line 3\n{}",
        out.describe()
    );
}

#[test]
fn config_unknown_node_exits_2() {
    if not_for_nbdkit("config_unknown_node") {
        return;
    }
    let text = format!("[resource]\nname = \"r0\"\n\n{GOOD_NODE}");
    let (out, _cfg, _dir) = config_case("cfg-node", &text, "gamma");
    assert_eq!(out.status.code(), Some(2), "unknown --node must exit 2\n{}", out.describe());
    assert!(out.stderr.contains("gamma"), "stderr does not name the node\n{}", out.describe());
}

#[test]
fn config_valid_file_starts() {
    if not_for_nbdkit("config_valid_file_starts") {
        return;
    }
    // The template of the error cases, without the error, starts and serves
    // on both addresses (so those cases fail for the reason they claim).
    let text = format!("[resource]\nname = \"r0\"\n\n{GOOD_NODE}");
    let (cfg, sock, port, dir) = write_config("cfg-valid", &text);
    let tcp = Addr::Tcp(format!("127.0.0.1:{port}").parse().expect("addr"));
    let unix = Addr::Unix(sock);
    let mut d = Daemon::start(
        "blockd",
        &blockd_bin(),
        vec!["run".into(), "--config".into(), cfg.display().to_string(), "--node".into(), NODE.into()],
        dir.join("server.log"),
        vec![tcp.clone(), unix.clone()],
        vec![],
    );
    for a in [&tcp, &unix] {
        tool("nbdinfo", ["--size", &a.uri(EXPORT)]);
    }
    d.stop_ok();
}
