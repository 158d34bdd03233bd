//! A failed local disk, as part of the [`Core`] (a child module): the hook every
//! unrecoverable I/O error goes through (today: a metadata update or the flush it
//! depends on). The node fails closed:
//!
//! - its disk is `Failed` from now on (in memory: the metadata cannot record it)
//!   and it never claims UpToDate again in this run;
//! - no write or flush is acknowledged any more: those waiting for metadata (write
//!   intent, a durable generation) and new ones get EIO, those already on the disk
//!   get EIO when they finish;
//! - it leaves the peer (drops the link, stays StandAlone): the peer tracks what
//!   changes meanwhile, and may be promoted;
//! - status (`disk_error`), the log and the metrics say what failed and why.
//!
//! After a restart the node recovers from what its metadata durably holds (a
//! consistent prefix: the metadata writer stops at the first failure), as after a
//! crash.

use super::*;

/// What failed, for status, log and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFailure {
    /// The operation: "metadata update", "flush before a metadata update", ...
    pub op: &'static str,
    pub error: String,
}

impl std::fmt::Display for DiskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.op, self.error)
    }
}

impl Core {
    /// The local disk failed: fail closed (see the module doc).
    pub(super) fn fail_disk(&mut self, failure: DiskFailure, out: &mut Vec<Action>) {
        if self.disk_failure.is_some() {
            return;
        }
        tracing::error!(op = failure.op, error = %failure.error, "local disk failed: nothing is acknowledged from now on");
        self.refusal = Some(format!("local disk failed ({failure})"));
        self.disk_failure = Some(failure);
        self.disk = DiskState::Failed;
        if self.link != Link::Disconnected {
            out.push(Action::DropLink { reason: "the peer's disk failed".into() });
            self.on_link_down(out);
        }
        self.set_standalone(true, out);
        self.conn = ConnState::StandAlone;
        // Writes waiting for metadata never start.
        for job in self.intent.take_waiting() {
            self.fail_write(job, out);
        }
        // Writes on the disk, or waiting for a durable generation: answered (with
        // an error) as soon as their local part is done.
        let writes: Vec<JobId> = self.writes.keys().copied().collect();
        for job in writes {
            self.try_finish_write(job, out);
        }
        let flushes: Vec<JobId> = self.flushes.keys().copied().collect();
        for job in flushes {
            self.try_finish_flush(job, out);
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
}
