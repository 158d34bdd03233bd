//! The core task's answers to control-socket commands (`blockctl` verbs): role
//! changes (with the forced demotion's steps), connect/disconnect, the operator
//! commands the core decides, and the status object (SPEC §8.1 fields).

use super::*;

impl Running {
    /// Runs a core request that may refuse; executes its actions.
    fn core_command(
        &mut self,
        f: impl FnOnce(&mut Core, bool) -> Result<Vec<Action>, String>,
    ) -> Result<serde_json::Value, String> {
        let peer_primary = self.peer.role == Some(Role::Primary);
        let actions = f(&mut self.t.core, peer_primary)?;
        self.execute(actions);
        self.publish();
        Ok(serde_json::json!({}))
    }

    pub(super) fn control(&mut self, req: ControlRequest) {
        let result = match req.command {
            Command::Status => Ok(self.status_json()),
            Command::Down => {
                self.t.stop_daemon.send_replace(true);
                Ok(serde_json::json!({}))
            }
            Command::Primary { force } => match self.t.core.promote(force, self.peer.role) {
                Ok(actions) => return self.after_role_change(actions, req.reply),
                Err(e) => Err(e),
            },
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
                    Err(format!("{clients} NBD client(s) connected; disconnect them first or use --force"))
                } else {
                    return self.demote_now(req.reply);
                }
            }
            Command::FinishForcedDemotion => {
                // Clients counted now came in during their handshake and leave on
                // their own (the export check after GO), with no I/O done.
                return self.demote_now(req.reply);
            }
            Command::Connect { discard_my_data } if discard_my_data && self.link.is_some() => {
                Err("already connected: --discard-my-data only resolves a split brain when connecting \
                 (the nodes refuse each other then and are StandAlone)"
                    .to_string())
            }
            Command::Connect { discard_my_data } => {
                self.set_standalone(false);
                self.t.core.set_discard_my_data(discard_my_data);
                if self.link.is_none() {
                    self.peer.connection = "Connecting";
                }
                Ok(serde_json::json!({}))
            }
            Command::Disconnect => {
                self.set_standalone(true);
                self.peer = PeerSnapshot {
                    connection: "StandAlone",
                    refusal: Some("disconnected by `blockctl disconnect`".into()),
                    ..PeerSnapshot::default()
                };
                self.t.shared.peer_role.store(0, Ordering::Release);
                if self.link.take().is_some() {
                    tracing::info!(peer = %self.t.shared.peer_name, "disconnected by the operator");
                    let mut actions = Vec::new();
                    self.t.core.handle_into(Event::PeerDown, &mut actions);
                    self.execute(actions);
                    self.publish();
                }
                Ok(serde_json::json!({}))
            }
            Command::Invalidate => self.core_command(|c, _| c.invalidate()),
            Command::InvalidateRemote => {
                self.core_command(|c, peer_primary| c.invalidate_remote(peer_primary))
            }
            Command::PauseSync => self.core_command(|c, _| Ok(c.set_sync_paused(true))),
            Command::ResumeSync => self.core_command(|c, _| Ok(c.set_sync_paused(false))),
            Command::Events { .. } => Err("events are served by the control socket itself".to_string()),
            Command::Verify { repair } => {
                if self.verify_reply.is_some() {
                    Err("a verify is already running".to_string())
                } else {
                    let peer_primary = self.peer.role == Some(Role::Primary);
                    match self.t.core.start_verify(repair, peer_primary) {
                        Ok(actions) => {
                            self.verify_reply = Some(req.reply);
                            self.execute(actions);
                            return;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        self.publish();
        let _ = req.reply.send(result);
    }

    /// Demotes with no client in transmission and new ones refused (`demoting`);
    /// the flag is cleared only once the role says Secondary (or the demotion was
    /// refused), so no client is accepted in between and then has its writes refused
    /// as a Secondary's, failing its filesystem.
    fn demote_now(&mut self, reply: oneshot::Sender<Result<serde_json::Value, String>>) {
        match self.t.core.demote() {
            Ok(actions) => self.after_role_change(actions, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
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

    /// Executes a role change's actions; replies once its persist is durable.
    fn after_role_change(
        &mut self,
        actions: Vec<Action>,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    ) {
        let seq = actions.iter().find_map(|a| match a {
            Action::Persist { seq, .. } => Some(*seq),
            _ => None,
        });
        self.execute(actions);
        let role = self.t.core.role();
        self.t.shared.role.store(role.code(), Ordering::Release);
        if let Some(link) = &self.link {
            let _ = link.outgoing.send(Message::State { role, disk: self.t.core.disk() });
        }
        self.publish();
        match seq {
            Some(seq) => self.waiting_durable.push((seq, reply)),
            None => {
                let _ = reply.send(Ok(serde_json::json!({})));
            }
        }
    }

    pub(super) fn status_json(&self) -> serde_json::Value {
        let dirty = self.t.core.dirty_bytes();
        let p = self.t.core.resync_progress();
        let v = self.t.core.verify_status();
        let (al_hot_extents, al_transactions) = self.t.core.al_stats();
        serde_json::json!({
            "resource": self.t.resource,
            "pid": std::process::id(),
            "node": self.t.shared.local_name,
            "role": self.t.core.role().as_str(),
            "disk": self.t.core.disk().as_str(),
            "peers": [{
                "node": self.t.shared.peer_name,
                "connection": self.peer.connection,
                "replication": self.replication_name(),
                "resync_paused": self.t.core.sync_paused(),
                "role": self.peer.role.map_or("Unknown", Role::as_str),
                "disk": self.peer.disk.map_or("DUnknown", DiskState::as_str),
                "out_of_sync_bytes": dirty,
                "resync_done_bytes": p.done_bytes,
                "resync_total_bytes": p.total_bytes,
                "replicated_bytes": self.t.core.replicated_bytes(),
                "resync_sent_bytes": p.sent_bytes,
                "resync_rate_bytes_per_sec": p.rate_bytes_per_sec,
                "resync_eta_secs": p.eta_secs,
                "verify_running": v.running,
                "verify_done_bytes": v.done_bytes,
                "verify_total_bytes": v.total_bytes,
                "verify_out_of_sync_bytes": v.out_of_sync_bytes,
                "reason": self.peer.refusal,
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
        })
    }
}
