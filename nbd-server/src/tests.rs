//! In-process end-to-end tests: a RAM device behind a real server on loopback,
//! driven by the crate's client and by raw bytes.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::client::{Client, handshake, list_exports};
use crate::proto::{self, cmd, cmd_flags, opt, rep};
use crate::{
    BlockDevice, Error, ExportInfo, Extent, Listener, NbdError, Request, Responder, Server, ServerConfig,
};

const SIZE: u64 = 1 << 20;

pub(crate) struct RamDevice {
    data: Mutex<Vec<u8>>,
    refuse: Option<String>,
}

impl BlockDevice for RamDevice {
    fn export_info(&self) -> ExportInfo {
        ExportInfo { can_fast_zero: false, ..ExportInfo::writable(SIZE) }
    }

    fn check_open(&self) -> Result<(), String> {
        self.refuse.clone().map_or(Ok(()), Err)
    }

    fn submit(&self, request: Request, responder: Responder) {
        let mut data = self.data.lock().expect("lock");
        match request {
            Request::Read { offset, mut buf } => {
                let o = offset as usize;
                let n = buf.len();
                buf.copy_from_slice(&data[o..o + n]);
                responder.read_done(buf);
            }
            Request::Write { offset, data: d, .. } => {
                let o = offset as usize;
                data[o..o + d.len()].copy_from_slice(&d);
                responder.ok();
            }
            Request::WriteZeroes { offset, len_bytes, .. } | Request::Trim { offset, len_bytes, .. } => {
                let o = offset as usize;
                data[o..o + len_bytes as usize].fill(0);
                responder.ok();
            }
            Request::BlockStatus { len_bytes, .. } => {
                responder.block_status(vec![Extent { len_bytes, flags: 0 }]);
            }
            Request::Flush | Request::Cache { .. } => responder.ok(),
        }
    }
}

pub(crate) struct Running {
    pub(crate) addr: String,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    kick: crate::Disconnector,
}

async fn start(refuse: Option<&str>) -> Running {
    start_with(refuse, ServerConfig::new("r0")).await
}

pub(crate) async fn start_with(refuse: Option<&str>, config: ServerConfig) -> Running {
    let device =
        Arc::new(RamDevice { data: Mutex::new(vec![0; SIZE as usize]), refuse: refuse.map(str::to_string) });
    let listener = Listener::bind_tcp("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr();
    let (stop, rx) = watch::channel(false);
    let server = Server::new(device, config);
    let kick = server.disconnector();
    let done = tokio::spawn(server.serve(vec![listener], rx));
    Running { addr, stop, done, kick }
}

impl Running {
    async fn client(&self) -> Client<TcpStream> {
        let s = TcpStream::connect(&self.addr).await.expect("connect");
        Client::connect(s, "r0").await.expect("handshake")
    }

    pub(crate) async fn shutdown(self) {
        self.stop.send_replace(true);
        self.done.await.expect("server task");
    }
}

#[tokio::test]
async fn write_read_flush_round_trip() {
    let srv = start(None).await;
    let mut c = srv.client().await;
    assert_eq!(c.details().size_bytes, SIZE);
    assert_eq!(c.details().block_sizes, Some((1, 4096, 32 << 20)));
    c.write(4096, b"hello", cmd_flags::FUA).await.unwrap().unwrap();
    assert_eq!(c.read(4096, 5).await.unwrap().unwrap(), b"hello");
    c.flush().await.unwrap().unwrap();
    // Errors come back as NBD errors without losing the connection.
    assert_eq!(c.read(SIZE, 1).await.unwrap(), Err(NbdError::Inval));
    assert_eq!(c.write(SIZE - 1, b"xy", 0).await.unwrap(), Err(NbdError::NoSpc));
    assert_eq!(c.read(0, 2).await.unwrap().unwrap(), vec![0, 0], "payload of the bad write consumed");
    c.disconnect().await.unwrap();
    srv.shutdown().await;
}

#[tokio::test]
async fn empty_name_selects_the_export_and_list_names_it() {
    let srv = start(None).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    assert_eq!(list_exports(&mut s).await.unwrap(), vec!["r0".to_string()]);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    assert_eq!(handshake(&mut s, "").await.unwrap().size_bytes, SIZE);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let err = handshake(&mut s, "nope").await.unwrap_err();
    assert!(matches!(&err, Error::Refused(m) if m.starts_with("unknown export")), "{err}");
    srv.shutdown().await;
}

#[tokio::test]
async fn refused_open_reports_policy_with_message() {
    let srv = start(Some("this node is Secondary; the Primary is beta")).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let err = handshake(&mut s, "r0").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "server refused: refused by policy: this node is Secondary; the Primary is beta"
    );
    srv.shutdown().await;
}

