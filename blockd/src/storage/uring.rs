//! The io_uring engine: one ring owned by one thread.
//!
//! Submitters push `(op, token)` into a bounded lock-free queue (past its bound,
//! into the [`Overflow`] queue: a submit never waits) and write to an eventfd only
//! when the ring thread sleeps. The ring thread keeps a read of that
//! eventfd armed in the ring, so a single `io_uring_enter` waits for disk
//! completions and wake-ups alike. Ops in flight live in a slab indexed by
//! `user_data`, which owns their buffers until the kernel is done with them.
//!
//! Small plain writes to a regular file are the exception: the ring thread does
//! them itself with `pwrite` rather than as SQEs, which io_uring would punt to an
//! io-wq worker (see `RingLoop::writes_inline`); so is a flush with nothing else
//! outstanding, which it does with `fdatasync` (`RingLoop::flushes_inline`).
//!
//! Lost wake-up avoidance: the ring thread sets `sleeping`, then re-checks the
//! queue; a submitter pushes, then checks `sleeping`. A SeqCst fence on each side
//! between the write and the read guarantees that at least one of them sees the
//! other, so either the ring thread finds the op or the submitter wakes it. An op
//! in the overflow queue is published (its count stored) before the same fence.
//!
//! A burst larger than the submission queue (it holds at most [`MAX_SQ_ENTRIES`],
//! while up to [`MAX_SLOTS`] ops may be started in one pass) does not stall: a full
//! SQ is handed to the kernel (`io_uring_enter`) and refilled. That can only fail
//! transiently (EAGAIN/EBUSY), never for lack of CQ room: the CQ holds a CQE for
//! every slot plus the wake-up read, and each slot has at most one SQE in flight.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::JoinHandle;

use crossbeam_queue::ArrayQueue;
use io_uring::types::{Fd, FsyncFlags};
use io_uring::{CompletionQueue, IoUring, Probe, SubmissionQueue, Submitter, opcode, squeue};
use nbd_server::buf::{Buf, BufMut};
use nix::errno::Errno;

use super::ops::{self, Backing};
use super::overflow::{Item, Overflow};
use super::range::{Action, Next, RangeJob, ZEROES};
use super::{BackingKind, IoBuf, IoOp, IoSink, StorageError, deliver};

/// `user_data` of the armed eventfd read; slab indices are far smaller.
const WAKE_USER_DATA: u64 = u64::MAX;
/// io_uring read/write lengths are u32; larger requests go in pieces.
const MAX_RW_CHUNK_BYTES: usize = 1 << 30;
/// Slab bound: the completion queue (at most 65536 entries) must hold one CQE per op
/// in flight plus the wake-up read, so it can never overflow.
const MAX_SLOTS: usize = (1 << 15) - 1;
/// The submission queue only has to take one batch between two `io_uring_enter`s.
const MAX_SQ_ENTRIES: u32 = 1024;
/// CQEs copied out of the ring per batch before handling them.
const CQE_BATCH: usize = 64;
/// Largest plain write to a regular file that the ring thread does itself with
/// `pwrite` (see `RingLoop::writes_inline`): a copy of this size takes a few tens
/// of microseconds, a delay the other ops' completions can afford.
const INLINE_WRITE_MAX_BYTES: usize = 128 << 10;

/// A ring that passed the capability probe, not yet running.
pub(crate) struct Ring {
    ring: IoUring,
    wake_fd: OwnedFd,
    slot_count: usize,
    queue_capacity: usize,
}

impl Ring {
    /// Creates a ring sized for `max_inflight` ops and checks that the kernel has
    /// every opcode the engine needs. Any failure means "use posix instead".
    pub fn probe(max_inflight: usize) -> io::Result<Ring> {
        let slot_count = max_inflight.clamp(1, MAX_SLOTS);
        let cq_entries = (slot_count as u32 + 1).next_power_of_two();
        let sq_entries = cq_entries.min(MAX_SQ_ENTRIES);
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .build(sq_entries)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup failed: {e}")))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring opcode probe failed: {e}")))?;
        let needed = [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ];
        for (code, name) in needed {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks IORING_OP_{name}"),
                ));
            }
        }
        // Blocking on purpose: io_uring answers a read of an O_NONBLOCK file with
        // EAGAIN instead of waiting, and waiting is the whole point of this read.
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("eventfd failed: {e}")));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Ring { ring, wake_fd, slot_count, queue_capacity: max_inflight.max(1) })
    }
}

