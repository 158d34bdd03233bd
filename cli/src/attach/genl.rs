//! A minimal generic-netlink client for the kernel's `nbd` family: resolve the
//! family and its multicast group, send CONNECT / DISCONNECT / RECONFIGURE / STATUS,
//! and receive `LINK_DEAD` notifications. Written by hand on raw `AF_NETLINK`
//! sockets: it is a few message layouts (netlink header, genl header, attributes),
//! and the constants are the kernel's uapi (`linux/nbd-netlink.h`,
//! `linux/genetlink.h`), listed in `research/nbd-pacemaker.md` §2.3.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

// netlink / genetlink
const NLMSG_HDR_BYTES: usize = 16;
const GENL_HDR_BYTES: usize = 4;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

// the nbd family
const NBD_FAMILY: &str = "nbd";
const NBD_MC_GROUP: &str = "nbd_mc_group";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_LINK_DEAD: u8 = 4;
const NBD_CMD_STATUS: u8 = 5;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;

/// Replies are small; 64 KiB holds any message of these families.
const RECV_BUF_BYTES: usize = 64 << 10;
/// A request the kernel does not answer within this is an error, not a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An attribute tree to encode.
#[derive(Debug)]
pub enum Attr<'a> {
    /// Only the kernel sends these to us (tests build replies with it).
    #[cfg_attr(not(test), allow(dead_code))]
    U8(u16, u8),
    U32(u16, u32),
    U64(u16, u64),
    /// NUL-terminated on the wire.
    Str(u16, &'a str),
    Nested(u16, Vec<Attr<'a>>),
}

fn put_attr(out: &mut Vec<u8>, attr: &Attr<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let kind = match attr {
        Attr::U8(t, v) => {
            out.push(*v);
            *t
        }
        Attr::U32(t, v) => {
            out.extend_from_slice(&v.to_ne_bytes());
            *t
        }
        Attr::U64(t, v) => {
            out.extend_from_slice(&v.to_ne_bytes());
            *t
        }
        Attr::Str(t, s) => {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
            *t
        }
        Attr::Nested(t, inner) => {
            for a in inner {
                put_attr(out, a);
            }
            *t | NLA_F_NESTED
        }
    };
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    out.resize(align4(out.len()), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One generic-netlink request message.
pub fn encode_request(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[Attr<'_>],
) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDR_BYTES];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    for a in attrs {
        put_attr(&mut out, a);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender's port.
    out
}

/// Iterates `(type without flags, payload)` over an attribute area; stops at the
/// first malformed attribute (kernel input is trusted only as far as it parses).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, payload))
    })
}

fn u32_of(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

fn u16_of(p: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
}

/// One received netlink message: header fields and the payload after it.
#[derive(Debug)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into netlink messages.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDR_BYTES {
            return None;
        }
        let len = u32_of(buf)? as usize;
        if len < NLMSG_HDR_BYTES || len > buf.len() {
            return None;
        }
        let m = Message {
            kind: u16_of(&buf[4..])?,
            seq: u32_of(&buf[8..])?,
            payload: &buf[NLMSG_HDR_BYTES..len],
        };
        buf = &buf[align4(len).min(buf.len())..];
        Some(m)
    })
}

/// The family id and multicast group id from a CTRL_CMD_GETFAMILY reply payload
/// (after the genl header).
pub fn parse_family(attr_area: &[u8], group: &str) -> (Option<u16>, Option<u32>) {
    let mut id = None;
    let mut mcast = None;
    for (kind, p) in attrs(attr_area) {
        match kind {
            CTRL_ATTR_FAMILY_ID => id = u16_of(p),
            CTRL_ATTR_MCAST_GROUPS => {
                for (_, grp) in attrs(p) {
                    let mut name = None;
                    let mut gid = None;
                    for (k, v) in attrs(grp) {
                        match k {
                            CTRL_ATTR_MCAST_GRP_NAME => name = Some(v.split(|b| *b == 0).next().unwrap_or(v)),
                            CTRL_ATTR_MCAST_GRP_ID => gid = u32_of(v),
                            _ => {}
                        }
                    }
                    if name == Some(group.as_bytes()) {
                        mcast = gid;
                    }
                }
            }
            _ => {}
        }
    }
    (id, mcast)
}

