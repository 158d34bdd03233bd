//! Starting a node from what its metadata durably holds, and carrying out the core's
//! metadata actions on it. Shared by the daemon (`repl::node`, `repl::shell`) and
//! the simulator, so a simulated restart recovers through exactly this code.
//!
//! - [`recover`]: marks the run unclean, decides whether this node crashed while
//!   Primary, and loads the dirty bitmap with the activity log's hot extents merged
//!   in after a crash (then empties the log), so the core starts with every block
//!   that may differ from the peer marked.
//! - [`MetaJob`] / [`run_meta_job`]: one metadata action (superblock update, bitmap
//!   blocks, activity-log transaction) executed with its fsync.

use anyhow::Context;

use crate::meta::{BitmapBlock, MetaError, MetaStore, Superblock};
use crate::repl::core::{Action, encode_changed};
use crate::state::{DiskState, Generations};

/// What a node starts from.
#[derive(Debug)]
pub struct Recovered {
    /// The superblock as found (before this run marked itself unclean).
    pub superblock: Superblock,
    /// The exported size: the config's `size`, capped by the data area.
    pub size_bytes: u64,
    /// It was Primary and did not stop cleanly: it may hold writes its peer lacks.
    pub crashed_primary: bool,
    /// The dirty bitmap, hot extents merged in after a crash.
    pub bitmap: bitmap::Bitmap,
}

/// Opens a run on `meta`: records it as not cleanly stopped (until a clean stop
/// says otherwise) with the configured activity-log size, and loads the bitmap.
pub fn recover(meta: &mut MetaStore, al_extents: u32, size_bytes: Option<u64>) -> anyhow::Result<Recovered> {
    let mut superblock = meta.superblock().clone();
    // After an unclean stop the disk is `Consistent`, not UpToDate, until the peer
    // has been heard (DRBD's meaning): a crash may have lost writes the peer holds
    // (unflushed ones acknowledged under protocol C, say), and a disk that failed may
    // not have recorded that it is Outdated. So it is never promoted on its own
    // data without `--force`; connecting decides. Recorded at once, so a clean stop
    // before that does not turn it back into UpToDate.
    let unclean_up_to_date = !superblock.flags.clean_shutdown && superblock.disk == DiskState::UpToDate;
    if unclean_up_to_date {
        superblock.disk = DiskState::Consistent;
        tracing::warn!("not stopped cleanly: the disk is Consistent (not UpToDate) until the peer is heard");
    }
    // The activity log's size follows the config (informational in the superblock:
    // the log itself records its hot set).
    meta.update(|sb| {
        sb.flags.clean_shutdown = false;
        sb.al_extents = al_extents;
        if unclean_up_to_date {
            sb.disk = DiskState::Consistent;
        }
    })
    .context("cannot update the metadata")?;
    let size_bytes = size_bytes.map_or(meta.data_size_bytes(), |s| s.min(meta.data_size_bytes()));
    let crashed_primary = superblock.flags.was_primary && !superblock.flags.clean_shutdown;
    let bitmap = load_bitmap(meta, size_bytes, superblock.flags.clean_shutdown)?;
    Ok(Recovered { superblock, size_bytes, crashed_primary, bitmap })
}

