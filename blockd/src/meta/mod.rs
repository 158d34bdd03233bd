//! Per-node persistent metadata (SPEC §5): the superblock with generation ids and
//! flags, and the reserved bitmap and activity-log areas; `create-md`, open, durable
//! updates, `dump-md`.
//!
//! - [`Layout`]: where data, bitmap, activity log (AL) and superblock live (pure).
//! - [`Superblock`]: the header's fields; its slot encoding is in `superblock.rs`.
//! - [`MetaStore`]: owns the (locked) metadata file; [`MetaStore::create`],
//!   [`MetaStore::open`], [`MetaStore::update`], [`MetaStore::dump`]; the bitmap
//!   ([`MetaStore::read_bitmap`], [`MetaStore::write_bitmap_blocks`] with
//!   [`BitmapBlock`], in `bitmap_io.rs`) and the activity log ([`MetaStore::read_al`],
//!   [`MetaStore::write_al`], in `al.rs`).
//! - [`MetaError`]: every error names the path (`disk /x.img` or `meta /m.md`).
//!
//! # On-disk format (version 1)
//!
//! Metadata area, every part 4 KiB aligned (see [`layout`]):
//! - internal, at the end of the backing store (its size rounded down to 4 KiB):
//!   `[data][bitmap][AL 64 KiB][superblock slot A][slot B]`;
//! - external, at the start of the metadata file:
//!   `[slot A][slot B][AL 64 KiB][bitmap]` (mirrored, so the superblock is at offset 0
//!   whatever the bitmap size).
//!
//! Bitmap area: `ceil(data / granularity / 8)` bytes rounded up to 4 KiB (one bit per
//! granule, one peer), then the crc table: one little-endian u32 crc32c per 4 KiB
//! bitmap block, rounded up to 4 KiB. The encoding of the bits is the `bitmap` crate's
//! (bit `i` is bit `i % 64` of LE u64 word `i / 64`). `create` writes a valid empty
//! bitmap: zero bits, and in every table entry the crc32c of a zero block (which is
//! not 0, so a zeroed table is corrupt, not empty). A block that does not match its
//! entry makes the whole bitmap untrusted.
//!
//! Activity-log area (64 KiB): two 32 KiB slots, A then B, each holding the whole set
//! of hot extents (extent `e` = bytes `e * 4 MiB ..`), all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BLKDALOG` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | crc32c of the 32 KiB slot with these 4 bytes as zero |
//! | 16 | 8 | sequence (highest valid slot wins) |
//! | 24 | 4 | count (at most [`MAX_AL_EXTENTS`]) |
//! | 28 | 4 × count | extent numbers; the rest of the slot is zero |
//!
//! A slot with a bad magic, version, crc or count is ignored; no valid slot (as after
//! `create`, which zeroes the area) is the empty set. A write goes to the slot not
//! holding the newest copy, with its sequence + 1, then `fdatasync`.
//!
//! Superblock slot: 4096 bytes, all integers **little-endian**, unused bytes zero:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BLKDMETA` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | crc32c of the 4096-byte slot with these 4 bytes as zero |
//! | 16 | 8 | sequence (highest valid slot wins) |
//! | 24 | 8 | resource id (random at create) |
//! | 32 | 8 | created at (unix seconds) |
//! | 40 | 8 | data size (exported bytes) |
//! | 48 | 8 | bitmap granularity (bytes per bit) |
//! | 56 | 8 | AL extent bytes (4 MiB) |
//! | 64 | 4 | AL extents (1237) |
//! | 68 | 4 | flags: bit 0 consistent, 1 was-primary, 2 clean-shutdown, 3 peer-full-sync-needed |
//! | 72 | 1 | disk state ([`DiskState::code`]) |
//! | 73 | 1 | placement: 1 internal, 2 external |
//! | 80 | 8 | generation: current |
//! | 88 | 8 | generation: bitmap |
//! | 96 | 32 | generation: history\[4\], newest first |
//! | 128 | 48 | layout: area offset, area bytes, bitmap offset, bitmap bytes, AL offset, usable data bytes |
//! | 192 | 1+64 | resource name: length, UTF-8 bytes |
//! | 272 | 1+64 | node name: length, UTF-8 bytes |
//!
//! Magic, version and crc stay at these offsets in every future version, so an
//! intact slot of another version is reported as such rather than as corruption.
//!
//! # Durability
//! An update writes the slot *not* holding the current copy with `sequence + 1`, then
//! `fdatasync`s, and only then becomes current: a crash or torn write at any point
//! leaves the previous slot intact, and reading takes the valid slot with the highest
//! sequence. The AL alternates its two slots the same way. `create` writes the empty
//! bitmap and zeroes the AL and syncs before it writes any superblock (and, with
//! `force`, first wipes the old slots), so a half-done create never looks valid.
//!
//! Bitmap blocks are written in place (bits, then the touched crc-table pages, then
//! one `fdatasync`): a crash in between can leave a block and its crc disagreeing,
//! which reading reports as corruption; the caller then treats the device as wholly
//! out of sync rather than trusting any of the bitmap.

