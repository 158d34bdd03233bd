//! Prometheus text metrics (`metrics = "127.0.0.1:9942"` on a node in the config).
//!
//! - [`Metrics`]: counters, gauges and latency histograms as relaxed atomics. The
//!   replicated device counts requests on its hot path (an atomic add each, and one
//!   clock read at submit and one at reply for the latency); the core task refreshes
//!   the gauges (out-of-sync bytes, replication lag, resync rate, states) on each tick.
//! - [`render`]: the text exposition format (version 0.0.4), with HELP and TYPE lines.
//! - [`spawn`]: a minimal HTTP/1.1 server for `GET /metrics` (anything else is 404);
//!   bounded request size, time and connections.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Latency bucket upper bounds, in microseconds (`le` labels are seconds).
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000];

/// Longest HTTP request head read; slowest client; concurrent scrapes.
const MAX_REQUEST_BYTES: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

/// A latency histogram (cumulative buckets are computed when rendering).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters and gauges of one node.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub request_errors: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
    /// Gauges refreshed by the core task.
    pub out_of_sync_bytes: AtomicU64,
    pub unsent_bytes: AtomicU64,
    pub writes_in_flight: AtomicU64,
    pub resync_rate_bytes_per_sec: AtomicU64,
    pub resync_done_bytes: AtomicU64,
    pub resync_total_bytes: AtomicU64,
    pub replicated_bytes: AtomicU64,
    pub resync_sent_bytes: AtomicU64,
    pub al_hot_extents: AtomicU64,
    pub al_transactions: AtomicU64,
    /// 1 while the peer link is up and replicating.
    pub connected: AtomicU64,
    /// 1 while Primary.
    pub primary: AtomicU64,
    /// 1 while the local disk is UpToDate.
    pub up_to_date: AtomicU64,
    /// 1 while the peer is refused after a split brain (until it is resolved).
    pub split_brain: AtomicU64,
    /// 1 while the fence-peer handler runs (write acknowledgements are held).
    pub fencing_peer: AtomicU64,
    /// fence-peer handler runs that did not fence the peer (any exit code but 3, 4,
    /// 5, 7; not run; timed out).
    pub fence_failures: AtomicU64,
    /// 1 while resync is paused (`pause-sync` here or on the peer).
    pub resync_paused: AtomicU64,
    /// 1 once the local disk failed (status `disk_error` says why).
    pub disk_failed: AtomicU64,
    /// Local I/O errors (passed on to a client or not).
    pub io_errors: AtomicU64,
    /// Peer links dropped by `ack-timeout`.
    pub ack_timeouts: AtomicU64,
    /// 1 while this Primary is pulled ahead of its peer; times it pulled ahead.
    pub ahead: AtomicU64,
    pub pull_aheads: AtomicU64,
}

