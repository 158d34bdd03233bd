//! Server side of the fixed-newstyle handshake (option haggling).
//!
//! Bounded in every dimension a client controls: number of options, bytes per option,
//! string lengths, and (by the caller) total time. Unknown options get
//! `NBD_REP_ERR_UNSUP` and the loop stays in sync by consuming their data.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio_rustls::TlsAcceptor;

use crate::device::{BlockDevice, ExportInfo};
use crate::error::Error;
use crate::proto::{
    BASE_ALLOCATION, IHAVEOPT, MAX_STRING_BYTES, NBDMAGIC, client_flags, encode_option_reply,
    handshake_flags, info, opt, rep,
};
use crate::tls::TlsPolicy;

/// Options a client may send before it must choose an export (nbdkit uses 32 too).
const MAX_OPTIONS: usize = 32;
/// Option data kept in memory; larger data is skipped and answered `ERR_TOO_BIG`.
const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Option data beyond this is treated as an attack: the connection is dropped.
const MAX_SKIPPED_OPTION_BYTES: u32 = 16 << 20;
/// The context id this server gives `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the export looks like by name (shared by all connections).
#[derive(Clone, Debug)]
pub struct ExportName {
    pub name: String,
    pub description: Option<String>,
}

/// The state a successful handshake hands to the transmission phase.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub structured_replies: bool,
    /// Set when `base:allocation` was selected with SET_META_CONTEXT.
    pub base_allocation: bool,
    pub info: ExportInfo,
}

/// How option haggling ended.
pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client aborted, left, or asked for something we must answer by closing.
    Closed,
    /// STARTTLS was acknowledged: the caller runs the TLS handshake with `acceptor`
    /// and then [`resume`]s haggling over the TLS stream.
    StartTls {
        acceptor: TlsAcceptor,
        resume: Resume,
    },
}

/// What haggling carries over a STARTTLS: only the greeting's flags and the option
/// budget (the spec forbids keeping any negotiated state).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resume {
    no_zeroes: bool,
    options_left: usize,
}

/// Where the handshake runs: the device and export, shutdown, TLS.
pub(crate) struct Setting<'a, D> {
    pub device: &'a D,
    pub export: &'a ExportName,
    pub shutting_down: bool,
    pub tls: TlsPolicy<'a>,
}

struct Handshake<'a, S, D> {
    stream: &'a mut S,
    device: &'a D,
    export: &'a ExportName,
    shutting_down: bool,
    tls: TlsPolicy<'a>,
    no_zeroes: bool,
    structured_replies: bool,
    base_allocation: bool,
}

/// Runs the handshake on a fresh connection.
pub(crate) async fn negotiate<S, D>(stream: &mut S, at: Setting<'_, D>) -> Result<Outcome, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18]
        .copy_from_slice(&(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client = stream.read_u32().await?;
    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
    if client & !known != 0 {
        return Err(Error::Protocol(format!("unknown client flags {client:#x}")));
    }
    if client & client_flags::FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol("client does not speak fixed newstyle".into()));
    }
    let resume = Resume { no_zeroes: client & client_flags::NO_ZEROES != 0, options_left: MAX_OPTIONS };
    haggle(stream, at, resume).await
}

/// Goes on haggling after STARTTLS, over the TLS stream, from a clean state.
pub(crate) async fn resume<S, D>(stream: &mut S, at: Setting<'_, D>, resume: Resume) -> Result<Outcome, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    haggle(stream, at, resume).await
}

