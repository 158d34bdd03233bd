//! Scattered writes and sparse-aware comparisons for the resync tests (issue 4).
//!
//! - [`Plan`]: a seeded list of non-overlapping, 4 KiB-aligned extents and their
//!   content. Content is a function of `(seed, absolute offset)` only, so writing a
//!   plan twice writes the same bytes, and a granule's content does not depend on
//!   how the extents cut it.
//! - [`write_plan`]: writes a plan through one raw NBD connection, pipelined.
//! - [`ScatterLoad`]: the same in a background thread that survives a dying server
//!   (kill -9): it records which extents were issued (sent, maybe partly) and which
//!   were acknowledged.
//! - [`dirty_bytes`]: the 4 KiB granules a set of extents touches, in bytes.
//! - [`data_segments`] / [`assert_data_equal`]: compare two (sparse) backing files
//!   over `[0, size)` reading only the union of their data segments
//!   (`SEEK_DATA`/`SEEK_HOLE`): everything else is a hole in both, i.e. zeroes in
//!   both, so this is a complete comparison that costs the written bytes, not the
//!   device size (a 16 GiB device with 64 MiB written compares ~64 MiB).
//! - [`check_plan`]: a file holds a plan's content in the given extents.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::daemon::Addr;
use crate::pattern::splitmix64;
use crate::raw::{CMD_FLUSH, CMD_WRITE, RawClient, Reply};

/// The bitmap granule the tests assume (SPEC §5 default, `bitmap-granularity`).
pub const GRANULE: u64 = 4096;

/// One write: `len` bytes at `offset` (both multiples of [`GRANULE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A seeded write plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Seeds the content (not only the layout).
    pub seed: u64,
    /// In issue order; never overlapping.
    pub extents: Vec<Extent>,
}

impl Plan {
    /// Extents of `min..=max` bytes (multiples of 4 KiB) at random 4 KiB-aligned
    /// offsets inside `region`, never overlapping, until they add up to at least
    /// `total` bytes. Deterministic for a seed.
    pub fn random(seed: u64, region: Range<u64>, total: u64, min: u64, max: u64) -> Plan {
        assert!(
            min >= GRANULE && min <= max && min.is_multiple_of(GRANULE) && max.is_multiple_of(GRANULE),
            "{min}..={max}"
        );
        assert!(
            region.start.is_multiple_of(GRANULE)
                && region.end.is_multiple_of(GRANULE)
                && region.end > region.start
        );
        assert!(total <= (region.end - region.start) / 2, "a plan may fill at most half of its region");
        let mut state = seed ^ 0x5ca7_7e12_d00d_f00d;
        let granules = (region.end - region.start) / GRANULE;
        let sizes = (max - min) / GRANULE + 1;
        // start -> end of every extent placed so far.
        let mut placed: BTreeMap<u64, u64> = BTreeMap::new();
        let mut extents = Vec::new();
        let mut bytes = 0;
        let mut attempts = 0u64;
        while bytes < total {
            attempts += 1;
            assert!(attempts < 100 * (total / GRANULE + 100), "cannot place extents (region too full?)");
            let len = min + (splitmix64(&mut state) % sizes) * GRANULE;
            let start = region.start + (splitmix64(&mut state) % granules) * GRANULE;
            let end = start + len;
            if end > region.end {
                continue;
            }
            let before = placed.range(..end).next_back();
            if before.is_some_and(|(_, &e)| e > start) {
                continue;
            }
            placed.insert(start, end);
            extents.push(Extent { offset: start, len });
            bytes += len;
        }
        Plan { seed, extents }
    }

    /// Extents of `chunk` bytes tiling `region` in order (the last may be shorter).
    pub fn sequential(seed: u64, region: Range<u64>, chunk: u64) -> Plan {
        assert!(
            chunk.is_multiple_of(GRANULE)
                && region.start.is_multiple_of(GRANULE)
                && region.end.is_multiple_of(GRANULE)
        );
        let mut extents = Vec::new();
        let mut at = region.start;
        while at < region.end {
            let len = chunk.min(region.end - at);
            extents.push(Extent { offset: at, len });
            at += len;
        }
        Plan { seed, extents }
    }

