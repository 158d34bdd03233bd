//! A fake replication peer: speaks blockd's peer protocol (SPEC §6) over a
//! blocking TCP stream so a test can send frames a real node never would.
//!
//! Well-formed payloads come from blockd's own encoder ([`encode`] runs
//! `blockd::peer::FrameWriter` into a `Vec`); [`frame`] wraps a payload in a
//! header with any type, flags and sequence number and a correct crc32c, which
//! a test then breaks as it likes. [`encoder_agrees`] checks that the two give
//! identical bytes, so a frame the node refuses is refused for the defect the
//! test put in, not for a mistake of the fake.
//!
//! Frame header (big-endian): magic `BLKD` u32, type u16, flags u16, seq u64,
//! payload length u32, crc32c u32 (over the header with the crc field zeroed,
//! then the payload).

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use blockd::config::Protocol;
use blockd::peer::{FRAME_HEADER_BYTES, FRAME_MAGIC, FrameWriter, Hello, Kind, Message};
use blockd::state::{DiskState, Generations, HISTORY_LEN, Role};

/// What the acceptor answers while a link is up (`blockd::peer::dial::BUSY_REASON`).
const BUSY_REASON: &str = "already connected";
/// Offset of the crc field in the header.
pub const CRC_AT: usize = 20;
/// Offset of the flags field in the header.
pub const FLAGS_AT: usize = 6;

/// CRC-32C (Castagnoli), as the peer protocol uses.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

/// A frame with a correct crc: `code`, `flags`, `seq` and `payload` as given.
pub fn frame_with_flags(code: u16, flags: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    f.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    let crc = crc32c(&f);
    f[CRC_AT..FRAME_HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
    f
}

/// A frame with a correct crc and no flags.
pub fn frame(code: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    frame_with_flags(code, 0, seq, payload)
}

/// `msg` as blockd's `FrameWriter` puts it on the wire as the first frame of a
/// stream (sequence 0).
pub fn encode(msg: Message) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    w.queue(msg).expect("the message fits in a frame");
    {
        let mut flush = pin!(w.flush());
        match flush.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r.expect("writing to a Vec cannot fail"),
            Poll::Pending => panic!("writing to a Vec never waits"),
        }
    }
    w.get_ref().clone()
}

/// The payload blockd's encoder makes for `msg`.
pub fn payload(msg: Message) -> Vec<u8> {
    encode(msg)[FRAME_HEADER_BYTES..].to_vec()
}

/// Panics unless [`frame`] and blockd's encoder give the same bytes for `msg`
/// (header layout and crc32c), as frame 0.
pub fn encoder_agrees(msg: Message) {
    let code = msg.kind().code();
    let theirs = encode(msg);
    let ours = frame(code, 0, &theirs[FRAME_HEADER_BYTES..]);
    assert_eq!(ours, theirs, "the fake's framing differs from blockd's encoder");
}

/// The payload of a `Write` (id, epoch, offset, flags, then the data): built
/// here because `Message::Write` carries a pool buffer of the NBD server crate.
pub fn write_payload(id: u64, epoch: u64, offset: u64, fua: bool, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(25 + data.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&epoch.to_be_bytes());
    p.extend_from_slice(&offset.to_be_bytes());
    p.push(u8::from(fua));
    p.extend_from_slice(data);
    p
}

/// One frame received from the node (its crc already checked).
#[derive(Clone, Debug)]
pub struct Frame {
    pub code: u16,
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

impl Frame {
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_code(self.code)
    }

    fn string_at(&self, at: usize) -> (String, usize) {
        let p = &self.payload;
        let len = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
        (String::from_utf8_lossy(&p[at + 2..at + 2 + len]).into_owned(), at + 2 + len)
    }

    /// The reason of a `Bye`.
    pub fn bye_reason(&self) -> Option<String> {
        (self.kind() == Some(Kind::Bye)).then(|| self.string_at(0).0)
    }

    /// (id, errno) of a `WriteAck`.
    pub fn write_ack(&self) -> Option<(u64, i32)> {
        (self.kind() == Some(Kind::WriteAck))
            .then(|| (be_u64(&self.payload), be_u32(&self.payload[8..]) as i32))
    }

    /// (epoch, errno) of a `BarrierAck`.
    pub fn barrier_ack(&self) -> Option<(u64, i32)> {
        (self.kind() == Some(Kind::BarrierAck))
            .then(|| (be_u64(&self.payload), be_u32(&self.payload[8..]) as i32))
    }

    /// Decodes a version-1 `Hello` (layout in `blockd::peer::msg`).
    pub fn hello(&self) -> Option<Hello> {
        if self.kind() != Some(Kind::Hello) {
            return None;
        }
        let p = &self.payload;
        let protocol = match p[24] {
            b'A' => Protocol::A,
            b'B' => Protocol::B,
            b'C' => Protocol::C,
            other => panic!("Hello with protocol letter {other:#x}"),
        };
        let mut history = [0u64; HISTORY_LEN];
        for (i, h) in history.iter_mut().enumerate() {
            *h = be_u64(&p[43 + 8 * i..]);
        }
        let gens = Generations { current: be_u64(&p[27..]), bitmap: be_u64(&p[35..]), history };
        let at = 27 + 8 * (2 + HISTORY_LEN);
        let flags = be_u32(&p[at..]);
        let (resource, next) = self.string_at(at + 4);
        let (node, _) = self.string_at(next);
        Some(Hello {
            version: be_u32(p),
            features: be_u64(&p[4..]),
            size_bytes: be_u64(&p[12..]),
            granularity_bytes: be_u32(&p[20..]),
            protocol,
            role: Role::from_code(p[25]).expect("role code"),
            disk: DiskState::from_code(p[26]).expect("disk state code"),
            gens,
            flags,
            resource,
            node,
        })
    }
}

