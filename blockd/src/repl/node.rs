//! Running one node of a replicated resource (`blockd run` with a peer in the
//! config): metadata, storage, the core task, the NBD server (which refuses clients
//! while Secondary), the control socket and the peer supervisor; and an orderly stop.
//!
//! `attach-disk` restarts the node inside the daemon process: once the core task
//! accepted it (a Secondary whose disk is Diskless) and the disk's metadata opens,
//! belongs to this node and takes a write, the node stops as for `down` (nothing is
//! written to the detached disk), [`run`] returns [`NodeExit::AttachDisk`], and the
//! daemon calls [`run`] again, which starts from the disk's metadata as `blockd run`
//! does (repaired in place, or replaced and `create-md`'d). The PID stays, so a
//! supervisor (systemd, Pacemaker) sees no restart; the control socket, the NBD and
//! metrics listeners are closed and bound again, the peer link is dropped and dialed
//! again (the connect decision picks a bitmap or full resync from the generations),
//! and the metrics' counters start from zero.

use std::sync::Arc;

use anyhow::Context;
use nbd_server::Server;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, NodeConfig, ResyncRate};
use crate::control::{self, Reply};
use crate::meta::{MetaError, MetaStore, MetaTarget};
use crate::peer::dial::{PeerSettings, spawn_supervisor};
use crate::peer::msg::Hello;
use crate::repl::core::{Core, CoreConfig};
use crate::repl::shell::{CoreTask, HELLO_CRASHED_PRIMARY, Input, Token, new_device, new_shared, new_sink};
use crate::state::{DiskState, Role};
use crate::storage::{IoOp, Storage, StorageOptions};

/// How long a stopping Primary waits for the peer to confirm its last writes.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long `attach-disk` waits for the detached disk's metadata to be closed by
/// this node (its last update may still be running).
const META_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a node's run ended.
#[derive(Debug)]
pub enum NodeExit {
    /// For good: a signal or `blockctl down`.
    Stopped,
    /// For `attach-disk`: run again; `reply` answers the request once the node runs.
    AttachDisk(Reply),
}

