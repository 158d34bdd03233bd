//! The portable engine: a few worker threads doing blocking system calls, fed by a
//! bounded channel. Runs wherever io_uring is blocked (seccomp, old kernels).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use nix::errno::Errno;

use super::ops::{self, Backing};
use super::range::{Next, RangeJob};
use super::{IoBuf, IoOp, IoSink, StorageError, StorageOptions, deliver};

type Job<S> = (IoOp, <S as IoSink>::Token);

pub(crate) struct PosixEngine<S: IoSink> {
    /// `None` once stopping; dropping the last sender lets the workers drain the
    /// channel and exit.
    tx: Option<Sender<Job<S>>>,
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
        // The channel holds at most every op in flight, so `send` never waits while
        // the caller keeps its bound; the array flavour allocates its slots once.
        let (tx, rx) = crossbeam_channel::bounded::<Job<S>>(opts.max_inflight.max(1));
        let mut engine = PosixEngine { tx: Some(tx), workers: Vec::new(), sink };
        for i in 0..opts.posix_threads.max(1) {
            let (rx, backing, sink) = (rx.clone(), Arc::clone(backing), Arc::clone(&engine.sink));
            let worker = std::thread::Builder::new()
                .name(format!("blockd-posix-{i}"))
                .spawn(move || worker_loop(&rx, &backing, &*sink));
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

    pub fn submit(&self, op: IoOp, token: S::Token) {
        // `tx` is only `None` inside Drop, so the error path is for workers that
        // are all gone, which no I/O error can cause. Still complete the op, so the
        // caller's accounting stays whole.
        let unsent = match &self.tx {
            Some(tx) => tx.send((op, token)).err().map(|e| e.into_inner()),
            None => Some((op, token)),
        };
        if let Some((op, token)) = unsent {
            tracing::error!("the posix storage workers have exited; failing the op");
            deliver(&*self.sink, token, Err(Errno::EIO), op.into_buf());
        }
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

fn worker_loop<S: IoSink>(rx: &Receiver<Job<S>>, backing: &Backing, sink: &S) {
    // `recv` keeps returning queued ops after the sender is dropped and fails only
    // once the channel is empty: that is what makes shutdown complete everything.
    while let Ok((op, token)) = rx.recv() {
        let (result, buf) = execute(backing, op);
        deliver(sink, token, result, buf);
    }
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
