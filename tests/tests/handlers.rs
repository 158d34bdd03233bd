//! Replication handlers against a real pair: `fence-peer` runs on a Primary (protocol
//! C) that loses its peer, with the resource, node and peer names in its environment,
//! and no write is acknowledged until it returned; `after-resync-target` runs on the
//! node that finished a resync as target.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blockd_tests::daemon::Addr;
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::raw::{CMD_WRITE, RawClient, Reply};
use blockd_tests::server::EXPORT;
use blockd_tests::tmp::TempDir;

const DEADLINE: Duration = Duration::from_secs(30);

fn script(dir: &TempDir, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

fn wait_file(path: &Path, what: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: {} never written", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fence_peer_holds_write_acks_until_it_returns_and_after_resync_target_runs() {
    let dir = TempDir::new("handlers-scripts");
    let fenced = dir.join("fenced");
    let release = dir.join("release");
    let unfenced = dir.join("unfenced");
    // The fence handler records its environment, then waits (bounded) for the test
    // to let it go, and says "peer fenced" (4, as DRBD's crm-fence-peer).
    let fence = script(
        &dir,
        "fence.sh",
        &format!(
            "echo \"$BLOCKD_RESOURCE $BLOCKD_NODE $BLOCKD_PEER\" > {f}.tmp && mv {f}.tmp {f}\n\
             i=0; while [ ! -e {r} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\nexit 4",
            f = fenced.display(),
            r = release.display()
        ),
    );
    let unfence = script(
        &dir,
        "unfence.sh",
        &format!("echo \"$BLOCKD_NODE $BLOCKD_PEER\" > {u}.tmp && mv {u}.tmp {u}", u = unfenced.display()),
    );
    let opts = PairOpts {
        extra_node: [format!("fence-peer = \"{fence}\"\n"), format!("after-resync-target = \"{unfence}\"\n")],
        ..PairOpts::default()
    };
    let mut p = Pair::start("handlers", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);

    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, false);
    let block = vec![0x42u8; 4096];
    c.request(0, CMD_WRITE, 1, 0, 4096, &block).expect("write");
    assert_eq!(c.finish(1), 0, "connected: acknowledged as usual");

    p.daemon(1).kill();
    assert_eq!(wait_file(&fenced, "fence-peer"), "r0 alpha beta\n", "resource, node, peer");
    assert_eq!(p.status(0)["fencing_peer"], true);
    c.request(0, CMD_WRITE, 2, 8192, 4096, &block).expect("write");
    // Observed, not synchronized: for a while the write is not acknowledged.
    c.set_read_timeout(Some(Duration::from_millis(500)));
    match c.read_reply() {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a write was acknowledged while the fence-peer handler ran: {other:?}"),
    }
    std::fs::write(&release, "").expect("release the handler");
    c.set_read_timeout(Some(DEADLINE));
    match c.read_reply().expect("the write's reply after the handler returned") {
        Reply::Simple { error: 0, cookie: 2 } => {}
        other => panic!("{other:?}"),
    }
    let status = p.status(0);
    assert_eq!(status["fencing_peer"], false);
    assert_eq!(status["last_fence_result"]["exit_code"], 4);

    // beta comes back, resyncs as target, and runs its after-resync-target handler.
    p.daemon(1).start_again();
    p.wait_synced(DEADLINE);
    assert_eq!(wait_file(&unfenced, "after-resync-target"), "beta alpha\n");
}
