//! Engine tests: every body below runs once per engine (see `engine_tests!`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nbd_server::buf::{Buf, BufMut};
use nix::errno::Errno;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const MIB: u64 = 1 << 20;
/// Generous: only a hung engine gets anywhere near it.
const DEADLINE: Duration = Duration::from_secs(60);

struct Completion {
    token: u64,
    result: Result<(), Errno>,
    buf: IoBuf,
}

/// Records completions and lets the test wait for a number of them.
#[derive(Default)]
struct Recorder {
    done: Mutex<Vec<Completion>>,
    changed: Condvar,
    /// Panic instead of recording this token (0 = never; such tests start at 1).
    panic_on_token: AtomicU64,
    /// Hold the completing engine thread inside the callback for this token until
    /// [`Recorder::release`] (0 = never): the engine is then busy and its queue fills.
    hold_token: AtomicU64,
    /// (the held callback has been entered, it may return).
    hold: Mutex<(bool, bool)>,
    hold_changed: Condvar,
}

impl IoSink for Recorder {
    type Token = u64;
    fn complete(&self, token: u64, result: Result<(), Errno>, buf: IoBuf) {
        if token != 0 && token == self.panic_on_token.load(Ordering::Relaxed) {
            panic!("test sink panics on token {token} (expected)");
        }
        if token != 0 && token == self.hold_token.load(Ordering::Relaxed) {
            let mut hold = self.hold.lock().unwrap();
            hold.0 = true;
            self.hold_changed.notify_all();
            while !hold.1 {
                hold = self.hold_changed.wait(hold).unwrap();
            }
        }
        self.done.lock().unwrap().push(Completion { token, result, buf });
        self.changed.notify_all();
    }
}

impl Recorder {
    /// Waits until at least `count` completions arrived and takes the first `count`.
    fn take(&self, count: usize) -> Vec<Completion> {
        let deadline = Instant::now() + DEADLINE;
        let mut done = self.done.lock().unwrap();
        while done.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "only {} of {count} completions within {DEADLINE:?}", done.len());
            done = self.changed.wait_timeout(done, left).unwrap().0;
        }
        done.drain(..count).collect()
    }

    /// Waits until an engine thread is held in the callback for `hold_token`.
    fn wait_held(&self) {
        let deadline = Instant::now() + DEADLINE;
        let mut hold = self.hold.lock().unwrap();
        while !hold.0 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the held completion did not arrive within {DEADLINE:?}");
            hold = self.hold_changed.wait_timeout(hold, left).unwrap().0;
        }
    }

    /// Lets the held callback return.
    fn release(&self) {
        self.hold.lock().unwrap().1 = true;
        self.hold_changed.notify_all();
    }

    /// Completions not taken yet; after a shutdown, any would be extra ones.
    fn untaken(&self) -> usize {
        self.done.lock().unwrap().len()
    }
}

/// A uniquely named file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn sparse(size_bytes: u64) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("blockd-storage-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        let file = std::fs::File::create_new(&path).unwrap();
        file.set_len(size_bytes).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Harness {
    storage: Storage<Recorder>,
    sink: Arc<Recorder>,
    next_token: AtomicU64,
}

impl Harness {
    fn open(engine: EngineKind, file: &TempFile) -> Harness {
        Harness::open_with(file, &StorageOptions { engine, ..StorageOptions::default() })
    }

    fn open_with(file: &TempFile, opts: &StorageOptions) -> Harness {
        let sink = Arc::new(Recorder::default());
        let storage = Storage::open(file.path(), opts, Arc::clone(&sink)).unwrap();
        if opts.engine != EngineKind::Auto {
            assert_eq!(storage.engine_name(), opts.engine.to_string());
        }
        Harness { storage, sink, next_token: AtomicU64::new(0) }
    }

    /// Runs one op to completion and checks that its token came back.
    fn run(&self, op: IoOp) -> (Result<(), Errno>, IoBuf) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.storage.submit(op, token);
        let mut done = self.sink.take(1);
        let c = done.pop().unwrap();
        assert_eq!(c.token, token);
        (c.result, c.buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) {
        let (result, buf) = self.run(IoOp::Write { offset, buf: filled(data), fua });
        assert_eq!(result, Ok(()), "write of {} bytes at {offset}", data.len());
        assert!(matches!(buf, IoBuf::Write(b) if b.len() == data.len()), "the write buffer comes back");
    }

