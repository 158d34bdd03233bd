//! Pooled, 4 KiB-aligned I/O buffers.
//!
//! Payloads travel from the socket to the disk (and later to the peer) without a
//! per-request allocation: a [`BufPool`] keeps freed buffers in bounded per-size-class
//! free lists and hands them out again. A [`BufMut`] is a uniquely owned, writable
//! buffer (the socket reader fills it); [`BufMut::freeze`] turns it into a [`Buf`],
//! a cheaply clonable read-only handle (one clone goes to the local disk, one to the
//! peer). When the last handle is dropped the storage goes back to its pool.
//!
//! The storage is a `Vec<u8>` over-allocated by one alignment unit, and the visible
//! slice starts at the first 4 KiB boundary, so buffers are ready for `O_DIRECT`
//! without any `unsafe`.
//!
//! A buffer can carry a byte-budget permit ([`BufMut::hold_permit`]): a receiver
//! that charges its budget for what it reads gets the bytes back when the last
//! handle of the buffer is dropped, wherever that happens (after a disk write, a
//! reply, a peer send), without tracking the buffer itself.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tokio::sync::OwnedSemaphorePermit;

/// Alignment of every buffer's first byte (enough for `O_DIRECT` on 4Kn disks).
pub const BUF_ALIGN_BYTES: usize = 4096;
/// Smallest size class.
const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
/// Largest size class: the NBD maximum payload.
const MAX_CLASS_SHIFT: u32 = 25; // 32 MiB
const CLASS_COUNT: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// The largest buffer the pool can hand out.
pub const MAX_BUF_BYTES: usize = 1 << MAX_CLASS_SHIFT;

struct Storage {
    bytes: Vec<u8>,
    /// Offset of the aligned start inside `bytes`.
    start: usize,
    /// Capacity of the aligned region (the size class).
    capacity: usize,
}

impl Storage {
    fn new(capacity: usize) -> Storage {
        let bytes = vec![0u8; capacity + BUF_ALIGN_BYTES];
        let misalign = bytes.as_ptr() as usize % BUF_ALIGN_BYTES;
        let start = if misalign == 0 { 0 } else { BUF_ALIGN_BYTES - misalign };
        Storage { bytes, start, capacity }
    }

    fn slice(&self, len: usize) -> &[u8] {
        &self.bytes[self.start..self.start + len]
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

struct Inner {
    storage: Storage,
    len: usize,
    pool: Option<Arc<PoolShared>>,
    /// Released when the buffer leaves use: on recycling, or when `Inner` drops.
    permit: Option<OwnedSemaphorePermit>,
}

struct PoolShared {
    classes: Vec<ArrayQueue<Arc<Inner>>>,
}

/// A bounded pool of aligned buffers in power-of-two size classes (4 KiB–32 MiB).
///
/// Cloning the pool is cheap; all clones share the same free lists.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool").finish_non_exhaustive()
    }
}

impl Default for BufPool {
    fn default() -> Self {
        // 64 MiB of idle buffers at most per class (and at least 2 per class), so the
        // pool's idle memory is bounded while QD32 of any single size never allocates.
        BufPool::new(64 << 20)
    }
}

impl BufPool {
    /// A pool that keeps at most `idle_bytes_per_class` of free buffers in each size
    /// class (at least two buffers, at most 1024).
    pub fn new(idle_bytes_per_class: usize) -> BufPool {
        let classes = (0..CLASS_COUNT)
            .map(|i| {
                let size = 1usize << (MIN_CLASS_SHIFT as usize + i);
                ArrayQueue::new((idle_bytes_per_class / size).clamp(2, 1024))
            })
            .collect();
        BufPool { shared: Arc::new(PoolShared { classes }) }
    }

    /// A zero-length-or-larger writable buffer of exactly `len` visible bytes.
    ///
    /// The contents are unspecified (a recycled buffer keeps old bytes); callers fill
    /// all `len` bytes before reading them. Panics if `len > MAX_BUF_BYTES`; the NBD
    /// layer never asks for more.
    pub fn get(&self, len: usize) -> BufMut {
        assert!(len <= MAX_BUF_BYTES, "buffer of {len} bytes exceeds the pool maximum");
        let class = class_of(len);
        let inner = match self.shared.classes[class].pop() {
            Some(mut inner) => {
                // Only unique Arcs are ever pushed back, so this cannot fail.
                if let Some(i) = Arc::get_mut(&mut inner) {
                    i.len = len;
                    i.pool = Some(self.shared.clone());
                }
                inner
            }
            None => Arc::new(Inner {
                storage: Storage::new(1 << (MIN_CLASS_SHIFT as usize + class)),
                len,
                pool: Some(self.shared.clone()),
                permit: None,
            }),
        };
        debug_assert!(inner.storage.capacity >= len);
        BufMut { inner: Some(inner) }
    }
}

