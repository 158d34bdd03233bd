//! Byte budgets of a link's receiving side (issue 13 §6): what the peer sends this
//! node is bounded in bytes by what this node has not finished with, so a peer
//! faster than this node's disk fills its own send buffer (TCP back-pressure)
//! instead of this node's memory.
//!
//! - [`ByteBudget`]: a counting budget (a tokio semaphore of bytes). The frame
//!   reader takes the memory a data frame's payload will occupy (its buffer's size
//!   class and alignment slack: [`nbd_server::buf::footprint_bytes`], 8 KiB for a
//!   4 KiB write) from the link's receive budget before it allocates and reads the
//!   payload, and hangs the permit on the payload's buffer
//!   ([`nbd_server::buf::BufMut::hold_permit`]): the bytes come back when the last
//!   handle of that buffer is dropped, i.e. when whoever used it (a disk write, a
//!   resync write, a reply) is done with it. While the budget is spent the reader
//!   does not read, so nothing more arrives.
//! - [`Asked`]: requests that make this node read data for the peer (`DigestReq`:
//!   read up to 1 MiB and hash it; `ReadReq`: read and send it) are charged to a
//!   second budget, by the memory of the buffer they make this node read into, when
//!   they arrive, and
//!   released when the writer queues their answer (`Digests` of the same range,
//!   `ReadData` with the same id) — or when the link ends. So the reads and answers
//!   the peer can make this node hold at once are bounded too.
//!
//! Both budgets belong to one link: a new link starts with full ones, and buffers
//! of an old link still held elsewhere release into the old budget only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use nbd_server::buf::footprint_bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::msg::Message;

/// A budget of bytes shared by the tasks of one link.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    capacity_bytes: u32,
}

impl ByteBudget {
    /// A budget of `capacity_bytes` (at least 1 byte, at most 4 GiB − 1: a
    /// semaphore counts in `u32` steps).
    pub fn new(capacity_bytes: u64) -> ByteBudget {
        let capacity_bytes = u32::try_from(capacity_bytes.max(1)).unwrap_or(u32::MAX);
        ByteBudget { permits: Arc::new(Semaphore::new(capacity_bytes as usize)), capacity_bytes }
    }

    /// Takes `bytes` from the budget, waiting while they are not free. A request
    /// larger than the whole budget takes all of it (it waits until nothing else
    /// is held), so no single frame can wait forever. Returns the permit and
    /// whether it had to wait.
    pub async fn take(&self, bytes: u64) -> (OwnedSemaphorePermit, bool) {
        let want = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.capacity_bytes);
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_many_owned(want) {
            return (permit, false);
        }
        // The semaphore is never closed, so the acquire only ends with the permit.
        let permit =
            Arc::clone(&self.permits).acquire_many_owned(want).await.expect("budget semaphore closed");
        (permit, true)
    }

    /// Bytes taken and not yet released.
    pub fn held_bytes(&self) -> u64 {
        u64::from(self.capacity_bytes) - self.permits.available_permits() as u64
    }
}

/// What a request frame asks this node to read, and how its answer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ask {
    /// `DigestReq { offset, len }`, answered by `Digests` of the same range.
    Digests { offset: u64, len: u64 },
    /// `ReadReq { id }`, answered by `ReadData { id }`.
    Read { id: u64 },
}

impl Ask {
    /// The request `msg` makes, with the memory of the buffer it makes this node
    /// read into (a length the link let through: at most one frame), if any.
    fn of_request(msg: &Message) -> Option<(Ask, u64)> {
        let (ask, len) = match *msg {
            Message::DigestReq { offset, len, .. } => (Ask::Digests { offset, len }, len),
            Message::ReadReq { id, len, .. } => (Ask::Read { id }, len),
            _ => return None,
        };
        Some((ask, footprint_bytes(usize::try_from(len).unwrap_or(usize::MAX)) as u64))
    }

    /// The request `msg` answers, if it is an answer.
    fn of_answer(msg: &Message) -> Option<Ask> {
        match *msg {
            Message::Digests { offset, len, .. } => Some(Ask::Digests { offset, len }),
            Message::ReadData { id, .. } => Some(Ask::Read { id }),
            _ => None,
        }
    }
}

