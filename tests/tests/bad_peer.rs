//! Bad peer input: a fake peer connects to a real node's replication address and
//! sends what a real peer never would (garbage, incompatible Hellos, corrupted or
//! out-of-order frames, a corrupted Write). Each time the node refuses: it closes
//! the connection, logs a line naming the problem, applies nothing, and keeps
//! answering; afterwards the real peer connects and the pair works.
//!
//! Only `beta` runs: its name sorts after `alpha`, so it accepts and never dials,
//! and the fake calls itself `alpha`. Both disks are created with
//! `--clear-bitmap`, so a Hello that copies beta's generations is one beta
//! connects with (`Established`), which the post-handshake cases need.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use blockd::config::{MetaLocation, Protocol};
use blockd::meta::{Layout, clear_bitmap_gen};
use blockd::peer::{FRAME_HEADER_BYTES, Hello, Kind, MAX_FRAME_PAYLOAD_BYTES, Message, PROTOCOL_VERSION};
use blockd::state::{DiskState, Generations, Role};
use blockd_tests::fakepeer::{self, CRC_AT, Closed, FakePeer, frame, frame_with_flags, write_payload};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::raw::{CMD_FLUSH, CMD_WRITE, RawClient};
use blockd_tests::*;

const ALPHA: usize = 0;
const BETA: usize = 1;
const WAIT: Duration = Duration::from_secs(30);
const GRANULARITY: u32 = 4096;
const BLOCK: usize = 4096;

/// The device size both nodes export: the data area of the internal-metadata
/// layout of the backing file.
fn device_size(opts: &PairOpts) -> u64 {
    Layout::compute(opts.disk_bytes, u64::from(GRANULARITY), &MetaLocation::Internal)
        .expect("layout of the test disk")
        .data_bytes
}

/// The Hello the real alpha would send: same resource, size, granularity,
/// protocol and (`--clear-bitmap`) generations as beta.
fn alpha_hello(size: u64) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        resource: EXPORT.to_string(),
        node: "alpha".to_string(),
        size_bytes: size,
        granularity_bytes: GRANULARITY,
        protocol: Protocol::C,
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        gens: Generations { current: clear_bitmap_gen(EXPORT, size), ..Generations::default() },
        flags: 0,
    }
}

/// A block the fake tries to write: recognizable, never zero.
fn fake_block(tag: u8) -> Vec<u8> {
    let mut b: Vec<u8> = b"FAKEPEER".iter().copied().cycle().take(BLOCK).collect();
    b[BLOCK - 1] = tag;
    b
}

fn beta_addr(p: &Pair) -> SocketAddr {
    p.nodes[BETA].replication.parse().expect("beta's replication address")
}

fn beta_log(p: &Pair) -> String {
    p.nodes[BETA].daemon.as_ref().expect("beta runs").log()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open disk");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read disk");
    buf
}

/// Polls until beta's status answers with the peer not connected (and not
/// replicating).
fn wait_beta_alone(p: &mut Pair, what: &str) {
    p.wait(
        WAIT,
        |p| {
            let peer = &p.status(BETA)["peers"][0];
            peer["connection"] != "Connected" && peer["replication"] != "Established"
        },
        &format!("{what}: beta answers and has no connected peer"),
    );
}

/// Polls beta's log (from byte `from` on) until a line contains `needle`;
/// returns that line.
fn wait_log_line(p: &Pair, from: usize, needle: &str, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = beta_log(p);
        let fresh = log.get(from..).unwrap_or("");
        if let Some(line) = fresh.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no line containing {needle:?} in beta's log; new lines:\n{fresh}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a case gets to its bad input.
enum Stage {
    /// Right after beta's Hello arrived: the fake sends the bad bytes instead of
    /// (or as) its Hello.
    Handshake,
    /// After a valid Hello, once beta reports the link `Established`.
    Established,
}

struct Case<'a> {
    name: &'a str,
    stage: Stage,
    /// Text beta's log must contain.
    log: String,
    /// Text beta's `Bye` must contain (refusals during the handshake say why).
    bye: Option<String>,
}