mod al;
mod bitmap_io;
mod error;
mod io;
pub mod layout;
mod superblock;

#[cfg(test)]
mod area_tests;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::MetaLocation;
use crate::state::{DiskState, Generations};

pub use self::al::{AL_MAGIC, AL_VERSION, MAX_AL_EXTENTS};
pub use self::bitmap_io::BitmapBlock;
pub use self::error::MetaError;
pub use self::io::{MetaDevice, random_id};
pub use self::layout::{Layout, MetaKind};
pub use self::superblock::{
    AL_EXTENT_BYTES, DEFAULT_AL_EXTENTS, FORMAT_VERSION, MAGIC, MetaFlags, NAME_MAX_BYTES, Superblock,
    clear_bitmap_gen,
};

use self::al::AlNewest;
use self::bitmap_io::CrcTable;
use self::io::MetaFile;
use self::layout::{MIN_DATA_BYTES, SUPERBLOCK_SLOT_BYTES};
use self::superblock::{SlotProblem, StoredGeometry};

const SLOT_NAMES: [char; 2] = ['A', 'B'];

/// Where a node's metadata is: its backing store and the config's `meta` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaTarget {
    pub backing: PathBuf,
    pub location: MetaLocation,
}

impl MetaTarget {
    /// The file holding the metadata.
    pub fn meta_path(&self) -> &Path {
        match &self.location {
            MetaLocation::Internal => &self.backing,
            MetaLocation::External(p) => p,
        }
    }

    fn at_meta(&self) -> String {
        match &self.location {
            MetaLocation::Internal => self.at_disk(),
            MetaLocation::External(p) => format!("meta {}", p.display()),
        }
    }

    fn at_disk(&self) -> String {
        format!("disk {}", self.backing.display())
    }

    /// The backing store's length: the metadata file's for internal metadata, else
    /// the backing store opened read-only just to measure it.
    fn backing_bytes(&self, meta: &MetaFile) -> Result<u64, MetaError> {
        match self.location {
            MetaLocation::Internal => meta.len_bytes(),
            MetaLocation::External(_) => {
                let at = self.at_disk();
                let (file, _) = io::open_checked(&self.backing, &at, true, false)?;
                io::len_bytes(&file, &at)
            }
        }
    }
}

/// What `create-md` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    pub resource: String,
    pub node: String,
    pub granularity_bytes: u64,
    /// Overwrite valid metadata.
    pub force: bool,
    /// Both disks of a fresh pair are known identical: start `UpToDate` with the
    /// shared [`clear_bitmap_gen`] so that the first connect skips the full sync.
    pub clear_bitmap: bool,
    /// `resource.size`: the data area must hold at least this; it is then the
    /// exported size.
    pub size_bytes: Option<u64>,
}

/// The open metadata of one node: the locked file, its layout and the current
/// superblock.
#[derive(Debug)]
pub struct MetaStore {
    file: MetaFile,
    target: MetaTarget,
    layout: Layout,
    sb: Superblock,
    /// Index of the slot holding `sb` (0 = A).
    current_slot: usize,
    /// The bitmap's crc table as last written (loaded at open), so that a crc update
    /// writes its table page without reading it first.
    crcs: CrcTable,
    /// The AL slot holding the newest valid copy, if any.
    al: Option<AlNewest>,
}

/// What reading both slots found.
struct Slots {
    /// Per slot: decoded, or why not.
    decoded: [Result<(Superblock, StoredGeometry), SlotProblem>; 2],
}

impl Slots {
    fn read(file: &MetaFile, superblock_offset_bytes: u64) -> Result<Slots, MetaError> {
        let read_one = |i: usize| -> Result<_, MetaError> {
            let mut buf = vec![0u8; SUPERBLOCK_SLOT_BYTES as usize];
            let what = format!("superblock slot {}", SLOT_NAMES[i]);
            file.read(&mut buf, superblock_offset_bytes + i as u64 * SUPERBLOCK_SLOT_BYTES, &what)?;
            Ok(Superblock::decode(&buf))
        };
        Ok(Slots { decoded: [read_one(0)?, read_one(1)?] })
    }

