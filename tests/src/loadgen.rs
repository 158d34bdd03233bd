//! Acknowledged-write load generator and verifier ("no acknowledged write
//! lost").
//!
//! [`LoadGen::start`] runs one writer thread per NBD connection. Each writer
//! writes single blocks at random block indices of a region, with up to
//! `queue_depth` requests in flight, each block a self-describing pattern
//! ([`crate::pattern`]: magic `BLKDLOAD`, run id, writer id, per-writer seq,
//! block index, CRC-32). Optionally every `flush_every` writes a writer sends
//! a FLUSH. Everything is logged in memory (bounded by `max_ops`):
//!
//! * every write issued, with a global *issue stamp* taken just before the
//!   request is sent and, when its successful reply arrives, an *ack stamp*
//!   taken just after the reply was read. Stamps come from one global counter
//!   shared by all writers, so "`W2.issued > W1.acked`" means W2 was sent
//!   after W1's reply arrived: the server must have applied W1 first.
//! * every FLUSH the same way. A FLUSH covers every write whose ack stamp is
//!   smaller than the FLUSH's issue stamp, on any connection (the export
//!   advertises `CAN_MULTI_CONN`).
//!
//! A writer ends on [`LoadGen::stop`], when `max_ops` writes were issued in
//! all, at `max_duration`, or when its connection dies (a killed server is
//! expected: the error is recorded in [`WriterEnd`], nothing panics).
//!
//! # What the verifiers accept
//!
//! For a set `D` of writes that must be durable ([`verify_acked`]: every
//! acknowledged write; [`verify_flushed`]: every write acknowledged before the
//! last acknowledged FLUSH was sent), every block that some write of `D`
//! targeted must hold a write `C` of this run to that block such that no
//! write of `D` to that block was issued after `C` was acknowledged
//! (`C.acked > T`, `T` = the largest issue stamp of `D`'s writes to the
//! block; a write never acknowledged — in flight at the crash, or answered
//! with an error — counts as acknowledged at infinity).
//!
//! Without overlapping writes in flight this is exactly "the last
//! acknowledged write, or a write to the block issued after that ack (in
//! flight at the crash)". With overlap (two connections writing one block
//! concurrently, which the generator does on purpose: SPEC §4 conflict
//! detection) it also accepts any write that was concurrent with the last
//! required one, since NBD does not order concurrent requests. Older data,
//! zeros, garbage, a torn block, or a block of another run are violations.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::daemon::Addr;
use crate::pattern::{self, Decoded, RawHeader};
use crate::raw::{CMD_DISC, CMD_FLUSH, CMD_WRITE, RawClient, Reply};

/// Magic of load-generator blocks.
pub const LOADGEN_MAGIC: [u8; 8] = *b"BLKDLOAD";

/// Load generator options. `Default`: 4 connections, 4 KiB blocks, region
/// `[0, 32 MiB)`, no FLUSH, queue depth 4, seed 1, at most 1,000,000 writes,
/// at most 10 minutes, no rate cap.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// NBD connections, one writer thread each.
    pub connections: usize,
    /// Bytes per write (= per block); at least 64.
    pub block_bytes: u32,
    /// Start of the region written (a multiple of `block_bytes`).
    pub region_offset: u64,
    /// Length of the region written (a multiple of `block_bytes`).
    pub region_bytes: u64,
    /// Each writer sends a FLUSH after every this many of its writes.
    pub flush_every: Option<u32>,
    /// Requests in flight per connection (1 = no pipelining).
    pub queue_depth: usize,
    /// Seeds the block choice (the run id also mixes in the clock).
    pub seed: u64,
    /// Writes issued by all writers together; also bounds the log.
    pub max_ops: u64,
    /// Writers stop issuing after this long.
    pub max_duration: Duration,
    /// Caps the rate of writes issued by all writers together (each writer paces
    /// itself at its share), so that a long run against a fast server stays within
    /// `max_ops`. None: as fast as the server answers.
    pub max_writes_per_sec: Option<u64>,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            connections: 4,
            block_bytes: 4096,
            region_offset: 0,
            region_bytes: 32 << 20,
            flush_every: None,
            queue_depth: 4,
            seed: 1,
            max_ops: 1_000_000,
            max_duration: Duration::from_secs(600),
            max_writes_per_sec: None,
        }
    }
}