/// Runs the node until `stop` turns true (signals, or `blockctl down` through the
/// control socket, which sets it too), or until `attach-disk` stopped it to start it
/// again. `attached`: the `attach-disk` request this start answers (taken once the
/// node runs; left for the caller when the start fails).
pub async fn run(
    config: Config,
    node: NodeConfig,
    peer: NodeConfig,
    storage_opts: StorageOptions,
    stop: watch::Sender<bool>,
    attached: &mut Option<Reply>,
) -> anyhow::Result<NodeExit> {
    let target = MetaTarget { backing: node.disk.clone(), location: node.meta.clone() };
    let mut meta = MetaStore::open(&target)?;
    meta.verify_identity(&config.resource.name, &node.name)?;
    let crate::repl::recover::Recovered { superblock: sb, size_bytes, crashed_primary, bitmap } =
        crate::repl::recover::recover(&mut meta, config.resource.al_extents, config.resource.size_bytes)?;
    let meta = Arc::new(std::sync::Mutex::new(Some(meta)));

    let metrics = Arc::new(crate::metrics::Metrics::default());
    let (sink, inputs_tx, inputs_rx) = new_sink(metrics.clone());
    let storage = Arc::new(
        Storage::open(&node.disk, &storage_opts, sink)
            .with_context(|| format!("cannot open disk {}", node.disk.display()))?,
    );
    let shared = new_shared(&node.name, &peer.name);
    let device =
        Arc::new(new_device(storage.clone(), inputs_tx.clone(), shared.clone(), size_bytes, metrics.clone()));

    let r = &config.resource;
    let cfg = CoreConfig {
        protocol: r.protocol,
        send_buffer_bytes: r.send_buffer_bytes,
        granularity_bytes: sb.bitmap_granularity_bytes,
        size_bytes,
        al_extents: r.al_extents,
        resync_rate_bytes_per_sec: match r.resync_rate {
            ResyncRate::Auto => None,
            ResyncRate::Fixed { bytes_per_sec } => Some(bytes_per_sec),
        },
        resync_min_rate_bytes_per_sec: r.resync_min_rate_bytes_per_sec,
        resync_checksum: r.resync_checksum,
        fence_peer: node.handlers.fence_peer.is_some(),
        name_sorts_first: node.name < peer.name,
        on_io_error: r.on_io_error,
        ack_timeout_ms: r.ack_timeout_ms,
        pull_ahead_fill_bytes: (r.on_congestion == crate::config::CongestionPolicy::PullAhead)
            .then_some(r.congestion_fill_bytes),
        bugs: Default::default(),
    };
    if crashed_primary {
        tracing::warn!("this node crashed while Primary; its hot extents are resynced with the peer");
    }
    // A node always starts as Secondary, as with `drbdadm up`.
    let seed = crate::meta::random_id().context("cannot read random bytes for generation ids")?;
    let mut core = Core::new(cfg, Role::Secondary, sb.disk, sb.generations, crashed_primary, bitmap, seed);
    // A sync target that stopped mid-catch-up keeps its fallback image.
    let (undo, fallback) = crate::repl::shell::CatchUpJournal::at_start(
        &node.undo_dir,
        &config.resource.name,
        &node.disk,
        config.resource.undo_size_bytes,
        size_bytes,
        u32::try_from(sb.bitmap_granularity_bytes).unwrap_or(u32::MAX),
        sb.disk == crate::state::DiskState::Inconsistent,
    );
    core.set_fallback(fallback);

    let hello = Hello {
        version: crate::peer::msg::PROTOCOL_VERSION,
        features: crate::peer::msg::local_features(&config.resource),
        resource: config.resource.name.clone(),
        node: node.name.clone(),
        size_bytes,
        granularity_bytes: u32::try_from(sb.bitmap_granularity_bytes).unwrap_or(u32::MAX),
        protocol: config.resource.protocol,
        role: Role::Secondary,
        disk: sb.disk,
        gens: sb.generations,
        flags: if crashed_primary { HELLO_CRASHED_PRIMARY } else { 0 },
    };
    let (hello_tx, hello_rx) = watch::channel(hello);

    let listeners = crate::daemon::bind_nbd(&node).await?;
    let server = Server::new(device.clone(), crate::daemon::nbd_server_config(&config, &node)?);
    // Buffers for a kernel client's requests exist before memory gets short.
    server.pool().prefill_for_kernel_client();
    let nbd_clients = server.stats();
    let disconnector = server.disconnector();

    let (control_tx, control_rx) = mpsc::channel(16);
    let (attach_tx, mut attach_rx) = mpsc::channel(1);
    let (core_stop_tx, core_stop_rx) = watch::channel(false);
    let (events_tx, events_rx) = crate::events::event_channel(crate::events::EventSnapshot::default());
    let event_source = control::EventSource {
        feed: events_rx,
        names: crate::events::Names { resource: config.resource.name.clone(), peer: peer.name.clone() },
    };
    let control_task = control::spawn(
        &node.control,
        node.control_group.as_deref(),
        control_tx.clone(),
        event_source,
        core_stop_rx.clone(),
    )
    .with_context(|| format!("cannot create control socket {}", node.control.display()))?;

    let (conns_tx, conns_rx) = mpsc::channel(1);
    let (link_enabled_tx, link_enabled_rx) = watch::channel(true);
    let mut settings =
        PeerSettings::new(&node.name, &peer.name, node.replication.clone(), peer.replication.clone());
    settings.enabled = Some(link_enabled_rx);
    settings.secret = config.resource.shared_secret.clone();
    settings.tls = config.peer_tls(&node.name);
    settings.set_wan(&config.resource);
    let peer_stats = Arc::new(crate::peer::PeerStats::default());
    let metrics_task = match &node.metrics {
        Some(addr) => {
            let sources = crate::metrics::Sources {
                resource: config.resource.name.clone(),
                node: node.name.clone(),
                metrics: metrics.clone(),
                nbd: nbd_clients.clone(),
                peer: peer_stats.clone(),
            };
            let addr = addr.to_string();
            Some(
                crate::metrics::spawn(&addr, sources, core_stop_rx.clone())
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            )
        }
        None => None,
    };
    let supervisor = spawn_supervisor(
        settings,
        hello_rx,
        nbd_server::buf::BufPool::default(),
        peer_stats.clone(),
        conns_tx,
        core_stop_rx.clone(),
    );

    let task = CoreTask {
        core,
        storage: storage.clone(),
        inputs: inputs_rx,
        inputs_tx: inputs_tx.clone(),
        conns: conns_rx,
        control: control_rx,
        meta: meta.clone(),
        shared,
        hello: hello_tx,
        link_enabled: link_enabled_tx,
        events: events_tx,
        metrics: metrics.clone(),
        handlers: node.handlers.clone(),
        nbd_clients,
        peer_stats,
        disconnector,
        control_tx,
        resource: config.resource.name.clone(),
        shutdown: core_stop_rx,
        stop_daemon: stop.clone(),
        attach_disk: attach_tx,
        undo,
    };
    tracing::info!(
        resource = %config.resource.name, node = %node.name, peer = %peer.name, size_bytes,
        disk = %sb.disk, "node up as Secondary"
    );
    let inputs_for_drain = inputs_tx;
    let mut core_task = tokio::spawn(task.run());
    if let Some(reply) = attached.take() {
        tracing::info!(disk = %sb.disk, "attach-disk: the node runs again with its disk");
        let _ = reply.send(Ok(serde_json::json!({ "disk": sb.disk.as_str() })));
    }
    // The node stops on the daemon's stop, or for `attach-disk`.
    let (node_stop, _) = watch::channel(false);
    let serve = server.serve(listeners, node_stop.subscribe());
    tokio::pin!(serve);
    let mut daemon_stop = stop.subscribe();
    let mut attach = None;
    loop {
        tokio::select! {
            _ = &mut serve => break,
            // The core ends on its own only if it failed.
            ended = &mut core_task => core_failed(ended),
            _ = daemon_stop.wait_for(|s| *s), if !*node_stop.borrow() => {
                node_stop.send_replace(true);
            }
            Some(reply) = attach_rx.recv(), if !*node_stop.borrow() => {
                let (config, node, target) = (config.clone(), node.clone(), target.clone());
                match tokio::task::spawn_blocking(move || check_attach(config, node, target)).await {
                    Ok(Ok(())) => {
                        tracing::info!("attach-disk: stopping the node to start it again with its disk");
                        attach = Some(reply);
                        node_stop.send_replace(true);
                    }
                    Ok(Err(why)) => drop(reply.send(Err(why))),
                    Err(e) => drop(reply.send(Err(format!("checking the disk failed: {e}")))),
                }
            }
        }
    }
    drop(attach_rx);
    // NBD clients are gone. Before the core stops, every write must be on the peer
    // too (protocol A may still have frames queued); bounded, since the peer may be
    // gone or slow.
    let (done_tx, done_rx) = oneshot::channel();
    if inputs_for_drain.send(Input::Drain { done: done_tx }).is_ok()
        && tokio::time::timeout(DRAIN_TIMEOUT, done_rx).await.is_err()
    {
        tracing::warn!("the peer did not confirm the last writes within {DRAIN_TIMEOUT:?}");
    }
    core_stop_tx.send_replace(true);
    let core = core_task.await;
    let _ = supervisor.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = control_task.await;

    if let Some(reply) = attach {
        if *stop.borrow() {
            let _ = reply.send(Err("the daemon is stopping".into()));
        } else {
            // Nothing was written to the detached disk. The engine threads are
            // joined off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || drop(storage)).await;
            return Ok(NodeExit::AttachDisk(reply));
        }
    }
    if let Ok(core) = &core
        && let Some(failure) = core.disk_failure()
    {
        // Detached: nothing more is written to that disk, not even a flush. Its
        // metadata says Outdated if the update after the failure went through;
        // either way the next start recovers as after a crash.
        anyhow::bail!("the local disk failed ({failure}) and was detached; shutdown not clean");
    }
    let (tx, rx) = oneshot::channel();
    storage.submit(IoOp::Flush, Token::Internal(tx));
    rx.await.unwrap_or(Err(nix::errno::Errno::EIO)).context("final flush of the backing store failed")?;
    let mut meta = meta.lock().map_err(|_| anyhow::anyhow!("metadata lock poisoned"))?;
    let meta = meta.as_mut().context("the metadata was closed, but the disk is attached")?;
    if let Ok(mut core) = core {
        // The bitmap on disk covers everything now; the activity log is not needed.
        meta.write_bitmap_blocks(&core.stop_dirty()).context("cannot write the bitmap at shutdown")?;
        meta.write_al(&[]).context("cannot clear the activity log at shutdown")?;
    } else {
        // The core task died: keep the activity log, and do not claim a clean stop.
        anyhow::bail!("the replication core task failed; shutdown not clean");
    }
    meta.update(|sb| sb.flags.clean_shutdown = true)
        .context("cannot record the clean shutdown in the metadata")?;
    tracing::info!("clean shutdown");
    Ok(NodeExit::Stopped)
}