/// Whether device `index` is connected, from an NBD_CMD_STATUS reply payload.
pub fn parse_status(attr_area: &[u8], index: u32) -> Option<bool> {
    for (kind, list) in attrs(attr_area) {
        if kind != NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for (_, item) in attrs(list).filter(|(k, _)| *k == NBD_DEVICE_ITEM) {
            let mut idx = None;
            let mut connected = None;
            for (k, v) in attrs(item) {
                match k {
                    NBD_DEVICE_INDEX => idx = u32_of(v),
                    NBD_DEVICE_CONNECTED => connected = v.first().map(|c| *c != 0),
                    _ => {}
                }
            }
            if idx == Some(index) {
                return connected;
            }
        }
    }
    None
}

/// A raw netlink socket (`NETLINK_GENERIC`).
#[derive(Debug)]
struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open(recv_timeout: Duration) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: recv_timeout.as_secs() as libc::time_t,
            tv_usec: recv_timeout.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(Socket { fd })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into `buf`; `Ok(0)` never happens on netlink.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a valid T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Sends one request and collects the payloads of its replies until the ACK (an
/// NLMSG_ERROR with code 0); a negative code is returned as that errno.
fn transact(sock: &Socket, seq: u32, msg: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    sock.send(msg)?;
    let mut buf = vec![0u8; RECV_BUF_BYTES];
    let mut replies = Vec::new();
    // Bounded: a request gets a handful of messages; each recv has a timeout.
    for _ in 0..64 {
        let n = sock.recv(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer the netlink request")
            } else {
                e
            }
        })?;
        for m in messages(&buf[..n]) {
            if m.seq != seq {
                continue;
            }
            match m.kind {
                NLMSG_ERROR => {
                    let code = m.payload.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4")));
                    return if code == 0 { Ok(replies) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                NLMSG_DONE => return Ok(replies),
                _ => replies.push(m.payload.get(GENL_HDR_BYTES..).unwrap_or_default().to_vec()),
            }
        }
    }
    Err(io::Error::other("no acknowledgement from the kernel"))
}

/// What CONNECT configures.
#[derive(Debug)]
pub struct ConnectParams<'a> {
    pub index: u32,
    pub size_bytes: u64,
    pub block_size_bytes: u64,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub server_flags: u64,
    pub backend: &'a str,
    pub fds: &'a [RawFd],
}

fn sockets_attr<'a>(fds: &[RawFd]) -> Attr<'a> {
    Attr::Nested(
        NBD_ATTR_SOCKETS,
        fds.iter().map(|fd| Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, *fd as u32)])).collect(),
    )
}

/// The kernel's `nbd` generic-netlink family.
#[derive(Debug)]
pub struct Nbd {
    sock: Socket,
    family: u16,
    mcast_group: Option<u32>,
    seq: u32,
}

impl Nbd {
    /// Resolves the family. `Ok(None)`: the kernel has no `nbd` family (module not
    /// loaded and not loadable, or a kernel without netlink support for nbd).
    pub fn open() -> io::Result<Option<Nbd>> {
        let sock = Socket::open(REQUEST_TIMEOUT)?;
        let name = Attr::Str(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY);
        let msg = encode_request(GENL_ID_CTRL, NLM_F_ACK, 1, CTRL_CMD_GETFAMILY, 1, &[name]);
        let replies = match transact(&sock, 1, &msg) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in &replies {
            if let (Some(family), mcast_group) = parse_family(r, NBD_MC_GROUP) {
                return Ok(Some(Nbd { sock, family, mcast_group, seq: 1 }));
            }
        }
        Ok(None)
    }