/// One fresh connection: `bad` sends the bad input; then beta must close the
/// connection, log the reason, and still answer with no peer connected.
fn run_case(p: &mut Pair, good: &Hello, case: Case<'_>, bad: impl FnOnce(&mut FakePeer)) -> Closed {
    let from = beta_log(p).len();
    let mut fake = FakePeer::connect(beta_addr(p), WAIT);
    let beta_hello = Hello { node: "beta".to_string(), ..good.clone() };
    assert_eq!(fake.remote, beta_hello, "{}: beta's Hello (its state must not have changed)", case.name);
    if let Stage::Established = case.stage {
        fake.send_msg(Message::Hello(good.clone()));
        send_connect_state(&mut fake, good);
        p.wait(
            WAIT,
            |p| {
                let peer = &p.status(BETA)["peers"][0];
                peer["connection"] == "Connected" && peer["replication"] == "Established"
            },
            &format!("{}: beta accepts the fake's valid Hello", case.name),
        );
    }
    bad(&mut fake);
    let closed = fake.read_until_closed(WAIT);
    if let Some(bye) = &case.bye {
        let got = closed.bye();
        assert!(
            got.as_deref().is_some_and(|r| r.contains(bye.as_str())),
            "{}: beta's Bye should contain {bye:?}; got {got:?} ({:?})",
            case.name,
            closed.frames
        );
    }
    let line = wait_log_line(p, from, &case.log, case.name);
    wait_beta_alone(p, case.name);
    eprintln!("{}: closed ({}); beta logged: {line}", case.name, closed.how);
    closed
}

/// After the Hellos, each side sends its state; the node decides from the pair.
fn send_connect_state(fake: &mut FakePeer, good: &Hello) {
    fake.send_msg(Message::ConnectState { gens: good.gens, role: good.role, disk: good.disk, flags: 0 });
}

/// Makes a Hello incompatible.
type HelloChange = Box<dyn FnOnce(&mut Hello)>;

/// `hello` with `change` applied, as frame 0.
fn hello_frame(hello: &Hello, change: impl FnOnce(&mut Hello)) -> Vec<u8> {
    let mut h = hello.clone();
    change(&mut h);
    fakepeer::encode(Message::Hello(h))
}

