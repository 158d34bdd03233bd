//! The client side: the fixed-newstyle handshake (used to hand a negotiated socket to
//! the kernel, and by tests), plus a minimal one-request-at-a-time [`Client`] with
//! simple replies for tests and tools.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, NbdError};
use crate::proto::{
    IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC, RequestHeader, SIMPLE_REPLY_MAGIC, client_flags, cmd,
    encode_request, handshake_flags, info, opt, rep,
};

/// What the server told us about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDetails {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum payload), when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
}

async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<u16, Error> {
    let magic = s.read_u64().await?;
    let newstyle = s.read_u64().await?;
    if magic != NBDMAGIC || newstyle != IHAVEOPT {
        return Err(Error::Protocol("not a newstyle NBD server".into()));
    }
    let flags = s.read_u16().await?;
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol("server does not speak fixed newstyle".into()));
    }
    let mut ours = client_flags::FIXED_NEWSTYLE;
    if flags & handshake_flags::NO_ZEROES != 0 {
        ours |= client_flags::NO_ZEROES;
    }
    s.write_u32(ours).await?;
    Ok(flags)
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> Result<(), Error> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

/// Reads one option reply: (reply type, payload). Payloads are bounded to 64 KiB.
async fn read_option_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), Error> {
    let magic = s.read_u64().await?;
    let echoed = s.read_u32().await?;
    let reply_type = s.read_u32().await?;
    let len = s.read_u32().await?;
    if magic != OPT_REPLY_MAGIC || echoed != option || len > 64 << 10 {
        return Err(Error::Protocol(format!("bad option reply to {option}")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((reply_type, data))
}

fn refusal(reply_type: u32, data: &[u8]) -> Error {
    let what = match reply_type {
        rep::ERR_POLICY => "refused by policy",
        rep::ERR_UNKNOWN => "unknown export",
        rep::ERR_SHUTDOWN => "server shutting down",
        rep::ERR_UNSUP => "option unsupported",
        rep::ERR_TLS_REQD => "TLS required",
        _ => "error",
    };
    Error::Refused(format!("{what}: {}", String::from_utf8_lossy(data)))
}

/// Negotiates `export` with `NBD_OPT_GO` (asking for block sizes, no structured
/// replies, as the kernel client does) and leaves the stream in transmission.
pub async fn handshake<S>(s: &mut S, export: &str) -> Result<ExportDetails, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    read_greeting(s).await?;
    go(s, export).await
}

/// `NBD_OPT_GO` for `export` on a stream already past the greeting (e.g. inside a
/// TLS session after `NBD_OPT_STARTTLS`); leaves it in transmission.
pub async fn go<S>(s: &mut S, export: &str) -> Result<ExportDetails, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, opt::GO, &data).await?;
    let mut details = ExportDetails { size_bytes: 0, transmission_flags: 0, block_sizes: None };
    let mut saw_export = false;
    // Bounded: a server sends at most a handful of INFO replies.
    for _ in 0..16 {
        let (reply_type, data) = read_option_reply(s, opt::GO).await?;
        match reply_type {
            rep::ACK if saw_export => return Ok(details),
            rep::INFO if data.len() >= 2 => {
                let kind = u16::from_be_bytes([data[0], data[1]]);
                if kind == info::EXPORT && data.len() == 12 {
                    details.size_bytes = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    details.transmission_flags = u16::from_be_bytes([data[10], data[11]]);
                    saw_export = true;
                } else if kind == info::BLOCK_SIZE && data.len() == 14 {
                    let at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().expect("4"));
                    details.block_sizes = Some((at(2), at(6), at(10)));
                }
            }
            t if rep::is_error(t) => return Err(refusal(t, &data)),
            _ => return Err(Error::Protocol(format!("unexpected GO reply {reply_type:#x}"))),
        }
    }
    Err(Error::Protocol("too many GO replies".into()))
}

/// Lists the server's exports with `NBD_OPT_LIST`, then aborts the session.
pub async fn list_exports<S>(s: &mut S) -> Result<Vec<String>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    read_greeting(s).await?;
    send_option(s, opt::LIST, &[]).await?;
    let mut names = Vec::new();
    for _ in 0..1024 {
        let (reply_type, data) = read_option_reply(s, opt::LIST).await?;
        match reply_type {
            rep::SERVER if data.len() >= 4 => {
                let n = (u32::from_be_bytes(data[..4].try_into().expect("4")) as usize).min(data.len() - 4);
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            rep::ACK => {
                send_option(s, opt::ABORT, &[]).await?;
                return Ok(names);
            }
            t => return Err(refusal(t, &data)),
        }
    }
    Err(Error::Protocol("too many LIST replies".into()))
}

/// A minimal client: one request at a time, simple replies.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    details: ExportDetails,
    next_cookie: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Handshakes `export` on `stream`.
    pub async fn connect(mut stream: S, export: &str) -> Result<Client<S>, Error> {
        let details = handshake(&mut stream, export).await?;
        Ok(Client::negotiated(stream, details))
    }

    /// A client on a stream already in transmission (after [`go`]).
    pub fn negotiated(stream: S, details: ExportDetails) -> Client<S> {
        Client { stream, details, next_cookie: 1 }
    }

    pub fn details(&self) -> &ExportDetails {
        &self.details
    }

    /// Sends one request and waits for its simple reply; returns the reply's data
    /// (`read_len` bytes on success) or the NBD error.
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_len: usize,
    ) -> Result<Result<Vec<u8>, NbdError>, Error> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let h = RequestHeader { flags, command, cookie, offset, length };
        self.stream.write_all(&encode_request(&h)).await?;
        self.stream.write_all(payload).await?;
        self.stream.flush().await?;
        let magic = self.stream.read_u32().await?;
        let error = self.stream.read_u32().await?;
        let echoed = self.stream.read_u64().await?;
        if magic != SIMPLE_REPLY_MAGIC || echoed != cookie {
            return Err(Error::Protocol(format!("bad reply (magic {magic:#x}, cookie {echoed})")));
        }
        if error != 0 {
            return Ok(Err(NbdError::from_code(error)));
        }
        let mut data = vec![0u8; read_len];
        self.stream.read_exact(&mut data).await?;
        Ok(Ok(data))
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Result<Vec<u8>, NbdError>, Error> {
        self.request(cmd::READ, 0, offset, len, &[], len as usize).await
    }

    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        flags: u16,
    ) -> Result<Result<(), NbdError>, Error> {
        let len = u32::try_from(data.len()).map_err(|_| Error::Protocol("write too large".into()))?;
        Ok(self.request(cmd::WRITE, flags, offset, len, data, 0).await?.map(drop))
    }

    pub async fn flush(&mut self) -> Result<Result<(), NbdError>, Error> {
        Ok(self.request(cmd::FLUSH, 0, 0, 0, &[], 0).await?.map(drop))
    }

    /// Sends `NBD_CMD_DISC` and returns the stream.
    pub async fn disconnect(mut self) -> Result<S, Error> {
        let h = RequestHeader { flags: 0, command: cmd::DISC, cookie: 0, offset: 0, length: 0 };
        self.stream.write_all(&encode_request(&h)).await?;
        self.stream.flush().await?;
        Ok(self.stream)
    }

    /// Gives the raw stream back (e.g. to hand it to the kernel after the handshake).
    pub fn into_inner(self) -> S {
        self.stream
    }
}