/// The peer's read requests this node has not answered yet, each holding its
/// bytes of the request budget (see the module doc).
#[derive(Debug)]
pub(crate) struct Asked {
    budget: ByteBudget,
    /// Permits per outstanding request; the same range may be asked twice.
    open: Mutex<HashMap<Ask, Vec<OwnedSemaphorePermit>>>,
}

impl Asked {
    pub fn new(budget: ByteBudget) -> Asked {
        Asked { budget, open: Mutex::new(HashMap::new()) }
    }

    /// Charges a request frame (waiting while the budget is spent); other frames
    /// pass at once. Returns whether it had to wait.
    pub async fn charge(&self, msg: &Message) -> bool {
        let Some((ask, bytes)) = Ask::of_request(msg) else { return false };
        let (permit, waited) = self.budget.take(bytes).await;
        self.lock().entry(ask).or_default().push(permit);
        waited
    }

    /// Releases the request an answer frame answers (the writer calls it as it
    /// queues the frame). An answer to nothing outstanding releases nothing.
    pub fn answered(&self, msg: &Message) {
        let Some(ask) = Ask::of_answer(msg) else { return };
        let mut open = self.lock();
        if let Some(permits) = open.get_mut(&ask) {
            permits.pop();
            if permits.is_empty() {
                open.remove(&ask);
            }
        }
    }

    /// A panic while the lock was held cannot leave the map half-changed (its
    /// operations do not unwind midway), so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Ask, Vec<OwnedSemaphorePermit>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use nbd_server::buf::BufMut;

    use super::*;

    #[tokio::test]
    async fn a_take_waits_for_released_bytes_and_never_asks_more_than_the_budget() {
        let budget = ByteBudget::new(100);
        let (a, waited) = budget.take(60).await;
        assert!(!waited);
        assert_eq!(budget.held_bytes(), 60);
        let wait = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(50).await }
        });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "only 40 bytes are free");
        drop(a);
        let (_b, waited) = wait.await.unwrap();
        assert!(waited);
        assert_eq!(budget.held_bytes(), 50);
        // More than the whole budget takes all of it, once nothing else is held.
        drop(_b);
        let (all, _) = budget.take(1 << 40).await;
        assert_eq!(budget.held_bytes(), 100);
        drop(all);
        assert_eq!(budget.held_bytes(), 0);
        assert_eq!(ByteBudget::new(0).take(10).await.0.num_permits(), 1, "at least one byte");
    }

    #[tokio::test]
    async fn requests_hold_their_bytes_until_answered() {
        let each = footprint_bytes(1 << 20) as u64;
        let asked = Asked::new(ByteBudget::new(3 * each));
        let digest_req = |offset| Message::DigestReq { offset, len: 1 << 20, after_epoch: 0 };
        let digests = |offset| Message::Digests { offset, len: 1 << 20, data: BufMut::unpooled(0).freeze() };
        assert!(!asked.charge(&digest_req(0)).await);
        assert!(!asked.charge(&digest_req(0)).await, "the same range twice");
        assert!(!asked.charge(&Message::ReadReq { id: 7, offset: 0, len: 1 << 20, after_epoch: 0 }).await);
        assert_eq!(asked.budget.held_bytes(), 3 * each);
        assert!(!asked.charge(&Message::Barrier { epoch: 1, flush: false }).await, "not a request");
        asked.answered(&digests(4096));
        asked.answered(&Message::ReadData { id: 8, errno: 0, data: BufMut::unpooled(0).freeze() });
        assert_eq!(asked.budget.held_bytes(), 3 * each, "answers to nothing asked release nothing");
        asked.answered(&digests(0));
        assert_eq!(asked.budget.held_bytes(), 2 * each);
        asked.answered(&Message::ReadData { id: 7, errno: libc::EIO, data: BufMut::unpooled(0).freeze() });
        asked.answered(&digests(0));
        assert_eq!(asked.budget.held_bytes(), 0);
        assert!(asked.lock().is_empty());
    }
}