impl BufPool {
    /// Puts up to `count` buffers of `len` bytes' size class in the free list, their
    /// pages touched, so that serving requests of that size allocates nothing — what
    /// a server in the I/O path of a kernel client on the same host needs when memory
    /// is short (the pages exist before reclaim can need this process). Returns how
    /// many were added (the free list's bound caps it).
    pub fn prefill(&self, len: usize, count: usize) -> usize {
        let class = class_of(len.min(MAX_BUF_BYTES));
        let size = 1usize << (MIN_CLASS_SHIFT as usize + class);
        let mut added = 0;
        for _ in 0..count {
            let mut storage = Storage::new(size);
            // calloc'd memory may not be backed yet; writing makes the pages real.
            for page in storage.bytes.chunks_mut(BUF_ALIGN_BYTES) {
                page[0] = 1;
            }
            let inner = Arc::new(Inner { storage, len: 0, pool: None, permit: None });
            if self.shared.classes[class].push(inner).is_err() {
                break;
            }
            added += 1;
        }
        added
    }

    /// [`BufPool::prefill`] of every size class a kernel NBD client uses by default
    /// (4 KiB to 2 MiB; requests are at most `max_sectors_kb`, 1280 KiB unless
    /// raised): about 24 MiB.
    pub fn prefill_for_kernel_client(&self) -> usize {
        (MIN_CLASS_SHIFT..=21)
            .map(|shift| {
                let size = 1usize << shift;
                self.prefill(size, ((4usize << 20) / size).clamp(2, 32))
            })
            .sum()
    }
}

/// The memory a buffer of `len` visible bytes occupies: its size class plus the
/// alignment slack (what a byte budget for received data should count).
pub fn footprint_bytes(len: usize) -> usize {
    (1usize << (MIN_CLASS_SHIFT as usize + class_of(len.min(MAX_BUF_BYTES)))) + BUF_ALIGN_BYTES
}

fn class_of(len: usize) -> usize {
    let shift = len.max(1).next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
    (shift - MIN_CLASS_SHIFT) as usize
}

/// Returns a uniquely owned buffer's storage to its pool (or frees it).
fn recycle(slot: &mut Option<Arc<Inner>>) {
    let Some(mut arc) = slot.take() else { return };
    // `get_mut` succeeds only for the last handle; when two clones drop at the same
    // instant both may fail and the memory is simply freed: a missed recycle, never a
    // double use.
    let Some(inner) = Arc::get_mut(&mut arc) else { return };
    // Before the pool check: an unpooled buffer's permit goes back here too.
    inner.permit = None;
    let Some(pool) = inner.pool.take() else { return };
    let class = class_of(inner.storage.capacity);
    // A full free list drops the buffer: the idle memory stays bounded.
    let _ = pool.classes[class].push(arc);
}

/// A uniquely owned, writable, aligned buffer.
pub struct BufMut {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for BufMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufMut({} bytes)", self.len())
    }
}

impl BufMut {
    /// A buffer not backed by any pool (tests, one-off uses).
    pub fn unpooled(len: usize) -> BufMut {
        BufMut {
            inner: Some(Arc::new(Inner { storage: Storage::new(len.max(1)), len, pool: None, permit: None })),
        }
    }

    /// Attaches `permit` (typically bytes of a receiver's budget) to the buffer: it
    /// is released once the last handle of the buffer, frozen or not, is dropped.
    /// A permit attached before replaces (releases) the earlier one.
    pub fn hold_permit(&mut self, permit: OwnedSemaphorePermit) {
        let inner =
            Arc::get_mut(self.inner.as_mut().expect("buffer used after drop")).expect("BufMut is unique");
        inner.permit = Some(permit);
    }

    fn inner(&self) -> &Inner {
        self.inner.as_ref().expect("buffer used after drop")
    }

    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.inner().len
    }

    /// True when the buffer has no visible bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shrinks the visible length (e.g. a short read at the end of a device).
    pub fn truncate(&mut self, len: usize) {
        let inner =
            Arc::get_mut(self.inner.as_mut().expect("buffer used after drop")).expect("BufMut is unique");
        inner.len = inner.len.min(len);
    }

    /// Makes the buffer read-only and shareable.
    pub fn freeze(mut self) -> Buf {
        Buf { inner: self.inner.take() }
    }
}

impl Deref for BufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let inner = self.inner();
        inner.storage.slice(inner.len)
    }
}