impl Metrics {
    /// Counts a fence-peer handler's end that left the peer unfenced.
    pub fn count_fence(&self, result: &Result<i32, String>) {
        // DRBD's meanings: 3 peer not UpToDate, 4 outdated/fenced, 5 unreachable, 7
        // stonithed; anything else did not fence it.
        if !matches!(result, Ok(3 | 4 | 5 | 7)) {
            self.fence_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether a connection refusal (as status shows it) is a split brain.
pub fn is_split_brain(refusal: &str) -> bool {
    refusal.starts_with("split brain")
}

/// What a scrape reads besides [`Metrics`].
#[derive(Clone)]
pub struct Sources {
    pub resource: String,
    pub node: String,
    pub metrics: Arc<Metrics>,
    pub nbd: Arc<nbd_server::ServerStats>,
    pub peer: Arc<crate::peer::PeerStats>,
}

/// The text exposition of everything.
pub fn render(s: &Sources) -> String {
    let m = &s.metrics;
    let labels = format!("resource=\"{}\",node=\"{}\"", escape(&s.resource), escape(&s.node));
    let mut out = String::with_capacity(4096);
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut one = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP blockd_{name} {help}\n# TYPE blockd_{name} {kind}\nblockd_{name}{{{labels}}} {value}"
        );
    };
    one("nbd_reads_total", "counter", "NBD read requests.", get(&m.reads));
    one("nbd_read_bytes_total", "counter", "Bytes read by NBD clients.", get(&m.read_bytes));
    one("nbd_writes_total", "counter", "NBD write, trim and write-zeroes requests.", get(&m.writes));
    one("nbd_write_bytes_total", "counter", "Bytes written by NBD clients.", get(&m.write_bytes));
    one("nbd_flushes_total", "counter", "NBD flush requests.", get(&m.flushes));
    one("nbd_trims_total", "counter", "NBD trim and write-zeroes requests.", get(&m.trims));
    one(
        "nbd_request_errors_total",
        "counter",
        "NBD requests answered with an error.",
        get(&m.request_errors),
    );
    one(
        "nbd_connections_failed_total",
        "counter",
        "NBD connections that ended with a protocol violation or I/O error.",
        s.nbd.failed_connections.load(Ordering::Relaxed),
    );
    one(
        "nbd_connections",
        "gauge",
        "NBD client connections open now.",
        s.nbd.active_connections.load(Ordering::Relaxed) as u64,
    );
    one(
        "out_of_sync_bytes",
        "gauge",
        "Bytes that differ (or may differ) from the peer.",
        get(&m.out_of_sync_bytes),
    );
    one(
        "replication_unsent_bytes",
        "gauge",
        "Replication frames queued and not yet sent.",
        get(&m.unsent_bytes),
    );
    one("writes_in_flight", "gauge", "Application writes not yet answered.", get(&m.writes_in_flight));
    one("resync_rate_bytes_per_second", "gauge", "Measured resync rate.", get(&m.resync_rate_bytes_per_sec));
    one("resync_done_bytes", "gauge", "Bytes of the running resync done.", get(&m.resync_done_bytes));
    one("resync_total_bytes", "gauge", "Bytes of the running resync in all.", get(&m.resync_total_bytes));
    one(
        "replicated_bytes_total",
        "counter",
        "Payload bytes sent to the peer for replication.",
        get(&m.replicated_bytes),
    );
    one(
        "resync_sent_bytes_total",
        "counter",
        "Payload bytes sent to the peer for resync.",
        get(&m.resync_sent_bytes),
    );
    one("activity_log_hot_extents", "gauge", "Hot extents of the activity log.", get(&m.al_hot_extents));
    one(
        "activity_log_transactions_total",
        "counter",
        "Activity-log transactions written.",
        get(&m.al_transactions),
    );
    one("peer_connected", "gauge", "1 while replicating with the peer.", get(&m.connected));
    one("role_primary", "gauge", "1 while Primary.", get(&m.primary));
    one("disk_up_to_date", "gauge", "1 while the local disk is UpToDate.", get(&m.up_to_date));
    one(
        "disk_failed",
        "gauge",
        "1 once the local disk failed and was detached (Failed, then Diskless; see status disk_error).",
        get(&m.disk_failed),
    );
    one(
        "peer_ack_timeouts_total",
        "counter",
        "Peer links dropped because the peer owed acknowledgements and made no progress within ack-timeout.",
        get(&m.ack_timeouts),
    );
    one(
        "peer_ahead",
        "gauge",
        "1 while this Primary is pulled ahead of its peer (on-congestion = pull-ahead: writes go to the bitmap).",
        get(&m.ahead),
    );
    one(
        "peer_pull_aheads_total",
        "counter",
        "Times this Primary pulled ahead of its peer because more than congestion-fill was queued.",
        get(&m.pull_aheads),
    );
    one(
        "io_errors_total",
        "counter",
        "I/O errors of the local disk (passed on to a client under on-io-error = pass-on, or detaching it).",
        get(&m.io_errors),
    );
    one(
        "split_brain",
        "gauge",
        "1 while the peer is refused after a split brain (resolve with connect --discard-my-data).",
        get(&m.split_brain),
    );
    one(
        "fencing_peer",
        "gauge",
        "1 while the fence-peer handler runs (write acknowledgements held).",
        get(&m.fencing_peer),
    );
    one(
        "fence_failures_total",
        "counter",
        "fence-peer handler runs that did not fence the peer.",
        get(&m.fence_failures),
    );
    one("resync_paused", "gauge", "1 while resync is paused (pause-sync).", get(&m.resync_paused));
    let p = s.peer.snapshot();
    one(
        "peer_receive_budget_waits_total",
        "counter",
        "Peer data frames that waited for the receive budget (received data not yet applied filled it).",
        p.receive_budget_waits,
    );
    one(
        "peer_request_budget_waits_total",
        "counter",
        "Peer read requests (digests, reads) that waited for the request budget.",
        p.request_budget_waits,
    );
    one(
        "peer_sent_wire_bytes_total",
        "counter",
        "Bytes of frames written to the peer's socket (headers included, data compressed where it was).",
        p.sent_wire_bytes,
    );
    one(
        "peer_sent_uncompressed_bytes_total",
        "counter",
        "The same frames' bytes before compression (equal to the wire bytes without compression).",
        p.sent_uncompressed_bytes,
    );
    one(
        "peer_compression",
        "gauge",
        "1 while the link to the peer compresses (both nodes have compression = zstd).",
        u64::from(p.compressing),
    );
    let _ = writeln!(
        out,
        "# HELP blockd_peer_link_errors_total Peer link failures by kind.\n# TYPE blockd_peer_link_errors_total counter"
    );
    for (kind, value) in [
        ("bad_magic", p.bad_magic),
        ("bad_crc", p.bad_crc),
        ("bad_type", p.bad_type),
        ("bad_flags", p.bad_flags),
        ("oversize", p.oversize),
        ("bad_length", p.bad_length),
        ("seq_gap", p.seq_gap),
        ("malformed", p.malformed),
        ("truncated", p.truncated),
        ("timeout", p.timeouts),
        ("handshake_refused", p.handshake_refused),
        ("handshake_failed", p.handshake_failed),
    ] {
        let _ = writeln!(out, "blockd_peer_link_errors_total{{{labels},kind=\"{kind}\"}} {value}");
    }
    histogram(&mut out, &labels, "nbd_read_latency_seconds", "NBD read latency.", &m.read_latency);
    histogram(&mut out, &labels, "nbd_write_latency_seconds", "NBD write latency.", &m.write_latency);
    out
}

fn histogram(out: &mut String, labels: &str, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP blockd_{name} {help}\n# TYPE blockd_{name} histogram");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        let le = *bound as f64 / 1e6;
        let _ = writeln!(out, "blockd_{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    cumulative += h.buckets[LATENCY_BUCKETS_US.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "blockd_{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "blockd_{name}_sum{{{labels}}} {sum}");
    // The count of the +Inf bucket, so both agree in one scrape.
    let _ = writeln!(out, "blockd_{name}_count{{{labels}}} {cumulative}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn spawn(
    addr: &str,
    sources: Sources,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr, "metrics endpoint listening");
    Ok(tokio::spawn(async move {
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    if active.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                        active.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    let (sources, active) = (sources.clone(), active.clone());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, &sources)).await;
                        active.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    }))
}