/// Raw option exchange after the greeting.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_u32(3).await.unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
}

pub(crate) async fn send_opt<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    s.write_u64(proto::IHAVEOPT).await.unwrap();
    s.write_u32(option).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

pub(crate) async fn opt_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), proto::OPT_REPLY_MAGIC);
    let _option = s.read_u32().await.unwrap();
    let t = s.read_u32().await.unwrap();
    let mut d = vec![0; s.read_u32().await.unwrap() as usize];
    s.read_exact(&mut d).await.unwrap();
    (t, d)
}

#[tokio::test]
async fn unknown_options_and_starttls_keep_sync() {
    let srv = start(None).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    greet(&mut s).await;
    send_opt(&mut s, 99, b"some data the server must skip").await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_UNSUP);
    send_opt(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_POLICY);
    send_opt(&mut s, opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_UNSUP);
    send_opt(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    send_opt(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_INVALID, "twice");
    send_opt(&mut s, opt::LIST, &[]).await;
    let (t, d) = opt_reply(&mut s).await;
    assert_eq!((t, &d[4..]), (rep::SERVER, &b"r0"[..]));
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    // An oversize option is skipped and answered ERR_TOO_BIG.
    send_opt(&mut s, opt::INFO, &vec![0; 100_000]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ERR_TOO_BIG);
    send_opt(&mut s, opt::ABORT, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    srv.shutdown().await;
}

#[tokio::test]
async fn structured_read_and_block_status() {
    let srv = start(None).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    greet(&mut s).await;
    send_opt(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    send_opt(&mut s, opt::SET_META_CONTEXT, &meta).await;
    let (t, d) = opt_reply(&mut s).await;
    assert_eq!((t, &d[4..]), (rep::META_CONTEXT, &b"base:allocation"[..]));
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, opt::GO, &go).await;
    assert_eq!(opt_reply(&mut s).await.0, rep::INFO);
    assert_eq!(opt_reply(&mut s).await.0, rep::ACK);

    let h = proto::RequestHeader { flags: 0, command: cmd::READ, cookie: 7, offset: 512, length: 8 };
    s.write_all(&proto::encode_request(&h)).await.unwrap();
    let mut chunk = [0u8; 20 + 8 + 8];
    s.read_exact(&mut chunk).await.unwrap();
    assert_eq!(&chunk[..20], &proto::encode_structured_header(7, 1, 1, 16));
    assert_eq!(u64::from_be_bytes(chunk[20..28].try_into().unwrap()), 512, "offset echoed");

    let h = proto::RequestHeader { flags: 0, command: cmd::BLOCK_STATUS, cookie: 8, offset: 0, length: 4096 };
    s.write_all(&proto::encode_request(&h)).await.unwrap();
    let mut bs = [0u8; 20 + 4 + 8];
    s.read_exact(&mut bs).await.unwrap();
    assert_eq!(&bs[..20], &proto::encode_structured_header(8, 1, 5, 12));
    assert_eq!(&bs[24..28], &4096u32.to_be_bytes());

    // A READ error in structured mode is an error chunk.
    let h = proto::RequestHeader { flags: 0, command: cmd::READ, cookie: 9, offset: SIZE, length: 1 };
    s.write_all(&proto::encode_request(&h)).await.unwrap();
    let mut err = [0u8; 26];
    s.read_exact(&mut err).await.unwrap();
    assert_eq!(&err[..20], &proto::encode_structured_header(9, 1, 0x8001, 6));
    assert_eq!(&err[20..24], &22u32.to_be_bytes());
    srv.shutdown().await;
}

#[tokio::test]
async fn protocol_violations_drop_only_that_connection() {
    let srv = start(None).await;
    let mut good = srv.client().await;
    // Bad request magic.
    let mut bad = srv.client().await.into_inner();
    bad.write_all(&[0xff; 28]).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(bad.read(&mut buf).await.unwrap(), 0, "closed");
    // Oversize WRITE: disconnect before any payload is read.
    let mut big = srv.client().await.into_inner();
    let h =
        proto::RequestHeader { flags: 0, command: cmd::WRITE, cookie: 1, offset: 0, length: (32 << 20) + 1 };
    big.write_all(&proto::encode_request(&h)).await.unwrap();
    assert_eq!(big.read(&mut buf).await.unwrap(), 0, "closed");
    // Garbage instead of a handshake.
    let mut junk = TcpStream::connect(&srv.addr).await.unwrap();
    junk.write_all(&[0xab; 64]).await.unwrap();
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest).await;
    assert!(rest.len() <= 18, "only the greeting was sent");
    // The well-behaved client never noticed.
    good.write(0, b"still here", 0).await.unwrap().unwrap();
    assert_eq!(good.read(0, 10).await.unwrap().unwrap(), b"still here");
    srv.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_all_answered_then_disc() {
    let srv = start(None).await;
    let mut s = srv.client().await.into_inner();
    let n = 300u64; // more than the in-flight limit: the reader must apply backpressure
    let mut out = Vec::new();
    for i in 0..n {
        let h = proto::RequestHeader { flags: 0, command: cmd::WRITE, cookie: i, offset: i * 8, length: 8 };
        out.extend_from_slice(&proto::encode_request(&h));
        out.extend_from_slice(&i.to_le_bytes());
    }
    let disc = proto::RequestHeader { flags: 0, command: cmd::DISC, cookie: 0, offset: 0, length: 0 };
    out.extend_from_slice(&proto::encode_request(&disc));
    let (mut r, mut w) = s.split();
    let (wr, rd) = tokio::join!(w.write_all(&out), async {
        let mut replies = Vec::new();
        r.read_to_end(&mut replies).await.map(|_| replies)
    });
    wr.unwrap();
    let replies = rd.unwrap();
    assert_eq!(replies.len() as u64, 16 * n, "every request answered before close");
    let mut cookies: Vec<u64> =
        replies.chunks(16).map(|r| u64::from_be_bytes(r[8..16].try_into().unwrap())).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..n).collect::<Vec<_>>());
    drop(s);
    let mut c = srv.client().await;
    assert_eq!(c.read(8 * 299, 8).await.unwrap().unwrap(), 299u64.to_le_bytes());
    srv.shutdown().await;
}

