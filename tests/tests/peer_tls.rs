//! Mutual TLS on the peer link (issue 14) with real processes: a pair with
//! certificates from its CA connects and replicates; a certificate for another
//! node, from another CA or expired, and a plaintext node meeting a TLS node, are
//! refused by both sides, each logging why and counting it (metrics), with nothing
//! replicated (checked on the Secondary's disk); a capture on the replication port
//! shows no plaintext with TLS (and does without: the control); replacing the files
//! rotates the certificates at the next connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockd::certs::{Ca, Validity};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::raw::{CMD_WRITE, RawClient};
use blockd_tests::tls::{CertFiles, TestCa};
use blockd_tests::*;

/// How long a refused pair is watched for a connection that must not come.
const WATCH: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(30);

/// The certificates of a TLS pair: a CA and alpha's and beta's files.
struct Certs {
    _dir: TempDir,
    ca: TestCa,
    files: [CertFiles; 2],
}

fn certs(label: &str) -> Certs {
    let dir = TempDir::new(label);
    let ca = TestCa::new(dir.path(), "pair");
    let v = Validity::days_from_now(30);
    let files = [ca.node("alpha", "alpha", v), ca.node("beta", "beta", v)];
    Certs { _dir: dir, ca, files }
}

/// Pair options with TLS on both nodes and a metrics endpoint on each.
fn tls_opts(c: &Certs, metrics: [u16; 2]) -> PairOpts {
    let node = |n: usize| format!("{}metrics = \"127.0.0.1:{}\"\n", c.files[n].node_toml(), metrics[n]);
    PairOpts { extra_resource: c.ca.resource_toml(), extra_node: [node(0), node(1)], ..PairOpts::default() }
}

