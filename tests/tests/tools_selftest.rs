//! Self-tests of the failure-test tools (`loadgen`, `chain`, `proxy`) against
//! a standalone server (blockd with the posix engine, or nbdkit with
//! `BLOCKD_TEST_SERVER=nbdkit`). Every wait polls with a deadline; no assert
//! depends on timing.

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use blockd_tests::chain::{ChainOpts, ChainWriter, PrefixError};
use blockd_tests::loadgen::{
    AckLog, EndReason, Found, LoadGen, LoadOpts, WriteRec, verify_acked, verify_flushed,
};
use blockd_tests::pattern::{self, Decoded, file_reader, nbd_reader, write_block_file};
use blockd_tests::proxy::{Direction, Proxy};
use blockd_tests::raw::*;
use blockd_tests::*;

const BS: u32 = 4096;
const WAIT: Duration = Duration::from_secs(120);

fn server(label: &str, opts: Opts) -> Server {
    Server::start(ServerKind::for_engine(Engine::Posix), label, opts)
}

/// Saves the log beside the server's files (kept with BLOCKD_KEEP_TMP=1).
fn save(srv: &Server, name: &str, log: &AckLog) {
    log.save(&srv.path(name)).expect("save ack log");
    eprintln!("{name}: {}", log.summary());
}

/// Issued after `w` was acknowledged and acknowledged itself: a write that
/// must have replaced `w` on its block.
fn overwritten_by_later(log: &AckLog, w: &WriteRec) -> bool {
    let a = w.acked.expect("acked");
    log.writes.iter().any(|x| x.block == w.block && x.acked.is_some() && x.issued > a)
}

