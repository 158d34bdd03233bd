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
    pub(super) fn on_peer_state(&mut self, role: Role, disk: DiskState) {
        self.peer_role = Some(role);
        self.peer_disk = Some(disk);
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
            Err(error) => self.fail_disk(DiskFailure { op: "metadata update", error }, out),
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

    /// The verify this node runs ended (`error` if it was cut short).
    pub(super) fn verify_ended(
        &mut self,
        verified_bytes: u64,
        out_of_sync_bytes: u64,
        error: Option<String>,
        out: &mut Vec<Action>,
    ) {
        let Some(id) = self.verify_cmd.take() else { return };
        let result = match error {
            Some(e) => Err(e),
            None => Ok(CmdOutput::Verified { verified_bytes, out_of_sync_bytes }),
        };
        out.push(Action::Done { id, result });
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
