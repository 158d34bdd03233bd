//! The overflow queue: where an op waits when an engine's bounded queue is full, so
//! that [`Storage::submit`](super::Storage::submit) never blocks or spins.
//!
//! The fast path does not come here: a submitter reads one atomic (`queued_ops`,
//! written only on this slow path, so its cache line stays shared) and then pushes
//! into the engine's preallocated lock-free queue exactly as before. Only when that
//! queue is full, or while ops are already waiting here, does it take this mutex.
//! New ops go here *while anything waits here* (not only when the fast queue is
//! full), so an op that overflowed is never overtaken indefinitely by later ones
//! refilling the fast queue: the engines take the fast queue's (older) ops first,
//! then these, in arrival order.
//!
//! Wake-ups: `queued_ops` is stored before the submitter's SeqCst fence and read
//! after the engine side's, the same pattern as the io_uring engine's `sleeping`
//! flag (see `uring.rs`), so an engine thread about to sleep either sees the op or
//! the submitter sees that it must wake it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::IoOp;

/// One queued op and its caller's token.
pub(super) type Item<T> = (IoOp, T);

pub(super) struct Overflow<T> {
    items: Mutex<VecDeque<Item<T>>>,
    /// `items.len()`, readable without the lock (the fast path's only extra read).
    queued_ops: AtomicUsize,
    /// Ops that ever went through here.
    total_ops: AtomicU64,
}

impl<T> Overflow<T> {
    pub fn new() -> Overflow<T> {
        Overflow {
            items: Mutex::new(VecDeque::new()),
            queued_ops: AtomicUsize::new(0),
            total_ops: AtomicU64::new(0),
        }
    }

    /// True when nothing waits here: a submitter may use the fast queue.
    pub fn is_empty(&self) -> bool {
        self.queued_ops.load(Ordering::SeqCst) == 0
    }

    /// Queues `item` behind those already waiting, then hands the oldest ones to
    /// `forward` while it takes them (an engine whose threads block on their fast
    /// queue passes a `try_send` here, so a queue that emptied meanwhile wakes them).
    pub fn push(&self, item: Item<T>, mut forward: impl FnMut(Item<T>) -> Result<(), Item<T>>) {
        let mut items = self.lock();
        if items.is_empty() {
            tracing::debug!("storage engine queue full; ops wait in the overflow queue");
        }
        items.push_back(item);
        self.total_ops.fetch_add(1, Ordering::Relaxed);
        self.queued_ops.store(items.len(), Ordering::SeqCst);
        // Publish before looking at the fast queue again (see the module comment).
        std::sync::atomic::fence(Ordering::SeqCst);
        while let Some(item) = items.pop_front() {
            if let Err(item) = forward(item) {
                items.push_front(item);
                break;
            }
        }
        self.queued_ops.store(items.len(), Ordering::SeqCst);
    }

    /// The oldest waiting op. Engine threads call it when they have room; the
    /// common empty case costs one atomic read.
    pub fn pop(&self) -> Option<Item<T>> {
        self.pop_after(|| None)
    }

    /// `older()` (the engine's fast queue) if it has an op, else the oldest waiting
    /// here, both under the lock: an op that `push` forwards into the fast queue is
    /// older than every one still here, so a consumer that looked at the fast queue
    /// before the forward and pops here after it would otherwise start a younger op
    /// before it.
    pub fn pop_after(&self, older: impl FnOnce() -> Option<Item<T>>) -> Option<Item<T>> {
        if self.is_empty() {
            return None;
        }
        let mut items = self.lock();
        if let Some(item) = older() {
            return Some(item);
        }
        let item = items.pop_front();
        self.queued_ops.store(items.len(), Ordering::SeqCst);
        item
    }

    pub fn stats(&self) -> (u64, usize) {
        (self.total_ops.load(Ordering::Relaxed), self.queued_ops.load(Ordering::Relaxed))
    }

    /// A panic while the lock was held cannot leave the deque half-changed (its
    /// operations do not unwind midway), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, VecDeque<Item<T>>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