/// State shared by the submitters and the ring thread.
struct Shared<T> {
    queue: ArrayQueue<Item<T>>,
    /// Ops that found `queue` full; the ring thread takes them after `queue`'s.
    overflow: Overflow<T>,
    sleeping: AtomicBool,
    stop: AtomicBool,
    wake_fd: OwnedFd,
}

impl<T> Shared<T> {
    fn wake(&self) {
        loop {
            // EAGAIN means the counter is saturated, i.e. a wake-up is pending anyway.
            match nix::unistd::write(self.wake_fd.as_fd(), &1u64.to_ne_bytes()) {
                Err(Errno::EINTR) => {}
                Err(e) if e != Errno::EAGAIN => {
                    tracing::error!(error = %e, "cannot wake the io_uring thread");
                    return;
                }
                _ => return,
            }
        }
    }
}

pub(crate) struct UringEngine<S: IoSink> {
    shared: Arc<Shared<S::Token>>,
    thread: Option<JoinHandle<()>>,
    sink: Arc<S>,
}

impl<S: IoSink> UringEngine<S> {
    pub fn start(
        ring: Ring,
        backing: &Arc<Backing>,
        path: &Path,
        sink: Arc<S>,
    ) -> Result<UringEngine<S>, StorageError> {
        let Ring { ring, wake_fd, slot_count, queue_capacity } = ring;
        let shared = Arc::new(Shared {
            // Sized to the caller's full bound (not the slab's), so a push never
            // finds it full while the caller keeps to max_inflight.
            queue: ArrayQueue::new(queue_capacity),
            overflow: Overflow::new(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake_fd,
        });
        let thread = {
            let (shared, backing, sink) = (Arc::clone(&shared), Arc::clone(backing), Arc::clone(&sink));
            std::thread::Builder::new()
                .name("blockd-uring".to_owned())
                .spawn(move || ring_thread(ring, &shared, &backing, &*sink, slot_count))
                .map_err(|source| StorageError::Spawn { path: path.to_owned(), source })?
        };
        Ok(UringEngine { shared, thread: Some(thread), sink })
    }

    /// Never blocks or spins: a full queue sends the op to the overflow queue.
    pub fn submit(&self, op: IoOp, token: S::Token) {
        let item = (op, token);
        let refused =
            if self.shared.overflow.is_empty() { self.shared.queue.push(item).err() } else { Some(item) };
        if let Some(item) = refused {
            // Only a caller over its max_inflight bound gets here.
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                tracing::error!("the io_uring thread has exited; failing the op");
                let (op, token) = item;
                deliver(&*self.sink, token, Err(Errno::EIO), op.into_buf());
                return;
            }
            // The ring thread takes overflowed ops itself: nothing to forward.
            self.shared.overflow.push(item, Err);
        }
        // Pairs with the fence in RingLoop::run (see the module comment).
        fence(Ordering::SeqCst);
        // Load first: the swap (a write) happens only when the thread sleeps, and
        // only one submitter wins it, so a burst of submits costs one wake-up.
        if self.shared.sleeping.load(Ordering::SeqCst) && self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

impl<S: IoSink> UringEngine<S> {
    pub fn overflow(&self) -> &Overflow<S::Token> {
        &self.shared.overflow
    }
}

impl<S: IoSink> Drop for UringEngine<S> {
    fn drop(&mut self) {
        // The write after `stop` completes the armed eventfd read, which the ring
        // thread then leaves disarmed; it exits once nothing is queued or in flight.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the io_uring thread panicked");
        }
    }
}

fn ring_thread<S: IoSink>(
    mut ring: IoUring,
    shared: &Shared<S::Token>,
    backing: &Backing,
    sink: &S,
    slot_count: usize,
) {
    let (submitter, sq, cq) = ring.split();
    let mut ring_loop = RingLoop {
        submitter,
        sq,
        cq,
        shared,
        backing,
        sink,
        fd: Fd(backing.file.as_raw_fd()),
        slots: (0..slot_count).map(|_| None).collect(),
        free: (0..slot_count as u32).rev().collect(),
        wake_buf: Box::new([0; 8]),
        wake_armed: false,
    };
    ring_loop.run();
}

struct InFlight<T> {
    token: T,
    task: Task,
}

struct RingLoop<'r, S: IoSink> {
    submitter: Submitter<'r>,
    sq: SubmissionQueue<'r>,
    cq: CompletionQueue<'r>,
    shared: &'r Shared<S::Token>,
    backing: &'r Backing,
    sink: &'r S,
    fd: Fd,
    /// Ops in flight, indexed by `user_data`.
    slots: Vec<Option<InFlight<S::Token>>>,
    /// Indices of empty slots.
    free: Vec<u32>,
    /// Target of the armed eventfd read; boxed so its address never moves.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
}

