//! The core task's answers to control-socket commands (`blockctl` verbs): role
//! changes (with the forced demotion's steps), connect/disconnect, the operator
//! commands the core decides, `attach-disk`'s checks, and the status object (SPEC
//! §8.1 fields).

use super::*;

impl Running {
    /// Hands a command to the core; `reply` is answered with its `Done`.
    fn core_command(
        &mut self,
        cmd: crate::repl::core::Command,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    ) {
        let id = self.next_cmd;
        self.next_cmd += 1;
        self.commands.insert(id, reply);
        let mut actions = Vec::new();
        self.t.core.handle_into(Event::Command { id, cmd }, &mut actions);
        self.execute(&mut actions);
        self.publish();
    }

    pub(super) fn control(&mut self, req: ControlRequest) {
        use crate::repl::core::Command as Core;
        let cmd = match req.command {
            Command::Status => {
                let _ = req.reply.send(Ok(self.status_json()));
                return;
            }
            Command::Down => {
                self.t.stop_daemon.send_replace(true);
                let _ = req.reply.send(Ok(serde_json::json!({})));
                return;
            }
            Command::DebugPanic => {
                if std::env::var_os("BLOCKD_DEBUG_COMMANDS").is_some_and(|v| v == "1") {
                    panic!("debug-panic requested on the control socket");
                }
                let _ =
                    req.reply.send(Err("debug commands are off (BLOCKD_DEBUG_COMMANDS=1 at start)".into()));
                return;
            }
            Command::Events { .. } => {
                let _ = req.reply.send(Err("events are served by the control socket itself".to_string()));
                return;
            }
            Command::Primary { force } => Core::Promote { force },
            Command::Secondary { force } => {
                // Refuse new clients first, then count the ones in transmission: a
                // client counts itself before it checks the export (both SeqCst), so
                // either it is counted here or it sees the flag and leaves.
                self.t.shared.demoting.store(true, Ordering::SeqCst);
                let clients = self.t.nbd_clients.transmission_connections.load(Ordering::SeqCst);
                if clients > 0 && force {
                    return self.force_demote(req.reply);
                }
                if clients > 0 {
                    self.t.shared.demoting.store(false, Ordering::SeqCst);
                    let e =
                        format!("{clients} NBD client(s) connected; disconnect them first or use --force");
                    let _ = req.reply.send(Err(e));
                    return;
                }
                return self.demote_now(req.reply);
            }
            // Clients counted now came in during their handshake and leave on their
            // own (the export check after GO), with no I/O done.
            Command::FinishForcedDemotion => return self.demote_now(req.reply),
            Command::Connect { discard_my_data } => Core::Connect { discard_my_data },
            Command::Disconnect => {
                // The link is the shell's: dropped here, the core is told it is down.
                Core::Disconnect
            }
            Command::Invalidate => Core::Invalidate,
            Command::InvalidateRemote => Core::InvalidateRemote,
            Command::PauseSync => Core::SetSyncPaused(true),
            Command::ResumeSync => Core::SetSyncPaused(false),
            Command::Verify { repair } => Core::Verify { repair },
            Command::DetachDisk => Core::DetachDisk,
            Command::AttachDisk => return self.attach_disk(req.reply),
        };
        self.core_command(cmd, req.reply);
    }

    /// `attach-disk`: only a Secondary whose disk is Diskless (a Failed disk still
    /// has this node's ops on it). `repl::node` then checks the disk's metadata and
    /// restarts the node in this process; the reply comes from there.
    fn attach_disk(&mut self, reply: Reply) {
        let (role, disk) = (self.t.core.role(), self.t.core.disk());
        let refusal = match (role, disk) {
            (Role::Primary, _) => Some(format!(
                "this node is Primary (disk {disk}): attach-disk restarts the node; \
                 move the Primary role first (`secondary` here, `primary` on the peer)"
            )),
            (_, DiskState::Diskless) => None,
            (_, DiskState::Failed) => Some(
                "the disk is Failed: this node's I/O on it has not finished yet; \
                 retry once it is Diskless (status)"
                    .to_string(),
            ),
            (_, disk) => Some(format!(
                "the disk is attached ({disk}); attach-disk brings back a detached disk \
                 (`detach-disk` first to replace it)"
            )),
        };
        if let Some(why) = refusal {
            let _ = reply.send(Err(why));
            return;
        }
        if let Err(e) = self.t.attach_disk.try_send(reply) {
            let reply = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            let _ = reply.send(Err("an attach-disk is in progress already".into()));
        }
    }

    /// Demotes with no client in transmission and new ones refused (`demoting`);
    /// the flag is cleared only once the role says Secondary (or the demotion was
    /// refused), so no client is accepted in between and then has its writes refused
    /// as a Secondary's, failing its filesystem. The role is published (`publish`,
    /// after the core handled the command) before the flag is cleared.
    fn demote_now(&mut self, reply: oneshot::Sender<Result<serde_json::Value, String>>) {
        self.core_command(crate::repl::core::Command::Demote, reply);
        self.t.shared.demoting.store(false, Ordering::SeqCst);
    }

