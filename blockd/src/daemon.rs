//! `blockd run`: opens the local node's backing store, serves it over NBD on the
//! node's addresses, and shuts down gracefully on SIGTERM/SIGINT (stop accepting,
//! finish in-flight requests, flush, exit 0).

use std::sync::Arc;

use anyhow::{Context, bail};
use nbd_server::{Listener, Server, ServerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{Config, ListenAddr, NodeConfig};
use crate::device::{LocalDevice, ReplySink};
use crate::safety::{IoPathSafety, protect_io_path};
use crate::storage::{EngineKind, Storage, StorageOptions};
use crate::systemd::{Notifier, Probe};

/// Options of `blockd run` beyond the config file.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub engine: EngineKind,
}

/// Runs the node until a termination signal; errors carry the context an operator
/// needs (which file, which address). A resource with a peer in its config runs
/// replicated (it needs metadata: `blockctl create-md`); a resource with one node is
/// a standalone export of the whole disk.
pub async fn run(config: Config, node: NodeConfig, opts: RunOptions) -> anyhow::Result<()> {
    let storage_opts = StorageOptions { engine: opts.engine, ..StorageOptions::default() };
    let stop = stop_on_signals()?;
    protect_io_path_logged(&node);
    let peer = config.peers(&node.name).next().cloned();
    if let Some(peer) = peer {
        // Read now so that unusable files stop the start; read again per connection.
        if let Some(files) = config.peer_tls(&node.name) {
            crate::peer::tls::check_files(&files, &peer.name)
                .with_context(|| format!("node {}: cannot use TLS on the peer link", node.name))?;
            tracing::info!(node = %node.name, peer = %peer.name, "peer link: mutual TLS 1.3");
        }
        // Ready once the control socket answers: the supervisor probes it.
        let systemd = notify_systemd(Probe::Control(node.control.clone()), &stop);
        let result = run_node(config, node, peer, storage_opts, stop).await;
        if let Some(task) = systemd {
            task.abort();
        }
        return result;
    }
    let storage = Storage::open(&node.disk, &storage_opts, Arc::new(ReplySink))
        .with_context(|| format!("cannot open disk {}", node.disk.display()))?;
    let backing_bytes = storage.size_bytes();
    let size_bytes = match config.resource.size_bytes {
        Some(size) if size > backing_bytes => bail!(
            "{}: resource.size is {size} bytes but disk {} holds only {backing_bytes}",
            config.path.display(),
            node.disk.display()
        ),
        Some(size) => size,
        None => backing_bytes,
    };
    let device = Arc::new(LocalDevice::new(storage, size_bytes));

    let listeners = bind_nbd(&node).await?;
    let uris: Vec<String> =
        listeners.iter().map(|l| nbd_uri(&l.local_addr(), &config.resource.name)).collect();
    tracing::info!(
        resource = %config.resource.name,
        node = %node.name,
        size_bytes,
        engine = device.engine_name(),
        "standalone Primary serving {}",
        uris.join(" ")
    );

    let server = Server::new(device.clone(), nbd_server_config(&config, &node)?);
    server.pool().prefill_for_kernel_client();
    let control = crate::standalone::spawn_control(&config.resource.name, &node, &stop)
        .with_context(|| format!("cannot create control socket {}", node.control.display()))?;
    let systemd = notify_systemd(Probe::Control(node.control.clone()), &stop);
    server.serve(listeners, stop.subscribe()).await;
    if let Some(task) = systemd {
        let _ = task.await;
    }
    let _ = control.await;
    device.flush().await.context("final flush of the backing store failed")?;
    tracing::info!("clean shutdown");
    Ok(())
}

/// A replicated node, started again in this process after each `attach-disk`
/// (see [`crate::repl::node`]). A start that fails ends the daemon, and the
/// `attach-disk` waiting for it is told why.
async fn run_node(
    config: Config,
    node: NodeConfig,
    peer: NodeConfig,
    storage_opts: StorageOptions,
    stop: watch::Sender<bool>,
) -> anyhow::Result<()> {
    use crate::repl::node::NodeExit;
    let mut attached = None;
    loop {
        let run = crate::repl::node::run(
            config.clone(),
            node.clone(),
            peer.clone(),
            storage_opts.clone(),
            stop.clone(),
            &mut attached,
        );
        match run.await {
            Ok(NodeExit::Stopped) => return Ok(()),
            Ok(NodeExit::AttachDisk(reply)) => attached = Some(reply),
            Err(e) => {
                if let Some(reply) = attached.take() {
                    let _ = reply.send(Err(format!("the node could not start again: {e:#}; blockd exits")));
                }
                return Err(e);
            }
        }
    }
}

/// Under systemd (`$NOTIFY_SOCKET`): readiness, watchdog and stop notifications
/// ([`crate::systemd::supervise`]); ends at the stop signal.
fn notify_systemd(probe: Probe, stop: &watch::Sender<bool>) -> Option<tokio::task::JoinHandle<()>> {
    match Notifier::from_env()? {
        Ok(notifier) => Some(tokio::spawn(crate::systemd::supervise(notifier, probe, stop.subscribe()))),
        Err(e) => {
            tracing::warn!("NOTIFY_SOCKET is set but unusable: {e}");
            None
        }
    }
}

/// A kernel NBD client on this host (`blockctl attach`) puts blockd in the block
/// I/O path: see [`crate::safety`]. Failures are logged, not fatal.
fn protect_io_path_logged(node: &NodeConfig) {
    let settings = IoPathSafety { mlock: node.mlock, oom_score_adj: Some(node.oom_score_adj) };
    for warning in protect_io_path(settings) {
        tracing::warn!("I/O-path safety not applied: {warning}");
    }
}

/// The NBD server's settings for `node`: the export name, and TLS (`nbd-tls`) with
/// its files checked now, so a node whose files are unusable does not start.
pub fn nbd_server_config(config: &Config, node: &NodeConfig) -> anyhow::Result<ServerConfig> {
    let mut server = ServerConfig::new(&config.resource.name);
    server.tls = crate::tls::nbd_hook(&node.nbd_tls)
        .with_context(|| format!("node {}: cannot serve NBD over TLS", node.name))?;
    if let Some(tls) = &server.tls {
        tracing::info!(node = %node.name, tcp = ?tls.tcp, unix = ?tls.unix, "NBD TLS (STARTTLS)");
    }
    Ok(server)
}

/// Binds every NBD address of `node` (TCP or Unix).
pub async fn bind_nbd(node: &NodeConfig) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::with_capacity(node.nbd.len());
    for addr in &node.nbd {
        let listener = match addr {
            ListenAddr::Tcp(hp) => Listener::bind_tcp(&hp.to_string()).await,
            ListenAddr::Unix(path) => Listener::bind_unix(path),
        }
        .with_context(|| format!("node {}: cannot serve NBD", node.name))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A stop signal that SIGTERM or SIGINT raises.
fn stop_on_signals() -> anyhow::Result<watch::Sender<bool>> {
    let (stop_tx, _) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let tx = stop_tx.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        tx.send_replace(true);
    });
    Ok(stop_tx)
}

/// The NBD URI clients use for an address as printed by [`Listener::local_addr`].
pub fn nbd_uri(addr: &str, export: &str) -> String {
    match addr.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{export}?socket={path}"),
        None => format!("nbd://{addr}/{export}"),
    }
}
