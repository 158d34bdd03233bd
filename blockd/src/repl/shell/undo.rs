//! The shell's side of a sync target's fallback image (`repl::fallback`): the
//! undo journal (`crate::undo`) of the running catch-up.
//!
//! The core says when a catch-up begins (`CatchUpBegin`) and ends (`CatchUpEnd`,
//! after a metadata sequence), and when to roll back (`RollBack`). Between begin
//! and end, [`CatchUpJournal::before`] runs on every batch of actions *before* any
//! of them is executed: it appends the old contents of every granule that the
//! batch's writes, trims and zeroes will overwrite (first time in this catch-up
//! only) and syncs the journal once, so a write reaches the data disk only after
//! the record preserving what it overwrites is durable (the crash argument of
//! `crate::undo`). This blocks the core task for a read, an append and one
//! `fdatasync` per batch — only on a catching-up Secondary, whose core task has no
//! clients and whose pace is set by the link.
//!
//! A journal that fills (`undo-size`) or fails is removed, and the core is told
//! (`FallbackLost`): the catch-up goes on in place.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::repl::core::Action;
use crate::undo::{Purpose, UndoHeader, UndoJournal};

pub struct CatchUpJournal {
    path: PathBuf,
    dir: PathBuf,
    resource: String,
    capacity_bytes: u64,
    device_size_bytes: u64,
    granule_bytes: u32,
    /// The backing store, for reading old contents and writing them back.
    data: Option<File>,
    journal: Option<UndoJournal>,
    /// Remove (or keep, if discarded) the journal once this metadata sequence is
    /// durable.
    end_after_seq: Option<u64>,
    durable_seq: u64,
    /// Byte ranges of one batch (reused).
    ranges: Vec<Range<u64>>,
}

/// What `before` reports when the journal had to go.
pub(crate) struct Lost(pub String);

impl CatchUpJournal {
    /// At start: a journal of an interrupted catch-up is kept while the disk is
    /// still Inconsistent (the fallback survives a restart of the target); on a
    /// disk that is not, it is left over from a finished catch-up and goes (a
    /// discarded node's journal is kept under its own name). Returns whether a
    /// fallback image exists.
    pub(crate) fn at_start(
        dir: &Path,
        resource: &str,
        disk_path: &Path,
        capacity_bytes: u64,
        device_size_bytes: u64,
        granule_bytes: u32,
        inconsistent: bool,
    ) -> (CatchUpJournal, bool) {
        let path = crate::undo::catchup_path(dir, resource);
        let data = File::options().read(true).write(true).open(disk_path).ok();
        let mut j = CatchUpJournal {
            path: path.clone(),
            dir: dir.to_owned(),
            resource: resource.to_owned(),
            capacity_bytes,
            device_size_bytes,
            granule_bytes,
            data,
            journal: None,
            end_after_seq: None,
            durable_seq: 0,
            ranges: Vec::new(),
        };
        match UndoJournal::open(&path) {
            Ok(None) => (j, false),
            Ok(Some(found)) if inconsistent && found.header().device_size_bytes == device_size_bytes => {
                tracing::warn!(
                    path = %path.display(),
                    preserved_bytes = found.preserved_bytes(),
                    "the undo journal of an interrupted catch-up holds the image from before it"
                );
                j.journal = Some(found);
                (j, true)
            }
            Ok(Some(found)) => {
                j.journal = Some(found);
                j.finish();
                (j, false)
            }
            Err(e) => {
                tracing::error!(error = %e, "the undo journal left at start is unreadable; no fallback image");
                (j, false)
            }
        }
    }