    fn read(&self, offset: u64, len_bytes: usize) -> BufMut {
        match self.run(IoOp::Read { offset, buf: BufMut::unpooled(len_bytes) }) {
            (Ok(()), IoBuf::Read(buf)) => buf,
            (result, buf) => panic!("read at {offset}: {result:?} {buf:?}"),
        }
    }

    fn ok(&self, op: IoOp) {
        let desc = format!("{op:?}");
        assert_eq!(self.run(op).0, Ok(()), "{desc}");
    }
}

fn filled(data: &[u8]) -> Buf {
    let mut buf = BufMut::unpooled(data.len());
    buf.copy_from_slice(data);
    buf.freeze()
}

/// Bytes that differ with position, so misplaced data shows.
fn pattern(seed: u64, len_bytes: usize) -> Vec<u8> {
    (0..len_bytes as u64).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8 + 1).collect()
}

fn hole(len: u64) -> Extent {
    Extent { len, hole: true, zero: true }
}

fn data(len: u64) -> Extent {
    Extent { len, hole: false, zero: false }
}

macro_rules! engine_tests {
    ($($name:ident),* $(,)?) => {
        mod posix_engine {
            $( #[test] fn $name() { super::$name(super::EngineKind::Posix) } )*
        }
        mod uring_engine {
            $( #[test] fn $name() { super::$name(super::EngineKind::Uring) } )*
        }
    };
}

engine_tests!(
    round_trip_at_random_offsets,
    fua_write_and_flush,
    trim_punches_a_hole,
    write_zeroes_reads_back_zeroes,
    fast_only_zeroes_succeed_on_this_file_system,
    large_write_and_read,
    failed_writes_report_their_errno,
    concurrent_ops_complete_exactly_once,
    block_status_follows_allocation,
    shutdown_completes_queued_ops,
    drop_completes_queued_ops,
    read_past_end_of_file_fills_zeroes,
    read_only_refuses_changes,
    small_inflight_bound_reuses_slots,
    a_panicking_sink_does_not_stop_the_engine,
    cached_reads_complete_inline_and_cold_reads_use_the_engine,
    a_full_queue_overflows_without_blocking,
    overflowed_ops_start_in_submission_order,
    overflow_wakes_an_idle_engine,
    concurrent_submitters_overflow_and_all_complete,
    shutdown_completes_overflowed_ops,
);

fn round_trip_at_random_offsets(engine: EngineKind) {
    let size_bytes = 16 * MIB;
    let file = TempFile::sparse(size_bytes);
    let h = Harness::open(engine, &file);
    let mut shadow = vec![0u8; size_bytes as usize];
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for round in 0..200 {
        let len_bytes = rng.random_range(1..=256 * 1024);
        let offset = rng.random_range(0..=size_bytes - len_bytes as u64);
        let bytes = pattern(round, len_bytes);
        h.write(offset, &bytes, false);
        shadow[offset as usize..][..len_bytes].copy_from_slice(&bytes);
        assert!(*h.read(offset, len_bytes) == bytes[..], "round {round} at {offset}");
    }
    let whole = h.read(0, size_bytes as usize);
    assert!(*whole == shadow[..], "the whole file matches the shadow copy");
    h.storage.shutdown();
}

/// Small plain writes (which the io_uring engine does on its ring thread), FUA and
/// large ones (SQEs) report the kernel's errno and give their buffer back.
fn failed_writes_report_their_errno(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let h = Harness::open(engine, &file);
    // Past the largest file size of every Linux file system, inside off_t.
    let offset = (i64::MAX as u64 / 2) & !4095;
    for (len_bytes, fua) in [(4096, false), (4096, true), (1 << 20, false)] {
        let data = pattern(3, len_bytes);
        let (result, buf) = h.run(IoOp::Write { offset, buf: filled(&data), fua });
        assert!(
            matches!(result, Err(Errno::EFBIG | Errno::EINVAL)),
            "{len_bytes} bytes, fua {fua}: {result:?}"
        );
        assert!(matches!(buf, IoBuf::Write(b) if b.len() == len_bytes), "the write buffer comes back");
    }
    h.write(0, &pattern(4, 4096), false);
    h.storage.shutdown();
}

fn fua_write_and_flush(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let h = Harness::open(engine, &file);
    let bytes = pattern(1, 8192);
    h.write(4096, &bytes, true);
    h.write(100, &bytes[..333], true);
    h.ok(IoOp::Flush);
    assert!(*h.read(100, 333) == bytes[..333]);
    assert!(*h.read(4096, 8192) == bytes[..]);
    h.storage.shutdown();
    // What the engine wrote is in the file as any other reader sees it.
    assert_eq!(std::fs::read(file.path()).unwrap()[4096..4096 + 8192], bytes[..]);
}

fn trim_punches_a_hole(engine: EngineKind) {
    let file = TempFile::sparse(4 * MIB);
    let h = Harness::open(engine, &file);
    h.write(0, &pattern(2, 4 * MIB as usize), false);
    assert_eq!(h.storage.block_status(0, 4 * MIB, 16), Ok(vec![data(4 * MIB)]));
    h.ok(IoOp::Trim { offset: MIB, len: MIB, fua: false });
    h.ok(IoOp::Trim { offset: 3 * MIB, len: MIB / 2, fua: true });
    assert_eq!(
        h.storage.block_status(0, 4 * MIB, 16),
        Ok(vec![data(MIB), hole(MIB), data(MIB), hole(MIB / 2), data(MIB / 2)])
    );
    // A trimmed file range reads back as zeroes (a file-system guarantee, not NBD's).
    assert!(h.read(MIB, MIB as usize).iter().all(|&b| b == 0));
    h.ok(IoOp::Trim { offset: 0, len: 0, fua: false });
}

fn write_zeroes_reads_back_zeroes(engine: EngineKind) {
    let size_bytes = 4 * MIB;
    let file = TempFile::sparse(size_bytes);
    let h = Harness::open(engine, &file);
    h.write(0, &vec![0xab; size_bytes as usize], false);
    let ranges = [(0, MIB, false), (MIB + 100, 5000, false), (2 * MIB, MIB, true), (3 * MIB + 7, 9999, true)];
    for (offset, len, may_trim) in ranges {
        h.ok(IoOp::WriteZeroes { offset, len, may_trim, fast_only: false, fua: may_trim });
    }
    let whole = h.read(0, size_bytes as usize);
    for (i, &byte) in whole.iter().enumerate() {
        let i = i as u64;
        let zeroed = ranges.iter().any(|&(offset, len, _)| (offset..offset + len).contains(&i));
        assert_eq!(byte, if zeroed { 0 } else { 0xab }, "byte {i}");
    }
    // may_trim on a file punches a hole: the range is deallocated.
    assert_eq!(h.storage.block_status(2 * MIB, MIB, 4), Ok(vec![hole(MIB)]));
}

fn fast_only_zeroes_succeed_on_this_file_system(engine: EngineKind) {
    let file = TempFile::sparse(2 * MIB);
    let h = Harness::open(engine, &file);
    h.write(0, &vec![0x11; 2 * MIB as usize], false);
    for (offset, may_trim) in [(0, false), (MIB, true)] {
        h.ok(IoOp::WriteZeroes { offset, len: MIB, may_trim, fast_only: true, fua: false });
    }
    assert!(h.read(0, 2 * MIB as usize).iter().all(|&b| b == 0));
}

fn large_write_and_read(engine: EngineKind) {
    let len_bytes = 32 * MIB as usize;
    let file = TempFile::sparse(0);
    let h = Harness::open(engine, &file);
    let bytes = pattern(3, len_bytes);
    h.write(4096, &bytes, false);
    assert!(*h.read(4096, len_bytes) == bytes[..]);
}

fn concurrent_ops_complete_exactly_once(engine: EngineKind) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 250;
    const BLOCK: usize = 4096;
    let file = TempFile::sparse(THREADS * PER_THREAD * BLOCK as u64);
    let h = Harness::open(engine, &file);
    let block_of = |token: u64| pattern(token, BLOCK);

    // Writes, then reads, each from four threads at once; token = block number.
    for phase in ["write", "read"] {
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let storage = &h.storage;
                s.spawn(move || {
                    for token in t * PER_THREAD..(t + 1) * PER_THREAD {
                        let offset = token * BLOCK as u64;
                        let op = match phase {
                            "write" => {
                                IoOp::Write { offset, buf: filled(&block_of(token)), fua: token % 50 == 0 }
                            }
                            _ => IoOp::Read { offset, buf: BufMut::unpooled(BLOCK) },
                        };
                        storage.submit(op, token);
                    }
                });
            }
        });
        let done = h.sink.take((THREADS * PER_THREAD) as usize);
        let tokens: HashSet<u64> = done.iter().map(|c| c.token).collect();
        assert_eq!(tokens, (0..THREADS * PER_THREAD).collect(), "{phase}: every token exactly once");
        for c in done {
            assert_eq!(c.result, Ok(()), "{phase} {}", c.token);
            if let IoBuf::Read(buf) = c.buf {
                assert!(*buf == block_of(c.token)[..], "block {}", c.token);
            }
        }
    }
    let Harness { storage, sink, .. } = h;
    storage.shutdown();
    assert_eq!(sink.untaken(), 0, "no op completed twice");
}