    /// `secondary --force` with clients connected: close them (each answers what it
    /// has in flight first), wait until they are gone (bounded), flush locally and on
    /// the peer, then demote as usual.
    fn force_demote(&mut self, reply: oneshot::Sender<Result<serde_json::Value, String>>) {
        tracing::info!("secondary --force: disconnecting NBD clients");
        self.t.shared.demoting.store(true, Ordering::SeqCst);
        self.t.disconnector.disconnect_all();
        let clients = self.t.nbd_clients.clone();
        let shared = self.t.shared.clone();
        let inputs = self.t.inputs_tx.clone();
        let control = self.t.control_tx.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + FORCE_DEMOTE_TIMEOUT;
            while clients.transmission_connections.load(Ordering::SeqCst) > 0 {
                if tokio::time::Instant::now() >= deadline {
                    shared.demoting.store(false, Ordering::SeqCst);
                    let _ = reply.send(Err("NBD clients did not disconnect in time; retry".into()));
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let (done_tx, done_rx) = oneshot::channel();
            if inputs.send(Input::Drain { done: done_tx }).is_ok() {
                let _ = tokio::time::timeout(FORCE_DEMOTE_TIMEOUT, done_rx).await;
            }
            let again = ControlRequest { command: Command::FinishForcedDemotion, reply };
            let _ = control.send(again).await;
        });
    }

    pub(super) fn status_json(&self) -> serde_json::Value {
        let dirty = self.t.core.dirty_bytes();
        let p = self.t.core.resync_progress();
        let v = self.t.core.verify_status();
        let (al_hot_extents, al_transactions) = self.t.core.al_stats();
        let (connection, refusal) = self.t.core.connection();
        let (peer_role, peer_disk) = self.t.core.peer_view();
        let link = self.t.peer_stats.snapshot();
        serde_json::json!({
            "resource": self.t.resource,
            "pid": std::process::id(),
            "node": self.t.shared.local_name,
            "role": self.t.core.role().as_str(),
            "disk": self.t.core.disk().as_str(),
            "peers": [{
                "node": self.t.shared.peer_name,
                "connection": connection.as_str(),
                "replication": self.replication_name(),
                "resync_paused": self.t.core.sync_paused(),
                "role": peer_role.map_or("Unknown", Role::as_str),
                "disk": peer_disk.map_or("DUnknown", DiskState::as_str),
                "out_of_sync_bytes": dirty,
                "resync_done_bytes": p.done_bytes,
                "resync_total_bytes": p.total_bytes,
                "replicated_bytes": self.t.core.replicated_bytes(),
                "resync_sent_bytes": p.sent_bytes,
                "sent_wire_bytes": link.sent_wire_bytes,
                "sent_uncompressed_bytes": link.sent_uncompressed_bytes,
                "compression": if link.compressing { "zstd" } else { "off" },
                "resync_rate_bytes_per_sec": p.rate_bytes_per_sec,
                "resync_eta_secs": p.eta_secs,
                "verify_running": v.running,
                "verify_done_bytes": v.done_bytes,
                "verify_total_bytes": v.total_bytes,
                "verify_out_of_sync_bytes": v.out_of_sync_bytes,
                "reason": refusal,
            }],
            "al_hot_extents": al_hot_extents,
            "al_transactions": al_transactions,
            "fencing_peer": self.t.core.fencing().0,
            "last_fence_result": self.t.core.fencing().1.map(|r| match r {
                Ok(code) => serde_json::json!({ "exit_code": code }),
                Err(e) => serde_json::json!({ "error": e }),
            }),
            "generations": {
                "current": format!("{:016x}", self.t.core.generations().current),
                "bitmap": format!("{:016x}", self.t.core.generations().bitmap),
            },
            "unsent_bytes": self.t.core.unsent_bytes(),
            "disk_error": self.t.core.disk_failure().map(|f| f.to_string()),
            "disk_failure": self.t.core.disk_failure().map(|f| serde_json::json!({
                "op": f.op,
                "errno": f.errno,
                "errno_name": f.errno.map(|e| nix::errno::Errno::from_raw(e).to_string()),
                "offset": f.offset,
            })),
            "io_errors": self.t.core.io_errors(),
            "ack_timeouts": self.t.core.ack_timeouts(),
            "pull_aheads": self.t.core.ahead_count(),
            // A catching-up target: whether the image from before the resync can
            // be rolled back to (`primary --force` does), and its undo journal.
            "fallback_image": self.t.core.fallback(),
            "fallback_lost": self.t.core.fallback_lost(),
            "undo_journal": self.t.undo.status().map(|(preserved_bytes, used_bytes)| serde_json::json!({
                "preserved_bytes": preserved_bytes,
                "used_bytes": used_bytes,
                "capacity_bytes": self.t.undo.capacity_bytes(),
            })),
        })
    }
}