    /// Whether a journal is being kept, and its size (status).
    pub(crate) fn status(&self) -> Option<(u64, u64)> {
        self.journal.as_ref().map(|j| (j.preserved_bytes(), j.used_bytes()))
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Before a batch of actions runs (see the module doc). `Err` when the journal
    /// had to go: the core is to be told.
    pub(crate) fn before(&mut self, actions: &[Action], generation: u64) -> Result<(), Lost> {
        let mut ranges = std::mem::take(&mut self.ranges);
        ranges.clear();
        let mut result = Ok(());
        for action in actions {
            match action {
                Action::CatchUpBegin { discarded } => {
                    if let Err(lost) = self.begin(*discarded, generation) {
                        result = Err(lost);
                    }
                }
                Action::Local { op, .. } if self.journal.is_some() => {
                    if let Some(r) = op.overwritten_range() {
                        ranges.push(r);
                    }
                }
                _ => {}
            }
        }
        if !ranges.is_empty() && result.is_ok() {
            result = self.preserve(&ranges);
        }
        self.ranges = ranges;
        result
    }

    fn begin(&mut self, discarded: bool, generation: u64) -> Result<(), Lost> {
        if self.capacity_bytes == 0 {
            return Err(Lost("undo-size is 0: no fallback image is kept".into()));
        }
        // A journal of an earlier, interrupted catch-up still holds the older
        // image; a new catch-up from a consistent disk starts over.
        self.journal = None;
        self.end_after_seq = None;
        let header = UndoHeader {
            device_size_bytes: self.device_size_bytes,
            granule_bytes: self.granule_bytes,
            capacity_bytes: self.capacity_bytes,
            purpose: if discarded { Purpose::Discarded } else { Purpose::CatchUp },
            generation,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        if self.data.is_none() {
            return Err(Lost("the backing store could not be opened for the undo journal".into()));
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            return Err(Lost(format!("cannot create undo-dir {}: {e}", self.dir.display())));
        }
        match UndoJournal::create(&self.path, header) {
            Ok(j) => {
                tracing::info!(path = %self.path.display(), discarded, "catch-up: undo journal started");
                self.journal = Some(j);
                Ok(())
            }
            Err(e) => Err(Lost(format!("cannot create the undo journal: {e}"))),
        }
    }

    fn preserve(&mut self, ranges: &[Range<u64>]) -> Result<(), Lost> {
        let (Some(journal), Some(data)) = (self.journal.as_mut(), self.data.as_ref()) else { return Ok(()) };
        let result = journal.preserve(data, ranges).and_then(|_| journal.sync());
        result.map_err(|e| {
            let lost = Lost(format!("the undo journal was dropped: {e}"));
            self.drop_journal();
            lost
        })
    }

    fn drop_journal(&mut self) {
        self.journal = None;
        if let Err(e) = UndoJournal::remove(&self.path) {
            tracing::error!(error = %e, "cannot remove the undo journal");
        }
    }

    /// `CatchUpEnd`: once `after_seq` is durable.
    pub(crate) fn end_after(&mut self, after_seq: u64) {
        self.end_after_seq = Some(after_seq);
        self.on_meta_durable(self.durable_seq);
    }

    /// A metadata update is durable.
    pub(crate) fn on_meta_durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
        if self.end_after_seq.is_some_and(|s| s <= self.durable_seq) {
            self.end_after_seq = None;
            self.finish();
        }
    }

    /// The catch-up is over: remove the journal, or keep a discarded node's.
    fn finish(&mut self) {
        let Some(journal) = self.journal.take() else { return };
        if journal.header().purpose == Purpose::Discarded {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let kept = crate::undo::discarded_path(&self.dir, &self.resource, now);
            match journal.keep_as(&kept) {
                Ok(()) => tracing::warn!(
                    path = %kept.display(),
                    "this node's discarded data is kept: `blockctl export-discarded` writes it out"
                ),
                Err(e) => tracing::error!(error = %e, "cannot keep the discarded node's undo journal"),
            }
            return;
        }
        drop(journal);
        if let Err(e) = UndoJournal::remove(&self.path) {
            tracing::error!(error = %e, "cannot remove the undo journal");
        }
    }

    /// `RollBack`: writes the old contents back (durably); the ranges restored.
    pub(crate) fn roll_back(&mut self) -> Result<Vec<Range<u64>>, String> {
        let (Some(journal), Some(data)) = (self.journal.as_ref(), self.data.as_ref()) else {
            return Err("no undo journal is kept".into());
        };
        journal.roll_back(data).map_err(|e| e.to_string())?;
        Ok(journal.preserved_ranges())
    }
}