fn block_status_follows_allocation(engine: EngineKind) {
    let size_bytes = 8 * MIB;
    let file = TempFile::sparse(size_bytes);
    let h = Harness::open(engine, &file);
    assert_eq!(h.storage.block_status(0, size_bytes, 16), Ok(vec![hole(size_bytes)]));
    h.write(0, &pattern(4, 64 * 1024), false);
    h.write(4 * MIB, &pattern(5, 4096), false);
    let rest = size_bytes - 4 * MIB - 4096;
    assert_eq!(
        h.storage.block_status(0, size_bytes, 16),
        Ok(vec![data(64 * 1024), hole(4 * MIB - 64 * 1024), data(4096), hole(rest)])
    );
    // Bounded by max_extents and by len; starting inside an extent.
    assert_eq!(
        h.storage.block_status(0, size_bytes, 2),
        Ok(vec![data(64 * 1024), hole(4 * MIB - 64 * 1024)])
    );
    assert_eq!(h.storage.block_status(4096, 4096, 16), Ok(vec![data(4096)]));
    assert_eq!(h.storage.block_status(MIB, 3 * MIB + 10, 16), Ok(vec![hole(3 * MIB), data(10)]));
    assert_eq!(h.storage.block_status(0, 0, 16), Err(Errno::EINVAL));
    assert_eq!(h.storage.block_status(0, 1, 0), Err(Errno::EINVAL));
    // Past the end of the file (e.g. it shrank) is a hole.
    assert_eq!(h.storage.block_status(size_bytes, MIB, 16), Ok(vec![hole(MIB)]));
}