    /// The same extents with content from another seed.
    pub fn reseeded(&self, seed: u64) -> Plan {
        Plan { seed, extents: self.extents.clone() }
    }

    /// Bytes written by the whole plan.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Bytes of the granules the whole plan touches.
    pub fn dirty_bytes(&self) -> u64 {
        dirty_bytes(self.extents.iter())
    }

    /// The content of `e`: 8-byte words derived from (seed, absolute offset); never
    /// an all-zero granule (so a resync must carry it as data).
    pub fn data(&self, e: &Extent) -> Vec<u8> {
        content(self.seed, e.offset, e.len)
    }
}

/// The plan content of `[offset, offset + len)` for `seed` (8-byte aligned).
pub fn content(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    assert!(offset.is_multiple_of(8) && len.is_multiple_of(8));
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ at;
        // Word 0 of every granule is never zero.
        let w = splitmix64(&mut state) | 1;
        out.extend_from_slice(&w.to_le_bytes());
        at += 8;
    }
    out
}

/// Bytes of the distinct [`GRANULE`]s the extents touch.
pub fn dirty_bytes<'a>(extents: impl IntoIterator<Item = &'a Extent>) -> u64 {
    let mut set = BTreeSet::new();
    for e in extents {
        for g in e.offset / GRANULE..e.end().div_ceil(GRANULE) {
            set.insert(g);
        }
    }
    set.len() as u64 * GRANULE
}

/// What a writer did.
#[derive(Debug, Default)]
pub struct WriteLog {
    /// Extents `0..issued` were sent (the last maybe partly, when the connection died).
    pub issued: usize,
    /// `acked[i]`: extent i was acknowledged (successfully).
    pub acked: Vec<bool>,
    /// Why the writer stopped early (connection died, NBD error), if it did.
    pub error: Option<String>,
}

impl WriteLog {
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|&&a| a).count()
    }

    /// The acknowledged extents of `plan`.
    pub fn acked_extents<'a>(&'a self, plan: &'a Plan) -> impl Iterator<Item = &'a Extent> + 'a {
        plan.extents.iter().zip(&self.acked).filter(|(_, a)| **a).map(|(e, _)| e)
    }

    /// The issued extents of `plan` (acknowledged or not).
    pub fn issued_extents<'a>(&self, plan: &'a Plan) -> &'a [Extent] {
        &plan.extents[..self.issued]
    }
}

