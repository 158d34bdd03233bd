//! Finding the Primary: try every node's `nbd` address from the config in order,
//! negotiate the resource's export with the `nbd-server` crate's client handshake
//! (a Secondary refuses `NBD_OPT_GO`), and return the negotiated sockets in
//! blocking mode, ready to hand to the kernel.

use std::os::fd::OwnedFd;
use std::time::Duration;

use blockd::config::{Config, ListenAddr, NbdTlsMode};
use nbd_server::client::{ExportDetails, handshake};
use nbd_server::proto::tflags;
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Runtime;

/// How the client handshake reports `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &str = "TLS required";

/// One TCP connect (or Unix connect) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One handshake may take this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sockets negotiated with one node.
#[derive(Debug)]
pub struct Session {
    pub node: String,
    pub addr: String,
    pub details: ExportDetails,
    pub sockets: Vec<OwnedFd>,
}

/// A current-thread runtime: dialing is a handful of sequential handshakes, and a
/// process that forks (the attach resident) must not have runtime threads yet.
pub fn runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()
}

async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what} timed out after {limit:?}")),
    }
}

async fn open(addr: &ListenAddr, export: &str) -> Result<(ExportDetails, OwnedFd), String> {
    let blocking = |fd: OwnedFd| -> Result<OwnedFd, String> {
        // The kernel uses the socket as it is: blocking, like nbd-client's. (FIONBIO
        // works on any socket, Unix ones too.)
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(false).map_err(|e| e.to_string())?;
        Ok(std.into())
    };
    match addr {
        ListenAddr::Tcp(hp) => {
            let mut s =
                within(CONNECT_TIMEOUT, "connect", TcpStream::connect((hp.host.as_str(), hp.port))).await?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            let details = within(HANDSHAKE_TIMEOUT, "handshake", handshake(&mut s, export)).await?;
            Ok((details, blocking(s.into_std().map_err(|e| e.to_string())?.into())?))
        }
        ListenAddr::Unix(path) => {
            let mut s = within(CONNECT_TIMEOUT, "connect", UnixStream::connect(path)).await?;
            let details = within(HANDSHAKE_TIMEOUT, "handshake", handshake(&mut s, export)).await?;
            Ok((details, blocking(s.into_std().map_err(|e| e.to_string())?.into())?))
        }
    }
}

/// Negotiates `connections` sockets with the first node that serves the export.
/// `expect`: the size and flags a reconnect must find unchanged. The error lists
/// every address tried and why it failed.
pub fn primary(
    rt: &Runtime,
    config: &Config,
    connections: usize,
    expect: Option<&ExportDetails>,
) -> Result<Session, String> {
    let export = config.resource.name.as_str();
    let mut tried = Vec::new();
    let mut tls_only = false;
    for node in &config.nodes {
        for addr in &node.nbd {
            if !kernel_usable(node, addr) {
                // The kernel client speaks plain NBD only; the server would answer
                // every option with ERR_TLS_REQD.
                tried.push(format!("{} ({addr}): requires TLS (nbd-tls = \"require\")", node.name));
                tls_only = true;
                continue;
            }
            let first = rt.block_on(open(addr, export));
            let (details, sock) = match first {
                Ok(ok) => ok,
                Err(e) => {
                    tried.push(format!("{} ({addr}): {e}", node.name));
                    continue;
                }
            };
            if let Some(old) = expect
                && (old.size_bytes != details.size_bytes
                    || old.transmission_flags != details.transmission_flags)
            {
                tried.push(format!(
                    "{} ({addr}): exports {} bytes with flags {:#x}, but the device has {} bytes with flags {:#x}",
                    node.name, details.size_bytes, details.transmission_flags, old.size_bytes, old.transmission_flags
                ));
                continue;
            }
            if connections > 1 && details.transmission_flags & tflags::CAN_MULTI_CONN == 0 {
                return Err(format!(
                    "{} ({addr}) does not allow several connections (no CAN_MULTI_CONN); use --connections 1",
                    node.name
                ));
            }
            let mut sockets = vec![sock];
            while sockets.len() < connections {
                match rt.block_on(open(addr, export)) {
                    Ok((d, s)) if d == details => sockets.push(s),
                    Ok(_) => {
                        return Err(format!("{} ({addr}) changed its export between connections", node.name));
                    }
                    Err(e) => {
                        return Err(format!("{} ({addr}): connection {}: {e}", node.name, sockets.len() + 1));
                    }
                }
            }
            return Ok(Session { node: node.name.clone(), addr: addr.to_string(), details, sockets });
        }
    }
    let mut msg = format!("no node serves {export:?} (is one Primary?): {}", tried.join("; "));
    if tls_only || tried.iter().any(|t| t.contains(TLS_REQUIRED)) {
        msg.push_str(&format!(". {}", no_tls_hint(export)));
    }
    Err(msg)
}

/// Requires-TLS listeners are useless to the kernel client.
fn kernel_usable(node: &blockd::config::NodeConfig, addr: &ListenAddr) -> bool {
    !(matches!(addr, ListenAddr::Tcp(_)) && node.nbd_tls.mode == NbdTlsMode::Require)
}

/// `None` if some node has an `nbd` listener the kernel client can use; else why not.
pub fn tls_only(config: &Config) -> Option<String> {
    let usable = config.nodes.iter().any(|n| n.nbd.iter().any(|a| kernel_usable(n, a)));
    (!usable).then(|| {
        format!(
            "every nbd listener of {} requires TLS (nbd-tls = \"require\"). {}",
            config.resource.name,
            no_tls_hint(&config.resource.name)
        )
    })
}

fn no_tls_hint(export: &str) -> String {
    format!(
        "The kernel NBD client cannot use TLS: give the Primary a plaintext Unix-socket listener (nbd-tls \
         applies to TCP listeners only), e.g. nbd = [\"unix:/run/blockd/{export}.nbd\", \"0.0.0.0:10809\"], \
         and attach on that host"
    )
}
