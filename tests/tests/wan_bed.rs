//! The WAN test bed (tests/src/wan.rs) measured, and a pair replicating over it.
//!
//! The bed's figures are printed, not judged: the round trip through it must be
//! at least the configured RTT (the proxy holds each chunk that long; it can
//! only be later), and the throughput is printed beside the configured rate
//! with only a sanity bound (> 0). Speed belongs in bench/ (`--preset wan`).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use blockd_tests::loadgen::{LoadGen, LoadOpts, verify_acked};
use blockd_tests::netns::ADDRS;
use blockd_tests::pair::PairOpts;
use blockd_tests::pattern::{file_reader, nbd_reader, random_seed};
use blockd_tests::scatter::assert_data_equal;
use blockd_tests::wan::{WanBed, WanLink};
use blockd_tests::*;

const LINK: WanLink = WanLink { rtt_ms: 40, rate_mbit: 100 };
/// Bound on every wait and socket operation.
const WAIT: Duration = Duration::from_secs(90);
const ECHO_PORT: u16 = 7001;
const SINK_PORT: u16 = 7002;
/// The replication port inside each namespace.
const PORT: u16 = 7789;
/// Round trips timed through the bed.
const ROUND_TRIPS: usize = 10;
/// How long the throughput client sends.
const SEND_FOR: Duration = Duration::from_secs(3);
const BLOCK: u32 = 4096;

fn bounded(s: &TcpStream) {
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s.set_write_timeout(Some(WAIT)).expect("write timeout");
}

/// Accepts one connection and echoes what it reads until EOF.
fn echo_once(l: TcpListener) {
    let (mut s, _) = l.accept().expect("echo accept");
    bounded(&s);
    s.set_nodelay(true).expect("nodelay");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).expect("echo read") {
            0 => return,
            n => s.write_all(&buf[..n]).expect("echo write"),
        }
    }
}