/// The writer loop: up to `qd` WRITEs in flight (cookie = index + 1), then a
/// FLUSH if `flush`; stops issuing when `stop` is set; returns on the first I/O or
/// NBD error (recorded in `log.error`).
fn run_writer(
    c: &mut RawClient,
    plan: &Plan,
    qd: usize,
    flush: bool,
    stop: &AtomicBool,
    acked_bytes: &AtomicU64,
    log: &mut WriteLog,
) {
    let n = plan.extents.len();
    log.acked = vec![false; n];
    let mut inflight = 0usize;
    let mut next = 0usize;
    let result = (|| -> Result<(), String> {
        loop {
            if next < n && inflight < qd && !stop.load(Ordering::Relaxed) {
                let e = plan.extents[next];
                log.issued = next + 1;
                let data = plan.data(&e);
                c.request(0, CMD_WRITE, next as u64 + 1, e.offset, e.len as u32, &data)
                    .map_err(|err| format!("sending WRITE {next} at {}: {err}", e.offset))?;
                next += 1;
                inflight += 1;
                continue;
            }
            if inflight == 0 {
                break;
            }
            match c.read_reply().map_err(|err| format!("reading a reply: {err}"))? {
                Reply::Simple { error: 0, cookie } if cookie >= 1 && cookie as usize <= next => {
                    let i = cookie as usize - 1;
                    log.acked[i] = true;
                    acked_bytes.fetch_add(plan.extents[i].len, Ordering::Relaxed);
                }
                r => return Err(format!("unexpected reply {r:?}")),
            }
            inflight -= 1;
        }
        if flush && !stop.load(Ordering::Relaxed) {
            let cookie = u64::MAX;
            c.request(0, CMD_FLUSH, cookie, 0, 0, &[]).map_err(|e| format!("sending FLUSH: {e}"))?;
            match c.read_reply().map_err(|e| format!("FLUSH reply: {e}"))? {
                Reply::Simple { error: 0, cookie: got } if got == cookie => {}
                r => return Err(format!("FLUSH: unexpected reply {r:?}")),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        log.error = Some(e);
    }
}

/// Writes the whole plan (pipelined, `qd` in flight) through one NBD connection to
/// `export` at `addr`, then FLUSHes. Panics on any error.
pub fn write_plan(addr: &Addr, export: &str, plan: &Plan, qd: usize) {
    let (mut c, size, _) = RawClient::handshake(addr, export, false);
    if let Some(e) = plan.extents.iter().find(|e| e.end() > size) {
        panic!("extent {e:?} is past the end of the export ({size} bytes)");
    }
    let mut log = WriteLog::default();
    run_writer(&mut c, plan, qd, true, &AtomicBool::new(false), &AtomicU64::new(0), &mut log);
    if let Some(e) = log.error {
        panic!("writing the plan ({} of {} extents issued): {e}", log.issued, plan.extents.len());
    }
    let _ = c.request(0, crate::raw::CMD_DISC, 0, 0, 0, &[]);
}

/// A [`Plan`] being written by a background thread.
pub struct ScatterLoad {
    stop: Arc<AtomicBool>,
    acked_bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<WriteLog>>,
}

impl std::fmt::Debug for ScatterLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScatterLoad").field("acked_bytes", &self.acked_bytes()).finish()
    }
}

impl ScatterLoad {
    /// Connects (panics if the handshake fails: the server must be up) and starts
    /// writing `plan` with `qd` writes in flight.
    pub fn start(addr: &Addr, export: &str, plan: Arc<Plan>, qd: usize) -> ScatterLoad {
        let (mut c, size, _) = RawClient::handshake(addr, export, false);
        if let Some(e) = plan.extents.iter().find(|e| e.end() > size) {
            panic!("extent {e:?} is past the end of the export ({size} bytes)");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acked_bytes = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), acked_bytes.clone());
        let thread = thread::Builder::new()
            .name("scatter-load".into())
            .spawn(move || {
                let mut log = WriteLog::default();
                run_writer(&mut c, &plan, qd, false, &s, &a, &mut log);
                log
            })
            .expect("spawn scatter writer");
        ScatterLoad { stop, acked_bytes, thread: Some(thread) }
    }

    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Polls until `n` bytes were acknowledged; panics after `timeout` or when the
    /// writer ended first.
    pub fn wait_acked_bytes(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.acked_bytes();
            if have >= n {
                return;
            }
            assert!(self.running(), "the scatter writer ended with {have}/{n} bytes acknowledged");
            assert!(Instant::now() < deadline, "only {have}/{n} bytes acknowledged after {timeout:?}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops issuing (what is in flight completes or fails) and returns the log.
    pub fn finish(mut self) -> WriteLog {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("joined once").join().expect("scatter writer panicked")
    }
}

impl Drop for ScatterLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The data segments of `path` inside `[0, limit)` (`SEEK_DATA`/`SEEK_HOLE`).
pub fn data_segments(path: &Path, limit: u64) -> Vec<Range<u64>> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    // Bounded: each step moves forward by at least one byte, and a file has far
    // fewer segments than this.
    for _ in 0..10_000_000 {
        if at >= limit {
            return out;
        }
        // SAFETY: lseek(2) on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA {}: {err}", path.display());
            return out;
        }
        let data = data as u64;
        if data >= limit {
            return out;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        assert!(hole >= 0, "SEEK_HOLE {}: {}", path.display(), io::Error::last_os_error());
        let end = (hole as u64).min(limit);
        out.push(data..end);
        at = end.max(data + 1);
    }
    panic!("{}: too many data segments", path.display());
}

/// Sorted union of ranges.
pub fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Compares `a` and `b` over `ranges`; Err names the first differing byte.
pub fn compare_ranges(a: &Path, b: &Path, ranges: &[Range<u64>]) -> Result<u64, String> {
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (fa, fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut compared = 0;
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(ba.len() as u64) as usize;
            read_at_or_zero(&fa, &mut ba[..n], at, a);
            read_at_or_zero(&fb, &mut bb[..n], at, b);
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
                let off = at + i as u64;
                return Err(format!(
                    "{} and {} differ at byte {off} (granule {}): {:#04x} vs {:#04x}",
                    a.display(),
                    b.display(),
                    off / GRANULE,
                    ba[i],
                    bb[i]
                ));
            }
            compared += n as u64;
            at += n as u64;
        }
    }
    Ok(compared)
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zero.
fn read_at_or_zero(f: &fs::File, buf: &mut [u8], off: u64, path: &Path) {
    buf.fill(0);
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => return,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read {} at {}: {e}", path.display(), off + done as u64),
        }
    }
}