async fn haggle<S, D>(stream: &mut S, at: Setting<'_, D>, resume: Resume) -> Result<Outcome, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let mut hs = Handshake {
        stream,
        device: at.device,
        export: at.export,
        shutting_down: at.shutting_down,
        tls: at.tls,
        no_zeroes: resume.no_zeroes,
        structured_replies: false,
        base_allocation: false,
    };
    for used in 1..=resume.options_left {
        if let Some(outcome) = hs.one_option().await? {
            return Ok(match outcome {
                Outcome::StartTls { acceptor, .. } => {
                    let resume =
                        Resume { no_zeroes: resume.no_zeroes, options_left: resume.options_left - used };
                    Outcome::StartTls { acceptor, resume }
                }
                other => other,
            });
        }
    }
    Err(Error::Protocol(format!("more than {MAX_OPTIONS} options")))
}

/// Reads a big-endian u32 at `at`, if present.
fn be_u32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
}

fn be_u16(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at + 2).map(|b| u16::from_be_bytes(b.try_into().expect("2 bytes")))
}

/// Parsed `GO`/`INFO` data: export name and requested info types.
fn parse_go(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let name_len = be_u32(data, 0)? as usize;
    if name_len > MAX_STRING_BYTES {
        return None;
    }
    let name = std::str::from_utf8(data.get(4..4 + name_len)?).ok()?;
    let count = be_u16(data, 4 + name_len)? as usize;
    if data.len() != 4 + name_len + 2 + 2 * count {
        return None;
    }
    let requests = (0..count).map(|i| be_u16(data, 6 + name_len + 2 * i)).collect::<Option<_>>()?;
    Some((name, requests))
}

/// Parsed `LIST_META_CONTEXT`/`SET_META_CONTEXT` data: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let name_len = be_u32(data, 0)? as usize;
    if name_len > MAX_STRING_BYTES {
        return None;
    }
    let name = std::str::from_utf8(data.get(4..4 + name_len)?).ok()?;
    let count = be_u32(data, 4 + name_len)? as usize;
    let mut at = 8 + name_len;
    // Each query takes at least 4 bytes, which bounds `count` by the data length.
    if count > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = be_u32(data, at)? as usize;
        if len > MAX_STRING_BYTES {
            return None;
        }
        queries.push(std::str::from_utf8(data.get(at + 4..at + 4 + len)?).ok()?);
        at += 4 + len;
    }
    (at == data.len()).then_some((name, queries))
}