/// One write issued by the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRec {
    pub writer: u32,
    /// Per-writer sequence number (0, 1, 2, ...).
    pub seq: u64,
    /// Absolute block index (byte offset / block_bytes).
    pub block: u64,
    /// Global stamp taken just before the request was sent.
    pub issued: u64,
    /// Global stamp taken just after its successful reply was read; None if
    /// no reply (in flight when the connection died) or an error reply.
    pub acked: Option<u64>,
    /// NBD error of an error reply.
    pub error: Option<u32>,
}

impl fmt::Display for WriteRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writer {} seq {} block {} issued@{}", self.writer, self.seq, self.block, self.issued)?;
        match (self.acked, self.error) {
            (Some(a), _) => write!(f, " acked@{a}"),
            (None, Some(e)) => write!(f, " failed (NBD error {e})"),
            (None, None) => write!(f, " never acknowledged"),
        }
    }
}

/// One FLUSH issued by the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushRec {
    pub writer: u32,
    /// Global stamp taken just before the FLUSH was sent: it covers every
    /// write with `acked < issued`.
    pub issued: u64,
    pub acked: Option<u64>,
    pub error: Option<u32>,
}

/// Why a writer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// [`LoadGen::stop`] (or drop).
    Stopped,
    /// `max_ops` writes were issued in all.
    MaxOps,
    /// `max_duration` passed.
    MaxDuration,
    /// The connection failed (server killed, link cut, protocol error): the
    /// error text.
    ConnectionDied(String),
}

/// One writer's summary.
#[derive(Debug, Clone)]
pub struct WriterEnd {
    pub writer: u32,
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub flushes_acked: u64,
    pub end: EndReason,
}

impl WriterEnd {
    pub fn died(&self) -> bool {
        matches!(self.end, EndReason::ConnectionDied(_))
    }
}

/// Everything a finished [`LoadGen`] did.
#[derive(Debug, Clone)]
pub struct AckLog {
    pub run_id: u64,
    pub block_bytes: u32,
    pub region_offset: u64,
    pub region_bytes: u64,
    /// Every write issued, in issue order.
    pub writes: Vec<WriteRec>,
    /// Every FLUSH issued, in issue order.
    pub flushes: Vec<FlushRec>,
    pub writers: Vec<WriterEnd>,
}

impl AckLog {
    /// Acknowledged writes, in ack order.
    pub fn acked_writes(&self) -> Vec<&WriteRec> {
        let mut v: Vec<&WriteRec> = self.writes.iter().filter(|w| w.acked.is_some()).collect();
        v.sort_by_key(|w| w.acked);
        v
    }

    pub fn acked_count(&self) -> usize {
        self.writes.iter().filter(|w| w.acked.is_some()).count()
    }

    /// Writes with no reply at all (in flight when their connection died).
    pub fn in_flight_count(&self) -> usize {
        self.writes.iter().filter(|w| w.acked.is_none() && w.error.is_none()).count()
    }

    /// Writes and FLUSHes answered with an NBD error.
    pub fn error_count(&self) -> usize {
        self.writes.iter().filter(|w| w.error.is_some()).count()
            + self.flushes.iter().filter(|f| f.error.is_some()).count()
    }

    pub fn flushes_acked(&self) -> usize {
        self.flushes.iter().filter(|f| f.acked.is_some()).count()
    }

    /// Writers whose connection died.
    pub fn connections_died(&self) -> usize {
        self.writers.iter().filter(|w| w.died()).count()
    }

    /// The acknowledged FLUSH sent last (it covers the most).
    pub fn last_acked_flush(&self) -> Option<&FlushRec> {
        self.flushes.iter().filter(|f| f.acked.is_some()).max_by_key(|f| f.issued)
    }

