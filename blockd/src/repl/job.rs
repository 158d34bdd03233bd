//! Job ids: every storage op the core starts carries one, and its completion comes
//! back with it. The id says who owns the job, so a completion is routed by its
//! kind alone; jobs that belong to a peer link also carry that link's generation,
//! so a completion from an earlier link is recognised and dropped instead of being
//! taken for one of the current link (the same sequence numbers come back on every
//! link).
//!
//! Layout (64 bits): kind in the top 4 bits; for NBD jobs the other 60 bits are the
//! shell's request sequence; for every other kind, 24 bits of link generation and
//! 36 bits of sequence (both wrapping: only uniqueness among jobs in flight at one
//! time matters).

use std::fmt;

const KIND_SHIFT: u32 = 60;
const LINK_SHIFT: u32 = 36;
const LINK_MASK: u64 = (1 << 24) - 1;
const SEQ_MASK: u64 = (1 << LINK_SHIFT) - 1;
const NBD_SEQ_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Who owns a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum JobKind {
    /// An NBD request (write, trim, zeroes, flush) or the stop-time drain: owned by
    /// the Primary's write path; not tied to a link.
    Nbd = 0,
    /// A replicated write applied on the Secondary.
    Apply = 1,
    /// The Secondary's flush closing an epoch.
    ApplyFlush = 2,
    /// A resync chunk read on the source.
    ResyncRead = 3,
    /// A resync write on the target.
    ResyncWrite = 4,
    /// A flush on the target (the resync's end, or one the source asked for).
    ResyncFlush = 5,
    /// A verify chunk read on the verifying node.
    VerifyRead = 6,
    /// A read for the peer's digest request.
    DigestRead = 7,
    /// A local data flush before metadata that relies on it (the activity log
    /// forgetting an extent, the bitmap recording bits cleared).
    MetaFlush = 8,
    /// A read for the peer's `ReadReq` (the peer is a Primary without a disk).
    PeerRead = 9,
}

impl JobKind {
    const ALL: [JobKind; 10] = [
        JobKind::Nbd,
        JobKind::Apply,
        JobKind::ApplyFlush,
        JobKind::ResyncRead,
        JobKind::ResyncWrite,
        JobKind::ResyncFlush,
        JobKind::VerifyRead,
        JobKind::DigestRead,
        JobKind::MetaFlush,
        JobKind::PeerRead,
    ];
}

/// A job's identity (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(u64);

impl JobId {
    /// The NBD request with the shell's sequence number `seq`.
    pub const fn nbd(seq: u64) -> JobId {
        JobId(seq & NBD_SEQ_MASK)
    }

    /// A job of `kind` (not `Nbd`) on link generation `link`.
    pub fn new(kind: JobKind, link: u32, seq: u64) -> JobId {
        debug_assert_ne!(kind, JobKind::Nbd);
        JobId(
            ((kind as u64) << KIND_SHIFT) | ((u64::from(link) & LINK_MASK) << LINK_SHIFT) | (seq & SEQ_MASK),
        )
    }

    pub fn kind(self) -> JobKind {
        let code = (self.0 >> KIND_SHIFT) as usize;
        // Ids are only made here, so every code is a kind.
        JobKind::ALL.get(code).copied().unwrap_or(JobKind::Nbd)
    }

    /// The link generation of a link-bound job (0 for NBD jobs).
    pub fn link(self) -> u32 {
        if self.kind() == JobKind::Nbd { 0 } else { ((self.0 >> LINK_SHIFT) & LINK_MASK) as u32 }
    }

    /// Whether this job belongs to link generation `link` (compared as stored).
    pub fn of_link(self, link: u32) -> bool {
        self.link() == (u64::from(link) & LINK_MASK) as u32
    }

    /// The raw value (for a storage token, or the peer protocol's write ids).
    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> JobId {
        JobId(raw)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            JobKind::Nbd => write!(f, "nbd:{}", self.0),
            kind => write!(f, "{kind:?}@{}:{}", self.link(), self.0 & SEQ_MASK),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Hands out ids of one node's jobs.
#[derive(Debug, Default)]
pub struct JobIds {
    seq: u64,
}

impl JobIds {
    pub fn next(&mut self, kind: JobKind, link: u32) -> JobId {
        self.seq = self.seq.wrapping_add(1);
        JobId::new(kind, link, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_kind_link_and_sequence_apart() {
        let j = JobId::new(JobKind::Apply, 7, 42);
        assert_eq!((j.kind(), j.link()), (JobKind::Apply, 7));
        assert!(j.of_link(7) && !j.of_link(8));
        assert_ne!(j, JobId::new(JobKind::Apply, 8, 42), "same sequence on another link");
        assert_ne!(j, JobId::new(JobKind::ResyncWrite, 7, 42), "same sequence, another owner");
        let n = JobId::nbd(42);
        assert_eq!((n.kind(), n.link()), (JobKind::Nbd, 0));
        assert!(JobId::new(JobKind::Apply, 1 << 24, 1).of_link(1 << 24), "link generations wrap as stored");
        for kind in JobKind::ALL.into_iter().filter(|k| *k != JobKind::Nbd) {
            assert_eq!(JobId::from_raw(JobId::new(kind, 1, 1).raw()).kind(), kind);
        }
    }
}
