//! The acknowledgement watchdog, as part of the [`Core`] (a child module):
//! `ack-timeout`. The link's keepalive proves only that the peer's process answers
//! pings; a peer whose disk hangs keeps answering them while no write, barrier or
//! resync chunk ever completes, and the Primary's writes would wait for it forever.
//!
//! While the peer owes an answer (a write awaiting its ack under B or C, a flush
//! barrier, a resync chunk or flush, a read), the peer must make progress: an
//! answer arrives, or the socket takes more of the queued frames (on a slow link a
//! barrier may wait behind megabytes of writes; those bytes moving is progress).
//! When neither happened for `ack-timeout`, the link is dropped: writes continue
//! locally and are recorded in the bitmap (`on_peer_down`), and the peer is resynced
//! once it answers again. A peer whose disk hangs stops reading its socket once its
//! bounded receive queue is full, so the socket stops taking frames too.
//!
//! Time comes from ticks (the core reads no clock).

use super::*;

#[derive(Debug, Default)]
pub(super) struct AckWatch {
    /// Milliseconds of ticks since start.
    now_ms: u64,
    /// When the peer last made progress (or nothing was owed).
    progress_ms: u64,
    /// Links dropped by the watchdog since start.
    timeouts: u64,
}

impl Core {
    /// The peer answered something it owed (or its socket took frames).
    pub(super) fn peer_progress(&mut self) {
        self.ackwatch.progress_ms = self.ackwatch.now_ms;
    }

    /// Whether the peer owes an answer now.
    fn peer_owes(&self) -> bool {
        if self.link != Link::Replicating {
            return false;
        }
        !self.flush_barriers.is_empty()
            || self.source.as_ref().is_some_and(|s| s.awaiting_peer())
            || self.writes.values().any(|w| w.peer == primary::PeerPart::Awaiting)
    }

    /// A tick: drop a peer that owes an answer and made no progress for
    /// `ack-timeout`.
    pub(super) fn ackwatch_tick(&mut self, elapsed_ms: u64, out: &mut Vec<Action>) {
        self.ackwatch.now_ms += elapsed_ms;
        if !self.peer_owes() {
            self.peer_progress();
            return;
        }
        let silent_ms = self.ackwatch.now_ms - self.ackwatch.progress_ms;
        if silent_ms < self.cfg.ack_timeout_ms {
            return;
        }
        self.ackwatch.timeouts += 1;
        tracing::error!(
            silent_ms,
            ack_timeout_ms = self.cfg.ack_timeout_ms,
            "the peer owes acknowledgements and made no progress within ack-timeout; disconnecting it \
             (writes continue locally and are resynced later)"
        );
        self.refusal = Some(format!("the peer did not answer within ack-timeout ({silent_ms} ms)"));
        out.push(Action::DropLink { reason: "no acknowledgement within ack-timeout".into() });
        self.on_link_down(out);
        self.peer_progress();
    }

    /// Links dropped by `ack-timeout` since start.
    pub fn ack_timeouts(&self) -> u64 {
        self.ackwatch.timeouts
    }
}

/// Messages that answer something the peer owes.
pub(super) fn is_answer(m: &Message) -> bool {
    matches!(
        m,
        Message::WriteAck { .. }
            | Message::RecvAck { .. }
            | Message::BarrierAck { .. }
            | Message::ResyncAck { .. }
            | Message::ResyncFlushed { .. }
            | Message::Digests { .. }
            | Message::ReadData { .. }
            | Message::BitmapBlock { .. }
            | Message::BitmapDone { .. }
    )
}
