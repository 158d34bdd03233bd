//! A failed local disk, as part of the [`Core`] (a child module): every I/O error on
//! this node's own disk comes here, and `on-io-error` says what it does.
//!
//! **Detach** (the default, and always for errors nothing can pass on):
//! - the disk is `Failed` while ops submitted before still run, then `Diskless`;
//!   it never claims UpToDate again in this run (a repaired disk comes back only
//!   through `attach-disk`, i.e. a restart from its metadata, and a resync);
//! - one best-effort metadata update records the disk as Outdated, so a restart on
//!   the same disk never claims UpToDate either; after that no metadata is written;
//! - a Secondary leaves the link and comes back Diskless: the Primary's transfer
//!   log goes into its bitmap under a new generation (as for any lost peer), and it
//!   sends nothing to a diskless peer (`Core::peer_takes_writes`);
//! - a Primary keeps serving through its peer if the peer is connected and
//!   UpToDate (`repl::diskless`), and answers EIO otherwise;
//! - status (`disk_error`: op, errno, offset), the log and the metrics say so.
//!
//! **Pass-on** affects only a Primary's client I/O: the client gets the error, the
//! disk stays, and the range is marked out of sync (the peer may have applied the
//! write) and resynced from this node. ENOSPC on a Primary's client write is always
//! passed on (the disk works; it is full): the client gets ENOSPC.
//!
//! A Secondary has no client to pass an error to: any failed write or flush
//! (ENOSPC included) detaches, whatever the policy, because a copy that missed a
//! write must not stay UpToDate. Reads for a resync, verify or digest request, and
//! the flushes and updates of the metadata, detach too.

use super::*;
use crate::config::IoErrorPolicy;

/// What failed, for status, log and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFailure {
    /// The operation: "write", "read", "flush", "metadata update", ...
    pub op: &'static str,
    /// The errno, when the error came from an I/O op.
    pub errno: Option<i32>,
    /// The byte offset of the op, when it had one.
    pub offset: Option<u64>,
    pub error: String,
}

impl DiskFailure {
    /// A failed data op.
    pub fn io(op: &'static str, offset: Option<u64>, errno: Errno) -> DiskFailure {
        DiskFailure { op, errno: Some(errno as i32), offset, error: format!("{errno}: {}", errno.desc()) }
    }
}

impl std::fmt::Display for DiskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{} at offset {offset} failed: {}", self.op, self.error),
            None => write!(f, "{} failed: {}", self.op, self.error),
        }
    }
}