/// Accepts one connection and reads it to EOF: (bytes, time from the first
/// byte to EOF).
fn sink_once(l: TcpListener) -> (u64, Duration) {
    let (mut s, _) = l.accept().expect("sink accept");
    bounded(&s);
    let mut buf = vec![0u8; 1 << 20];
    let (mut total, mut first) = (0u64, None);
    loop {
        let n = s.read(&mut buf).expect("sink read");
        if n == 0 {
            let took = first.map_or(Duration::ZERO, |t: Instant| t.elapsed());
            return (total, took);
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
}

/// Connects to `to` and sends for [`SEND_FOR`], then half-closes.
fn send_for(to: SocketAddr) -> u64 {
    let mut s = TcpStream::connect_timeout(&to, WAIT).expect("connect");
    bounded(&s);
    let buf = vec![0x5au8; 1 << 20];
    let (start, mut sent) = (Instant::now(), 0u64);
    while start.elapsed() < SEND_FOR {
        s.write_all(&buf).expect("send");
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write).expect("half-close");
    sent
}

/// A listener on namespace `i`'s veth address (bound before this returns, so a
/// client may connect at once; accepting works from any thread).
fn listen_in(bed: &WanBed, i: usize, port: u16) -> TcpListener {
    let addr = SocketAddr::from((ADDRS[i], port));
    bed.net.run_in(i, move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
}

/// Throughput in Mbit/s.
fn mbit(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / 1e6
}

#[test]
fn the_wan_bed_adds_its_round_trip_and_carries_data_at_about_its_rate() {
    let mut bed = WanBed::create("wanbed", LINK);

    // Round trips: one byte to an echo server in beta's namespace, through the
    // delay proxy in alpha's.
    let echo = listen_in(&bed, 1, ECHO_PORT);
    let echo = std::thread::spawn(move || echo_once(echo));
    let (_, via) = bed.delay_to(ECHO_PORT);
    let mut rtts = bed.net.run_in(0, move || {
        let mut s = TcpStream::connect_timeout(&via, WAIT).expect("connect through the proxy");
        bounded(&s);
        s.set_nodelay(true).expect("nodelay");
        let mut rtts = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..ROUND_TRIPS {
            let t = Instant::now();
            s.write_all(&[i as u8]).expect("send a byte");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("its echo");
            rtts.push(t.elapsed());
            assert_eq!(b[0], i as u8, "the echo is the byte sent");
        }
        rtts
    });
    echo.join().expect("echo server");
    rtts.sort();
    let want = Duration::from_millis(LINK.rtt_ms);
    eprintln!(
        "round trip through the bed ({} ms configured): min {:?}, median {:?}, max {:?}",
        LINK.rtt_ms,
        rtts[0],
        rtts[ROUND_TRIPS / 2],
        rtts[ROUND_TRIPS - 1]
    );
    assert!(rtts[0] >= want, "a round trip took {:?}, less than the configured {want:?}", rtts[0]);

    // Throughput alpha -> beta through the proxy and the shaped veth, measured at
    // the receiver; then beta -> alpha straight over the veth (the other tbf).
    let sink = listen_in(&bed, 1, SINK_PORT);
    let sink = std::thread::spawn(move || sink_once(sink));
    let (proxy, via) = bed.delay_to(SINK_PORT);
    let sent = bed.net.run_in(0, move || send_for(via));
    let (got, took) = sink.join().expect("sink");
    assert_eq!(got, sent, "the sink received every byte sent");
    let forwarded = bed.proxy(proxy).stats().to_target;
    assert_eq!(forwarded, sent, "every byte went through the delay proxy");
    let back = listen_in(&bed, 0, SINK_PORT);
    let back = std::thread::spawn(move || sink_once(back));
    let to_alpha = SocketAddr::from((ADDRS[0], SINK_PORT));
    let sent_back = bed.net.run_in(1, move || send_for(to_alpha));
    let (got_back, took_back) = back.join().expect("sink in alpha's namespace");
    assert_eq!(got_back, sent_back, "alpha's sink received every byte sent");
    eprintln!(
        "throughput ({} Mbit/s configured): alpha -> beta through the proxy {:.1} Mbit/s \
         ({got} bytes in {took:.2?}); beta -> alpha over the veth {:.1} Mbit/s ({got_back} bytes \
         in {took_back:.2?})",
        LINK.rate_mbit,
        mbit(got, took),
        mbit(got_back, took_back)
    );
    assert!(got > 0 && got_back > 0, "data crossed the link both ways");
}

#[test]
fn a_protocol_a_pair_replicates_over_the_wan_bed() {
    // Declared first: dropped last, after the nodes inside it were killed.
    let mut bed = WanBed::create("wanpair", LINK);
    let mut p = bed.start_pair("wan-pair", PORT, PairOpts { protocol: 'A', ..PairOpts::default() });
    p.wait_established();
    p.ctl_ok(0, &["primary"]);

    let alpha = Addr::Unix(p.nodes[0].nbd.clone());
    let opts =
        LoadOpts { connections: 2, region_bytes: 16 * MIB, seed: random_seed(), ..LoadOpts::default() };
    let load = LoadGen::start(&alpha, EXPORT, opts);
    load.wait_acked(3000, WAIT);
    load.stop();
    let log = load.finish();
    eprintln!("{}", log.summary());
    assert_eq!(log.error_count(), 0, "no write failed: {}", log.summary());
    assert_eq!(log.connections_died(), 0, "no writer lost its connection: {}", log.summary());

    p.wait_synced(WAIT);
    let replicated = p.peer_u64(0, "replicated_bytes");
    assert!(
        replicated >= log.acked_count() as u64 * u64::from(BLOCK),
        "every acknowledged write was shipped"
    );
    // Protocol A: in sync as alpha sees it while the last writes may still be on
    // the link; the proxy carries them all (payload plus framing) eventually.
    let carried = bed
        .proxy(0)
        .wait_until("the proxy carried what alpha replicated", WAIT, |s| s.to_target >= replicated);
    eprintln!(
        "alpha replicated {replicated} bytes; the delay proxy carried {} towards beta",
        carried.to_target
    );
    let out = p.ctl_ok(0, &["verify"]);
    assert!(
        out.stdout.contains("verify: 0 bytes out of sync"),
        "verify found differences\n{}",
        out.describe()
    );
    verify_acked(&log, nbd_reader(&alpha, EXPORT, BLOCK))
        .unwrap_or_else(|e| panic!("acknowledged writes lost on the Primary: {e}"));

    let size = p.export_size(0);
    p.stop_node(0);
    p.stop_node(1);
    let compared = assert_data_equal(p.disk_path(0), p.store_path(1), size);
    eprintln!("copies equal ({compared} bytes of data compared)");
    verify_acked(&log, file_reader(p.store_path(1), BLOCK))
        .unwrap_or_else(|e| panic!("the Secondary lacks acknowledged writes: {e}"));
}