/// The persisted bitmap, plus the activity log's hot extents after a crash, written
/// back so that the log can be emptied. A corrupt bitmap is never trusted: every bit
/// is set (a full resync), with an error in the log.
pub fn load_bitmap(
    meta: &mut MetaStore,
    size_bytes: u64,
    clean_shutdown: bool,
) -> anyhow::Result<bitmap::Bitmap> {
    let granularity_bytes = meta.superblock().bitmap_granularity_bytes;
    let mut bitmap = match meta.read_bitmap(size_bytes) {
        Ok(b) => b,
        // After an unclean stop a bitmap write may have been torn between a block and
        // its crc: only the blocks that do not check out are distrusted (their whole
        // region is resynced).
        Err(MetaError::BitmapCorrupt { .. }) if !clean_shutdown => {
            let (mut b, bad) = meta.read_bitmap_salvaging(size_bytes).context("cannot read the bitmap")?;
            tracing::warn!(
                blocks = ?bad,
                "bitmap blocks do not match their crc after an unclean stop (a torn write?); \
                 their regions are marked out of sync"
            );
            let block_bytes = bitmap::BITS_PER_BLOCK * granularity_bytes;
            for index in bad {
                // Rewritten below with a matching crc.
                b.set_range(index * block_bytes..(index + 1) * block_bytes);
            }
            b
        }
        // After a clean stop every write had completed: a mismatch is corruption at
        // rest, and nothing in the bitmap is trusted.
        Err(e @ MetaError::BitmapCorrupt { .. }) => {
            tracing::error!(error = %e, "the on-disk bitmap is corrupt; falling back to a full resync");
            let mut b =
                bitmap::Bitmap::new(size_bytes, granularity_bytes).context("cannot size the bitmap")?;
            b.set_all();
            b
        }
        Err(e) => return Err(e).context("cannot read the bitmap"),
    };
    let hot =
        if clean_shutdown { Vec::new() } else { meta.read_al().context("cannot read the activity log")? };
    for extent in &hot {
        let start = u64::from(*extent) << crate::repl::al::AL_EXTENT_SHIFT;
        bitmap.set_range(start..start + (1 << crate::repl::al::AL_EXTENT_SHIFT));
    }
    if !hot.is_empty() {
        tracing::warn!(
            extents = hot.len(),
            "unclean stop: the activity log's hot extents are marked out of sync"
        );
    }
    let blocks = encode_changed(&mut bitmap);
    if !blocks.is_empty() {
        meta.write_bitmap_blocks(&blocks).context("cannot write the bitmap")?;
    }
    if !hot.is_empty() {
        meta.write_al(&[]).context("cannot clear the activity log")?;
    }
    if bitmap.count_bits() > 0 {
        tracing::info!(out_of_sync_bytes = bitmap.dirty_bytes(), "bitmap loaded");
    }
    Ok(bitmap)
}

/// A metadata action of the core, for the metadata writer.
#[derive(Debug)]
pub enum MetaJob {
    Persist { seq: u64, gens: Generations, disk: DiskState, was_primary: bool },
    Bitmap { seq: u64, blocks: Vec<BitmapBlock> },
    Al { seq: u64, extents: Vec<u32> },
}

impl MetaJob {
    /// The metadata job of a metadata action (`Persist`, `WriteBitmap`, `WriteAl`).
    pub fn from_action(action: Action) -> Option<MetaJob> {
        match action {
            Action::Persist { seq, gens, disk, was_primary } => {
                Some(MetaJob::Persist { seq, gens, disk, was_primary })
            }
            Action::WriteBitmap { seq, blocks } => Some(MetaJob::Bitmap { seq, blocks }),
            Action::WriteAl { seq, extents } => Some(MetaJob::Al { seq, extents }),
            _ => None,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            MetaJob::Persist { seq, .. } | MetaJob::Bitmap { seq, .. } | MetaJob::Al { seq, .. } => *seq,
        }
    }
}

/// Carries out the core's metadata jobs in order. After one fails, every later one
/// fails too without touching the disk: a later update may depend on the failed one
/// (an activity-log transaction that forgets an extent relies on the bitmap write
/// before it), so the metadata on disk stays a consistent prefix, as after a crash.
#[derive(Debug, Default)]
pub struct MetaWriter {
    failed: Option<String>,
}

impl MetaWriter {
    pub fn run(&mut self, meta: &mut MetaStore, job: &MetaJob) -> Result<(), String> {
        if let Some(first) = &self.failed {
            return Err(format!("not written: an earlier metadata update failed ({first})"));
        }
        run_meta_job(meta, job).map_err(|e| {
            let e = e.to_string();
            self.failed = Some(e.clone());
            e
        })
    }

    /// The first failure, if any.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

/// Carries out one metadata job, durably (each ends with its fsync).
pub fn run_meta_job(meta: &mut MetaStore, job: &MetaJob) -> Result<(), MetaError> {
    match job {
        MetaJob::Persist { gens, disk, was_primary, .. } => meta.update(|sb| {
            sb.generations = *gens;
            sb.disk = *disk;
            sb.flags.consistent = *disk >= DiskState::Outdated;
            sb.flags.was_primary = *was_primary;
        }),
        MetaJob::Bitmap { blocks, .. } => meta.write_bitmap_blocks(blocks),
        MetaJob::Al { extents, .. } => meta.write_al(extents),
    }
}