/// SPEC §6 / issue: garbage, wrong resource, wrong size, wrong granularity, old
/// versions and other incompatible Hellos are refused during the handshake;
/// corrupted, out-of-sequence, unknown, oversize and flagged frames after it end
/// the link; a Write frame with a broken crc is not applied. Beta logs each one,
/// keeps answering, and afterwards the real alpha connects and the pair works.
#[test]
fn bad_peer_input_is_refused_and_the_real_pair_still_works() {
    let opts = PairOpts::default();
    let size = device_size(&opts);
    let good = alpha_hello(size);
    let mut p = Pair::create("bad-peer", &opts);
    p.start_node(BETA);
    let case = |name: &'static str, stage: Stage, log: &str, bye: Option<&str>| Case {
        name,
        stage,
        log: log.to_string(),
        bye: bye.map(str::to_string),
    };

    // ---- Refused during the handshake ----
    run_case(&mut p, &good, case("garbage", Stage::Handshake, "bad frame magic 0x47455420", None), |f| {
        f.send_raw(b"GET / HTTP/1.1\r\nHost: beta\r\n\r\n")
    });
    run_case(
        &mut p,
        &good,
        case("Ping before Hello", Stage::Handshake, "peer sent a Ping frame before its Hello", None),
        |f| f.send_msg(Message::Ping { nonce: 1 }),
    );
    let refusals: Vec<(&str, String, HelloChange)> = vec![
        (
            "wrong resource",
            "peer serves resource `r1`, this node `r0`".into(),
            Box::new(|h: &mut Hello| h.resource = "r1".into()),
        ),
        (
            "wrong size",
            format!("peer's device is {} bytes, this node's is {size} bytes", size + 4096),
            Box::new(move |h: &mut Hello| h.size_bytes = size + 4096),
        ),
        (
            "wrong granularity",
            "peer's bitmap granularity is 8192 bytes, this node's is 4096 bytes".into(),
            Box::new(|h: &mut Hello| h.granularity_bytes = 8192),
        ),
        (
            "old version 0",
            format!("peer speaks protocol version 0, this node {PROTOCOL_VERSION}"),
            Box::new(|h: &mut Hello| h.version = 0),
        ),
        (
            "newer version",
            format!("peer speaks protocol version {}, this node {PROTOCOL_VERSION}", PROTOCOL_VERSION + 1),
            Box::new(|h: &mut Hello| h.version = PROTOCOL_VERSION + 1),
        ),
        (
            "wrong protocol",
            "peer uses replication protocol A, this node protocol C".into(),
            Box::new(|h: &mut Hello| h.protocol = Protocol::A),
        ),
        (
            "unknown node",
            "peer calls itself `gamma`, but the config names the peer `alpha`".into(),
            Box::new(|h: &mut Hello| h.node = "gamma".into()),
        ),
        (
            "beta's own name",
            "peer calls itself `beta`, which is this node's own name".into(),
            Box::new(|h: &mut Hello| h.node = "beta".into()),
        ),
    ];
    for (name, reason, change) in refusals {
        let bytes = hello_frame(&good, change);
        let c = case(name, Stage::Handshake, &format!("refusing peer connection: {reason}"), Some(&reason));
        run_case(&mut p, &good, c, |f| f.send_raw(&bytes));
    }

    // ---- After a valid handshake: the frame stream is checked ----
    let ping = fakepeer::payload(Message::Ping { nonce: 7 });
    run_case(
        &mut p,
        &good,
        case("crc bit flipped", Stage::Established, "frame crc32c mismatch on a Ping frame (seq 2)", None),
        |f| {
            let mut bytes = frame(Kind::Ping.code(), f.next_seq, &ping);
            bytes[CRC_AT + 3] ^= 0x01;
            f.send_raw(&bytes);
        },
    );
    run_case(
        &mut p,
        &good,
        case("sequence gap", Stage::Established, "frame sequence gap: expected 2, got 7", None),
        |f| f.send_raw(&frame(Kind::Ping.code(), 7, &ping)),
    );
    run_case(
        &mut p,
        &good,
        case("unknown type", Stage::Established, "unknown frame type 0x007f", None),
        |f| f.send_raw(&frame(0x7f, f.next_seq, &ping)),
    );
    let oversize = MAX_FRAME_PAYLOAD_BYTES + 1;
    run_case(
        &mut p,
        &good,
        case(
            "oversize length",
            Stage::Established,
            &format!("frame payload of {oversize} bytes exceeds the limit"),
            None,
        ),
        |f| {
            // The header alone: the length is refused before any payload is read.
            let mut header = frame(Kind::Write.code(), f.next_seq, &[])[..FRAME_HEADER_BYTES].to_vec();
            header[16..20].copy_from_slice(&(oversize as u32).to_be_bytes());
            f.send_raw(&header);
        },
    );
    run_case(
        &mut p,
        &good,
        case("header flags", Stage::Established, "unsupported frame flags 0x0001", None),
        |f| f.send_raw(&frame_with_flags(Kind::Ping.code(), 1, f.next_seq, &ping)),
    );
    run_case(&mut p, &good, case("second Hello", Stage::Established, "unexpected Hello frame", None), |f| {
        f.send_msg(Message::Hello(good.clone()))
    });

    // ---- Write frames that must not be applied ----
    let crc_offset = 8 * MIB;
    let data_offset = 12 * MIB;
    run_case(
        &mut p,
        &good,
        case(
            "Write with a flipped crc bit",
            Stage::Established,
            "frame crc32c mismatch on a Write frame (seq 2)",
            None,
        ),
        |f| {
            let mut bytes = frame(
                Kind::Write.code(),
                f.next_seq,
                &write_payload(1, 1, crc_offset, false, &fake_block(1)),
            );
            bytes[CRC_AT] ^= 0x80;
            f.send_raw(&bytes);
        },
    );
    run_case(
        &mut p,
        &good,
        case(
            "Write with a flipped data bit",
            Stage::Established,
            "frame crc32c mismatch on a Write frame (seq 2)",
            None,
        ),
        |f| {
            let mut bytes = frame(
                Kind::Write.code(),
                f.next_seq,
                &write_payload(1, 1, data_offset, false, &fake_block(2)),
            );
            let last = bytes.len() - 1;
            bytes[last] ^= 0x10;
            f.send_raw(&bytes);
        },
    );
    let s = p.status(BETA);
    assert_eq!((s["role"].as_str(), s["disk"].as_str()), (Some("Secondary"), Some("UpToDate")), "{s}");

    // Nothing reached beta's disk (checked after a clean stop: all flushed).
    p.stop_node(BETA);
    for offset in [crc_offset, data_offset] {
        assert!(
            read_at(p.disk_path(BETA), offset, BLOCK).iter().all(|&b| b == 0),
            "a corrupted Write frame was applied at offset {offset}"
        );
    }

    // ---- The real pair still works ----
    p.start_node(BETA);
    p.start_node(ALPHA);
    p.wait_established();
    p.ctl_ok(ALPHA, &["primary"]);
    let exported: u64 = tool("nbdinfo", ["--size", &p.uri(ALPHA)]).stdout.trim().parse().expect("size");
    assert_eq!(exported, size, "the Primary exports the size the fake's Hello announced");
    let real = pattern_block(0x5a);
    let (mut c, _, _) = RawClient::handshake(&Addr::Unix(p.nodes[ALPHA].nbd.clone()), EXPORT, false);
    c.request(0, CMD_WRITE, 1, crc_offset, BLOCK as u32, &real).expect("send WRITE");
    assert_eq!(c.finish(1), 0, "WRITE through the Primary");
    c.request(0, CMD_FLUSH, 2, 0, 0, &[]).expect("send FLUSH");
    assert_eq!(c.finish(2), 0, "FLUSH through the Primary");
    drop(c);
    p.stop_node(ALPHA);
    p.stop_node(BETA);
    assert_eq!(read_at(p.disk_path(BETA), crc_offset, BLOCK), real, "the real write reached beta");
    let (a, b) = (p.disk_bytes(ALPHA, size), p.disk_bytes(BETA, size));
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first, None, "the copies differ (first difference at byte {first:?})");
}

