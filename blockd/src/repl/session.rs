//! The peer session and operator commands, as part of the [`Core`] (a child
//! module): a link coming up (the connect decision) or going down, the peer's
//! announced role and disk, the StandAlone policy, and the `blockctl` verbs the core
//! decides, each answered by `Action::Done` (after the metadata it changed is
//! durable, where it changed any).

use super::*;

impl Core {
    /// The link is gone (lost, or closed by the peer).
    pub(super) fn on_link_down(&mut self, out: &mut Vec<Action>) {
        self.peer_role = None;
        self.peer_disk = None;
        if self.conn == ConnState::Connected {
            self.conn = ConnState::Connecting;
        }
        self.twophase_link_lost(out);
        if self.negotiation.is_some() {
            return self.abort_negotiation(out);
        }
        self.on_peer_down(out);
    }

    /// Tells the peer this node's role and disk state (after a change).
    pub(super) fn announce_state(&mut self, out: &mut Vec<Action>) {
        if self.link == Link::Replicating {
            self.send(Message::State { role: self.role, disk: self.disk }, out);
        }
    }

    /// The peer's role or disk state changed.
    pub(super) fn on_peer_state(&mut self, role: Role, disk: DiskState, out: &mut Vec<Action>) {
        let took_writes = self.peer_takes_writes();
        self.peer_role = Some(role);
        self.peer_disk = Some(disk);
        self.applier.ack_every_write(!self.peer_takes_writes());
        if role == Role::Primary && !self.peer_takes_writes() && self.role == Role::Secondary {
            self.track_for_diskless_primary(out);
        }
        if took_writes
            && !self.peer_takes_writes()
            && self.role == Role::Primary
            && self.link == Link::Replicating
        {
            // Its disk was detached: what it had not confirmed goes into the bitmap
            // (as for a lost peer); on the next link it is known diskless.
            tracing::warn!(%disk, "the peer's disk was detached; reconnecting without replication to it");
            out.push(Action::DropLink { reason: "this Primary saw the peer's disk detached".into() });
            self.on_link_down(out);
        }
    }

    pub(super) fn set_standalone(&mut self, standalone: bool, out: &mut Vec<Action>) {
        if self.standalone != standalone {
            self.standalone = standalone;
            out.push(Action::LinkPolicy { enabled: !standalone });
        }
    }

    /// A metadata update was carried out.
    pub(super) fn on_meta_done(&mut self, seq: u64, result: Result<(), String>, out: &mut Vec<Action>) {
        let (done, waiting): (Vec<_>, Vec<_>) =
            self.replies_after_meta.drain(..).partition(|(s, _)| *s <= seq);
        self.replies_after_meta = waiting;
        for (_, id) in done {
            out.push(Action::Done { id, result: result.clone().map(|()| CmdOutput::Done) });
        }
        match result {
            Ok(()) => self.on_meta_durable(seq, out),
            // Nothing that waits for it may go on (it never becomes durable).
            Err(error) => {
                self.fail_disk(DiskFailure { op: "metadata update", errno: None, offset: None, error }, out)
            }
        }
    }

    /// Answers `id` once the latest metadata update queued in `actions` is done (at
    /// once if none was queued).
    pub(super) fn reply_when_durable(&mut self, id: CmdId, out: &mut Vec<Action>, first_new: usize) {
        let seq = out[first_new..].iter().rev().find_map(|a| match a {
            Action::Persist { seq, .. } | Action::WriteBitmap { seq, .. } | Action::WriteAl { seq, .. } => {
                Some(*seq)
            }
            _ => None,
        });
        match seq {
            Some(seq) => self.replies_after_meta.push((seq, id)),
            None => out.push(Action::Done { id, result: Ok(CmdOutput::Done) }),
        }
    }