impl DerefMut for BufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        let inner =
            Arc::get_mut(self.inner.as_mut().expect("buffer used after drop")).expect("BufMut is unique");
        let len = inner.len;
        inner.storage.slice_mut(len)
    }
}

impl Drop for BufMut {
    fn drop(&mut self) {
        recycle(&mut self.inner);
    }
}

/// A shared, read-only, aligned buffer; clones are cheap (a reference count).
pub struct Buf {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.len())
    }
}

impl Clone for Buf {
    fn clone(&self) -> Buf {
        Buf { inner: self.inner.clone() }
    }
}

impl Buf {
    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.len)
    }

    /// True when the buffer has no visible bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Turns the buffer back into a writable one if this is the only handle.
    pub fn try_into_mut(mut self) -> Result<BufMut, Buf> {
        let unique = self.inner.as_mut().is_some_and(|a| Arc::get_mut(a).is_some());
        if unique { Ok(BufMut { inner: self.inner.take() }) } else { Err(self) }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            Some(inner) => inner.storage.slice(inner.len),
            None => &[],
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        recycle(&mut self.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        let pool = BufPool::default();
        for len in [0, 1, 512, 4096, 4097, 65536, 1 << 20, MAX_BUF_BYTES] {
            let b = pool.get(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN_BYTES, 0, "len {len}");
        }
    }

    #[test]
    fn storage_is_recycled_after_last_handle_drops() {
        let pool = BufPool::new(1 << 20);
        let mut b = pool.get(4096);
        b[0] = 7;
        let ptr = b.as_ptr();
        let frozen = b.freeze();
        let clone = frozen.clone();
        drop(frozen);
        assert_eq!(clone[0], 7);
        drop(clone);
        let again = pool.get(100);
        assert_eq!(again.as_ptr(), ptr, "the freed buffer is handed out again");
        assert_eq!(again.len(), 100);
    }

    #[test]
    fn free_lists_are_bounded() {
        let pool = BufPool::new(8192); // two 4 KiB buffers at most
        let bufs: Vec<_> = (0..10).map(|_| pool.get(4096)).collect();
        drop(bufs);
        assert_eq!(pool.shared.classes[0].len(), 2);
    }

    #[test]
    fn footprint_counts_the_size_class_and_the_alignment_slack() {
        assert_eq!(footprint_bytes(1), 8192);
        assert_eq!(footprint_bytes(4096), 8192);
        assert_eq!(footprint_bytes(4097), 12288);
        assert_eq!(footprint_bytes(1 << 20), (1 << 20) + 4096);
        assert_eq!(footprint_bytes(MAX_BUF_BYTES), MAX_BUF_BYTES + 4096);
    }

    #[test]
    fn a_held_permit_is_released_when_the_last_handle_drops() {
        let budget = Arc::new(tokio::sync::Semaphore::new(10_000));
        let pool = BufPool::new(1 << 20);
        for pooled in [true, false] {
            let mut b = if pooled { pool.get(4096) } else { BufMut::unpooled(4096) };
            b.hold_permit(budget.clone().try_acquire_many_owned(4096).unwrap());
            assert_eq!(budget.available_permits(), 10_000 - 4096);
            let frozen = b.freeze();
            let clone = frozen.clone();
            drop(frozen);
            assert_eq!(budget.available_permits(), 10_000 - 4096, "a handle is still alive");
            drop(clone);
            assert_eq!(budget.available_permits(), 10_000, "released with the last handle (pooled {pooled})");
        }
        // A recycled buffer comes back without the permit.
        let b = pool.get(4096);
        drop(b);
        assert_eq!(budget.available_permits(), 10_000);
    }

    #[test]
    fn try_into_mut_only_when_unique() {
        let pool = BufPool::default();
        let b = pool.get(10).freeze();
        let c = b.clone();
        let b = b.try_into_mut().expect_err("shared");
        drop(c);
        let mut m = b.try_into_mut().expect("unique now");
        m[9] = 1;
        m.truncate(5);
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn prefilled_buffers_are_handed_out_and_bounded() {
        let pool = BufPool::new(4 * 65536); // four 64 KiB buffers at most
        assert_eq!(pool.prefill(65536, 10), 4, "capped by the free list");
        assert_eq!(pool.shared.classes[4].len(), 4);
        let b = pool.get(40_000);
        assert_eq!((b.len(), pool.shared.classes[4].len()), (40_000, 3), "taken from the free list");
        drop(b);
        assert_eq!(pool.shared.classes[4].len(), 4, "and returned to it");
        let all = BufPool::default().prefill_for_kernel_client();
        assert_eq!(all, 6 * 32 + 16 + 8 + 4 + 2);
    }
}