/// How a connection ended, seen from the fake.
#[derive(Debug)]
pub struct Closed {
    /// Every frame received before the end.
    pub frames: Vec<Frame>,
    /// EOF, or the error that ended it (a reset).
    pub how: String,
}

impl Closed {
    /// The reason of the `Bye` the node sent, if any.
    pub fn bye(&self) -> Option<String> {
        self.frames.iter().find_map(Frame::bye_reason)
    }
}

/// A connection to a node's replication address.
pub struct FakePeer {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Sequence number of the next frame [`FakePeer::send`] sends.
    pub next_seq: u64,
    /// The node's Hello (its first frame).
    pub remote: Hello,
}

impl FakePeer {
    /// Connects and reads the node's Hello (a node writes its Hello before
    /// reading the peer's). A node that is still busy with a previous link
    /// answers `Bye("already connected")`: then it tries again until `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> FakePeer {
        let deadline = Instant::now() + timeout;
        loop {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            stream.set_nodelay(true).expect("nodelay");
            stream.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
            stream.set_write_timeout(Some(Duration::from_secs(10))).expect("write timeout");
            let mut peer = FakePeer { stream, buf: Vec::new(), next_seq: 0, remote: placeholder_hello() };
            let first = peer
                .next_frame(deadline)
                .unwrap_or_else(|| panic!("{addr} closed the connection before sending its Hello"));
            if let Some(hello) = first.hello() {
                peer.remote = hello;
                return peer;
            }
            match first.bye_reason() {
                Some(reason) if reason == BUSY_REASON && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50));
                }
                _ => panic!("{addr} sent {first:?} instead of its Hello"),
            }
        }
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the node");
    }

    /// Sends a valid frame with the next sequence number.
    pub fn send(&mut self, code: u16, payload: &[u8]) {
        let f = frame(code, self.next_seq, payload);
        self.next_seq += 1;
        self.send_raw(&f);
    }

    /// Sends `msg` (encoded by blockd) with the next sequence number.
    pub fn send_msg(&mut self, msg: Message) {
        let code = msg.kind().code();
        self.send(code, &payload(msg));
    }

    /// The next frame from the node; `None` once the node closed the connection
    /// (EOF or reset). Panics at `deadline`, on a frame with a bad magic or crc
    /// (the node must not send those), or on any other socket error.
    pub fn next_frame(&mut self, deadline: Instant) -> Option<Frame> {
        let mut chunk = [0u8; 64 << 10];
        loop {
            if self.buf.len() >= FRAME_HEADER_BYTES {
                let h = &self.buf[..FRAME_HEADER_BYTES];
                assert_eq!(be_u32(h), FRAME_MAGIC, "the node sent a frame with a bad magic");
                let len = be_u32(&h[16..]) as usize;
                if self.buf.len() >= FRAME_HEADER_BYTES + len {
                    let mut bytes: Vec<u8> = self.buf.drain(..FRAME_HEADER_BYTES + len).collect();
                    let crc = be_u32(&bytes[CRC_AT..]);
                    bytes[CRC_AT..FRAME_HEADER_BYTES].fill(0);
                    assert_eq!(crc32c(&bytes), crc, "the node sent a frame with a bad crc");
                    let code = u16::from_be_bytes([bytes[4], bytes[5]]);
                    let seq = be_u64(&bytes[8..]);
                    return Some(Frame { code, seq, payload: bytes.split_off(FRAME_HEADER_BYTES) });
                }
            }
            assert!(Instant::now() < deadline, "no frame and no close from the node before the deadline");
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if is_reset(&e) => return None,
                Err(e) => panic!("reading from the node: {e}"),
            }
        }
    }

    /// Reads until the node closes the connection; panics if it has not after
    /// `timeout`.
    pub fn read_until_closed(&mut self, timeout: Duration) -> Closed {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut chunk = [0u8; 64 << 10];
        // Complete frames first, then whatever is left until the end.
        while let Some(f) = self.try_parse() {
            frames.push(f);
        }
        loop {
            assert!(
                Instant::now() < deadline,
                "the node did not close the connection within {timeout:?} (received {frames:?})"
            );
            match self.stream.read(&mut chunk) {
                Ok(0) => return Closed { frames, how: "EOF".into() },
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    while let Some(f) = self.try_parse() {
                        frames.push(f);
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if is_reset(&e) => return Closed { frames, how: e.to_string() },
                Err(e) => panic!("reading from the node: {e}"),
            }
        }
    }

    fn try_parse(&mut self) -> Option<Frame> {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return None;
        }
        let len = be_u32(&self.buf[16..]) as usize;
        if self.buf.len() < FRAME_HEADER_BYTES + len {
            return None;
        }
        // Complete: next_frame returns it without reading.
        self.next_frame(Instant::now() + Duration::from_secs(1))
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

fn placeholder_hello() -> Hello {
    Hello {
        version: 0,
        features: 0,
        resource: String::new(),
        node: String::new(),
        size_bytes: 0,
        granularity_bytes: 0,
        protocol: Protocol::C,
        role: Role::Secondary,
        disk: DiskState::Diskless,
        gens: Generations::default(),
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn framing_matches_blockd() {
        encoder_agrees(Message::Ping { nonce: 42 });
        encoder_agrees(Message::Bye { reason: "x".into() });
        let hello = Hello { resource: "r0".into(), node: "alpha".into(), ..placeholder_hello() };
        let f = Frame { code: 1, seq: 0, payload: payload(Message::Hello(hello.clone())) };
        assert_eq!(f.hello(), Some(hello));
    }
}
