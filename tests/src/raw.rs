//! A minimal raw NBD client for protocol tests that libnbd will not send
//! (STARTTLS without TLS, unknown options/commands, bad magic, ...).
//! Every read has a timeout so a misbehaving server cannot hang a test.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::daemon::{Addr, ReadWrite};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
pub const CFLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Timeout for each read or write on a raw connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// One transmission reply (a simple reply, or one structured chunk).
#[derive(Debug, Clone)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, typ: u16, cookie: u64, payload: Vec<u8> },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The NBD error of a simple reply or an error chunk (0 = none).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { typ, payload, .. }
                if (*typ == REPLY_TYPE_ERROR || *typ == REPLY_TYPE_ERROR_OFFSET) && payload.len() >= 4 =>
            {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            }
            Reply::Chunk { .. } => 0,
        }
    }

    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// A raw NBD connection.
pub struct RawClient {
    s: Box<dyn ReadWrite>,
    /// Handshake flags from the server greeting.
    pub handshake_flags: u16,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient").field("handshake_flags", &self.handshake_flags).finish()
    }
}

impl RawClient {
    /// Connects and reads the newstyle greeting (asserting its magics).
    pub fn connect(addr: &Addr) -> RawClient {
        let s = addr.connect().unwrap_or_else(|e| panic!("connect {addr:?}: {e}"));
        s.set_timeout(Some(IO_TIMEOUT)).expect("set timeout");
        let mut c = RawClient { s, handshake_flags: 0 };
        let magic = c.read_u64().expect("read NBDMAGIC");
        assert_eq!(magic, NBDMAGIC, "bad greeting magic {magic:#x}");
        let ihaveopt = c.read_u64().expect("read IHAVEOPT");
        assert_eq!(ihaveopt, IHAVEOPT, "not a newstyle server: {ihaveopt:#x}");
        c.handshake_flags = c.read_u16().expect("read handshake flags");
        c
    }

    /// Connects and sends client flags (fixed newstyle, plus NO_ZEROES when
    /// offered).
    pub fn connect_fixed(addr: &Addr) -> RawClient {
        let mut c = RawClient::connect(addr);
        assert!(c.handshake_flags & FLAG_FIXED_NEWSTYLE != 0, "server does not offer fixed newstyle");
        let mut f = CFLAG_FIXED_NEWSTYLE;
        if c.handshake_flags & FLAG_NO_ZEROES != 0 {
            f |= CFLAG_NO_ZEROES;
        }
        c.write_all(&f.to_be_bytes()).expect("send client flags");
        c
    }