/// Before `attach-disk` stops the node: the disk is there and fits the config, its
/// metadata opens (once this node closed it), belongs to this resource and node, and
/// takes a superblock write, so a disk that still fails is refused here with the
/// node still running. That write records the disk as at best Outdated: it may have
/// missed writes while detached, and the core's own update after the failure may
/// not have reached it (a disk failing its writes, internal metadata), so it could
/// still say UpToDate; it becomes UpToDate again only through a resync.
fn check_attach(config: Config, node: NodeConfig, target: MetaTarget) -> Result<(), String> {
    config.check_local(&node).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + META_CLOSE_TIMEOUT;
    let mut meta = loop {
        match MetaStore::open(&target) {
            Err(MetaError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e @ MetaError::NoMetadata { .. }) => {
                return Err(format!("{e}; a new disk needs `blockctl create-md --force` first"));
            }
            Err(e) => return Err(e.to_string()),
            Ok(meta) => break meta,
        }
    };
    meta.verify_identity(&config.resource.name, &node.name).map_err(|e| e.to_string())?;
    meta.update(|sb| sb.disk = sb.disk.min(DiskState::Outdated))
        .map_err(|e| format!("the disk's metadata cannot be written: {e}"))
}

/// The core task ended before the node was told to stop: it panicked (a bug). The
/// node stops at once (exit status 70) rather than staying up as a node that looks
/// alive: every request the core held is answered EIO as its responder is dropped,
/// nothing more is acknowledged, and the metadata is not marked clean, so the next
/// start recovers as after a crash. A supervisor (systemd's `Restart=`, Pacemaker's
/// monitor) restarts it.
fn core_failed(ended: Result<Core, tokio::task::JoinError>) -> ! {
    let why = match ended {
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into())
        }
        Err(e) => e.to_string(),
        Ok(_) => "it returned before the node was told to stop".into(),
    };
    tracing::error!(why = %why, "the replication core failed; the node stops now (exit status 70)");
    std::process::exit(70);
}