    /// The writes a FLUSH covers: acknowledged before it was sent.
    pub fn covered_by<'a>(&'a self, flush: &FlushRec) -> impl Iterator<Item = &'a WriteRec> + 'a {
        let t = flush.issued;
        self.writes.iter().filter(move |w| w.acked.is_some_and(|a| a < t))
    }

    /// The exact block content `w` wrote.
    pub fn pattern(&self, w: &WriteRec) -> Vec<u8> {
        pattern::pattern(self.block_bytes, &LOADGEN_MAGIC, self.run_id, w.writer as u64, w.seq, w.block)
    }

    /// The write (writer, seq), if it was issued.
    pub fn find(&self, writer: u32, seq: u64) -> Option<&WriteRec> {
        self.writes.iter().find(|w| w.writer == writer && w.seq == seq)
    }

    /// One-line summary.
    pub fn summary(&self) -> String {
        format!(
            "run {:#018x}: {} writes issued, {} acknowledged, {} in flight, {} errors, {} FLUSHes acknowledged, \
             {}/{} connections died",
            self.run_id,
            self.writes.len(),
            self.acked_count(),
            self.in_flight_count(),
            self.error_count(),
            self.flushes_acked(),
            self.connections_died(),
            self.writers.len()
        )
    }

    /// Writes the whole log as text (one record per line) for post-mortems.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut f = io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(f, "# {}", self.summary())?;
        writeln!(
            f,
            "# block_bytes={} region_offset={} region_bytes={}",
            self.block_bytes, self.region_offset, self.region_bytes
        )?;
        for w in &self.writers {
            writeln!(
                f,
                "writer {} issued={} acked={} flushes_acked={} end={:?}",
                w.writer, w.writes_issued, w.writes_acked, w.flushes_acked, w.end
            )?;
        }
        for w in &self.writes {
            writeln!(f, "write {w}")?;
        }
        for fl in &self.flushes {
            writeln!(
                f,
                "flush writer {} issued@{} acked={:?} error={:?}",
                fl.writer, fl.issued, fl.acked, fl.error
            )?;
        }
        f.flush()
    }
}

struct Shared {
    clock: AtomicU64,
    tickets: AtomicU64,
    stop: AtomicBool,
    acked: AtomicU64,
    flushes_acked: AtomicU64,
    running: AtomicUsize,
}

impl Shared {
    fn stamp(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

/// A running load generator. Dropping it without [`LoadGen::finish`] stops
/// and joins the writers.
pub struct LoadGen {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<WriterState>>,
    opts: LoadOpts,
    run_id: u64,
}

impl fmt::Debug for LoadGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadGen")
            .field("run_id", &self.run_id)
            .field("acked", &self.acked())
            .field("running", &self.running())
            .finish()
    }
}