#[tokio::test]
async fn disconnect_all_closes_open_connections_only() {
    let srv = start(None).await;
    let mut a = srv.client().await;
    a.write(0, b"x", 0).await.unwrap().unwrap();
    srv.kick.disconnect_all();
    let mut s = a.into_inner();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).await.unwrap(), 0, "closed by the server");
    let mut b = srv.client().await;
    assert_eq!(b.read(0, 1).await.unwrap().unwrap(), b"x", "new connections still work");
    srv.shutdown().await;
}

/// `Server::serve_one` (what the fuzz targets drive) serves an in-memory stream as it
/// serves a socket, and returns when the client is done.
#[tokio::test]
async fn serve_one_serves_an_in_memory_stream() {
    let device = Arc::new(RamDevice { data: Mutex::new(vec![0; SIZE as usize]), refuse: None });
    let server = Server::new(device, ServerConfig::new("r0"));
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (_stop, shutdown) = watch::channel(false);
    let (r, w) = tokio::io::split(theirs);
    let served = tokio::spawn(async move { server.serve_one(tokio::io::join(r, w), shutdown).await });
    let mut c = Client::connect(ours, "r0").await.expect("handshake");
    c.write(0, b"mem", 0).await.unwrap().unwrap();
    assert_eq!(c.read(0, 3).await.unwrap().unwrap(), b"mem");
    drop(c.disconnect().await.unwrap());
    served.await.expect("the task").expect("a clean end");
}
