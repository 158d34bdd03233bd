//! TRIM and WRITE_ZEROES as small state machines over system-call steps.
//!
//! Both need several calls with fallbacks (zero-range, else punch-and-allocate,
//! else write zeroes; then `fdatasync` for FUA). A [`RangeJob`] decides the next
//! [`Action`] from the previous one's result, and each engine runs the actions its
//! own way: the posix engine with blocking calls, the uring engine as SQEs (with the
//! block-device ioctls inline). One decision procedure, so the engines cannot
//! disagree on semantics.

use nix::errno::Errno;

use super::BackingKind;

/// The largest write used to zero a range when no fallocate mode works.
pub(crate) const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// The source of written zeroes; static so its address stays valid for in-flight
/// io_uring writes, and never allocated per op.
pub(crate) static ZEROES: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];

const FALLOC_PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// Plain allocation that never changes the file size.
const FALLOC_ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

/// One system call of a job. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Fallocate {
        mode: i32,
        offset: u64,
        len_bytes: u64,
    },
    /// `BLKDISCARD` ioctl (block devices).
    BlkDiscard {
        offset: u64,
        len_bytes: u64,
    },
    /// `BLKZEROOUT` ioctl (block devices).
    BlkZeroout {
        offset: u64,
        len_bytes: u64,
    },
    /// A write of `len_bytes` (at most [`ZERO_CHUNK_BYTES`]) from [`ZEROES`].
    WriteZeroes {
        offset: u64,
        len_bytes: usize,
    },
    Datasync,
}

/// What a job wants next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Run(Action),
    Done(Result<(), Errno>),
}

/// Ways to carry out a trim or a write-zeroes, tried in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Punch hole (file) or BLKDISCARD (device); "unsupported" counts as done,
    /// because a trim is only advice.
    Discard,
    Fallocate(i32),
    /// Punch a hole, then allocate it again: zeroes that stay allocated, for file
    /// systems with hole punching but no zero-range (tmpfs, older NFS).
    PunchThenAllocate,
    BlkZeroout,
    Write,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// The next method in the list has to be started.
    NextMethod,
    Trying(Method),
    /// The hole of [`Method::PunchThenAllocate`] is being allocated again.
    Allocating,
    Writing {
        done_bytes: u64,
    },
    Syncing,
}

const MAX_METHODS: usize = 4;

/// A trim or write-zeroes in progress.
#[derive(Debug)]
pub(crate) struct RangeJob {
    kind: BackingKind,
    offset: u64,
    len_bytes: u64,
    fua: bool,
    methods: [Method; MAX_METHODS],
    method_count: usize,
    next_method: usize,
    phase: Phase,
    /// The action in flight, repeated when it is interrupted.
    running: Option<Action>,
}

impl RangeJob {
    pub fn trim(kind: BackingKind, offset: u64, len_bytes: u64, fua: bool) -> RangeJob {
        RangeJob::new(kind, offset, len_bytes, fua, &[Method::Discard])
    }