#[test]
fn loadgen_verifies_after_stop_and_after_kill9_and_finds_corruption() {
    let mut srv = server("loadgen", Opts::new().size(64 * MIB));
    let opts = LoadOpts {
        connections: 4,
        block_bytes: BS,
        region_offset: 8 * MIB,
        region_bytes: 16 * MIB,
        flush_every: Some(64),
        queue_depth: 4,
        seed: 11,
        max_ops: 2_000_000,
        max_duration: Duration::from_secs(300),
        max_writes_per_sec: None,
    };

    // 1. Run, stop, verify: everything answered, everything there.
    let g = LoadGen::start(&srv.addr(), EXPORT, opts.clone());
    g.wait_acked(3000, WAIT);
    g.wait_flushes_acked(8, WAIT);
    g.stop();
    let log = g.finish();
    save(&srv, "ack-stop.log", &log);
    assert_eq!(log.connections_died(), 0, "{:?}", log.writers);
    assert!(log.writers.iter().all(|w| w.end == EndReason::Stopped), "{:?}", log.writers);
    assert_eq!((log.in_flight_count(), log.error_count()), (0, 0), "{}", log.summary());
    assert!(log.acked_count() >= 3000 && log.flushes_acked() >= 8, "{}", log.summary());
    let stats = verify_acked(&log, nbd_reader(&srv.addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("after stop: {stats:?}");
    assert!(stats.blocks_checked > 0 && stats.unacked_newer == 0, "{stats:?}");
    assert_eq!(stats.blocks_checked, stats.last_acked + stats.other_acceptable);
    verify_flushed(&log, nbd_reader(&srv.addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));

    // 2. A new run over the same region; kill -9 the server mid-load.
    let g = LoadGen::start(&srv.addr(), EXPORT, LoadOpts { seed: 12, ..opts.clone() });
    g.wait_acked(3000, WAIT);
    srv.daemon.kill();
    let log = g.finish();
    save(&srv, "ack-kill.log", &log);
    assert_eq!(log.connections_died(), 4, "every connection must have died: {:?}", log.writers);
    assert_eq!(log.error_count(), 0, "{}", log.summary());
    srv.daemon.start_again();
    let stats = verify_acked(&log, nbd_reader(&srv.addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("after kill -9 and restart: {stats:?}");
    verify_flushed(&log, nbd_reader(&srv.addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));

    // 3. Negative: corrupt two acknowledged blocks in the backing file while
    //    the server is down: X gets one flipped byte, Y an older write of its
    //    own (one a later acknowledged write overwrote).
    srv.daemon.stop_ok();
    let stale = log
        .acked_writes()
        .into_iter()
        .find(|w| overwritten_by_later(&log, w))
        .copied()
        .expect("some block was written twice in sequence");
    let y = stale.block;
    let x = log.acked_writes().last().map(|w| w.block).filter(|&b| b != y).unwrap_or_else(|| {
        log.acked_writes().into_iter().map(|w| w.block).find(|&b| b != y).expect("a second acked block")
    });
    let mut bad = file_reader(&srv.disk, BS)(x);
    bad[1000] ^= 0x40;
    write_block_file(&srv.disk, BS, x, &bad);
    write_block_file(&srv.disk, BS, y, &log.pattern(&stale));

    let check = |e: blockd_tests::loadgen::VerifyError| {
        let mut want = vec![x, y];
        want.sort_unstable();
        assert_eq!(e.blocks(), want, "{e}");
        for v in &e.violations {
            if v.block == x {
                assert!(matches!(v.found, Found::Unreadable(Decoded::BadCrc(_))), "{v}");
            } else {
                assert_eq!(v.found, Found::Stale(stale), "{v}");
            }
        }
        eprintln!("expected violations:\n{e}");
    };
    check(verify_acked(&log, file_reader(&srv.disk, BS)).expect_err("corruption not found in the file"));
    srv.daemon.start_again();
    check(
        verify_acked(&log, nbd_reader(&srv.addr(), EXPORT, BS)).expect_err("corruption not found over NBD"),
    );
}

#[test]
fn chain_prefix_and_hole() {
    let mut srv = server("chain", Opts::new().size(32 * MIB));
    let w = ChainWriter::start(
        &srv.addr(),
        EXPORT,
        ChainOpts { region_bytes: 16 * MIB, max_writes: 1000, ..ChainOpts::default() },
    );
    let log = w.finish();
    assert_eq!(log.end, EndReason::MaxOps, "{log:?}");
    assert_eq!((log.issued, log.acked), (1000, 1000));
    let p =
        log.verify_prefix(nbd_reader(&srv.addr(), EXPORT, BS), log.issued).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.len, 1000);

    // Punch a hole: write 5's block zeroed in the backing file.
    srv.daemon.stop_ok();
    assert_eq!(log.block_of(5), 5);
    write_block_file(&srv.disk, BS, 5, &vec![0u8; BS as usize]);
    let want = PrefixError::Hole { k: 5, block: 5, newest: 999, found: Decoded::Zeros };
    assert_eq!(log.verify_prefix(file_reader(&srv.disk, BS), log.issued), Err(want.clone()));
    srv.daemon.start_again();
    let e = log.verify_prefix(nbd_reader(&srv.addr(), EXPORT, BS), log.issued).expect_err("hole not found");
    eprintln!("expected: {e}");
    assert_eq!(e, want);
}

#[test]
fn chain_wraps_and_survives_kill9() {
    let mut srv = server("chain-kill", Opts::new().size(32 * MIB));
    // 64 blocks at 1 MiB: the chain wraps many times.
    let opts = ChainOpts { region_offset: MIB, region_bytes: 64 * BS as u64, ..ChainOpts::default() };
    let w = ChainWriter::start(&srv.addr(), EXPORT, opts);
    w.wait_acked(1000, WAIT);
    srv.daemon.kill();
    let log = w.finish();
    assert!(matches!(log.end, EndReason::ConnectionDied(_)), "{log:?}");
    assert!(log.issued - log.acked <= 1, "{log:?}");
    srv.daemon.start_again();
    let p =
        log.verify_prefix(nbd_reader(&srv.addr(), EXPORT, BS), log.issued).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{log:?}: prefix {p:?}");
    assert!(p.len >= log.acked && p.len <= log.issued, "{p:?} {log:?}");
    assert_eq!(p.blocks_scanned, 64);

    // Zero the block holding an older write (not the newest one, whichever region
    // index the kill left it in): that write is a hole.
    srv.daemon.stop_ok();
    let newest = p.len - 1;
    let victim = newest - 10;
    let block = MIB / BS as u64 + victim % 64;
    write_block_file(&srv.disk, BS, block, &vec![0u8; BS as usize]);
    match log.verify_prefix(file_reader(&srv.disk, BS), log.issued) {
        Err(PrefixError::Hole { k, block: b, newest: n, found: Decoded::Zeros }) => {
            assert_eq!((b, k, n), (block, victim, newest));
        }
        r => panic!("expected a hole at block {block}: {r:?}"),
    }
}

/// Reads `len` bytes at `off` with a simple reply.
fn read_at(c: &mut RawClient, cookie: u64, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    c.request(0, CMD_READ, cookie, off, len, &[])?;
    match c.read_reply()? {
        Reply::Simple { error: 0, cookie: got } if got == cookie => {}
        r => panic!("READ: unexpected reply {r:?}"),
    }
    let mut buf = vec![0u8; len as usize];
    c.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_at(c: &mut RawClient, cookie: u64, off: u64, data: &[u8]) -> std::io::Result<u32> {
    c.request(0, CMD_WRITE, cookie, off, data.len() as u32, data)?;
    match c.read_reply()? {
        Reply::Simple { error, cookie: got } if got == cookie => Ok(error),
        r => panic!("WRITE: unexpected reply {r:?}"),
    }
}

/// Does a fresh connection get the NBD greeting?
fn greets(addr: &Addr) -> bool {
    let Ok(mut s) = addr.connect() else {
        return false;
    };
    let _ = s.set_timeout(Some(Duration::from_secs(10)));
    let mut m = [0u8; 8];
    s.read_exact(&mut m).is_ok() && &m == b"NBDMAGIC"
}

fn tcp_target(srv: &Server) -> std::net::SocketAddr {
    match srv.tcp_addr() {
        Addr::Tcp(a) => a,
        a => panic!("not TCP: {a:?}"),
    }
}

#[test]
fn proxy_forwards_cuts_and_heals() {
    let srv = server("proxy-cut", Opts::new().tcp());
    let proxy = Proxy::ephemeral(tcp_target(&srv));
    let via = proxy.nbd_addr();

    // nbdinfo and the raw client through the proxy.
    let out = tool("nbdinfo", ["--size", &via.uri(EXPORT)]);
    assert_eq!(out.stdout.trim(), srv.size().to_string());
    let (mut c, size, _) = RawClient::handshake(&via, EXPORT, false);
    assert_eq!(size, srv.size());
    let data = pattern::pattern(BS, b"PROXYTST", 1, 2, 3, 10);
    assert_eq!(write_at(&mut c, 1, 10 * BS as u64, &data).expect("write"), 0);
    assert_eq!(read_at(&mut c, 2, 10 * BS as u64, BS).expect("read"), data);
    let s = proxy.wait_until("1 active connection", WAIT, |s| s.active == 1);
    assert!(s.to_target > BS as u64 && s.to_client > BS as u64, "{s:?}");

    // Cut: the open connection fails, new ones are reset.
    proxy.cut();
    assert!(proxy.is_cut());
    let r = read_at(&mut c, 3, 0, BS);
    assert!(r.is_err(), "a request through a cut proxy succeeded");
    eprintln!("client after cut: {}", r.unwrap_err());
    assert!(!greets(&via), "a new connection through a cut proxy got the greeting");
    let s = proxy.wait_until("refused connection counted", WAIT, |s| s.refused >= 1);
    assert_eq!((s.active, s.cuts), (0, 1), "{s:?}");

    // Heal: new connections work and see the data.
    proxy.heal();
    let (mut c, _, _) = RawClient::handshake(&via, EXPORT, false);
    assert_eq!(read_at(&mut c, 1, 10 * BS as u64, BS).expect("read after heal"), data);
    assert_eq!(proxy.stats().accepted, 3, "nbdinfo, the first client, the one after heal");

    // Pause: a request is held (not lost); resume delivers it.
    proxy.pause();
    let data2 = pattern::pattern(BS, b"PROXYTST", 1, 2, 4, 11);
    c.request(0, CMD_WRITE, 2, 11 * BS as u64, BS, &data2).expect("send while paused");
    let mut direct = nbd_reader(&srv.tcp_addr(), EXPORT, BS);
    assert_eq!(direct(11), vec![0u8; BS as usize], "a write went through a paused proxy");
    proxy.resume();
    match c.read_reply().expect("reply after resume") {
        Reply::Simple { error: 0, cookie: 2 } => {}
        r => panic!("{r:?}"),
    }
    assert_eq!(direct(11), data2);

    // Delay: still correct (latency is printed, not asserted).
    proxy.set_delay(Duration::from_millis(50));
    let t = Instant::now();
    assert_eq!(read_at(&mut c, 3, 11 * BS as u64, BS).expect("read with delay"), data2);
    eprintln!("round trip with 50 ms delay each way: {:?}", t.elapsed());
    proxy.set_delay(Duration::ZERO);
}

#[test]
fn proxy_corrupt_next_in_both_directions() {
    let srv = server("proxy-corrupt", Opts::new().tcp());
    let proxy = Proxy::ephemeral(tcp_target(&srv));
    let via = proxy.nbd_addr();
    let mut direct = nbd_reader(&srv.tcp_addr(), EXPORT, BS);
    let data = pattern::pattern(BS, b"PROXYTST", 1, 2, 3, 20);
    let (mut c, _, _) = RawClient::handshake(&via, EXPORT, false);
    assert_eq!(write_at(&mut c, 1, 20 * BS as u64, &data).expect("write"), 0);

    // Server → client, inside READ data: the client gets bad data, silently
    // (NBD has no checksum): byte 100 of the block, bit 0.
    proxy.set_corrupt_direction(Direction::ToClient);
    proxy.corrupt_next(16 + 100); // after the 16-byte simple reply header
    let got = read_at(&mut c, 2, 20 * BS as u64, BS).expect("read");
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(diff, vec![100], "exactly byte 100 differs");
    assert_eq!(got[100] ^ data[100], 0x01);
    assert!(matches!(pattern::decode(&got, &[b"PROXYTST"]), Decoded::BadCrc(_)));
    assert_eq!(proxy.stats().corrupted, 1);
    assert!(!proxy.corruption_pending());

    // Server → client, first byte of the reply (its magic): a protocol
    // error for the client.
    proxy.corrupt_next(0);
    let e = read_at(&mut c, 3, 20 * BS as u64, BS).expect_err("a reply with a bad magic was accepted");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    eprintln!("client after a flipped reply magic bit: {e}");
    drop(c);

    // Client → server, inside WRITE data: the server stores the flipped
    // bit and acknowledges (no checksum), as a direct read shows.
    let (mut c, _, _) = RawClient::handshake(&via, EXPORT, false);
    proxy.set_corrupt_direction(Direction::ToTarget);
    proxy.corrupt_next(28 + 7); // after the 28-byte request header
    assert_eq!(write_at(&mut c, 1, 21 * BS as u64, &data).expect("write"), 0);
    let stored = direct(21);
    let diff: Vec<usize> = (0..stored.len()).filter(|&i| stored[i] != data[i]).collect();
    assert_eq!(diff, vec![7]);

    // Client → server, first byte of a request (its magic): the server
    // drops the connection.
    proxy.corrupt_next(0);
    let r = write_at(&mut c, 2, 22 * BS as u64, &data);
    assert!(r.is_err(), "server answered a request with a bad magic: {r:?}");
    eprintln!("client after a flipped request magic bit: {}", r.unwrap_err());
    assert_eq!(direct(22), vec![0u8; BS as usize]);
    assert_eq!(proxy.stats().corrupted, 4);
}

#[test]
fn proxy_bandwidth_limit_slows_a_4mib_write() {
    const TOTAL: usize = 4 << 20;
    const RATE: u64 = 2 << 20;
    let srv = server("proxy-bw", Opts::new().tcp());
    let proxy = Proxy::ephemeral(tcp_target(&srv));
    let (mut c, _, _) = RawClient::handshake(&proxy.nbd_addr(), EXPORT, false);
    let mut data = vec![0u8; TOTAL];
    let mut s = 5u64;
    for ch in data.chunks_mut(8) {
        ch.copy_from_slice(&pattern::splitmix64(&mut s).to_le_bytes());
    }

    let base = proxy.stats().to_target;
    let t0 = Instant::now();
    proxy.set_bandwidth(Some(RATE));
    let payload = data.clone();
    let writer = thread::spawn(move || {
        let e = write_at(&mut c, 1, 0, &payload).expect("4 MiB write");
        (c, e)
    });
    // Sample the bytes forwarded: never more than the bucket allows (it
    // starts empty), and at some point only part of the request is through.
    let mut partial_seen = 0u64;
    let mut samples = 0u64;
    let deadline = Instant::now() + WAIT;
    loop {
        let fwd = proxy.stats().to_target - base;
        let allowed = RATE as f64 * t0.elapsed().as_secs_f64() + 1024.0;
        assert!((fwd as f64) <= allowed, "{fwd} bytes forwarded, the limit allows {allowed:.0}");
        samples += 1;
        if fwd > 0 && fwd < TOTAL as u64 {
            partial_seen += 1;
        }
        if writer.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "4 MiB write not done after {WAIT:?}");
        thread::sleep(Duration::from_millis(10));
    }
    let (mut c, e) = writer.join().expect("writer");
    assert_eq!(e, 0);
    let fwd = proxy.stats().to_target - base;
    assert_eq!(fwd, TOTAL as u64 + 28, "request header + payload");
    assert!(partial_seen >= 1, "the transfer was never seen partly forwarded ({samples} samples)");
    eprintln!("{partial_seen}/{samples} samples saw a partial transfer; took {:?}", t0.elapsed());

    proxy.set_bandwidth(None);
    let mut direct = nbd_reader(&srv.tcp_addr(), EXPORT, BS);
    for (i, want) in data.chunks(BS as usize).enumerate() {
        assert!(direct(i as u64) == want, "block {i} differs after the throttled write");
    }
    assert_eq!(read_at(&mut c, 2, 0, BS).expect("read after unthrottle"), data[..BS as usize]);
}

#[test]
fn loadgen_through_proxy_survives_a_cut_mid_load() {
    let srv = server("proxy-loadgen", Opts::new().tcp());
    let proxy = Proxy::ephemeral(tcp_target(&srv));
    let opts = LoadOpts {
        connections: 2,
        region_bytes: 8 * MIB,
        flush_every: Some(32),
        seed: 21,
        ..LoadOpts::default()
    };
    let g = LoadGen::start(&proxy.nbd_addr(), EXPORT, opts);
    g.wait_acked(1000, WAIT);
    proxy.cut();
    // Every writer notices and ends by itself: finish() needs no stop().
    let log = g.finish();
    eprintln!("{}", log.summary());
    assert_eq!(log.connections_died(), 2, "{:?}", log.writers);
    // The server kept running: everything acknowledged is on it.
    let stats = verify_acked(&log, nbd_reader(&srv.tcp_addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{stats:?}");
    verify_flushed(&log, nbd_reader(&srv.tcp_addr(), EXPORT, BS)).unwrap_or_else(|e| panic!("{e}"));
    proxy.heal();
    assert!(greets(&proxy.nbd_addr()));
}