    /// An intact slot of another format version, if any: never guess past it.
    fn unsupported_version(&self, at: &str) -> Option<MetaError> {
        self.decoded.iter().enumerate().find_map(|(i, d)| match d {
            Err(SlotProblem::Version(version)) => Some(MetaError::UnsupportedVersion {
                at: at.to_owned(),
                slot: SLOT_NAMES[i],
                version: *version,
                supported: FORMAT_VERSION,
            }),
            _ => None,
        })
    }

    /// The newest intact slot (ties go to A), if any.
    fn newest(&self) -> Option<(usize, &Superblock, &StoredGeometry)> {
        let mut best: Option<(usize, &Superblock, &StoredGeometry)> = None;
        for (i, d) in self.decoded.iter().enumerate() {
            if let Ok((sb, geom)) = d
                && best.is_none_or(|(_, b, _)| sb.sequence > b.sequence)
            {
                best = Some((i, sb, geom));
            }
        }
        best
    }

    /// Marks intact slots whose fields do not fit `layout` as invalid.
    fn reject_invalid(&mut self, layout: &Layout) {
        for d in &mut self.decoded {
            let problem = match d {
                Ok((_, geom)) if *geom != StoredGeometry::of(layout) => {
                    "layout differs from the other slot".into()
                }
                Ok((sb, _)) => match sb.check(layout) {
                    Ok(()) => continue,
                    Err(why) => why,
                },
                Err(_) => continue,
            };
            *d = Err(SlotProblem::Invalid(problem));
        }
    }

    /// The error when no slot is intact.
    fn none_valid(&self, at: &str) -> MetaError {
        let problem = |i: usize| match &self.decoded[i] {
            Err(p) => p.to_string(),
            Ok(_) => "valid".to_owned(),
        };
        if self.decoded.iter().all(|d| matches!(d, Err(SlotProblem::BadMagic))) {
            MetaError::NoMetadata { at: at.to_owned() }
        } else {
            MetaError::NoValidSuperblock { at: at.to_owned(), slot_a: problem(0), slot_b: problem(1) }
        }
    }
}

/// Refuses resource and node names the superblock cannot hold.
fn check_names(opts: &CreateOptions) -> Result<(), MetaError> {
    for (what, name) in [("resource", &opts.resource), ("node", &opts.node)] {
        if let Some(why) = superblock::name_problem(name) {
            return Err(MetaError::BadName { what, name: name.clone(), why });
        }
    }
    Ok(())
}

impl MetaStore {
    /// Initializes the metadata: writes an empty bitmap (zero bits, valid crcs) and
    /// zeroes the AL area (no hot extents), then writes both superblock slots,
    /// durably. Refuses if a valid superblock exists unless `opts.force`. An external
    /// metadata file that does not exist is created.
    ///
    /// With `opts.clear_bitmap`: `disk = UpToDate`, `consistent`, and the current
    /// generation is [`clear_bitmap_gen`] of the resource name and exported size,
    /// which the peer derives identically. Without: `Inconsistent`, generations all 0.
    pub fn create(loc: &MetaTarget, opts: &CreateOptions) -> Result<Superblock, MetaError> {
        check_names(opts)?;
        let at = loc.at_meta();
        let path = loc.meta_path();
        let external = matches!(loc.location, MetaLocation::External(_));
        let existed = path.exists();
        let file = MetaFile::open(path, &at, external)?;
        if external && !existed {
            io::sync_parent_dir(path, &at)?;
        }
        let backing_bytes = loc.backing_bytes(&file)?;
        Self::create_in(loc, &file, backing_bytes, opts)
    }

    /// [`MetaStore::create`] with internal metadata on `device` (the simulator's
    /// disks); `name` stands for the path in messages.
    pub fn create_on_device(
        device: std::sync::Arc<dyn MetaDevice>,
        name: &str,
        opts: &CreateOptions,
    ) -> Result<Superblock, MetaError> {
        let loc = MetaTarget { backing: PathBuf::from(name), location: MetaLocation::Internal };
        let file = MetaFile::device(device, &loc.at_meta());
        let backing_bytes = file.len_bytes()?;
        Self::create_in(&loc, &file, backing_bytes, opts)
    }