    /// Picks the methods for a write-zeroes. With `fast_only` only methods that
    /// cost about the same whatever the length remain: no written zeroes, and on a
    /// block device no `ZERO_RANGE`/`BLKZEROOUT`, which the kernel may carry out by
    /// writing zeroes. Exhausting the list then fails with `ENOTSUP` having changed
    /// nothing.
    pub fn write_zeroes(
        kind: BackingKind,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> RangeJob {
        use Method::{BlkZeroout, Fallocate, PunchThenAllocate, Write};
        let punch = Fallocate(FALLOC_PUNCH);
        let zero_range = Fallocate(FALLOC_ZERO_RANGE);
        let methods: &[Method] = match (kind, may_trim, fast_only) {
            (BackingKind::RegularFile, true, false) => &[punch, zero_range, Write],
            (BackingKind::RegularFile, true, true) => &[punch, zero_range],
            (BackingKind::RegularFile, false, false) => &[zero_range, PunchThenAllocate, Write],
            (BackingKind::RegularFile, false, true) => &[zero_range, PunchThenAllocate],
            // On a block device punch-hole means "write zeroes, unmap allowed, never
            // by writing" (BLKDEV_ZERO_NOFALLBACK) and zero-range "write zeroes,
            // no unmap", which may fall back to writing inside the kernel.
            (BackingKind::BlockDevice, true, false) => &[punch, zero_range, BlkZeroout, Write],
            (BackingKind::BlockDevice, true, true) => &[punch],
            (BackingKind::BlockDevice, false, false) => &[zero_range, BlkZeroout, Write],
            (BackingKind::BlockDevice, false, true) => &[],
        };
        RangeJob::new(kind, offset, len_bytes, fua, methods)
    }

    fn new(kind: BackingKind, offset: u64, len_bytes: u64, fua: bool, list: &[Method]) -> RangeJob {
        let mut methods = [Method::Write; MAX_METHODS];
        methods[..list.len()].copy_from_slice(list);
        RangeJob {
            kind,
            offset,
            len_bytes,
            fua,
            methods,
            method_count: list.len(),
            next_method: 0,
            phase: Phase::NextMethod,
            running: None,
        }
    }

    /// The next step. `last` is the result of the previous [`Next::Run`] action
    /// (bytes written for [`Action::WriteZeroes`]); `None` on the first call.
    pub fn advance(&mut self, last: Option<Result<u64, Errno>>) -> Next {
        if let (Some(Err(Errno::EINTR | Errno::EAGAIN)), Some(action)) = (last, self.running) {
            return Next::Run(action);
        }
        let next = self.step(last);
        self.running = match next {
            Next::Run(action) => Some(action),
            Next::Done(_) => None,
        };
        next
    }

    fn step(&mut self, last: Option<Result<u64, Errno>>) -> Next {
        // The first call and a phase that just started have no result to look at;
        // treat them as a success of nothing.
        let last = last.unwrap_or(Ok(0));
        match self.phase {
            Phase::NextMethod if self.len_bytes == 0 => self.finish(),
            Phase::NextMethod => self.start_next_method(),
            Phase::Trying(method) => match last {
                Ok(_) if method == Method::PunchThenAllocate => {
                    self.phase = Phase::Allocating;
                    Next::Run(self.fallocate(FALLOC_ALLOCATE))
                }
                Ok(_) => self.finish(),
                Err(Errno::EOPNOTSUPP) if method == Method::Discard => self.finish(),
                Err(e) if method != Method::Discard && is_unsupported(e) => self.start_next_method(),
                Err(e) => Next::Done(Err(e)),
            },
            // The range already reads as zeroes; failing to allocate it again only
            // loses the "no hole" wish, unless the file system is out of space.
            Phase::Allocating => match last {
                Ok(_) => self.finish(),
                Err(e) if is_unsupported(e) => self.finish(),
                Err(e) => Next::Done(Err(e)),
            },
            Phase::Writing { done_bytes } => match last {
                // A zero-byte write of a non-empty chunk would loop forever.
                Ok(0) => Next::Done(Err(Errno::EIO)),
                Ok(written) => {
                    let done_bytes = done_bytes + written;
                    self.phase = Phase::Writing { done_bytes };
                    if done_bytes >= self.len_bytes {
                        self.finish()
                    } else {
                        Next::Run(self.write_chunk(done_bytes))
                    }
                }
                Err(e) => Next::Done(Err(e)),
            },
            Phase::Syncing => Next::Done(last.map(|_| ())),
        }
    }

    fn start_next_method(&mut self) -> Next {
        if self.next_method >= self.method_count {
            // Only a fast-only list runs out: nothing was changed.
            return Next::Done(Err(Errno::ENOTSUP));
        }
        let method = self.methods[self.next_method];
        self.next_method += 1;
        let action = match method {
            Method::Discard => match self.kind {
                BackingKind::RegularFile => self.fallocate(FALLOC_PUNCH),
                BackingKind::BlockDevice => {
                    Action::BlkDiscard { offset: self.offset, len_bytes: self.len_bytes }
                }
            },
            Method::Fallocate(mode) => self.fallocate(mode),
            Method::PunchThenAllocate => self.fallocate(FALLOC_PUNCH),
            Method::BlkZeroout => Action::BlkZeroout { offset: self.offset, len_bytes: self.len_bytes },
            Method::Write => {
                self.phase = Phase::Writing { done_bytes: 0 };
                return Next::Run(self.write_chunk(0));
            }
        };
        self.phase = Phase::Trying(method);
        Next::Run(action)
    }

    fn fallocate(&self, mode: i32) -> Action {
        Action::Fallocate { mode, offset: self.offset, len_bytes: self.len_bytes }
    }

    fn write_chunk(&self, done_bytes: u64) -> Action {
        let len_bytes = (self.len_bytes - done_bytes).min(ZERO_CHUNK_BYTES as u64) as usize;
        Action::WriteZeroes { offset: self.offset + done_bytes, len_bytes }
    }

    fn finish(&mut self) -> Next {
        if self.fua {
            self.phase = Phase::Syncing;
            Next::Run(Action::Datasync)
        } else {
            Next::Done(Ok(()))
        }
    }
}

/// Errors meaning "this method does not work here; try the next one": the file
/// system or device lacks the mode, or (EINVAL) rejects it for this range, e.g. a
/// device range not aligned to its sectors.
fn is_unsupported(e: Errno) -> bool {
    matches!(e, Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS | Errno::ENOTTY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a job against scripted results: `respond` answers each action.
    fn run(
        mut job: RangeJob,
        mut respond: impl FnMut(Action) -> Result<u64, Errno>,
    ) -> (Vec<Action>, Result<(), Errno>) {
        let mut actions = Vec::new();
        let mut last = None;
        for _ in 0..1000 {
            match job.advance(last) {
                Next::Run(action) => {
                    actions.push(action);
                    last = Some(respond(action));
                }
                Next::Done(result) => return (actions, result),
            }
        }
        panic!("job did not finish: {actions:?}");
    }

    fn write_len(action: Action) -> Result<u64, Errno> {
        match action {
            Action::WriteZeroes { len_bytes, .. } => Ok(len_bytes as u64),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    #[test]
    fn zero_range_success_with_fua_syncs() {
        let job = RangeJob::write_zeroes(BackingKind::RegularFile, 4096, 8192, false, false, true);
        let (actions, result) = run(job, |_| Ok(0));
        assert_eq!(result, Ok(()));
        assert_eq!(
            actions,
            [Action::Fallocate { mode: FALLOC_ZERO_RANGE, offset: 4096, len_bytes: 8192 }, Action::Datasync]
        );
    }

    #[test]
    fn no_fallocate_falls_back_to_chunked_writes() {
        let len_bytes = 2 * ZERO_CHUNK_BYTES as u64 + 5;
        let job = RangeJob::write_zeroes(BackingKind::RegularFile, 10, len_bytes, true, false, false);
        let (actions, result) = run(job, write_len);
        assert_eq!(result, Ok(()));
        let writes: Vec<_> = actions.iter().filter(|a| matches!(a, Action::WriteZeroes { .. })).collect();
        assert_eq!(writes.len(), 3);
        assert_eq!(
            *writes[2],
            Action::WriteZeroes { offset: 10 + 2 * ZERO_CHUNK_BYTES as u64, len_bytes: 5 }
        );
    }

    #[test]
    fn short_and_interrupted_writes_are_continued() {
        let job = RangeJob::write_zeroes(BackingKind::RegularFile, 0, 100, false, false, false);
        let mut interrupted = false;
        let (actions, result) = run(job, |action| match action {
            Action::WriteZeroes { .. } if !interrupted => {
                interrupted = true;
                Err(Errno::EINTR)
            }
            Action::WriteZeroes { len_bytes, .. } => Ok((len_bytes as u64).min(30)),
            _ => Err(Errno::EOPNOTSUPP),
        });
        assert_eq!(result, Ok(()));
        let last = actions.last().copied();
        assert_eq!(last, Some(Action::WriteZeroes { offset: 90, len_bytes: 10 }));
    }

    #[test]
    fn fast_only_never_writes_and_reports_enotsup() {
        for kind in [BackingKind::RegularFile, BackingKind::BlockDevice] {
            for may_trim in [false, true] {
                let job = RangeJob::write_zeroes(kind, 0, 1 << 20, may_trim, true, true);
                let (actions, result) = run(job, write_len);
                assert_eq!(result, Err(Errno::ENOTSUP), "{kind:?} may_trim={may_trim}");
                assert!(
                    actions.iter().all(|a| matches!(a, Action::Fallocate { .. })),
                    "{kind:?} may_trim={may_trim}: {actions:?}"
                );
            }
        }
    }

    #[test]
    fn punch_then_allocate_when_zero_range_is_missing() {
        let job = RangeJob::write_zeroes(BackingKind::RegularFile, 0, 4096, false, true, false);
        let (actions, result) = run(job, |action| match action {
            Action::Fallocate { mode: FALLOC_ZERO_RANGE, .. } => Err(Errno::EOPNOTSUPP),
            _ => Ok(0),
        });
        assert_eq!(result, Ok(()));
        let modes: Vec<_> = actions
            .iter()
            .map(|a| match a {
                Action::Fallocate { mode, .. } => *mode,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(modes, [FALLOC_ZERO_RANGE, FALLOC_PUNCH, FALLOC_ALLOCATE]);
    }

    #[test]
    fn unsupported_trim_succeeds_and_real_errors_fail() {
        let job = RangeJob::trim(BackingKind::BlockDevice, 0, 4096, false);
        assert_eq!(run(job, |_| Err(Errno::EOPNOTSUPP)).1, Ok(()));
        let job = RangeJob::trim(BackingKind::RegularFile, 0, 4096, false);
        assert_eq!(run(job, |_| Err(Errno::EIO)).1, Err(Errno::EIO));
        let job = RangeJob::write_zeroes(BackingKind::RegularFile, 0, 4096, true, false, false);
        assert_eq!(run(job, |_| Err(Errno::ENOSPC)).1, Err(Errno::ENOSPC));
    }

    #[test]
    fn empty_range_does_nothing_but_the_sync() {
        let job = RangeJob::write_zeroes(BackingKind::BlockDevice, 0, 0, false, true, true);
        assert_eq!(run(job, |_| Ok(0)), (vec![Action::Datasync], Ok(())));
    }
}