/// What the job that failed was, as the failure policy sees it.
pub(super) enum FailedIo {
    /// A Primary's client write or flush.
    Client { op: &'static str, offset: Option<u64> },
    /// Anything else on this node's disk.
    Internal { op: &'static str, offset: Option<u64> },
}

impl Core {
    /// A local op failed with `errno`. Returns whether the failure policy passes
    /// the error on (the disk stays); otherwise the disk was detached.
    pub(super) fn on_io_error(&mut self, io: FailedIo, errno: Errno, out: &mut Vec<Action>) -> bool {
        self.io_errors += 1;
        match io {
            FailedIo::Client { op, offset }
                if self.role == Role::Primary
                    && (errno == Errno::ENOSPC || self.cfg.on_io_error == IoErrorPolicy::PassOn) =>
            {
                tracing::warn!(op, offset, %errno, "client I/O error passed on to the client; range resynced from here");
                self.repair_pending = true;
                true
            }
            FailedIo::Client { op, offset } | FailedIo::Internal { op, offset } => {
                self.fail_disk(DiskFailure::io(op, offset, errno), out);
                false
            }
        }
    }

    /// A client read from the local disk failed: detach, unless passed on (the
    /// client has the error already; nothing was written, so nothing differs).
    pub(super) fn on_read_failed(&mut self, offset: u64, errno: Errno, out: &mut Vec<Action>) {
        self.io_errors += 1;
        if self.cfg.on_io_error == IoErrorPolicy::Detach {
            self.fail_disk(DiskFailure::io("read", Some(offset), errno), out);
        }
    }

    /// A tick: ranges whose client error was passed on are resynced from here
    /// while connected (after a reconnect, the connect decision resyncs them).
    pub(super) fn repair_tick(&mut self, out: &mut Vec<Action>) {
        if !self.repair_pending || self.role != Role::Primary || self.detached() {
            return;
        }
        if !self.replicating_data() {
            self.repair_pending = self.link != Link::Disconnected;
            return;
        }
        if self.repl != ReplState::Established || self.verifier.running() || self.bitmap.count_bits() == 0 {
            return;
        }
        self.repair_pending = false;
        let bytes = self.bitmap.dirty_bytes();
        tracing::info!(bytes, "resyncing ranges whose client I/O error was passed on");
        self.start_repair(bytes, out);
    }

    /// The local disk failed: detach it (see the module doc).
    pub(super) fn fail_disk(&mut self, failure: DiskFailure, out: &mut Vec<Action>) {
        if self.disk_failure.is_some() {
            return;
        }
        tracing::error!(op = failure.op, errno = failure.errno, offset = failure.offset, error = %failure.error,
            role = %self.role, "local disk failed: detaching it");
        self.disk_failure = Some(failure);
        // What the metadata may say from now on: Outdated at best; a sync target
        // stays Inconsistent (its data is partly written).
        let recorded = self.disk.min(DiskState::Outdated);
        self.disk = DiskState::Failed;
        self.repair_pending = false;
        // Best effort: a restart on this disk must not claim UpToDate. Its outcome
        // changes nothing here (a failure of it is the same failure).
        self.persist_disk(recorded, out);
        if self.role == Role::Secondary {
            if self.link != Link::Disconnected {
                // Comes back Diskless: the Primary records everything it sent
                // and stops sending (its transfer log goes into its bitmap).
                out.push(Action::DropLink {
                    reason: "this node's disk failed; it continues diskless".into(),
                });
                self.on_link_down(out);
            }
        } else {
            // A resync from this disk stops (its chunks go back; the peer stays
            // as it was: a target only becomes UpToDate at the resync's end).
            self.abandon_resync(out);
            // First the news (the peer acknowledges every write of a diskless
            // Primary from then on), then what is in flight goes to the peer.
            self.announce_state(out);
            self.go_diskless(out);
        }
        self.abandon_verify("the local disk failed", out);
        self.maybe_diskless(out);
    }

    /// `blockctl detach-disk`: as after an I/O error (the disk is left alone from
    /// now on), so it can be replaced and attached again.
    pub(super) fn detach_disk(&mut self, out: &mut Vec<Action>) -> Result<(), String> {
        if self.detached() {
            return Ok(());
        }
        if self.role == Role::Primary && !self.peer_serves() {
            return Err("this node is Primary and its peer is not connected and UpToDate: without its \
                 disk it could serve nothing; move the Primary role first"
                .into());
        }
        let error = "detached by the operator (`blockctl detach-disk`)".to_string();
        self.fail_disk(DiskFailure { op: "detach-disk", errno: None, offset: None, error }, out);
        Ok(())
    }

    /// `Failed` becomes `Diskless` once no op of this node is on the disk any more.
    pub(super) fn maybe_diskless(&mut self, out: &mut Vec<Action>) {
        if self.disk == DiskState::Failed && self.local_ops == 0 {
            tracing::info!("disk detached: Diskless");
            self.disk = DiskState::Diskless;
            self.announce_state(out);
        }
    }

    /// The disk was detached (after an I/O error): it takes no part in anything.
    pub(super) fn detached(&self) -> bool {
        self.disk.is_detached()
    }

    /// The peer has a disk to write to (while connected).
    pub(super) fn peer_takes_writes(&self) -> bool {
        !self.peer_disk.is_some_and(DiskState::is_detached)
    }

    /// Connected to a peer that takes writes, and not pulled ahead of it
    /// (`repl::ahead`): the data path replicates.
    pub(super) fn replicating_data(&self) -> bool {
        self.link == Link::Replicating && self.peer_takes_writes() && !self.ahead
    }

    /// Why the peer cannot take part in a resync or verify, if it cannot.
    pub(super) fn peer_diskless(&self) -> Option<String> {
        match self.peer_disk {
            Some(d) if d.is_detached() => {
                Some(format!("the peer's disk is {d} (detached after an I/O error)"))
            }
            _ => None,
        }
    }

    /// Answers a write that never started with EIO and gives its range back.
    pub(super) fn fail_write(&mut self, job: JobId, out: &mut Vec<Action>) {
        let Some(w) = self.writes.remove(&job) else { return };
        out.push(Action::Reply { job, outcome: Outcome::Error(NbdError::Io) });
        let next = self.inflight.complete(job, w.range.start);
        self.start_released(next, out);
    }

    /// What failed on the local disk, if anything (status `disk_error`).
    pub fn disk_failure(&self) -> Option<&DiskFailure> {
        self.disk_failure.as_ref()
    }

    /// Local I/O errors seen since start (passed on or not).
    pub fn io_errors(&self) -> u64 {
        self.io_errors
    }
}