    fn call(&mut self, cmd: u8, attrs: &[Attr<'_>]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode_request(self.family, NLM_F_ACK, self.seq, cmd, NBD_GENL_VERSION, attrs);
        transact(&self.sock, self.seq, &msg)
    }

    /// Configures device `index` with the negotiated sockets and starts it.
    pub fn connect(&mut self, p: &ConnectParams<'_>) -> io::Result<()> {
        let attrs = [
            Attr::U32(NBD_ATTR_INDEX, p.index),
            Attr::U64(NBD_ATTR_SIZE_BYTES, p.size_bytes),
            Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size_bytes),
            Attr::U64(NBD_ATTR_TIMEOUT, p.timeout_secs),
            Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout_secs),
            Attr::U64(NBD_ATTR_SERVER_FLAGS, p.server_flags),
            Attr::U64(NBD_ATTR_CLIENT_FLAGS, 0),
            Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, p.backend),
            sockets_attr(p.fds),
        ];
        self.call(NBD_CMD_CONNECT, &attrs).map(drop)
    }

    /// Swaps fresh sockets into the device's dead slots (extra sockets are ignored
    /// by the kernel when no slot is dead).
    pub fn reconfigure(&mut self, index: u32, backend: &str, fds: &[RawFd]) -> io::Result<()> {
        let attrs = [
            Attr::U32(NBD_ATTR_INDEX, index),
            Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, backend),
            sockets_attr(fds),
        ];
        self.call(NBD_CMD_RECONFIGURE, &attrs).map(drop)
    }

    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        self.call(NBD_CMD_DISCONNECT, &[Attr::U32(NBD_ATTR_INDEX, index)]).map(drop)
    }

    /// Whether device `index` is connected (`false` also when it does not exist).
    pub fn is_connected(&mut self, index: u32) -> io::Result<bool> {
        let replies = self.call(NBD_CMD_STATUS, &[Attr::U32(NBD_ATTR_INDEX, index)])?;
        Ok(replies.iter().find_map(|r| parse_status(r, index)).unwrap_or(false))
    }

    /// A socket subscribed to the family's notifications (LINK_DEAD).
    pub fn subscribe(&self, recv_timeout: Duration) -> io::Result<Events> {
        let group = self
            .mcast_group
            .ok_or_else(|| io::Error::other("the nbd netlink family has no multicast group"))?;
        let sock = Socket::open(recv_timeout)?;
        setsockopt(sock.fd.as_raw_fd(), SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group)?;
        Ok(Events { sock, family: self.family, buf: vec![0u8; RECV_BUF_BYTES] })
    }
}

/// What [`Events::next`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection of device `index` died.
    LinkDead(u32),
    /// Nothing within the receive timeout (or an unrelated message).
    Idle,
    /// The socket overflowed: notifications may have been lost.
    Overrun,
    /// A signal interrupted the wait.
    Interrupted,
}

/// Notifications from the `nbd` multicast group.
#[derive(Debug)]
pub struct Events {
    sock: Socket,
    family: u16,
    buf: Vec<u8>,
}

