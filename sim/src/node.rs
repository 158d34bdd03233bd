//! One simulated node: its disk (which outlives crashes), and while it runs, the
//! real replication core with the project's own metadata store on that disk,
//! started through the same recovery code as `blockd run` (`repl::recover`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use blockd::meta::{CreateOptions, MetaStore};
use blockd::repl::core::{Core, CoreConfig, JobId};
use blockd::repl::recover::{MetaJob, MetaWriter, recover};
use blockd::state::Role;
use blockd::storage::IoOp;

use crate::disk::SimDisk;

/// An op submitted to the disk and not completed yet.
#[derive(Debug)]
pub struct PendingOp {
    pub job: JobId,
    pub op: IoOp,
    /// The disk's stamp when it was submitted (a flush covers what completed
    /// before).
    pub submitted_stamp: u64,
}

/// A running node's state outside the core.
pub struct Running {
    pub core: Core,
    pub meta: MetaStore,
    /// Metadata jobs, carried out one at a time in order (the metadata thread).
    pub meta_queue: VecDeque<MetaJob>,
    pub meta_busy: bool,
    pub meta_writer: MetaWriter,
    pub next_nbd_job: u64,
    pub next_op: u64,
    pub ops: HashMap<u64, PendingOp>,
    /// The session the core believes it is linked through.
    pub session: Option<u64>,
    /// The core's link policy (false: StandAlone, no connecting).
    pub link_enabled: bool,
    /// New client requests are accepted (false while a demotion drains them).
    pub accepting_clients: bool,
    /// Application requests since the last tick (the `auto` resync rate).
    pub app_requests: u64,
    /// A catch-up's undo journal (the shell's `CatchUpJournal`): the contents of
    /// each block before the catch-up first overwrote it. Lost in a crash (the
    /// restarted core is not told of a fallback, so it never rolls back then).
    pub undo: Option<std::collections::BTreeMap<u64, Vec<u8>>>,
    /// The whole disk as it was when the catch-up began (taken when no write was
    /// in flight then), for the check that a rollback restores exactly it.
    pub undo_snapshot: Option<Vec<u8>>,
}

impl Running {
    /// Nothing of this node is in flight: disk ops, metadata jobs.
    pub fn idle(&self) -> bool {
        self.ops.is_empty() && self.meta_queue.is_empty() && !self.meta_busy
    }
}

pub struct SimNode {
    pub index: usize,
    pub name: String,
    pub disk: Arc<SimDisk>,
    pub run: Option<Running>,
    /// Bumped at every crash: events of an earlier life are dropped.
    pub incarnation: u64,
    /// The exported device size.
    pub size_bytes: u64,
}

impl SimNode {
    /// A node whose disk has fresh metadata (`create-md`, optionally
    /// `--clear-bitmap`).
    pub fn create(
        index: usize,
        name: &str,
        disk_bytes: u64,
        clear_bitmap: bool,
        seed: u64,
    ) -> anyhow::Result<SimNode> {
        let disk = Arc::new(SimDisk::new(disk_bytes, seed));
        let opts = CreateOptions {
            resource: "r0".into(),
            node: name.into(),
            granularity_bytes: 4096,
            force: false,
            clear_bitmap,
            size_bytes: None,
        };
        let sb = MetaStore::create_on_device(disk.clone(), name, &opts)?;
        let size_bytes = sb.data_size_bytes;
        Ok(SimNode { index, name: name.to_owned(), disk, run: None, incarnation: 0, size_bytes })
    }

    /// Starts the node as `blockd run` does: open the metadata, recover, and build
    /// the core (always Secondary at start).
    pub fn start(&mut self, cfg: &CoreConfig, seed: u64) -> anyhow::Result<()> {
        let mut meta = MetaStore::open_on_device(self.disk.clone(), &self.name)?;
        let rec = recover(&mut meta, cfg.al_extents, None)?;
        let mut cfg = cfg.clone();
        cfg.size_bytes = rec.size_bytes;
        // The simulated pair is alpha and beta: alpha's name sorts first.
        cfg.name_sorts_first = self.index == 0;
        let sb = &rec.superblock;
        let core =
            Core::new(cfg, Role::Secondary, sb.disk, sb.generations, rec.crashed_primary, rec.bitmap, seed);
        self.run = Some(Running {
            core,
            meta,
            meta_queue: VecDeque::new(),
            meta_busy: false,
            meta_writer: MetaWriter::default(),
            next_nbd_job: 1,
            next_op: 1,
            ops: HashMap::new(),
            session: None,
            link_enabled: true,
            accepting_clients: true,
            app_requests: 0,
            undo: None,
            undo_snapshot: None,
        });
        Ok(())
    }
}
