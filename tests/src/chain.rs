//! Ordered, dependent writer for crash-consistency checks (protocol A: "the
//! Secondary's image holds a prefix of the sequence, never a hole").
//!
//! One connection; write k (k = 0, 1, 2, ...) goes to block
//! `first + k mod R` of a region of R blocks and is sent only after write
//! k−1 was acknowledged. Each block is a self-describing pattern
//! ([`crate::pattern`], magic `BLKDCHN1`) recording k and the previous k
//! (k−1; none for k = 0).
//!
//! [`ChainLog::verify_prefix`] reads the region and requires that the writes
//! present form a prefix: with m the largest k found, every k in
//! `max(0, m−R+1)..=m` must be in its block (the newest R writes, since the
//! region wraps). The first k that is not there is reported as the hole. A
//! torn block counts as a hole.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::daemon::Addr;
use crate::loadgen::EndReason;
use crate::pattern::{self, Decoded, RawHeader};
use crate::raw::{CMD_DISC, CMD_FLAG_FUA, CMD_WRITE, RawClient, Reply};

/// Magic of chain blocks.
pub const CHAIN_MAGIC: [u8; 8] = *b"BLKDCHN1";
/// The "previous k" of write 0.
pub const NO_PREV: u64 = u64::MAX;

/// Chain writer options. `Default`: 4 KiB blocks, region `[0, 16 MiB)`,
/// seed 1, at most 1,000,000 writes, at most 10 minutes, no FUA.
#[derive(Debug, Clone)]
pub struct ChainOpts {
    pub block_bytes: u32,
    /// Start of the region (a multiple of `block_bytes`).
    pub region_offset: u64,
    /// Length of the region (a multiple of `block_bytes`); writes wrap.
    pub region_bytes: u64,
    /// Mixed into the run id.
    pub seed: u64,
    pub max_writes: u64,
    pub max_duration: Duration,
    /// Send every write with FUA.
    pub fua: bool,
}

impl Default for ChainOpts {
    fn default() -> Self {
        ChainOpts {
            block_bytes: 4096,
            region_offset: 0,
            region_bytes: 16 << 20,
            seed: 1,
            max_writes: 1_000_000,
            max_duration: Duration::from_secs(600),
            fua: false,
        }
    }
}

/// What a finished [`ChainWriter`] did.
#[derive(Debug, Clone)]
pub struct ChainLog {
    pub run_id: u64,
    pub block_bytes: u32,
    pub region_offset: u64,
    pub region_bytes: u64,
    /// Writes sent: k = 0..issued.
    pub issued: u64,
    /// Writes acknowledged: k = 0..acked (acked == issued, or issued − 1
    /// when the last one was in flight when the connection died).
    pub acked: u64,
    /// NBD error of the last write, if it was answered with an error.
    pub error: Option<u32>,
    pub end: EndReason,
}

/// The prefix found by [`ChainLog::verify_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Writes present: k = 0..len (0 = none).
    pub len: u64,
    /// Blocks read.
    pub blocks_scanned: u64,
}

/// Not a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// Write `k` (block `block`) is missing although write `newest` is
    /// present; `found` is what the block holds instead.
    Hole { k: u64, block: u64, newest: u64, found: Decoded },
    /// A chain block of this run whose record is inconsistent (wrong
    /// block, wrong previous k, k beyond n_max).
    BadRecord { block: u64, header: RawHeader, why: String },
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::Hole { k, block, newest, found } => {
                write!(
                    f,
                    "hole: write {k} (block {block}) is missing but write {newest} is present; found {found}"
                )
            }
            PrefixError::BadRecord { block, header, why } => write!(f, "block {block}: {why}: {header}"),
        }
    }
}

impl std::error::Error for PrefixError {}

impl ChainLog {
    /// The block write `k` goes to (absolute index).
    pub fn block_of(&self, k: u64) -> u64 {
        let bs = self.block_bytes as u64;
        self.region_offset / bs + k % (self.region_bytes / bs)
    }

    /// The exact content of write `k`.
    pub fn pattern(&self, k: u64) -> Vec<u8> {
        let prev = if k == 0 { NO_PREV } else { k - 1 };
        pattern::pattern(self.block_bytes, &CHAIN_MAGIC, self.run_id, k, prev, self.block_of(k))
    }