impl LoadGen {
    /// Opens `opts.connections` connections to `export` at `addr` (panics if
    /// a handshake fails: the server must be up) and starts the writers.
    pub fn start(addr: &Addr, export: &str, opts: LoadOpts) -> LoadGen {
        let bs = opts.block_bytes as u64;
        assert!(opts.block_bytes >= pattern::MIN_BLOCK_BYTES, "block_bytes {} < 64", opts.block_bytes);
        assert!(opts.connections >= 1 && opts.queue_depth >= 1, "connections and queue_depth must be >= 1");
        assert!(
            opts.region_offset.is_multiple_of(bs)
                && opts.region_bytes.is_multiple_of(bs)
                && opts.region_bytes >= bs,
            "region [{}, +{}) is not a non-empty multiple of {bs}-byte blocks",
            opts.region_offset,
            opts.region_bytes
        );
        assert!(opts.flush_every != Some(0), "flush_every must be >= 1");
        assert!(opts.max_writes_per_sec != Some(0), "max_writes_per_sec must be >= 1");
        let run_id = pattern::new_run_id(opts.seed);
        let shared = Arc::new(Shared {
            clock: AtomicU64::new(1),
            tickets: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            flushes_acked: AtomicU64::new(0),
            running: AtomicUsize::new(opts.connections),
        });
        let clients: Vec<RawClient> = (0..opts.connections)
            .map(|_| {
                let (c, size, _) = RawClient::handshake(addr, export, false);
                assert!(
                    opts.region_offset + opts.region_bytes <= size,
                    "region [{}, +{}) exceeds the export ({size} bytes)",
                    opts.region_offset,
                    opts.region_bytes
                );
                c
            })
            .collect();
        let deadline = Instant::now() + opts.max_duration;
        let threads = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let shared = shared.clone();
                let opts = opts.clone();
                thread::Builder::new()
                    .name(format!("loadgen-{i}"))
                    .spawn(move || {
                        let mut st = WriterState::new(i as u32);
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            st.run(c, &shared, &opts, run_id, deadline);
                        }));
                        if let Err(p) = r {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            st.end = Some(EndReason::ConnectionDied(format!("client panicked: {msg}")));
                        }
                        shared.running.fetch_sub(1, Ordering::SeqCst);
                        st
                    })
                    .expect("spawn loadgen writer")
            })
            .collect();
        LoadGen { shared, threads, opts, run_id }
    }

    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Writes acknowledged so far (all writers).
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    /// FLUSHes acknowledged so far.
    pub fn flushes_acked(&self) -> u64 {
        self.shared.flushes_acked.load(Ordering::SeqCst)
    }

    /// Writers still running.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Polls until at least `n` writes were acknowledged. Panics when
    /// `timeout` passes first or every writer has ended first.
    pub fn wait_acked(&self, n: u64, timeout: Duration) {
        self.wait_for("acknowledged writes", n, timeout, || self.acked());
    }

    /// Polls until at least `n` FLUSHes were acknowledged (as `wait_acked`).
    pub fn wait_flushes_acked(&self, n: u64, timeout: Duration) {
        self.wait_for("acknowledged FLUSHes", n, timeout, || self.flushes_acked());
    }

    fn wait_for(&self, what: &str, n: u64, timeout: Duration, get: impl Fn() -> u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let have = get();
            if have >= n {
                return;
            }
            assert!(self.running() > 0, "load generator: every writer ended with only {have}/{n} {what}");
            assert!(Instant::now() < deadline, "load generator: only {have}/{n} {what} after {timeout:?}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks every writer to stop issuing; they collect the replies of what
    /// is in flight (bounded by the client's read timeout) and disconnect.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for every writer to end (call [`LoadGen::stop`] first unless
    /// they end by themselves: max_ops, max_duration, dead connections) and
    /// returns the log.
    pub fn finish(mut self) -> AckLog {
        let states: Vec<WriterState> = self
            .threads
            .drain(..)
            .map(|t| t.join().expect("loadgen writer thread panicked outside its client"))
            .collect();
        let mut log = AckLog {
            run_id: self.run_id,
            block_bytes: self.opts.block_bytes,
            region_offset: self.opts.region_offset,
            region_bytes: self.opts.region_bytes,
            writes: Vec::new(),
            flushes: Vec::new(),
            writers: Vec::new(),
        };
        for st in states {
            log.writers.push(WriterEnd {
                writer: st.id,
                writes_issued: st.writes.len() as u64,
                writes_acked: st.writes.iter().filter(|w| w.acked.is_some()).count() as u64,
                flushes_acked: st.flushes.iter().filter(|f| f.acked.is_some()).count() as u64,
                end: st.end.unwrap_or(EndReason::Stopped),
            });
            log.writes.extend(st.writes);
            log.flushes.extend(st.flushes);
        }
        log.writes.sort_by_key(|w| w.issued);
        log.flushes.sort_by_key(|f| f.issued);
        log
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum Pending {
    Write(usize),
    Flush(usize),
}

struct WriterState {
    id: u32,
    writes: Vec<WriteRec>,
    flushes: Vec<FlushRec>,
    end: Option<EndReason>,
}

impl WriterState {
    fn new(id: u32) -> WriterState {
        WriterState { id, writes: Vec::new(), flushes: Vec::new(), end: None }
    }

    fn run(&mut self, mut c: RawClient, shared: &Shared, opts: &LoadOpts, run: u64, deadline: Instant) {
        let bs = opts.block_bytes as u64;
        let first = opts.region_offset / bs;
        let nblocks = opts.region_bytes / bs;
        let mut rng = opts.seed ^ (self.id as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
        let mut inflight: HashMap<u64, Pending> = HashMap::new();
        let mut cookie = 0u64;
        let mut since_flush = 0u32;
        let mut buf = Vec::with_capacity(opts.block_bytes as usize);
        let died = |e: &dyn fmt::Display| Some(EndReason::ConnectionDied(e.to_string()));
        // This writer's share of `max_writes_per_sec`: write n is due at start + n / rate.
        let pace = opts.max_writes_per_sec.map(|r| (Instant::now(), r as f64 / opts.connections as f64));
        loop {
            // Issue while there is room.
            while self.end.is_none() && inflight.len() < opts.queue_depth {
                if shared.stop.load(Ordering::SeqCst) {
                    self.end = Some(EndReason::Stopped);
                    break;
                }
                if Instant::now() >= deadline {
                    self.end = Some(EndReason::MaxDuration);
                    break;
                }
                if let Some((start, rate)) = pace {
                    let due = start + Duration::from_secs_f64(self.writes.len() as f64 / rate);
                    let early = due.saturating_duration_since(Instant::now());
                    if !early.is_zero() {
                        if !inflight.is_empty() {
                            break; // collect replies meanwhile
                        }
                        // Short naps, so that `stop` is seen promptly.
                        thread::sleep(early.min(Duration::from_millis(20)));
                        continue;
                    }
                }
                cookie += 1;
                if opts.flush_every.is_some_and(|n| since_flush >= n) {
                    since_flush = 0;
                    let issued = shared.stamp();
                    self.flushes.push(FlushRec { writer: self.id, issued, acked: None, error: None });
                    inflight.insert(cookie, Pending::Flush(self.flushes.len() - 1));
                    if let Err(e) = c.request(0, CMD_FLUSH, cookie, 0, 0, &[]) {
                        self.end = died(&format!("send FLUSH: {e}"));
                        return;
                    }
                    continue;
                }
                if shared.tickets.fetch_add(1, Ordering::SeqCst) >= opts.max_ops {
                    self.end = Some(EndReason::MaxOps);
                    break;
                }
                let block = first + pattern::splitmix64(&mut rng) % nblocks;
                let seq = self.writes.len() as u64;
                pattern::encode(&mut buf, opts.block_bytes, &LOADGEN_MAGIC, run, self.id as u64, seq, block);
                let issued = shared.stamp();
                self.writes.push(WriteRec { writer: self.id, seq, block, issued, acked: None, error: None });
                inflight.insert(cookie, Pending::Write(self.writes.len() - 1));
                since_flush += 1;
                if let Err(e) = c.request(0, CMD_WRITE, cookie, block * bs, opts.block_bytes, &buf) {
                    self.end = died(&format!("send WRITE: {e}"));
                    return;
                }
            }
            if inflight.is_empty() {
                break;
            }
            let r = match c.read_reply() {
                Ok(r) => r,
                Err(e) => {
                    self.end = died(&format!("read reply ({} in flight): {e}", inflight.len()));
                    return;
                }
            };
            let stamp = shared.stamp();
            let (error, ck) = match r {
                Reply::Simple { error, cookie } => (error, cookie),
                r => {
                    self.end = died(&format!("unexpected structured reply {r:?}"));
                    return;
                }
            };
            let (acked, err) = if error == 0 { (Some(stamp), None) } else { (None, Some(error)) };
            match inflight.remove(&ck) {
                Some(Pending::Write(i)) => {
                    self.writes[i].acked = acked;
                    self.writes[i].error = err;
                    if acked.is_some() {
                        shared.acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Some(Pending::Flush(i)) => {
                    self.flushes[i].acked = acked;
                    self.flushes[i].error = err;
                    if acked.is_some() {
                        shared.flushes_acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                None => {
                    self.end = died(&format!("reply for unknown cookie {ck}"));
                    return;
                }
            }
        }
        // Orderly end: everything answered; say goodbye (best effort).
        let _ = c.request(0, CMD_DISC, cookie + 1, 0, 0, &[]);
    }
}

/// Verification counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blocks read and judged.
    pub blocks_checked: u64,
    /// Writes that had to be present (or superseded).
    pub required_writes: u64,
    /// Blocks holding the last acknowledged write to them.
    pub last_acked: u64,
    /// Blocks holding a write never acknowledged (in flight at the end).
    pub unacked_newer: u64,
    /// Blocks holding another acceptable acknowledged write (concurrent with
    /// the last required one, or acknowledged after the FLUSH).
    pub other_acceptable: u64,
}

/// What was found where a required write was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Zeros, garbage, or a corrupt (bad CRC) block.
    Unreadable(Decoded),
    /// A valid pattern of another run or tool (magic/run differ).
    OtherRun(RawHeader),
    /// A valid pattern of this run that names another block.
    WrongBlock(RawHeader),
    /// A valid pattern of this run that the log has no write for.
    Unknown(RawHeader),
    /// A write of this run to this block that a required write overwrote.
    Stale(WriteRec),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Unreadable(d) => write!(f, "{d}"),
            Found::OtherRun(h) => write!(f, "a block of another run: {h}"),
            Found::WrongBlock(h) => write!(f, "a write meant for block {}: {h}", h.block),
            Found::Unknown(h) => write!(f, "a write the log does not know: {h}"),
            Found::Stale(w) => write!(f, "an older, overwritten write: {w}"),
        }
    }
}

/// One block that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    /// The last acknowledged required write to the block.
    pub expected: WriteRec,
    pub found: Found,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: expected {} (or newer), found {}", self.block, self.expected, self.found)
    }
}

/// Verification failed: every violating block.
#[derive(Debug, Clone)]
pub struct VerifyError {
    /// "acknowledged" or "flushed".
    pub what: &'static str,
    pub blocks_checked: u64,
    pub violations: Vec<Violation>,
}

impl VerifyError {
    /// The violating block indices, ascending.
    pub fn blocks(&self) -> Vec<u64> {
        self.violations.iter().map(|v| v.block).collect()
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} of {} blocks lost {} writes:",
            self.violations.len(),
            self.blocks_checked,
            self.what
        )?;
        for v in self.violations.iter().take(50) {
            writeln!(f, "  {v}")?;
        }
        if self.violations.len() > 50 {
            writeln!(f, "  ... {} more", self.violations.len() - 50)?;
        }
        Ok(())
    }
}