/// Submits a burst of writes and flushes without waiting for any of them.
fn submit_burst(h: &Harness, count: u64) {
    for token in 0..count {
        let op = if token % 10 == 9 {
            IoOp::Flush
        } else {
            IoOp::Write { offset: token * 4096, buf: filled(&pattern(token, 4096)), fua: false }
        };
        h.storage.submit(op, token);
    }
}

fn shutdown_completes_queued_ops(engine: EngineKind) {
    let file = TempFile::sparse(0);
    let h = Harness::open(engine, &file);
    submit_burst(&h, 2000);
    let Harness { storage, sink, .. } = h;
    storage.shutdown();
    // No waiting: shutdown returns only after every op completed.
    let done = std::mem::take(&mut *sink.done.lock().unwrap());
    assert_eq!(done.len(), 2000);
    assert!(done.iter().all(|c| c.result.is_ok()));
    // The last op (token 1999) is a flush; the last write is block 1998.
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 1999 * 4096);
}

fn drop_completes_queued_ops(engine: EngineKind) {
    let file = TempFile::sparse(0);
    let h = Harness::open(engine, &file);
    submit_burst(&h, 500);
    let Harness { storage, sink, .. } = h;
    drop(storage);
    assert_eq!(sink.untaken(), 500);
}

fn read_past_end_of_file_fills_zeroes(engine: EngineKind) {
    let file = TempFile::sparse(0);
    std::fs::write(file.path(), vec![0x5a; 8192]).unwrap();
    let h = Harness::open(engine, &file);
    assert_eq!(h.storage.size_bytes(), 8192);
    assert_eq!(h.storage.backing_kind(), BackingKind::RegularFile);
    let buf = h.read(4096, 16384);
    assert!(buf[..4096].iter().all(|&b| b == 0x5a));
    assert!(buf[4096..].iter().all(|&b| b == 0));
    assert!(h.read(1 << 40, 4096).iter().all(|&b| b == 0));
}