    /// Reads the region (`read_block(i)` returns absolute block `i`) and
    /// checks that the writes present are a prefix 0..=m of writes
    /// 0..n_max (usually `n_max = self.issued`); reports the first hole.
    pub fn verify_prefix(
        &self,
        mut read_block: impl FnMut(u64) -> Vec<u8>,
        n_max: u64,
    ) -> Result<Prefix, PrefixError> {
        let bs = self.block_bytes as u64;
        let first = self.region_offset / bs;
        let r = self.region_bytes / bs;
        let scan = n_max.min(r);
        let mut found: Vec<Decoded> = Vec::with_capacity(scan as usize);
        let mut newest: Option<u64> = None;
        for j in 0..scan {
            let block = first + j;
            let d = pattern::decode(&read_block(block), &[&CHAIN_MAGIC]);
            if let Decoded::Valid(h) = &d
                && h.run == self.run_id
            {
                let bad = |why: String| Err(PrefixError::BadRecord { block, header: *h, why });
                let want_prev = if h.a == 0 { NO_PREV } else { h.a - 1 };
                if h.block != block || h.a % r != j {
                    return bad(format!("write {} belongs in block {}", h.a, first + h.a % r));
                }
                if h.b != want_prev {
                    return bad(format!("write {} records previous {} (want {want_prev})", h.a, h.b));
                }
                if h.a >= n_max {
                    return bad(format!("write {} is beyond n_max {n_max}", h.a));
                }
                newest = newest.max(Some(h.a));
            }
            found.push(d);
        }
        let Some(m) = newest else {
            return Ok(Prefix { len: 0, blocks_scanned: scan });
        };
        for k in (m + 1).saturating_sub(r)..=m {
            let j = k % r;
            let present = matches!(&found[j as usize], Decoded::Valid(h) if h.run == self.run_id && h.a == k);
            if !present {
                return Err(PrefixError::Hole {
                    k,
                    block: first + j,
                    newest: m,
                    found: found[j as usize].clone(),
                });
            }
        }
        Ok(Prefix { len: m + 1, blocks_scanned: scan })
    }
}

/// Free-function form of [`ChainLog::verify_prefix`].
pub fn verify_prefix(
    log: &ChainLog,
    read_block: impl FnMut(u64) -> Vec<u8>,
    n_max: u64,
) -> Result<Prefix, PrefixError> {
    log.verify_prefix(read_block, n_max)
}

struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    running: AtomicBool,
}

/// A running chain writer; drop stops and joins it.
pub struct ChainWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<ChainLog>>,
}

impl fmt::Debug for ChainWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainWriter").field("acked", &self.acked()).finish()
    }
}