    fn create_in(
        loc: &MetaTarget,
        file: &MetaFile,
        backing_bytes: u64,
        opts: &CreateOptions,
    ) -> Result<Superblock, MetaError> {
        check_names(opts)?;
        let at = loc.at_meta();
        let external = matches!(loc.location, MetaLocation::External(_));
        let layout = Layout::compute(backing_bytes, opts.granularity_bytes, &loc.location)
            .map_err(|e| e.at(&loc.at_disk()))?;
        let data_size_bytes = Self::exported_size(loc, &layout, opts.size_bytes)?;
        if external {
            let have_bytes = file.len_bytes()?;
            if have_bytes < layout.area_end_bytes() {
                if !file.regular {
                    let need_bytes = layout.area_end_bytes();
                    return Err(MetaError::MetaTooSmall { at, have_bytes, need_bytes });
                }
                file.grow(layout.area_end_bytes())?;
            }
        }

        let slots = Slots::read(file, layout.superblock_offset_bytes)?;
        let found = slots
            .newest()
            .map(|(_, sb, _)| (sb.resource.clone(), sb.node.clone()))
            .or_else(|| slots.unsupported_version(&at).map(|e| ("?".to_owned(), format!("? ({e})"))));
        if let Some((resource, node)) = found {
            if !opts.force {
                return Err(MetaError::AlreadyExists { at, resource, node });
            }
            // Invalidate the old superblock first: a crash while the areas are being
            // zeroed must not leave old generations next to a wiped bitmap.
            file.zero(layout.superblock_offset_bytes, 2 * SUPERBLOCK_SLOT_BYTES, "superblock slots")?;
            file.sync()?;
        }
        file.zero(layout.bitmap_offset_bytes, layout.bitmap_bytes, "bitmap area")?;
        CrcTable::empty(&layout).write_all(file, &layout)?;
        file.zero(layout.al_offset_bytes, layout.al_bytes, "activity-log area")?;
        file.sync()?;

        let resource_id = random_id().map_err(|e| MetaError::io(&at, "reading /dev/urandom", e))?;
        let created_at_unix_secs =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (disk, generations) = if opts.clear_bitmap {
            let current = clear_bitmap_gen(&opts.resource, data_size_bytes);
            (DiskState::UpToDate, Generations { current, ..Generations::default() })
        } else {
            (DiskState::Inconsistent, Generations::default())
        };
        let mut sb = Superblock {
            sequence: 1,
            resource_id,
            resource: opts.resource.clone(),
            node: opts.node.clone(),
            data_size_bytes,
            bitmap_granularity_bytes: opts.granularity_bytes,
            al_extent_bytes: AL_EXTENT_BYTES,
            al_extents: DEFAULT_AL_EXTENTS,
            flags: MetaFlags { consistent: opts.clear_bitmap, clean_shutdown: true, ..MetaFlags::default() },
            disk,
            generations,
            created_at_unix_secs,
        };
        sb.check(&layout).map_err(|detail| MetaError::BadUpdate { at: at.clone(), detail })?;
        // Distinct sequences (A = 1, B = 2) so that "newest" never needs a tie-break.
        for (slot, name) in SLOT_NAMES.iter().enumerate() {
            sb.sequence = slot as u64 + 1;
            let what = format!("superblock slot {name}");
            file.write(&sb.encode(&layout), layout.slot_offset_bytes(slot), &what)?;
        }
        file.sync()?;
        Ok(sb)
    }

    /// The exported size: `resource.size` if given (it must fit), else all the data.
    fn exported_size(loc: &MetaTarget, layout: &Layout, size_bytes: Option<u64>) -> Result<u64, MetaError> {
        let Some(size) = size_bytes else { return Ok(layout.data_bytes) };
        let detail = if size > layout.data_bytes {
            format!(
                "resource.size is {size} bytes but only {} bytes of data fit (backing store {} bytes, \
                 {} bytes of {} metadata)",
                layout.data_bytes,
                layout.backing_bytes,
                layout.area_bytes,
                layout.kind.as_str()
            )
        } else if size < MIN_DATA_BYTES {
            format!("resource.size is {size} bytes; at least {MIN_DATA_BYTES} bytes are needed")
        } else {
            return Ok(size);
        };
        Err(MetaError::BadSize { at: loc.at_disk(), detail })
    }

