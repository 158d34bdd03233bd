//! The portable engine: a few worker threads doing blocking system calls, fed by a
//! bounded channel (and, past its bound, by the [`Overflow`] queue). Runs wherever
//! io_uring is blocked (seccomp, old kernels).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use nix::errno::Errno;

use super::ops::{self, Backing};
use super::overflow::{Item, Overflow};
use super::range::{Next, RangeJob};
use super::{IoBuf, IoOp, IoSink, StorageError, StorageOptions, deliver};

type Job<S> = Item<<S as IoSink>::Token>;

pub(crate) struct PosixEngine<S: IoSink> {
    /// `None` once stopping; dropping the last sender lets the workers drain the
    /// channel and exit.
    tx: Option<Sender<Job<S>>>,
    overflow: Arc<Overflow<S::Token>>,
    workers: Vec<JoinHandle<()>>,
    sink: Arc<S>,
}

impl<S: IoSink> PosixEngine<S> {
    pub fn start(
        backing: &Arc<Backing>,
        path: &Path,
        opts: &StorageOptions,
        sink: Arc<S>,
    ) -> Result<PosixEngine<S>, StorageError> {
        // The channel holds `max_inflight` ops, the usual bound on ops in flight; the
        // array flavour allocates its slots once. Past it, ops wait in `overflow`.
        let (tx, rx) = crossbeam_channel::bounded::<Job<S>>(opts.max_inflight.max(1));
        let overflow = Arc::new(Overflow::new());
        let mut engine = PosixEngine { tx: Some(tx), overflow, workers: Vec::new(), sink };
        for i in 0..opts.posix_threads.max(1) {
            let (rx, backing, sink) = (rx.clone(), Arc::clone(backing), Arc::clone(&engine.sink));
            let overflow = Arc::clone(&engine.overflow);
            let worker = std::thread::Builder::new()
                .name(format!("blockd-posix-{i}"))
                .spawn(move || worker_loop(&rx, &overflow, &backing, &*sink));
            match worker {
                Ok(handle) => engine.workers.push(handle),
                // Dropping `engine` stops the workers already started.
                Err(source) => {
                    return Err(StorageError::Spawn { path: path.to_owned(), source });
                }
            }
        }
        Ok(engine)
    }

    /// Never blocks: a full channel sends the op to the overflow queue.
    pub fn submit(&self, op: IoOp, token: S::Token) {
        // `tx` is only `None` inside Drop, so the error path is for workers that
        // are all gone, which no I/O error can cause. Still complete the op, so the
        // caller's accounting stays whole.
        let Some(tx) = &self.tx else {
            return self.fail((op, token));
        };
        let job = if self.overflow.is_empty() {
            match tx.try_send((op, token)) {
                Ok(()) => return,
                Err(TrySendError::Full(job)) => job,
                Err(TrySendError::Disconnected(job)) => return self.fail(job),
            }
        } else {
            (op, token)
        };
        // Forwarding into a channel with room wakes a worker blocked on it; if the
        // channel is full, every worker is busy and looks here when it runs dry.
        self.overflow.push(job, |job| {
            tx.try_send(job).map_err(|e| match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            })
        });
    }

    pub fn overflow(&self) -> &Overflow<S::Token> {
        &self.overflow
    }

    fn fail(&self, (op, token): Job<S>) {
        tracing::error!("the posix storage workers have exited; failing the op");
        deliver(&*self.sink, token, Err(Errno::EIO), op.into_buf());
    }
}

impl<S: IoSink> Drop for PosixEngine<S> {
    fn drop(&mut self) {
        self.tx = None;
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("a posix storage worker panicked");
            }
        }
    }
}

fn worker_loop<S: IoSink>(rx: &Receiver<Job<S>>, overflow: &Overflow<S::Token>, backing: &Backing, sink: &S) {
    while let Some((op, token)) = next_job(rx, overflow) {
        let (result, buf) = execute(backing, op);
        deliver(sink, token, result, buf);
    }
}

/// The channel's ops first (they are older than any that overflowed), then the
/// overflow queue's, else wait. `None` once the engine stops and both are empty:
/// the channel keeps returning queued ops after the sender is dropped, which is what
/// makes shutdown complete everything.
fn next_job<T>(rx: &Receiver<Item<T>>, overflow: &Overflow<T>) -> Option<Item<T>> {
    match rx.try_recv() {
        Ok(job) => return Some(job),
        Err(TryRecvError::Disconnected) => return overflow.pop(),
        Err(TryRecvError::Empty) => {}
    }
    // Pairs with the fence in `Overflow::push`: either this sees the op it queued,
    // or its forwarding `try_send` finds this empty channel and wakes us.
    fence(Ordering::SeqCst);
    if let Some(job) = overflow.pop_after(|| rx.try_recv().ok()) {
        return Some(job);
    }
    rx.recv().ok().or_else(|| overflow.pop())
}

/// Runs one op to completion with blocking calls.
pub(crate) fn execute(backing: &Backing, op: IoOp) -> (Result<(), Errno>, IoBuf) {
    if backing.read_only && op.mutates() {
        return (Err(Errno::EROFS), op.into_buf());
    }
    let fd = backing.fd();
    match op {
        IoOp::Read { offset, mut buf } => (ops::pread_full(fd, &mut buf, offset), IoBuf::Read(buf)),
        IoOp::Write { offset, buf, fua } => (ops::pwrite_full(fd, &buf, offset, fua), IoBuf::Write(buf)),
        IoOp::Flush => (ops::fdatasync(fd), IoBuf::None),
        IoOp::Trim { offset, len, fua } => {
            (run_job(backing, RangeJob::trim(backing.kind, offset, len, fua)), IoBuf::None)
        }
        IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
            let job = RangeJob::write_zeroes(backing.kind, offset, len, may_trim, fast_only, fua);
            (run_job(backing, job), IoBuf::None)
        }
        IoOp::Cache { offset, len } => {
            ops::fadvise_willneed(fd, offset, len);
            (Ok(()), IoBuf::None)
        }
    }
}

fn run_job(backing: &Backing, mut job: RangeJob) -> Result<(), Errno> {
    let mut last = None;
    loop {
        match job.advance(last) {
            Next::Run(action) => last = Some(ops::run_action(backing.fd(), action)),
            Next::Done(result) => return result,
        }
    }
}