fn read_only_refuses_changes(engine: EngineKind) {
    let file = TempFile::sparse(0);
    std::fs::write(file.path(), vec![0x77; 4096]).unwrap();
    let h =
        Harness::open_with(&file, &StorageOptions { engine, read_only: true, ..StorageOptions::default() });
    let (result, buf) = h.run(IoOp::Write { offset: 0, buf: filled(&[1; 512]), fua: false });
    assert_eq!(result, Err(Errno::EROFS));
    assert!(matches!(buf, IoBuf::Write(_)), "the buffer still comes back");
    assert_eq!(h.run(IoOp::Trim { offset: 0, len: 4096, fua: false }).0, Err(Errno::EROFS));
    let zeroes = IoOp::WriteZeroes { offset: 0, len: 4096, may_trim: false, fast_only: false, fua: false };
    assert_eq!(h.run(zeroes).0, Err(Errno::EROFS));
    assert!(h.read(0, 4096).iter().all(|&b| b == 0x77));
    h.ok(IoOp::Flush);
    h.ok(IoOp::Cache { offset: 0, len: 4096 });
}

fn small_inflight_bound_reuses_slots(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let opts = StorageOptions { engine, max_inflight: 2, posix_threads: 1, ..StorageOptions::default() };
    let h = Harness::open_with(&file, &opts);
    // Keep exactly two ops in flight: submit the next one as each completes.
    h.storage.submit(IoOp::Write { offset: 0, buf: filled(&pattern(0, 4096)), fua: false }, 0);
    for token in 1..100u64 {
        h.storage.submit(
            IoOp::Write { offset: token * 4096, buf: filled(&pattern(token, 4096)), fua: false },
            token,
        );
        let done = h.sink.take(1);
        assert_eq!(done[0].result, Ok(()));
    }
    h.sink.take(1);
    for token in [0, 42, 99] {
        assert!(*h.read(token * 4096, 4096) == pattern(token, 4096)[..]);
    }
}

fn a_panicking_sink_does_not_stop_the_engine(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let opts = StorageOptions { engine, posix_threads: 1, ..StorageOptions::default() };
    let h = Harness::open_with(&file, &opts);
    h.sink.panic_on_token.store(7, Ordering::Relaxed);
    h.storage.submit(IoOp::Flush, 7);
    // The only worker thread (or the ring thread) still serves the next ops.
    for token in 8..20 {
        h.storage.submit(IoOp::Flush, token);
    }
    let tokens: HashSet<u64> = h.sink.take(12).iter().map(|c| c.token).collect();
    assert_eq!(tokens, (8..20).collect());
}

#[test]
fn engine_kind_parses_and_displays() {
    for kind in [EngineKind::Auto, EngineKind::Uring, EngineKind::Posix] {
        assert_eq!(kind.to_string().parse::<EngineKind>(), Ok(kind));
    }
    let err = "epoll".parse::<EngineKind>().unwrap_err();
    assert_eq!(err.to_string(), "unknown I/O engine `epoll` (expected auto, uring or posix)");
}

