//! The simulated disk of one node: the data area and the internal metadata on one
//! device, as with `meta = "internal"`.
//!
//! Every write lands in a volatile version of each 4 KiB block it touches; a flush
//! makes durable what had completed before the flush was submitted (the storage
//! contract: "a FLUSH covers the writes that completed before it was submitted"),
//! `fdatasync` from the metadata makes everything written so far durable, and a
//! durable write (`RWF_DSYNC`, FUA) is durable at once. A crash keeps, for each block
//! with unflushed versions, any one of them (or the durable one), and may tear it:
//! some 512-byte sectors from one version, the rest from the one before. So a crash
//! loses any subset of what was not flushed, and nothing that was.
//!
//! The metadata reaches the disk through [`blockd::meta::MetaDevice`], so the
//! project's own metadata code reads and writes it; metadata writes and syncs can be
//! made to fail (`EIO`, `ENOSPC`) with a probability.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const SECTOR_BYTES: usize = 512;
pub const BLOCK_BYTES: usize = 4096;

type Block = Box<[u8; BLOCK_BYTES]>;

#[derive(Debug)]
struct Version {
    /// When it completed, in the disk's completion order.
    stamp: u64,
    data: Block,
}

#[derive(Debug, Default)]
struct BlockState {
    /// `None`: zeroes.
    durable: Option<Block>,
    /// Completed, not yet durable, oldest first.
    pending: Vec<Version>,
}

impl BlockState {
    fn latest(&self) -> Option<&[u8; BLOCK_BYTES]> {
        self.pending.last().map(|v| &*v.data).or(self.durable.as_deref())
    }
}

/// Metadata I/O faults: the probability (per call) that a write or sync fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetaFaults {
    pub fail_probability: f64,
}

#[derive(Debug)]
struct Inner {
    len_bytes: u64,
    blocks: HashMap<u64, BlockState>,
    /// Completion stamps: one per write, in order.
    stamp: u64,
    meta_faults: MetaFaults,
    /// The probability that a data op fails (0: none).
    data_fault_probability: f64,
    /// Data ops submitted now take seconds (a hung disk on a live node).
    hung: bool,
    /// Metadata calls that failed so far (for the report).
    meta_failures: u64,
    /// Power is failing: nothing more becomes durable (a crash follows at once).
    power_failing: bool,
    rng: StdRng,
}

/// One node's disk.
#[derive(Debug)]
pub struct SimDisk {
    inner: Mutex<Inner>,
}

/// What a crash did, for the trace.
#[derive(Debug, Default)]
pub struct CrashReport {
    pub blocks_with_unflushed: u64,
    pub kept_newest: u64,
    pub torn: u64,
}