    /// An operator command.
    pub(super) fn on_command(&mut self, id: CmdId, cmd: Command, out: &mut Vec<Action>) {
        if self.defer_while_negotiating(id, &cmd) {
            return;
        }
        let first_new = out.len();
        let result = match cmd {
            Command::Promote { force } => match self.promote(id, force, out) {
                // Answered when the peer voted.
                Ok(Promotion::Asked) => return,
                Ok(Promotion::Done) => Ok(()),
                Err(e) => Err(e),
            },
            Command::Demote => self.demote(out),
            Command::Connect { discard_my_data } => self.cmd_connect(discard_my_data, out),
            Command::Disconnect => {
                self.cmd_disconnect(out);
                Ok(())
            }
            Command::Invalidate => self.invalidate(out),
            Command::InvalidateRemote => self.invalidate_remote(out),
            Command::SetSyncPaused(paused) => {
                self.set_sync_paused(paused, out);
                Ok(())
            }
            Command::DetachDisk => self.detach_disk(out),
            Command::Verify { repair } => match self.start_verify(repair, out) {
                // Answered when the verify ends.
                Ok(()) => {
                    self.verify_cmd = Some(id);
                    return;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => self.reply_when_durable(id, out, first_new),
            Err(e) => out.push(Action::Done { id, result: Err(e) }),
        }
    }

    fn cmd_connect(&mut self, discard_my_data: bool, out: &mut Vec<Action>) -> Result<(), String> {
        if discard_my_data && self.link != Link::Disconnected {
            return Err("already connected: --discard-my-data only resolves a split brain when connecting \
                 (the nodes refuse each other then and are StandAlone)"
                .to_string());
        }
        self.set_standalone(false, out);
        self.discard_my_data = discard_my_data;
        if self.link != Link::Replicating {
            self.conn = ConnState::Connecting;
        }
        Ok(())
    }

    fn cmd_disconnect(&mut self, out: &mut Vec<Action>) {
        self.set_standalone(true, out);
        self.conn = ConnState::StandAlone;
        self.refusal = Some("disconnected by `blockctl disconnect`".into());
        if self.link != Link::Disconnected {
            tracing::info!("disconnected by the operator");
            out.push(Action::DropLink { reason: "the peer ran `blockctl disconnect`".into() });
            self.on_link_down(out);
        }
    }

    /// The connection as status shows it, and why the last link was refused.
    pub fn connection(&self) -> (ConnState, Option<&str>) {
        (self.conn, self.refusal.as_deref())
    }

    /// The peer's role and disk as it last told (`None` while not linked).
    pub fn peer_view(&self) -> (Option<Role>, Option<DiskState>) {
        (self.peer_role, self.peer_disk)
    }

    /// No connection is used until `blockctl connect`.
    pub fn standalone(&self) -> bool {
        self.standalone
    }
}

impl Core {
    /// `blockctl primary [--force]`. Its persist is queued in `out`; the command is
    /// answered once it is durable (the export opens at once: writes acknowledged
    /// under a new generation wait for it, see `needs_durable_gens`).
    pub(super) fn promote(
        &mut self,
        id: CmdId,
        force: bool,
        out: &mut Vec<Action>,
    ) -> Result<Promotion, String> {
        if self.role == Role::Primary {
            return Ok(Promotion::Done);
        }
        if self.peer_role == Some(Role::Primary) {
            return Err("the peer is Primary; demote it first (`blockctl secondary` there)".to_string());
        }
        if self.detached() {
            if !self.peer_serves() || self.cfg.bugs.promotion_skips_peer {
                return Err(self.diskless_promotion_refusal());
            }
            // A diskless Primary serving through its UpToDate peer, which must agree.
            self.request_promotion(id, false, out)?;
            return Ok(Promotion::Asked);
        }
        if self.applier.peer_writes_in_flight() {
            // Acknowledged to the peer's client (protocols A and B, or a resync
            // chunk) but not on this disk yet: serving reads now could return data
            // older than an acknowledged write.
            return Err("writes received from the peer are still being written to the local disk \
                 (it may be slow or hung); retry once they completed"
                .to_string());
        }
        if self.roll_back_for_promotion(id, force, out) {
            // Answered once the disk is back to its fallback image.
            return Ok(Promotion::Asked);
        }
        if self.disk == DiskState::Consistent && !force {
            return Err("the local disk is Consistent: this node did not stop cleanly and has not heard \
                 its peer since, so it may lack acknowledged writes; connect to the peer, or use --force \
                 if this node's data is to be trusted"
                .to_string());
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(format!(
                "the local disk is {}; only an UpToDate node can be promoted \
                 (use --force to make this node's data the authoritative copy)",
                self.disk
            ));
        }
        if self.link == Link::Replicating && !self.cfg.bugs.promotion_skips_peer {
            if force && self.disk != DiskState::UpToDate && self.peer_disk == Some(DiskState::UpToDate) {
                return Err(format!(
                    "the local disk is {} and the connected peer's is UpToDate: promote the peer, or \
                     `blockctl disconnect` first to make this node's data the authoritative copy",
                    self.disk
                ));
            }
            // While connected, the peer must agree (`repl::twopc`).
            self.request_promotion(id, force, out)?;
            return Ok(Promotion::Asked);
        }
        self.promote_now(force, out)?;
        Ok(Promotion::Done)
    }

    /// Becomes Primary (disconnected, or with the peer's agreement).
    pub(super) fn promote_now(&mut self, force: bool, out: &mut Vec<Action>) -> Result<(), String> {
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.detached() {
            // Never made UpToDate by `--force`: it has no data. It serves through
            // its peer, or not at all.
            if !self.peer_serves() {
                return Err(self.diskless_promotion_refusal());
            }
            tracing::info!("promoted without a disk: serving through the peer");
            self.role = Role::Primary;
            self.announce_state(out);
            return Ok(());
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(format!("the local disk is {}; only an UpToDate node can be promoted", self.disk));
        }
        if force && self.disk == DiskState::Consistent {
            // Consistent after an unclean stop: the operator vouches for it. It is
            // the data of its generation, promoted as an UpToDate disk would be (no
            // generation of its own on top: the peer resyncs by bitmap as usual).
            tracing::warn!(
                "primary --force on a Consistent disk: taken as UpToDate by the operator's choice"
            );
            self.disk = DiskState::UpToDate;
        }
        if force && self.disk != DiskState::UpToDate {
            // This copy becomes the reference: a generation of its own, so the peer
            // sees it as newer and takes a full sync from it.
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.disk = DiskState::UpToDate;
            self.gens_pending = true;
        } else if (self.link == Link::Disconnected || !self.peer_takes_writes()) && self.gens.bitmap == 0 {
            // SPEC §5: promoted while disconnected starts a new generation — unless
            // one already tracks changes since the peer's (as DRBD: only when the
            // bitmap id is 0), or the peer would no longer recognize this node.
            let fresh = self.fresh_id();
            self.gens.start_new(fresh);
            self.gens_pending = true;
        }
        self.role = Role::Primary;
        self.persist(out);
        self.announce_state(out);
        Ok(())
    }

    /// Why a node without a disk is not promoted, naming the case.
    fn diskless_promotion_refusal(&self) -> String {
        let why = self.disk_failure.as_ref().map_or_else(String::new, |f| format!(" ({f})"));
        let peer = match self.link {
            Link::Replicating => "its peer is connected but not UpToDate either",
            _ => "its peer is not connected",
        };
        format!(
            "the local disk is {}{why}: a node without a disk is promoted only to serve through a \
             connected UpToDate peer (never with --force alone), and {peer}; attach a repaired disk \
             (`blockctl attach-disk`) and let it resync",
            self.disk
        )
    }

    /// `blockctl secondary`: the shell has already closed the NBD export and drained
    /// its clients. Refused while writes are in flight.
    pub(super) fn demote(&mut self, out: &mut Vec<Action>) -> Result<(), String> {
        if self.role == Role::Secondary {
            return Ok(());
        }
        if !self.writes.is_empty() || !self.flushes.is_empty() {
            return Err("writes are still in flight; retry in a moment".to_string());
        }
        self.twophase_link_lost(out);
        self.role = Role::Secondary;
        self.persist(out);
        self.announce_state(out);
        Ok(())
    }
}
