//! The Prometheus text endpoint (`metrics = "host:port"` on a node) and the control
//! socket's group access (`control-group`), against a real pair: the exposition
//! parses (every sample in a family announced by HELP and TYPE lines, histogram
//! buckets cumulative and ending in `+Inf` = `_count`), and counters move with NBD
//! traffic.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use blockd_tests::daemon::{Addr, free_port};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::raw::RawClient;
use blockd_tests::server::EXPORT;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

/// GET `path`: (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.contains("200") {
        assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        assert_eq!(length, body.len(), "the body is complete");
    }
    (status, body.to_string())
}

/// Parses the exposition format strictly enough to catch mistakes: returns
/// `name{labels}` → value for every sample.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().expect("a name").to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("name and type");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice: {line}");
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().expect("a name");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && name.starts_with("blockd_"),
                "{name}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "{name}: no TYPE line before it");
            assert!(helped.iter().any(|h| h == family), "{name}: no HELP line");
            samples.insert(series.to_string(), value);
        }
    }
    // Histograms: cumulative buckets, the last one `+Inf` and equal to `_count`.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{family}_bucket{{")))
            .map(|(k, v)| {
                let le = k.split("le=\"").nth(1).and_then(|r| r.split('"').next()).expect("an le label");
                (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le") }, *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}: buckets not cumulative");
        let inf = buckets.last().expect("buckets");
        assert!(inf.0.is_infinite(), "{family}: no +Inf bucket");
        let count =
            samples.iter().find(|(k, _)| k.starts_with(&format!("{family}_count{{"))).expect("_count");
        assert_eq!(inf.1, *count.1, "{family}: +Inf bucket and _count differ");
    }
    samples
}

/// The value of the one sample of `name` (labels ignored).
fn value(samples: &HashMap<String, f64>, name: &str) -> f64 {
    let hits: Vec<f64> =
        samples.iter().filter(|(k, _)| k.split('{').next() == Some(name)).map(|(_, v)| *v).collect();
    assert_eq!(hits.len(), 1, "{name}: {hits:?}");
    hits[0]
}

#[test]
fn metrics_parse_and_move_with_traffic_and_the_control_group_can_connect() {
    let port = free_port();
    let opts = PairOpts {
        extra_node: [format!("metrics = \"127.0.0.1:{port}\"\ncontrol-group = \"root\"\n"), String::new()],
        ..PairOpts::default()
    };
    let mut pair = Pair::start("metrics", &opts);
    pair.ctl_ok(0, &["primary"]);
    pair.wait_established();

    // The control socket: group-accessible, group root (gid 0), as configured.
    let meta = std::fs::metadata(&pair.nodes[0].control).expect("alpha's control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    let beta = std::fs::metadata(&pair.nodes[1].control).expect("beta's control socket");
    assert_eq!(beta.permissions().mode() & 0o777, 0o600, "no group: root only");

    // Gauges are refreshed on the daemon's 100 ms tick: polled with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let m = parse(&get(port, "/metrics").1);
        let ready = value(&m, "blockd_peer_connected") == 1.0 && value(&m, "blockd_role_primary") == 1.0;
        assert!(ready || std::time::Instant::now() < deadline, "gauges never showed Connected + Primary");
        if ready {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(pair.nodes[0].nbd.clone()), EXPORT, false);
    let block = vec![0x5au8; 4096];
    for i in 0..10u64 {
        c.request(0, CMD_WRITE, i, i * 4096, 4096, &block).expect("write");
        assert_eq!(c.finish(i), 0);
    }
    for i in 0..5u64 {
        c.request(0, CMD_READ, 100 + i, i * 4096, 4096, &[]).expect("read");
        let mut data = vec![0u8; 4096];
        match c.read_reply().expect("reply") {
            blockd_tests::raw::Reply::Simple { error: 0, .. } => c.read_exact(&mut data).expect("data"),
            other => panic!("{other:?}"),
        }
        assert_eq!(data, block);
    }
    drop(c);
    // Gauges follow on the next tick; counters at once. Polled with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let m = parse(&get(port, "/metrics").1);
        if value(&m, "blockd_replicated_bytes_total") >= 40960.0 || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let grew = |name: &str| value(&after, name) - value(&before, name);
    assert_eq!(grew("blockd_nbd_writes_total"), 10.0);
    assert_eq!(grew("blockd_nbd_write_bytes_total"), 40960.0);
    assert_eq!(grew("blockd_nbd_reads_total"), 5.0);
    assert_eq!(grew("blockd_nbd_read_bytes_total"), 20480.0);
    assert_eq!(grew("blockd_nbd_write_latency_seconds_count"), 10.0);
    assert_eq!(grew("blockd_nbd_read_latency_seconds_count"), 5.0);
    assert!(grew("blockd_replicated_bytes_total") >= 40960.0, "the gauges were refreshed");
    assert!(value(&after, "blockd_activity_log_hot_extents") >= 1.0);
    // The peer link's wire bytes: every frame (writes, barriers, keepalive); without
    // compression exactly its uncompressed bytes.
    assert!(grew("blockd_peer_sent_wire_bytes_total") >= 40960.0);
    assert_eq!(
        value(&after, "blockd_peer_sent_wire_bytes_total"),
        value(&after, "blockd_peer_sent_uncompressed_bytes_total")
    );
    assert_eq!(value(&after, "blockd_peer_compression"), 0.0);

    let (status, _) = get(port, "/other");
    assert!(status.contains("404"), "{status}");
}