impl std::error::Error for VerifyError {}

/// Every acknowledged write must be readable (module docs for the exact
/// rule). `read_block(i)` returns absolute block `i` (`block_bytes` bytes):
/// see [`pattern::nbd_reader`] and [`pattern::file_reader`].
pub fn verify_acked(log: &AckLog, read_block: impl FnMut(u64) -> Vec<u8>) -> Result<Stats, VerifyError> {
    verify_set(log, read_block, "acknowledged", |w| w.acked.is_some())
}

/// Every write acknowledged before the last acknowledged FLUSH was sent
/// must be readable (for "both nodes killed after a FLUSH was
/// acknowledged"). With no acknowledged FLUSH nothing is required.
pub fn verify_flushed(log: &AckLog, read_block: impl FnMut(u64) -> Vec<u8>) -> Result<Stats, VerifyError> {
    let t = log.last_acked_flush().map(|f| f.issued).unwrap_or(0);
    verify_set(log, read_block, "flushed", |w| w.acked.is_some_and(|a| a < t))
}

fn verify_set(
    log: &AckLog,
    mut read_block: impl FnMut(u64) -> Vec<u8>,
    what: &'static str,
    required: impl Fn(&WriteRec) -> bool,
) -> Result<Stats, VerifyError> {
    // Per block: all writes to it, the largest issue stamp of a required
    // write, and the last acknowledged required write.
    struct Block {
        threshold: u64,
        expected: WriteRec,
    }
    let mut blocks: HashMap<u64, Block> = HashMap::new();
    let mut by_id: HashMap<(u32, u64), &WriteRec> = HashMap::with_capacity(log.writes.len());
    let mut stats = Stats::default();
    for w in &log.writes {
        by_id.insert((w.writer, w.seq), w);
        if !required(w) {
            continue;
        }
        stats.required_writes += 1;
        let b = blocks.entry(w.block).or_insert(Block { threshold: w.issued, expected: *w });
        b.threshold = b.threshold.max(w.issued);
        if w.acked > b.expected.acked {
            b.expected = *w;
        }
    }
    let mut order: Vec<u64> = blocks.keys().copied().collect();
    order.sort_unstable();
    let mut violations = Vec::new();
    for block in order {
        let b = &blocks[&block];
        stats.blocks_checked += 1;
        let data = read_block(block);
        let bad = |found| Violation { block, expected: b.expected, found };
        let h = match pattern::decode(&data, &[&LOADGEN_MAGIC]) {
            Decoded::Valid(h) => h,
            d => {
                violations.push(bad(Found::Unreadable(d)));
                continue;
            }
        };
        if h.run != log.run_id || h.len != log.block_bytes {
            violations.push(bad(Found::OtherRun(h)));
            continue;
        }
        if h.block != block {
            violations.push(bad(Found::WrongBlock(h)));
            continue;
        }
        let Some(c) =
            u32::try_from(h.a).ok().and_then(|wr| by_id.get(&(wr, h.b))).filter(|c| c.block == block)
        else {
            violations.push(bad(Found::Unknown(h)));
            continue;
        };
        match c.acked {
            Some(a) if a < b.threshold => violations.push(bad(Found::Stale(**c))),
            None => stats.unacked_newer += 1,
            Some(_) if c.writer == b.expected.writer && c.seq == b.expected.seq => stats.last_acked += 1,
            Some(_) => stats.other_acceptable += 1,
        }
    }
    if violations.is_empty() {
        Ok(stats)
    } else {
        Err(VerifyError { what, blocks_checked: stats.blocks_checked, violations })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(writer: u32, seq: u64, block: u64, issued: u64, acked: Option<u64>) -> WriteRec {
        WriteRec { writer, seq, block, issued, acked, error: None }
    }

    fn log(writes: Vec<WriteRec>, flushes: Vec<FlushRec>) -> AckLog {
        AckLog {
            run_id: 42,
            block_bytes: 512,
            region_offset: 0,
            region_bytes: 512 * 16,
            writes,
            flushes,
            writers: vec![],
        }
    }

    fn disk(log: &AckLog, content: &[(u64, Option<&WriteRec>)]) -> HashMap<u64, Vec<u8>> {
        content.iter().map(|(b, w)| (*b, w.map(|w| log.pattern(w)).unwrap_or_else(|| vec![0; 512]))).collect()
    }

    #[test]
    fn rules() {
        // Block 1: sequential writes A(1..2) then B(3..4): must hold B.
        // Block 2: concurrent C(5..8) and D(6..7): either.
        // Block 3: E acked (9..10), F in flight (11..): either.
        let a = w(0, 0, 1, 1, Some(2));
        let b = w(0, 1, 1, 3, Some(4));
        let c = w(0, 2, 2, 5, Some(8));
        let d = w(1, 0, 2, 6, Some(7));
        let e = w(1, 1, 3, 9, Some(10));
        let f = w(1, 2, 3, 11, None);
        let l = log(vec![a, b, c, d, e, f], vec![]);
        let ok = |content: &[(u64, Option<&WriteRec>)]| {
            let m = disk(&l, content);
            verify_acked(&l, |i| m[&i].clone())
        };
        let s = ok(&[(1, Some(&b)), (2, Some(&c)), (3, Some(&e))]).expect("valid");
        assert_eq!((s.blocks_checked, s.last_acked), (3, 3));
        let s = ok(&[(1, Some(&b)), (2, Some(&d)), (3, Some(&f))]).expect("valid");
        assert_eq!((s.other_acceptable, s.unacked_newer), (1, 1));
        let err = ok(&[(1, Some(&a)), (2, Some(&d)), (3, None)]).unwrap_err();
        assert_eq!(err.blocks(), vec![1, 3]);
        assert_eq!(err.violations[0].found, Found::Stale(a));
        assert_eq!(err.violations[0].expected, b);
        assert!(matches!(err.violations[1].found, Found::Unreadable(Decoded::Zeros)));
    }

    #[test]
    fn flushed_rule() {
        // A acked before the FLUSH was sent (issued 5); B acked after.
        let a = w(0, 0, 1, 1, Some(2));
        let b = w(0, 1, 2, 3, Some(6));
        let l = log(vec![a, b], vec![FlushRec { writer: 0, issued: 5, acked: Some(7), error: None }]);
        let m = disk(&l, &[(1, Some(&a)), (2, None)]);
        let s = verify_flushed(&l, |i| m[&i].clone()).expect("B was not covered by the FLUSH");
        assert_eq!(s.blocks_checked, 1);
        assert_eq!(verify_acked(&l, |i| m[&i].clone()).unwrap_err().blocks(), vec![2]);
        let m = disk(&l, &[(1, None), (2, Some(&b))]);
        assert_eq!(verify_flushed(&l, |i| m[&i].clone()).unwrap_err().blocks(), vec![1]);
    }
}
