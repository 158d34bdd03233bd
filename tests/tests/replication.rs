//! A replicated pair on loopback, driven with blockctl and real NBD clients.

use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::raw::{OPT_GO, REP_ERR_POLICY, RawClient};
use blockd_tests::*;

/// Writes through NBD on the Primary (nbdcopy of a random image, then fio with
/// verification) reach the Secondary byte for byte; checked on the backing files
/// after a clean stop of both nodes.
fn writes_reach_the_secondary(protocol: char) {
    writes_reach_the_secondary_with(protocol, PairOpts { protocol, ..PairOpts::default() });
}

fn writes_reach_the_secondary_with(protocol: char, opts: PairOpts) {
    let mut p = Pair::start(&format!("repl-{protocol}"), &opts);
    p.wait_established();
    // `worker-threads` (default 2 on a replicated node) is the number of the async
    // runtime's threads.
    for n in 0..2 {
        let want = opts.extra_node[n]
            .strip_prefix("worker-threads = ")
            .map_or(2, |v| v.trim().parse::<usize>().expect("worker-threads value"));
        let pid = p.daemon(n).pid().expect("daemon running");
        assert_eq!(runtime_workers(pid), want, "node {n}: runtime worker threads");
    }
    p.ctl_ok(0, &["primary"]);
    let size: u64 = tool("nbdinfo", ["--size", &p.uri(0)]).stdout.trim().parse().expect("size");
    assert!(size > 32 * MIB && size < opts.disk_bytes, "export is the disk minus metadata: {size}");

    let seed = p.dir.join("seed.img");
    random_file(&seed, size, 42, 0, 0);
    tool("nbdcopy", [seed.display().to_string(), p.uri(0)]);
    let uri = format!("--uri={}", p.uri(0));
    tool(
        "fio",
        [
            "--name=repl",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--offset=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--fsync=64",
        ],
    );
    p.stop_node(0);
    p.stop_node(1);
    let (a, b) = (p.disk_bytes(0, size), p.disk_bytes(1, size));
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_difference, None, "the Secondary's data differs from the Primary's");
}

#[test]
fn protocol_c_writes_reach_the_secondary() {
    writes_reach_the_secondary('C');
}

#[test]
fn protocol_b_writes_reach_the_secondary() {
    writes_reach_the_secondary('B');
}

#[test]
fn protocol_a_writes_reach_the_secondary() {
    writes_reach_the_secondary('A');
}

/// The same with other runtime thread counts than the default two: all of a node's
/// tasks on one thread (the standalone default), and more threads than tasks
/// usually keep busy.
#[test]
fn protocol_c_writes_reach_the_secondary_with_other_worker_threads() {
    let extra_node = ["worker-threads = 1\n".to_string(), "worker-threads = 3\n".to_string()];
    writes_reach_the_secondary_with('C', PairOpts { protocol: 'C', extra_node, ..PairOpts::default() });
}

/// Threads of a process named like tokio's runtime workers.
fn runtime_workers(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

/// A Secondary refuses NBD clients with a message naming the Primary; promoting a
/// node while the peer is Primary is refused.
#[test]
fn secondary_refuses_clients_and_roles_are_exclusive() {
    let mut p = Pair::start("repl-roles", &PairOpts::default());
    p.wait_established();
    let refused = run_capture(
        std::process::Command::new(require("nbdinfo")).arg(p.uri(1)),
        blockd_tests::tools::TOOL_TIMEOUT,
    );
    assert!(!refused.status.success(), "a Secondary must refuse NBD clients\n{}", refused.describe());
    p.ctl_ok(0, &["primary"]);
    p.wait(
        std::time::Duration::from_secs(10),
        |p| p.status(1)["peers"][0]["role"] == "Primary",
        "beta sees alpha Primary",
    );
    // libnbd 1.14 does not print the server's message: read the GO reply raw.
    let mut raw = RawClient::connect_fixed(&Addr::Unix(p.nodes[1].nbd.clone()));
    let reply = raw.option(OPT_GO, &RawClient::info_data(EXPORT, &[]));
    let message = String::from_utf8_lossy(&reply.data).into_owned();
    assert_eq!(reply.typ, REP_ERR_POLICY, "GO on a Secondary: {message}");
    assert_eq!(message, "node beta is Secondary; the Primary is alpha");
    let out = p.ctl(1, &["primary"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("peer is Primary"), "{}", out.describe());
    let status = p.status(0);
    assert_eq!((status["role"].as_str(), status["disk"].as_str()), (Some("Primary"), Some("UpToDate")));
    assert_eq!(status["peers"][0]["connection"], "Connected");
    p.stop_node(0);
    p.stop_node(1);
}

/// `secondary` is refused while an NBD client is connected; `--force` disconnects the
/// client (after its writes are answered and flushed) and demotes.
#[test]
fn demote_with_a_client_attached() {
    let mut p = Pair::start("repl-demote", &PairOpts::default());
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let (mut client, _, _) = RawClient::handshake(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, false);
    client.request(0, blockd_tests::raw::CMD_WRITE, 1, 0, 4, b"abcd").expect("write");
    assert_eq!(client.finish(1), 0);
    let out = p.ctl(0, &["secondary"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("1 NBD client(s) connected"), "{}", out.describe());
    assert_eq!(p.status(0)["role"], "Primary");
    p.ctl_ok(0, &["secondary", "--force"]);
    assert!(client.closed_by_server(), "the client was disconnected");
    assert_eq!(p.status(0)["role"], "Secondary");
    p.stop_node(0);
    p.stop_node(1);
    assert_eq!(&p.disk_bytes(1, 4)[..], b"abcd", "the write reached the peer before the demotion");
}