async fn serve(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST_BYTES {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", render(sources))
    } else {
        ("404 Not Found", "only GET /metrics is served here\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_brain_is_told_from_other_refusals() {
        use crate::repl::decide::Refusal;
        assert!(is_split_brain(&Refusal::SplitBrain.to_string()));
        for other in [Refusal::UnrelatedData, Refusal::BothPrimary, Refusal::NoConsistentSource] {
            assert!(!is_split_brain(&other.to_string()), "{other:?}");
        }
    }

    #[test]
    fn only_fenced_exit_codes_count_as_fenced() {
        let m = Metrics::default();
        for ok in [3, 4, 5, 7] {
            m.count_fence(&Ok(ok));
        }
        assert_eq!(m.fence_failures.load(Ordering::Relaxed), 0);
        m.count_fence(&Ok(1));
        m.count_fence(&Err("timed out".into()));
        assert_eq!(m.fence_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let sources = Sources {
            resource: "r0".into(),
            node: "al\"pha".into(),
            metrics: Arc::default(),
            nbd: Arc::default(),
            peer: Arc::default(),
        };
        sources.metrics.writes.fetch_add(3, Ordering::Relaxed);
        sources.metrics.write_latency.observe(Duration::from_micros(80));
        sources.metrics.write_latency.observe(Duration::from_micros(300));
        sources.metrics.write_latency.observe(Duration::from_secs(3));
        let text = render(&sources);
        assert!(text.contains("blockd_nbd_writes_total{resource=\"r0\",node=\"al\\\"pha\"} 3"), "{text}");
        assert!(text.contains(
            "blockd_nbd_write_latency_seconds_bucket{resource=\"r0\",node=\"al\\\"pha\",le=\"0.0001\"} 1"
        ));
        assert!(text.contains(
            "blockd_nbd_write_latency_seconds_bucket{resource=\"r0\",node=\"al\\\"pha\",le=\"0.0005\"} 2"
        ));
        assert!(text.contains(
            "blockd_nbd_write_latency_seconds_bucket{resource=\"r0\",node=\"al\\\"pha\",le=\"+Inf\"} 3"
        ));
        assert!(
            text.contains("blockd_nbd_write_latency_seconds_count{resource=\"r0\",node=\"al\\\"pha\"} 3")
        );
        // Every sample line belongs to a family announced by a TYPE line.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{name} has no TYPE line");
        }
    }
}