impl Events {
    /// Waits up to the socket's receive timeout for one datagram.
    pub fn next(&mut self) -> io::Result<Vec<Event>> {
        let n = match self.sock.recv(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(vec![Event::Idle]),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(vec![Event::Overrun]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(vec![Event::Interrupted]),
            Err(e) => return Err(e),
        };
        Ok(parse_events(&self.buf[..n], self.family))
    }
}

/// The LINK_DEAD notifications in a datagram.
pub fn parse_events(datagram: &[u8], family: u16) -> Vec<Event> {
    let mut out = Vec::new();
    for m in messages(datagram) {
        if m.kind != family || m.payload.first() != Some(&NBD_CMD_LINK_DEAD) {
            continue;
        }
        let area = m.payload.get(GENL_HDR_BYTES..).unwrap_or_default();
        if let Some(index) = attrs(area).find(|(k, _)| *k == NBD_ATTR_INDEX).and_then(|(_, v)| u32_of(v)) {
            out.push(Event::LinkDead(index));
        }
    }
    if out.is_empty() {
        out.push(Event::Idle);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel_abi() {
        let msg = encode_request(0x1234, NLM_F_ACK, 7, 3, 1, &[Attr::U32(1, 5), Attr::Str(10, "ab")]);
        // 16 header + 4 genl + 8 (u32 attr) + 8 ("ab\0" padded)
        assert_eq!(msg.len(), 36);
        assert_eq!(u32_of(&msg[0..]), Some(36));
        assert_eq!(u16_of(&msg[4..]), Some(0x1234));
        assert_eq!(u16_of(&msg[6..]), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_of(&msg[8..]), Some(7));
        assert_eq!(&msg[16..20], &[3, 1, 0, 0]);
        assert_eq!(u16_of(&msg[20..]), Some(8));
        assert_eq!(u16_of(&msg[22..]), Some(1));
        assert_eq!(u32_of(&msg[24..]), Some(5));
        assert_eq!(u16_of(&msg[28..]), Some(7), "attr length excludes padding");
        assert_eq!(&msg[32..35], b"ab\0");
    }

    #[test]
    fn nested_sockets_round_trip() {
        let msg = encode_request(1, 0, 1, NBD_CMD_CONNECT, 1, &[sockets_attr(&[3, 9])]);
        let area = &msg[NLMSG_HDR_BYTES + GENL_HDR_BYTES..];
        let (kind, socks) = attrs(area).next().expect("one attribute");
        assert_eq!(kind, NBD_ATTR_SOCKETS);
        let fds: Vec<u32> = attrs(socks)
            .map(|(k, item)| {
                assert_eq!(k, NBD_SOCK_ITEM);
                let (k, v) = attrs(item).next().expect("fd");
                assert_eq!(k, NBD_SOCK_FD);
                u32_of(v).expect("u32")
            })
            .collect();
        assert_eq!(fds, [3, 9]);
        // The nested flag is set on the wire but masked when parsing.
        assert_eq!(u16_of(&area[2..]), Some(NBD_ATTR_SOCKETS | NLA_F_NESTED));
    }

    #[test]
    fn family_reply_yields_id_and_group() {
        let groups = Attr::Nested(
            CTRL_ATTR_MCAST_GROUPS,
            vec![
                Attr::Nested(1, vec![Attr::Str(CTRL_ATTR_MCAST_GRP_NAME, "other"), Attr::U32(2, 4)]),
                Attr::Nested(2, vec![Attr::Str(CTRL_ATTR_MCAST_GRP_NAME, NBD_MC_GROUP), Attr::U32(2, 9)]),
            ],
        );
        let mut area = Vec::new();
        put_attr(&mut area, &Attr::Str(CTRL_ATTR_FAMILY_NAME, "nbd"));
        put_attr(&mut area, &Attr::U32(CTRL_ATTR_FAMILY_ID, 0x1d));
        put_attr(&mut area, &groups);
        assert_eq!(parse_family(&area, NBD_MC_GROUP), (Some(0x1d), Some(9)));
        assert_eq!(parse_family(&area, "missing"), (Some(0x1d), None));
    }

    #[test]
    fn status_and_link_dead_parse() {
        let list = Attr::Nested(
            NBD_ATTR_DEVICE_LIST,
            vec![
                Attr::Nested(NBD_DEVICE_ITEM, vec![Attr::U32(NBD_DEVICE_INDEX, 0), Attr::U8(2, 1)]),
                Attr::Nested(NBD_DEVICE_ITEM, vec![Attr::U32(NBD_DEVICE_INDEX, 1), Attr::U8(2, 0)]),
            ],
        );
        let mut area = Vec::new();
        put_attr(&mut area, &list);
        assert_eq!(parse_status(&area, 0), Some(true));
        assert_eq!(parse_status(&area, 1), Some(false));
        assert_eq!(parse_status(&area, 2), None);

        let mut dgram = encode_request(0x1d, 0, 0, NBD_CMD_LINK_DEAD, 1, &[Attr::U32(NBD_ATTR_INDEX, 3)]);
        dgram.extend(encode_request(0x1e, 0, 0, NBD_CMD_LINK_DEAD, 1, &[Attr::U32(NBD_ATTR_INDEX, 4)]));
        assert_eq!(parse_events(&dgram, 0x1d), [Event::LinkDead(3)]);
        assert_eq!(parse_events(&dgram[..20], 0x1d), [Event::Idle], "a truncated message is ignored");
    }

    #[test]
    fn malformed_attributes_stop_parsing_without_panicking() {
        for bad in [&[0xff, 0xff, 1, 0][..], &[2, 0, 1, 0], &[8, 0, 1, 0, 1], &[]] {
            assert_eq!(attrs(bad).count(), 0);
        }
        assert_eq!(messages(&[0xff; 40]).count(), 0);
        assert_eq!(messages(&[4, 0, 0, 0]).count(), 0);
    }
}