/// Seeded non-zero bytes.
fn pattern_block(seed: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// Connects with a valid handshake and waits until beta reports the link
/// `Established`.
fn established_fake(p: &mut Pair, good: &Hello) -> FakePeer {
    let mut fake = FakePeer::connect(beta_addr(p), WAIT);
    fake.send_msg(Message::Hello(good.clone()));
    send_connect_state(&mut fake, good);
    p.wait(
        WAIT,
        |p| p.status(BETA)["peers"][0]["replication"] == "Established",
        "beta accepts the fake's valid Hello",
    );
    fake
}

/// Reads frames until `done` returns true for one of them; panics if the node
/// closes first or `WAIT` passes.
fn wait_frame(fake: &mut FakePeer, what: &str, mut done: impl FnMut(&fakepeer::Frame) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let f = fake.next_frame(deadline).unwrap_or_else(|| panic!("{what}: beta closed first ({seen:?})"));
        if done(&f) {
            return;
        }
        seen.push(f);
    }
}

/// The control for the cases above: the same fake, following the protocol, is
/// served. Its Write frame (built the same way as the corrupted ones) is
/// applied and acknowledged, so a corrupted one staying off the disk is the
/// node's doing, not a malformed frame of the fake.
#[test]
fn a_fake_peer_that_follows_the_protocol_is_served() {
    let opts = PairOpts::default();
    let size = device_size(&opts);
    let good = alpha_hello(size);
    let mut p = Pair::create("fake-peer-control", &opts);
    p.start_node(BETA);
    let mut fake = established_fake(&mut p, &good);
    let offset = 8 * MIB;
    let data = fake_block(3);
    fake.send(Kind::Write.code(), &write_payload(7, 1, offset, false, &data));
    fake.send_msg(Message::Barrier { epoch: 1, flush: true });
    wait_frame(&mut fake, "WriteAck for write 7", |f| f.write_ack() == Some((7, 0)));
    wait_frame(&mut fake, "BarrierAck for epoch 1", |f| f.barrier_ack() == Some((1, 0)));
    fake.send_msg(Message::Bye { reason: "test done".into() });
    fake.read_until_closed(WAIT);
    wait_beta_alone(&mut p, "after the fake's Bye");
    p.stop_node(BETA);
    assert_eq!(read_at(p.disk_path(BETA), offset, BLOCK), data, "the valid Write was applied");
}

/// A Write frame that is valid on the wire but lies past the end of the device
/// (in the metadata area that follows the data on the backing file) must be
/// refused like any other bad input, not written: a peer must never reach
/// beyond the replicated device.
#[test]
fn a_fake_write_beyond_the_device_end_is_not_applied() {
    let opts = PairOpts::default();
    let size = device_size(&opts);
    let good = alpha_hello(size);
    let mut p = Pair::create("fake-peer-beyond-end", &opts);
    p.start_node(BETA);
    let disk_len = std::fs::metadata(p.disk_path(BETA)).expect("stat").len();
    let before = read_at(p.disk_path(BETA), size, BLOCK);
    let mut fake = established_fake(&mut p, &good);
    let data = fake_block(4);
    fake.send(Kind::Write.code(), &write_payload(9, 1, size, false, &data));
    fake.send_msg(Message::Barrier { epoch: 1, flush: true });
    // Beta either ends the link at once or (without a check) applies the write
    // and acknowledges it; the link ends anyway when the keepalive expires, as
    // the fake answers no Ping.
    let closed = fake.read_until_closed(WAIT);
    wait_beta_alone(&mut p, "after the Write beyond the end");
    let log = beta_log(&p);
    p.stop_node(BETA);
    let after = read_at(p.disk_path(BETA), size, BLOCK);
    let acks: Vec<(u64, i32)> = closed.frames.iter().filter_map(fakepeer::Frame::write_ack).collect();
    let tail = blockd_tests::tools::tail(&log, 20);
    assert!(
        after != data,
        "a peer Write at offset {size} (the device is {size} bytes) was applied to beta's backing file, \
         overwriting its metadata area (bytes there before: {}); beta acknowledged {acks:?}; connection \
         ended by {}; beta's log:\n{tail}",
        if before.iter().all(|&b| b == 0) { "all zero" } else { "not zero" },
        closed.how
    );
    assert!(!acks.contains(&(9, 0)), "beta acknowledged a Write beyond the device end as written: {acks:?}");
    assert_eq!(std::fs::metadata(p.disk_path(BETA)).expect("stat").len(), disk_len, "backing file length");
}
