//! Bad input from many clients at once — random bytes at handshake, truncated headers,
//! unknown commands and flags, out-of-range and oversize requests, random request
//! headers, clients vanishing mid-write — while a well-behaved client keeps writing and
//! verifying. The server must answer the bad requests correctly, never disturb the
//! good client, never panic, and still shut down cleanly.
//!
//! Randomness is seeded; the seed is printed so a failure can be replayed with
//! `BLOCKD_FUZZ_SEED=<seed>`.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use blockd_tests::raw::*;
use blockd_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Rounds of each abuse pattern (bounded; the whole test takes a few seconds).
const ROUNDS: u64 = 200;

fn seed() -> u64 {
    let seed = std::env::var("BLOCKD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().next_u64());
    eprintln!("bad_input seed: {seed} (replay with BLOCKD_FUZZ_SEED={seed})");
    seed
}

/// Connects and sends `bytes`, then drains whatever comes back until EOF or timeout.
fn send_and_drain(addr: &Addr, bytes: &[u8]) {
    let Ok(mut s) = addr.connect() else { return };
    s.set_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown_write();
    let mut sink = [0u8; 4096];
    for _ in 0..10_000 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Garbage, or a greeting answered with junk, at the handshake stage.
fn handshake_garbage(addr: &Addr, rng: &mut StdRng) {
    let len = rng.random_range(0..512);
    let mut junk = vec![0u8; len];
    rng.fill_bytes(&mut junk);
    if rng.random_bool(0.5) {
        // Valid client flags, then a valid option magic with random option data.
        let mut msg = 1u32.to_be_bytes().to_vec();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&junk);
        junk = msg;
    }
    send_and_drain(addr, &junk);
}

/// A negotiated connection fed protocol errors that must each get the right reply.
fn bad_requests(addr: &Addr, size: u64, rng: &mut StdRng) {
    let (mut c, _, _) = RawClient::handshake(addr, EXPORT, rng.random_bool(0.5));
    let cases: [(u16, u16, u64, u32, u32); 6] = [
        (0, 9, 0, 512, EINVAL),                     // unknown command
        (1 << 9, CMD_READ, 0, 512, EINVAL),         // unknown flag
        (0, CMD_READ, u64::MAX - 10, 512, EINVAL),  // offset overflow
        (0, CMD_TRIM, size, 4096, EINVAL),          // past the end
        (0, CMD_READ, 0, (32 << 20) + 1, EINVAL),   // oversize read
        (0, CMD_CACHE, size - 1, u32::MAX, EINVAL), // huge cache past the end
    ];
    for (i, (flags, cmd, offset, len, expect)) in cases.into_iter().enumerate() {
        let cookie = 1000 + i as u64;
        c.request(flags, cmd, cookie, offset, len, &[]).expect("send");
        assert_eq!(c.finish(cookie), expect, "case {i}: cmd {cmd} flags {flags:#x} off {offset} len {len}");
    }
    // A WRITE past the end: its payload is consumed, the reply is ENOSPC, and the
    // connection stays in sync for the next request.
    c.request(0, CMD_WRITE, 77, size - 100, 4096, &[0xee; 4096]).expect("send");
    assert_eq!(c.finish(77), ENOSPC);
    c.request(0, CMD_FLUSH, 78, 0, 0, &[]).expect("send");
    assert_eq!(c.finish(78), 0);
}

/// Random headers with a valid magic (never WRITE, whose payload we would owe).
fn random_headers(addr: &Addr, rng: &mut StdRng) {
    let (mut c, _, _) = RawClient::handshake(addr, EXPORT, rng.random_bool(0.5));
    for i in 0..20u64 {
        let mut cmd: u16 = rng.random_range(0..16);
        if cmd == CMD_WRITE || cmd == CMD_DISC {
            cmd = 9;
        }
        let flags: u16 = rng.random();
        let offset = if rng.random_bool(0.5) { rng.random() } else { rng.random_range(0..1 << 20) };
        let len = if rng.random_bool(0.5) { rng.random() } else { rng.random_range(0..1 << 16) };
        if c.request(flags, cmd, i, offset, len, &[]).is_err() {
            return;
        }
        // Every request gets an answer: a valid READ its data, anything else a reply.
        match c.read_reply() {
            Ok(Reply::Simple { error: 0, .. }) if cmd == CMD_READ => {
                let mut data = vec![0u8; len as usize];
                c.read_exact(&mut data).expect("READ data");
            }
            Ok(r) if !r.done() => {
                // Structured chunks of a successful read: drain to DONE.
                let _ = c.finish(r.cookie());
            }
            Ok(_) => {}
            Err(e) => panic!("no reply to random request {cmd} {flags:#x} {offset} {len}: {e}"),
        }
    }
}

/// Clients that leave at the worst moments: mid-header, mid-payload, oversize write.
fn vanishing(addr: &Addr, rng: &mut StdRng) {
    let (mut c, _, _) = RawClient::handshake(addr, EXPORT, false);
    match rng.random_range(0..3) {
        0 => {
            // Truncated header.
            let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
            let _ = c.write_all(&h);
        }
        1 => {
            // A 1 MiB WRITE with only part of its payload.
            let _ = c.request(0, CMD_WRITE, 5, 0, 1 << 20, &vec![0x5a; rng.random_range(0..65536)]);
        }
        _ => {
            // Oversize WRITE: the server must drop us.
            let _ = c.request(0, CMD_WRITE, 6, 0, (32 << 20) + 4096, &[]);
            assert!(c.closed_by_server(), "a 32 MiB+ WRITE must close the connection");
        }
    }
}

engine_tests! {
    fn abusive_clients_never_disturb_a_good_one(srv = Opts::new().size(64 * MIB)) {
        let addr = srv.addr();
        let size = 64 * MIB;
        let seed = seed();
        let stop = Arc::new(AtomicBool::new(false));

        // The well-behaved client: unique pattern per round, read back every time.
        let good_addr = addr.clone();
        let good_stop = stop.clone();
        let good = thread::spawn(move || {
            let (mut c, _, _) = RawClient::handshake(&good_addr, EXPORT, false);
            let mut rounds = 0u64;
            while !good_stop.load(Ordering::Relaxed) || rounds < 20 {
                assert!(rounds < 1_000_000, "bounded");
                let offset = (rounds % 1000) * 65536;
                let pattern = vec![(rounds % 251) as u8; 65536];
                c.request(CMD_FLAG_FUA, CMD_WRITE, rounds * 2, offset, 65536, &pattern).expect("write");
                assert_eq!(c.finish(rounds * 2), 0, "good write failed");
                c.request(0, CMD_READ, rounds * 2 + 1, offset, 65536, &[]).expect("read");
                match c.read_reply().expect("read reply") {
                    Reply::Simple { error: 0, .. } => {}
                    r => panic!("good read failed: {r:?}"),
                }
                let mut back = vec![0u8; 65536];
                c.read_exact(&mut back).expect("read data");
                assert!(back == pattern, "good client read back the wrong data in round {rounds}");
                rounds += 1;
            }
            rounds
        });

        let abusers: Vec<_> = (0..4u64)
            .map(|kind| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(kind));
                    for _ in 0..ROUNDS {
                        match kind {
                            0 => handshake_garbage(&addr, &mut rng),
                            1 => bad_requests(&addr, size, &mut rng),
                            2 => random_headers(&addr, &mut rng),
                            _ => vanishing(&addr, &mut rng),
                        }
                    }
                })
            })
            .collect();
        for a in abusers {
            a.join().expect("an abuse pattern failed (see the panic above)");
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = good.join().expect("the well-behaved client was disturbed");
        assert!(rounds >= 20);
        eprintln!("good client completed {rounds} verified rounds alongside {} abusive sessions", 4 * ROUNDS);

        let mut srv = srv;
        assert!(srv.daemon.is_running(), "server died\n{}", srv.daemon.log_tail(40));
        let log = srv.daemon.log();
        assert!(!log.contains("panicked"), "server panicked:\n{log}");
        if !srv.kind.is_nbdkit() {
            srv.daemon.stop_ok();
        }
    }
}