impl<S: IoSink> RingLoop<'_, S> {
    fn run(&mut self) {
        self.arm_wake();
        loop {
            self.pull_queued();
            self.reap();
            let stopping = self.shared.stop.load(Ordering::SeqCst);
            if stopping && !self.wake_armed && self.in_flight() == 0 && !self.anything_queued() {
                return;
            }
            if self.can_pull() || self.cq_ready() {
                if !self.sq.is_empty() {
                    self.enter(0);
                }
                continue;
            }
            self.shared.sleeping.store(true, Ordering::SeqCst);
            // Pairs with the fence in UringEngine::submit (see the module comment).
            fence(Ordering::SeqCst);
            if self.can_pull() {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            // Submits what is pending and sleeps until a disk completion or a wake-up.
            self.enter(1);
            self.shared.sleeping.store(false, Ordering::SeqCst);
        }
    }

    /// A plain (not FUA) write of at most [`INLINE_WRITE_MAX_BYTES`] to a regular
    /// file runs right here with `pwrite` instead of as an SQE. The kernel cannot
    /// start a buffered write to a regular file without blocking (ext4 refuses
    /// `IOCB_NOWAIT` for them), so io_uring punts every such SQE to an io-wq worker,
    /// which runs the writes to one file one at a time (hashed by inode) and passes
    /// each completion back to this thread: two thread wake-ups per batch for a
    /// page-cache copy of a few microseconds (profiled: about a third of the CPU
    /// of a 4 KiB random write). Done here, writes to the file are still one at a
    /// time, and the wake-ups are gone. FUA writes wait for the disk and large
    /// writes take long to copy, so those still go to io-wq. Block devices keep
    /// the SQE path too: their page cache takes non-blocking writes on recent
    /// kernels, and this machine kind has none to measure on.
    fn writes_inline(&self, len_bytes: usize) -> bool {
        self.backing.kind == BackingKind::RegularFile && len_bytes <= INLINE_WRITE_MAX_BYTES
    }

    /// A flush with no other op in flight or waiting runs right here
    /// (`fdatasync`) instead of as an SQE. io_uring cannot start an fsync without
    /// blocking, so it punts every one to an io-wq worker and passes the completion
    /// back: two thread wake-ups on top of the sync's own waits (profiled: 4 KiB
    /// write + flush at queue depth 1). With nothing else to do this thread would
    /// only sleep until that completion, so waiting in `fdatasync` itself costs the
    /// other ops nothing, except those submitted during the sync, which wait for
    /// it (at most one sync; cached reads never reach the engine). With other ops
    /// outstanding the flush goes through the ring as before, so it runs alongside
    /// them. Called with the flush's own slot taken.
    fn flushes_inline(&self) -> bool {
        self.in_flight() == 1 && self.sq.is_empty() && !self.anything_queued()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn anything_queued(&self) -> bool {
        !self.shared.queue.is_empty() || !self.shared.overflow.is_empty()
    }

    fn can_pull(&self) -> bool {
        !self.free.is_empty() && self.anything_queued()
    }

    fn cq_ready(&mut self) -> bool {
        self.cq.sync();
        !self.cq.is_empty()
    }

    /// Moves queued ops into free slots and starts them: the fast queue's first
    /// (they are older than any that overflowed), then the overflow queue's.
    fn pull_queued(&mut self) {
        while let Some(&index) = self.free.last() {
            let Some((op, token)) = self.shared.queue.pop().or_else(|| self.shared.overflow.pop()) else {
                return;
            };
            self.free.pop();
            if self.backing.read_only && op.mutates() {
                self.finish(index, token, Err(Errno::EROFS), op.into_buf());
                continue;
            }
            if let IoOp::Write { offset, buf, fua: false } = &op
                && self.writes_inline(buf.len())
            {
                // Hand the SQEs already prepared to the kernel first: this thread
                // is about to spend a few microseconds in a system call.
                if !self.sq.is_empty() {
                    self.enter(0);
                }
                let result = ops::pwrite_full(self.backing.fd(), buf, *offset, false);
                self.finish(index, token, result, op.into_buf());
                continue;
            }
            if matches!(op, IoOp::Flush) && self.flushes_inline() {
                let result = ops::fdatasync(self.backing.fd());
                self.finish(index, token, result, op.into_buf());
                continue;
            }
            let mut task = Task::new(op, self.backing);
            match task.step(self.fd, self.backing, None) {
                Step::Submit(entry) => {
                    self.slots[index as usize] = Some(InFlight { token, task });
                    self.push(&entry.user_data(u64::from(index)));
                }
                Step::Done(result) => self.finish(index, token, result, task.into_buf()),
            }
        }
    }

    /// Handles every completion the kernel has posted.
    fn reap(&mut self) {
        loop {
            // Copy a batch out and publish the new head before handling it, so the
            // CQ space is free again before the handlers submit follow-up SQEs.
            let mut batch = [(0u64, 0i32); CQE_BATCH];
            let mut count = 0;
            self.cq.sync();
            for cqe in &mut self.cq {
                batch[count] = (cqe.user_data(), cqe.result());
                count += 1;
                if count == CQE_BATCH {
                    break;
                }
            }
            self.cq.sync();
            for &(user_data, result) in &batch[..count] {
                self.on_cqe(user_data, result);
            }
            if count < CQE_BATCH {
                return;
            }
        }
    }

    fn on_cqe(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE_USER_DATA {
            self.wake_armed = false;
            if !self.shared.stop.load(Ordering::SeqCst) {
                self.arm_wake();
            }
            return;
        }
        let (fd, backing) = (self.fd, self.backing);
        let step = match self.slots.get_mut(user_data as usize) {
            Some(Some(in_flight)) => in_flight.task.step(fd, backing, Some(result)),
            _ => {
                tracing::error!(user_data, "io_uring completion for an empty slot; ignored");
                return;
            }
        };
        match step {
            Step::Submit(entry) => self.push(&entry.user_data(user_data)),
            Step::Done(result) => {
                let index = user_data as u32;
                if let Some(InFlight { token, task }) = self.slots[index as usize].take() {
                    self.finish(index, token, result, task.into_buf());
                }
            }
        }
    }

    /// Frees the slot, then completes: the caller may submit again from inside the
    /// callback, and that op must find room.
    fn finish(&mut self, index: u32, token: S::Token, result: Result<(), Errno>, buf: IoBuf) {
        self.free.push(index);
        deliver(self.sink, token, result, buf);
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(Fd(self.shared.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        self.push(&entry);
        self.wake_armed = true;
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every entry's memory outlives its operation. Op buffers are
            // owned by the slab slot named by `user_data` and not touched until its
            // CQE is reaped; the wake buffer is boxed and lives as long as the loop;
            // ZEROES is static. If the loop ends early (a panic), Drop leaks them.
            if unsafe { self.sq.push(entry) }.is_ok() {
                return;
            }
            // The SQ is full: hand the batch to the kernel to make room.
            self.enter(0);
        }
    }

    fn enter(&mut self, want: usize) {
        self.sq.sync();
        if let Err(e) = self.submitter.submit_and_wait(want) {
            // EINTR: a signal; EAGAIN/EBUSY: transient kernel shortage. The loop
            // comes back here either way.
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) {
                tracing::error!(error = %e, "io_uring_enter failed");
                std::thread::yield_now();
            }
        }
        self.sq.sync();
    }
}

impl<S: IoSink> Drop for RingLoop<'_, S> {
    fn drop(&mut self) {
        // Reached with work outstanding only when unwinding from a bug. The kernel
        // may still write into those buffers after the ring closes, so leak them
        // rather than free memory the kernel is writing to.
        if self.in_flight() > 0 || self.wake_armed {
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}

/// An op in flight and how far it got.
enum Task {
    Read { offset: u64, buf: BufMut, done_bytes: usize },
    Write { offset: u64, buf: Buf, fua: bool, done_bytes: usize },
    Flush,
    Cache { offset: u64, len_bytes: u64 },
    Range(RangeJob),
}

enum Step {
    Submit(squeue::Entry),
    Done(Result<(), Errno>),
}

impl Task {
    fn new(op: IoOp, backing: &Backing) -> Task {
        match op {
            IoOp::Read { offset, buf } => Task::Read { offset, buf, done_bytes: 0 },
            IoOp::Write { offset, buf, fua } => Task::Write { offset, buf, fua, done_bytes: 0 },
            IoOp::Flush => Task::Flush,
            IoOp::Trim { offset, len, fua } => Task::Range(RangeJob::trim(backing.kind, offset, len, fua)),
            IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
                Task::Range(RangeJob::write_zeroes(backing.kind, offset, len, may_trim, fast_only, fua))
            }
            IoOp::Cache { offset, len } => Task::Cache { offset, len_bytes: len },
        }
    }

    fn into_buf(self) -> IoBuf {
        match self {
            Task::Read { buf, .. } => IoBuf::Read(buf),
            Task::Write { buf, .. } => IoBuf::Write(buf),
            _ => IoBuf::None,
        }
    }

    /// The next SQE, or the op's result. `last` is the previous SQE's CQE result
    /// (`None` to start).
    fn step(&mut self, fd: Fd, backing: &Backing, last: Option<i32>) -> Step {
        match self {
            Task::Read { offset, buf, done_bytes } => {
                match last {
                    None => {}
                    Some(res) if is_retry(res) => {}
                    Some(res) if res < 0 => return Step::Done(Err(Errno::from_raw(-res))),
                    // End of file (it shrank underneath us): the rest reads as zeroes.
                    Some(0) => {
                        buf[*done_bytes..].fill(0);
                        return Step::Done(Ok(()));
                    }
                    Some(read) => *done_bytes += read as usize,
                }
                if *done_bytes >= buf.len() {
                    return Step::Done(Ok(()));
                }
                let rest = &mut buf[*done_bytes..];
                let len_bytes = rest.len().min(MAX_RW_CHUNK_BYTES) as u32;
                let at = *offset + *done_bytes as u64;
                Step::Submit(opcode::Read::new(fd, rest.as_mut_ptr(), len_bytes).offset(at).build())
            }
            Task::Write { offset, buf, fua, done_bytes } => {
                match last {
                    None => {}
                    Some(res) if is_retry(res) => {}
                    Some(res) if res < 0 => return Step::Done(Err(Errno::from_raw(-res))),
                    // A zero-byte write of a non-empty buffer would loop forever.
                    Some(0) => return Step::Done(Err(Errno::EIO)),
                    Some(written) => *done_bytes += written as usize,
                }
                if *done_bytes >= buf.len() {
                    return Step::Done(Ok(()));
                }
                let rest = &buf[*done_bytes..];
                let len_bytes = rest.len().min(MAX_RW_CHUNK_BYTES) as u32;
                let at = *offset + *done_bytes as u64;
                // RWF_DSYNC per write: each piece is durable before it completes.
                let rw_flags = if *fua { libc::RWF_DSYNC } else { 0 };
                Step::Submit(
                    opcode::Write::new(fd, rest.as_ptr(), len_bytes).offset(at).rw_flags(rw_flags).build(),
                )
            }
            Task::Flush => match last {
                None => Step::Submit(datasync(fd)),
                Some(res) if is_retry(res) => Step::Submit(datasync(fd)),
                Some(res) => Step::Done(errno_result(res).map(|_| ())),
            },
            Task::Cache { offset, len_bytes } => match last {
                None => {
                    // FADVISE's length is 32 bits in older kernels; prefetching the
                    // first 4 GiB of a larger range is plenty.
                    let len = (*len_bytes).min(u64::from(u32::MAX)) as libc::off_t;
                    let advice = libc::POSIX_FADV_WILLNEED;
                    Step::Submit(opcode::Fadvise::new(fd, len, advice).offset(*offset).build())
                }
                Some(_) => Step::Done(Ok(())),
            },
            Task::Range(job) => {
                let mut last = last.map(errno_result);
                loop {
                    let action = match job.advance(last) {
                        Next::Run(action) => action,
                        Next::Done(result) => return Step::Done(result),
                    };
                    let entry = match action {
                        Action::Fallocate { mode, offset, len_bytes } => {
                            opcode::Fallocate::new(fd, len_bytes).offset(offset).mode(mode).build()
                        }
                        Action::WriteZeroes { offset, len_bytes } => {
                            opcode::Write::new(fd, ZEROES.as_ptr(), len_bytes as u32).offset(offset).build()
                        }
                        Action::Datasync => datasync(fd),
                        // io_uring has no opcode for these block-device ioctls, so they
                        // run inline and hold up the ring thread while they last
                        // (device trims; zeroing on kernels without bdev fallocate).
                        Action::BlkDiscard { .. } | Action::BlkZeroout { .. } => {
                            last = Some(ops::run_action(backing.fd(), action));
                            continue;
                        }
                    };
                    return Step::Submit(entry);
                }
            }
        }
    }
}

fn datasync(fd: Fd) -> squeue::Entry {
    opcode::Fsync::new(fd).flags(FsyncFlags::DATASYNC).build()
}

fn errno_result(res: i32) -> Result<u64, Errno> {
    if res < 0 { Err(Errno::from_raw(-res)) } else { Ok(res as u64) }
}

/// Results after which the same request is simply issued again.
fn is_retry(res: i32) -> bool {
    res == -libc::EINTR || res == -libc::EAGAIN
}