/// `blockd_peer_link_errors_total{kind=KIND}` of a node's metrics endpoint.
fn link_errors(port: u16, kind: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let want = format!("kind=\"{kind}\"}} ");
    text.lines()
        .filter(|l| l.starts_with("blockd_peer_link_errors_total"))
        .find_map(|l| l.split_once(&want).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// A 4 KiB block nobody would write by chance.
fn canary(tag: &str) -> Vec<u8> {
    tag.as_bytes().iter().copied().cycle().take(4096).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes `data` at offset 0 through alpha's NBD socket (alpha must be Primary).
fn write_block(p: &Pair, data: &[u8]) {
    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(p.nodes[0].nbd.clone()), EXPORT, false);
    c.request(0, CMD_WRITE, 1, 0, data.len() as u32, data).expect("write");
    assert_eq!(c.finish(1), 0, "write acknowledged");
}

#[test]
fn a_tls_pair_connects_and_replicates() {
    let c = certs("tls-ok");
    let mut p = Pair::start("tls-ok", &tls_opts(&c, [free_port(), free_port()]));
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let data = canary("replicated over TLS ");
    write_block(&p, &data);
    p.wait(WAIT, |p| p.peer_u64(0, "replicated_bytes") >= 4096, "the write is replicated");
    p.wait(WAIT, |p| p.disk_bytes(1, 4096) == data, "beta has the block");
    for n in 0..2 {
        assert!(p.daemon(n).log().contains("peer link: mutual TLS 1.3"), "{}", p.daemon(n).log_tail(20));
    }
    let shown = p.ctl_ok(0, &["show"]).stdout;
    assert!(shown.contains("tls-ca = ") && shown.contains("tls-cert = "), "{shown}");
}

/// Starts the pair (beta with `beta_config` applied to the shared text when given),
/// waits until each side logs its reason and counted it, then makes alpha Primary,
/// writes a canary and checks that beta never connects and its disk never gets it.
fn refused(label: &str, c: &Certs, plaintext: Option<usize>, want: [&str; 2], kinds: [&str; 2]) {
    let opts = tls_opts(c, [free_port(), free_port()]);
    let metrics = [0, 1].map(|n| {
        let line = opts.extra_node[n].lines().find(|l| l.starts_with("metrics")).expect("metrics line");
        line.rsplit(':').next().and_then(|p| p.trim_end_matches('"').parse::<u16>().ok()).expect("port")
    });
    let mut p = Pair::create(label, &opts);
    if let Some(n) = plaintext {
        // That node's own config: the pair's without any TLS key.
        let text = std::fs::read_to_string(&p.config).expect("config");
        let lines = [c.ca.resource_toml(), c.files[0].node_toml(), c.files[1].node_toml()];
        let plain = lines.iter().fold(text.clone(), |t, l| t.replace(l.as_str(), ""));
        assert_ne!(text, plain, "the plaintext config differs");
        let path = p.dir.join(&format!("{}-plain.toml", p.nodes[n].name));
        std::fs::write(&path, plain).expect("write the plaintext config");
        p.nodes[n].config = Some(path);
    }
    p.start_node(0);
    p.start_node(1);
    let logs_say = |p: &mut Pair| (0..2).all(|n| p.daemon(n).log().contains(want[n]));
    p.wait(WAIT, logs_say, &format!("alpha logs {:?} and beta {:?}", want[0], want[1]));
    p.wait(
        WAIT,
        |_| (0..2).all(|n| link_errors(metrics[n], kinds[n]) >= 1),
        &format!("counted as {kinds:?}"),
    );
    p.ctl_ok(0, &["primary"]);
    let data = canary(&format!("{label}: must never reach beta "));
    write_block(&p, &data);
    let deadline = Instant::now() + WATCH;
    while Instant::now() < deadline {
        for n in 0..2 {
            let peer = p.peer(n);
            assert_ne!(peer["connection"], "Connected", "node {n}: {peer}");
            assert_eq!(peer["replicated_bytes"], 0, "{peer}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    p.stop_node(1);
    let beta_disk = std::fs::read(p.disk_path(1)).expect("beta's disk");
    assert!(!contains(&beta_disk, &data), "nothing from alpha reached beta's disk");
    assert_eq!(p.disk_bytes(0, 4096), data, "alpha wrote it locally");
}

#[test]
fn a_certificate_for_another_node_is_refused_by_both() {
    let c = certs("tls-name");
    // alpha's files hold a certificate naming gamma: beta (the acceptor) refuses it.
    c.ca.node("alpha", "gamma", Validity::days_from_now(30));
    refused(
        "tls-name",
        &c,
        None,
        [
            "the peer refused this node's TLS handshake (received fatal alert: BadCertificate)",
            "refused the peer's certificate: invalid peer certificate: certificate not valid for name \"alpha\"",
        ],
        ["handshake_failed", "handshake_refused"],
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused_by_both() {
    let c = certs("tls-ca");
    let other = Ca::new("someone else's CA", Validity::days_from_now(30)).expect("CA");
    c.ca.write_pair("beta", &other.node("beta", &[], Validity::days_from_now(30)).expect("cert"));
    // beta's certificate is from another CA: alpha (the dialer) refuses it.
    refused(
        "tls-ca",
        &c,
        None,
        [
            "refused the peer's certificate: invalid peer certificate: UnknownIssuer",
            "peer TLS handshake failed: the peer refused this node's TLS handshake (received fatal alert",
        ],
        ["handshake_refused", "handshake_failed"],
    );
}

#[test]
fn an_expired_certificate_is_refused_by_both() {
    let c = certs("tls-expired");
    c.ca.node("alpha", "alpha", Validity::expired());
    refused(
        "tls-expired",
        &c,
        None,
        [
            "the peer refused this node's TLS handshake (received fatal alert: CertificateExpired)",
            "refused the peer's certificate: invalid peer certificate: certificate expired",
        ],
        ["handshake_failed", "handshake_refused"],
    );
}

#[test]
fn a_plaintext_acceptor_and_a_tls_dialer_refuse_each_other() {
    let c = certs("tls-plain-b");
    refused(
        "tls-plain-b",
        &c,
        Some(1),
        [
            "the peer does not speak TLS on the peer link",
            "peer speaks TLS but this node has no resource.tls-ca",
        ],
        ["handshake_failed", "handshake_refused"],
    );
}

#[test]
fn a_plaintext_dialer_and_a_tls_acceptor_refuse_each_other() {
    let c = certs("tls-plain-a");
    refused(
        "tls-plain-a",
        &c,
        Some(0),
        [
            "peer refused the connection: the peer speaks plaintext but this node requires TLS",
            "refusing peer connection: the peer speaks plaintext but this node requires TLS",
        ],
        ["handshake_failed", "handshake_refused"],
    );
}

/// Captures the replication port while a canary is written through NBD; returns
/// whether the capture holds the canary.
fn capture_shows_canary(label: &str, tls: bool) -> bool {
    require("tcpdump");
    let c = certs(label);
    let port = free_port();
    let mut opts = if tls { tls_opts(&c, [free_port(), free_port()]) } else { PairOpts::default() };
    opts.replication = Some([format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{port}")]);
    // Explicit addresses (to know the port) make the harness add a shared secret:
    // it authenticates, it does not encrypt, so the control still sees plaintext.
    let mut p = Pair::start(label, &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let pcap = p.dir.join("repl.pcap");
    let log = p.dir.join("tcpdump.log");
    let mut dump = Background::spawn(
        "tcpdump",
        Command::new("tcpdump")
            .args(["-i", "lo", "--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(&pcap)
            .arg(format!("tcp port {port}")),
        &log,
    );
    p.wait(
        WAIT,
        |_| std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on lo")),
        "tcpdump listening",
    );
    let data = canary(&format!("{label}-canary-0123456789 "));
    let before = p.peer_u64(0, "replicated_bytes");
    write_block(&p, &data);
    p.wait(WAIT, |p| p.peer_u64(0, "replicated_bytes") >= before + 4096, "the write is replicated");
    p.wait(WAIT, |p| p.disk_bytes(1, 4096) == data, "beta has the block");
    let status = dump.signal_and_wait(libc::SIGINT, WAIT);
    assert!(status.success() || status.code().is_none(), "tcpdump: {status:?}\n{}", dump.log());
    let captured = std::fs::read(&pcap).expect("capture file");
    let log = dump.log();
    let captured_packets = log
        .lines()
        .find_map(|l| l.strip_suffix(" packets captured").and_then(|n| n.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    // The Hellos and the 4 KiB write at least: the capture saw the link.
    assert!(captured_packets >= 4, "the capture saw the link: {log}");
    contains(&captured, &data[..64])
}

#[test]
fn a_capture_of_the_tls_link_shows_no_plaintext() {
    assert!(!capture_shows_canary("tls-capture", true), "the canary travelled in plaintext");
}

#[test]
fn a_capture_of_the_plain_link_shows_the_plaintext() {
    // The control: the same capture without TLS finds the canary, so the test above
    // would notice plaintext.
    assert!(capture_shows_canary("plain-capture", false), "the control capture misses the canary");
}

#[test]
fn replaced_certificate_files_are_used_at_the_next_connection() {
    let c = certs("tls-rotate");
    let metrics = [free_port(), free_port()];
    let mut p = Pair::start("tls-rotate", &tls_opts(&c, metrics));
    p.wait_established();
    // A bad certificate in alpha's files: the next connection is refused...
    p.ctl_ok(0, &["disconnect"]);
    p.wait(WAIT, |p| p.peer(0)["connection"] != "Connected", "alpha disconnected");
    c.ca.node("alpha", "gamma", Validity::days_from_now(30));
    let refused_before = link_errors(metrics[1], "handshake_refused");
    p.ctl_ok(0, &["connect"]);
    p.wait(
        WAIT,
        |_| link_errors(metrics[1], "handshake_refused") > refused_before,
        "beta refuses the new file",
    );
    assert_ne!(p.peer(0)["connection"], "Connected");
    // ...and a good new one (another key) connects without a restart.
    let old_key = std::fs::read(&c.files[0].key).expect("key");
    c.ca.node("alpha", "alpha", Validity::days_from_now(30));
    assert_ne!(std::fs::read(&c.files[0].key).expect("key"), old_key, "a new key");
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let data = canary("after rotation ");
    write_block(&p, &data);
    p.wait(WAIT, |p| p.disk_bytes(1, 4096) == data, "beta has the block written after the rotation");
    assert!(Path::new(&c.files[0].cert).exists());
}