    /// Read/write timeout of the socket (the default is the harness's `IO_TIMEOUT`).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) {
        self.s.set_timeout(timeout).expect("set timeout");
    }

    pub fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)?;
        self.s.flush()
    }

    pub fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        self.s.read_exact(b)
    }

    fn read_u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Sends option `opt` with `data`.
    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.write_all(&m)
    }

    /// Reads one option reply (asserting its magic).
    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let magic = self.read_u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let opt = self.read_u32()?;
        let typ = self.read_u32()?;
        let len = self.read_u32()?;
        assert!(len <= 64 << 20, "option reply length {len}");
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply { opt, typ, data })
    }

    /// Sends `opt` and reads its single reply, asserting the echoed option.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> OptReply {
        self.send_option(opt, data).unwrap_or_else(|e| panic!("send option {opt}: {e}"));
        let r = self.read_option_reply().unwrap_or_else(|e| panic!("reply to option {opt}: {e}"));
        assert_eq!(r.opt, opt, "reply echoes option {} not {opt}", r.opt);
        r
    }

    /// NBD_OPT_LIST: returns the export names, asserting the final ACK.
    pub fn list(&mut self) -> Vec<String> {
        self.send_option(OPT_LIST, &[]).expect("send LIST");
        let mut names = Vec::new();
        for _ in 0..10_000 {
            let r = self.read_option_reply().expect("LIST reply");
            assert_eq!(r.opt, OPT_LIST);
            match r.typ {
                REP_SERVER => {
                    assert!(r.data.len() >= 4, "short REP_SERVER");
                    let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
                    assert!(4 + n <= r.data.len(), "bad REP_SERVER name length");
                    names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
                }
                REP_ACK => return names,
                t => panic!("unexpected LIST reply type {t:#x}"),
            }
        }
        panic!("LIST: no ACK after 10000 replies");
    }

    /// Encodes INFO/GO data: name, and info requests.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// INFO or GO: collects REP_INFO replies until ACK (Ok) or an error
    /// reply (Err(type)). Returns (size, transmission flags, block sizes).
    pub fn info_or_go(&mut self, opt: u32, name: &str) -> Result<(u64, u16, Option<[u32; 3]>), u32> {
        self.send_option(opt, &Self::info_data(name, &[INFO_BLOCK_SIZE])).expect("send INFO/GO");
        let mut export = None;
        let mut sizes = None;
        for _ in 0..1000 {
            let r = self.read_option_reply().expect("INFO/GO reply");
            assert_eq!(r.opt, opt);
            match r.typ {
                REP_INFO => {
                    let t = u16::from_be_bytes(r.data[..2].try_into().unwrap());
                    if t == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                        export = Some((size, flags));
                    } else if t == INFO_BLOCK_SIZE {
                        assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                        let g = |i: usize| u32::from_be_bytes(r.data[i..i + 4].try_into().unwrap());
                        sizes = Some([g(2), g(6), g(10)]);
                    }
                }
                REP_ACK => {
                    let (size, flags) = export.expect("ACK without NBD_INFO_EXPORT");
                    return Ok((size, flags, sizes));
                }
                t if t & 0x8000_0000 != 0 => return Err(t),
                t => panic!("unexpected INFO/GO reply type {t:#x}"),
            }
        }
        panic!("INFO/GO: no ACK after 1000 replies");
    }

    /// Negotiates structured replies (when `structured`) and GO on `name`.
    pub fn handshake(addr: &Addr, name: &str, structured: bool) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect_fixed(addr);
        if structured {
            let r = c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.typ, REP_ACK, "structured replies refused");
        }
        let (size, flags, _) =
            c.info_or_go(OPT_GO, name).unwrap_or_else(|t| panic!("GO {name:?} refused: {t:#x}"));
        (c, size, flags)
    }

    /// Sends a request header (plus `payload` for writes).
    pub fn request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.write_all(&m)
    }

    /// Reads one reply. For a successful simple READ reply the caller must
    /// then read the data with `read_exact`.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let magic = self.read_u32()?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32()?;
                let cookie = self.read_u64()?;
                Ok(Reply::Simple { error, cookie })
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.read_u16()?;
                let typ = self.read_u16()?;
                let cookie = self.read_u64()?;
                let len = self.read_u32()?;
                assert!(len <= 64 << 20, "chunk length {len}");
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload)?;
                Ok(Reply::Chunk { flags, typ, cookie, payload })
            }
            m => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad reply magic {m:#x}"))),
        }
    }

    /// Reads replies for one (non-READ, or erroring) request until its final
    /// reply; returns the error (0 = success). Asserts the cookie.
    pub fn finish(&mut self, cookie: u64) -> u32 {
        let mut err = 0;
        for _ in 0..10_000 {
            let r = self.read_reply().expect("read reply");
            assert_eq!(r.cookie(), cookie, "reply for another cookie: {r:?}");
            if r.error() != 0 {
                err = r.error();
            }
            if r.done() {
                return err;
            }
        }
        panic!("no final reply after 10000 chunks");
    }

    /// Does the server close the connection (EOF or reset) within the
    /// timeout, with nothing else (bounded) arriving first?
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionReset
                        || e.kind() == io::ErrorKind::BrokenPipe =>
                {
                    return true;
                }
                Err(_) => return false,
            }
        }
        false
    }
}