impl<S, D> Handshake<'_, S, D>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    /// Handles one option; `Some` ends the handshake.
    async fn one_option(&mut self) -> Result<Option<Outcome>, Error> {
        let mut header = [0u8; 16];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Some(Outcome::Closed));
            }
            Err(e) => return Err(e.into()),
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(Error::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if len > MAX_OPTION_BYTES {
            if len > MAX_SKIPPED_OPTION_BYTES || option == opt::EXPORT_NAME {
                return Err(Error::Protocol(format!("option {option} with {len} bytes")));
            }
            let skipped =
                tokio::io::copy(&mut (&mut *self.stream).take(len.into()), &mut tokio::io::sink()).await?;
            if skipped != u64::from(len) {
                return Ok(Some(Outcome::Closed));
            }
            self.reply_error(option, rep::ERR_TOO_BIG, "option data too large").await?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await?;
        if self.shutting_down && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Ok(Some(Outcome::Closed));
            }
            self.reply_error(option, rep::ERR_SHUTDOWN, "server is shutting down").await?;
            return Ok(None);
        }
        if self.tls.required_now() && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                // No error reply exists for it: refusing means closing.
                tracing::info!("EXPORT_NAME before STARTTLS on a listener that requires TLS; closing");
                return Ok(Some(Outcome::Closed));
            }
            self.reply_error(option, rep::ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
                .await?;
            return Ok(None);
        }
        match option {
            opt::EXPORT_NAME => self.export_name(&data).await,
            opt::ABORT => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = self.reply(option, rep::ACK, &[]).await;
                Ok(Some(Outcome::Closed))
            }
            opt::LIST => self.list(&data).await.map(|()| None),
            opt::STARTTLS if data.is_empty() => self.starttls().await,
            opt::INFO | opt::GO => self.info_or_go(option, &data).await,
            opt::STRUCTURED_REPLY => self.structured_reply(&data).await.map(|()| None),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, &data).await.map(|()| None)
            }
            opt::STARTTLS => {
                self.reply_error(option, rep::ERR_INVALID, "STARTTLS takes no data").await?;
                Ok(None)
            }
            _ => {
                self.reply_error(option, rep::ERR_UNSUP, "option not supported").await?;
                Ok(None)
            }
        }
    }

    /// STARTTLS with empty data: acknowledged when TLS is offered and an acceptor
    /// could be made; the caller then runs the TLS handshake.
    async fn starttls(&mut self) -> Result<Option<Outcome>, Error> {
        let option = opt::STARTTLS;
        if self.tls.active {
            self.reply_error(option, rep::ERR_INVALID, "TLS is already on").await?;
            return Ok(None);
        }
        let source = match self.tls.source {
            Some(source) if self.tls.mode != crate::tls::TlsMode::Off => source,
            _ => {
                self.reply_error(option, rep::ERR_POLICY, "TLS is not enabled on this server").await?;
                return Ok(None);
            }
        };
        match source() {
            Ok(acceptor) => {
                self.reply(option, rep::ACK, &[]).await?;
                let resume = Resume { no_zeroes: self.no_zeroes, options_left: 0 };
                Ok(Some(Outcome::StartTls { acceptor, resume }))
            }
            Err(why) => {
                tracing::warn!("STARTTLS refused: cannot set up TLS: {why}");
                let msg = format!("TLS is not available: {why}");
                self.reply_error(option, rep::ERR_POLICY, &msg).await?;
                Ok(None)
            }
        }
    }

    async fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) -> Result<(), Error> {
        let len = u32::try_from(payload.len()).expect("option replies are small");
        let mut out = Vec::with_capacity(20 + payload.len());
        out.extend_from_slice(&encode_option_reply(option, reply_type, len));
        out.extend_from_slice(payload);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) -> Result<(), Error> {
        debug_assert!(rep::is_error(reply_type));
        self.reply(option, reply_type, message.as_bytes()).await
    }

    fn is_our_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Option<Outcome>, Error> {
        // EXPORT_NAME has no error path: refusing means closing.
        let name = String::from_utf8_lossy(data);
        if !self.is_our_export(&name) {
            tracing::info!(export = %name, "EXPORT_NAME for an unknown export; closing");
            return Ok(Some(Outcome::Closed));
        }
        if let Err(why) = self.device.check_open() {
            tracing::info!(reason = %why, "EXPORT_NAME refused; closing");
            return Ok(Some(Outcome::Closed));
        }
        let info = self.device.export_info();
        let mut out = Vec::with_capacity(10 + 124);
        out.extend_from_slice(&info.size_bytes.to_be_bytes());
        out.extend_from_slice(&info.transmission_flags().to_be_bytes());
        if !self.no_zeroes {
            out.resize(out.len() + 124, 0);
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(Some(Outcome::Transmission(self.negotiated(info))))
    }

    fn negotiated(&self, info: ExportInfo) -> Negotiated {
        Negotiated {
            structured_replies: self.structured_replies,
            base_allocation: self.base_allocation,
            info,
        }
    }

    async fn list(&mut self, data: &[u8]) -> Result<(), Error> {
        if !data.is_empty() {
            return self.reply_error(opt::LIST, rep::ERR_INVALID, "LIST takes no data").await;
        }
        let name = self.export.name.clone();
        let mut payload = Vec::with_capacity(4 + name.len());
        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
        payload.extend_from_slice(name.as_bytes());
        if let Some(d) = &self.export.description {
            payload.extend_from_slice(d.as_bytes());
        }
        self.reply(opt::LIST, rep::SERVER, &payload).await?;
        self.reply(opt::LIST, rep::ACK, &[]).await
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Outcome>, Error> {
        let Some((name, requests)) = parse_go(data) else {
            self.reply_error(option, rep::ERR_INVALID, "malformed INFO/GO data").await?;
            return Ok(None);
        };
        if !self.is_our_export(name) {
            let msg = format!("no export named {name:?}; this server exports {:?}", self.export.name);
            self.reply_error(option, rep::ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        }
        if let Err(why) = self.device.check_open() {
            self.reply_error(option, rep::ERR_POLICY, &why).await?;
            return Ok(None);
        }
        let info = self.device.export_info();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&info::EXPORT.to_be_bytes());
        export.extend_from_slice(&info.size_bytes.to_be_bytes());
        export.extend_from_slice(&info.transmission_flags().to_be_bytes());
        self.reply(option, rep::INFO, &export).await?;
        for request in requests {
            let payload = match request {
                info::NAME => Some(self.export.name.clone()),
                info::DESCRIPTION => self.export.description.clone(),
                _ => None,
            };
            if let Some(text) = payload {
                let mut p = request.to_be_bytes().to_vec();
                p.extend_from_slice(text.as_bytes());
                self.reply(option, rep::INFO, &p).await?;
            } else if request == info::BLOCK_SIZE {
                let mut p = info::BLOCK_SIZE.to_be_bytes().to_vec();
                p.extend_from_slice(&info.min_block_bytes.to_be_bytes());
                p.extend_from_slice(&info.preferred_block_bytes.to_be_bytes());
                p.extend_from_slice(&info.max_payload_bytes.to_be_bytes());
                self.reply(option, rep::INFO, &p).await?;
            }
            // Unknown info requests are ignored, as the spec requires.
        }
        self.reply(option, rep::ACK, &[]).await?;
        if option == opt::GO {
            return Ok(Some(Outcome::Transmission(self.negotiated(info))));
        }
        Ok(None)
    }

    async fn structured_reply(&mut self, data: &[u8]) -> Result<(), Error> {
        let option = opt::STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.reply_error(option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data").await;
        }
        if self.structured_replies {
            return self.reply_error(option, rep::ERR_INVALID, "structured replies already on").await;
        }
        self.structured_replies = true;
        self.reply(option, rep::ACK, &[]).await
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), Error> {
        let set = option == opt::SET_META_CONTEXT;
        if set && !self.structured_replies {
            let msg = "SET_META_CONTEXT needs structured replies first";
            return self.reply_error(option, rep::ERR_INVALID, msg).await;
        }
        let Some((name, queries)) = parse_meta(data) else {
            return self.reply_error(option, rep::ERR_INVALID, "malformed meta context data").await;
        };
        if !self.is_our_export(name) {
            let msg = format!("no export named {name:?}");
            return self.reply_error(option, rep::ERR_UNKNOWN, &msg).await;
        }
        // LIST with no queries, or a bare "base:" namespace query, lists everything
        // in the namespace; SET selects only exact names. Other namespaces are ignored.
        let matches = if set {
            queries.contains(&BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == BASE_ALLOCATION || *q == "base:")
        };
        if set {
            self.base_allocation = matches;
        }
        if matches {
            let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            p.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &p).await?;
        }
        self.reply(option, rep::ACK, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_data_parses_exactly() {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"r0");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_go(&d), Some(("r0", vec![info::BLOCK_SIZE])));
        d.push(0);
        assert_eq!(parse_go(&d), None, "trailing byte");
        assert_eq!(parse_go(&[0, 0, 0, 9, b'a']), None, "name longer than data");
        assert_eq!(parse_go(&[]), None);
    }

    #[test]
    fn meta_data_parses_exactly() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(parse_meta(&d), Some(("", vec!["base:allocation", "qemu:dirty-bitmap:x"])));
        d.pop();
        assert_eq!(parse_meta(&d), None);
        // A huge query count with no data behind it is rejected without allocating.
        let mut bogus = 0u32.to_be_bytes().to_vec();
        bogus.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta(&bogus), None);
    }
}