impl ChainWriter {
    /// Connects (panics if the handshake fails) and starts writing.
    pub fn start(addr: &Addr, export: &str, opts: ChainOpts) -> ChainWriter {
        let bs = opts.block_bytes as u64;
        assert!(opts.block_bytes >= pattern::MIN_BLOCK_BYTES, "block_bytes {} < 64", opts.block_bytes);
        assert!(
            opts.region_offset.is_multiple_of(bs)
                && opts.region_bytes.is_multiple_of(bs)
                && opts.region_bytes >= bs,
            "region [{}, +{}) is not a non-empty multiple of {bs}-byte blocks",
            opts.region_offset,
            opts.region_bytes
        );
        let (c, size, _) = RawClient::handshake(addr, export, false);
        assert!(opts.region_offset + opts.region_bytes <= size, "region exceeds the export ({size} bytes)");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            running: AtomicBool::new(true),
        });
        let sh = shared.clone();
        let thread = thread::Builder::new()
            .name("chain-writer".into())
            .spawn(move || {
                let log = run(c, &sh, opts);
                sh.running.store(false, Ordering::SeqCst);
                log
            })
            .expect("spawn chain writer");
        ChainWriter { shared, thread: Some(thread) }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Polls until at least `n` writes were acknowledged; panics on timeout
    /// or when the writer ended first.
    pub fn wait_acked(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.acked();
            if have >= n {
                return;
            }
            assert!(self.running(), "chain writer ended with only {have}/{n} acknowledged writes");
            assert!(
                Instant::now() < deadline,
                "chain writer: only {have}/{n} acknowledged after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for the writer to end (stop first unless it ends by itself).
    pub fn finish(mut self) -> ChainLog {
        self.thread.take().expect("joined once").join().expect("chain writer panicked")
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut c: RawClient, shared: &Shared, opts: ChainOpts) -> ChainLog {
    let run_id = pattern::new_run_id(opts.seed);
    let mut log = ChainLog {
        run_id,
        block_bytes: opts.block_bytes,
        region_offset: opts.region_offset,
        region_bytes: opts.region_bytes,
        issued: 0,
        acked: 0,
        error: None,
        end: EndReason::Stopped,
    };
    let deadline = Instant::now() + opts.max_duration;
    let flags = if opts.fua { CMD_FLAG_FUA } else { 0 };
    let mut buf = Vec::with_capacity(opts.block_bytes as usize);
    let died = |s: String| EndReason::ConnectionDied(s);
    let result = catch(|| {
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                return EndReason::Stopped;
            }
            if log.issued >= opts.max_writes {
                return EndReason::MaxOps;
            }
            if Instant::now() >= deadline {
                return EndReason::MaxDuration;
            }
            let k = log.issued;
            let block = log.block_of(k);
            let prev = if k == 0 { NO_PREV } else { k - 1 };
            pattern::encode(&mut buf, opts.block_bytes, &CHAIN_MAGIC, run_id, k, prev, block);
            log.issued += 1;
            if let Err(e) =
                c.request(flags, CMD_WRITE, k + 1, block * opts.block_bytes as u64, opts.block_bytes, &buf)
            {
                return died(format!("send write {k}: {e}"));
            }
            match c.read_reply() {
                Ok(Reply::Simple { error: 0, cookie }) if cookie == k + 1 => {
                    log.acked += 1;
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Reply::Simple { error, cookie }) if cookie == k + 1 => {
                    log.error = Some(error);
                    return died(format!("write {k} failed with NBD error {error}"));
                }
                Ok(r) => return died(format!("write {k}: unexpected reply {r:?}")),
                Err(e) => return died(format!("write {k} reply: {e}")),
            }
        }
    });
    log.end = result.unwrap_or_else(|msg| died(format!("client panicked: {msg}")));
    if !matches!(log.end, EndReason::ConnectionDied(_)) {
        let _ = c.request(0, CMD_DISC, 0, 0, 0, &[]);
    }
    log
}

fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn log(r: u64, issued: u64) -> ChainLog {
        ChainLog {
            run_id: 9,
            block_bytes: 512,
            region_offset: 512 * 10,
            region_bytes: 512 * r,
            issued,
            acked: issued,
            error: None,
            end: EndReason::Stopped,
        }
    }

    fn disk(l: &ChainLog, upto: u64) -> HashMap<u64, Vec<u8>> {
        let r = l.region_bytes / 512;
        let mut m: HashMap<u64, Vec<u8>> = (10..10 + r).map(|b| (b, vec![0u8; 512])).collect();
        for k in 0..upto {
            m.insert(l.block_of(k), l.pattern(k));
        }
        m
    }

    #[test]
    fn prefixes_and_holes() {
        let l = log(8, 20);
        for upto in [0, 1, 5, 8, 9, 20] {
            let m = disk(&l, upto);
            let p = l.verify_prefix(|b| m[&b].clone(), 20).expect("prefix");
            assert_eq!(p.len, upto);
        }
        // Hole without wrap: 0..6 written, block of 3 zeroed.
        let mut m = disk(&l, 6);
        m.insert(l.block_of(3), vec![0; 512]);
        match l.verify_prefix(|b| m[&b].clone(), 20) {
            Err(PrefixError::Hole { k: 3, block: 13, newest: 5, found: Decoded::Zeros }) => {}
            r => panic!("{r:?}"),
        }
        // Wrapped: 0..19 written (window 11..=18); block of 13 holds 5.
        let mut m = disk(&l, 19);
        m.insert(l.block_of(13), l.pattern(5));
        match l.verify_prefix(|b| m[&b].clone(), 20) {
            Err(PrefixError::Hole { k: 13, block: 15, newest: 18, .. }) => {}
            r => panic!("{r:?}"),
        }
    }
}