impl SimDisk {
    pub fn new(len_bytes: u64, seed: u64) -> SimDisk {
        SimDisk {
            inner: Mutex::new(Inner {
                len_bytes,
                blocks: HashMap::new(),
                stamp: 0,
                meta_faults: MetaFaults::default(),
                data_fault_probability: 0.0,
                hung: false,
                meta_failures: 0,
                power_failing: false,
                rng: StdRng::seed_from_u64(seed),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The simulator is single-threaded: a poisoned lock means a panic already
        // ended the run.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn len_bytes(&self) -> u64 {
        self.lock().len_bytes
    }

    pub fn set_meta_faults(&self, faults: MetaFaults) {
        self.lock().meta_faults = faults;
    }

    pub fn set_hung(&self, hung: bool) {
        self.lock().hung = hung;
    }

    pub fn hung(&self) -> bool {
        self.lock().hung
    }

    pub fn set_data_faults(&self, fail_probability: f64) {
        self.lock().data_fault_probability = fail_probability;
    }

    /// Whether a data op fails now, and how: the errno, and for a write whether it
    /// reached the disk anyway (a failed write may have written some of its data).
    pub fn data_fault(&self, write: bool) -> Option<(nix::errno::Errno, bool)> {
        let mut d = self.lock();
        let p = d.data_fault_probability;
        if p == 0.0 || !d.rng.random_bool(p) {
            return None;
        }
        let errno =
            if write && d.rng.random_bool(0.3) { nix::errno::Errno::ENOSPC } else { nix::errno::Errno::EIO };
        Some((errno, write && d.rng.random_bool(0.5)))
    }

    pub fn meta_failures(&self) -> u64 {
        self.lock().meta_failures
    }

    /// The completion stamp of the latest write (a flush submitted now covers it).
    pub fn stamp(&self) -> u64 {
        self.lock().stamp
    }

    /// Reads `buf.len()` bytes at `offset` (the newest version of each block).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.lock().read(offset, buf);
    }

    /// Writes `data` at `offset`; durable at once with `durable`.
    pub fn write(&self, offset: u64, data: &[u8], durable: bool) {
        self.lock().write(offset, WriteData::Bytes(data), durable);
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64, durable: bool) {
        self.lock().write(offset, WriteData::Zeroes(len), durable);
    }

    /// A flush submitted when the disk's stamp was `submitted_stamp` completes:
    /// what completed before it is durable.
    pub fn flush_completed(&self, submitted_stamp: u64) {
        let mut d = self.lock();
        if d.power_failing {
            return;
        }
        for state in d.blocks.values_mut() {
            let Some(i) = state.pending.iter().rposition(|v| v.stamp <= submitted_stamp) else { continue };
            let newest_covered = state.pending.drain(..=i).next_back().expect("non-empty");
            state.durable = Some(newest_covered.data);
        }
    }

    /// From now on nothing becomes durable (the node crashes right after).
    pub fn fail_power(&self) {
        self.lock().power_failing = true;
    }

    /// Power loss: each block keeps its durable version or any unflushed one, and
    /// may be torn between the kept one and the one before.
    pub fn crash(&self, tear_probability: f64) -> CrashReport {
        let mut d = self.lock();
        d.power_failing = false;
        let mut report = CrashReport::default();
        let Inner { blocks, rng, .. } = &mut *d;
        let mut indices: Vec<u64> =
            blocks.iter().filter(|(_, s)| !s.pending.is_empty()).map(|(i, _)| *i).collect();
        // HashMap order is not deterministic; the choices below must be.
        indices.sort_unstable();
        for index in indices {
            let state = blocks.get_mut(&index).expect("listed");
            report.blocks_with_unflushed += 1;
            let versions = std::mem::take(&mut state.pending);
            // 0 = the durable version; k = the k-th unflushed one.
            let keep = rng.random_range(0..=versions.len());
            if keep == versions.len() {
                report.kept_newest += 1;
            }
            let before = |k: usize, durable: &Option<Block>, versions: &[Version]| -> [u8; BLOCK_BYTES] {
                match k {
                    0 => durable.as_deref().copied().unwrap_or([0u8; BLOCK_BYTES]),
                    k => *versions[k - 1].data,
                }
            };
            let kept = before(keep, &state.durable, &versions);
            let mut result = kept;
            if keep > 0 && rng.random_bool(tear_probability) {
                let older = before(keep - 1, &state.durable, &versions);
                let cut = rng.random_range(1..BLOCK_BYTES / SECTOR_BYTES);
                result[cut * SECTOR_BYTES..].copy_from_slice(&older[cut * SECTOR_BYTES..]);
                report.torn += 1;
            }
            state.durable = Some(Box::new(result));
        }
        report
    }

    fn meta_fault(&self) -> io::Result<()> {
        let mut d = self.lock();
        let p = d.meta_faults.fail_probability;
        if p > 0.0 && d.rng.random_bool(p) {
            d.meta_failures += 1;
            let errno = if d.rng.random_bool(0.5) { libc::EIO } else { libc::ENOSPC };
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }
}

enum WriteData<'a> {
    Bytes(&'a [u8]),
    Zeroes(u64),
}

impl WriteData<'_> {
    fn len(&self) -> u64 {
        match self {
            WriteData::Bytes(b) => b.len() as u64,
            WriteData::Zeroes(n) => *n,
        }
    }
}

impl Inner {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (index, within) = (at / BLOCK_BYTES as u64, (at % BLOCK_BYTES as u64) as usize);
            let n = (BLOCK_BYTES - within).min(buf.len() - done);
            match self.blocks.get(&index).and_then(BlockState::latest) {
                Some(block) => buf[done..done + n].copy_from_slice(&block[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, offset: u64, data: WriteData<'_>, durable: bool) {
        self.stamp += 1;
        let stamp = self.stamp;
        let durable = durable && !self.power_failing;
        let len = data.len();
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let (index, within) = (at / BLOCK_BYTES as u64, (at % BLOCK_BYTES as u64) as usize);
            let n = (BLOCK_BYTES as u64 - within as u64).min(len - done) as usize;
            let state = self.blocks.entry(index).or_default();
            let mut block: Block = match state.latest() {
                Some(b) => Box::new(*b),
                None => Box::new([0u8; BLOCK_BYTES]),
            };
            match &data {
                WriteData::Bytes(b) => {
                    block[within..within + n].copy_from_slice(&b[done as usize..done as usize + n])
                }
                WriteData::Zeroes(_) => block[within..within + n].fill(0),
            }
            if durable {
                // Older unflushed versions can never show again.
                state.pending.clear();
                state.durable = Some(block);
            } else {
                state.pending.push(Version { stamp, data: block });
            }
            done += n as u64;
        }
    }
}

impl blockd::meta::MetaDevice for SimDisk {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(SimDisk::len_bytes(self))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read(offset, buf);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.meta_fault()?;
        self.write(offset, buf, durable);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.meta_fault()?;
        let stamp = self.stamp();
        self.flush_completed(stamp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(v: u8) -> Vec<u8> {
        vec![v; BLOCK_BYTES]
    }

    fn read_block(d: &SimDisk, index: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES];
        d.read(index * BLOCK_BYTES as u64, &mut b);
        b
    }

    #[test]
    fn flushed_data_survives_every_crash_and_unflushed_may_not() {
        let mut lost = 0;
        for seed in 0..64 {
            let d = SimDisk::new(1 << 20, seed);
            d.write(0, &block(1), false);
            d.flush_completed(d.stamp());
            d.write(0, &block(2), false);
            d.write(BLOCK_BYTES as u64, &block(3), false);
            d.crash(0.5);
            let b0 = read_block(&d, 0);
            assert!(b0.chunks(SECTOR_BYTES).all(|s| s[0] == 1 || s[0] == 2), "seed {seed}");
            let b1 = read_block(&d, 1);
            if b1[0] != 3 {
                lost += 1;
            }
        }
        assert!(lost > 0, "some crash lost the unflushed write");
    }

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_was_submitted() {
        let d = SimDisk::new(1 << 20, 1);
        d.write(0, &block(1), false);
        let submitted = d.stamp();
        d.write(0, &block(2), false);
        d.flush_completed(submitted);
        // Block 0's durable version is now 1; version 2 is still unflushed.
        let mut saw = std::collections::HashSet::new();
        for seed in 0..32 {
            let d2 = SimDisk::new(1 << 20, seed);
            d2.write(0, &block(1), false);
            let s = d2.stamp();
            d2.write(0, &block(2), false);
            d2.flush_completed(s);
            d2.crash(0.0);
            saw.insert(read_block(&d2, 0)[0]);
        }
        assert_eq!(saw, [1u8, 2].into_iter().collect());
    }

    #[test]
    fn durable_writes_are_durable_at_once() {
        let d = SimDisk::new(1 << 20, 3);
        d.write(0, &block(7), true);
        d.crash(1.0);
        assert_eq!(read_block(&d, 0), block(7));
    }
}