#[test]
fn auto_uses_uring_where_the_kernel_allows_it() {
    let file = TempFile::sparse(MIB);
    let h = Harness::open(EngineKind::Auto, &file);
    let expected = if uring::Ring::probe(8).is_ok() { "uring" } else { "posix" };
    assert_eq!(h.storage.engine_name(), expected);
    h.write(0, b"auto", false);
    assert_eq!(&*h.read(0, 4), b"auto");
}

#[test]
fn open_errors_name_the_path() {
    let sink = Arc::new(Recorder::default());
    let missing = std::env::temp_dir().join(format!("blockd-storage-missing-{}", std::process::id()));
    let err = Storage::open(&missing, &StorageOptions::default(), Arc::clone(&sink)).err().unwrap();
    assert!(matches!(err, StorageError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");

    let read_only = StorageOptions { read_only: true, ..StorageOptions::default() };
    for path in [std::env::temp_dir(), PathBuf::from("/dev/null")] {
        let err = Storage::open(&path, &read_only, Arc::clone(&sink)).err().unwrap();
        assert!(matches!(err, StorageError::NotFileOrDevice { .. }), "{err:?}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
}

#[test]
fn storage_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Storage<Recorder>>();
}

fn cached_reads_complete_inline_and_cold_reads_use_the_engine(engine: EngineKind) {
    let file = TempFile::sparse(4 * MIB);
    let h = Harness::open(engine, &file);
    let bytes = pattern(9, INLINE_READ_MAX_BYTES);
    h.write(MIB, &bytes, false);
    // Just written, so in the page cache: served before submit() returns.
    h.storage.submit(IoOp::Read { offset: MIB, buf: BufMut::unpooled(bytes.len()) }, 77);
    assert_eq!(h.sink.untaken(), 1, "a cached read completes inline");
    let c = h.sink.take(1).pop().unwrap();
    assert!(c.token == 77 && c.result.is_ok());
    assert!(matches!(c.buf, IoBuf::Read(b) if *b == bytes[..]));
    // Evicted from the cache: the engine reads it from the disk, same bytes.
    h.ok(IoOp::Flush);
    let f = std::fs::File::open(file.path()).unwrap();
    nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    assert!(*h.read(MIB, bytes.len()) == bytes[..], "a cold read returns the same data");
    // A read straddling the end of the file falls back to the engine, which zero-fills.
    let tail = h.read(4 * MIB - 4096, 8192);
    assert!(tail.iter().all(|&b| b == 0));
}

/// An engine whose queue holds `max_inflight` ops and whose only thread is held in
/// the completion callback of token 1 (so nothing it has queued moves).
fn held_engine(engine: EngineKind, file: &TempFile, max_inflight: usize) -> Harness {
    let opts = StorageOptions { engine, max_inflight, posix_threads: 1, ..StorageOptions::default() };
    let h = Harness::open_with(file, &opts);
    h.sink.hold_token.store(1, Ordering::Relaxed);
    h.storage.submit(IoOp::Flush, 1);
    h.sink.wait_held();
    h
}

/// Submits from another thread and fails the test if that does not return: a submit
/// that waited for the held engine would never return.
fn submit_all_or_fail(h: &Harness, ops: Vec<(IoOp, u64)>) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let storage = &h.storage;
        s.spawn(move || {
            for (op, token) in ops {
                storage.submit(op, token);
            }
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(DEADLINE).is_err() {
            // Unblock the submitter so the scope can end, then fail.
            h.sink.release();
            panic!("submit blocked on a full engine queue for {DEADLINE:?}");
        }
    });
}

fn write_op(token: u64, offset: u64) -> IoOp {
    IoOp::Write { offset, buf: filled(&pattern(token, 4096)), fua: false }
}

fn a_full_queue_overflows_without_blocking(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let h = held_engine(engine, &file, 2);
    assert_eq!(h.storage.stats(), StorageStats::default());
    // Two fit in the engine's queue; the other 98 overflow.
    submit_all_or_fail(&h, (2..102).map(|token| (write_op(token, token * 4096), token)).collect());
    assert_eq!(h.storage.stats(), StorageStats { overflow_ops_total: 98, overflow_queued_ops: 98 });
    assert_eq!(h.sink.untaken(), 0, "nothing moves while the engine is held");
    h.sink.release();
    let done = h.sink.take(101);
    let tokens: HashSet<u64> = done.iter().map(|c| c.token).collect();
    assert_eq!(tokens, (1..102).collect(), "every op exactly once");
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(h.storage.stats(), StorageStats { overflow_ops_total: 98, overflow_queued_ops: 0 });
    for token in [2, 3, 4, 101] {
        assert!(*h.read(token * 4096, 4096) == pattern(token, 4096)[..], "block {token}");
    }
}

fn overflowed_ops_start_in_submission_order(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    // One op at a time (one slot, one worker): completion order is start order.
    let h = held_engine(engine, &file, 1);
    // All to the same block: the last one submitted must be what stays.
    submit_all_or_fail(&h, (2..200).map(|token| (write_op(token, 0), token)).collect());
    assert!(h.storage.stats().overflow_queued_ops > 0);
    // More while the overflow queue is not empty go behind it, not around it.
    h.sink.release();
    for token in 200..300 {
        h.storage.submit(write_op(token, 0), token);
    }
    let order: Vec<u64> = h.sink.take(299).iter().map(|c| c.token).collect();
    assert_eq!(order, (1..300).collect::<Vec<_>>());
    assert!(*h.read(0, 4096) == pattern(299, 4096)[..]);
}

fn overflow_wakes_an_idle_engine(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let opts = StorageOptions { engine, max_inflight: 2, posix_threads: 2, ..StorageOptions::default() };
    let h = Harness::open_with(&file, &opts);
    // Each round starts with the engine idle (everything completed, its threads
    // going to sleep) and overflows at once; a lost wake-up leaves a round hanging.
    let mut token = 0;
    for round in 0..300u64 {
        let burst = 3 + round % 8;
        for _ in 0..burst {
            let op = if token % 3 == 0 { IoOp::Flush } else { write_op(token, (token % 256) * 4096) };
            h.storage.submit(op, token);
            token += 1;
        }
        assert!(h.sink.take(burst as usize).iter().all(|c| c.result.is_ok()), "round {round}");
    }
    assert!(h.storage.stats().overflow_ops_total > 0, "the bursts overflowed");
    assert_eq!(h.storage.stats().overflow_queued_ops, 0);
}

fn concurrent_submitters_overflow_and_all_complete(engine: EngineKind) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 500;
    let file = TempFile::sparse(THREADS * PER_THREAD * 4096);
    let opts = StorageOptions { engine, max_inflight: 4, posix_threads: 2, ..StorageOptions::default() };
    let h = Harness::open_with(&file, &opts);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let storage = &h.storage;
            s.spawn(move || {
                for token in t * PER_THREAD..(t + 1) * PER_THREAD {
                    storage.submit(write_op(token, token * 4096), token);
                }
            });
        }
    });
    let done = h.sink.take((THREADS * PER_THREAD) as usize);
    let tokens: HashSet<u64> = done.iter().map(|c| c.token).collect();
    assert_eq!(tokens, (0..THREADS * PER_THREAD).collect());
    assert!(done.iter().all(|c| c.result.is_ok()));
    for token in [0, 777, THREADS * PER_THREAD - 1] {
        assert!(*h.read(token * 4096, 4096) == pattern(token, 4096)[..], "block {token}");
    }
    let Harness { storage, sink, .. } = h;
    storage.shutdown();
    assert_eq!(sink.untaken(), 0, "no op completed twice");
}

fn shutdown_completes_overflowed_ops(engine: EngineKind) {
    let file = TempFile::sparse(MIB);
    let h = held_engine(engine, &file, 2);
    submit_all_or_fail(&h, (2..200).map(|token| (write_op(token, (token % 200) * 4096), token)).collect());
    assert!(h.storage.stats().overflow_queued_ops > 0);
    h.sink.release();
    let Harness { storage, sink, .. } = h;
    storage.shutdown();
    // No waiting: shutdown returns only after every op, overflowed ones included.
    assert_eq!(sink.untaken(), 199);
}