/// Asserts that `a` and `b` hold the same bytes in `[0, size)`, reading only the
/// union of both files' data segments (the rest is a hole, i.e. zeroes, in both).
/// Returns the bytes compared.
pub fn assert_data_equal(a: &Path, b: &Path, size: u64) -> u64 {
    let mut segs = data_segments(a, size);
    segs.extend(data_segments(b, size));
    let segs = merge(segs);
    compare_ranges(a, b, &segs).unwrap_or_else(|e| panic!("the copies differ: {e}"))
}

/// Checks that the file at `path` holds `plan`'s content in `extents`.
pub fn check_plan<'a>(
    path: &Path,
    plan: &Plan,
    extents: impl IntoIterator<Item = &'a Extent>,
) -> Result<usize, String> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut checked = 0;
    for e in extents {
        let want = plan.data(e);
        let mut got = vec![0u8; e.len as usize];
        read_at_or_zero(&f, &mut got, e.offset, path);
        if got != want {
            let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap_or(0);
            let zero = got.iter().all(|&b| b == 0);
            return Err(format!(
                "{}: extent {e:?} (seed {}) differs at byte {}{}",
                path.display(),
                plan.seed,
                e.offset + i as u64,
                if zero { " (the extent reads as zeroes)" } else { "" }
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_plan_is_deterministic_aligned_and_disjoint() {
        let p = Plan::random(7, 0..(1 << 30), 8 << 20, 4096, 65536);
        let q = Plan::random(7, 0..(1 << 30), 8 << 20, 4096, 65536);
        assert_eq!(p.extents, q.extents);
        assert!(p.bytes() >= 8 << 20);
        let mut sorted = p.extents.clone();
        sorted.sort_by_key(|e| e.offset);
        for w in sorted.windows(2) {
            assert!(w[0].end() <= w[1].offset, "{w:?} overlap");
        }
        assert!(p.extents.iter().all(|e| e.offset.is_multiple_of(GRANULE) && e.len.is_multiple_of(GRANULE)));
        // Disjoint and aligned: the dirty granules are exactly the bytes written.
        assert_eq!(p.dirty_bytes(), p.bytes());
    }

    #[test]
    fn dirty_bytes_counts_shared_granules_once() {
        let e = [Extent { offset: 0, len: 8192 }, Extent { offset: 4096, len: 4096 }];
        assert_eq!(dirty_bytes(&e), 8192);
    }

    #[test]
    fn content_depends_on_offset_not_on_extent() {
        assert_eq!(content(3, 4096, 8192)[4096..], content(3, 8192, 4096)[..]);
        assert_ne!(content(3, 0, 4096), content(4, 0, 4096));
        assert!(content(3, 0, 4096).iter().any(|&b| b != 0));
    }

    #[test]
    fn merge_joins_overlaps() {
        assert_eq!(merge(vec![5..7, 0..2, 1..3, 7..8]), vec![0..3, 5..8]);
    }
}
