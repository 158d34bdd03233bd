//! [`Config::check_local`]: what only the node itself can check, because it depends on
//! this machine rather than on the file: the disk is there, opens read-write and is
//! large enough; an external metadata file can be created where the config says.
//!
//! Parsing stays free of such checks on purpose: `blockctl show` validates a file on
//! any host, and one file describes every node, whose disks exist only on their own
//! hosts. The checks open nothing for writing beyond probing (no `O_CREAT`, nothing
//! written), so a failed check leaves the disk and the metadata as they were.

use std::fs::{FileType, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::{Config, ConfigError, MetaLocation, NodeConfig};
use crate::meta::layout::{Layout, LayoutError, MIN_DATA_BYTES};

impl Config {
    /// Checks `node` (this host's node, from [`Config::local_node`]) against this
    /// machine:
    ///
    /// - `disk` exists, is a regular file or a block device, and opens read-write;
    /// - `disk` can hold `resource.size` when that is set: for a replicated resource
    ///   the data area that [`Layout::compute`] leaves (internal metadata takes its
    ///   share of the disk), for a single-node resource (a standalone export without
    ///   metadata) the whole disk; a replicated disk must also leave at least
    ///   [`MIN_DATA_BYTES`] of data, since `create-md` refuses less;
    /// - an external `meta`: its directory exists, and the file, if it already exists,
    ///   is a regular file or a block device that opens read-write.
    ///
    /// Errors are [`ConfigError::Invalid`] pointing at the node's `disk` (size
    /// problems too: the disk is what is too small) or `meta` line.
    pub fn check_local(&self, node: &NodeConfig) -> Result<(), ConfigError> {
        let index = self.nodes.iter().position(|n| n.name == node.name);
        let err = |line: usize, field: &str, message: String| ConfigError::Invalid {
            path: self.path.clone(),
            // 0: a NodeConfig built by hand, not read from this file.
            line: (line > 0).then_some(line),
            key: match index {
                Some(i) => format!("node[{i}].{field}"),
                None => format!("node.{field}"),
            },
            message,
        };
        let disk_err = |m: String| err(node.lines.disk, "disk", m);

        let disk_bytes = open_rw_size(&node.disk).map_err(disk_err)?;
        if let MetaLocation::External(meta) = &node.meta {
            check_external_meta(meta).map_err(|m| err(node.lines.meta, "meta", m))?;
        }

        let disk = node.disk.display();
        let name = &node.name;
        let replicated = self.peers(name).next().is_some();
        let (data_bytes, what) = if replicated {
            let granularity = self.resource.bitmap_granularity_bytes;
            match Layout::compute(disk_bytes, granularity, &node.meta) {
                Ok(layout) => {
                    let what = match node.meta {
                        MetaLocation::Internal => " of data after its internal metadata",
                        MetaLocation::External(_) => "",
                    };
                    (layout.data_bytes, what)
                }
                Err(LayoutError::TooSmall { data_bytes, .. }) => {
                    let after = match node.meta {
                        MetaLocation::Internal => format!(
                            ", leaving {} of data after its internal metadata",
                            human_exact(data_bytes)
                        ),
                        MetaLocation::External(_) => String::new(),
                    };
                    return Err(disk_err(format!(
                        "node {name}'s disk {disk} holds {}{after}; a replicated disk needs at least {} \
                         of data",
                        human_exact(disk_bytes),
                        human(MIN_DATA_BYTES)
                    )));
                }
                Err(LayoutError::BadGranularity { granularity_bytes }) => {
                    // Parsing refuses such a value; only a hand-built Config gets here.
                    return Err(ConfigError::Invalid {
                        path: self.path.clone(),
                        line: None,
                        key: "resource.bitmap-granularity".into(),
                        message: format!("{granularity_bytes} bytes is not a supported granularity"),
                    });
                }
            }
        } else {
            (disk_bytes, "")
        };
        if let Some(size) = self.resource.size_bytes
            && size > data_bytes
        {
            return Err(disk_err(format!(
                "`resource.size` is {} but node {name}'s disk {disk} holds only {}{what}; \
                 lower `resource.size` or use a larger disk",
                human_exact(size),
                human_exact(data_bytes)
            )));
        }
        Ok(())
    }
}

/// Opens `path` read-write (never creating it) and returns its size; the message
/// names the path and the OS error.
fn open_rw_size(path: &Path) -> Result<u64, String> {
    let shown = path.display();
    let cannot = |e: std::io::Error| format!("cannot open {shown} read-write: {e}");
    // The type first: opening a FIFO would block, and "Is a directory" alone does not
    // say what is expected instead.
    let file_type = std::fs::metadata(path).map_err(cannot)?.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(format!("{shown} is {}, not a regular file or a block device", kind(file_type)));
    }
    let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(cannot)?;
    // Seeking to the end gives the length of a regular file and of a block device.
    file.seek(SeekFrom::End(0)).map_err(|e| format!("cannot determine the size of {shown}: {e}"))
}

/// An external metadata path: `create-md` creates the file, so only its directory
/// must exist; an existing file must be usable like a disk.
fn check_external_meta(meta: &Path) -> Result<(), String> {
    let shown = meta.display();
    if let Some(dir) = meta.parent().filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(format!(
                    "cannot use {shown}: {} is {}, not a directory",
                    dir.display(),
                    kind(m.file_type())
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(format!("cannot use {shown}: directory {} does not exist", dir.display()));
            }
            Err(e) => return Err(format!("cannot use {shown}: directory {}: {e}", dir.display())),
        }
    }
    match std::fs::metadata(meta) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot open {shown} read-write: {e}")),
        Ok(_) => open_rw_size(meta).map(drop),
    }
}

/// "a directory", "a character device", ... for messages.
fn kind(t: FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "neither a file nor a device"
    }
}

/// `10 GiB`, `1.5 GiB`, `512 bytes`: the largest binary unit the value reaches, with
/// one decimal rounded down where it is not whole (a capacity is never shown larger
/// than it is).
pub(super) fn human(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        let one = 1u64 << shift;
        if bytes >= one {
            if bytes.is_multiple_of(one) {
                return format!("{} {unit}", bytes >> shift);
            }
            let tenths = u128::from(bytes) * 10 / u128::from(one);
            return format!("{}.{} {unit}", tenths / 10, tenths % 10);
        }
    }
    format!("{bytes} bytes")
}

/// [`human`] followed by the exact byte count when the short form is not exact, so
/// two sizes that round alike can still be told apart.
pub(super) fn human_exact(bytes: u64) -> String {
    let short = human(bytes);
    if short.contains('.') { format!("{short} ({bytes} bytes)") } else { short }
}