    /// Opens and validates the metadata: the newest intact slot wins; a torn or
    /// corrupt slot falls back to the other. The file stays locked while the store
    /// lives.
    pub fn open(loc: &MetaTarget) -> Result<MetaStore, MetaError> {
        let at = loc.at_meta();
        let file = match MetaFile::open(loc.meta_path(), &at, false) {
            // A missing external file is metadata never created; a missing disk is not.
            Err(MetaError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && matches!(loc.location, MetaLocation::External(_)) =>
            {
                return Err(MetaError::NoMetadata { at });
            }
            other => other?,
        };
        let backing_bytes = loc.backing_bytes(&file)?;
        Self::open_in(loc, file, backing_bytes)
    }

    /// [`MetaStore::open`] of internal metadata on `device` (the simulator's disks).
    pub fn open_on_device(
        device: std::sync::Arc<dyn MetaDevice>,
        name: &str,
    ) -> Result<MetaStore, MetaError> {
        let loc = MetaTarget { backing: PathBuf::from(name), location: MetaLocation::Internal };
        let file = MetaFile::device(device, &loc.at_meta());
        let backing_bytes = file.len_bytes()?;
        Self::open_in(&loc, file, backing_bytes)
    }

    fn open_in(loc: &MetaTarget, file: MetaFile, backing_bytes: u64) -> Result<MetaStore, MetaError> {
        let at = loc.at_meta();
        let kind = MetaKind::from(&loc.location);
        let Some(superblock_offset_bytes) = Layout::superblock_offset_for(kind, backing_bytes) else {
            return Err(MetaError::NoMetadata { at });
        };
        let slots = Slots::read(&file, superblock_offset_bytes)?;
        if let Some(e) = slots.unsupported_version(&at) {
            return Err(e);
        }
        let Some((_, sb, stored)) = slots.newest() else {
            return Err(slots.none_valid(&at));
        };
        if stored.kind != kind {
            let detail =
                format!("created as {} metadata, the config says {}", stored.kind.as_str(), kind.as_str());
            return Err(MetaError::LayoutMismatch { at, detail });
        }
        // The layout is fixed at create time; recomputing it from the store as it is
        // now must give the same answer, else the store changed size underneath.
        let layout = Layout::compute(backing_bytes, sb.bitmap_granularity_bytes, &loc.location);
        let layout = match layout {
            Ok(l) if StoredGeometry::of(&l) == *stored => l,
            _ => {
                let detail = format!(
                    "the disk is now {backing_bytes} bytes, which does not give the recorded layout \
                     (usable data {} bytes, metadata area {} bytes at offset {}); did it change size?",
                    stored.fields[5], stored.fields[1], stored.fields[0]
                );
                return Err(MetaError::LayoutMismatch { at, detail });
            }
        };
        // A slot that is intact but out of range for this layout (a bug that wrote
        // nonsense, or a future field) counts as bad: fall back to the other one.
        let mut slots = slots;
        slots.reject_invalid(&layout);
        let Some((current_slot, sb, _)) = slots.newest() else {
            return Err(slots.none_valid(&at));
        };
        let sb = sb.clone();
        let crcs = CrcTable::load(&file, &layout)?;
        let al = al::load_newest(&file, &layout)?;
        Ok(MetaStore { file, target: loc.clone(), layout, sb, current_slot, crcs, al })
    }

    /// Checks that this metadata belongs to `resource` and `node` (the config's).
    pub fn verify_identity(&self, resource: &str, node: &str) -> Result<(), MetaError> {
        let at = self.target.at_meta();
        if self.sb.resource != resource {
            let (found, expected) = (self.sb.resource.clone(), resource.to_owned());
            return Err(MetaError::WrongResource { at, found, expected });
        }
        if self.sb.node != node {
            return Err(MetaError::WrongNode { at, found: self.sb.node.clone(), expected: node.to_owned() });
        }
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn target(&self) -> &MetaTarget {
        &self.target
    }

    /// The exported device size.
    pub fn data_size_bytes(&self) -> u64 {
        self.sb.data_size_bytes
    }

    /// The slot holding the current superblock: 'A' or 'B'.
    pub fn current_slot(&self) -> char {
        SLOT_NAMES[self.current_slot]
    }

    /// Durable update: applies `f` to a copy, writes it with the next sequence into
    /// the slot not holding the current copy, `fdatasync`s, and only then makes it
    /// current. On error nothing changed in memory and the current slot is intact.
    ///
    /// `f` may change flags, disk state, generations, the AL size and the data size
    /// (within the layout); the sequence is set here. Resource id and name, node,
    /// granularity and creation time are fixed at create (`BadUpdate` otherwise).
    pub fn update(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let at = self.target.at_meta();
        let mut next = self.sb.clone();
        f(&mut next);
        let old = &self.sb;
        let fixed = [
            ("resource id", old.resource_id != next.resource_id),
            ("resource name", old.resource != next.resource),
            ("node name", old.node != next.node),
            ("bitmap granularity", old.bitmap_granularity_bytes != next.bitmap_granularity_bytes),
            ("creation time", old.created_at_unix_secs != next.created_at_unix_secs),
        ];
        if let Some((what, _)) = fixed.iter().find(|(_, changed)| *changed) {
            let detail = format!("the {what} is fixed at create-md");
            return Err(MetaError::BadUpdate { at, detail });
        }
        next.sequence = old.sequence.checked_add(1).ok_or_else(|| MetaError::BadUpdate {
            at: at.clone(),
            detail: "sequence number exhausted".to_owned(),
        })?;
        next.check(&self.layout).map_err(|detail| MetaError::BadUpdate { at, detail })?;
        let slot = 1 - self.current_slot;
        let what = format!("superblock slot {}", SLOT_NAMES[slot]);
        self.file.write(&next.encode(&self.layout), self.layout.slot_offset_bytes(slot), &what)?;
        self.file.sync()?;
        self.sb = next;
        self.current_slot = slot;
        Ok(())
    }

    /// Human-readable metadata, one `key: value` per line (`blockctl dump-md`).
    pub fn dump(&self) -> String {
        let (sb, l) = (&self.sb, &self.layout);
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let g = &sb.generations;
        let history: Vec<String> = g.history.iter().map(|id| format!("{id:016x}")).collect();
        let mut out = String::new();
        let mut line = |k: &str, v: &dyn std::fmt::Display| {
            let _ = writeln!(out, "{k}: {v}");
        };
        line("meta_path", &self.target.meta_path().display());
        line("disk_path", &self.target.backing.display());
        line("placement", &l.kind.as_str());
        line("format_version", &FORMAT_VERSION);
        line("sequence", &sb.sequence);
        line("current_slot", &self.current_slot());
        line("resource", &sb.resource);
        line("resource_id", &format_args!("{:016x}", sb.resource_id));
        line("node", &sb.node);
        line("created_at_unix_secs", &sb.created_at_unix_secs);
        line("data_size_bytes", &sb.data_size_bytes);
        line("usable_data_bytes", &l.data_bytes);
        line("backing_size_bytes", &l.backing_bytes);
        line("bitmap_granularity_bytes", &sb.bitmap_granularity_bytes);
        line("al_extent_bytes", &sb.al_extent_bytes);
        line("al_extents", &sb.al_extents);
        line("disk", &sb.disk);
        line("consistent", &yes_no(sb.flags.consistent));
        line("was_primary", &yes_no(sb.flags.was_primary));
        line("clean_shutdown", &yes_no(sb.flags.clean_shutdown));
        line("peer_full_sync_needed", &yes_no(sb.flags.peer_full_sync_needed));
        line("gen_current", &format_args!("{:016x}", g.current));
        line("gen_bitmap", &format_args!("{:016x}", g.bitmap));
        line("gen_history", &history.join(" "));
        line("meta_area_offset_bytes", &l.area_offset_bytes);
        line("meta_area_bytes", &l.area_bytes);
        line("bitmap_offset_bytes", &l.bitmap_offset_bytes);
        line("bitmap_bytes", &l.bitmap_bytes);
        line("al_offset_bytes", &l.al_offset_bytes);
        line("al_bytes", &l.al_bytes);
        line("superblock_offset_bytes", &l.superblock_offset_bytes);
        // Reads the whole bitmap: fine for an operator's dump, not for a hot path.
        match self.read_bitmap(sb.data_size_bytes) {
            Ok(map) => line("bitmap_dirty_bytes", &map.dirty_bytes()),
            Err(MetaError::BitmapCorrupt { block, expected, found, .. }) => line(
                "bitmap",
                &format_args!(
                    "corrupt (block {block}: crc32c in the table {expected:#010x}, of the block \
                     {found:#010x})"
                ),
            ),
            Err(e) => line("bitmap", &format_args!("unreadable ({e})")),
        }
        match self.read_al() {
            Ok(extents) => line("al_hot_extents", &extents.len()),
            Err(e) => line("al_hot_extents", &format_args!("unreadable ({e})")),
        }
        out
    }
}
